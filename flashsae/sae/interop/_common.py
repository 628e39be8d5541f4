"""Helpers shared by the SAELens and sparsify converters: weight folding and method patching."""
from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import nn

from ..model import TopKSAE

NORM_SCALE_KEY = "norm_scale"
"""Metadata key: the SAE sees ``norm_scale * x`` for raw activations ``x`` (activation normalization)."""
FLASHSAE_METADATA_KEY = "flashsae_metadata"
"""Key under which our metadata rides along in a peer's config (their loaders ignore it)."""
_PATCHED_ATTR = "_flashsae_patched"


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


def patch_methods(module: nn.Module, methods: dict[str, Callable[..., Any]]) -> None:
    """Bind ``methods`` (functions taking the module first) as instance attributes of ``module``."""
    if getattr(module, _PATCHED_ATTR, None):
        raise ValueError(f"{type(module).__name__} is already patched; call unpatch() first")
    for name, fn in methods.items():
        setattr(module, name, types.MethodType(fn, module))
    setattr(module, _PATCHED_ATTR, tuple(methods))


def unpatch(module: nn.Module) -> nn.Module:
    """Undo `patch_saelens` / `patch_sparsify`: the module's own methods run again."""
    for name in getattr(module, _PATCHED_ATTR, ()) or ():
        module.__dict__.pop(name, None)
    if _PATCHED_ATTR in module.__dict__:
        del module.__dict__[_PATCHED_ATTR]
    for attr in ("_flashsae_last", "_flashsae_need_dense", "_flashsae_options"):
        module.__dict__.pop(attr, None)
    return module
