"""Data parallel: every rank holds the whole SAE and reads its own slice of each global batch.

After backward the gradients are summed over the ranks (`allreduce_gradients`); sparse COO
gradients travel as their compact (rows, values), never as a dense [F, d] tensor. The loss is
normalized by the global batch, so the summed gradient is the single-process gradient of the
global batch's mean.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .process_group import all_gather_cat, all_gather_padded, get_world_size
from .strategy import SingleProcess


def allreduce_sparse_grad(grad: torch.Tensor, *, average: bool = True) -> torch.Tensor:
    """Sum (or average) a sparse COO gradient over ranks; every rank gets the same coalesced result.

    grad: sparse COO [F, ...] with sparse_dim 1 (rows [U_r], values [U_r, ...] on rank r). The
    result holds the union of the ranks' rows. Summation runs rank by rank in rank order (each
    rank's rows are unique, so no index collides within one step), which makes the result
    bit-identical on every rank. Nothing of size F x d is ever formed.
    """
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [int(c) for c in all_gather_cat(count).tolist()]
    all_rows = all_gather_padded(rows, counts)
    all_values = all_gather_padded(values, counts)
    union = torch.unique(torch.cat(all_rows), sorted=True)
    total = values.new_zeros((union.shape[0], *values.shape[1:]), dtype=torch.float32)
    for r_rows, r_values in zip(all_rows, all_values):
        total.index_add_(0, torch.searchsorted(union, r_rows), r_values.to(torch.float32))
    if average:
        total /= world
    return torch.sparse_coo_tensor(
        union.unsqueeze(0), total.to(values.dtype), grad.shape, is_coalesced=True, check_invariants=False
    )


@torch.no_grad()
def allreduce_gradients(model: nn.Module, *, average: bool = True) -> None:
    """Sum (``average=False``) or average every parameter's gradient over the ranks, in place.

    Dense gradients go through one all_reduce per dtype (flattened); sparse COO gradients through
    `allreduce_sparse_grad`. A parameter whose gradient is None on some ranks counts as zero
    there (all ranks first agree on which parameters have dense or sparse gradients).
    No-op outside a process group of more than one rank.
    """
    if get_world_size() == 1:
        return
    world = dist.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    # 0: no grad, 1: dense, 2: sparse; MAX over ranks so every rank makes the same calls.
    codes = [0 if p.grad is None else 2 if p.grad.is_sparse else 1 for p in params]
    kinds = torch.tensor(codes, dtype=torch.int64, device=params[0].device)
    dist.all_reduce(kinds, op=dist.ReduceOp.MAX)
    dense: dict[torch.dtype, list[nn.Parameter]] = {}
    for p, kind in zip(params, kinds.tolist()):
        if kind == 2:
            if p.grad is None:
                empty = torch.empty((0, *p.shape[1:]), dtype=p.dtype, device=p.device)
                p.grad = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.int64, device=p.device), empty, p.shape)
            elif not p.grad.is_sparse:
                raise RuntimeError("a parameter's gradient is sparse on some ranks and dense on others")
            p.grad = allreduce_sparse_grad(p.grad, average=average)
        elif kind == 1:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
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
