"""Compile every Triton kernel of flashsae for Hopper (sm_90) without a GPU, with Triton's own toolchain.

Run as a script (``python tests/sm90_compile.py``; TRITON_INTERPRET must be unset, since the
interpreter patches the compiler): prints one JSON line per case with ``ok``, the error if any,
and the registers / stack bytes per thread that ptxas gave the kernel (stack > 0 means spills).
The cases are the launch configurations the launchers use on a GPU: every entry of the fused
encoder's autotune table, and the fixed blocks of the sparse kernels, in bf16 (plus fp16 / fp32
where a kernel reads activations or weights directly).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator

TARGET = ("cuda", 90, 32)  # H100 / H200: compute capability 9.0, warp size 32


def _signature(fn, pointers: dict[str, str], floats: tuple[str, ...] = ()) -> dict[str, str]:
    """Triton signature of ``fn``: constexpr params, pointer params typed by ``pointers``, other scalars."""
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def cases() -> Iterator[tuple[str, object, dict, dict, dict]]:
    """(name, jit function, signature, constexprs, options) for every GPU launch configuration."""
    import torch

    from flashsae.kernels import fused_encode, rows, sparse_adam

    enc = fused_encode._topk_range_kernel
    for kp in (2, 64, 128, 256, 512):
        for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
            if dtype == "fp16" and kp != 64:  # fp16 shares bf16's table; once is enough
                continue
            for bm, bn, bk, warps, stages in fused_encode._block_configs(kp, torch_dtype):
                sig = _signature(enc, {"x_ptr": dtype, "w_ptr": dtype, "bias_ptr": "fp32", "cand_ptr": "i64"})
                consts = {"KP": kp, "LOG_KP": kp.bit_length() - 1, "IEEE_FP32": dtype == "fp32",
                          "UPCAST_BF16": False, "BM": bm, "BN": bn, "BK": bk}
                yield (f"topk_range KP={kp} {dtype} BM={bm} BN={bn} BK={bk} warps={warps} stages={stages}",
                       enc, sig, consts, {"num_warps": warps, "num_stages": stages})
    fold = fused_encode._fold_pre_bias_kernel
    for dtype in ("bf16", "fp32"):
        sig = _signature(fold, {"w_ptr": dtype, "b_ptr": dtype, "pre_ptr": dtype, "out_ptr": "fp32"})
        consts = {"BLOCK_F": fused_encode.FOLD_BLOCK_F, "BLOCK_D": fused_encode.FOLD_BLOCK_D}
        yield f"fold_pre_bias {dtype}", fold, sig, consts, {"num_warps": fused_encode.FOLD_WARPS}
    block_d = rows.MAX_BLOCK_D
    gather = rows._gather_rows_kernel
    for dtype in ("bf16", "fp32"):
        sig = _signature(gather, {"coef_ptr": dtype, "idx_ptr": "i64", "w_ptr": dtype, "bias_ptr": dtype, "out_ptr": dtype})
        yield (f"gather_rows {dtype}", gather, sig,
               {"HAS_BIAS": True, "BLOCK_B": rows.BLOCK_TOKENS, "BLOCK_D": block_d}, {})
    dots = rows._row_dots_kernel
    sig = _signature(dots, {"grad_ptr": "bf16", "idx_ptr": "i64", "w_ptr": "bf16", "out_ptr": "fp32"})
    yield "row_dots bf16", dots, sig, {"BLOCK_B": rows.BLOCK_TOKENS, "BLOCK_D": block_d}, {}
    seg = rows._segment_rows_kernel
    for d in (768, 4096):  # the headline widths: slices of 256 and 1024 columns
        seg_block = rows._segment_block_d(d)
        for coef in ("fp32", "bf16"):  # the encoder's fp32 grad_pre, the decoder's bf16 vals
            sig = _signature(seg, {"coef_ptr": coef, "pairs_ptr": "i64", "offsets_ptr": "i64", "vec_ptr": "bf16",
                                   "shift_ptr": "bf16", "out_ptr": "fp32", "coef_sum_ptr": "fp32"})
            yield (f"segment_rows coef={coef} BLOCK_D={seg_block}", seg, sig,
                   {"HAS_SHIFT": coef == "fp32", "BLOCK_D": seg_block}, {"num_warps": max(1, min(4, seg_block // 256))})
    adam = sparse_adam._sparse_adam_kernel
    block_d = sparse_adam.MAX_BLOCK_D
    for moments in ("fp32", "bf16"):
        for master in (True, False):
            sig = _signature(adam, {"param_ptr": "bf16", "grad_ptr": "fp32", "rows_ptr": "i64", "valid_ptr": "i1",
                                    "low_ptr": "i16", "m_ptr": moments, "v_ptr": moments, "step_size_ptr": "fp32",
                                    "bc2_sqrt_ptr": "fp32"},
                             floats=("beta1", "beta2", "eps"))
            consts = {"HAS_ROWS": True, "HAS_VALID": True, "HAS_LOW": master, "UNIT_NORM": True,
                      "BLOCK_R": sparse_adam.TILE_ELEMENTS // block_d, "BLOCK_D": block_d}
            yield f"sparse_adam moments={moments} master={master}", adam, sig, consts, {"num_warps": 8}


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers and stack bytes per thread, from cuobjdump (shipped with Triton's NVIDIA backend)."""
    import triton

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"regs": int(found.group(1)), "stack": int(found.group(2))} if found else {}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler's semantics")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    only = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, fn, sig, consts, options in cases():
        if only not in name:
            continue
        record: dict = {"case": name}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                      target=GPUTarget(*TARGET), options=options)
            record.update(ok=True, shared=compiled.metadata.shared, **_resources(compiled.asm["cubin"]))
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
            record.update(ok=False, error="".join(traceback.format_exception_only(exc))[-2000:])
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
