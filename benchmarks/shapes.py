"""The shapes the suite times: one source of truth for the CPU set, the GPU headline set and the GPU grid."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    """B tokens of width d, F features, k active per token, all tensors in ``dtype``."""

    B: int
    d: int
    F: int
    k: int
    dtype: str

    @property
    def id(self) -> str:
        return f"B{self.B}-d{self.d}-F{self.F}-k{self.k}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict:
        return {"id": self.id, **asdict(self)}


# CPU: small enough that the whole suite takes a few minutes on 2 cores; three F at one (d, k)
# for the step-time-vs-F plot, and a narrower d with a smaller k.
CPU_SHAPES = [
    *(Shape(256, 128, F, 32, "float32") for F in (1 << 12, 1 << 13, 1 << 14)),
    *(Shape(256, 64, F, 16, "float32") for F in (1 << 12, 1 << 14)),
]

GPU_B = 4096
# The headline set: the two million-feature shapes and the same (d, k) at F = 2^16.
GPU_HEADLINE = [
    Shape(GPU_B, 4096, 1 << 20, 64, "bfloat16"),
    Shape(GPU_B, 768, 1 << 20, 32, "bfloat16"),
    Shape(GPU_B, 4096, 1 << 16, 64, "bfloat16"),
    Shape(GPU_B, 768, 1 << 16, 32, "bfloat16"),
]
# The full grid (--bench-grid full); F goes past 2^20 until every system runs out of memory.
GPU_GRID = [
    Shape(GPU_B, d, F, k, "bfloat16")
    for d, F, k in itertools.product((768, 2048, 4096), (1 << 16, 1 << 18, 1 << 20, 1 << 21, 1 << 22), (32, 64, 128))
]


def shapes_for(device: str, grid: str) -> list[Shape]:
    """The shapes for ``device`` ("cpu" | "cuda") and ``grid`` ("headline" | "full")."""
    if device == "cpu":
        return CPU_SHAPES
    return GPU_GRID if grid == "full" else GPU_HEADLINE
