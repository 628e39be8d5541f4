"""The functional API on the torch backend: values and gradients against float64 dense references."""
from __future__ import annotations

import pytest
import torch

from flashsae import ops
from flashsae.kernels import reference, torch_encode
from flashsae.kernels.registry import resolve_backend
from flashsae.rowgrad import RowGrad
from tests.alloc_log import AllocationLog
from tests.grads import touched_rows
from tests.oracles import torch_backend_variant
from tests.tolerance import assert_topk_selection, assert_within, rounding_bound

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_encoder(B, d, F, dtype, seed, with_b_pre=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(F, d, generator=g) / d**0.5
    b = 0.1 * torch.randn(F, generator=g)
    b_pre = 0.1 * torch.randn(d, generator=g) if with_b_pre else None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(x), cast(W), cast(b), cast(b_pre)


def dense_pre(x, W, b, b_pre):
    """float64 relu((x - b_pre) @ W.T + b) from the given (possibly low-precision) inputs."""
    xc = x.double() - (0 if b_pre is None else b_pre.double())
    return torch.relu(xc @ W.double().T + b.double())


def dense_pre_magnitude(x, W, b, b_pre):
    """float64 (|x| + |b_pre|) @ |W|.T + |b|: the size of each pre-activation's terms (tests/tolerance.py)."""
    xc = x.double().abs() + (0 if b_pre is None else b_pre.double().abs())
    return xc @ W.double().abs().T + b.double().abs()


def stable_topk(pre, k):
    """Top-k with ties to the lower index: a stable descending sort."""
    order = torch.sort(pre, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,d,F,k,with_b_pre",
    [(1, 16, 100, 1, True), (7, 40, 1000, 5, False), (64, 96, 4099, 32, True), (33, 40, 100, 64, True)],
)
def test_topk_encode_matches_float64_reference(B, d, F, k, with_b_pre, dtype):
    """The selection is the float64 one of the same (rounded) inputs up to fp32 accumulation, exactly
    on every row clear of near-ties; each value is its feature's pre-activation rounded once to the dtype."""
    x, W, b, b_pre = make_encoder(B, d, F, dtype, seed=B * 1000 + F)
    vals, idx = ops.topk_encode(x, W, b, k, b_pre=b_pre, backend="torch")
    pre, magnitude = dense_pre(x, W, b, b_pre), dense_pre_magnitude(x, W, b, b_pre)
    assert vals.dtype == dtype and idx.dtype == torch.int64 and vals.shape == idx.shape == (B, k)
    accumulation = rounding_bound(magnitude, torch.float32, roundings=1, terms=d + 2)
    assert_topk_selection(vals, idx, pre, accumulation, k)
    value_bound = rounding_bound(magnitude.gather(1, idx), dtype, roundings=1, terms=d + 2)
    assert_within(vals, pre.gather(1, idx), value_bound, "vals")
    assert (vals[:, :-1] >= vals[:, 1:]).all()


def test_topk_encode_chunked_sweep_equals_one_chunk():
    x, W, b, b_pre = make_encoder(9, 24, 1000, torch.float32, seed=3)
    one = torch_encode.topk_encode(x, W, b, 7, b_pre)
    chunked = torch_encode.topk_encode(x, W, b, 7, b_pre, chunk_size=13)
    assert torch.equal(one[0], chunked[0]) and torch.equal(one[1], chunked[1])


def test_topk_encode_ties_go_to_lower_index():
    x, W, b, _ = make_encoder(5, 16, 40, torch.float32, seed=4)
    W[30] = W[7]
    b[30] = b[7]
    W[12] = W[3]
    b[12] = b[3]
    b += 10.0  # everything positive, so every duplicated pair is in play
    vals, idx = ops.topk_encode(x, W, b, 40, backend="torch")
    ref_vals, ref_idx = stable_topk(dense_pre(x, W, b, None).float().double(), 40)
    for row in idx.tolist():
        assert row.index(7) < row.index(30) and row.index(3) < row.index(12)


def test_topk_encode_rows_without_positive_values_return_lowest_indices():
    x, W, b, _ = make_encoder(6, 16, 50, torch.float32, seed=5)
    b -= 100.0
    x[2] = 0.0
    vals, idx = ops.topk_encode(x, W, b, 8, backend="torch")
    assert torch.equal(vals, torch.zeros(6, 8))
    assert torch.equal(idx, torch.arange(8).expand(6, -1))


def test_topk_encode_partial_rows_fill_with_lowest_unchosen_indices():
    x, W, b, _ = make_encoder(4, 16, 30, torch.float32, seed=6)
    b -= 100.0
    b[[21, 4]] = 200.0  # exactly two positive features per row
    vals, idx = ops.topk_encode(x, W, b, 5, backend="torch")
    ref_vals, ref_idx = stable_topk(dense_pre(x, W, b, None), 5)
    assert torch.equal(idx, ref_idx)
    assert (vals[:, :2] > 0).all() and (vals[:, 2:] == 0).all()
    assert torch.equal(idx[:, 2:], torch.tensor([0, 1, 2]).expand(4, -1))


def test_topk_encode_k_equal_to_n_features():
    x, W, b, b_pre = make_encoder(3, 16, 37, torch.float32, seed=7)
    vals, idx = ops.topk_encode(x, W, b, 37, b_pre=b_pre, backend="torch")
    ref_vals, ref_idx = stable_topk(dense_pre(x, W, b, b_pre), 37)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals.double(), ref_vals, atol=1e-5, rtol=0)


def dense_sae_loss(x, W_enc, b_enc, b_pre, W_dec, b_dec, idx):
    """The float64 dense forward with the selection fixed to ``idx``; used for autograd references."""
    pre = torch.relu((x - b_pre) @ W_enc.T + b_enc)
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx))
    x_hat = z @ W_dec + b_dec
    return x_hat


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,F,k", [(1, 24, 50, 1), (9, 24, 50, 8), (64, 100, 1000, 33)])
def test_encode_decode_gradients_match_dense_autograd(B, d, F, k, dtype, sparse_grad):
    x, W_enc, b_enc, b_pre = make_encoder(B, d, F, dtype, seed=11 + B + k)
    g = torch.Generator().manual_seed(12)
    b_enc = (b_enc.float() - 0.05).to(dtype)  # some rows end with fewer than k positive values
    W_dec = torch.randn(F, d, generator=g).to(dtype)
    b_dec = torch.randn(d, generator=g).to(dtype)
    grad_out = torch.randn(B, d, generator=g).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_pre, W_dec, b_dec)]
    lx, lWe, lbe, lbp, lWd, lbd = leaves
    vals, idx = ops.topk_encode(lx, lWe, lbe, k, b_pre=lbp, backend="torch", sparse_grad=sparse_grad)
    x_hat = ops.sparse_decode(vals, idx, lWd, lbd, backend="torch", sparse_grad=sparse_grad)
    x_hat.backward(grad_out)

    refs = [t.detach().double().requires_grad_() for t in leaves]
    ref_hat = dense_sae_loss(*refs[:4], refs[4], refs[5], idx)
    ref_hat.backward(grad_out.double())

    # Two roundings to the dtype on every path (vals or grad_vals, then the output), fp32 sums over
    # d (the encoder, row dots), k (decode, grad_x) and B * k (the row sums) terms.
    magnitudes = dense_sae_magnitudes(x, W_enc, b_enc, b_pre, W_dec, b_dec, idx, vals > 0, grad_out)
    bound = lambda m: rounding_bound(m, dtype, roundings=2, terms=2 * d + k + B * k)  # noqa: E731
    assert_within(x_hat, ref_hat.detach(), bound(magnitudes[0]), "x_hat")
    names = ("x", "W_enc", "b_enc", "b_pre", "W_dec", "b_dec")
    for name, leaf, ref, magnitude in zip(names, leaves, refs, magnitudes[1:]):
        grad = leaf.grad
        if name in ("W_enc", "b_enc", "W_dec"):
            assert isinstance(grad, RowGrad) == sparse_grad, name
            if sparse_grad:
                fired = torch.unique(idx[vals > 0])
                assert torch.equal(touched_rows(grad), fired), f"{name}: sparse rows are the features that fired"
                grad = grad.to_dense()
        assert grad.dtype == leaf.dtype, name
        assert_within(grad, ref.grad, bound(magnitude), f"grad {name}")


def dense_sae_magnitudes(x, W_enc, b_enc, b_pre, W_dec, b_dec, idx, fired, grad_out):
    """x_hat and the gradients of (x, W_enc, b_enc, b_pre, W_dec, b_dec) computed on absolute values with
    the selection ``idx`` and its ReLU gate ``fired`` fixed: the size of every element's terms."""
    leaves = [t.detach().double().abs().requires_grad_() for t in (x, W_enc, b_enc, b_pre, W_dec, b_dec)]
    ax, aWe, abe, abp, aWd, abd = leaves
    pre = (ax + abp) @ aWe.T + abe
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx) * fired)
    x_hat = z @ aWd + abd
    x_hat.backward(grad_out.double().abs())
    return [x_hat.detach(), *(t.grad for t in leaves)]


def test_sparse_decode_matches_float64_reference():
    g = torch.Generator().manual_seed(14)
    for dtype in DTYPES:
        vals = torch.rand(9, 8, generator=g).to(dtype)
        idx = torch.randint(0, 50, (9, 8), generator=g)
        idx[3] = idx[0]  # the same features in several tokens
        W = torch.randn(50, 24, generator=g).to(dtype)
        b = torch.randn(24, generator=g).to(dtype)
        x_hat = ops.sparse_decode(vals, idx, W, b, backend="torch")
        ref = torch.einsum("tk,tkd->td", vals.double(), W.double()[idx]) + b.double()
        magnitude = torch.einsum("tk,tkd->td", vals.double().abs(), W.double().abs()[idx]) + b.double().abs()
        assert x_hat.dtype == dtype
        assert_within(x_hat, ref, rounding_bound(magnitude, dtype, roundings=1, terms=9), f"x_hat {dtype}")


def test_torch_encoder_memory_stays_far_below_dense_preactivations():
    B, d, F, k = 256, 16, 1 << 18, 32
    x, W, b, _ = make_encoder(B, d, F, torch.float32, seed=15)
    with AllocationLog() as log:
        vals, idx = ops.topk_encode(x, W, b, k, backend="torch")
    dense_bytes = B * F * 4
    assert log.peak_bytes < dense_bytes / 2, (log.peak_bytes, dense_bytes)
    assert log.largest_numel < B * F
    # The detector itself sees a dense [B, F] product when one is made.
    with AllocationLog() as dense_log:
        torch.relu(x @ W.T + b).topk(k)
    assert dense_log.peak_bytes >= dense_bytes


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x, W, b: ops.topk_encode(x, W, b, 0), "k must be in"),
        (lambda x, W, b: ops.topk_encode(x, W, b, 51), "k must be in"),
        (lambda x, W, b: ops.topk_encode(x, W, b, 2.0), "k must be an int"),
        (lambda x, W, b: ops.topk_encode(x[:, :5], W, b, 3), "x has 5 columns"),
        (lambda x, W, b: ops.topk_encode(x, W, b[:7], 3), "b_enc must have shape"),
        (lambda x, W, b: ops.topk_encode(x, W.double(), b, 3), "W_enc has dtype torch.float64 but x has torch.float32"),
        (lambda x, W, b: ops.topk_encode(x, W.half(), b, 3), "W_enc has dtype"),
        (lambda x, W, b: ops.topk_encode(x[0], W, b, 3), "x must be 2-D"),
        (lambda x, W, b: ops.topk_encode(x, W, b, 3, b_pre=x[0, :3]), "b_pre must have shape"),
        (lambda x, W, b: ops.topk_encode(x, W, b, 3, backend="cuda"), "backend must be one of"),
        (lambda x, W, b: ops.topk_encode(x, W.to(torch.int32), b, 3), "W_enc must be float32, bfloat16, float16 or float64"),
        (lambda x, W, b: ops.topk_encode(x.double(), W.double(), b, 3), "b_enc has dtype torch.float32 but x has torch.float64"),
        (lambda x, W, b: ops.sparse_decode(x[:, :4], torch.zeros(3, 4, dtype=torch.int32), W, b[:8]), "idx must be an int64"),
        (lambda x, W, b: ops.sparse_decode(x[:, :4], torch.full((3, 4), 50), W, b[:8]), "idx entries must lie in"),
        (lambda x, W, b: ops.sparse_decode(x[:, :4], torch.zeros(3, 5, dtype=torch.long), W, b[:8]), "idx must have shape"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(call, message):
    g = torch.Generator().manual_seed(16)
    x, W, b = torch.randn(3, 8, generator=g), torch.randn(50, 8, generator=g), torch.randn(50, generator=g)
    with pytest.raises((ValueError, TypeError), match=message):
        call(x, W, b)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.topk_encode(torch.randn(2, 8), torch.randn(5, 8), torch.randn(5), 2, backend="triton")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


def test_non_contiguous_inputs_give_the_same_result():
    x, W, b, b_pre = make_encoder(7, 40, 100, torch.float32, seed=17)
    W_t = W.T.contiguous().T  # same values, column-major
    x_t = x.T.contiguous().T
    assert not W_t.is_contiguous() and not x_t.is_contiguous()
    a = ops.topk_encode(x, W, b, 5, b_pre=b_pre, backend="torch")
    c = ops.topk_encode(x_t, W_t, b, 5, b_pre=b_pre, backend="torch")
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("cpu_sparse_products", [True, False])
def test_every_chunked_loop_of_the_torch_backend_matches_float64(monkeypatch, sparse_grad, cpu_sparse_products):
    """CHUNK_ELEMENTS shrunk so each loop of the torch backend runs several chunks with a ragged last one:
    the encoder's feature sweep (`torch_encode.feature_chunk_size`), gather_rows' and row_dots' token
    chunks and segment_rows' pair chunks (`reference`, with its CPU sparse products turned off, as off
    the CPU); forward and every gradient still match float64 autograd."""
    B, d, F, k = 23, 384, 300, 7
    if not cpu_sparse_products:
        monkeypatch.setattr(reference, "_sparse_on_cpu", lambda t, n_pairs: False)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * k * d + 5)
    monkeypatch.setattr(torch_encode, "CHUNK_ELEMENTS", 2 * k * d + 5)
    assert torch_encode.feature_chunk_size(B, F) == (2 * k * d + 5) // B == 233  # 2 chunks: 233 + 67 features
    assert reference._chunk_step(k * d) == 2 and reference._chunk_step(d) == 2 * k
    x, W_enc, b_enc, b_pre = make_encoder(B, d, F, torch.float32, seed=31)
    g = torch.Generator().manual_seed(32)
    W_dec, b_dec = torch.randn(F, d, generator=g) / d**0.5, torch.randn(d, generator=g)
    grad_out = torch.randn(B, d, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_pre, W_dec, b_dec)]
    vals, idx = ops.topk_encode(*leaves[:3], k, b_pre=leaves[3], backend="torch", sparse_grad=sparse_grad)
    x_hat = ops.sparse_decode(vals, idx, leaves[4], leaves[5], backend="torch", sparse_grad=sparse_grad)
    x_hat.backward(grad_out)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    assert torch.equal(idx, stable_topk(dense_pre(*(r.detach() for r in refs[:4])), k)[1])
    ref_hat = dense_sae_loss(*refs[:4], refs[4], refs[5], idx)
    ref_hat.backward(grad_out.double())
    torch.testing.assert_close(x_hat.double(), ref_hat.detach(), rtol=1e-5, atol=1e-5)
    for name, leaf, ref in zip(("x", "W_enc", "b_enc", "b_pre", "W_dec", "b_dec"), leaves, refs):
        grad = leaf.grad.to_dense() if isinstance(leaf.grad, RowGrad) else leaf.grad
        torch.testing.assert_close(grad.double(), ref.grad, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# Every backend: NaN / Inf checks, no tokens, autocast, float64.

ALL_BACKENDS = ["torch", "triton", "triton-fused"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_x_is_a_value_error_naming_the_first_bad_row(backend, bad):
    x, W, b, b_pre = make_encoder(6, 16, 50, torch.float32, seed=20)
    x[4, 3] = bad
    x[2, 0] = bad
    with pytest.raises(ValueError, match="x row 2 contains NaN or Inf"):
        ops.topk_encode(x, W, b, 5, b_pre=b_pre, backend=backend)
    vals, idx = ops.topk_encode(x, W, b, 5, b_pre=b_pre, backend=backend, check_finite=False)
    clean = ops.topk_encode(x[[0, 1, 3, 5]], W, b, 5, b_pre=b_pre, backend=backend)
    assert torch.equal(idx[[0, 1, 3, 5]], clean[1]), "the check is skipped; other rows are unaffected"
    assert not torch.isnan(vals).any(), "a NaN pre-activation is never selected"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_pre_activations_give_the_same_answer_on_every_backend(backend):
    x, W, b, b_pre = make_encoder(7, 16, 300, torch.float32, seed=21)
    W[[5, 77]] = float("nan")
    b[[6, 150]] = float("nan")
    ref = ops.topk_encode(x, W, b, 9, b_pre=b_pre, backend="torch")
    got = ops.topk_encode(x, W, b, 9, b_pre=b_pre, backend=backend)
    assert torch.equal(got[1], ref[1])
    assert not torch.isin(ref[1], torch.tensor([5, 6, 77, 150])).any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tokens_forward_and_backward(backend, dtype):
    x, W_enc, b_enc, b_pre = make_encoder(0, 16, 40, dtype, seed=22)
    W_dec, b_dec = W_enc.clone(), torch.zeros(16, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_pre, W_dec, b_dec)]
    vals, idx = ops.topk_encode(*leaves[:3], 5, b_pre=leaves[3], backend=backend, sparse_grad=True)
    assert vals.shape == idx.shape == (0, 5) and vals.dtype == dtype and idx.dtype == torch.int64
    x_hat = ops.sparse_decode(vals, idx, leaves[4], leaves[5], backend=backend, sparse_grad=True)
    assert x_hat.shape == (0, 16) and x_hat.dtype == dtype
    x_hat.sum().backward()
    assert leaves[0].grad.shape == (0, 16)
    assert isinstance(leaves[1].grad, RowGrad) and not leaves[1].grad.rows_values_valid()[2].any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_autocast_changes_neither_dtypes_nor_the_selection(backend):
    """Under CPU autocast to bf16 the ops run in their inputs' own dtype (fp32 here), exactly as outside."""
    x, W_enc, b_enc, b_pre = make_encoder(9, 24, 200, torch.float32, seed=23)
    W_dec, b_dec = W_enc.clone(), 0.1 * torch.ones(24)
    grad_out = torch.randn(9, 24, generator=torch.Generator().manual_seed(24))
    results = []
    for autocast in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_pre, W_dec, b_dec)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            vals, idx = ops.topk_encode(*leaves[:3], 8, b_pre=leaves[3], backend=backend)
            x_hat = ops.sparse_decode(vals, idx, leaves[4], leaves[5], backend=backend)
            x_hat.backward(grad_out)
        assert vals.dtype == x_hat.dtype == torch.float32
        results.append((vals.detach(), idx, x_hat.detach(), [leaf.grad for leaf in leaves]))
    (v0, i0, h0, g0), (v1, i1, h1, g1) = results
    assert torch.equal(i0, i1) and torch.equal(v0, v1) and torch.equal(h0, h1)
    for a, c in zip(g0, g1):
        assert torch.equal(a, c)


def test_encode_decode_float64_gradcheck():
    x, W_enc, b_enc, b_pre = make_encoder(5, 6, 30, torch.float64, seed=25)
    b_enc = b_enc + 0.3  # several positive values per row, none near a tie
    W_dec = torch.randn(30, 6, generator=torch.Generator().manual_seed(26), dtype=torch.float64)
    b_dec = torch.randn(6, generator=torch.Generator().manual_seed(27), dtype=torch.float64)

    def sae(x, W_enc, b_enc, b_pre, W_dec, b_dec):
        vals, idx = ops.topk_encode(x, W_enc, b_enc, 4, b_pre=b_pre, backend="torch")
        return ops.sparse_decode(vals, idx, W_dec, b_dec, backend="torch")

    inputs = tuple(t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_pre, W_dec, b_dec))
    assert torch.autograd.gradcheck(sae, inputs)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_float64_end_to_end_matches_dense_autograd_and_sparse_adam_steps_in_float64(sparse_grad):
    from flashsae.optim import SparseAdam

    x, W_enc, b_enc, b_pre = make_encoder(16, 24, 300, torch.float64, seed=28)
    g = torch.Generator().manual_seed(29)
    W_dec, b_dec = torch.randn(300, 24, generator=g, dtype=torch.float64), torch.randn(24, generator=g, dtype=torch.float64)
    leaves = [torch.nn.Parameter(t.clone()) for t in (x, W_enc, b_enc, b_pre, W_dec, b_dec)]
    vals, idx = ops.topk_encode(*leaves[:3], 10, b_pre=leaves[3], backend="torch", sparse_grad=sparse_grad)
    x_hat = ops.sparse_decode(vals, idx, leaves[4], leaves[5], backend="torch", sparse_grad=sparse_grad)
    assert x_hat.dtype == torch.float64
    x_hat.square().sum().backward()
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    dense_sae_loss(*refs, idx).square().sum().backward()
    for leaf, ref in zip(leaves, refs):
        grad = leaf.grad.to_dense() if isinstance(leaf.grad, RowGrad) else leaf.grad
        assert grad.dtype == torch.float64
        torch.testing.assert_close(grad, ref.grad, rtol=1e-10, atol=1e-10)
    before = leaves[1].detach().clone()
    SparseAdam(leaves[1:3], lr=1e-3, backend="torch").step()
    grad = refs[1].grad
    expected = before - 1e-3 * grad / (grad.abs() + 1e-8)  # Adam's first step: m_hat = g, sqrt(v_hat) = |g|
    touched = grad.abs().sum(1) > 0
    torch.testing.assert_close(leaves[1].detach()[touched], expected[touched], rtol=0, atol=1e-15)
    assert torch.equal(leaves[1].detach()[~touched], before[~touched])
    with pytest.raises(TypeError, match="float64 tensor, which backend 'triton' does not take"):
        SparseAdam(leaves[1:3], lr=1e-3, backend="triton").step()


def test_torch_encoder_threads_do_not_share_its_pre_activation_buffer():
    """Each thread encodes into its own kept buffer: two threads encoding side by side get the answers
    they get alone."""
    import threading

    inputs = [make_encoder(64, 48, 3000, torch.float32, seed=40 + i) for i in range(2)]
    alone = [torch_encode.topk_encode(x, W, b, 9, b_pre) for x, W, b, b_pre in inputs]
    results: list[list] = [[], []]
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        for _ in range(20):
            results[i].append(torch_encode.topk_encode(*inputs[i][:3], 9, inputs[i][3]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(results[i]) == 20
        for vals, idx in results[i]:
            assert torch.equal(vals, alone[i][0]) and torch.equal(idx, alone[i][1])


def test_a_mask_selects_only_among_its_features():
    """``mask``: the top-k of the masked features alone (float64, so the values are the reference's)."""
    x, W, b, b_pre = make_encoder(9, 24, 300, torch.float64, seed=41)
    mask = torch.rand(300, generator=torch.Generator().manual_seed(42)) < 0.3
    b = b + 10.0 * mask  # every masked feature fires, so no row fills zeros
    vals, idx = ops.topk_encode(x, W, b, 7, b_pre=b_pre, mask=mask, backend="torch")
    pre = dense_pre(x, W, b, b_pre).masked_fill(~mask, -1.0)
    want_vals, want_idx = stable_topk(pre, 7)
    assert torch.equal(idx, want_idx) and mask[idx].all()
    torch.testing.assert_close(vals, want_vals, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("which", ["x", "W_enc", "b_enc", "b_pre"])
def test_a_gradient_reaches_an_input_that_alone_asks_for_it(which, sparse_grad):
    """One input requires a gradient, the others are frozen (an attribution to x through a fixed SAE, a
    frozen encoder with a trained bias, ...): its gradient is the dense float64 one, the others get none."""
    inputs = dict(zip(("x", "W_enc", "b_enc", "b_pre"), make_encoder(9, 24, 300, torch.float64, seed=43)))
    inputs[which] = inputs[which].clone().requires_grad_()
    x, W, b, b_pre = inputs.values()
    vals, idx = ops.topk_encode(x, W, b, 6, b_pre=b_pre, backend="torch", sparse_grad=sparse_grad)
    weights = torch.randn(vals.shape, generator=torch.Generator().manual_seed(44), dtype=torch.float64)
    (vals * weights).sum().backward()
    ref = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    (dense_pre(*ref.values()).gather(1, idx) * weights).sum().backward()
    grad = inputs[which].grad
    grad = grad.to_dense() if isinstance(grad, RowGrad) else grad
    torch.testing.assert_close(grad, ref[which].grad, rtol=1e-12, atol=1e-12)
    assert all(t.grad is None for name, t in inputs.items() if name != which)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_a_grouping_limited_to_some_pairs_gives_gradients_from_those_pairs_only(sparse_grad):
    """`SharedGrouping.limit_to` before the backward: the rows of W_enc and b_enc get the gradient of the
    given pairs alone (the others' gradients are known to be zero); x's gradient is untouched by it.
    Once the pairs are grouped, limiting them is an error."""
    x, W, b, b_pre = (t.clone().requires_grad_() for t in make_encoder(9, 24, 300, torch.float64, seed=45))
    grouping = ops.SharedGrouping()
    vals, idx = ops.topk_encode(x, W, b, 6, b_pre=b_pre, backend="torch", sparse_grad=sparse_grad, grouping=grouping)
    fired = (vals > 0) & (torch.rand(vals.shape, generator=torch.Generator().manual_seed(46)) < 0.5)
    grouping.limit_to(fired)
    weights = torch.randn(vals.shape, generator=torch.Generator().manual_seed(47), dtype=torch.float64)
    (vals * weights).sum().backward()
    with pytest.raises(RuntimeError, match="already grouped"):
        grouping.limit_to(fired)
    ref = [t.detach().clone().requires_grad_() for t in (x, W, b, b_pre)]
    (dense_pre(*ref).gather(1, idx) * weights * fired).sum().backward()
    for leaf, want in ((W, ref[1].grad), (b, ref[2].grad)):
        got = leaf.grad.to_dense() if isinstance(leaf.grad, RowGrad) else leaf.grad
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ref_x = x.detach().clone().requires_grad_()
    (dense_pre(ref_x, *(t.detach() for t in (W, b, b_pre))).gather(1, idx) * weights).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["vals", "W_dec", "b_dec"])
def test_a_decode_gradient_reaches_an_input_that_alone_asks_for_it(which):
    """One of vals, W_dec, b_dec requires a gradient (a frozen decoder under a trained encoder, ...): its
    gradient is the dense float64 one and the frozen ones get none."""
    g = torch.Generator().manual_seed(48)
    inputs = {"vals": torch.rand(9, 8, generator=g, dtype=torch.float64),
              "W_dec": torch.randn(50, 24, generator=g, dtype=torch.float64),
              "b_dec": torch.randn(24, generator=g, dtype=torch.float64)}
    idx = torch.randint(0, 50, (9, 8), generator=g)
    inputs[which] = inputs[which].clone().requires_grad_()
    grad_out = torch.randn(9, 24, generator=g, dtype=torch.float64)
    ops.sparse_decode(inputs["vals"], idx, inputs["W_dec"], inputs["b_dec"], backend="torch").backward(grad_out)
    ref = {name: t.detach().clone().requires_grad_(name == which) for name, t in inputs.items()}
    (torch.einsum("tk,tkd->td", ref["vals"], ref["W_dec"][idx]) + ref["b_dec"]).backward(grad_out)
    torch.testing.assert_close(inputs[which].grad, ref[which].grad, rtol=1e-12, atol=1e-12)
    assert all(t.grad is None for name, t in inputs.items() if name != which)


def _encoder_ops_with_defaults(W, dead):
    """Each encoder op called with its defaults (x, b_enc, b_pre fixed by the caller): name -> call(x, b_enc)."""
    return {
        "topk_encode": lambda x, b: ops.topk_encode(x, W, b, 3, backend="torch"),
        "topk_encode_with_aux": lambda x, b: ops.topk_encode_with_aux(x, W, b, 3, 4, dead, backend="torch")[:2],
        "batch_topk_encode": lambda x, b: ops.batch_topk_encode(x, W, b, 3, backend="torch"),
        "threshold_encode": lambda x, b: ops.threshold_encode(x, W, b, 0.1, backend="torch"),
    }


@pytest.mark.parametrize("name", ["topk_encode", "topk_encode_with_aux", "batch_topk_encode", "threshold_encode"])
def test_encoder_defaults_are_dense_gradients_and_a_finite_check(name):
    """Without options an encoder gives W_enc and b_enc plain dense gradients (RowGrad is an opt-in)
    and rejects non-finite x."""
    x, W, b, _ = make_encoder(5, 16, 60, torch.float32, seed=49)
    W, b = W.requires_grad_(), b.requires_grad_()
    call = _encoder_ops_with_defaults(W, torch.arange(60) % 2 == 0)[name]
    vals, _ = call(x, b)
    vals.sum().backward()
    assert type(W.grad) is torch.Tensor and type(b.grad) is torch.Tensor
    x[2, 5] = float("nan")
    with pytest.raises(ValueError, match="row 2"):
        call(x, b.detach())


@pytest.mark.parametrize("nested", [False, True])
def test_decoder_defaults_are_dense_gradients(nested):
    g = torch.Generator().manual_seed(50)
    vals, idx = torch.rand(9, 8, generator=g), torch.randint(0, 50, (9, 8), generator=g)
    W, b = torch.randn(50, 24, generator=g).requires_grad_(), torch.randn(24, generator=g)
    if nested:
        ops.sparse_decode_nested(vals, idx, torch.arange(8).expand(9, 8) // 4, 2, W, b, backend="torch").sum().backward()
    else:
        ops.sparse_decode(vals, idx, W, b, backend="torch").sum().backward()
    assert type(W.grad) is torch.Tensor


@pytest.mark.parametrize("nested", [False, True])
def test_decode_index_checks_reject_the_first_index_past_the_end_and_accept_the_last(nested):
    """idx = F (and level = n_levels) is one past the end: a ValueError naming the range; F - 1 and
    n_levels - 1 pass; a batch of no tokens is checked without error."""
    g = torch.Generator().manual_seed(51)
    vals, W, b = torch.rand(4, 3, generator=g), torch.randn(20, 6, generator=g), torch.randn(6, generator=g)
    level = torch.zeros(4, 3, dtype=torch.int64)

    def decode(idx, level=level, vals=vals):
        if nested:
            return ops.sparse_decode_nested(vals, idx, level, 2, W, b, backend="torch")
        return ops.sparse_decode(vals, idx, W, b, backend="torch")

    last = torch.full((4, 3), 19, dtype=torch.int64)
    decode(last)
    with pytest.raises(ValueError, match=r"idx entries must lie in \[0, 20\), got \[19, 20\]"):
        decode(torch.cat([last[:, :2], last[:, 2:] + 1], 1))
    empty = torch.empty(0, 3, dtype=torch.int64)
    assert decode(empty, level=empty, vals=vals[:0]).shape[-2:] == (0, 6)
    if nested:
        decode(last, level=torch.ones(4, 3, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"level entries must lie in \[0, 2\), got \[0, 2\]"):
            decode(last, level=torch.tensor([[0, 1, 2]] * 4))


def test_a_dtype_the_backend_does_not_take_is_named_with_the_ones_it_does():
    x, W, b, _ = make_encoder(3, 8, 20, torch.float64, seed=52)
    with torch_backend_variant("fp32-only", float_dtypes=(torch.float32,)):
        with pytest.raises(TypeError, match=r"x is float64, which backend 'fp32-only' does not take "
                                            r"\(it takes float32\); float64 runs on backend='torch'"):
            ops.topk_encode(x, W, b, 2, backend="fp32-only")
