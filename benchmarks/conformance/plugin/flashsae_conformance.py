"""pytest plugin for the conformance run (``-p flashsae_conformance``), configured by environment:

- ``FLASHSAE_CONFORMANCE_PATCH=1``: every SAELens TopK SAE (``TopKSAE``, ``TopKTrainingSAE``) and
  sparsify ``SparseCoder`` (``activation="topk"``, with a decoder) is patched with
  `flashsae.sae.interop.patch_saelens` / `patch_sparsify` as its constructor returns.
- ``FLASHSAE_CONFORMANCE_CPU=1`` (both runs, for machines without CUDA): tensors and modules the
  tests place on ``"cuda"`` land on the CPU, and ``torch.cuda.synchronize`` does nothing.
- ``FLASHSAE_CONFORMANCE_STATS=PATH``: at the end, JSON with the modules patched and the calls of
  ``flashsae.ops`` made, so a run can show that the patch was exercised.
"""
from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

STATS: Counter = Counter()


class CudaOnCpu(TorchFunctionMode):
    """Rewrites ``device="cuda..."`` arguments and ``Tensor.to("cuda")`` / ``.cuda()`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_on_cpu(a) for a in args)
        return func(*args, **kwargs)


def _on_cpu(device: Any) -> Any:
    if isinstance(device, (str, torch.device)) and str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


def _patch_after_init(cls: type, patch) -> None:
    """Make ``cls.__init__`` end with ``patch(self)`` (once per object, for eligible objects)."""
    init = cls.__init__

    @functools.wraps(init)
    def patched_init(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if "_flashsae_patch" not in self.__dict__ and patch(self):
            STATS[f"patched {type(self).__name__}"] += 1

    cls.__init__ = patched_init


def _patch_saelens_on_construction() -> None:
    from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE

    from flashsae.sae.interop import patch_saelens

    def patch(sae: Any) -> bool:
        if sae.cfg.architecture() != "topk":
            return False
        patch_saelens(sae)
        return True

    for cls in (TopKSAE, TopKTrainingSAE):
        _patch_after_init(cls, patch)


def _patch_sparsify_on_construction() -> None:
    from sparsify import SparseCoder

    from flashsae.sae.interop import patch_sparsify

    def patch(coder: Any) -> bool:
        if coder.cfg.activation != "topk" or coder.W_dec is None:
            return False
        patch_sparsify(coder)
        return True

    _patch_after_init(SparseCoder, patch)


def _count_ops_calls() -> None:
    from flashsae import ops

    for name in ("topk_encode", "sparse_decode"):
        real = getattr(ops, name)

        def counted(*args: Any, _real=real, _name=name, **kwargs: Any) -> Any:
            STATS[f"ops.{_name} calls"] += 1
            return _real(*args, **kwargs)

        setattr(ops, name, counted)


def pytest_configure(config) -> None:
    if os.environ.get("FLASHSAE_CONFORMANCE_CPU") == "1":
        CudaOnCpu().__enter__()
        torch.cuda.synchronize = lambda *args, **kwargs: None
    if os.environ.get("FLASHSAE_CONFORMANCE_PATCH") == "1":
        _count_ops_calls()
        for install in (_patch_saelens_on_construction, _patch_sparsify_on_construction):
            try:
                install()
            except ImportError:
                pass


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("FLASHSAE_CONFORMANCE_STATS")
    if path:
        Path(path).write_text(json.dumps(dict(STATS), indent=2, sort_keys=True))
