"""SAELens (``sae-lens``) TopK format: export and import (`patch_saelens` lives in ``saelens_patch``).

SAELens ``topk`` SAE on disk: ``cfg.json`` + ``sae_weights.safetensors`` holding
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, read by
``sae_lens.SAE.load_from_disk``. Its forward:
``z = relu(topk((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc) [* ||W_dec rows||])``,
``x_hat = z [/ ||W_dec rows||] @ W_dec + b_dec`` (the bracketed factors when
``rescale_acts_by_decoder_norm``). Ours is the same map with ``W_enc`` stored transposed,
``apply_b_dec_to_input=True`` and ``rescale_acts_by_decoder_norm=False``; other settings are folded
into the weights on import. This module does not import ``sae_lens``.

The variants export as the SAELens inference architectures that compute their maps (`saelens_architecture`):
a BatchTopK SAE (Matryoshka or not) as ``jumprelu`` (SAELens saves its own BatchTopK and Matryoshka
BatchTopK SAEs so: ``z = relu(pre) * (pre > threshold)``, here with every feature's threshold the
model's one), a Matryoshka TopK SAE as ``topk``, and a BatchTopK transcoder as ``jumprelu_transcoder``
or ``jumprelu_skip_transcoder`` (W_dec [d_sae, d_out], W_skip [d_out, d_in], no b_dec on the input).
SAELens has no TopK transcoder; sparsify has (`flashsae.sae.interop.sparsify`).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ...checks import dtype_name, parse_dtype
from ...errors import ConfigError, InputError
from ..atomic import atomic_write
from ..model import TopKSAE
from ._common import FLASHSAE_METADATA_KEY, build_sae, raw_space_weights

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
TESTED_SAELENS_VERSION = "6.54.12"
"""The sae-lens release the tests load our exports with (pyproject's ``interop`` extra pins it); the
``metadata.sae_lens_version`` written when sae-lens is not installed (SAELens reads configs that
name a version before 6.0 as its legacy format)."""
# normalize_activations values for which SAELens' SAE forward is the identity on its input (the
# scaling, if any, happens outside the SAE), so the weights alone define the map.
_INPUT_PASSTHROUGH_NORMS = ("none", "expected_average_only_in", "covariance_whitening")
# Our metadata keys that SAELens' SAEMetadata knows by the same name.
_SHARED_METADATA = ("model_name", "hook_name", "hook_head_index", "dataset_path", "context_size")
# SAELens' metadata fields and the keys of a trained SAE's metadata (`flashsae train`) that fill them.
_FROM_TRAINING = {"model_name": "model", "hook_name": "hook", "context_size": "seq_len", "dataset_path": "text"}


def saelens_version() -> str:
    """The installed sae-lens version, else `TESTED_SAELENS_VERSION`: what an export's cfg names."""
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return TESTED_SAELENS_VERSION


def saelens_architecture(sae: TopKSAE) -> str:
    """The SAELens inference architecture computing ``sae``'s map (see the module docstring); ConfigError
    (a ValueError) for a TopK transcoder, which SAELens cannot express."""
    arch = sae.arch
    if arch.transcoder:
        if not arch.batch_topk:
            raise ConfigError("SAELens has no TopK transcoder: export a TopK transcoder with --format sparsify, or "
                             "train a BatchTopK one (--activation batchtopk), which exports as jumprelu_transcoder")
        return "jumprelu_skip_transcoder" if arch.skip_connection else "jumprelu_transcoder"
    return "jumprelu" if arch.batch_topk else "topk"


def export_saelens(sae: TopKSAE, out_dir: str | os.PathLike) -> Path:
    """Write ``sae`` as a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``) into ``out_dir``, in the
    architecture `saelens_architecture` names.

    A ``norm_scale`` in the metadata is folded into the weights (SAELens' own
    ``fold_activation_norm_scaling_factor``; a transcoder's target scale likewise), so the exported
    SAE takes raw activations and ``normalize_activations`` is ``"none"``. Weights keep the SAE's
    dtype. SAELens' ``model_name``, ``hook_name``, ``context_size`` and ``dataset_path`` come from a
    trained SAE's model, hook, seq_len and text (a transcoder's target hook rides along as
    ``hook_name_out``); ``sae_lens_version`` is `saelens_version`. A BatchTopK SAE needs its threshold
    (ValueError before any training batch has set it).
    """
    architecture = saelens_architecture(sae)
    weights, metadata = raw_space_weights(sae)
    dtype = sae.dtype
    tensors = {
        "W_enc": weights["W_enc"].T.contiguous().to(dtype),
        "b_enc": weights["b_enc"].to(dtype),
        "W_dec": weights["W_dec"].to(dtype),
        "b_dec": weights["b_dec"].to(dtype),
    }
    if "W_skip" in weights:
        tensors["W_skip"] = weights["W_skip"].to(dtype)
    if sae.arch.batch_topk:
        if not sae.threshold >= 0:
            raise InputError("this BatchTopK SAE has no JumpReLU threshold yet: train it before exporting")
        tensors["threshold"] = torch.full((sae.n_features,), float(sae.threshold), dtype=dtype)
    their_metadata: dict[str, Any] = {"sae_lens_version": saelens_version(), FLASHSAE_METADATA_KEY: metadata}
    their_metadata.update({theirs: metadata[ours] for theirs, ours in _FROM_TRAINING.items()
                           if metadata.get(ours) is not None})
    their_metadata.update({key: metadata[key] for key in _SHARED_METADATA if key in metadata})
    if sae.arch.batch_topk:
        their_metadata["training_architecture"] = "matryoshka_batchtopk" if sae.arch.matryoshka_widths else "batchtopk"
    if metadata.get("target_hook") is not None:
        their_metadata["hook_name_out"] = metadata["target_hook"]
    cfg = {
        "architecture": architecture,
        "d_in": sae.d_model,
        "d_sae": sae.n_features,
        "dtype": dtype_name(dtype),
        "device": "cpu",
        "apply_b_dec_to_input": not sae.arch.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": their_metadata,
    }
    if architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    if sae.arch.transcoder:
        cfg["d_out"] = sae.d_out
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))
    return out


def import_saelens(path: str | os.PathLike, *, dtype: torch.dtype | None = None, **kwargs: Any) -> TopKSAE:
    """Read a SAELens ``topk`` SAE directory into a `TopKSAE` computing the same map.

    ``rescale_acts_by_decoder_norm`` is folded (W_enc and b_enc scaled by the decoder row norms,
    W_dec rows divided by them: SAELens' ``fold_W_dec_norm``); ``apply_b_dec_to_input=False`` is
    folded into the encoder bias (``b_enc' = b_enc + W_enc @ b_dec``). Input normalizations that
    happen inside SAELens' forward (``layer_norm``, ``constant_norm_rescale``) cannot be expressed
    and raise ValueError; ``normalize_activations`` and ``reshape_activations`` are kept in the
    metadata. ``dtype`` defaults to the config's; ``kwargs`` go to `TopKSAE` (backend, sparse_grad).
    """
    folder = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a SAELens SAE directory: {name} is missing")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    architecture = cfg.get("architecture")
    if architecture != "topk":
        raise ValueError(f"only SAELens architecture 'topk' can be imported, got {architecture!r}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in _INPUT_PASSTHROUGH_NORMS:
        raise ValueError(
            f"normalize_activations={norm!r} normalizes each input inside the SAE, which TopKSAE cannot "
            f"express; supported: {_INPUT_PASSTHROUGH_NORMS}"
        )
    state = {name: t.to(torch.float64) for name, t in load_file(str(folder / WEIGHTS_FILE)).items()}
    extra = sorted(set(state) - {"W_enc", "b_enc", "W_dec", "b_dec"})
    if extra:
        raise ValueError(f"unexpected tensors in {folder / WEIGHTS_FILE}: {extra}")
    W_enc, b_enc, W_dec, b_dec = state["W_enc"].T, state["b_enc"], state["W_dec"], state["b_dec"]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms.clamp_min(1e-8)[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + W_enc @ b_dec
    their_metadata = dict(cfg.get("metadata") or {})
    ours = their_metadata.pop(FLASHSAE_METADATA_KEY, None)
    metadata = dict(ours or {})
    if ours is None:  # a SAELens SAE of theirs; our own exports carry our metadata whole
        metadata.update({key: their_metadata[key] for key in _SHARED_METADATA if their_metadata.get(key) is not None})
    if norm != "none":
        metadata["normalize_activations"] = norm
    if cfg.get("reshape_activations", "none") != "none":
        metadata["reshape_activations"] = cfg["reshape_activations"]
    dtype = dtype if dtype is not None else parse_dtype(cfg.get("dtype", "float32").removeprefix("torch."))
    return build_sae(W_enc, b_enc, W_dec, b_dec, int(cfg["k"]), dtype=dtype, metadata=metadata, **kwargs)
