"""Sites: where in a transformer an activation is read — a module's output, or its input.

A site is one of `SITES` at a layer ``l``:

- ``attn_out``: the attention block's output after its output projection, before the residual
  add, dropout or any norm (BERT: ``attention.output.dense``; Llama: ``self_attn.o_proj``).
- ``attn_z``: the input of that output projection: the heads' outputs concatenated
  ([n_heads * head_dim], head-major), where the ASI paper locates the dimensional collapse.
- ``mlp_in``: the MLP block's input (after the pre-MLP norm in pre-norm models), the source site
  of a transcoder.
- ``mlp_out``: the MLP block's output, likewise before the residual add (and before Gemma 2's
  post-feed-forward norm).
- ``resid``: the output of the whole layer, i.e. the residual stream after layer ``l``.

`resolve_site` maps a site to a `HookPoint` through one table (`_LAYOUTS`, keyed by
``config.model_type``); any other module can be named by its dotted path (`hook_point`), with
the suffix ``:input`` for its input. A `HookPoint` captures (`capture`) or replaces (`replace`)
its activation with a hook attached for as long as a ``with`` block runs.
"""
from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ...checks import require_int
from ...errors import ConfigError

SITES = ("attn_out", "mlp_out", "resid", "attn_z", "mlp_in")
INPUT_SUFFIX = ":input"


class HookPoint(NamedTuple):
    """An activation [batch, seq, width] in a model: ``module``'s output, or its first input when
    ``path`` ends with `INPUT_SUFFIX`. Unpacks as ``(path, module)``."""

    path: str
    module: nn.Module

    @property
    def reads_input(self) -> bool:
        return self.path.endswith(INPUT_SUFFIX)

    @contextlib.contextmanager
    def capture(self, record: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """While active, every forward of the module calls ``record(activation)``."""
        if self.reads_input:
            def pre_hook(_module, args, kwargs):
                record(_first_input(self.path, args, kwargs))
            handle = self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            def hook(_module, _args, output):
                record(output[0] if isinstance(output, (tuple, list)) else output)
            handle = self.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def replace(self, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """While active, the activation is replaced by ``replace(activation)`` in every forward."""
        if self.reads_input:
            def pre_hook(_module, args, kwargs):
                if args:
                    return (replace(args[0]), *args[1:]), kwargs
                key = next(iter(kwargs))
                return args, {**kwargs, key: replace(kwargs[key])}
            handle = self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            def hook(_module, _args, output):
                if isinstance(output, (tuple, list)):
                    return type(output)([replace(output[0]), *output[1:]])
                return replace(output)
            handle = self.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def _first_input(path: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The first positional input of a forward call (or its first keyword input)."""
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise ValueError(f"{path}: the module was called without inputs")


@dataclass(frozen=True)
class _Layout:
    """Where the sites live: ``layers`` is the layer list's path in the base model; the others are
    paths inside one layer (the layer itself is ``resid``). ``attn_z`` reads the input of
    ``attn_out``'s module and ``mlp_in`` the input of ``mlp``."""

    layers: str
    attn_out: str
    mlp_out: str
    mlp: str

    def path(self, site: str) -> str:
        """The path of ``site`` inside one layer ("" for resid)."""
        return {
            "resid": "", "attn_out": self.attn_out, "mlp_out": self.mlp_out,
            "attn_z": self.attn_out + INPUT_SUFFIX, "mlp_in": self.mlp + INPUT_SUFFIX,
        }[site]


_BERT = _Layout(layers="encoder.layer", attn_out="attention.output.dense", mlp_out="output.dense", mlp="intermediate")
_GPT2 = _Layout(layers="h", attn_out="attn.c_proj", mlp_out="mlp", mlp="mlp")
_DECODER = _Layout(layers="layers", attn_out="self_attn.o_proj", mlp_out="mlp", mlp="mlp")

# The one table of supported architectures: config.model_type -> layout.
_LAYOUTS: dict[str, _Layout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "gpt2": _GPT2,
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
}


def supported_architectures() -> list[str]:
    """The ``config.model_type`` names `resolve_site` knows."""
    return sorted(_LAYOUTS)


def num_layers(model: nn.Module) -> int:
    """The number of transformer layers (``config.num_hidden_layers``)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError(f"{type(model).__name__} has no config.num_hidden_layers; cannot tell its number of layers")
    return n


def layer_from_path(path: str) -> int | None:
    """The first integer component of a dotted module path (``model.layers.3.mlp`` -> 3)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def _base_prefix(model: nn.Module) -> str:
    """The dotted path of the base model inside ``model`` ("" for a base model, "model" for LlamaForCausalLM)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def resolve_site(model: nn.Module, site: str, layer: int) -> HookPoint:
    """The `HookPoint` of ``site`` at ``layer`` (see the module docstring); unpacks as ``(path, module)``."""
    if site not in SITES:
        raise ConfigError(f"site must be one of {SITES}, got {site!r}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = _LAYOUTS.get(model_type)
    if layout is None:
        raise ConfigError(
            f"architecture {model_type!r} ({type(model).__name__}) has no site table; supported: "
            f"{supported_architectures()}. Name a module path directly with --hook, "
            "e.g. --hook model.layers.3.self_attn.o_proj"
        )
    n = num_layers(model)
    try:
        require_int(f"layer (this model has {n} layers)", layer, 0, n - 1)
    except ValueError as err:  # out of range for this model: the user's to fix (a TypeError is the caller's bug)
        raise ConfigError(str(err)) from None
    parts = [_base_prefix(model), layout.layers, str(layer), layout.path(site)]
    return hook_point(model, ".".join(p for p in parts if p))


def hook_point(model: nn.Module, path: str) -> HookPoint:
    """The `HookPoint` at dotted ``path`` (the module's output; its input with the ``:input`` suffix)."""
    module_path = path[: -len(INPUT_SUFFIX)] if isinstance(path, str) and path.endswith(INPUT_SUFFIX) else path
    return HookPoint(path, resolve_hook(model, module_path))


def resolve_hook(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; a ConfigError names the path and the valid names near it."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"hook path must be a non-empty dotted module path, got {path!r}")
    module = model
    for depth, part in enumerate(path.split(".")):
        children = dict(module.named_children())
        if part not in children:
            parent = ".".join(path.split(".")[:depth]) or "the model"
            names = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(
                f"hook path {path!r} names no module of {type(model).__name__}: {parent} has no child {part!r} "
                f"(its children: {sorted(children)}){hint}"
            )
        module = children[part]
    return module
