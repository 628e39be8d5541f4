"""The row primitives (gather_rows, row_dots, segment_rows) and the ops composed of them: sparse decode,
its backward and the encoder backward, on both backends against float64 dense autograd."""
from __future__ import annotations


import pytest
import torch

from flashsae import ops
from flashsae.kernels import reference
from flashsae.kernels import rows as triton_rows
from tests.oracles import DTYPES, assert_close, dense_decode_grads, fired_rows, make_decode

BACKENDS = ["torch", "triton"]
PRIMITIVES = {"torch": reference, "triton": triton_rows}
# (B, d, F, k): a covering set of odd shapes, every B, d, F, k value of the plan at least once.
SHAPES = [(1, 24, 50, 1), (9, 100, 1000, 8), (64, 24, 50, 33), (9, 24, 1000, 33)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,F,k", SHAPES)
def test_sparse_decode_values_and_grads_match_float64_autograd(B, d, F, k, dtype, backend):
    vals, idx, W, b, grad_out = make_decode(B, d, F, k, dtype, seed=B + d + F + k)
    ref_x, ref_gv, ref_gW, ref_gb = dense_decode_grads(vals, idx, W, b, grad_out)
    for sparse_grad in (False, True):
        v, Wp, bp = (t.clone().requires_grad_() for t in (vals, W, b))
        x_hat = ops.sparse_decode(v, idx, Wp, bp, backend=backend, sparse_grad=sparse_grad)
        assert x_hat.dtype == dtype and x_hat.shape == (B, d)
        assert_close(x_hat, ref_x, dtype, "x_hat")
        x_hat.backward(grad_out)
        assert Wp.grad.is_sparse == sparse_grad
        if sparse_grad:  # (AccumulateGrad may drop the coalesced flag; the rows are still unique, sorted)
            assert Wp.grad.dtype == dtype and Wp.grad.sparse_dim() == 1
            assert torch.equal(Wp.grad._indices()[0], fired_rows(idx, vals))
        assert_close(v.grad, ref_gv, dtype, "grad vals")
        assert_close(Wp.grad.to_dense(), ref_gW, dtype, "grad W_dec")
        assert_close(bp.grad, ref_gb, dtype, "grad b_dec")


def make_encoder(B, d, F, dtype, seed):
    """Inputs with every other token a copy of the one before, so features repeat across tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    x[1::2] = x[0 : B - B % 2 : 2]
    W = torch.randn(F, d, generator=g) / d**0.5
    b = 0.1 * torch.randn(F, generator=g) - 0.05
    b_pre = 0.1 * torch.randn(d, generator=g)
    return [t.to(dtype) for t in (x, W, b, b_pre)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,F,k", SHAPES)
def test_topk_encode_grads_match_float64_autograd(B, d, F, k, dtype, backend):
    x, W, b, b_pre = make_encoder(B, d, F, dtype, seed=7 * B + F + k)
    g = torch.Generator().manual_seed(k)
    grad_vals = torch.randn(B, k, generator=g).to(dtype)
    for sparse_grad in (False, True):
        xs, Ws, bs, bps = (t.clone().requires_grad_() for t in (x, W, b, b_pre))
        vals, idx = ops.topk_encode(xs, Ws, bs, k, b_pre=bps, backend=backend, sparse_grad=sparse_grad)
        vals.backward(grad_vals)
        # float64 dense reference with the same selection: relu(pre) gathered at idx.
        xd, Wd, bd, bpd = (t.detach().double().requires_grad_() for t in (x, W, b, b_pre))
        pre = torch.relu((xd - bpd) @ Wd.T + bd)
        pre.gather(1, idx).backward(grad_vals.double())
        assert Ws.grad.is_sparse == sparse_grad and bs.grad.is_sparse == sparse_grad
        if sparse_grad:
            assert torch.equal(Ws.grad._indices()[0], fired_rows(idx, vals))
            assert torch.equal(bs.grad._indices()[0], fired_rows(idx, vals))
        assert_close(xs.grad, xd.grad, dtype, "grad x")
        assert_close(Ws.grad.to_dense(), Wd.grad, dtype, "grad W_enc")
        assert_close(bs.grad.to_dense(), bd.grad, dtype, "grad b_enc")
        assert_close(bps.grad, bpd.grad, dtype, "grad b_pre")
    if F == 50 and k == 33:  # the relu gate must have been exercised: some rows run out of positives
        assert (vals == 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_launchers_write_every_output_element(dtype):
    B, d, F, k = 37, 100, 50, 8
    vals, idx, W, b, grad_out = make_decode(B, d, F, k, dtype, seed=3)
    ref_x, ref_gv, ref_gW, _ = dense_decode_grads(vals, idx, W, b, grad_out)

    out = torch.full((B, d), float("nan"), dtype=dtype)
    triton_rows.gather_rows(vals, idx, W, b, out=out)
    assert_close(out, ref_x, dtype, "gather_rows")

    dots = torch.full((B, k), float("nan"))
    triton_rows.row_dots(grad_out, idx, W, out=dots)
    assert_close(dots, ref_gv, dtype, "row_dots")

    rows = fired_rows(idx, vals)
    poisoned = torch.full((rows.numel() + 5, d), float("nan"))
    got_rows, grad_rows, coef_sums = triton_rows.segment_rows(vals, idx, grad_out, vals > 0, out=poisoned)
    assert torch.equal(got_rows, rows)
    assert_close(grad_rows, ref_gW[rows], dtype, "segment_rows")
    assert torch.isnan(poisoned[rows.numel() :]).all(), "segment_rows wrote past its U rows"
    ref_sums = torch.zeros(F, dtype=torch.float64).index_add_(0, idx[vals > 0], vals[vals > 0].double())
    assert_close(coef_sums, ref_sums[rows], dtype, "coef sums")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_adds_the_bias_and_writes_a_given_output_in_its_dtype(backend, dtype):
    B, d, F, k = 37, 100, 50, 8
    vals, idx, W, b, _ = make_decode(B, d, F, k, dtype, seed=9)
    ref = torch.einsum("tk,tkd->td", vals.double(), W.double()[idx])
    plain = PRIMITIVES[backend].gather_rows(vals, idx, W)
    assert plain.dtype == torch.float32
    assert_close(plain, ref, dtype, "gather_rows")
    out = torch.full((B, d), float("nan"), dtype=dtype)
    got = PRIMITIVES[backend].gather_rows(vals, idx, W, b, out=out)
    assert got is out
    assert_close(out, ref + b.double(), dtype, "gather_rows with bias into out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_rows_with_shift_matches_float64_shifted_sums(backend, dtype):
    B, d, F, k = 20, 24, 50, 33
    vals, idx, _, _, _ = make_decode(B, d, F, k, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    x, shift = torch.randn(B, d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    fired = vals > 0
    rows, grad, sums = PRIMITIVES[backend].segment_rows(vals, idx, x, fired, shift=shift)
    ref_rows = fired_rows(idx, vals)
    shifted = x.double() - shift.double()
    ref_grad = torch.zeros(F, d, dtype=torch.float64).index_add_(
        0, idx[fired], vals.double()[fired, None] * shifted[fired.nonzero()[:, 0]]
    )
    assert torch.equal(rows, ref_rows)
    assert grad.dtype == sums.dtype == torch.float32
    assert_close(grad, ref_grad[ref_rows], dtype, "segment_rows with shift")
    ref_sums = torch.zeros(F, dtype=torch.float64).index_add_(0, idx[fired], vals.double()[fired])
    assert_close(sums, ref_sums[ref_rows], dtype, "coef sums")


def test_segment_rows_is_deterministic():
    B, d, F, k = 32, 100, 50, 33
    vals, idx, _, _, grad_out = make_decode(B, d, F, k, torch.float32, seed=11)
    first = triton_rows.segment_rows(vals, idx, grad_out, vals > 0)
    second = triton_rows.segment_rows(vals, idx, grad_out, vals > 0)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_sums_repeated_indices_within_a_row(backend):
    vals, idx, W, b, grad_out = make_decode(5, 24, 50, 4, torch.float32, seed=2)
    idx[:, 1] = idx[:, 0]
    ref_x, ref_gv, ref_gW, _ = dense_decode_grads(vals, idx, W, b, grad_out)
    v, Wp = vals.clone().requires_grad_(), W.clone().requires_grad_()
    x_hat = ops.sparse_decode(v, idx, Wp, b, backend=backend, sparse_grad=True)
    x_hat.backward(grad_out)
    assert_close(x_hat, ref_x, torch.float32, "x_hat")
    assert_close(v.grad, ref_gv, torch.float32, "grad vals")
    assert_close(Wp.grad.to_dense(), ref_gW, torch.float32, "grad W_dec")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_active_feature_gives_empty_sparse_grad(backend):
    vals, idx, W, b, grad_out = make_decode(3, 24, 50, 4, torch.float32, seed=4)
    vals.zero_()
    Wp = W.clone().requires_grad_()
    ops.sparse_decode(vals.requires_grad_(), idx, Wp, b, backend=backend, sparse_grad=True).backward(grad_out)
    assert Wp.grad.is_sparse and Wp.grad._nnz() == 0
    assert torch.equal(Wp.grad.to_dense(), torch.zeros_like(W))
