"""Every backend's encoder against one float64 oracle: shapes, dtypes, any k, ties, adversarial orders, NaN.

The Triton encoders run in the interpreter and poison their candidate lists first. Random inputs are
checked up to fp32 accumulation order (`assert_exact_topk`); dyadic inputs, whose pre-activations
every backend computes exactly, must give the reference's exact answer, ties to the lower index.
"""
from __future__ import annotations

import pytest
import torch

from flashsae import ops
from flashsae.kernels import chunked_encode, fused_encode
from tests.encoder_checks import (
    BACKENDS,
    BF16,
    ENCODERS,
    FP16,
    FP32,
    FP64,
    assert_exact_topk,
    assert_reference_order,
    dense_float64,
    family,
    make_dyadic_inputs,
    make_inputs,
)

# (B, d, F, k, dtype, with b_pre): odd B, d, F; every dtype crossed with shapes and several k.
CASES = [
    (1, 16, 100, 1, FP32, False),
    (7, 40, 1000, 5, FP32, True),
    (13, 96, 2051, 32, FP32, False),
    (64, 96, 4099, 32, FP32, False),
    (7, 16, 1027, 64, BF16, True),
    (7, 16, 4099, 64, BF16, True),
    (21, 40, 100, 32, BF16, False),
    (64, 40, 100, 32, BF16, False),
    (1, 96, 1000, 1, BF16, True),
    (7, 33, 100, 64, FP16, False),
    (7, 96, 100, 64, FP16, False),
    (3, 40, 777, 5, FP16, True),
    (1, 40, 4099, 5, FP16, True),
    (64, 16, 1000, 64, FP16, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,d,F,k,dtype,with_pre", CASES)
def test_random_inputs_match_float64_topk(backend, B, d, F, k, dtype, with_pre):
    x, W, b, b_pre = make_inputs(B, d, F, dtype, seed=B * 1000 + d + F + k, with_pre=with_pre)
    vals, idx = ENCODERS[backend](x, W, b, k, b_pre)
    assert_exact_topk(vals, idx, x, W, b, b_pre, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
def test_dyadic_inputs_give_the_reference_exactly(backend, dtype):
    x, W, b, b_pre = make_dyadic_inputs(9, 24, 1500, dtype, seed=5)
    vals, idx = ENCODERS[backend](x, W, b, 37, b_pre)
    assert_reference_order(vals, idx, x, W, b, b_pre, 37)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [512, 700, 1499, 1500])
def test_large_k_up_to_k_equal_to_f(backend, k):
    x, W, b, b_pre = make_dyadic_inputs(3, 16, 1500, FP32, seed=k)
    vals, idx = ENCODERS[backend](x, W, b, k, b_pre)
    assert_reference_order(vals, idx, x, W, b, b_pre, k)
    if k == 1500:
        assert torch.equal(idx.sort(dim=1).values, torch.arange(1500).expand(3, 1500))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_values_select_the_lowest_indices(backend):
    B, d, F, k = 5, 8, 900, 40
    x = torch.ones(B, d)
    W = torch.full((F, d), 0.25)
    b = torch.full((F,), 0.5)
    vals, idx = ENCODERS[backend](x, W, b, k, None)
    assert torch.equal(idx, torch.arange(k).expand(B, k))
    assert (vals == 2.5).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_ascending_features_raise_the_floor_late(backend, dtype):
    """Each feature beats every earlier one, so every element survives its floor and the candidate
    lists overflow again and again: the exact compaction path on every tile."""
    B, d, F, k = 6, 8, 1800, 20
    x, W, _, _ = make_inputs(B, d, F, dtype, seed=3)
    W = (W * 1e-3).to(dtype)
    b = torch.arange(F, dtype=torch.float32).to(dtype)
    vals, idx = ENCODERS[backend](x, W, b, k, None)
    assert_exact_topk(vals, idx, x, W, b, None, k)
    if dtype == FP32:  # (bf16 rounds the bias to steps of 8 here)
        assert torch.equal(idx, torch.arange(F - 1, F - 1 - k, -1).expand(B, k))


def test_chunked_lists_overflow_with_little_headroom_and_many_slices():
    x, W, b, b_pre = make_dyadic_inputs(11, 16, 2000, FP32, seed=8)
    b = b + torch.arange(2000) / 512  # the floor rises through the whole sweep (still exact in fp32)
    for n_slices in (1, 3, 7):
        vals, idx = chunked_encode.topk_encode(x, W, b, 9, b_pre, headroom=1, n_slices=n_slices, poison=True)
        assert_reference_order(vals, idx, x, W, b, b_pre, 9)


@pytest.mark.parametrize("buffer_bytes", [1, 4 * 11 * 64, 4 * 11 * 300])
def test_chunked_buffer_smaller_than_one_chunk_still_covers_every_feature(buffer_bytes):
    x, W, b, b_pre = make_dyadic_inputs(11, 16, 1000, FP32, seed=9)
    vals, idx = chunked_encode.topk_encode(x, W, b, 17, b_pre, buffer_bytes=buffer_bytes, poison=True)
    assert_reference_order(vals, idx, x, W, b, b_pre, 17)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_rows_without_enough_positives_fill_zeros_at_lowest_indices(backend, dtype):
    B, d, F, k = 5, 16, 1000, 6
    x, W, b, _ = make_inputs(B, d, F, dtype, seed=5)
    W = W * 0.01
    b = torch.full((F,), -10.0, dtype=dtype)
    b[[700, 2]] = torch.tensor([5.0, 3.0], dtype=dtype)  # exactly two positives per row ...
    x[1] = 0.0
    vals, idx = ENCODERS[backend](x, W, b, k, None)
    assert torch.equal(idx, torch.tensor([700, 2, 0, 1, 3, 4]).expand(B, k))
    assert (vals[:, :2] > 0).all() and (vals[:, 2:] == 0).all()
    b[[700, 2]] = -10.0  # ... and none at all, over one feature range or slice and over two
    split = {"torch": {"chunk_size": 500}, "triton": {"n_slices": 2}, "triton-fused": {"n_ranges": 2}}[family(backend)]
    for options in ({}, split):
        vals, idx = ENCODERS[backend](x, W, b, k, None, **options)
        assert torch.equal(idx, torch.arange(k).expand(B, k))
        assert (vals == 0).all() and not torch.signbit(vals).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_index_across_tiles_slices_and_ranges(backend):
    B, d, F, k = 6, 32, 1500, 7
    x, W, b, b_pre = make_dyadic_inputs(B, d, F, FP32, seed=11)
    twins = [3, 130, 600, 1100, 1499]  # other tiles, other slices / ranges, the last feature
    W[twins] = W[twins[0]].clone()
    b[twins] = 200.0  # above every other feature: the twins are the top 5 of every row
    W[[1200, 1201, 40]] = W[5].clone()  # a second tie group among the rest
    b[[1200, 1201, 40]] = b[5].item()
    pre, _ = dense_float64(x, W, b, b_pre)
    assert (pre.topk(k + 1, dim=1).values.diff(dim=1) == 0).any(), "the test needs ties among the rest"
    splits = {"torch": [{}, {"chunk_size": 97}], "triton": [{"n_slices": 1}, {"n_slices": 5}],
              "triton-fused": [{"n_ranges": 1}, {"n_ranges": 3}]}[family(backend)]
    for split in splits:
        vals, idx = ENCODERS[backend](x, W, b, k, b_pre, **split)
        assert torch.equal(idx[:, :5], torch.tensor(twins).expand(B, 5))
        assert_reference_order(vals, idx, x, W, b, b_pre, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_pre_activations_count_as_minus_infinity(backend):
    """A NaN pre-activation (here from NaN weights) is never selected as firing, and counts as a zero
    for rows that fill up with zeros; the answer is the same on every backend."""
    B, d, F, k = 4, 8, 600, 5
    x, W, b, _ = make_dyadic_inputs(B, d, F, FP32, seed=12)
    W[[0, 17, 300]] = float("nan")
    b[[1, 299]] = float("nan")
    b[[17, 300]] = 1e6  # would be the top two if they were not NaN
    vals, idx = ENCODERS[backend](x, W, b, k, None)
    assert_reference_order(vals, idx, x, W, b, None, k)
    assert not torch.isin(idx, torch.tensor([0, 1, 17, 299, 300])).any()
    b.fill_(-50.0)  # no positives: zero fill, and the NaN features count among the zeros
    vals, idx = ENCODERS[backend](x, W, b, k, None)
    assert torch.equal(idx, torch.arange(k).expand(B, k)) and (vals == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [384, 768, 4096])
def test_production_widths_with_a_few_rows(backend, d):
    x, W, b, b_pre = make_inputs(3, d, 300, BF16, seed=d)
    vals, idx = ENCODERS[backend](x, W, b, 32, b_pre)
    assert_exact_topk(vals, idx, x, W, b, b_pre, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_give_empty_outputs(backend):
    x, W, b, b_pre = make_inputs(0, 16, 50, BF16, seed=1)
    vals, idx = ENCODERS[backend](x, W, b, 7, b_pre)
    assert vals.shape == idx.shape == (0, 7) and vals.dtype == BF16 and idx.dtype == torch.int64


@pytest.mark.parametrize("static", [False, True], ids=["torch-threshold-select", "torch-static"])
def test_float64_on_the_torch_backend_is_exact_in_float64(static):
    from flashsae.kernels import torch_encode

    x, W, b, b_pre = make_inputs(9, 40, 1000, FP64, seed=6)
    b[10] = b[11] = 5.0  # a float64 tie
    W[11] = W[10]
    vals, idx = torch_encode.topk_encode(x, W, b, 12, b_pre, chunk_size=300, static=static)
    assert vals.dtype == FP64
    assert_reference_order(vals, idx, x, W, b, b_pre, 12)


@pytest.mark.parametrize("static", [False, True], ids=["torch-threshold-select", "torch-static"])
@pytest.mark.parametrize("k,chunk_size", [(1, 5), (2, 7), (5, 13)])
def test_float64_floor_is_the_kth_best_kept_so_far(static, k, chunk_size):
    """Small chunks and small k: a row's k-th best often comes after its k - 1 better features, in a
    later chunk, where it must beat the floor (the k-th best kept so far, not the (k-1)-th)."""
    from flashsae.kernels import torch_encode

    x, W, b, b_pre = make_inputs(9, 40, 300, FP64, seed=60 + k)
    vals, idx = torch_encode.topk_encode(x, W, b, k, b_pre, chunk_size=chunk_size, static=static)
    assert_reference_order(vals, idx, x, W, b, b_pre, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("F,split", [(20, False), (200, True)])
def test_k_equal_to_f_with_few_or_no_positives_fills_every_feature_once(backend, F, split):
    """k = F: a row with no positive pre-activation takes every feature in ascending order, the last
    one included; a row with one positive takes it first, then every other feature ascending. Split
    over two slices / ranges / chunks, every zero at a boundary must come from its own part, once."""
    B, d = 3, 16
    x, W, _, _ = make_inputs(B, d, F, FP32, seed=21)
    W = W * 0.01
    b = torch.full((F,), -10.0)
    options = {"torch": {"chunk_size": 64}, "triton": {"n_slices": 2}, "triton-fused": {"n_ranges": 2}}[family(backend)]
    options = options if split else {}
    vals, idx = ENCODERS[backend](x, W, b, F, None, **options)
    assert torch.equal(idx, torch.arange(F).expand(B, F)) and (vals == 0).all()
    b[7] = 10.0
    vals, idx = ENCODERS[backend](x, W, b, F, None, **options)
    assert torch.equal(idx, torch.tensor([7, *range(7), *range(8, F)]).expand(B, F))
    assert (vals[:, 0] > 0).all() and (vals[:, 1:] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "triton-fused"])
def test_triton_backends_reject_float64_naming_the_argument(backend):
    x, W, b, _ = make_inputs(3, 8, 20, FP64, seed=2)
    with pytest.raises(TypeError, match=rf"x is float64, which backend '{backend}' does not take"):
        ops.topk_encode(x, W, b, 3, backend=backend)
    with pytest.raises(TypeError, match=rf"vals is float64, which backend '{backend}' does not take"):
        ops.sparse_decode(x[:, :3], torch.zeros(3, 3, dtype=torch.long), W, b[:8], backend=backend)


def test_fused_plan_fills_whole_waves_and_bounds_the_lists():
    for n_tokens, n_features, d, k in [(4096, 2**20, 4096, 64), (4096, 2**20, 768, 32), (8, 2**20, 768, 512),
                                       (1, 100, 16, 1), (4096, 2**16, 4096, 64)]:
        plan = fused_encode.encode_plan(n_tokens, n_features, d, k, n_sms=132)
        assert plan["range_len"] % fused_encode.RANGE_ALIGN == 0
        assert (plan["n_ranges"] - 1) * plan["range_len"] < n_features <= plan["n_ranges"] * plan["range_len"]
        assert plan["n_ranges"] * plan["capacity"] <= max(fused_encode.MAX_LIST_KEYS_PER_ROW, plan["capacity"])
        assert plan["capacity"] >= k + 128
        if plan["programs"] >= 132:
            assert plan["programs"] / (plan["waves"] * 132) >= 0.9, plan
    plan = fused_encode.encode_plan(4096, 2**20, 4096, 64, n_sms=132)
    assert plan["programs"] % 132 == 0, "the headline grid is whole waves"


def test_chunked_plan_bounds_the_buffer_and_fills_the_grid():
    plan = chunked_encode.select_plan(4096, 2**20, 64, n_sms=132)
    assert 4 * 4096 * plan.chunk <= chunked_encode.DEFAULT_BUFFER_BYTES
    for n_tokens, buffer_bytes in [(4096, chunked_encode.DEFAULT_BUFFER_BYTES), (1, 4000), (3, 4 * 3 * 700)]:
        fitted = chunked_encode.select_plan(n_tokens, 2**20, 64, buffer_bytes=buffer_bytes)
        bn = fitted.blocks["BN"]  # the widest whole number of tiles whose fp32 chunk fits the buffer
        assert fitted.chunk % bn == 0 and 4 * n_tokens * fitted.chunk <= buffer_bytes < 4 * n_tokens * (fitted.chunk + bn)
    assert plan.capacity >= 64 + plan.blocks["BN"] and plan.capacity % plan.blocks["BL"] == 0
    small = chunked_encode.select_plan(16, 2**20, 64, n_sms=132)
    token_blocks = -(-16 // small.blocks["BM"])
    assert token_blocks * small.n_slices >= 132, "slices fill the GPU when B is small"
    assert small.slice_len % small.blocks["BN"] == 0 and small.n_slices * small.slice_len >= small.chunk
    tiny = chunked_encode.select_plan(4096, 2**20, 64, buffer_bytes=1)
    assert tiny.chunk == tiny.blocks["BN"]
    lists = chunked_encode._Lists(small, torch.zeros(2**20), 64, 16, poison=False)
    assert small.list_bytes(16) == lists.keys.nbytes, "list_bytes is the size of the candidate lists"


@pytest.mark.parametrize("dtype", [FP32, BF16, FP64])
@pytest.mark.parametrize("chunk_size", [None, 7, 97])
def test_static_torch_encoder_equals_the_threshold_select(dtype, chunk_size):
    """The torch backend's static variant (every device but the CPU: no host sync) gives the same answer."""
    from flashsae.kernels import torch_encode

    x, W, b, b_pre = make_dyadic_inputs(9, 16, 700, dtype, seed=31)
    W[[3, 400]] = float("nan")
    for k in (1, 20, 700):
        got = torch_encode.topk_encode(x, W, b, k, b_pre, chunk_size=chunk_size, static=True)
        ref = torch_encode.topk_encode(x, W, b, k, b_pre, chunk_size=chunk_size, static=False)
        assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])
        assert_reference_order(*got, x, W, b, b_pre, k)


def test_static_torch_encoder_never_synchronizes():
    from flashsae.kernels import torch_encode
    from tests.sync_guard import SyncGuard

    x, W, b, b_pre = make_inputs(9, 16, 700, FP32, seed=32)
    with SyncGuard():
        torch_encode.topk_encode(x, W, b, 20, b_pre, chunk_size=128, static=True)


@pytest.mark.parametrize("backend", ["triton", "triton-fused"])
def test_lists_compacted_on_almost_every_tile_stay_exact(backend):
    """A small case whose candidate lists overflow again and again (a rising floor: every element survives
    until its list is compacted), each token's features split over two slices / ranges. Every value is at
    least 2 (the key's top value bit is set), winners sit early in the sweep (their old copies stay in the
    list's tail after a compaction), and the chunked lists have no slack: a compaction must keep exactly k."""
    x, W, b, b_pre = make_dyadic_inputs(3, 8, 640, FP32, seed=14)
    W = W / 64  # small products: the bias sets the order
    b = 4 + torch.arange(640) / 256  # the floor rises through the whole sweep (still exact in fp32)
    winners = [5, 20, 40, 73, 100, 137, 200, 233, 250]  # as many as the fused k: a tied winner is its k-th key
    b[winners] = 40.0
    k, split = {"triton": (64, {"n_slices": 2, "headroom": 1}), "triton-fused": (9, {"n_ranges": 2})}[backend]
    vals, idx = ENCODERS[backend](x, W, b, k, b_pre, **split)
    assert_reference_order(vals, idx, x, W, b, b_pre, k)
    assert torch.equal(idx[:, :9].sort(dim=1).values, torch.tensor(winners).expand(3, 9))


@pytest.mark.parametrize("backend", ["triton", "triton-fused"])
def test_a_compaction_that_leaves_no_survivor_keeps_all_k_best(backend):
    """The k best features come first, then many small positive ones: they fill the lists until a
    compaction raises the floor to the k-th best, above every later value. Nothing is appended after
    that compaction, so the k keys it keeps (the k-th included) are the answer; the search for the
    k-th key must read only the list's own keys (the slots past its count hold poison)."""
    B, d, F, k = 3, 8, 1200, 5
    x, W, _, _ = make_dyadic_inputs(B, d, F, FP32, seed=15)
    W = W / 64  # small products: the bias sets the order
    b = 1 + torch.arange(F) / 1024  # positive and below the k best
    b[:k] = 64.0 - torch.arange(k)
    b[k::4] = -1.0  # never positive: a list's count at its compaction is not a multiple of the tile width
    one_list = {"triton": {"n_slices": 1, "headroom": 1}, "triton-fused": {"n_ranges": 1}}[backend]
    vals, idx = ENCODERS[backend](x, W, b, k, None, **one_list)
    assert_reference_order(vals, idx, x, W, b, None, k)
    assert torch.equal(idx, torch.arange(k).expand(B, k))


def test_a_second_compaction_reads_only_the_lists_own_keys():
    """One list of 128 keys (two tiles of 64 features), k = 5. The first 128 features fill it; the
    next tile compacts it to the 5 best (features 100-104, whose old copies stay in slots 100-104).
    Five tiles then append 19 keys each above the floor, bringing the count to 100, and a sixth
    tile's 29 keys above the floor force a second compaction at count 100: a search for the k-th
    key that read slot 100 (a stale copy of feature 100, the best) would count it twice, keep four
    keys and raise the floor above the sixth tile's values, which are then never appended."""
    B, d, F, k = 2, 8, 640, 5
    plan = chunked_encode.select_plan(B, F, k, n_slices=1, headroom=1)
    assert (plan.capacity, plan.blocks["BN"], plan.blocks["BL"]) == (128, 64, 64), "the test is laid out for this plan"
    x, W, _, _ = make_dyadic_inputs(B, d, F, FP32, seed=16)
    W = W / 4096  # tiny products: the bias sets the order
    b = torch.full((F,), 0.5)
    b[:128] = 1.0
    b[100:105] = torch.tensor([64.0, 63.0, 62.0, 61.0, 60.0])
    for tile in range(5):
        start = 128 + 64 * tile
        b[start : start + 19] = 61 + (19 * tile + torch.arange(19)) / 64
    b[448:477] = 60.5
    vals, idx = ENCODERS["triton"](x, W, b, k, None, n_slices=1, headroom=1)
    assert_reference_order(vals, idx, x, W, b, None, k)
    assert idx[:, :2].tolist() == [[100, 101]] * B


def test_a_compaction_at_a_tie_keeps_exactly_k_keys_and_the_list_room_for_a_tile():
    """Lists of 128 keys = k + BN (k = 64, tiles of 64 features). Features 0-127 fill them: feature 0 is
    the best (its key in slot 0), and the k-th and (k+1)-th best (features 64 and 65) tie. The next tile
    compacts the lists and appends all its 64 features (above the floor, below the best of the first
    128): a compaction that kept a (k+1)-th key (the tied one, or any after a count that missed slot 0)
    would write one key past its list, into the next token's best key."""
    B, d, F, k = 3, 8, 256, 64
    plan = chunked_encode.select_plan(B, F, k, n_slices=1, headroom=1)
    assert (plan.capacity, plan.blocks["BN"]) == (128, 64), "the test is laid out for this plan"
    x, W, _, _ = make_dyadic_inputs(B, d, F, FP32, seed=17)
    W = W / 4096  # tiny products: the bias sets the order
    b = torch.full((F,), 0.5)
    b[:128] = 10 + torch.arange(128) / 64
    b[0] = 12.5
    b[65], W[65] = b[64], W[64]  # the tie
    b[128:192] = 11.02 + torch.arange(64) / 1024
    vals, idx = ENCODERS["triton"](x, W, b, k, None, n_slices=1, headroom=1)
    assert_reference_order(vals, idx, x, W, b, None, k)
    assert (idx[:, 0] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "triton-fused"])
def test_a_tile_with_a_single_survivor_appends_it(backend):
    """k = 1, one token: 1.0 everywhere fills the list, a compaction raises the floor to 1.0, and the one
    feature above it (2.0) is alone in its tile: it must be appended and chosen."""
    x, W, _, _ = make_dyadic_inputs(1, 8, 300, FP32, seed=18)
    b = torch.ones(300)
    b[200] = 2.0
    one_list = {"triton": {"n_slices": 1, "headroom": 1}, "triton-fused": {"n_ranges": 1}}[backend]
    vals, idx = ENCODERS[backend](x, W * 0, b, 1, None, **one_list)
    assert idx.tolist() == [[200]] and vals.tolist() == [[2.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_infinite_pre_activation_is_the_largest(backend):
    """+inf survives the ReLU as +inf (its bit pattern is the largest non-NaN one) and is selected first."""
    x, W, b, _ = make_dyadic_inputs(3, 8, 300, FP32, seed=13)
    b[[40, 250]] = float("inf")
    vals, idx = ENCODERS[backend](x, W, b, 4, None)
    assert_reference_order(vals, idx, x, W, b, None, 4)
    assert torch.equal(idx[:, :2], torch.tensor([40, 250]).expand(3, 2)) and torch.isinf(vals[:, :2]).all()


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("n_features,d", [(1, 16), (37, 40), (300, 768), (1024, 130)])
def test_fold_pre_bias_matches_float64_and_writes_only_its_output(dtype, n_features, d):
    """``b_enc - W_enc @ b_pre`` against float64, written into a slice of a poisoned buffer: every output
    element is written, and the guard elements on both sides (the kernel's edge rows) keep their poison."""
    from flashsae.kernels import triton_common

    g = torch.Generator().manual_seed(n_features + d)
    W, b, b_pre = (torch.randn(*shape, generator=g).to(dtype) for shape in ((n_features, d), (n_features,), (d,)))
    guarded = torch.full((n_features + 2,), float("nan"))
    got = triton_common.fold_pre_bias(W, b, b_pre, out=guarded[1:-1])
    want = b.double() - W.double() @ b_pre.double()
    scale = (W.double().abs() @ b_pre.double().abs() + b.double().abs()).max().item()
    assert got.data_ptr() == guarded[1:].data_ptr() and torch.isfinite(got).all()
    assert (got.double() - want).abs().max().item() <= 1e-5 * max(scale, 1.0)
    assert guarded[0].isnan() and guarded[-1].isnan(), "the kernel wrote outside its output"



@pytest.mark.parametrize("static", [False, True], ids=["torch-threshold-select", "torch-static"])
def test_a_later_chunks_last_column_just_above_the_floor_is_chosen(static):
    """k = 1 over two chunks of 9 features (one group of 8 and a last column compared on its own): the
    first chunk's best (1.0) sets the floor; the second chunk's last column holds the next float above
    it, which must win (a select that dropped values equal to its threshold, nextafter(floor), would not)."""
    from flashsae.kernels import torch_encode

    above = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item()
    W = torch.tensor([1.0] + [0.5] * 8 + [0.25] * 8 + [above])[:, None]
    x, b = torch.ones(1, 1), torch.zeros(18)
    vals, idx = torch_encode.topk_encode(x, W, b, 1, chunk_size=9, static=static)
    assert idx.tolist() == [[17]] and vals.item() == above
