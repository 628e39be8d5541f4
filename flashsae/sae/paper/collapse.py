"""Where the dimensional collapse is: spectra per layer and site, and per attention head.

One pass over the text accumulates float64 moments (token count, sum, Gram matrix) of every site at every
layer: ``attn_z`` (the heads' outputs before the output projection W_O), ``attn_out`` (after it),
``mlp_out`` and ``resid``. The centred covariance's eigenvalues give each site's spectrum (the singular
values of the centred activations, as `flashsae rank` reports them), and the diagonal blocks of the
``attn_z`` covariance give each head's own spectrum. Heads write to separate coordinates of ``attn_z``;
W_O maps them into one space, so ``attn_out`` ranking below ``attn_z`` is the rank lost at W_O.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ...analysis import effective_rank
from .. import hf

COLLAPSE_SITES = ("attn_z", "attn_out", "mlp_out", "resid")


class _Moments:
    """Running float64 count, sum and Gram matrix of rows [n, d]."""

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64)
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.gram += x.T @ x

    def spectrum(self, rows: slice = slice(None)) -> torch.Tensor:
        """Singular values [d'] (descending) of the centred rows, restricted to coordinates ``rows``."""
        mean = self.total[rows] / self.n
        cov = self.gram[rows, rows] - self.n * torch.outer(mean, mean)
        eig = torch.linalg.eigvalsh(cov).clamp_min(0).flip(0)
        return eig.sqrt()


def _rank_entry(S: torch.Tensor) -> dict[str, Any]:
    return effective_rank(S).as_dict()


def measure_collapse(
    model: nn.Module, tokenizer: Any, texts: Iterable[str], *, n_tokens: int, seq_len: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Effective ranks of every `COLLAPSE_SITES` site at every layer, and of every head of ``attn_z``.

    Returns {"n_tokens", "n_heads", "head_dim", "sites": [{site, layer, d, erank, n90, n95, n99, ...}],
    "heads": [{layer, head, d, erank, n90, ...}]}.
    """
    n_layers = hf.num_layers(model)
    points = {(site, layer): hf.resolve_site(model, site, layer) for layer in range(n_layers) for site in COLLAPSE_SITES}
    moments = {key: _Moments() for key in points}
    named = {f"{site}.{layer}": point for (site, layer), point in points.items()}
    for batch in hf.collect_activations(model, tokenizer, named, texts, seq_len=seq_len, max_tokens=n_tokens,
                                        progress=progress):
        for (site, layer), m in moments.items():
            m.add(batch[f"{site}.{layer}"])
    n_heads = model.config.num_attention_heads
    width = moments[("attn_z", 0)].total.shape[0]
    head_dim = width // n_heads
    sites = [{"site": site, "layer": layer, **_rank_entry(m.spectrum())} for (site, layer), m in moments.items()]
    heads = [
        {"layer": layer, "head": h, **_rank_entry(moments[("attn_z", layer)].spectrum(slice(h * head_dim, (h + 1) * head_dim)))}
        for layer in range(n_layers) for h in range(n_heads)
    ]
    return {"n_tokens": moments[("resid", 0)].n, "n_heads": n_heads, "head_dim": head_dim, "sites": sites,
            "heads": heads}
