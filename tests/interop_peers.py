"""Shared pieces of the interop tests: shapes, random SAEs and inputs, comparisons.

Importing this module sets ``SPARSIFY_DISABLE_TRITON`` (sparsify's Triton decoder needs a GPU and
latent counts divisible by its block size; its own switch selects the eager decoder), so import
it before sparsify.
"""
from __future__ import annotations

import os
import warnings

import torch

from flashsae import TopKSAE

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

D, F, K, B = 13, 41, 5, 24
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_sae(seed: int, *, dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> TopKSAE:
    """A TopKSAE with untied encoder, non-unit decoder rows and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(D, F, K, backend="torch", dtype=dtype, metadata=metadata)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.5).to(dtype))
        sae.b_enc.add_(0.2)
    return sae


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    """Overwrite every parameter of a peer's module with N(0, scale^2) draws; returns it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype))
    return module


def x_batch(seed: int, n: int = B, d: int = D, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def dense(vals: torch.Tensor, idx: torch.Tensor, n_features: int = F) -> torch.Tensor:
    return vals.new_zeros(vals.shape[0], n_features).scatter(-1, idx, vals)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)
