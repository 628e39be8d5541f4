"""Grouping (token, slot) pairs by feature with static sizes: no host synchronization.

A TopK selection names, for each of B tokens, k features; the backward of the encoder and of the
decoder both sum over the pairs that fired (value > 0), per feature. `group_pairs` sorts the B * k
pairs once by feature and returns a `PairGroups`: every size in it is fixed by B, k and F alone
(R = min(B * k, F) row slots), and how many slots are in use is a device tensor. Slots past the
last fired feature are padding: row 0, no pairs (empty ranges), ``valid`` False; the segment sums
write zeros there, so a consumer that adds rows may ignore ``valid``, and one that writes rows
(the optimizer) masks with it. Nothing here calls ``nonzero``, ``unique``, boolean indexing or
``.item()``, so a CUDA stream never waits on the host and the step can be captured in a CUDA graph.

`unique_rows` is the same sort for row lists (merging compact gradients: AuxK plus the main loss,
or the ranks of data parallel). Importing this module never imports triton.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairGroups:
    """The fired (token, slot) pairs of a [B, k] selection, grouped by feature. R = min(B * k, F) slots.

    rows [R] int64: rows[u] is the u-th smallest fired feature for u < n_rows, 0 in padding slots.
    valid [R] bool: u < n_rows. n_rows: 0-d int64 on the device.
    offsets [R + 1] int64: feature rows[u] owns pairs[offsets[u] : offsets[u + 1]] (empty for padding).
    pairs [B * k] int64: flat positions t * k + j, the fired ones first, feature-major and ascending
    within a feature; the pairs that did not fire follow (positions offsets[n_rows] onwards).
    segment [B * k] int64: the slot u of each entry of ``pairs`` (clamped to R - 1 past the fired ones).
    fired [B * k] bool: whether each entry of ``pairs`` fired.
    """

    rows: torch.Tensor
    valid: torch.Tensor
    n_rows: torch.Tensor
    offsets: torch.Tensor
    pairs: torch.Tensor
    segment: torch.Tensor
    fired: torch.Tensor
    k: int

    @property
    def n_slots(self) -> int:
        """R: the number of row slots (a host int, fixed by the shapes)."""
        return self.rows.shape[0]


def segment_starts(sorted_keys: torch.Tensor, sentinel: int, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of equal keys in an ascending key list whose padding entries (== ``sentinel``) come last.

    Returns (segment [N] int64: the run of each entry, clamped to n_slots - 1; offsets [n_slots + 1]
    int64: the first entry of run u, or the number of non-padding entries for every u past the last
    real run; n_runs: 0-d int64, the real runs). Static shapes, no host synchronization.
    """
    n = sorted_keys.shape[0]
    device = sorted_keys.device
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    segment = torch.cumsum(starts, 0) - 1
    real = sorted_keys != sentinel
    n_real = real.sum()
    n_runs = (starts & real).sum()
    slots = torch.arange(n_slots + 1, device=device)
    offsets = torch.searchsorted(segment, slots).clamp_(max=n_real)
    return segment.clamp_(max=max(n_slots - 1, 0)), offsets, n_runs


def group_pairs(idx: torch.Tensor, fired: torch.Tensor, n_features: int) -> PairGroups:
    """Group the fired (token, slot) pairs of idx [B, k] int64 (features < n_features) by feature.

    fired [B, k] bool. One stable sort of the B * k pairs (O(B k log), never O(F)); see `PairGroups`.
    """
    n_tokens, k = idx.shape
    n_pairs = n_tokens * k
    n_slots = min(n_pairs, n_features)
    device = idx.device
    keys = torch.where(fired.reshape(-1), idx.reshape(-1), n_features)
    sorted_keys, pairs = torch.sort(keys, stable=True)
    segment, offsets, n_rows = segment_starts(sorted_keys, n_features, n_slots)
    valid = torch.arange(n_slots, device=device) < n_rows
    first = offsets[:n_slots].clamp(max=max(n_pairs - 1, 0))
    rows = torch.where(valid, sorted_keys.gather(0, first), 0) if n_pairs else first
    return PairGroups(rows, valid, n_rows, offsets, pairs, segment, sorted_keys != n_features, k)


def unique_rows(rows: torch.Tensor, valid: torch.Tensor, n_rows_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted distinct valid entries of rows [N] int64 (each < n_rows_total) in min(N, n_rows_total) slots.

    Returns (unique [S] int64 ascending, ``n_rows_total`` in padding slots; valid [S] bool). Static
    shapes, no host synchronization: `torch.searchsorted(unique, rows)` then finds each valid entry.
    """
    n_slots = min(rows.shape[0], n_rows_total)
    keys = torch.where(valid, rows, n_rows_total)
    sorted_keys = torch.sort(keys).values
    _, offsets, n_unique = segment_starts(sorted_keys, n_rows_total, n_slots)
    slots_valid = torch.arange(n_slots, device=rows.device) < n_unique
    first = offsets[:n_slots].clamp(max=max(rows.shape[0] - 1, 0))
    unique = torch.where(slots_valid, sorted_keys.gather(0, first), n_rows_total) if rows.shape[0] else first
    return unique, slots_valid
