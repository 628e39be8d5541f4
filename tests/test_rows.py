"""The row primitives (gather_rows, row_dots, segment_rows) and the ops composed of them: sparse decode,
its backward and the encoder backward, on both backends against float64 dense autograd."""
from __future__ import annotations


import pytest
import torch

from flashsae import ops
from flashsae.kernels import reference
from flashsae.kernels import rows as triton_rows
from flashsae.kernels.pairs import group_pairs
from flashsae.rowgrad import RowGrad
from tests.grads import row_values, touched_rows
from tests.oracles import DTYPES, dense_decode_grads, fired_rows, make_decode
from tests.tolerance import assert_within, rounding_bound, store_roundings

BACKENDS = ["torch", "triton"]
PRIMITIVES = {"torch": reference, "triton": triton_rows}
# (B, d, F, k): a covering set of odd shapes, every B, d, F, k value of the plan at least once.
SHAPES = [(1, 24, 50, 1), (9, 100, 1000, 8), (64, 24, 50, 33), (9, 24, 1000, 33)]


def assert_close(got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype, what: str, *,
                 roundings: int, terms: int) -> None:
    """|got - ref| within the rounding bound of tests/tolerance.py: ``magnitude`` the same computation on
    absolute values, ``roundings`` roundings to ``dtype`` on the way, fp32 sums of up to ``terms`` terms."""
    assert_within(got, ref, rounding_bound(magnitude, dtype, roundings=roundings, terms=terms), what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,F,k", SHAPES)
def test_sparse_decode_values_and_grads_match_float64_autograd(B, d, F, k, dtype, backend):
    vals, idx, W, b, grad_out = make_decode(B, d, F, k, dtype, seed=B + d + F + k)
    ref_x, ref_gv, ref_gW, ref_gb = dense_decode_grads(vals, idx, W, b, grad_out)
    mag_x, mag_gv, mag_gW, mag_gb = dense_decode_grads(*(t.abs() for t in (vals, idx, W, b, grad_out)))
    for sparse_grad in (False, True):
        v, Wp, bp = (t.clone().requires_grad_() for t in (vals, W, b))
        x_hat = ops.sparse_decode(v, idx, Wp, bp, backend=backend, sparse_grad=sparse_grad)
        assert x_hat.dtype == dtype and x_hat.shape == (B, d)
        # Each output is an fp32 sum (k + 1, d or B * k terms) rounded once to the dtype.
        assert_close(x_hat, ref_x, mag_x, dtype, "x_hat", roundings=store_roundings(backend, dtype), terms=k + 1)
        x_hat.backward(grad_out)
        assert isinstance(Wp.grad, RowGrad) == sparse_grad
        if sparse_grad:  # the parameter's dtype outside, float32 rows inside
            assert Wp.grad.dtype == dtype and row_values(Wp.grad)[1].dtype == torch.float32
            assert torch.equal(touched_rows(Wp.grad), fired_rows(idx, vals))
        assert_close(v.grad, ref_gv, mag_gv, dtype, "grad vals", roundings=1, terms=d)
        assert_close(Wp.grad.to_dense(), ref_gW, mag_gW, dtype, "grad W_dec", roundings=1, terms=B * k)
        assert_close(bp.grad, ref_gb, mag_gb, dtype, "grad b_dec", roundings=1, terms=B)


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
        # float64 dense reference with the same selection: relu(pre) gathered at idx; and the same on
        # absolute values (x - b_pre as |x| + |b_pre|, the gate fixed) for the size of the terms.
        xd, Wd, bd, bpd = (t.detach().double().requires_grad_() for t in (x, W, b, b_pre))
        pre = torch.relu((xd - bpd) @ Wd.T + bd)
        pre.gather(1, idx).backward(grad_vals.double())
        mags = [t.detach().double().abs().requires_grad_() for t in (x, W, b, b_pre)]
        ((mags[0] + mags[3]) @ mags[1].T + mags[2]).gather(1, idx).backward(grad_vals.double().abs() * (vals > 0))
        assert isinstance(Ws.grad, RowGrad) == sparse_grad and isinstance(bs.grad, RowGrad) == sparse_grad
        if sparse_grad:
            assert torch.equal(touched_rows(Ws.grad), fired_rows(idx, vals))
            assert torch.equal(touched_rows(bs.grad), fired_rows(idx, vals))
        # fp32 sums over k (grad x) or B * k (the rest) terms, rounded once to the dtype.
        grads = (("grad x", xs.grad, xd), ("grad W_enc", Ws.grad.to_dense(), Wd), ("grad b_enc", bs.grad.to_dense(), bd),
                 ("grad b_pre", bps.grad, bpd))
        for (what, got, ref), mag in zip(grads, mags):
            assert_close(got, ref.grad, mag.grad, dtype, what, roundings=1, terms=B * k + 1)
    if F == 50 and k == 33:  # the relu gate must have been exercised: some rows run out of positives
        assert (vals == 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_launchers_write_every_output_element(dtype):
    B, d, F, k = 37, 100, 50, 8
    vals, idx, W, b, grad_out = make_decode(B, d, F, k, dtype, seed=3)
    ref_x, ref_gv, ref_gW, _ = dense_decode_grads(vals, idx, W, b, grad_out)
    mag_x, mag_gv, mag_gW, _ = dense_decode_grads(*(t.abs() for t in (vals, idx, W, b, grad_out)))

    out = torch.full((B, d), float("nan"), dtype=dtype)
    triton_rows.gather_rows(vals, idx, W, b, out=out)
    assert_close(out, ref_x, mag_x, dtype, "gather_rows", roundings=store_roundings("triton", dtype), terms=k + 1)

    dots = torch.full((B, k), float("nan"))
    triton_rows.row_dots(grad_out, idx, W, out=dots)
    assert_close(dots, ref_gv, mag_gv, dtype, "row_dots", roundings=0, terms=d + 1)

    rows = fired_rows(idx, vals)
    groups = group_pairs(idx, vals > 0, F)
    assert groups.n_slots == min(B * k, F) and int(groups.n_rows) == rows.numel() < groups.n_slots
    poisoned = torch.full((groups.n_slots + 5, d), float("nan"))
    grad_rows, coef_sums = triton_rows.segment_rows(vals, groups, grad_out, out=poisoned)
    assert torch.equal(groups.rows[groups.valid], rows)
    assert_close(grad_rows[groups.valid], ref_gW[rows], mag_gW[rows], dtype, "segment_rows", roundings=0, terms=B + 1)
    assert torch.equal(grad_rows[~groups.valid], torch.zeros_like(grad_rows[~groups.valid])), "padding slots hold zeros"
    assert torch.isnan(poisoned[groups.n_slots :]).all(), "segment_rows wrote past its R slots"
    ref_sums = torch.zeros(F, dtype=torch.float64).index_add_(0, idx[vals > 0], vals[vals > 0].double())
    assert_close(coef_sums[groups.valid], ref_sums[rows], ref_sums[rows], dtype, "coef sums", roundings=0, terms=B)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_adds_the_bias_and_writes_a_given_output_in_its_dtype(backend, dtype):
    B, d, F, k = 37, 100, 50, 8
    vals, idx, W, b, _ = make_decode(B, d, F, k, dtype, seed=9)
    ref = torch.einsum("tk,tkd->td", vals.double(), W.double()[idx])
    magnitude = torch.einsum("tk,tkd->td", vals.double().abs(), W.double().abs()[idx])
    plain = PRIMITIVES[backend].gather_rows(vals, idx, W)
    assert plain.dtype == torch.float32
    assert_close(plain, ref, magnitude, dtype, "gather_rows", roundings=0, terms=k + 1)
    out = torch.full((B, d), float("nan"), dtype=dtype)
    got = PRIMITIVES[backend].gather_rows(vals, idx, W, b, out=out)
    assert got is out
    assert_close(out, ref + b.double(), magnitude + b.double().abs(), dtype, "gather_rows with bias into out",
                 roundings=store_roundings(backend, dtype), terms=k + 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_rows_with_shift_matches_float64_shifted_sums(backend, dtype):
    B, d, F, k = 20, 24, 50, 33
    vals, idx, _, _, _ = make_decode(B, d, F, k, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    x, shift = torch.randn(B, d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    fired = vals > 0
    groups = group_pairs(idx, fired, F)
    grad, sums = PRIMITIVES[backend].segment_rows(vals, groups, x, shift=shift)
    rows, valid = groups.rows, groups.valid
    ref_rows = fired_rows(idx, vals)
    def row_sums(coef, vecs):
        return torch.zeros(F, d, dtype=torch.float64).index_add_(0, idx[fired], coef[fired, None] * vecs[fired.nonzero()[:, 0]])

    ref_grad = row_sums(vals.double(), x.double() - shift.double())
    magnitude = row_sums(vals.double().abs(), x.double().abs() + shift.double().abs())
    assert torch.equal(rows[valid], ref_rows) and not rows[~valid].any()
    assert grad.dtype == sums.dtype == torch.float32
    # fp32 throughout: the shift's subtraction, the product and a sum of at most B terms per row.
    assert_close(grad[valid], ref_grad[ref_rows], magnitude[ref_rows], dtype, "segment_rows with shift",
                 roundings=0, terms=B + 2)
    assert not grad[~valid].any() and not sums[~valid].any()
    ref_sums = torch.zeros(F, dtype=torch.float64).index_add_(0, idx[fired], vals.double()[fired])
    assert_close(sums[valid], ref_sums[ref_rows], ref_sums[ref_rows], dtype, "coef sums", roundings=0, terms=B)


def sequential_segment_sums(coef, groups, vecs, reverse=False):
    """fp32 sums over each slot's pairs one at a time, in the order of ``groups.pairs`` (or the reverse)."""
    out = torch.zeros(groups.n_slots, vecs.shape[1])
    flat_coef = coef.reshape(-1).float()
    for u in range(groups.n_slots):
        span = groups.pairs[groups.offsets[u] : groups.offsets[u + 1]].tolist()
        for flat in reversed(span) if reverse else span:
            out[u] = out[u] + flat_coef[flat] * vecs[flat // groups.k].float()
    return out


def test_segment_rows_sums_each_feature_in_one_fixed_order_bit_for_bit():
    """Deterministic by construction, not by luck: each feature's pairs are summed one at a time in
    ascending (token, slot) order, so the result is that sequential fp32 sum exactly (in the
    interpreter, which rounds each product and sum as torch does), whatever the grid."""
    B, d, F, k = 40, 300, 50, 33  # two d-slices of 256 columns, up to 40 pairs per feature
    vals, idx, _, _, grad_out = make_decode(B, d, F, k, torch.float32, seed=11)
    groups = group_pairs(idx, vals > 0, F)
    grad_rows, _ = triton_rows.segment_rows(vals, groups, grad_out)
    assert torch.equal(grad_rows, sequential_segment_sums(vals, groups, grad_out))
    assert not torch.equal(grad_rows, sequential_segment_sums(vals, groups, grad_out, reverse=True)), \
        "the data must be sensitive to the order of the sums"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_sums_repeated_indices_within_a_row(backend):
    vals, idx, W, b, grad_out = make_decode(5, 24, 50, 4, torch.float32, seed=2)
    idx[:, 1] = idx[:, 0]
    ref_x, ref_gv, ref_gW, _ = dense_decode_grads(vals, idx, W, b, grad_out)
    mag_x, mag_gv, mag_gW, _ = dense_decode_grads(*(t.abs() for t in (vals, idx, W, b, grad_out)))
    v, Wp = vals.clone().requires_grad_(), W.clone().requires_grad_()
    x_hat = ops.sparse_decode(v, idx, Wp, b, backend=backend, sparse_grad=True)
    x_hat.backward(grad_out)
    assert_close(x_hat, ref_x, mag_x, torch.float32, "x_hat", roundings=1, terms=6)
    assert_close(v.grad, ref_gv, mag_gv, torch.float32, "grad vals", roundings=1, terms=25)
    assert_close(Wp.grad.to_dense(), ref_gW, mag_gW, torch.float32, "grad W_dec", roundings=1, terms=21)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_active_feature_gives_empty_sparse_grad(backend):
    vals, idx, W, b, grad_out = make_decode(3, 24, 50, 4, torch.float32, seed=4)
    vals.zero_()
    Wp = W.clone().requires_grad_()
    ops.sparse_decode(vals.requires_grad_(), idx, Wp, b, backend=backend, sparse_grad=True).backward(grad_out)
    assert isinstance(Wp.grad, RowGrad) and touched_rows(Wp.grad).numel() == 0
    assert torch.equal(Wp.grad.to_dense(), torch.zeros_like(W))


def production_width_case(d: int, dtype: torch.dtype):
    """B=6 tokens, k=3: feature 0 fired by every token, feature 5 by five, feature 7 by one token,
    feature 6 chosen with value 0 (never fires), features 8..10 never chosen."""
    g = torch.Generator().manual_seed(d)
    idx = torch.tensor([[0, 1, 5], [0, 2, 5], [0, 7, 5], [0, 3, 5], [0, 4, 6], [0, 1, 5]])
    vals = torch.rand(6, 3, generator=g) + 0.1
    vals[4, 2] = 0.0
    W = torch.randn(11, d, generator=g) / d**0.5
    x, shift = torch.randn(6, d, generator=g), 0.1 * torch.randn(d, generator=g)
    return vals.to(dtype), idx, W.to(dtype), x.to(dtype), shift.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [384, 768, 4096])
def test_row_primitives_at_production_widths_with_heavy_single_and_silent_features(backend, dtype, d):
    """Every loop runs over more than one block: the pair loop (feature 0 has six pairs), the slices of
    d, row_dots' sweep of d; an accumulation turned into an assignment fails here."""
    vals, idx, W, x, shift = production_width_case(d, dtype)
    prims = PRIMITIVES[backend]
    groups = group_pairs(idx, vals > 0, 11)
    grad, sums = prims.segment_rows(vals, groups, x, shift=shift)
    fired = vals > 0

    def row_sums(coef, vecs):
        return torch.zeros(11, d, dtype=torch.float64).index_add_(0, idx[fired], coef[fired, None] * vecs[fired.nonzero()[:, 0]])

    ref = row_sums(vals.double(), x.double() - shift.double())
    magnitude = row_sums(vals.double().abs(), x.double().abs() + shift.double().abs())
    fired_rows_ = [0, 1, 2, 3, 4, 5, 7]
    assert groups.rows[groups.valid].tolist() == fired_rows_
    # fp32 results: only the shift's subtraction, the products and the sums round.
    assert_close(grad[groups.valid], ref[fired_rows_], magnitude[fired_rows_], dtype, f"segment_rows d={d}",
                 roundings=0, terms=8)
    ref_sums = torch.zeros(11, dtype=torch.float64).index_add_(0, idx[fired], vals.double()[fired])
    assert_close(sums[groups.valid], ref_sums[fired_rows_], ref_sums[fired_rows_], dtype, "coef sums",
                 roundings=0, terms=6)
    assert not grad[~groups.valid].any()
    picked = W.double()[idx]  # [B, k, d]
    assert_close(prims.gather_rows(vals, idx, W), torch.einsum("tk,tkd->td", vals.double(), picked),
                 torch.einsum("tk,tkd->td", vals.double().abs(), picked.abs()), dtype, "gather_rows", roundings=0, terms=4)
    assert_close(prims.row_dots(x, idx, W), torch.einsum("td,tkd->tk", x.double(), picked),
                 torch.einsum("td,tkd->tk", x.double().abs(), picked.abs()), dtype, "row_dots", roundings=0, terms=d + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_grouping_per_forward_is_shared_by_the_encoder_and_decoder_backward(backend, monkeypatch):
    from flashsae import TopKSAE

    calls = []
    real = ops.group_pairs
    monkeypatch.setattr(ops, "group_pairs", lambda *args: calls.append(args[2]) or real(*args))
    sae = TopKSAE(24, 50, 4, backend=backend, sparse_grad=True)
    x = torch.randn(9, 24, generator=torch.Generator().manual_seed(0))
    (sae(x).x_hat - x).pow(2).sum().backward()
    assert calls == [50], "one sort of the pairs for both backward passes"
    # Each op on its own groups its own pairs; a grouping bound to one selection fits no other.
    grouping = ops.SharedGrouping()
    vals, idx = ops.topk_encode(x, sae.W_enc, sae.b_enc, 4, backend=backend, grouping=grouping)
    with pytest.raises(ValueError, match="grouping is bound to another selection"):
        ops.sparse_decode(vals.detach().clone(), idx, sae.W_dec, sae.b_dec, backend=backend, grouping=grouping)
    with pytest.raises(ValueError, match="already bound to another selection"):
        ops.topk_encode(x, sae.W_enc, sae.b_enc, 4, backend=backend, grouping=grouping)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,d,F,k", [(9, 100, 1000, 8), (64, 24, 50, 33), (1, 384, 7, 7)])
def test_cpu_sparse_products_equal_the_gather_path(monkeypatch, B, d, F, k, dtype):
    """On the CPU the torch primitives run as CSR products; off it (and for 16-bit weights) as gathers and
    index_add. Both give the same sums, with shift and bias, padding slots and pairs that did not fire."""
    vals, idx, W, b, grad_out = make_decode(B, d, F, k, dtype, seed=B * k + F)
    groups = group_pairs(idx, vals > 0, F)
    shift = 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(3)).to(dtype)

    def run() -> list[torch.Tensor]:
        return [reference.gather_rows(vals, idx, W, b), reference.row_dots(grad_out, idx, W),
                *reference.segment_rows(vals, groups, grad_out, shift)]

    sparse = run()
    monkeypatch.setattr(reference, "_sparse_on_cpu", lambda t, n_pairs: False)
    gathered = run()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for name, a, c in zip(("gather_rows", "row_dots", "segment_rows", "coef sums"), sparse, gathered):
        assert a.dtype == c.dtype == dtype and a.shape == c.shape, name
        torch.testing.assert_close(a, c, rtol=tol, atol=tol, msg=name)
    assert not sparse[2][~groups.valid].any(), "padding slots must hold zeros"



@pytest.mark.parametrize("B,d,F,k", [(1, 1, 3, 1), (2, 1, 1, 1), (0, 24, 50, 4), (5, 0, 50, 4), (5, 24, 50, 0)])
def test_triton_primitives_at_one_and_zero_tokens_columns_and_slots_equal_the_reference(B, d, F, k):
    """The smallest shapes, and the empty ones: every output of the launchers (written over poison) equals
    the float64 reference primitives; an empty output is returned with its shape."""
    g = torch.Generator().manual_seed(B + d + k)
    idx = torch.randint(0, F, (B, k), generator=g)
    vals = torch.rand(B, k, generator=g) + 0.5
    W, vecs = torch.randn(F, d, generator=g), torch.randn(B, d, generator=g)
    bias, shift = torch.randn(d, generator=g), torch.randn(d, generator=g)
    groups = group_pairs(idx, vals > 0, F)
    got = [triton_rows.gather_rows(vals, idx, W, bias, out=torch.full((B, d), float("nan"))),
           triton_rows.row_dots(vecs, idx, W, out=torch.full((B, k), float("nan"))),
           *triton_rows.segment_rows(vals, groups, vecs, shift, out=torch.full((groups.n_slots, d), float("nan")))]
    dbl = [t.double() for t in (vals, W, vecs, bias, shift)]
    want = [reference.gather_rows(dbl[0], idx, dbl[1], dbl[3]), reference.row_dots(dbl[2], idx, dbl[1]),
            *reference.segment_rows(dbl[0], groups, dbl[2], dbl[4])]
    for name, a, ref in zip(("gather_rows", "row_dots", "segment_rows", "coef sums"), got, want):
        assert a.shape == ref.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), ref, rtol=1e-6, atol=1e-6, msg=name)


def test_segment_slices_are_the_widest_power_of_two_with_little_masked_tail():
    """`_segment_block_d`'s rule over every width up to 5000: a power of two of at most MAX_SEGMENT_BLOCK_D
    columns whose masked tail is at most SEGMENT_WASTE of d (or 128 wide, or one slice covering a small d),
    and no wider slice allowed by those bounds would do."""
    def waste(d, block):
        return -(-d // block) * block - d

    for d in range(1, 5001):
        block = triton_rows._segment_block_d(d)
        assert block & (block - 1) == 0 and block <= triton_rows.MAX_SEGMENT_BLOCK_D, d
        widest = min(triton_rows.MAX_SEGMENT_BLOCK_D, max(16, 1 << (d - 1).bit_length()))
        if widest <= 128:
            assert block == widest, d
            continue
        assert block >= 128 and (block == 128 or waste(d, block) <= d / 8), d
        assert block == widest or waste(d, 2 * block) > d / 8, d
