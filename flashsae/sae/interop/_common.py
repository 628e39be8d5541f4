"""Helpers shared by the SAELens and sparsify converters: weight folding and building a TopKSAE."""
from __future__ import annotations

from typing import Any

import torch

from ..model import TopKSAE

NORM_SCALE_KEY = "norm_scale"
"""Metadata key: the SAE sees ``norm_scale * x`` for raw activations ``x`` (activation normalization)."""
FLASHSAE_METADATA_KEY = "flashsae_metadata"
"""Key under which our metadata rides along in a peer's config (their loaders ignore it)."""


@torch.no_grad()
def raw_space_weights(sae: TopKSAE) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Float64 copies of W_enc [F, d], b_enc [F], W_dec [F, d], b_dec [d] acting on raw activations.

    A ``norm_scale`` s in the metadata is folded in: for raw x the SAE computes
    ``relu((s x - b_dec) W_enc^T + b_enc)`` = ``relu((x - b_dec/s) (s W_enc)^T + b_enc)`` and its raw
    reconstruction is ``x_hat / s`` = ``z (W_dec / s) + b_dec / s``. Latent values are unchanged.
    Returns the weights and the metadata with the scale moved to ``norm_scale_folded``.
    """
    weights = {name: p.detach().to("cpu", torch.float64).clone() for name, p in sae.named_parameters()}
    metadata = dict(sae.metadata)
    scale = metadata.pop(NORM_SCALE_KEY, None)
    if scale is not None:
        s = float(scale)
        if not s > 0:
            raise ValueError(f"metadata[{NORM_SCALE_KEY!r}] must be a positive number, got {scale!r}")
        weights["W_enc"] *= s
        weights["W_dec"] /= s
        weights["b_dec"] /= s
        metadata["norm_scale_folded"] = s
    return weights, metadata


@torch.no_grad()
def build_sae(
    W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int,
    *, dtype: torch.dtype, metadata: dict[str, Any], **kwargs: Any,
) -> TopKSAE:
    """A `TopKSAE` holding the given weights (W_enc [F, d], b_enc [F], W_dec [F, d], b_dec [d]) cast to ``dtype``."""
    n_features, d_model = W_dec.shape
    sae = TopKSAE(d_model, n_features, k, dtype=dtype, metadata=metadata, **kwargs)
    for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        param = getattr(sae, name)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name} must have shape {tuple(param.shape)}, got {tuple(value.shape)}")
        param.copy_(value.to(param.device, dtype))
    return sae
