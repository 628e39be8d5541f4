"""The packed top-k key format (`flashsae.kernels.keys`): round trip, order, the ReLU and NaN policy, the empty key."""
from __future__ import annotations

import pytest
import torch

from flashsae.kernels.keys import EMPTY_KEY, INDEX_MASK, pack_keys, unpack_keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_keys_round_trip_and_sort_by_value_then_the_lower_index(dtype):
    g = torch.Generator().manual_seed(1)
    # Many ties (a few distinct values), zeros, negatives, -0.0, infinities and NaN, at indices up to 2^31 - 1.
    vals = (torch.randint(-3, 4, (5, 300), generator=g) / 4).to(dtype)
    vals[:, 150:] = torch.randn(5, 150, generator=g).to(dtype)  # full mantissas: every low bit of the value
    vals[:, :3] = torch.tensor([-0.0, float("nan"), float("-nan")], dtype=dtype)
    vals[:, 3:6] = torch.tensor([float("inf"), float("-inf"), 2.0**-130], dtype=dtype)
    if dtype == torch.float32:  # the NaN patterns next to +inf's
        vals[:, 8:10] = torch.tensor([0x7F800001, 0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    idx = torch.randint(0, INDEX_MASK + 1, (5, 300), generator=g)
    idx[:, 6:8] = torch.tensor([0, INDEX_MASK])
    assert all(row.unique().numel() == 300 for row in idx), "distinct features per row"
    keys = pack_keys(vals, idx)
    assert keys.dtype == torch.int64 and keys.shape == vals.shape
    relu = torch.nan_to_num(vals.double(), nan=0.0).clamp_min(0.0).to(torch.float32) + 0.0  # -0.0 -> +0.0
    got_vals, got_idx = unpack_keys(keys)
    assert got_vals.dtype == torch.float32 and got_idx.dtype == torch.int64
    assert torch.equal(got_idx, idx)
    assert torch.equal(got_vals, relu) and not torch.signbit(got_vals).any(), "relu, NaN and -0.0 pack as +0.0"
    # Descending keys = descending values, ties to the lower index (a stable sort of index-sorted entries).
    by_index = idx.argsort(dim=1)
    ordered = by_index.gather(1, relu.double().gather(1, by_index).argsort(dim=1, descending=True, stable=True))
    assert torch.equal(keys.argsort(dim=1, descending=True), ordered)
    assert (keys >= 0).all() and (keys > EMPTY_KEY).all(), "every real key, a zero's included, lies above the empty key"
    # The documented layout: relu(value)'s fp32 bits above, 2^31 - 1 - index below.
    assert torch.equal(keys, (relu.view(torch.int32).to(torch.int64) << 32) | ((1 << 31) - 1 - idx))


def test_the_empty_key_unpacks_to_nothing_selectable():
    vals, idx = unpack_keys(torch.tensor([EMPTY_KEY]))
    assert torch.isnan(vals).all() or (vals < 0).all() or torch.signbit(vals).all()
    assert pack_keys(torch.zeros(1), torch.tensor([INDEX_MASK])).item() == 0, "the smallest real key is 0"

