"""Triton fused TopK encoder ("triton-fused") forward: against a float64 dense top-k and the torch backend."""
from __future__ import annotations

import pytest
import torch

from flashsae import ops
from flashsae.kernels import fused_encode as tk
from flashsae.kernels import torch_encode
from tests.encoder_checks import BF16, FP16, FP32, VAL_RTOL, assert_exact_topk, dense_float64, make_dyadic_inputs, make_inputs


@pytest.mark.parametrize("n_ranges", [1, 3])
def test_one_long_range_and_few_ranges_agree_with_float64(n_ranges):
    """One program sweeping all 33 tiles of F keeps filtering by its running k-th key exactly."""
    B, d, F, k = 9, 24, 4099, 33
    x, W, b, b_pre = make_inputs(B, d, F, FP32, seed=n_ranges)
    vals, idx = tk.topk_encode(x, W, b, k, b_pre, n_ranges=n_ranges, poison=True)
    assert_exact_topk(vals, idx, x, W, b, b_pre, k)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_k_512_with_more_features(dtype):
    x, W, b, b_pre = make_inputs(3, 16, 1500, dtype, seed=512)
    vals, idx = tk.topk_encode(x, W, b, 512, b_pre, poison=True)
    assert_exact_topk(vals, idx, x, W, b, b_pre, 512)


def test_k_equal_to_n_features_selects_every_feature():
    x, W, b, b_pre = make_inputs(5, 16, 100, FP16, seed=100)
    vals, idx = tk.topk_encode(x, W, b, 100, b_pre, poison=True)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(100).expand(5, 100))
    assert_exact_topk(vals, idx, x, W, b, b_pre, 100)


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
def test_ties_go_to_the_lower_index_across_tiles_and_ranges(dtype):
    B, d, F, k = 6, 32, 1500, 7
    x, W, b, b_pre = make_dyadic_inputs(B, d, F, dtype, seed=11)
    twins = [3, 130, 600, 1100, 1499]  # other tile, other range (3 ranges of 512), last feature
    W[twins] = W[twins[0]].clone()
    b[twins] = 200.0  # above every other feature: the twins are the top 5 of every row
    W[[1200, 1201, 40]] = W[5].clone()  # a second tie group among the rest
    b[[1200, 1201, 40]] = b[5].item()
    ref_vals, ref_idx = torch_encode.topk_encode(x, W, b, k, b_pre)
    pre, _ = dense_float64(x, W, b, b_pre)
    assert (pre.topk(k + 1, dim=1).values.diff(dim=1) == 0).any(), "the test needs ties among the rest"
    for n_ranges in (1, 3):
        vals, idx = tk.topk_encode(x, W, b, k, b_pre, n_ranges=n_ranges, poison=True)
        assert torch.equal(idx[:, :5], torch.tensor(twins).expand(B, 5))
        assert torch.equal(idx, ref_idx)
        assert torch.equal(vals, ref_vals)


def test_range_lists_hold_only_written_keys_of_their_range():
    x, W, b, _ = make_inputs(19, 16, 1100, FP32, seed=19)
    plan = tk.encode_plan(19, 1100, 16, 3)
    plan.update(n_ranges=3, range_len=384)
    keys, counts = tk.range_lists(x, W, b, 3, plan, poison=True)
    assert keys.shape == (19, 3, plan["capacity"]) and counts.shape == (19, 3)
    assert (counts >= 3).all() and (counts <= plan["capacity"]).all()
    slots = torch.arange(plan["capacity"])
    written = keys[slots < counts.unsqueeze(-1)]
    assert (written >= 0).all() and (written != torch.iinfo(torch.int64).max).all(), "a slot below the count was left unwritten"
    feature = torch.iinfo(torch.int32).max - (keys & 0xFFFFFFFF)
    in_range = (feature >= torch.arange(3)[None, :, None] * 384) & (feature < torch.arange(1, 4)[None, :, None] * 384)
    assert in_range[slots < counts.unsqueeze(-1)].all(), "a list holds a feature of another range"


def test_plan_bounds_lists_and_covers_every_feature():
    for n_tokens, n_features, d, k in [(4096, 2**20, 4096, 64), (4096, 2**20, 768, 32), (8, 2**20, 768, 512), (1, 100, 16, 1),
                                       (64, 2**20, 768, 9000)]:  # (lists of more than MAX_LIST_KEYS_PER_ROW keys: one range)
        plan = tk.encode_plan(n_tokens, n_features, d, k, n_sms=132)
        assert plan["n_ranges"] * plan["capacity"] <= max(tk.MAX_LIST_KEYS_PER_ROW, plan["capacity"])
        assert plan["capacity"] >= k and plan["range_len"] % tk.RANGE_ALIGN == 0
        assert (plan["n_ranges"] - 1) * plan["range_len"] < n_features <= plan["n_ranges"] * plan["range_len"]
        assert plan["list_bytes"] == n_tokens * plan["n_ranges"] * plan["capacity"] * 8


@pytest.mark.parametrize("backend", ["triton", "triton-fused"])
def test_public_op_with_non_contiguous_inputs_matches_torch_backend(backend):
    x_wide, W, b, b_pre = make_inputs(10, 80, 700, FP32, seed=3)
    x = x_wide[:, ::2]  # [10, 40], strided
    W_t = W[:, :40].T.contiguous().T  # [700, 40], column-major
    assert not x.is_contiguous() and not W_t.is_contiguous()
    vals, idx = ops.topk_encode(x, W_t, b, 9, b_pre=b_pre[:40], backend=backend)
    ref_vals, ref_idx = ops.topk_encode(x, W_t, b, 9, b_pre=b_pre[:40], backend="torch")
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals, ref_vals, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("triton_backend", ["triton", "triton-fused"])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_public_op_gradients_flow_through_triton_forward(dtype, triton_backend):
    B, d, F, k = 6, 24, 300, 8
    inputs = make_inputs(B, d, F, dtype, seed=8)
    grad_vals = torch.randn(B, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = {}
    for backend in (triton_backend, "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        vals, idx = ops.topk_encode(leaves[0], leaves[1], leaves[2], k, b_pre=leaves[3], backend=backend)
        results[backend] = (vals.detach(), idx, torch.autograd.grad(vals, leaves, grad_vals))
    (tv, ti, tg), (rv, ri, rg) = results[triton_backend], results["torch"]
    assert torch.equal(ti, ri)
    torch.testing.assert_close(tv, rv, rtol=VAL_RTOL[dtype], atol=1e-5)
    for got, ref in zip(tg, rg):
        torch.testing.assert_close(got, ref, rtol=VAL_RTOL[dtype] * 4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in tg)


def test_block_configs_are_tiles_the_compiler_and_the_plan_accept():
    """Every autotune entry (and the interpreter's blocks): power-of-two tiles of at least 16 (tl.dot's
    minimum), a BN that divides RANGE_ALIGN (ranges are whole tiles) and fits the list headroom, a
    power-of-two warp count and a pipelined loop; 16-bit inputs and fp32 get their own tables."""
    assert tk.block_configs(BF16) is tk.BLOCK_CONFIGS and tk.block_configs(FP16) is tk.BLOCK_CONFIGS
    assert tk.block_configs(FP32) is tk.BLOCK_CONFIGS_FP32
    interpret = tk.INTERPRET_BLOCKS
    for bm, bn, bk, warps, stages in [*tk.BLOCK_CONFIGS, *tk.BLOCK_CONFIGS_FP32, (interpret["BM"], interpret["BN"], interpret["BK"], 4, 2)]:
        for tile in (bm, bn, bk):
            assert tile >= 16 and tile & (tile - 1) == 0, (bm, bn, bk)
        assert tk.RANGE_ALIGN % bn == 0 and bn <= tk.LIST_HEADROOM
        assert warps & (warps - 1) == 0 and 4 <= warps <= 8 and stages >= 2
    assert tk.BLOCK_L & (tk.BLOCK_L - 1) == 0 and tk.list_capacity(1) % tk.BLOCK_L == 0
