"""Shared machinery of `patch_saelens` / `patch_sparsify`: binding methods, per-module state, hook checks."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ...checks import require_choice
from ...kernels.registry import backend_names

_STATE_ATTR = "_flashsae_patch"


class PatchState:
    """What a patched module carries: the ops' options, the patched method names and per-call scratch.

    ``scratch`` holds tensors passed from one patched call to the next (SAELens' encode -> decode)
    and flags a wrapper sets for the methods it calls. Copies of the module (``copy.deepcopy``,
    pickling) start with empty scratch: it refers to tensors of one forward pass only.
    """

    def __init__(self, backend: str, sparse_grad: bool, methods: tuple[str, ...], **options: Any) -> None:
        self.backend, self.sparse_grad, self.methods = backend, sparse_grad, methods
        self.options = options
        self.scratch: dict[str, Any] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> "PatchState":
        return PatchState(self.backend, self.sparse_grad, self.methods, **self.options)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "scratch": {}}

    @property
    def ops_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `flashsae.ops.topk_encode` / `sparse_decode`."""
        return {"backend": self.backend, "sparse_grad": self.sparse_grad}


class PatchedMethod:
    """``fn`` bound to ``module`` as an instance attribute, like a bound method (``__self__``,
    ``__func__``), but copied and pickled as (module, fn): a copy of the module gets its own."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        self.__self__, self.__func__ = module, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return PatchedMethod, (self.__self__, self.__func__)

    def __repr__(self) -> str:
        return f"<flashsae patched method {self.__func__.__name__} of {type(self.__self__).__name__}>"


def patch_state(module: nn.Module) -> PatchState:
    """The `PatchState` of a module patched by `patch_methods`."""
    return module.__dict__[_STATE_ATTR]


def patch_methods(
    module: nn.Module,
    methods: dict[str, Callable[..., Any]],
    *,
    backend: str,
    sparse_grad: bool,
    **options: Any,
) -> None:
    """Bind ``methods`` (functions taking the module first) as instance attributes of ``module``.

    ``backend`` and ``sparse_grad`` are checked and kept, with ``options``, in the module's
    `PatchState`; ValueError if the module is already patched or the backend is unknown.
    """
    if _STATE_ATTR in module.__dict__:
        raise ValueError(f"{type(module).__name__} is already patched; call unpatch() first")
    require_choice("backend", backend, backend_names())
    for name, fn in methods.items():
        setattr(module, name, PatchedMethod(module, fn))
    module.__dict__[_STATE_ATTR] = PatchState(backend, bool(sparse_grad), tuple(methods), **options)


def unpatch(module: nn.Module) -> nn.Module:
    """Undo `patch_saelens` / `patch_sparsify`: the module's own methods run again."""
    state = module.__dict__.pop(_STATE_ATTR, None)
    for name in state.methods if state is not None else ():
        module.__dict__.pop(name, None)
    return module


def has_hooks(hook_point: nn.Module, *, backward_only: bool = False) -> bool:
    """Whether calling ``hook_point`` runs any hook: its own (TransformerLens' ``add_hook`` registers
    these) or torch's global module hooks. ``backward_only``: only hooks that run in backward."""
    backward = (hook_point._backward_hooks, hook_point._backward_pre_hooks,
                torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks)
    forward = (hook_point._forward_hooks, hook_point._forward_pre_hooks,
               torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks)
    return any(bool(hooks) for hooks in (backward if backward_only else backward + forward))


def unchanged_since(tensor: torch.Tensor, version: int | None) -> bool:
    """Whether ``tensor`` was not modified in place since its version counter read ``version``.

    Inference-mode tensors have no version counter (``version`` None): False, they cannot be vouched for.
    """
    return version is not None and not tensor.is_inference() and tensor._version == version


def version_of(tensor: torch.Tensor) -> int | None:
    """``tensor``'s in-place version counter, None for inference-mode tensors (they have none)."""
    return None if tensor.is_inference() else tensor._version
