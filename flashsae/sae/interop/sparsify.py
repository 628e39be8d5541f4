"""sparsify (``eai-sparsify``) format: export and import (`patch_sparsify` lives in ``sparsify_patch``).

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

from ...errors import ConfigError
from ..atomic import atomic_write
from ..architecture import Architecture
from ..model import TopKSAE
from ._common import FLASHSAE_METADATA_KEY, build_sae, raw_space_weights

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
    (ConfigError, a ValueError: export it to SAELens, as jumprelu).
    """
    arch = sae.arch
    if arch.batch_topk:
        raise ConfigError("sparsify has no JumpReLU coder for a BatchTopK SAE: export it with --format saelens")
    if sae.d_out != sae.d_model:
        raise ConfigError(f"sparsify's coders reconstruct their input's width, d={sae.d_model}; this transcoder's "
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
    transcoder `Architecture` (marked ``transcode`` in the metadata too). A ``multi_topk`` coder is
    imported as its top-k map (sparsify's ``encode`` then ``decode``) and marked ``multi_topk`` in
    the metadata, since its ``forward`` returns a different map: the reconstruction from the top 4k
    latents (its Multi-TopK loss term). ``dtype`` defaults to the stored weights'; ``kwargs`` go to
    `TopKSAE`.
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
    if cfg.get("multi_topk", False):
        metadata["multi_topk"] = True
    return build_sae(
        W_enc, b_enc, W_dec, b_dec, int(cfg["k"]), dtype=dtype if dtype is not None else stored_dtype,
        metadata=metadata, W_skip=state["W_skip"].to(torch.float64) if skip else None,
        arch=Architecture(transcoder=transcode, skip_connection=skip), **kwargs,
    )
