"""The variants' ops against float64 dense references: BatchTopK and JumpReLU selections across the batch
(ties, saturated rows, padding), their gradients, and the nested (Matryoshka) decode."""
from __future__ import annotations

import pytest
import torch

from flashsae import ops
from flashsae.kernels import batch_select, torch_encode
from flashsae.rowgrad import RowGrad
from tests.test_ops import DTYPES, dense_pre, make_encoder

# Absolute tolerance per dtype, relative to the size of the terms (fp32 accumulation, one rounding).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}

pytestmark = pytest.mark.usefixtures("one_thread")


def batch_topk_reference(pre: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, F]: the B k largest positive entries, ties to the lower (row, feature): a stable sort of
    the row-major flattening."""
    flat = pre.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[: pre.shape[0] * k]
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    return (chosen & (flat > 0)).view(pre.shape)


def as_dense(vals: torch.Tensor, idx: torch.Tensor, n_features: int) -> torch.Tensor:
    """[B, F] float64 from padded codes; each index at most once per row."""
    assert (idx.sort(1).values.diff(dim=1) > 0).all(), "a row names a feature twice"
    return torch.zeros(vals.shape[0], n_features, dtype=torch.float64).scatter(1, idx, vals.double())


def check_padded(vals: torch.Tensor, idx: torch.Tensor, n_features: int) -> None:
    """Rows descending, positives first, then zeros at the lowest features the row does not hold."""
    assert (vals[:, :-1] >= vals[:, 1:]).all()
    for row_vals, row_idx in zip(vals, idx):
        held = set(row_idx[row_vals > 0].tolist())
        fillers = row_idx[row_vals == 0].tolist()
        expected = [f for f in range(n_features) if f not in held][: len(fillers)]
        assert fillers == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,F,k,with_b_pre", [
    (1, 16, 100, 1, True), (7, 40, 1000, 5, False), (33, 24, 77, 3, True), (5, 384, 3000, 16, True),
    (3, 768, 2048, 32, False),
])
def test_batch_topk_matches_the_float64_batch_reference(B, d, F, k, with_b_pre, dtype):
    x, W, b, b_pre = make_encoder(B, d, F, dtype, seed=B * 100 + F)
    vals, idx = ops.batch_topk_encode(x, W, b, k, b_pre=b_pre, backend="torch")
    assert vals.dtype == dtype and idx.dtype == torch.int64 and vals.shape == idx.shape
    pre = dense_pre(x, W, b, b_pre)
    chosen = batch_topk_reference(pre.to(dtype).double(), k)  # the cut compares the values in x's dtype
    got = as_dense(vals, idx, F)
    check_padded(vals, idx, F)
    assert vals.shape[1] == max(1, int(chosen.sum(1).max()))  # k_max: the largest row's count
    scale = pre.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got, (pre * chosen).to(dtype).double(), atol=float(TOL[dtype] * scale), rtol=0)
    if dtype == torch.float32:
        assert torch.equal(got > 0, chosen)
    assert int((vals > 0).sum()) == min(B * k, int((pre > 0).sum()))


@pytest.mark.parametrize("candidates", [1, 2, 5, 64])
def test_saturated_rows_are_searched_again_and_the_selection_is_exact(candidates):
    """Few candidates per row force the search of the rows that hold more of the batch's top entries."""
    B, d, F, k = 9, 20, 64, 4
    x, W, b, b_pre = make_encoder(B, d, F, torch.float32, seed=3)
    x[0] *= 6  # row 0 holds most of the batch's largest entries
    vals, idx = batch_select.batch_topk(torch_encode.topk_encode, x, W, b, k, b_pre, candidates=candidates)
    chosen = batch_topk_reference(dense_pre(x, W, b, b_pre), k)
    assert chosen[0].sum() > candidates or candidates == 64
    assert torch.equal(as_dense(vals, idx, F) > 0, chosen)
    check_padded(vals, idx, F)


def test_ties_at_the_batch_threshold_go_to_the_lower_row_then_the_lower_feature():
    """Every row has the same pre-activations (exact ties across rows) and features 2j, 2j+1 are equal
    (ties within a row): the cut takes rows in order, and within a row the lower feature."""
    B, F, k = 4, 10, 3
    W = torch.zeros(F, 1)
    b = torch.tensor([5.0, 5.0, 4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.0])
    x = torch.ones(B, 1)
    for candidates in (2, 3, 10):
        vals, idx = batch_select.batch_topk(torch_encode.topk_encode, x, W, b, k, None, candidates=candidates)
        got = as_dense(vals, idx, F) > 0
        assert torch.equal(got, batch_topk_reference(dense_pre(x, W, b, None), k))
        # 12 slots: features 0-1 of every row (8), then 2 and 3 (value 4) go to rows 0 and 1
        assert got.sum(1).tolist() == [4, 4, 2, 2]
        assert got[0, :4].all() and got[2, :2].all() and not got[2, 2:].any()
    vals, idx = ops.batch_topk_encode(x, W, b, k, backend="torch")
    assert idx[0].tolist() == [0, 1, 2, 3] and idx[2].tolist() == [0, 1, 2, 3] and vals[2].tolist() == [5, 5, 0, 0]


def test_fewer_positives_than_the_budget_selects_them_all_and_empty_rows_fill_with_zeros():
    B, d, F, k = 6, 8, 30, 4
    x, W, b, _ = make_encoder(B, d, F, torch.float32, seed=5)
    b = b - 3.0  # almost nothing is positive
    x[2] = 0.0   # row 2: no positive at all
    vals, idx = ops.batch_topk_encode(x, W, b, k, backend="torch")
    pre = dense_pre(x, W, b, None)
    assert 0 < int((pre > 0).sum()) < B * k
    assert torch.equal(as_dense(vals, idx, F) > 0, pre > 0)
    assert vals[2].eq(0).all() and idx[2].tolist() == list(range(vals.shape[1]))


def test_nothing_positive_gives_one_zero_slot_per_row():
    x, W, b, _ = make_encoder(3, 4, 10, torch.float32, seed=6)
    vals, idx = ops.batch_topk_encode(x, W, b - 100.0, 2, backend="torch")
    assert vals.shape == (3, 1) and vals.eq(0).all() and idx.eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,F,threshold", [(1, 16, 100, 0.0), (17, 40, 500, 0.5), (4, 384, 2000, 0.3)])
def test_threshold_encode_keeps_every_entry_strictly_above_the_threshold(B, d, F, threshold, dtype):
    x, W, b, b_pre = make_encoder(B, d, F, dtype, seed=B + F)
    vals, idx = ops.threshold_encode(x, W, b, threshold, b_pre=b_pre, backend="torch", k_hint=2)
    pre = dense_pre(x, W, b, b_pre)
    rounded = pre.to(dtype).double()  # the cut compares the values in x's dtype
    expected = rounded * (rounded > threshold)
    check_padded(vals, idx, F)
    got = as_dense(vals, idx, F)
    assert (got[got > 0] > threshold).all()
    # Entries within rounding of the threshold may round to either side of it (fp32 vs float64 sums).
    clear = (pre - threshold).abs() > (0 if dtype == torch.float32 else 2 * TOL[dtype] * max(threshold, 1.0))
    scale = pre.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got[clear], expected[clear], atol=float(TOL[dtype] * scale), rtol=0)
    assert torch.equal(got[clear] > 0, expected[clear] > 0)


def test_threshold_encode_cut_is_strict_at_exact_values():
    W = torch.zeros(6, 1)
    b = torch.tensor([3.0, 2.0, 2.0, 1.0, 2.0, 0.5])
    vals, idx = ops.threshold_encode(torch.ones(2, 1), W, b, 2.0, backend="torch", k_hint=1)
    assert vals.tolist() == [[3.0], [3.0]] and idx.tolist() == [[0], [0]]
    vals, idx = ops.threshold_encode(torch.ones(2, 1), W, b, torch.tensor(1.5, dtype=torch.float64),
                                     backend="torch", k_hint=1)
    assert idx.tolist() == [[0, 1, 2, 4]] * 2


def dense_loss(x, W_enc, b_enc, b_pre, W_dec, b_dec, chosen):
    """float64 reconstruction loss with a fixed choice of (row, feature) entries."""
    pre = (x - (0 if b_pre is None else b_pre)) @ W_enc.T + b_enc
    z = torch.relu(pre) * chosen
    return ((z @ W_dec + b_dec - x.detach()) ** 2).sum()


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("mode", ["batchtopk", "jumprelu"])
def test_batch_selections_backpropagate_like_dense_autograd_on_the_chosen_entries(mode, sparse_grad):
    B, d, F, k = 11, 24, 90, 3
    x, W, b, b_pre = make_encoder(B, d, F, torch.float32, seed=7)
    W_dec = torch.randn(F, d, generator=torch.Generator().manual_seed(8)) / d**0.5
    b_dec = 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(9))
    leaves = [t.clone().requires_grad_(True) for t in (x, W, b, b_pre, W_dec, b_dec)]
    xs, Ws, bs, ps, Wd, bd = leaves
    grouping = ops.SharedGrouping()
    if mode == "batchtopk":
        vals, idx = ops.batch_topk_encode(xs, Ws, bs, k, b_pre=ps, backend="torch", sparse_grad=sparse_grad,
                                          grouping=grouping)
    else:
        vals, idx = ops.threshold_encode(xs, Ws, bs, 0.4, b_pre=ps, backend="torch", sparse_grad=sparse_grad,
                                         grouping=grouping)
    x_hat = ops.sparse_decode(vals, idx, Wd, bd, backend="torch", sparse_grad=sparse_grad, grouping=grouping)
    ((x_hat - xs.detach()) ** 2).sum().backward()
    chosen = (as_dense(vals.detach(), idx, F) > 0).double()
    ref = [t.double().clone().requires_grad_(True) for t in (x, W, b, b_pre, W_dec, b_dec)]
    dense_loss(*ref, chosen).backward()
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_pre", "W_dec", "b_dec"), leaves, ref):
        grad = got.grad.to_dense() if isinstance(got.grad, RowGrad) else got.grad
        assert isinstance(got.grad, RowGrad) == (sparse_grad and name in ("W_enc", "b_enc", "W_dec"))
        torch.testing.assert_close(grad.double(), want.grad, atol=1e-4, rtol=1e-4, msg=name)


def nested_reference(vals, idx, W_dec, b_dec, widths):
    """float64 [G, B, d]: level i decodes the slots whose feature is below widths[i]."""
    return torch.stack([
        (vals * (idx < width)).unsqueeze(1).bmm(W_dec[idx]).squeeze(1) + b_dec for width in widths
    ])


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,F,k,widths", [
    (1, 8, 10, 3, (2, 10)), (13, 24, 100, 7, (5, 20, 60, 100)), (4, 384, 1024, 16, (128, 512, 1024)),
])
def test_nested_decode_and_its_gradients_match_float64_masked_decodes(B, d, F, k, widths, dtype, sparse_grad):
    x, W, b, _ = make_encoder(B, d, F, dtype, seed=F + k)
    vals, idx = ops.topk_encode(x, W, b, k, backend="torch")
    W_dec = (torch.randn(F, d, generator=torch.Generator().manual_seed(2)) / d**0.5).to(dtype)
    b_dec = (0.1 * torch.randn(d, generator=torch.Generator().manual_seed(3))).to(dtype)
    v, Wd, bd = (t.clone().requires_grad_(True) for t in (vals, W_dec, b_dec))
    widths_t = torch.tensor(widths)
    level = ops.nested_levels(idx, widths_t)
    assert torch.equal(level, torch.searchsorted(widths_t, idx, right=True))
    levels = ops.sparse_decode_nested(v, idx, level, len(widths), Wd, bd, backend="torch", sparse_grad=sparse_grad)
    assert levels.shape == (len(widths), B, d) and levels.dtype == dtype
    weights = torch.randn(levels.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (levels.double() * weights).sum().backward()
    ref_in = [t.double().clone().requires_grad_(True) for t in (vals, W_dec, b_dec)]
    ref = nested_reference(ref_in[0], idx, ref_in[1], ref_in[2], widths)
    (ref * weights).sum().backward()
    scale = ref.detach().abs().max().clamp_min(1.0)
    torch.testing.assert_close(levels.double(), ref.to(dtype).double(), atol=float(2 * TOL[dtype] * scale), rtol=0)
    plain = ops.sparse_decode(vals, idx, W_dec, b_dec, backend="torch")
    torch.testing.assert_close(levels[-1].double(), plain.double(), atol=float(2 * TOL[dtype] * scale), rtol=0)
    assert isinstance(Wd.grad, RowGrad) == sparse_grad
    for name, got, want in zip(("vals", "W_dec", "b_dec"), (v, Wd, bd), ref_in):
        grad = got.grad.to_dense() if isinstance(got.grad, RowGrad) else got.grad
        gscale = want.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(grad.double(), want.grad, atol=float(4 * TOL[dtype] * gscale * len(widths)), rtol=0,
                                   msg=name)


def test_nested_decode_shares_the_encoders_grouping():
    x, W, b, b_pre = make_encoder(6, 12, 40, torch.float32, seed=1)
    W.requires_grad_(True)
    grouping = ops.SharedGrouping()
    vals, idx = ops.topk_encode(x, W, b, 4, b_pre=b_pre, backend="torch", sparse_grad=True, grouping=grouping)
    W_dec = torch.randn(40, 12, requires_grad=True)
    level = ops.nested_levels(idx, torch.tensor([10, 40]))
    out = ops.sparse_decode_nested(vals, idx, level, 2, W_dec, torch.zeros(12), backend="torch",
                                   sparse_grad=True, grouping=grouping)
    out.sum().backward()
    groups = grouping.groups()
    assert torch.equal(W_dec.grad.rows_values_valid()[0], groups.rows)
    assert torch.equal(W.grad.rows_values_valid()[0], groups.rows)


@pytest.mark.parametrize("call, message", [
    (lambda x, W, b: ops.batch_topk_encode(x, W, b, 0, backend="torch"), "k"),
    (lambda x, W, b: ops.batch_topk_encode(x, W[:, :3], b, 2, backend="torch"), "columns"),
    (lambda x, W, b: ops.threshold_encode(x, W, b, -0.5, backend="torch"), "threshold"),
    (lambda x, W, b: ops.threshold_encode(x, W, b, 0.5, k_hint=0, backend="torch"), "k_hint"),
    (lambda x, W, b: ops.sparse_decode_nested(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int64),
                                              torch.full((2, 2), 3), 2, W, b[:4], backend="torch"), "level"),
    (lambda x, W, b: ops.sparse_decode_nested(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int64),
                                              torch.zeros(2, 2), 2, W, b[:4], backend="torch"), "level"),
])
def test_bad_arguments_name_the_argument(call, message):
    x, W, b, _ = make_encoder(2, 4, 10, torch.float32, seed=0)
    with pytest.raises((TypeError, ValueError), match=message):
        call(x, W, b)


def test_the_triton_backend_selects_across_the_batch_as_the_torch_backend():
    """The batch selections take the backend's own per-row encoder: the Triton one (interpreted here)
    chooses the same entries."""
    x, W, b, b_pre = make_encoder(12, 32, 300, torch.float32, seed=11)
    for select in (lambda backend: ops.batch_topk_encode(x, W, b, 3, b_pre=b_pre, backend=backend),
                   lambda backend: ops.threshold_encode(x, W, b, 0.5, b_pre=b_pre, k_hint=2, backend=backend)):
        (tv, ti), (rv, ri) = select("triton"), select("torch")
        assert torch.equal(ti, ri)
        torch.testing.assert_close(tv, rv, atol=1e-5, rtol=1e-5)


def test_candidate_count_is_bounded_by_the_features_and_the_largest_k():
    """K = CANDIDATES_PER_K * k candidates per row, at most F and at most ``max_k`` (when the backend bounds k)."""
    for k, n_features, max_k in [(1, 100, None), (8, 20, None), (8, 1000, 5), (3, 1000, 1), (1, 1, 1), (50, 64, 64)]:
        count = batch_select.candidate_count(k, n_features, max_k)
        bound = min(n_features, batch_select.CANDIDATES_PER_K * k, max_k if max_k is not None else n_features)
        assert count == bound, (k, n_features, max_k)


@pytest.mark.parametrize("candidates", [2, 3])
def test_a_cut_below_one_still_searches_the_rows_holding_the_top_entries(candidates):
    """Every pre-activation below 1 (so the cut is a small positive value): the row holding most of the
    batch's top entries is saturated by its few candidates and must be searched again."""
    B, d, F, k = 6, 20, 64, 2
    x, W, b, b_pre = make_encoder(B, d, F, torch.float32, seed=7)
    x[0] *= 6  # row 0 holds most of the batch's largest entries
    scale = dense_pre(x, W, b, b_pre).abs().max().item() * 2
    W, b = W / scale, b / scale
    pre = dense_pre(x, W, b, b_pre)
    assert pre.max() < 1
    vals, idx = batch_select.batch_topk(torch_encode.topk_encode, x, W, b, k, b_pre, candidates=candidates)
    chosen = batch_topk_reference(pre, k)
    assert chosen[0].sum() > candidates
    assert torch.equal(as_dense(vals, idx, F) > 0, chosen)


def test_the_search_of_saturated_rows_sweeps_every_feature_in_small_chunks(monkeypatch):
    """The saturated rows' search over all features, a few features per chunk: every chunk's entries at
    their own feature indices, none missed, none twice."""
    monkeypatch.setattr(batch_select, "CHUNK_ELEMENTS", 50)
    B, d, F, k = 9, 20, 64, 4
    x, W, b, b_pre = make_encoder(B, d, F, torch.float32, seed=3)
    x[0] *= 6  # row 0 holds most of the batch's largest entries
    vals, idx = batch_select.batch_topk(torch_encode.topk_encode, x, W, b, k, b_pre, candidates=2)
    chosen = batch_topk_reference(dense_pre(x, W, b, b_pre), k)
    assert chosen[0].sum() > 2
    assert torch.equal(as_dense(vals, idx, F) > 0, chosen)
    check_padded(vals, idx, F)


def test_padded_rows_of_an_empty_batch_and_of_a_row_next_to_one_holding_every_feature():
    """pad_rows: no tokens give one (empty) slot per row; a row holding nothing, beside one that holds all F
    features, is filled with the F lowest features in order."""
    none = torch.zeros(0, dtype=torch.int64)
    vals, idx = batch_select.pad_rows(none, none, torch.zeros(0), 0, 10)
    assert vals.shape == idx.shape == (0, 1)
    rows, cols = torch.zeros(3, dtype=torch.int64), torch.tensor([2, 0, 1])
    vals, idx = batch_select.pad_rows(rows, cols, torch.tensor([3.0, 2.0, 1.0]), 2, 3)
    assert idx.tolist() == [[2, 0, 1], [0, 1, 2]] and vals.tolist() == [[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]]
