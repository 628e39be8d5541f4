"""Feature parallel: the dictionary is split into contiguous feature slices, one per rank.

All ranks see the same batch. `FeatureParallelSAE` is a `TopKSAE` holding one slice; it overrides
the two steps that need the other ranks. Selection: each rank takes its local top-k candidates,
the candidates are all-gathered as packed keys (`flashsae.kernels.keys`) and merged to the global
top-k — the same choice, ties included, as a single process. Decoding: each rank decodes the
winning slots it owns, and an all-reduce sums the partial reconstructions. Gradients of the local
parameters equal the matching slices of the single-process gradients, so no gradient all-reduce is
needed after backward. Checkpoints hold the gathered SAE and one optimizer file per rank.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ... import ops
from ...kernels.keys import EMPTY_KEY, pack_keys, unpack_keys
from ..run import checkpoints
from ..model import Selection, TopKSAE
from .process_group import barrier, get_rank, get_world_size
from .strategy import SingleProcess


def feature_split(n_features: int, world_size: int) -> list[tuple[int, int]]:
    """(offset, count) of each rank's contiguous feature slice; the first F % world ranks get one more."""
    if world_size > n_features:
        raise ValueError(f"feature parallel needs n_features >= world_size, got {n_features} < {world_size}")
    base, extra = divmod(n_features, world_size)
    counts = [base + (r < extra) for r in range(world_size)]
    offsets = [sum(counts[:r]) for r in range(world_size)]
    return list(zip(offsets, counts))


def merge_candidates(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global top-k from the ranks' candidate keys [B, world * k] (rank-major; empty slots `EMPTY_KEY`).

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
    rank uses in its own part of the computation (x and b_pre in the local encoders)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def _replicated(t: torch.Tensor | None) -> torch.Tensor | None:
    return _ReplicatedInput.apply(t) if t is not None and t.requires_grad else t


class FeatureParallelSAE(TopKSAE):
    """A `TopKSAE` holding rows [offset, offset + n_local) of W_enc [F, d], b_enc [F] and W_dec [F, d].

    b_dec [d] (and a skip transcoder's W_skip) is replicated (its gradient comes out identical on every
    rank). Every rank must call it with the same batch x [B, d]; every rank gets the same x_hat [B, d]
    and global (vals, idx). Build it with `from_full` from a whole SAE, or directly (each rank then
    draws its own rows). Matryoshka levels and transcoders split as the plain SAE does; BatchTopK's
    selection across the batch does not split over features (ValueError).
    """

    def __init__(
        self, d_model: int, n_features: int, k: int, *, rank: int | None = None, world_size: int | None = None,
        seed: int = 0, **options: Any,
    ) -> None:
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.split = feature_split(n_features, self.world_size)
        self.seed = seed
        arch = options.get("arch")
        if arch is not None and arch.batch_topk:
            raise ValueError("a BatchTopK SAE cannot be split over features: its selection spans the whole batch "
                             "and dictionary; train it in one process or data parallel")
        super().__init__(d_model, n_features, k, **options)

    @classmethod
    def from_full(
        cls, sae: TopKSAE, rank: int | None = None, world_size: int | None = None, **kwargs: Any
    ) -> "FeatureParallelSAE":
        """This rank's slice of a full ``sae``; dtype, device, backend, sparse_grad, metadata as in ``sae``
        unless given in ``kwargs``."""
        options = {
            "dtype": sae.dtype, "device": sae.W_dec.device, "backend": sae.backend,
            "sparse_grad": sae.sparse_grad, "metadata": sae.metadata, "arch": sae.arch, **kwargs,
        }
        fp = cls(sae.d_model, sae.n_features, sae.k, rank=rank, world_size=world_size, **options)
        rows = slice(fp.offset, fp.offset + fp.n_local)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec"):
                getattr(fp, name).copy_(getattr(sae, name)[rows])
            fp.b_dec.copy_(sae.b_dec)
            if fp.W_skip is not None:
                fp.W_skip.copy_(sae.W_skip)
        return fp

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """`TopKSAE.reset_parameters` with a per-rank random stream by default, so the ranks' rows differ."""
        if generator is None:
            generator = torch.Generator(device=self.W_dec.device).manual_seed(self.seed * 65537 + self.rank)
        super().reset_parameters(generator)

    def save(self, path: str | os.PathLike) -> Path | None:
        """Gather the whole SAE and save it on rank 0 (`TopKSAE.save`); a collective. None on other ranks."""
        full = self.gather_full()
        return None if full is None else full.save(path)

    @property
    def offset(self) -> int:
        return self.split[self.rank][0]

    @property
    def n_local(self) -> int:
        return self.split[self.rank][1]

    @property
    def feature_offset(self) -> int:
        return self.offset

    @property
    def n_held(self) -> int:
        return self.n_local

    def _held_ids(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + self.n_local, device=device)

    @torch.no_grad()
    def gather_full(self, dst: int = 0) -> TopKSAE | None:
        """Assemble the full `TopKSAE` on rank ``dst`` (None elsewhere); a collective, all ranks call it.

        Moves one [max n_local, d] slice per rank at a time, so only ``dst`` ever holds F x d.
        """
        full = None
        if self.rank == dst:
            full = TopKSAE(
                self.d_model, self.n_features, self.k, dtype=self.dtype, device=self.W_dec.device,
                backend=self.backend, sparse_grad=self.sparse_grad, metadata=self.metadata, arch=self.arch,
            )
            full.b_dec.copy_(self.b_dec)
            if full.W_skip is not None:
                full.W_skip.copy_(self.W_skip)
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

    def _select(
        self,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_pre: torch.Tensor | None,
        k: int,
        mask: torch.Tensor | None = None,
        *,
        check_finite: bool = True,
    ) -> Selection:
        """The global top-k over every rank's rows; a collective (see `TopKSAE._select`).

        Each rank selects its local top-k candidates, the candidates are all-gathered and merged,
        and the winners' values are assembled into one [B, k] tensor whose gradient reaches each
        rank's own winners. The local selection's backward groups only the local candidates that
        won, so a candidate that lost is not touched (no stale momentum moves it), as in a single
        process. No host sync: every size is fixed by B, k and the split.
        """
        local = None
        if W_enc.shape[0]:
            local = super()._select(_replicated(x), W_enc, b_enc, _replicated(b_pre), min(k, W_enc.shape[0]), mask,
                                    check_finite=check_finite)
        return self._merge_across_ranks(local, k, x)

    def _select_with_aux(
        self,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_pre: torch.Tensor | None,
        k: int,
        aux_k: int,
        dead: torch.Tensor,
        *,
        batch: bool = False,
        check_finite: bool = True,
    ) -> tuple[Selection, Selection]:
        """The global top-k and AuxK's global top-aux_k among the dead rows, from one local encoder pass per
        rank; a collective. Each selection is merged across the ranks as `_select` merges its one."""
        main = aux = None
        n_rows = W_enc.shape[0]
        if n_rows:
            main, aux = super()._select_with_aux(_replicated(x), W_enc, b_enc, _replicated(b_pre), min(k, n_rows),
                                                 min(aux_k, n_rows), dead, batch=batch, check_finite=check_finite)
        return self._merge_across_ranks(main, k, x), self._merge_across_ranks(aux, aux_k, x)

    def _merge_across_ranks(self, local: Selection | None, k: int, x: torch.Tensor) -> Selection:
        """The global top-k from each rank's ``local`` top-min(k, rows held) (None on a rank holding no rows);
        a collective. See `_select`."""
        k_local = local.idx.shape[1] if local is not None else 0
        if local is not None:
            keys = pack_keys(local.vals.detach(), local.idx + self.offset)
            if k_local < k:
                keys = torch.cat([keys, keys.new_full((keys.shape[0], k - k_local), EMPTY_KEY)], dim=1)
        else:
            keys = torch.full((x.shape[0], k), EMPTY_KEY, dtype=torch.int64, device=x.device)
        gathered = [torch.empty_like(keys) for _ in range(self.world_size)]
        dist.all_gather(gathered, keys)
        top_vals, top_idx, pos = merge_candidates(torch.cat(gathered, dim=1), k)
        # Each rank places its own winners' (differentiable) values into the global slots.
        mine = (pos >= self.rank * k) & (pos < self.rank * k + k_local)
        if local is not None:
            slot = (pos - self.rank * k).clamp(0, k_local - 1)
            own_vals = local.vals.gather(1, slot) * mine
            won = torch.zeros_like(local.idx).scatter_add_(1, slot, mine.to(torch.int64)) > 0
            local.grouping.limit_to(won & (local.vals > 0))
        else:
            own_vals = torch.zeros_like(top_vals, dtype=x.dtype)
        return Selection(_SumAcrossRanks.apply(own_vals), top_idx)

    def _decode_rows(
        self,
        vals: torch.Tensor,
        idx: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        row_ids: torch.Tensor | None = None,
        grouping: ops.SharedGrouping | None = None,
    ) -> torch.Tensor:
        """Each rank decodes the slots it owns; the partial decodes are summed over the ranks; a collective.

        (A global selection has no ``grouping`` to share: each rank groups the slots it owns.)"""
        zero = torch.zeros_like(b_dec)
        held = self._held_ids(idx.device) if row_ids is None else row_ids
        partial = super()._decode_rows(vals, idx, W_dec, zero, held)
        return _SumAcrossRanks.apply(partial) + b_dec

    def _decode_levels(
        self,
        vals: torch.Tensor,
        idx: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        row_ids: torch.Tensor | None = None,
        grouping: ops.SharedGrouping | None = None,
    ) -> torch.Tensor:
        """The Matryoshka levels as `_decode_rows`: each rank decodes its slots at every level; a collective."""
        held = self._held_ids(idx.device) if row_ids is None else row_ids
        partial = super()._decode_levels(vals, idx, W_dec, torch.zeros_like(b_dec), held)
        return _SumAcrossRanks.apply(partial) + b_dec


class FeatureParallel(SingleProcess):
    """Each rank: one slice of the dictionary and its optimizer state, the whole batch."""

    name = "feature"

    def wrap(self, sae: TopKSAE) -> FeatureParallelSAE:
        return FeatureParallelSAE.from_full(sae, rank=self.rank, world_size=self.world_size)

    def reduce_over_features(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def full_model(self, model: FeatureParallelSAE) -> TopKSAE | None:
        return model.gather_full()

    def save_checkpoint(
        self, root: Path, model: FeatureParallelSAE, optimizer: torch.optim.Optimizer, state: Any,
        config: dict[str, Any],
    ) -> None:
        """Rank 0 gathers the weights; each rank writes its own optimizer state (no rank ever holds all
        of it) into the staging directory before rank 0 seals the checkpoint."""
        full = model.gather_full()
        if self.is_main:
            checkpoints.prepare_staging(root, state.step)
        barrier()
        checkpoints.save_optimizer_shard(root, state.step, optimizer, self.rank)
        barrier()
        if self.is_main:
            checkpoints.save_checkpoint(root, sae=full, optimizer=None, state=state, config=config,
                                        optimizer_shards=self.world_size)
        barrier()

    def optimizer_state(self, resumed: dict[str, Any]) -> dict[str, Any]:
        return checkpoints.load_optimizer_shard(resumed, self.rank, self.world_size)
