"""Helpers shared by the SAELens and sparsify converters: weight folding and building a TopKSAE."""
from __future__ import annotations

from typing import Any

import torch

from ..model import TopKSAE

NORM_SCALE_KEY = "norm_scale"
"""Metadata key: the SAE sees ``norm_scale * x`` for raw activations ``x`` (activation normalization)."""
TARGET_NORM_SCALE_KEY = "target_norm_scale"
"""Metadata key: a transcoder predicts ``target_norm_scale * y`` for its raw target activations ``y``."""
FLASHSAE_METADATA_KEY = "flashsae_metadata"
"""Key under which our metadata rides along in a peer's config (their loaders ignore it)."""


@torch.no_grad()
def raw_space_weights(sae: TopKSAE) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Float64 copies of W_enc [F, d], b_enc [F], W_dec [F, d_out], b_dec [d_out] (and a skip
    transcoder's W_skip [d_out, d]) acting on raw activations.

    A ``norm_scale`` s in the metadata is folded in: for raw x the SAE computes
    ``relu((s x - b_dec) W_enc^T + b_enc)`` = ``relu((x - b_dec/s) (s W_enc)^T + b_enc)`` and its raw
    reconstruction is ``x_hat / s`` = ``z (W_dec / s) + b_dec / s``. A transcoder's target has its
    own ``target_norm_scale`` t: ``W_dec / t``, ``b_dec / t`` and ``W_skip s / t``. Latent values (and
    so a JumpReLU threshold) are unchanged. Returns the weights and the metadata with the scales
    moved to ``norm_scale_folded`` (and ``target_norm_scale_folded``).
    """
    weights = {name: p.detach().to("cpu", torch.float64).clone() for name, p in sae.named_parameters()}
    metadata = dict(sae.metadata)
    s = _pop_scale(metadata, NORM_SCALE_KEY, "norm_scale_folded")
    t = _pop_scale(metadata, TARGET_NORM_SCALE_KEY, "target_norm_scale_folded") if sae.arch.transcoder else s
    weights["W_enc"] *= s
    weights["W_dec"] /= t
    weights["b_dec"] /= t
    if "W_skip" in weights:
        weights["W_skip"] *= s / t
    return weights, metadata


def _pop_scale(metadata: dict[str, Any], key: str, folded_key: str) -> float:
    """The positive scale ``metadata[key]`` (1 when absent), moved to ``folded_key``; ValueError otherwise."""
    scale = metadata.pop(key, None)
    if scale is None:
        return 1.0
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"metadata[{key!r}] must be a positive number, got {scale!r}")
    metadata[folded_key] = float(scale)
    return float(scale)


@torch.no_grad()
def build_sae(
    W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int,
    *, dtype: torch.dtype, metadata: dict[str, Any], W_skip: torch.Tensor | None = None, **kwargs: Any,
) -> TopKSAE:
    """A `TopKSAE` holding the given weights (W_enc [F, d], b_enc [F], W_dec [F, d_out], b_dec [d_out], and a
    skip transcoder's W_skip [d_out, d]) cast to ``dtype``; ``kwargs`` go to `TopKSAE` (arch, backend, ...)."""
    n_features, d_model = W_enc.shape
    sae = TopKSAE(d_model, n_features, k, dtype=dtype, metadata=metadata, **kwargs)
    given = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if W_skip is not None:
        given["W_skip"] = W_skip
    for name, value in given.items():
        param = getattr(sae, name)
        if param is None or tuple(value.shape) != tuple(param.shape):
            expected = "no such tensor" if param is None else f"shape {tuple(param.shape)}"
            raise ValueError(f"{name} must have {expected}, got {tuple(value.shape)}")
        param.copy_(value.to(param.device, dtype))
    return sae
