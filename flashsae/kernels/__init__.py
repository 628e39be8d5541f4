"""Kernel backends for the ops: import the ops from `flashsae.ops`, not from here.

- `registry`: the `Backend` interface, the name -> backend table and how "auto" resolves.
- `reference`: the torch backend (any device; the oracle the Triton kernels are tested against).
- `fused_encode`: Triton fused matmul + running top-k encoder.
- `pairs`: the fired (token, slot) pairs grouped by feature once per step, in static sizes (both backends).
- `rows`: Triton gather_rows / row_dots / segment_rows (decode, its backward, the encoder backward).
- `sparse_adam`: Triton row-sparse Adam step.
- `keys`: the packed int64 top-k key format every encoder and merge shares.
"""
