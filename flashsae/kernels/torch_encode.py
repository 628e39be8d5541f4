"""The torch backend's encoder: chunked matmul + exact threshold select, on any device (the CPU default).

For each chunk of features (ascending), ``pre = (x - b_pre) @ W[chunk].T + b[chunk]`` in fp32
(float64 for float64 inputs; the product into one buffer reused by every chunk, then the bias added),
then only the entries of ``pre`` that can still be in their row's top-k are kept. On the CPU the C++
kernel `flashsae.kernels.cpu_native` does this in two vectorized passes per row (group maxima for the
bound, then every entry compared with the threshold; it adds the bias itself while it reads the
product); without it (no compiler, or ``FLASHSAE_CPU_KERNELS=0``), and on other devices, torch
ops do, with the same rules and the same answer:

- **The floor**: the k-th best value kept so far (0 before k positives). Every kept candidate came
  from a lower feature index, so an entry of this chunk that is not *strictly* above it can never
  enter the top-k (k lower-index entries with a value >= it already exist). A strict ``> floor``
  is exact, ties included; with floor >= 0 it also drops every non-positive entry.
- **The chunk's own bound**: the k-th largest of the maxima of disjoint column groups of this chunk
  is at most the chunk's k-th largest entry (k distinct entries reach it), so an entry below it has
  k strictly larger entries and can never be chosen; entries equal to it stay (``>=``).
- **The filter** touches every entry only through column-group maxima (``amax`` over strided groups
  of `GROUP` columns, one vectorized pass): only the groups whose maximum reaches the threshold are
  gathered and compared entry by entry. The survivors (a few per row and chunk) are merged with the
  kept top-k by an exact top-k over packed keys (`flashsae.kernels.keys`; float64 values are sorted
  by index, then stably by value), which ties to the lower index whatever order they arrive in.

Rows with fewer than k positive entries fill up with zeros at the lowest feature indices not chosen
(`fill_lowest_unchosen`): every non-positive entry is a zero after the ReLU, and a NaN pre-activation
counts as -inf (a zero after the ReLU, never a firing feature). Memory is O(B * (chunk + k)), never
B x F. The survivor lists have data-dependent sizes, which costs nothing on the CPU; on other devices
the backend runs `static_topk_encode` instead (each chunk's top-k merged into a running top-k, sizes
fixed by the shapes: no host sync), and the "triton" backend (`flashsae.kernels.chunked_encode`)
runs the threshold select itself without a host sync.

AuxK's selection among the dead features (`topk_encode_with_aux`) rides on the same pass: each
chunk's pre-activations, computed once, feed a second candidate list with its own floor, the
features outside the dead set moved to -inf, so AuxK adds no second matmul over W_enc.
"""
from __future__ import annotations

import threading
from types import ModuleType

import torch

from . import cpu_native
from .keys import EMPTY_KEY, pack_keys, unpack_keys

# Most pre-activations one chunk holds (4M: 16 MiB in fp32, 32 MiB in float64).
CHUNK_ELEMENTS = 1 << 22
# Columns per group of the filter: one group maximum stands for this many entries.
GROUP = 8
# The chunk's own bound takes the k-th largest of this many times k group maxima (fewer when the
# chunk is narrow): more makes the bound tighter and its top-k costlier.
BOUND_GROUPS_PER_K = 2


def feature_chunk_size(n_tokens: int, n_features: int) -> int:
    """Features per chunk, so a chunk holds at most CHUNK_ELEMENTS pre-activations."""
    return max(1, min(n_features, CHUNK_ELEMENTS // max(n_tokens, 1)))


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_pre: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    static: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per token; the `Backend` contract.

    x: [B, d], W_enc: [F, d], b_enc: [F], b_pre: [d] or None; one dtype (fp32 | bf16 | fp16, math in
    fp32; or float64, math in float64); 1 <= k <= F. Returns vals [B, k] in x's dtype sorted
    descending and idx [B, k] int64 (ties to the lower index; rows with fewer than k positive
    values end in zeros at the lowest unchosen indices). ``chunk_size`` features per matmul
    (default `feature_chunk_size`). ``static`` (default: on every device but the CPU) runs
    `static_topk_encode` instead, whose sizes never depend on the data: the threshold select's
    survivor lists do, which costs nothing on the CPU but would make a GPU stream wait on the host.
    """
    (vals, idx), = _encode(x, W_enc, b_enc, b_pre, [(None, k)], chunk_size, static)
    return vals, idx


def topk_encode_with_aux(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    aux_k: int,
    dead: torch.Tensor,
    b_pre: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    static: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_encode` and the top-``aux_k`` among the ``dead`` features (bool [F]) from one pass: the
    `Backend` contract's ``topk_encode_with_aux``.

    Each chunk's pre-activations come from one matmul and feed two selections: the main top-k over
    every feature, and a second list with its own floor over the dead features (the others count as
    -inf before the ReLU, exactly as a masked `topk_encode`: they can fill a row's zero slots but
    never fire). Returns (vals [B, k], idx [B, k], aux_vals [B, aux_k], aux_idx [B, aux_k]), each
    pair as `topk_encode` returns it; 1 <= aux_k <= F.
    """
    (vals, idx), (aux_vals, aux_idx) = _encode(x, W_enc, b_enc, b_pre, [(None, k), (dead, aux_k)], chunk_size, static)
    return vals, idx, aux_vals, aux_idx


def _encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_pre: torch.Tensor | None,
    lists: list[tuple[torch.Tensor | None, int]],
    chunk_size: int | None,
    static: bool | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One chunked matmul pass feeding one selection per ``(mask or None, k)`` of ``lists``; returns
    (vals [B, k] in x's dtype, idx [B, k]) per selection, in order."""
    n_tokens, n_features = x.shape[0], W_enc.shape[0]
    if n_tokens == 0:
        return [(x.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=x.device)) for _, k in lists]
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(math_dtype)
    if b_pre is not None:
        xc = xc - b_pre.to(math_dtype)
    bias = torch.nan_to_num(b_enc.to(math_dtype), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    chunk = min(chunk_size or feature_chunk_size(n_tokens, n_features), n_features)
    static = x.device.type != "cpu" if static is None else static
    native = cpu_native.kernels() if not static and x.device.type == "cpu" else None
    if static:
        results = static_topk_encode(xc, W_enc, bias, _offsets(lists, bias), [k for _, k in lists], chunk)
    elif native is not None:
        results = _native_select(native, xc, W_enc, bias, lists, chunk)
    else:
        results = _torch_select(xc, W_enc, bias, lists, chunk)
    return [(vals.to(x.dtype), idx) for vals, idx in results]


def _offsets(lists: list[tuple[torch.Tensor | None, int]], bias: torch.Tensor) -> list[torch.Tensor | None]:
    """What each selection adds to the pre-activations: None, or -inf at the features outside its mask [F]."""
    return [None if mask is None else torch.zeros_like(bias).masked_fill_(~mask, float("-inf")) for mask, _ in lists]


def _torch_select(
    xc: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, lists: list[tuple[torch.Tensor | None, int]], chunk: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The threshold select in torch ops (`survivors` per chunk, merged into `_Best`): (vals [B, k] in the
    math dtype, idx [B, k]) per selection of ``lists``."""
    n_tokens, n_features = xc.shape[0], W_enc.shape[0]
    bests = [_Best(n_tokens, k, xc.dtype, xc.device) for _, k in lists]
    offsets = _offsets(lists, bias)
    buffer = _workspace(n_tokens * chunk, xc.dtype, xc.device)
    for start in range(0, n_features, chunk):
        pre = _chunk_pre(xc, W_enc, bias, start, min(start + chunk, n_features), buffer)
        for best, offset in zip(bests, offsets):
            values = pre if offset is None else pre + offset[start : start + chunk]
            rows, cols, vals = survivors(values, best.k, best.floor())
            best.merge(rows, cols + start, vals)
    return [best.result(n_features) for best in bests]


def _native_select(
    native: ModuleType, xc: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor,
    lists: list[tuple[torch.Tensor | None, int]], chunk: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The threshold select in the C++ CPU kernel (`flashsae.kernels.cpu_native`): each selection reads
    each chunk's product (two passes per row), every row keeping its best k candidates so far (the same rules and answer as
    `_torch_select`). Returns (vals [B, k] in the math dtype, idx [B, k]) per selection of ``lists``."""
    n_tokens, n_features = xc.shape[0], W_enc.shape[0]
    kept = [(torch.empty(n_tokens, k, dtype=xc.dtype), torch.empty(n_tokens, k, dtype=torch.int64),
             torch.zeros(n_tokens, dtype=torch.int64)) for _, k in lists]
    # Each selection's values: the chunk's product plus the bias (-inf outside its mask), added in the kernel.
    shifts = [bias if mask is None else bias.masked_fill(~mask, float("-inf")) for mask, _ in lists]
    buffer = _workspace(n_tokens * chunk, xc.dtype, xc.device)
    for start in range(0, n_features, chunk):
        product = _chunk_product(xc, W_enc, start, min(start + chunk, n_features), buffer)
        for shift, state in zip(shifts, kept):
            native.select_chunk_(product, start, shift, *state)
    return [tuple(native.select_result(*state, n_features)) for state in kept]


# One pre-activation buffer per thread, dtype and device, kept between calls and grown to the largest
# chunk asked for (at most CHUNK_ELEMENTS, or a caller's larger chunk): a fresh buffer per call would
# pay for mapping its pages again at every step.
_workspaces = threading.local()


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's flat scratch tensor of at least ``numel`` elements (its contents are garbage)."""
    buffers = _workspaces.__dict__.setdefault("buffers", {})
    key = (dtype, torch.device(device))
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key]


def _chunk_pre(
    xc: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, start: int, stop: int, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """The pre-activations ``xc @ W_enc[start:stop].T + bias[start:stop]`` [B, stop - start] of one chunk
    in xc's dtype (the product rounded, then the bias added: as the CPU kernel adds it); written into
    ``buffer`` (flat, large enough) when given."""
    return _chunk_product(xc, W_enc, start, stop, buffer).add_(bias[start:stop])


def _chunk_product(
    xc: torch.Tensor, W_enc: torch.Tensor, start: int, stop: int, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """``xc @ W_enc[start:stop].T`` [B, stop - start] in xc's dtype, into ``buffer`` (flat) when given."""
    out = None if buffer is None else buffer[: xc.shape[0] * (stop - start)].view(xc.shape[0], stop - start)
    return torch.mm(xc, W_enc[start:stop].to(xc.dtype).T, out=out)


def static_topk_encode(
    xc: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, offsets: list[torch.Tensor | None], ks: list[int],
    chunk: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The encoder in sizes fixed by the shapes (no host sync): each chunk's exact top-k merged into a
    running top-k, for one selection per (offset, k) of ``offsets`` / ``ks`` from one matmul per chunk.
    xc [B, d] = x - b_pre and bias [F] in the math dtype (NaN already -inf); a selection's values are
    the pre-activations plus its offset [F] (0, or -inf outside its mask; None: none).

    fp32: top-k over packed keys (`flashsae.kernels.keys`: ReLU, NaN as 0, ties to the lower index
    whatever the order). float64: stable sorts by value, each over entries in ascending index
    order, so equal values keep the lower index. Returns (vals [B, k] in the math dtype, idx [B, k])
    per selection.
    """
    n_features = W_enc.shape[0]
    bests = [_StaticBest(k) for k in ks]
    for start in range(0, n_features, chunk):
        stop = min(start + chunk, n_features)
        pre = _chunk_pre(xc, W_enc, bias, start, stop)
        cols = torch.arange(start, stop, device=xc.device)
        for best, offset in zip(bests, offsets):
            best.merge(pre if offset is None else pre + offset[start:stop], cols)
    return [best.result() for best in bests]


class _StaticBest:
    """The running exact top-k of `static_topk_encode` for one selection (sizes fixed by the shapes).

    fp32 keeps packed keys; float64 keeps (values, indices), lower indices first among equal values.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys: torch.Tensor | None = None
        self.vals: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None

    def merge(self, pre: torch.Tensor, cols: torch.Tensor) -> None:
        """Merge a chunk's pre-activations pre [B, c] (bias added) of features ``cols`` [c] ascending."""
        n_tokens = pre.shape[0]
        if pre.dtype == torch.float64:
            vals = torch.where(pre > 0, pre, 0.0)  # ReLU; NaN counts as -inf, i.e. 0
            cols = cols.expand(n_tokens, -1)
            if self.vals is not None:  # the kept ones have the lower indices: they go first
                vals, cols = torch.cat([self.vals, vals], 1), torch.cat([self.idx, cols], 1)
            order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.k]
            self.vals, self.idx = vals.gather(1, order), cols.gather(1, order)
        else:
            keys = pack_keys(pre, cols)
            if self.keys is not None:
                keys = torch.cat([self.keys, keys], 1)
            self.keys = keys.topk(min(self.k, keys.shape[1]), dim=1, sorted=True).values

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(vals [B, k] in the math dtype, idx [B, k] int64)."""
        if self.keys is not None:
            return unpack_keys(self.keys)
        return self.vals, self.idx


def survivors(pre: torch.Tensor, k: int, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of ``pre`` [B, c] (bias included) that may be in their row's top-k: > floor [B] and
    >= the chunk's own bound.

    A group whose maximum is NaN is gathered, and NaN values never survive. Returns (rows, cols, vals),
    flat, rows ascending: row and column (within the chunk) of each survivor and its value.
    """
    n_tokens, width = pre.shape
    n_groups = width // GROUP
    grouped = n_groups * GROUP
    group_max = torch.amax(pre[:, :grouped].view(n_tokens, GROUP, n_groups), dim=1)  # group j: columns j + g * n_groups
    threshold = torch.nextafter(floor, floor.new_tensor(float("inf")))  # "> floor" as ">= threshold"
    if n_groups >= k:
        torch.maximum(threshold, _own_bound(group_max, k), out=threshold)
    misses = group_max < threshold[:, None]
    hit_rows, hit_cols = misses.logical_not_().nonzero(as_tuple=True)  # NaN maxima are hits
    members = torch.arange(GROUP, device=pre.device) * n_groups
    values = pre.take((hit_rows * pre.stride(0) + hit_cols)[:, None] + members)  # [hits, GROUP]
    kept, member = (values >= threshold[hit_rows, None]).nonzero(as_tuple=True)
    rows, cols, values = hit_rows[kept], hit_cols[kept] + member * n_groups, values[kept, member]
    if grouped < width:  # the last width % GROUP columns, compared one by one
        tail = pre[:, grouped:]
        tail_rows, tail_cols = (tail >= threshold[:, None]).nonzero(as_tuple=True)
        order = torch.argsort(torch.cat([rows, tail_rows]), stable=True)
        rows = torch.cat([rows, tail_rows])[order]
        cols = torch.cat([cols, tail_cols + grouped])[order]
        values = torch.cat([values, tail[tail_rows, tail_cols]])[order]
    return rows, cols, values


def _own_bound(lower: torch.Tensor, k: int) -> torch.Tensor:
    """A lower bound of each row's k-th largest entry, from ``lower`` [B, n] (n >= k): per disjoint
    column group, a value at most one of the group's entries (its maximum). The k-th largest of k * BOUND_GROUPS_PER_K
    (or fewer) merged groups' bounds; NaN bounds count as -inf -> [B]."""
    n_tokens, n_groups = lower.shape
    merge = max(1, n_groups // (BOUND_GROUPS_PER_K * k))
    coarse = n_groups // merge
    bounds = torch.amax(lower[:, : coarse * merge].view(n_tokens, merge, coarse), dim=1) if merge > 1 else lower
    bounds = torch.nan_to_num(bounds, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return bounds.topk(k, dim=1, sorted=False).values.amin(1)


class _Best:
    """The exact top-k kept so far per row, over the positive candidates merged in (features ascending).

    fp32 keeps packed int64 keys (`flashsae.kernels.keys`; the empty key pads a row with fewer than
    k); float64 keeps (values, indices) sorted by value, then index, padded with value -1.
    """

    def __init__(self, n_tokens: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n_tokens, self.k, self.dtype, self.device = n_tokens, k, dtype, device
        self.keys: torch.Tensor | None = None
        self.vals: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None

    def floor(self) -> torch.Tensor:
        """[B] the k-th best value kept (0 while a row has fewer than k positive candidates)."""
        if self.keys is None and self.vals is None:
            return torch.zeros(self.n_tokens, dtype=self.dtype, device=self.device)
        if self.dtype == torch.float64:
            kth = self.vals[:, self.k - 1]
        else:
            kth = unpack_keys(self.keys[:, self.k - 1].clamp_min(0))[0]  # the empty key: value 0
        return kth.clamp_min(0)

    def merge(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        """Add the candidates (rows ascending, global feature indices ``cols``, positive ``vals``)."""
        slots = _row_slots(rows, self.n_tokens)
        width = int(slots.max()) + 1 if slots.numel() else 0
        if self.dtype == torch.float64:
            new_vals = torch.full((self.n_tokens, width), -1.0, dtype=self.dtype, device=self.device)
            new_idx = torch.zeros((self.n_tokens, width), dtype=torch.int64, device=self.device)
            new_vals[rows, slots] = vals
            new_idx[rows, slots] = cols
            if self.vals is not None:
                new_vals, new_idx = torch.cat([self.vals, new_vals], 1), torch.cat([self.idx, new_idx], 1)
            self.vals, self.idx = _exact_topk_float64(new_vals, new_idx, self.k)
        else:
            keys = torch.full((self.n_tokens, width), EMPTY_KEY, dtype=torch.int64, device=self.device)
            keys[rows, slots] = pack_keys(vals, cols)
            if self.keys is not None:
                keys = torch.cat([self.keys, keys], 1)
            if keys.shape[1] < self.k:
                keys = torch.cat([keys, keys.new_full((self.n_tokens, self.k - keys.shape[1]), EMPTY_KEY)], 1)
            self.keys = keys.topk(self.k, dim=1, sorted=True).values

    def result(self, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(vals [B, k] in the math dtype, descending; idx [B, k] int64), short rows zero-filled."""
        if self.dtype == torch.float64:
            vals, idx, empty = self.vals, self.idx, self.vals < 0
        else:
            vals, idx = unpack_keys(self.keys)
            empty = self.keys < 0
        if bool(empty.any()):
            idx = fill_lowest_unchosen(idx, empty, n_features)
            vals = vals.masked_fill(empty, 0.0)
        return vals, idx


def _row_slots(rows: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Each entry's position among the entries of its row, for ``rows`` ascending."""
    counts = torch.bincount(rows, minlength=n_tokens)
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(rows.numel(), device=rows.device) - first.take(rows)


def _exact_topk_float64(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of (vals, idx) [B, n] by value, ties to the lower index; pads (value -1) last.

    Sorting by index first and then stably by value keeps equal values in index order. Rows narrower
    than k are padded with value -1.
    """
    by_index = torch.argsort(torch.where(vals < 0, torch.iinfo(torch.int64).max, idx), dim=1, stable=True)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    if vals.shape[1] < k:
        pad = k - vals.shape[1]
        vals = torch.cat([vals, vals.new_full((vals.shape[0], pad), -1.0)], 1)
        idx = torch.cat([idx, idx.new_zeros((idx.shape[0], pad))], 1)
    return vals, idx


def fill_lowest_unchosen(idx: torch.Tensor, empty: torch.Tensor, n_features: int) -> torch.Tensor:
    """idx [B, k] with the ``empty`` slots (bool [B, k], the last slots of a row) replaced by the
    lowest feature indices the row's other slots do not hold, in ascending order.

    A row with P chosen features needs k - P fillers, all below k + P <= 2k, so only the first
    min(F, 2k) indices are searched.
    """
    n_tokens, k = idx.shape
    pool = min(n_features, 2 * k)
    taken = torch.zeros(n_tokens, pool + 1, dtype=torch.uint8, device=idx.device)
    taken.scatter_(1, torch.where(~empty & (idx < pool), idx, pool), 1)
    free = torch.argsort(taken[:, :pool], dim=1, stable=True)  # untaken indices first, ascending
    n_chosen = (~empty).sum(1, keepdim=True)
    fillers = free.gather(1, (torch.arange(k, device=idx.device) - n_chosen).clamp_(0, pool - 1))
    return torch.where(empty, fillers, idx)
