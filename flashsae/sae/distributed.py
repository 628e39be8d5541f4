"""torch.distributed for training: process-group setup, data parallel and feature parallel.

Data parallel: every rank holds the whole `TopKSAE` and its own slice of each global batch
(`flashsae.sae.store` hands rank r rows [r*b, (r+1)*b) of the global batch); after backward,
`allreduce_gradients` sums (or averages) the gradients. Sparse COO gradients (``sparse_grad=True``)
travel as their compact (rows, values), never as a dense [F, d] tensor.

Feature parallel: `FeatureParallelSAE` splits the dictionary into contiguous feature slices, one
per rank; all ranks see the same batch. Each rank encodes against its slice, the ranks exchange
their local top-k candidates and agree on the global top-k (the same choice, ties included, as
`flashsae.ops.topk_encode` on the whole dictionary), and each rank decodes its own winners; an
all-reduce sums the partial reconstructions.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..kernels.reference import unpack_keys
from .auxk import scatter_row_grad_, unexplained_fraction
from .model import SAEOutput, TopKSAE

_INDEX_MASK = (1 << 31) - 1


# ---------------------------------------------------------------------------------------------
# Process group


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank (GPU index on its node) and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is set."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(backend: str | None = None, *, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for a lone process.

    backend: None picks NCCL when CUDA is available (and binds this process to GPU LOCAL_RANK),
    gloo otherwise. Without torchrun's variables returns rank 0 of 1 on cuda:0 or CPU.
    Idempotent: a second call returns the current group's info.
    """
    cuda = torch.cuda.is_available() and backend != "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, device)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend or ("nccl" if cuda else "gloo"),
            init_method="env://",
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if cuda else {}),
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_distributed() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a lone process): the rank that logs and writes checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Data parallel


def _all_gather_rows(values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """All-gather [U_r, ...] tensors of varying U_r (``counts``): pad to max, gather, trim."""
    width = max(max(counts), 1)  # some backends reject empty collectives
    padded = values.new_zeros((width, *values.shape[1:]))
    padded[: values.shape[0]] = values
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return [p[:n] for p, n in zip(parts, counts)]


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
    counts_t = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts_t, count)
    counts = [int(c.item()) for c in counts_t]
    all_rows = _all_gather_rows(rows, counts)
    all_values = _all_gather_rows(values, counts)
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


# ---------------------------------------------------------------------------------------------
# Feature parallel


def feature_split(n_features: int, world_size: int) -> list[tuple[int, int]]:
    """(offset, count) of each rank's contiguous feature slice; the first F % world ranks get one more."""
    if world_size > n_features:
        raise ValueError(f"feature parallel needs n_features >= world_size, got {n_features} < {world_size}")
    base, extra = divmod(n_features, world_size)
    counts = [base + (r < extra) for r in range(world_size)]
    offsets = [sum(counts[:r]) for r in range(world_size)]
    return list(zip(offsets, counts))


def pack_candidates(vals: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """(vals [B, m] >= 0, global idx [B, m]) -> int64 keys [B, k] that sort like (value desc, index asc).

    Slots m..k-1 (when a rank holds fewer than k features) are padded with -1, below every key.
    """
    bits = (vals.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 -> +0.0
    keys = (bits << 32) | (_INDEX_MASK - idx)
    if keys.shape[1] < k:
        keys = torch.cat([keys, keys.new_full((keys.shape[0], k - keys.shape[1]), -1)], dim=1)
    return keys


def merge_candidates(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global top-k from the ranks' candidates ``keys`` [B, world * k] (rank-major, from `pack_candidates`).

    Returns (vals [B, k] fp32 descending, global idx [B, k] int64, positions [B, k] int64 of
    the winners in ``keys``). Ties go to the lower global index, as in `flashsae.ops.topk_encode`.
    """
    best, pos = keys.topk(k, dim=1, sorted=True)
    vals, idx = unpack_keys(best)
    return vals, idx, pos


class _SumAcrossRanks(torch.autograd.Function):
    """Forward: all_reduce(sum). Backward: identity (the loss downstream is the same on every rank)."""

    @staticmethod
    def forward(ctx, x):
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ReplicatedInput(torch.autograd.Function):
    """Forward: identity. Backward: all_reduce(sum) of the gradient, for a replicated tensor that each
    rank uses in its own part of the computation (b_pre in the local encoders)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def _rows_only(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A sparse row gradient restricted to ``rows`` (int64); a dense gradient is returned as it is.

    A local candidate that lost the global top-k has zero gradient, but as a row of a sparse
    gradient it would still count as touched for `SparseAdam` (stale momentum would move it); a
    single process never lists it.
    """
    if not grad.is_sparse:
        return grad
    grad = grad.coalesce()
    index = grad.indices()[0]
    keep = torch.isin(index, rows)
    return torch.sparse_coo_tensor(
        index[keep].unsqueeze(0), grad.values()[keep], grad.shape, is_coalesced=True, check_invariants=False
    )


class FeatureParallelSAE(nn.Module):
    """A `TopKSAE` whose features are split across the ranks of the process group.

    This rank holds rows [offset, offset + n_local) of W_enc [F, d], b_enc [F] and W_dec [F, d];
    b_dec [d] is replicated (its gradient comes out identical on every rank). Every rank must call
    `forward` with the same batch x [B, d]; every rank gets the same x_hat [B, d] and the global
    (vals, idx) [B, k] (detached). Gradients of the local parameters equal the matching slices of
    the single-process gradients, so no gradient all-reduce is needed after backward.
    """

    def __init__(
        self,
        d_model: int,
        n_features: int,
        k: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
        sparse_grad: bool = False,
        metadata: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if not 1 <= k <= min(n_features, ops.MAX_K):
            raise ValueError(f"k must be in [1, min(n_features={n_features}, {ops.MAX_K})], got k={k}")
        self.split = feature_split(n_features, self.world_size)
        self.offset, self.n_local = self.split[self.rank]
        self.d_model, self.n_features, self.k = d_model, n_features, k
        self.backend, self.sparse_grad = backend, sparse_grad
        self.metadata: dict[str, Any] = dict(metadata or {})
        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(self.n_local, d_model, **factory))
        self.b_enc = nn.Parameter(torch.zeros(self.n_local, **factory))
        self.W_dec = nn.Parameter(torch.empty(self.n_local, d_model, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **factory))
        # Random unit rows from a per-rank stream (from_full gives a single-process-identical start).
        gen = torch.Generator().manual_seed(seed * 65537 + self.rank)
        W = torch.randn(self.n_local, d_model, generator=gen)
        W = W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        with torch.no_grad():
            self.W_dec.copy_(W)
            self.W_enc.copy_(W)
        # Local rows that won a global top-k slot in the last forward (see `_drop_losing_rows`).
        self._won_rows: torch.Tensor | None = None
        self.W_enc.register_hook(self._drop_losing_rows)
        self.b_enc.register_hook(self._drop_losing_rows)

    @classmethod
    def from_full(
        cls, sae: TopKSAE, rank: int | None = None, world_size: int | None = None, **kwargs: Any
    ) -> "FeatureParallelSAE":
        """This rank's slice of a full ``sae``; dtype, device, backend, sparse_grad, metadata as in ``sae``
        unless given in ``kwargs``."""
        options = {
            "dtype": sae.dtype, "device": sae.W_dec.device, "backend": sae.backend,
            "sparse_grad": sae.sparse_grad, "metadata": sae.metadata, **kwargs,
        }
        fp = cls(sae.d_model, sae.n_features, sae.k, rank=rank, world_size=world_size, **options)
        rows = slice(fp.offset, fp.offset + fp.n_local)
        with torch.no_grad():
            fp.W_enc.copy_(sae.W_enc[rows])
            fp.b_enc.copy_(sae.b_enc[rows])
            fp.W_dec.copy_(sae.W_dec[rows])
            fp.b_dec.copy_(sae.b_dec)
        return fp

    @torch.no_grad()
    def gather_full(self, dst: int = 0) -> TopKSAE | None:
        """Assemble the full `TopKSAE` on rank ``dst`` (None elsewhere); a collective, all ranks call it.

        Moves one [max n_local, d] slice per rank at a time, so only ``dst`` ever holds F x d.
        """
        full = None
        if self.rank == dst:
            full = TopKSAE(
                self.d_model, self.n_features, self.k, dtype=self.dtype, device=self.W_dec.device,
                backend=self.backend, sparse_grad=self.sparse_grad, metadata=self.metadata,
            )
            full.b_dec.copy_(self.b_dec)
        width = max(n for _, n in self.split)
        for name in ("W_enc", "b_enc", "W_dec"):
            local = getattr(self, name).detach()
            padded = local.new_zeros((width, *local.shape[1:]))
            padded[: self.n_local] = local
            parts = [torch.empty_like(padded) for _ in self.split] if self.rank == dst else None
            dist.gather(padded, parts, dst=dst)
            if full is not None:
                getattr(full, name).copy_(torch.cat([p[:n] for p, (_, n) in zip(parts, self.split)]))
        return full

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def _drop_losing_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """Keep only the winners' rows in a sparse encoder gradient (see `_rows_only`)."""
        return grad if self._won_rows is None else _rows_only(grad, self._won_rows)

    def _global_topk_decode(
        self,
        x: torch.Tensor,
        b_pre: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        k: int,
        global_rows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k over every rank's rows, and the decode of the winners summed over the ranks; a collective.

        W_enc, W_dec: [n, d] and b_enc: [n] this rank's rows (n may be 0), whose global feature
        indices are ``global_rows`` [n] (ascending). Each rank selects its local top-k candidates,
        the candidates are all-gathered and merged (ties to the lower global index, as in a single
        process), and each rank decodes its own winners. Returns (decode [B, d] without bias, the
        same on every rank; vals [B, k] fp32 descending; global idx [B, k]; the positions [m] in
        this rank's rows of the features that won a slot with a positive value).
        """
        n_rows, k_local = W_enc.shape[0], min(k, W_enc.shape[0])
        if n_rows:
            vals, idx = ops.topk_encode(x, W_enc, b_enc, k_local, b_pre=b_pre, backend=self.backend,
                                        sparse_grad=self.sparse_grad)
            keys = pack_candidates(vals.detach(), global_rows[idx], k)
        else:
            keys = torch.full((x.shape[0], k), -1, dtype=torch.int64, device=x.device)
        gathered = [torch.empty_like(keys) for _ in range(self.world_size)]
        dist.all_gather(gathered, keys)
        top_vals, top_idx, pos = merge_candidates(torch.cat(gathered, dim=1), k)
        if n_rows:
            # Which of this rank's candidate slots won a global slot.
            won = torch.zeros(x.shape[0], self.world_size * k, dtype=torch.bool, device=x.device)
            won.scatter_(1, pos, True)
            won = won[:, self.rank * k : self.rank * k + k_local]
            zero_bias = torch.zeros(W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
            partial = ops.sparse_decode(vals * won, idx, W_dec, zero_bias, backend=self.backend,
                                        sparse_grad=self.sparse_grad)
        else:
            partial = torch.zeros(x.shape[0], W_dec.shape[1], dtype=W_dec.dtype, device=x.device)
        won_rows = torch.isin(global_rows, top_idx[top_vals > 0]).nonzero().squeeze(1)
        return _SumAcrossRanks.apply(partial), top_vals, top_idx, won_rows

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """x: [B, d], the same on every rank -> SAEOutput(x_hat [B, d], vals [B, k], idx [B, k] global)."""
        b_pre = _ReplicatedInput.apply(self.b_dec) if self.b_dec.requires_grad else self.b_dec
        x_in = _ReplicatedInput.apply(x) if x.requires_grad else x
        rows = torch.arange(self.offset, self.offset + self.n_local, device=x.device)
        decoded, top_vals, top_idx, self._won_rows = self._global_topk_decode(
            x_in, b_pre, self.W_enc, self.b_enc, self.W_dec, self.k, rows
        )
        return SAEOutput(decoded + self.b_dec, top_vals.to(x.dtype), top_idx)

    def add_aux_k_grads_(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        dead: torch.Tensor,
        aux_k: int,
        coef: float,
        *,
        denominator: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`flashsae.sae.auxk.add_aux_k_grads_` across the ranks; a collective.

        ``dead``: int64 global indices of the dead features (ascending, the same on every rank);
        x and residual [B, d] the same on every rank. The top-``aux_k`` dead features are selected
        globally, as in a single process; each rank's dead rows get their gradients.
        """
        if dead.numel() == 0 or aux_k == 0 or coef == 0:
            return torch.zeros((), device=x.device)
        mine = dead[(dead >= self.offset) & (dead < self.offset + self.n_local)] - self.offset
        leaves = [self.W_enc.detach()[mine].requires_grad_(), self.b_enc.detach()[mine].requires_grad_(),
                  self.W_dec.detach()[mine].requires_grad_()]
        e_hat, _, _, won = self._global_topk_decode(
            x, self.b_dec.detach(), *leaves, min(aux_k, dead.numel()), mine + self.offset
        )
        loss = unexplained_fraction(e_hat, residual, denominator)
        if loss.requires_grad:  # a rank without dead rows has nothing to differentiate
            (coef * loss).backward()
        for param, leaf in zip((self.W_enc, self.b_enc, self.W_dec), leaves):
            scatter_row_grad_(param, mine, None if leaf.grad is None else _rows_only(leaf.grad, won))
        return loss.detach()

    # Decoder upkeep is row-wise, so TopKSAE's methods work unchanged on the local slice.
    normalize_decoder_ = TopKSAE.normalize_decoder_
    remove_parallel_grads_ = TopKSAE.remove_parallel_grads_


# ---------------------------------------------------------------------------------------------
# One training step


def train_step(
    model: nn.Module,
    optimizer: Any,
    x: torch.Tensor,
    *,
    parallel: str = "auto",
    remove_parallel_grads: bool = True,
) -> float:
    """One step on this rank's batch x [b, d]; returns the global batch's MSE (the same on all ranks).

    parallel: "none", "data" (x is this rank's slice of the global batch; gradients are summed
    over ranks), "feature" (``model`` is a `FeatureParallelSAE`, x is the whole batch on every
    rank) or "auto" (feature for a FeatureParallelSAE, data inside a multi-rank group, else none).
    The loss is the squared error summed over this rank's rows divided by (global batch * d),
    so the summed data-parallel gradient is the single-process gradient of the global mean.
    Then: decoder-parallel gradient removal, ``optimizer.step()``, decoder row renormalization.
    """
    if parallel == "auto":
        parallel = "feature" if isinstance(model, FeatureParallelSAE) else "data" if get_world_size() > 1 else "none"
    if parallel not in ("none", "data", "feature"):
        raise ValueError(f"parallel must be 'auto', 'none', 'data' or 'feature', got {parallel!r}")
    world = get_world_size() if parallel == "data" else 1
    optimizer.zero_grad(set_to_none=True)
    out = model(x)
    loss = (out.x_hat.float() - x.float()).pow(2).sum() / (x.shape[0] * world * x.shape[1])
    loss.backward()
    if parallel == "data":
        allreduce_gradients(model, average=False)
    if remove_parallel_grads:
        model.remove_parallel_grads_()
    optimizer.step()
    model.normalize_decoder_()
    total = loss.detach()
    if parallel == "data":
        total = total.clone()
        dist.all_reduce(total)
    return float(total)
