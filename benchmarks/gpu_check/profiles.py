"""What each phase runs, at two sizes: ``GPU`` (the acceptance run) and ``DRY_RUN`` (tiny, on the CPU).

The dry run takes the same code paths with shapes small enough for the Triton interpreter, so the
check itself is tested on every commit; its numbers mean nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..shapes import GPU_HEADLINE, Shape

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Profile:
    """Sizes for one kind of run. Shapes are (B, d, F) or (B, d, F, k): tokens, width, features, k."""

    name: str
    device: str
    # Phase 1: correctness.
    ks: tuple[int, ...]
    cross: bool  # every (dtype, k) pair; else dtypes and ks are paired off in turn
    encoder_shapes: tuple[tuple[int, int, int], ...]  # odd shapes, taken in turn
    grad_shapes: tuple[tuple[int, int, int], ...]
    large: tuple[int, int, int, int]  # F * d above 2^31 on the GPU
    # Phase 2: performance.
    perf_shapes: tuple[Shape, ...]
    warmup: int
    rounds: int
    copy_bytes: int  # the bandwidth ceiling's copy
    matmul_n: int  # the matmul ceiling's n x n x n product
    largest_f: tuple[int, int, int, int, int]  # B, d, k, first F tried, most tries per system
    # Phase 3: science (MiniLM).
    rank_tokens: int
    rank_args: tuple[str, ...]  # more `flashsae rank` options (layers, sites)
    train_tokens: int
    train_features: int
    train_k: int
    train_batch: int
    train_epochs: int

    def dtype_k_pairs(self) -> list[tuple[torch.dtype, int]]:
        """The (dtype, k) combinations phase 1 covers: all of them, or each dtype and k at least once."""
        if self.cross:
            return [(dtype, k) for k in self.ks for dtype in DTYPES]
        n = max(len(DTYPES), len(self.ks))
        return [(DTYPES[i % len(DTYPES)], self.ks[i % len(self.ks)]) for i in range(n)]


GPU = Profile(
    name="gpu",
    device="cuda",
    ks=(1, 32, 64, 128, 512),
    cross=True,
    encoder_shapes=((129, 200, 65539), (37, 777, 9001), (1001, 96, 30011)),
    grad_shapes=((257, 130, 5003), (65, 1030, 2053)),
    large=(129, 2056, (1 << 20) + 7, 64),  # 2,155,886,648 elements per weight matrix
    perf_shapes=tuple(GPU_HEADLINE),
    warmup=2,
    rounds=10,
    copy_bytes=2 << 30,
    matmul_n=8192,
    largest_f=(4096, 4096, 64, 1 << 21, 4),
    rank_tokens=8192,
    rank_args=(),
    train_tokens=20_000,
    train_features=3072,
    train_k=16,
    train_batch=128,
    train_epochs=2,
)

DRY_RUN = Profile(
    name="dry-run",
    device="cpu",
    ks=(1, 32),
    cross=False,
    encoder_shapes=((9, 24, 601), (5, 40, 1000)),
    grad_shapes=((7, 24, 300),),
    large=(5, 24, 1100, 5),
    perf_shapes=(Shape(32, 32, 1024, 8, "float32"),),
    warmup=0,
    rounds=2,
    copy_bytes=8 << 20,
    matmul_n=256,
    largest_f=(16, 16, 4, 1 << 9, 2),
    rank_tokens=512,
    rank_args=("--layers", "3", "--sites", "attn_out"),
    train_tokens=2048,
    train_features=512,
    train_k=8,
    train_batch=256,
    train_epochs=1,
)
