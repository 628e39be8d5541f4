"""Data parallel: every rank holds the whole SAE and reads its own slice of each global batch.

After backward the gradients are summed over the ranks (`allreduce_gradients`); a `RowGrad`
travels as its compact float32 (rows, values), never as a dense [F, d] tensor, and with sizes
fixed by the batch, so the reduction never waits on the host. The loss is normalized by the
global batch, so the summed gradient is the single-process gradient of the global batch's mean.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ...rowgrad import RowGrad, RowPart
from .process_group import all_gather_cat, all_gather_list, get_world_size
from .strategy import SingleProcess


def allreduce_row_grad(grad: RowGrad, *, average: bool = True) -> RowGrad:
    """Sum (or average) a `RowGrad` over ranks; every rank gets the same result, bit for bit.

    Each rank's coalesced (rows [R], values [R, ...], valid [R]) is all-gathered (R is the same on
    every rank: it is fixed by the local batch) and the ranks' parts are merged rank by rank in rank
    order (`RowGrad.coalesce`), so every rank adds in the same order. Nothing of size F x d is formed.
    """
    rows, values, valid = grad.rows_values_valid()
    parts = [all_gather_list(t) for t in (rows, values, valid)]
    total = RowGrad(grad, [RowPart(*part) for part in zip(*parts)]).coalesce()
    if average:
        total = total.map_values(lambda _rows, v: v / dist.get_world_size())
    return total


@torch.no_grad()
def allreduce_gradients(model: nn.Module, *, average: bool = True) -> None:
    """Sum (``average=False``) or average every parameter's gradient over the ranks, in place.

    Dense gradients go through one all_reduce per dtype (flattened); `RowGrad`s through
    `allreduce_row_grad`. Every rank must give each parameter a gradient of the same kind, or none
    (a parameter without a gradient is skipped; the training step gives every parameter one). No
    host sync. No-op outside a process group of more than one rank.
    """
    if get_world_size() == 1:
        return
    world = dist.get_world_size()
    dense: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad or p.grad is None:
            continue
        if isinstance(p.grad, RowGrad):
            p.grad = allreduce_row_grad(p.grad, average=average)
        elif p.grad.is_sparse:
            raise TypeError("allreduce_gradients reduces dense gradients and RowGrads, not sparse COO tensors")
        else:
            dense.setdefault(p.grad.dtype, []).append(p)
    for group in dense.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        if average:
            flat /= world
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


class DataParallel(SingleProcess):
    """Each rank: the whole SAE, its slice of every global batch; gradients and statistics summed over ranks."""

    name = "data"

    def data_shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def gather_codes(self, vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return all_gather_cat(vals), all_gather_cat(idx)

    def reduce_gradients(self, model: nn.Module) -> None:
        allreduce_gradients(model, average=False)

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t
