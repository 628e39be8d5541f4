"""Inputs and float64 checks shared by the encoder tests: every backend's ``topk_encode`` against one oracle."""
from __future__ import annotations

import functools

import torch

from flashsae.kernels import chunked_encode, fused_encode, torch_encode
from tests.oracles import without_cpu_kernels

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# Absolute tolerance on a pre-activation, relative to the largest |term| sum |x - b_pre| @ |W|.T + |b|
# (fp32 accumulation in a different order), and the relative rounding of vals to each dtype.
ACC_TOL = 1e-5
VAL_RTOL = {FP32: 1e-6, BF16: 2**-8, FP16: 2**-11, FP64: 1e-12}

# Each backend's encoder, called directly; the Triton ones poison their candidate lists first. "torch-ops"
# is the torch backend with its C++ CPU kernel switched off (the same select in torch ops).
ENCODERS = {
    "torch": torch_encode.topk_encode,
    "torch-ops": without_cpu_kernels(torch_encode.topk_encode),
    "triton": functools.partial(chunked_encode.topk_encode, poison=True),
    "triton-fused": functools.partial(fused_encode.topk_encode, poison=True),
}
BACKENDS = tuple(ENCODERS)


def family(backend: str) -> str:
    """The backend whose options an ``ENCODERS`` entry takes ("torch-ops" is the torch backend)."""
    return "torch" if backend == "torch-ops" else backend


def make_inputs(B, d, F, dtype, seed, with_pre=True):
    """Random x [B, d], W [F, d], b [F], b_pre [d] (or None) in ``dtype``; about half the
    pre-activations are positive."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) + 0.3
    W = torch.randn(F, d, generator=g) / d**0.5
    b = 0.2 * torch.randn(F, generator=g) - 0.1
    b_pre = 0.3 + 0.1 * torch.randn(d, generator=g)
    x, W, b, b_pre = (t.to(dtype) for t in (x, W, b, b_pre))
    return x, W, b, b_pre if with_pre else None


def make_dyadic_inputs(B, d, F, dtype, seed):
    """Small integers and eighths: every product and partial sum is exact in fp32, so equal
    pre-activations are bit-identical whatever the accumulation order, and many values tie."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (B, d), generator=g).float()
    W = torch.randint(-8, 9, (F, d), generator=g) / 8
    b = torch.randint(-8, 9, (F,), generator=g) / 8
    b_pre = torch.randint(-2, 3, (d,), generator=g) / 4
    return [t.to(dtype) for t in (x, W, b, b_pre)]


def dense_float64(x, W, b, b_pre):
    """relu((x - b_pre) @ W.T + b) in float64 (NaN counts as -inf), and the per-row size of the
    accumulation's terms."""
    xc = x.double() - (b_pre.double() if b_pre is not None else 0.0)
    pre = torch.nan_to_num(xc @ W.double().T + b.double(), nan=float("-inf"), posinf=float("inf"))
    scale = torch.nan_to_num(xc.abs() @ W.double().abs().T + b.double().abs(), nan=0.0)
    return torch.relu(pre), scale.max(dim=1).values


def stable_topk(pre, k):
    """The reference order: top-k with ties to the lower index (a stable descending sort)."""
    order = torch.sort(pre, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


def assert_exact_topk(vals, idx, x, W, b, b_pre, k):
    """vals/idx are a top-k of the float64 pre-activations up to the accumulation's rounding, with
    the output contract: shapes, dtypes, distinct in-range indices, values sorted descending."""
    B, F = x.shape[0], W.shape[0]
    pre, scale = dense_float64(x, W, b, b_pre)
    atol = (ACC_TOL * scale.clamp_min(1.0))[:, None]
    assert vals.shape == (B, k) and idx.shape == (B, k)
    assert vals.dtype == x.dtype and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < F)).all(), "index out of range (an unwritten candidate slot?)"
    assert torch.isfinite(vals).all() or torch.isinf(pre).any(), "non-finite value (an unwritten candidate slot?)"
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "an index was selected twice"
    assert (vals.diff(dim=1) <= 0).all(), "vals not sorted descending"
    assert not torch.signbit(vals).any(), "a selected value is negative or -0.0"
    chosen = pre.gather(1, idx)
    err = (vals.double() - chosen).abs()
    finite = torch.isfinite(chosen)
    assert (err[finite] <= (atol + VAL_RTOL[x.dtype] * chosen).expand_as(err)[finite]).all(), f"vals off by {err[finite].max():.3g}"
    # The chosen set's true values are the true top-k values (the selection is optimal) ...
    ref_top = pre.topk(k, dim=1).values
    gap = torch.nan_to_num((chosen.sort(dim=1, descending=True).values - ref_top).abs(), nan=0.0)
    assert (gap <= atol).all(), f"selection misses a better feature by {gap.max():.3g}"
    # ... and every feature clearly above the k-th value is chosen.
    clear = pre > ref_top[:, -1:] + 2 * atol
    picked = torch.zeros_like(clear).scatter_(1, idx, True)
    assert (picked | ~clear).all(), "a clearly larger feature was not selected"


def assert_reference_order(vals, idx, x, W, b, b_pre, k):
    """vals/idx equal the float64 reference's top-k exactly (ties to the lower index): for inputs
    whose pre-activations every backend computes exactly (dyadic values, or float64)."""
    pre, _ = dense_float64(x, W, b, b_pre)
    ref_vals, ref_idx = stable_topk(pre, k)
    assert torch.equal(idx, ref_idx), f"{(idx != ref_idx).sum()} slots differ from the reference"
    if x.dtype == FP64:  # float64 sums in another order: equal up to the last bits
        torch.testing.assert_close(vals, ref_vals, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(vals.double(), ref_vals.to(x.dtype).double())
