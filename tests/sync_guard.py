"""A guard that fails on any op that would make a CUDA stream wait on the host, even on the CPU.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches a synchronization when it happens;
on the CPU nothing synchronizes, so `SyncGuard` names the ops that would: reading a tensor's value
on the host (``.item()``, ``bool()``/``int()``/``float()`` of a tensor, ``.tolist()``, ``.numpy()``,
``.cpu()``), ops whose output size depends on the data (``nonzero``, ``masked_select``, boolean-mask
indexing, ``unique`` / ``unique_consecutive``, ``repeat_interleave`` without ``output_size``) and
ops that return a host value computed from device data (``equal``, ``is_nonzero``, ``allclose``).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Ops that always read device data on the host or size their output by it.
SYNCING_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.item.default,
}
# Tensor methods that hand a tensor's data to the host.
HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}


class SyncError(AssertionError):
    """An op that would synchronize a CUDA stream ran inside a `SyncGuard`."""


class _DispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            raise SyncError(f"{func} synchronizes")
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise SyncError(f"{func} without output_size synchronizes")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_flatten(indices)[0]):
                raise SyncError(f"{func} with a boolean mask synchronizes")
        return func(*args, **kwargs)


class _FunctionGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            raise SyncError(f"Tensor.{name} reads a tensor on the host")
        return func(*args, **(kwargs or {}))


class SyncGuard:
    """``with SyncGuard():`` raises `SyncError` on the first op that would synchronize a CUDA stream.

    On CUDA tensors it also sets ``torch.cuda.set_sync_debug_mode("error")`` for the block.
    """

    def __enter__(self) -> "SyncGuard":
        self._modes = [_FunctionGuard(), _DispatchGuard()]
        for mode in self._modes:
            mode.__enter__()
        if torch.cuda.is_available():
            self._cuda_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(self._cuda_mode)
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
