"""Selections across a whole batch: BatchTopK (the B * k largest) and JumpReLU (everything above a threshold).

Both keep ``relu((x - b_pre) @ W_enc.T + b_enc)`` entries of a batch x [B, d] by a cut that is not
per row, so rows get a variable number of features; neither forms the [B, F] matrix:

1. **Candidates**: every row's top-K by the backend's own per-row encoder (K = `CANDIDATES_PER_K`
   times k, at most F), in the encoder's order (value, then the lower feature).
2. **The cut**. BatchTopK: the (B k)-th largest candidate value is an exact lower bound of the
   batch's (B k)-th value (B k entries reach it). JumpReLU: the threshold itself.
3. **Saturated rows**: a row whose K-th candidate reaches the cut may hold more entries that do;
   only those rows are searched again over all features (`entries_beyond`: a chunked matmul whose
   entries are compared with the cut at once, so only the survivors are kept). Every other row's
   candidates already hold all its entries at or above the cut (the rest are no larger than its
   K-th candidate and lie at higher features when equal).
4. **Exact selection over the survivors**. BatchTopK keeps the B k largest positive values of the
   pool (all of them when fewer are positive); ties at the (B k)-th value go to the lower
   (row, feature) index: rows first, then features. JumpReLU keeps the values strictly above the
   threshold (SAELens' ``hidden_pre > threshold``).

Values are compared as the per-row encoder returns them, in x's dtype (for bf16 / fp16 inputs the
cut sees the rounded values; ties that rounding makes go to the lower (row, feature)). The output is
padded rows (vals [B, k_max] in x's dtype, descending; idx [B, k_max] int64) with k_max the largest
row's count this batch (at least 1): shorter rows end in zeros at the lowest features they do not
hold, as the per-row encoder fills rows short of positive values, so the sparse decode and its
backward take them as they are. The data-dependent sizes (survivors, k_max) read the device.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .reference import math_dtype

# Candidates per row for k selected per row on average: BatchTopK rows rarely hold more than a few k.
CANDIDATES_PER_K = 4
# Most pre-activations one chunk of the saturated rows' search holds (4M: 16 MiB in fp32).
CHUNK_ELEMENTS = 1 << 22

RowEncoder = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def candidate_count(k: int, n_features: int, max_k: int | None = None) -> int:
    """K: the candidates per row for an average of k per row (at most F, and at most ``max_k`` when given)."""
    count = min(n_features, CANDIDATES_PER_K * k)
    return count if max_k is None else max(1, min(count, max_k))


def batch_topk(
    encode: RowEncoder, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
    b_pre: torch.Tensor | None = None, *, candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The B * k largest positive entries of ``relu((x - b_pre) @ W_enc.T + b_enc)`` over the batch.

    ``encode``: a backend's per-row ``topk_encode``; ``candidates``: K per row (see the module
    docstring). Returns zero-padded (vals [B, k_max], idx [B, k_max]).
    """
    n_tokens, n_features = x.shape[0], W_enc.shape[0]
    budget = n_tokens * k
    vals, idx = encode(x, W_enc, b_enc, candidates, b_pre)
    flat = vals.reshape(-1)
    # With fewer candidates than the budget (K < k) only 0 bounds the cut; only positives are ever chosen.
    cut = torch.clamp_min(flat.topk(budget).values[-1], 0) if flat.numel() >= budget else flat.new_zeros(())
    pool = _pool(x, W_enc, b_enc, b_pre, vals, idx, cut, inclusive=True)
    rows, cols, values = pool
    keep = _top_positive(rows, cols, values, budget, n_features)
    return pad_rows(rows[keep], cols[keep], values[keep], n_tokens, n_features)


def above_threshold(
    encode: RowEncoder, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: float,
    b_pre: torch.Tensor | None = None, *, candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every entry of ``relu((x - b_pre) @ W_enc.T + b_enc)`` strictly above ``threshold`` (>= 0): JumpReLU.

    ``encode`` and ``candidates`` as in `batch_topk`. Returns zero-padded (vals [B, k_max], idx [B, k_max]).
    """
    n_tokens, n_features = x.shape[0], W_enc.shape[0]
    vals, idx = encode(x, W_enc, b_enc, candidates, b_pre)
    cut = torch.tensor(float(threshold), dtype=vals.dtype, device=vals.device)
    rows, cols, values = _pool(x, W_enc, b_enc, b_pre, vals, idx, cut, inclusive=False)
    keep = values > cut
    return pad_rows(rows[keep], cols[keep], values[keep], n_tokens, n_features)


def _pool(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor | None,
    vals: torch.Tensor, idx: torch.Tensor, cut: torch.Tensor, *, inclusive: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat (rows, features, values) holding every positive entry at (``inclusive``) or above ``cut``:
    the candidates of the rows whose K-th candidate is below it, and the search of the other rows."""
    n_tokens, n_cand = vals.shape
    last = vals[:, -1]
    saturated = ((last >= cut) if inclusive else (last > cut)) & (last > 0) if n_cand < W_enc.shape[0] else None
    rows = torch.arange(n_tokens, device=vals.device).unsqueeze(1).expand(-1, n_cand)
    if saturated is None or not bool(saturated.any()):
        return rows.reshape(-1), idx.reshape(-1), vals.reshape(-1)
    kept = ~saturated
    searched = saturated.nonzero().squeeze(1)
    more = entries_beyond(x[searched], W_enc, b_enc, b_pre, cut, inclusive=inclusive)
    return (torch.cat([rows[kept].reshape(-1), searched[more[0]]]), torch.cat([idx[kept].reshape(-1), more[1]]),
            torch.cat([vals[kept].reshape(-1), more[2]]))


def entries_beyond(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor | None, cut: torch.Tensor,
    *, inclusive: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every positive entry of ``relu((x - b_pre) @ W_enc.T + b_enc)`` (x [S, d]) at or above (``inclusive``)
    or above ``cut``, in x's dtype: flat (rows, features, values), features swept in chunks."""
    math = math_dtype(x)
    xc = x.to(math) if b_pre is None else x.to(math) - b_pre.to(math)
    chunk = max(1, CHUNK_ELEMENTS // max(x.shape[0], 1))
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for start in range(0, W_enc.shape[0], chunk):
        stop = min(start + chunk, W_enc.shape[0])
        pre = torch.addmm(b_enc[start:stop].to(math), xc, W_enc[start:stop].to(math).T).to(x.dtype)
        hit = ((pre >= cut) if inclusive else (pre > cut)) & (pre > 0)
        rows, cols = hit.nonzero(as_tuple=True)
        found.append((rows, cols + start, pre[rows, cols]))
    return tuple(torch.cat(parts) for parts in zip(*found))  # type: ignore[return-value]


def _top_positive(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, budget: int, n_features: int
) -> torch.Tensor:
    """bool mask of the ``budget`` largest positive values (all positives when fewer), ties at the last
    value to the lower (row, feature)."""
    positive = values > 0
    n_positive = int(positive.sum())
    if n_positive <= budget:
        return positive
    last = values[positive].topk(budget).values[-1]
    above = values > last
    tied = (values == last).nonzero().squeeze(1)
    order = torch.argsort(rows[tied] * n_features + cols[tied])  # (row, feature) ascending
    keep = above.clone()
    keep[tied[order[: budget - int(above.sum())]]] = True
    return keep


def pad_rows(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_tokens: int, n_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen entries (flat rows, features, values) -> zero-padded (vals [B, k_max], idx [B, k_max] int64):
    each row descending by value, ties to the lower feature; k_max the largest row's count (at least 1),
    and a row's empty slots hold zeros at the lowest features it does not hold."""
    order = torch.argsort(cols, stable=True)
    order = order[torch.argsort(values[order], descending=True, stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    rows, cols, values = rows[order], cols[order], values[order]
    counts = torch.bincount(rows, minlength=n_tokens)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    vals = values.new_zeros(n_tokens, width)
    idx = torch.zeros(n_tokens, width, dtype=torch.int64, device=rows.device)
    vals[rows, slot] = values
    idx[rows, slot] = cols
    empty = torch.arange(width, device=rows.device) >= counts.unsqueeze(1)
    return vals, fill_lowest_unchosen(idx, empty, n_features)


def fill_lowest_unchosen(idx: torch.Tensor, empty: torch.Tensor, n_features: int) -> torch.Tensor:
    """idx [B, w] with the ``empty`` slots (bool [B, w], each row's last slots) replaced, in ascending
    order, by the lowest features the row's other slots do not hold (at most 2w are searched)."""
    n_tokens, width = idx.shape
    pool = min(n_features, 2 * width)
    taken = torch.zeros(n_tokens, pool + 1, dtype=torch.uint8, device=idx.device)
    taken.scatter_(1, torch.where(~empty & (idx < pool), idx, pool), 1)
    free = torch.argsort(taken[:, :pool], dim=1, stable=True)  # the untaken features first, ascending
    n_chosen = (~empty).sum(1, keepdim=True)
    fillers = free.gather(1, (torch.arange(width, device=idx.device) - n_chosen).clamp_(0, pool - 1))
    return torch.where(empty, fillers, idx)
