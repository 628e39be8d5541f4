"""Kernel backends for the ops: import the ops from `flashsae.ops`, not from here.

- `registry`: the `Backend` interface, the name -> backend table and how "auto" resolves.
- `torch_encode`: the torch backend's encoder (chunked matmul + exact threshold select; any device).
- `reference`: the torch backend's row and Adam primitives (the oracle the Triton kernels are tested against).
- `cpu_native`: the torch backend's C++ CPU kernels (`cpu_kernels.cpp`: threshold select, Adam rows), built on first use.
- `chunked_encode`: the "triton" encoder: cuBLAS GEMM per chunk of features + Triton threshold select.
- `fused_encode`: the "triton-fused" encoder: Triton GEMM tiles with the threshold select in the epilogue.
- `triton_common`: what both Triton encoders share (b_pre folding, keys and candidate lists on registers).
- `pairs`: the fired (token, slot) pairs grouped by feature once per step, in static sizes (both backends).
- `rows`: Triton gather_rows / row_dots / segment_rows (decode, its backward, the encoder backward).
- `sparse_adam`: Triton row-sparse Adam step.
- `keys`: the packed int64 top-k key format every encoder and merge shares.
"""
