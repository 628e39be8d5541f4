"""An allocation log for tests: every tensor an op creates, and the peak of those alive at once."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationLog(TorchDispatchMode):
    """Records the storages that ops produce inside the ``with`` block.

    ``largest_numel``: the most elements of any tensor produced. ``peak_bytes``: the most bytes of
    produced storages alive at once (a view shares its base's storage and is counted once).
    Tensors that existed before the block are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest_numel = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self._holders: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._known_before: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs, _ = tree_flatten((args, kwargs or {}))
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self._holders:
                    self._known_before.add(ptr)
        out = func(*args, **(kwargs or {}))
        outputs, _ = tree_flatten(out)
        for t in outputs:
            if isinstance(t, torch.Tensor):
                self._record(t)
        return out

    def _record(self, t: torch.Tensor) -> None:
        self.largest_numel = max(self.largest_numel, t.numel())
        if t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._known_before or ptr == 0:
            return
        if ptr not in self._holders:
            self._holders[ptr] = 0
            self._sizes[ptr] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._holders[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        self._holders[ptr] -= 1
        if self._holders[ptr] == 0:
            del self._holders[ptr]
            self.live_bytes -= self._sizes.pop(ptr)
