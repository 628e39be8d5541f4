"""Synthetic activations for the training tests: no transformer needed."""
from __future__ import annotations

from pathlib import Path

import torch

from flashsae.sae.store import ActivationStoreWriter


def synthetic_activations(
    n: int, d: int, rank: int, seed: int, offset: float = 2.0, density: float = 0.25
) -> torch.Tensor:
    """Sparse non-negative combinations of ``rank`` random directions (each used with probability
    ``density``) plus an offset and a little noise: [n, d] fp32."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=gen)
    codes = torch.randn(n, rank, generator=gen).abs() * (torch.rand(n, rank, generator=gen) < density)
    return codes @ basis + offset + 0.01 * torch.randn(n, d, generator=gen)


def write_store(directory: Path, x: torch.Tensor, *, layer: int, shard_tokens: int) -> Path:
    """An activation store of ``x`` [n, d] labelled as a synthetic model's attn_out at ``layer``."""
    with ActivationStoreWriter(directory, {"model": "synthetic", "site": "attn_out", "layer": layer},
                               shard_tokens=shard_tokens) as writer:
        writer.add(x)
    return directory
