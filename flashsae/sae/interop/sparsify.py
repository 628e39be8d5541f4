"""sparsify (``eai-sparsify``) format: export / import, and our ops inside sparsify's SparseCoder.

A sparsify ``SparseCoder`` on disk: ``cfg.json`` (the ``SparseCoderConfig`` fields plus ``d_in``)
+ ``sae.safetensors`` holding ``encoder.weight [num_latents, d_in]``, ``encoder.bias [num_latents]``
(an ``nn.Linear``), ``W_dec [num_latents, d_in]``, ``b_dec [d_in]``; read by
``sparsify.SparseCoder.load_from_disk``. Its forward (``activation="topk"``, no transcoding, no skip
connection) is ``z = topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))``,
``x_hat = z @ W_dec + b_dec``: exactly ours, with the same layouts. A transcoder (``transcode=True``)
encodes x itself, and with ``skip_connection`` adds ``x @ W_skip.T`` (W_skip [d_in, d_in]): exactly a
flashsae TopK (skip) transcoder of one width. This module does not import ``sparsify``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ... import ops
from ...checks import require_choice
from ...kernels.registry import backend_names
from ..atomic import atomic_write
from ..architecture import Architecture
from ..model import TopKSAE
from ._common import FLASHSAE_METADATA_KEY, build_sae, patch_methods, raw_space_weights

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def export_sparsify(sae: TopKSAE, out_dir: str | os.PathLike) -> Path:
    """Write ``sae`` as a sparsify ``SparseCoder`` (``cfg.json`` + ``sae.safetensors``) into ``out_dir``.

    A ``norm_scale`` in the metadata is folded into the weights (sparsify has no normalization
    field), so the exported coder takes raw activations. Our metadata rides along in ``cfg.json``
    under ``flashsae_metadata`` (sparsify's loader drops unknown fields). Weights keep the SAE's dtype.
    A TopK transcoder exports as ``transcode=True`` (its input is not centered by b_dec) with its
    ``W_skip`` when it has one (``skip_connection``); sparsify's coders keep one width, so d_out must
    equal d. A Matryoshka TopK SAE is a TopK coder at inference. BatchTopK has no sparsify form
    (ValueError: export it to SAELens, as jumprelu).
    """
    arch = sae.arch
    if arch.batch_topk:
        raise ValueError("sparsify has no JumpReLU coder for a BatchTopK SAE: export it with --format saelens")
    if sae.d_out != sae.d_model:
        raise ValueError(f"sparsify's coders reconstruct their input's width, d={sae.d_model}; this transcoder's "
                         f"target has d_out={sae.d_out}")
    weights, metadata = raw_space_weights(sae)
    dtype = sae.dtype
    tensors = {
        "encoder.weight": weights["W_enc"].to(dtype).contiguous(),
        "encoder.bias": weights["b_enc"].to(dtype),
        "W_dec": weights["W_dec"].to(dtype).contiguous(),
        "b_dec": weights["b_dec"].to(dtype),
    }
    if "W_skip" in weights:
        tensors["W_skip"] = weights["W_skip"].to(dtype).contiguous()
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.n_features // sae.d_model),
        "normalize_decoder": True,
        "num_latents": sae.n_features,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": arch.skip_connection,
        "transcode": arch.transcoder,
        "d_in": sae.d_model,
        FLASHSAE_METADATA_KEY: metadata,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))
    return out


def import_sparsify(path: str | os.PathLike, *, dtype: torch.dtype | None = None, **kwargs: Any) -> TopKSAE:
    """Read a sparsify ``SparseCoder`` directory into a `TopKSAE` computing the same map.

    Only ``activation="topk"`` can be expressed (else ValueError). A transcoder (``transcode=True``:
    no ``b_dec`` subtracted before encoding; with ``skip_connection``, its ``W_skip``) becomes a
    transcoder `Architecture` (marked ``transcode`` in the metadata too). ``dtype`` defaults to the
    stored weights'; ``kwargs`` go to `TopKSAE`.
    """
    folder = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a sparsify SparseCoder directory: {name} is missing")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"only sparsify activation 'topk' can be imported, got {cfg.get('activation')!r}")
    transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    if skip and not transcode:
        raise ValueError("sparsify autoencoders with skip_connection=True cannot be imported: flashsae gives a skip "
                         "connection to transcoders only")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec", *(("W_skip",) if skip else ())} - set(state)
    if missing:
        raise ValueError(f"{folder / WEIGHTS_FILE} lacks {sorted(missing)} (saved without a decoder?)")
    stored_dtype = state["encoder.weight"].dtype
    W_enc, b_enc, W_dec, b_dec = (state[n].to(torch.float64) for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    metadata = dict(cfg.get(FLASHSAE_METADATA_KEY) or {})
    if transcode:
        metadata["transcode"] = True
    return build_sae(
        W_enc, b_enc, W_dec, b_dec, int(cfg["k"]), dtype=dtype if dtype is not None else stored_dtype,
        metadata=metadata, W_skip=state["W_skip"].to(torch.float64) if skip else None,
        arch=Architecture(transcoder=transcode, skip_connection=skip), **kwargs,
    )


def patch_sparsify(coder: Any, *, backend: str = "auto", sparse_grad: bool = False) -> Any:
    """Run a sparsify ``SparseCoder`` (``activation="topk"``) on `flashsae.ops`, in place.

    ``encode`` runs `ops.topk_encode` (b_dec subtracted first unless ``transcode``) and ``decode``
    runs `ops.sparse_decode`; sparsify's own ``forward`` (FVU, AuxK, Multi-TopK, skip connection),
    its ``Trainer`` and optimizers run unchanged and gradients land in the coder's parameters
    (``encoder.weight``, ``encoder.bias``, ``W_dec``, ``b_dec``).

    What differs: ``EncoderOutput.pre_acts`` (dense [N, num_latents]) is computed, without
    gradient as in sparsify's fused encoder, only when ``forward`` will read it (``multi_topk``, or
    a ``dead_mask`` with dead latents; direct ``encode`` calls always get it); otherwise it is an
    empty [N, 0] tensor. Top-k values come sorted descending (sparsify's are unsorted). Ops run in
    the parameters' dtype (inputs are cast to it; autocast does not change them).
    Returns ``coder``; `flashsae.sae.interop.unpatch` restores it.
    """
    cfg = getattr(coder, "cfg", None)
    if cfg is None or getattr(cfg, "activation", None) != "topk":
        raise ValueError(f"patch_sparsify needs a SparseCoder with activation 'topk', got {getattr(cfg, 'activation', None)!r}")
    if getattr(coder, "W_dec", None) is None:
        raise ValueError("patch_sparsify needs a SparseCoder with a decoder (decoder=True)")
    require_choice("backend", backend, backend_names())
    coder._flashsae_options = {"backend": backend, "sparse_grad": sparse_grad}
    patch_methods(coder, {"encode": _encode, "decode": _decode, "forward": _forward})
    return coder


def _forward(coder: Any, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> Any:
    dead_mask = kwargs.get("dead_mask")
    coder._flashsae_need_dense = bool(coder.cfg.multi_topk) or (dead_mask is not None and bool(dead_mask.any()))
    try:
        return type(coder).forward(coder, x, y, **kwargs)
    finally:
        coder._flashsae_need_dense = None


def _encode(coder: Any, x: torch.Tensor) -> Any:
    from sparsify.fused_encoder import EncoderOutput  # the caller has sparsify installed

    opts = coder._flashsae_options
    weight, bias = coder.encoder.weight, coder.encoder.bias
    x = x.to(weight.dtype)
    b_pre = None if coder.cfg.transcode else coder.b_dec
    vals, idx = ops.topk_encode(
        x, weight, bias, coder.cfg.k, b_pre=b_pre, backend=opts["backend"], sparse_grad=opts["sparse_grad"]
    )
    need = coder.__dict__.get("_flashsae_need_dense")
    if need is None or need:
        with torch.no_grad():  # sparsify's fused encoder passes no gradient through pre_acts either
            pre_acts = torch.relu(torch.nn.functional.linear(x if b_pre is None else x - b_pre, weight, bias))
    else:
        pre_acts = x.new_empty(x.shape[0], 0)
    return EncoderOutput(vals, idx, pre_acts)


def _decode(coder: Any, top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    opts = coder._flashsae_options
    return ops.sparse_decode(
        top_acts.to(coder.W_dec.dtype), top_indices, coder.W_dec, coder.b_dec,
        backend=opts["backend"], sparse_grad=opts["sparse_grad"],
    )
