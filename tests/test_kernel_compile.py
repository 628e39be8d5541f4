"""Every Triton kernel compiles for Hopper (sm_90) as a real launch would, without spills.

The interpreter runs kernels as numpy and accepts code the GPU compiler rejects (a non-constexpr
global read inside a kernel, a constexpr reassigned in an unrolled loop); this compiles the real
thing with Triton's own toolchain and its launch-time specialization, no GPU needed. The compiler
needs TRITON_INTERPRET unset, so it runs in a subprocess (tests/sm90_compile.py). CI compiles the
script's ``--subset`` (every kernel and block config, at the headline shape and an odd one, with
k = 1, 5 and 64: the three ways an integer argument specializes); ``python tests/sm90_compile.py
--table benchmarks/results/compile-sm90.md`` compiles the full matrix (every k = 2 .. 512 too) and
writes the committed table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile.py")
TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compile-sm90.md"
KERNELS = {"select", "fused", "fold_pre_bias", "gather_rows", "row_dots", "segment_rows", "sparse_adam"}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--subset"], capture_output=True, text=True, env=env,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_block_config_and_specialization_is_compiled(compiled):
    from flashsae.kernels import chunked_encode, fused_encode

    names = [r["case"] for r in compiled]
    assert {r["kernel"] for r in compiled} == KERNELS
    for dtype in ("bf16", "fp16", "fp32"):
        for bm, bn, bk, warps, stages in fused_encode.block_configs(_torch(dtype)):
            blocks = f"BM={bm} BN={bn} BK={bk} warps={warps} stages={stages}"
            for k in (1, 5, 64):
                assert any(n.startswith(f"fused {dtype} ") and f" k={k} " in n and n.endswith(blocks) for n in names), (dtype, blocks, k)
    select_blocks = f"BM={chunked_encode.BLOCK_M} BN={chunked_encode.BLOCK_N}"
    for k in (1, 5, 64):
        assert any(n.startswith("select B=4096") and f" k={k} " in n and select_blocks in n for n in names)
        assert any(n.startswith("select B=7") and f" k={k} " in n for n in names)
    for shape in ("B=4096", "B=7"):  # AuxK's dead lists: the second select launch of each chunk
        assert any(n.startswith(f"select aux {shape}") and " k=512 " in n for n in names), shape


def _torch(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def test_every_kernel_compiles_for_sm90(compiled):
    failed = [f"{r['case']}: {r['error']}" for r in compiled if not r["ok"]]
    assert not failed, "\n\n".join(failed)


def test_no_kernel_spills_registers_on_sm90(compiled):
    spilled = [f"{r['case']}: {r['regs']} registers, {r['stack']} stack bytes" for r in compiled if r["ok"] and r["stack"]]
    assert not spilled, "\n".join(spilled)


def test_16_bit_gemm_tiles_run_on_hopper_mma(compiled):
    missing = [r["case"] for r in compiled if r["ok"] and r["wgmma_required"] and not r["wgmma"]]
    assert not missing, "no wgmma in:\n" + "\n".join(missing)
    assert any(r["wgmma_required"] for r in compiled)


def test_no_pointer_offset_is_a_32_bit_product(compiled):
    """F * d above 2^31 elements: every offset computed with a multiplication is 64-bit in every kernel.

    (A real W of that size needs 4+ GiB per copy and minutes of interpreter time per call, so the
    addressing is checked on the compiled kernels instead.)"""
    narrow = [f"{r['case']}: {r['i32_product_offsets']}" for r in compiled if r["ok"] and not r["wide_offsets"]]
    assert not narrow, "\n".join(narrow)


def test_the_committed_table_lists_every_block_config():
    from flashsae.kernels import chunked_encode, fused_encode

    text = TABLE.read_text()
    for config in fused_encode.BLOCK_CONFIGS + fused_encode.BLOCK_CONFIGS_FP32:
        assert "BM={} BN={} BK={} warps={} stages={}".format(*config) in text, config
    assert f"BM={chunked_encode.BLOCK_M} BN={chunked_encode.BLOCK_N}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | yes | " in line]
    assert rows and all(line.split(" | ")[3] == "0" for line in rows), "the table shows a spill"
