"""Grouping (token, slot) pairs by feature with static sizes, against a plain-Python reference."""
from __future__ import annotations

import pytest
import torch

from flashsae.kernels.pairs import group_pairs, unique_rows


def reference_groups(idx: torch.Tensor, fired: torch.Tensor) -> dict[int, list[int]]:
    """feature -> ascending flat positions t * k + j of its fired pairs."""
    out: dict[int, list[int]] = {}
    k = idx.shape[1]
    for t, row in enumerate(idx.tolist()):
        for j, f in enumerate(row):
            if fired[t, j]:
                out.setdefault(f, []).append(t * k + j)
    return dict(sorted(out.items()))


def selection(B: int, k: int, F: int, seed: int, fire: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct features per token, drawn so that some repeat across many tokens; fired with probability ``fire``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(B)]) if B else torch.zeros(0, k, dtype=torch.long)
    if B > 2:
        idx[: B // 2, 0] = 3 % F  # one feature fired by many tokens
    return idx, torch.rand(B, k, generator=g) < fire


@pytest.mark.parametrize(
    "B,k,F",
    [(9, 4, 1000), (64, 8, 20), (5, 1, 3), (1, 7, 7), (0, 4, 10), (33, 33, 50)],
    ids=["sparse", "more-pairs-than-features", "k1", "one-token", "no-tokens", "k-equals-B"],
)
def test_groups_match_a_plain_python_grouping(B, k, F):
    idx, fired = selection(B, k, F, seed=B + k + F)
    ref = reference_groups(idx, fired)
    groups = group_pairs(idx, fired, F)
    n_slots = min(B * k, F)
    assert groups.n_slots == n_slots and groups.k == k
    assert int(groups.n_rows) == len(ref)
    assert groups.rows.tolist() == list(ref) + [0] * (n_slots - len(ref))
    assert groups.valid.tolist() == [True] * len(ref) + [False] * (n_slots - len(ref))
    n_fired = int(fired.sum())
    for u, (feature, positions) in enumerate(ref.items()):
        lo, hi = groups.offsets[u], groups.offsets[u + 1]
        assert groups.pairs[lo:hi].tolist() == positions, feature
        assert (groups.segment[lo:hi] == u).all() and groups.fired[lo:hi].all()
    assert (groups.offsets[len(ref):] == n_fired).all(), "padding slots own no pairs"
    assert not groups.fired[n_fired:].any()
    assert sorted(groups.pairs.tolist()) == list(range(B * k)), "every pair appears once"


def test_no_fired_pair_gives_only_padding():
    idx, _ = selection(6, 3, 40, seed=1)
    groups = group_pairs(idx, torch.zeros(6, 3, dtype=torch.bool), 40)
    assert int(groups.n_rows) == 0 and not groups.valid.any() and not groups.rows.any()
    assert not groups.offsets.any()


def test_a_single_feature_with_a_token_that_did_not_fire():
    idx = torch.zeros(3, 1, dtype=torch.int64)
    groups = group_pairs(idx, torch.tensor([[True], [False], [True]]), 1)
    assert groups.rows.tolist() == [0] and groups.valid.tolist() == [True] and groups.offsets.tolist() == [0, 2]
    assert groups.segment.tolist() == [0, 0, 0] and groups.pairs[:2].tolist() == [0, 2]


# (entries, rows, fraction valid): some valid, all valid and distinct, all valid with repeats.
@pytest.mark.parametrize("n,N,fraction", [(0, 5, 0.6), (7, 100, 0.6), (40, 9, 0.6), (25, 25, 0.6),
                                          (7, 100, 1.0), (6, 3, 1.0)])
def test_unique_rows_are_the_sorted_distinct_valid_entries(n, N, fraction):
    g = torch.Generator().manual_seed(n + N)
    rows = torch.randint(0, N, (n,), generator=g)
    valid = torch.rand(n, generator=g) < fraction
    unique, slot_valid = unique_rows(rows, valid, N)
    expected = sorted(set(rows[valid].tolist()))
    assert unique.shape == slot_valid.shape == (min(n, N),)
    assert unique[slot_valid].tolist() == expected
    assert (unique[~slot_valid] == N).all()
    if expected:
        assert torch.equal(unique[torch.searchsorted(unique, rows[valid])], rows[valid])
