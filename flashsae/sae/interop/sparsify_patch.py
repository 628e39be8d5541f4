"""`patch_sparsify`: sparsify's own ``SparseCoder`` running `flashsae.ops` for its encode and decode.

sparsify's encode is ``pre_acts = relu((x - b_dec) @ encoder.weight.T + encoder.bias)`` and
``top_acts, top_indices = topk(pre_acts)``; its backward passes the gradient of every selected
latent to the encoder, also of a latent selected with value 0 (a row with fewer than k positive
pre-activations), and its ``Trainer`` counts every selected latent as fired. Which zero-valued
latents ``torch.topk`` picks is its own choice, so a batch with such a row is encoded by
sparsify's own encoder: selection, gradients and firing counts stay sparsify's. This module does
not import ``sparsify`` until a patched encode runs.
"""
from __future__ import annotations

from typing import Any

import torch

from ... import ops
from .patching import patch_methods, patch_state


def patch_sparsify(coder: Any, *, backend: str = "auto", sparse_grad: bool = False) -> Any:
    """Run a sparsify ``SparseCoder`` (``activation="topk"``) on `flashsae.ops`, in place.

    ``encode`` runs `ops.topk_encode` (b_dec subtracted first unless ``transcode``) and ``decode``
    runs `ops.sparse_decode`; sparsify's own ``forward`` (FVU, AuxK, Multi-TopK, skip connection),
    its ``Trainer`` (``k_decay_steps`` included: the coder's ``cfg.k`` is read at every call) and
    optimizers run unchanged, and gradients land in the coder's parameters (``encoder.weight``,
    ``encoder.bias``, ``W_dec``, ``b_dec``).

    What differs: ``EncoderOutput.pre_acts`` (dense [N, num_latents]) is computed, without
    gradient as in sparsify's fused encoder, only when ``forward`` will read it (``multi_topk``, or
    a ``dead_mask`` with dead latents; direct ``encode`` calls always get it); otherwise it is an
    empty [N, 0] tensor. Top-k values come sorted descending (sparsify's are unsorted). A batch in
    which some row has fewer than k positive pre-activations is encoded by sparsify's own encoder
    (see the module docstring), after ours: the check costs one host sync per encode. Ops run in
    the parameters' dtype (inputs are cast to it). Returns ``coder``;
    `flashsae.sae.interop.unpatch` restores it.
    """
    cfg = getattr(coder, "cfg", None)
    if cfg is None or getattr(cfg, "activation", None) != "topk":
        raise ValueError(f"patch_sparsify needs a SparseCoder with activation 'topk', got {getattr(cfg, 'activation', None)!r}")
    if getattr(coder, "W_dec", None) is None:
        raise ValueError("patch_sparsify needs a SparseCoder with a decoder (decoder=True)")
    patch_methods(coder, {"encode": _encode, "decode": _decode, "forward": _forward}, backend=backend, sparse_grad=sparse_grad)
    return coder


def _forward(coder: Any, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> Any:
    scratch = patch_state(coder).scratch
    dead_mask = kwargs.get("dead_mask")
    scratch["pre_acts"] = bool(coder.cfg.multi_topk) or (dead_mask is not None and bool(dead_mask.any()))
    try:
        return type(coder).forward(coder, x, y, **kwargs)
    finally:
        scratch.pop("pre_acts", None)


def _encode(coder: Any, x: torch.Tensor) -> Any:
    from sparsify.fused_encoder import EncoderOutput  # the caller has sparsify installed

    state = patch_state(coder)
    weight, bias = coder.encoder.weight, coder.encoder.bias
    x = x.to(weight.dtype)
    b_pre = None if coder.cfg.transcode else coder.b_dec
    vals, idx = ops.topk_encode(x, weight, bias, coder.cfg.k, b_pre=b_pre, **state.ops_kwargs)
    if vals.numel() and bool((vals[:, -1] <= 0).any()):  # vals are sorted: the row's last is its least
        return type(coder).encode(coder, x)
    if state.scratch.get("pre_acts", True):
        with torch.no_grad():  # sparsify's fused encoder passes no gradient through pre_acts either
            pre_acts = torch.relu(torch.nn.functional.linear(x if b_pre is None else x - b_pre, weight, bias))
    else:
        pre_acts = x.new_empty(x.shape[0], 0)
    return EncoderOutput(vals, idx, pre_acts)


def _decode(coder: Any, top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    return ops.sparse_decode(
        top_acts.to(coder.W_dec.dtype), top_indices, coder.W_dec, coder.b_dec, **patch_state(coder).ops_kwargs
    )
