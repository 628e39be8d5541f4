"""Active Subspace Initialization (ASI): start every feature inside the subspace the activations use.

Attention outputs occupy a low-dimensional subspace of the model dimension; decoder rows drawn
uniformly on the sphere point mostly outside it, never fire, and die. ASI projects the random
decoder onto the top right singular vectors V of the activations, ``W_dec <- W_dec V V^T``,
renormalizes the rows, and ties the encoder to it (``W_enc = W_dec``, i.e. the encoder map is
``W_dec^T``).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..checks import require_count_or_fraction, require_int
from ..linalg import randomized_svd
from .model import TopKSAE


def resolve_d_init(d_init: float, d_model: int) -> int:
    """Subspace dimension from a count (``>= 1``) or a fraction of ``d_model`` (``0 < d_init < 1``)."""
    require_count_or_fraction("d_init", d_init)
    if d_init < 1:
        return max(1, round(d_init * d_model))
    return require_int(f"d_init (at most d_model={d_model})", int(d_init), 1, d_model)


def active_subspace(
    activations: torch.Tensor | Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
    d_init: int,
    *,
    center: bool = True,
    seed: int = 0,
    **svd_kwargs,
) -> torch.Tensor:
    """Top ``d_init`` right singular vectors V [d, d_init] fp32 of the activations [n, d].

    ``activations`` is a tensor or a re-iterable stream of row chunks (see
    `flashsae.linalg.randomized_svd`). ``center=True`` (the default) removes the mean over tokens
    first, so the subspace describes the variation of the activations, not their offset (the
    offset is what ``b_dec`` learns).
    """
    result = randomized_svd(activations, d_init, center=center, seed=seed, **svd_kwargs)
    return result.V


@torch.no_grad()
def init_active_subspace(sae: TopKSAE, V_active: torch.Tensor) -> TopKSAE:
    """Project the decoder onto span(V_active) [d, r], renormalize rows, tie the encoder; in place.

    Rows whose projection vanishes (possible only when F is tiny) are redrawn inside the subspace.
    """
    d = sae.d_model
    if V_active.dim() != 2 or V_active.shape[0] != d or not 1 <= V_active.shape[1] <= d:
        raise ValueError(f"V_active must have shape [d_model={d}, r] with 1 <= r <= {d}, got {tuple(V_active.shape)}")
    V = V_active.to(device=sae.W_dec.device, dtype=torch.float32)
    W = sae.W_dec.float()
    W = (W @ V) @ V.T
    norms = W.norm(dim=1)
    empty = norms < 1e-6
    if empty.any():
        W[empty] = torch.randn(int(empty.sum()), V.shape[1], device=V.device) @ V.T
    sae.set_decoder_(W)
    return sae
