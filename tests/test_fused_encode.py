"""Triton fused TopK encoder forward: against a float64 dense top-k and the torch backend."""
from __future__ import annotations

import pytest
import torch

from flashsae import ops
from flashsae.kernels import reference
from flashsae.kernels import fused_encode as tk

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
# Absolute tolerance on a pre-activation, relative to the largest |term| sum |x - b_pre| @ |W|.T + |b|
# (fp32 accumulation in a different order), and the relative rounding of vals to each dtype.
ACC_TOL = 1e-5
VAL_RTOL = {FP32: 1e-6, BF16: 2**-8, FP16: 2**-11}
# (B, d, F, k, dtype, with b_pre): every B, d, F, k value appears, dtypes crossed with shapes and k.
CASES = [
    (1, 16, 100, 1, FP32, False),
    (7, 40, 1000, 5, FP32, True),
    (64, 96, 4099, 32, FP32, False),
    (7, 16, 4099, 64, BF16, True),
    (64, 40, 100, 32, BF16, False),
    (1, 96, 1000, 1, BF16, True),
    (7, 96, 100, 64, FP16, False),
    (1, 40, 4099, 5, FP16, True),
    (64, 16, 1000, 64, FP16, True),
]


def make_inputs(B, d, F, dtype, seed, with_pre=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) + 0.3
    W = torch.randn(F, d, generator=g) / d**0.5
    b = 0.2 * torch.randn(F, generator=g) - 0.1
    b_pre = 0.3 + 0.1 * torch.randn(d, generator=g)
    x, W, b, b_pre = (t.to(dtype) for t in (x, W, b, b_pre))
    return x, W, b, b_pre if with_pre else None


def dense_float64(x, W, b, b_pre):
    """relu((x - b_pre) @ W.T + b) in float64, and the per-row size of the fp32 accumulation's terms."""
    xc = x.double() - (b_pre.double() if b_pre is not None else 0.0)
    pre = torch.relu(xc @ W.double().T + b.double())
    scale = xc.abs() @ W.double().abs().T + b.double().abs()
    return pre, scale.max(dim=1).values


def assert_exact_topk(vals, idx, x, W, b, b_pre, k):
    """vals/idx are a top-k of the float64 pre-activations up to fp32 accumulation rounding."""
    B, F = x.shape[0], W.shape[0]
    pre, scale = dense_float64(x, W, b, b_pre)
    atol = (ACC_TOL * scale.clamp_min(1.0))[:, None]
    assert vals.shape == (B, k) and idx.shape == (B, k)
    assert vals.dtype == x.dtype and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < F)).all(), "index out of range (an unwritten candidate slot?)"
    assert torch.isfinite(vals).all(), "non-finite value (an unwritten candidate slot?)"
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "an index was selected twice"
    assert (vals.diff(dim=1) <= 0).all(), "vals not sorted descending"
    chosen = pre.gather(1, idx)
    # Each value is the fp32 pre-activation of its feature, rounded to the dtype.
    err = (vals.double() - chosen).abs()
    assert (err <= atol + VAL_RTOL[x.dtype] * chosen).all(), f"vals off by {err.max():.3g}"
    # The chosen set's true values are the true top-k values (the selection is optimal) ...
    ref_top = pre.topk(k, dim=1).values
    gap = (chosen.sort(dim=1, descending=True).values - ref_top).abs()
    assert (gap <= atol).all(), f"selection misses a better feature by {gap.max():.3g}"
    # ... and every feature clearly above the k-th value is chosen.
    clear = pre > ref_top[:, -1:] + 2 * atol
    picked = torch.zeros_like(clear).scatter_(1, idx, True)
    assert (picked | ~clear).all(), "a clearly larger feature was not selected"


@pytest.mark.parametrize("B,d,F,k,dtype,with_pre", CASES)
def test_forward_matches_float64_topk(B, d, F, k, dtype, with_pre):
    x, W, b, b_pre = make_inputs(B, d, F, dtype, seed=B * 1000 + d + F + k, with_pre=with_pre)
    vals, idx = tk.topk_encode(x, W, b, k, b_pre, poison=True)
    assert_exact_topk(vals, idx, x, W, b, b_pre, k)


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


def make_dyadic_inputs(B, d, F, dtype, seed):
    """Small integers and eighths: every product and partial sum is exact in fp32, so equal
    pre-activations are bit-identical whatever the accumulation order, and many values tie."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (B, d), generator=g).float()
    W = torch.randint(-8, 9, (F, d), generator=g) / 8
    b = torch.randint(-8, 9, (F,), generator=g) / 8
    b_pre = torch.randint(-2, 3, (d,), generator=g) / 4
    return [t.to(dtype) for t in (x, W, b, b_pre)]


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
def test_ties_go_to_the_lower_index_across_tiles_and_ranges(dtype):
    B, d, F, k = 6, 32, 1500, 7
    x, W, b, b_pre = make_dyadic_inputs(B, d, F, dtype, seed=11)
    twins = [3, 130, 600, 1100, 1499]  # other tile, other range (3 ranges of 512), last feature
    W[twins] = W[twins[0]].clone()
    b[twins] = 200.0  # above every other feature: the twins are the top 5 of every row
    W[[1200, 1201, 40]] = W[5].clone()  # a second tie group among the rest
    b[[1200, 1201, 40]] = b[5].item()
    ref_vals, ref_idx = reference.topk_encode(x, W, b, k, b_pre)
    pre, _ = dense_float64(x, W, b, b_pre)
    assert (pre.topk(k + 1, dim=1).values.diff(dim=1) == 0).any(), "the test needs ties among the rest"
    for n_ranges in (1, 3):
        vals, idx = tk.topk_encode(x, W, b, k, b_pre, n_ranges=n_ranges, poison=True)
        assert torch.equal(idx[:, :5], torch.tensor(twins).expand(B, 5))
        assert torch.equal(idx, ref_idx)
        assert torch.equal(vals, ref_vals)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_rows_without_enough_positives_fill_zeros_at_lowest_indices(dtype):
    B, d, F, k = 5, 16, 1000, 6
    x, W, b, _ = make_inputs(B, d, F, dtype, seed=5)
    W = W * 0.01
    b = torch.full((F,), -10.0, dtype=dtype)
    b[[700, 2]] = torch.tensor([5.0, 3.0], dtype=dtype)  # exactly two positives per row ...
    x[1] = 0.0
    b_zero = b.clone()
    b_zero[[700, 2]] = -10.0  # ... and none at all with this bias
    vals, idx = tk.topk_encode(x, W, b, k, None, poison=True)
    assert torch.equal(idx, torch.tensor([700, 2, 0, 1, 3, 4]).expand(B, k))
    assert (vals[:, :2] > 0).all() and (vals[:, 2:] == 0).all()
    vals, idx = tk.topk_encode(x, W, b_zero, k, None, n_ranges=2, poison=True)
    assert torch.equal(idx, torch.arange(k).expand(B, k))
    assert (vals == 0).all() and not torch.signbit(vals).any()
    ref_vals, ref_idx = reference.topk_encode(x, W, b_zero, k)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)


def test_stage_one_writes_every_candidate_slot():
    x, W, b, _ = make_inputs(19, 16, 1100, FP32, seed=19)
    plan = tk.encode_plan(19, 1100, 16, 3)
    assert plan["n_ranges"] == 3 and plan["candidates_per_row"] == 3 * 4
    cand = tk.topk_range_candidates(x, W, b, 3, plan, poison=True)
    assert cand.shape == (19, 3, 4)
    assert (cand >= 0).all(), "a slot kept the poison key or an empty key"
    assert (cand.diff(dim=2) < 0).all(), "each range's keys must be sorted descending"


def test_plan_bounds_candidates_and_covers_every_feature():
    for n_tokens, n_features, d, k in [(4096, 2**20, 4096, 64), (4096, 2**20, 768, 32), (8, 2**20, 768, 512), (1, 100, 16, 1)]:
        plan = tk.encode_plan(n_tokens, n_features, d, k, n_sms=132)
        assert plan["candidates_per_row"] == plan["n_ranges"] * plan["kp"] <= tk.MAX_CANDIDATES_PER_ROW
        assert plan["kp"] >= k and plan["range_len"] % tk.RANGE_ALIGN == 0
        assert (plan["n_ranges"] - 1) * plan["range_len"] < n_features <= plan["n_ranges"] * plan["range_len"]


def test_public_op_with_non_contiguous_inputs_matches_torch_backend():
    x_wide, W, b, b_pre = make_inputs(10, 80, 700, FP32, seed=3)
    x = x_wide[:, ::2]  # [10, 40], strided
    W_t = W[:, :40].T.contiguous().T  # [700, 40], column-major
    assert not x.is_contiguous() and not W_t.is_contiguous()
    vals, idx = ops.topk_encode(x, W_t, b, 9, b_pre=b_pre[:40], backend="triton")
    ref_vals, ref_idx = ops.topk_encode(x, W_t, b, 9, b_pre=b_pre[:40], backend="torch")
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals, ref_vals, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_public_op_gradients_flow_through_triton_forward(dtype):
    B, d, F, k = 6, 24, 300, 8
    inputs = make_inputs(B, d, F, dtype, seed=8)
    grad_vals = torch.randn(B, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        vals, idx = ops.topk_encode(leaves[0], leaves[1], leaves[2], k, b_pre=leaves[3], backend=backend)
        results[backend] = (vals.detach(), idx, torch.autograd.grad(vals, leaves, grad_vals))
    (tv, ti, tg), (rv, ri, rg) = results["triton"], results["torch"]
    assert torch.equal(ti, ri)
    torch.testing.assert_close(tv, rv, rtol=VAL_RTOL[dtype], atol=1e-5)
    for got, ref in zip(tg, rg):
        torch.testing.assert_close(got, ref, rtol=VAL_RTOL[dtype] * 4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in tg)
