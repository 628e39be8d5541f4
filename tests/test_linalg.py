import pytest
import torch

from flashsae.linalg import passes_needed, randomized_svd

F64 = torch.float64


def make_matrix(n: int, d: int, s: torch.Tensor, seed: int, batch: tuple = ()) -> torch.Tensor:
    """A = U diag(s) V^T [*batch, n, d] in float64 with random orthonormal U [n, k], V [d, k]."""
    g = torch.Generator().manual_seed(seed)
    k = min(s.shape[-1], n, d)
    s = s[..., :k]
    U = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(*batch, d, k, generator=g, dtype=F64)).Q
    return (U * s.to(F64)) @ V.transpose(-1, -2)


def exact(A: torch.Tensor, rank: int, center: bool = False):
    A = A.to(F64)
    if center:
        A = A - A.mean(dim=-2, keepdim=True)
    _, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return S[..., :rank], Vh[..., :rank, :].transpose(-1, -2)


def sin_theta(V1: torch.Tensor, V2: torch.Tensor) -> float:
    """Sine of the largest principal angle between the spans of orthonormal V1, V2 [d, k]:
    ||(I - V2 V2^T) V1||_2 (accurate to eps, unlike sqrt(1 - cos^2))."""
    V1, V2 = V1.to(F64), V2.to(F64)
    return torch.linalg.matrix_norm(V1 - V2 @ (V2.transpose(-1, -2) @ V1), ord=2).item()


def rel_err(S: torch.Tensor, S_ref: torch.Tensor) -> float:
    return ((S.to(F64) - S_ref) / S_ref).abs().max().item()


FAST = 0.5 ** torch.arange(40, dtype=F64)
SLOW = 1.0 / (torch.arange(40, dtype=F64) + 1)


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_fast_decay_matches_exact_svd(method):
    A = make_matrix(257, 61, FAST, seed=1)
    S_ref, V_ref = exact(A, 8)
    res = randomized_svd(A, 8, method=method, n_iter=2, seed=0, dtype=F64)
    assert res.S.shape == (8,) and res.V.shape == (61, 8)
    assert res.S.dtype == F64 and res.V.dtype == F64
    assert rel_err(res.S, S_ref) < 1e-3
    assert sin_theta(res.V, V_ref) < 1e-6
    # columns match one by one (signs are fixed deterministically, so compare up to sign)
    assert torch.allclose((res.V * V_ref).sum(0).abs(), torch.ones(8, dtype=F64), atol=1e-8)


def test_slow_decay_converges_with_n_iter():
    # s_i = 1/(i+1): s_8/s_9 = 1.1, so the top-8 subspace needs several iterations;
    # n_iter = 6 brings the leading values within 1e-3.
    A = make_matrix(301, 67, SLOW, seed=2)
    S_ref, V_ref = exact(A, 8)
    errs = []
    for q in range(0, 7):
        res = randomized_svd(A, 8, method="randomized", n_iter=q, oversample=10, seed=3, dtype=F64)
        errs.append(torch.linalg.matrix_norm(res.V - V_ref @ (V_ref.T @ res.V)).item())
        if q == 6:
            assert rel_err(res.S, S_ref) < 1e-3
            assert sin_theta(res.V, V_ref) < 1e-2
    # ||(I - V_ref V_ref^T) V||_F is non-increasing in n_iter (same seed, same sketch)
    for a, b in zip(errs, errs[1:]):
        assert b <= a * 1.02 + 1e-12, errs
    assert errs[-1] < 0.05 * errs[0], errs


def test_more_iterations_beat_one_pass_sketch_on_singular_values():
    A = make_matrix(200, 50, SLOW, seed=4)
    S_ref, _ = exact(A, 5)
    e0 = rel_err(randomized_svd(A, 5, method="randomized", n_iter=0, seed=5, dtype=F64).S, S_ref)
    e4 = rel_err(randomized_svd(A, 5, method="randomized", n_iter=4, seed=5, dtype=F64).S, S_ref)
    assert e4 < e0 and e4 < 1e-3


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_batched_equals_per_matrix(method):
    A = make_matrix(150, 37, FAST, seed=6, batch=(2, 3))
    res = randomized_svd(A, 6, method=method, n_iter=2, seed=0, dtype=F64)
    assert res.S.shape == (2, 3, 6) and res.V.shape == (2, 3, 37, 6) and res.frob_sq.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            one = randomized_svd(A[i, j], 6, method=method, n_iter=2, seed=0, dtype=F64)
            torch.testing.assert_close(res.S[i, j], one.S, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(res.V[i, j], one.V, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["randomized", "gram"])
@pytest.mark.parametrize("center", [False, True])
def test_streaming_sources_equal_in_memory(method, center):
    A = make_matrix(211, 29, SLOW, seed=7, batch=(2,)) + 0.3
    ref = randomized_svd(A, 5, method=method, center=center, seed=11, dtype=F64)
    bounds = [0, 13, 14, 90, 90, 211]  # unequal chunk sizes, one empty chunk
    chunks = [A[:, a:b] for a, b in zip(bounds, bounds[1:])]

    def factory():
        return (c for c in chunks)

    for src in (chunks, factory):
        res = randomized_svd(src, 5, method=method, center=center, seed=11, dtype=F64)
        torch.testing.assert_close(res.S, ref.S, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.V, ref.V, rtol=0, atol=1e-8)
        assert res.n_rows == 211
        if center:
            torch.testing.assert_close(res.mean, A.mean(-2), rtol=1e-12, atol=1e-12)
    # a tensor read in small row chunks gives the same answer as one read whole
    res = randomized_svd(A, 5, method=method, center=center, seed=11, dtype=F64, chunk_rows=17)
    torch.testing.assert_close(res.S, ref.S, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_pass_count(method):
    A = make_matrix(100, 20, FAST, seed=8)
    calls = []

    def factory():
        calls.append(1)
        return iter([A[:40], A[40:]])

    res = randomized_svd(factory, 4, method=method, n_iter=3, seed=0)
    assert len(calls) == res.passes == passes_needed(method, 3) == (1 if method == "gram" else 5)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_low_precision_chunks_accumulate_in_fp32(low, method):
    # 4000 rows of O(1) values: accumulating the products in bf16/fp16 would be off by ~1e-2.
    g = torch.Generator().manual_seed(9)
    A = make_matrix(4000, 48, SLOW, seed=9) * 40 + 0.05 * torch.randn(4000, 48, generator=g, dtype=F64)
    A32 = A.float()
    Alow = A32.to(low)
    chunks = [Alow[i:i + 999] for i in range(0, 4000, 999)]
    res = randomized_svd(chunks, 6, method=method, n_iter=4, seed=1)
    assert res.S.dtype == torch.float32
    # same (rounded) data in float64: fp32 accumulation error only
    S_ref, V_ref = exact(Alow.to(F64), 6)
    assert rel_err(res.S, S_ref) < 1e-4
    # the fp32 run on the unrounded data agrees within bf16/fp16 rounding of the inputs
    res32 = randomized_svd(A32, 6, method=method, n_iter=4, seed=1)
    tol = 2e-2 if low == torch.bfloat16 else 3e-3
    assert rel_err(res.S, res32.S.to(F64)) < tol


@pytest.mark.parametrize("method", ["randomized", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_center_equals_svd_of_centered_matrix(method, dtype):
    # large mean offset (100) against O(1) spread: the fp32 Gram correction must not cancel
    g = torch.Generator().manual_seed(10)
    A = make_matrix(503, 41, 30 * FAST[:41], seed=10) + 100 + torch.randn(41, generator=g, dtype=F64)
    S_ref, V_ref = exact(A, 6, center=True)
    res = randomized_svd(A.to(dtype), 6, method=method, center=True, n_iter=3, seed=2, dtype=dtype,
                         chunk_rows=100)
    tol = 1e-10 if dtype == F64 else 1e-4
    assert rel_err(res.S, S_ref) < tol
    assert sin_theta(res.V, V_ref) < (1e-8 if dtype == F64 else 1e-3)
    Ac = A - A.mean(0)
    assert abs(res.frob_sq.item() - Ac.square().sum().item()) < tol * Ac.square().sum().item()
    torch.testing.assert_close(res.mean.to(F64), A.mean(0), rtol=1e-6 if dtype != F64 else 1e-12, atol=0)


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_frob_sq_is_total_variance(method):
    A = make_matrix(90, 30, SLOW, seed=12)
    res = randomized_svd(A, 3, method=method, dtype=F64, seed=0)
    torch.testing.assert_close(res.frob_sq, A.square().sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["randomized", "gram"])
@pytest.mark.parametrize("n,d", [(6, 10), (10, 6), (7, 7)])
def test_tiny_inputs_rank_equals_min_dim(method, n, d):
    g = torch.Generator().manual_seed(n * d)
    A = torch.randn(n, d, generator=g, dtype=F64)
    r = min(n, d)
    S_ref, V_ref = exact(A, r)
    res = randomized_svd(A, r, method=method, dtype=F64, seed=0)
    assert rel_err(res.S, S_ref) < 1e-8
    assert sin_theta(res.V, V_ref) < 1e-6


@pytest.mark.parametrize("method", ["randomized", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_rank_deficient_input(method, dtype):
    s = torch.tensor([3.0, 2.0, 1.5, 1.0], dtype=F64)
    A = make_matrix(120, 33, s, seed=13)
    res = randomized_svd(A.to(dtype), 9, method=method, dtype=dtype, seed=0)
    assert rel_err(res.S[:4], s) < (1e-10 if dtype == F64 else 1e-5)
    # the rest is ~0: fp32 Gram eigenvalue noise ~1e-7 * s_1^2 gives s ~ sqrt(1e-7) * s_1
    assert res.S[4:].max().item() < (1e-6 if dtype == F64 else 3e-3) * s[0].item()
    assert (res.S[:-1] >= res.S[1:]).all()
    eye = torch.eye(9, dtype=dtype)
    torch.testing.assert_close(res.V.T @ res.V, eye, rtol=0, atol=1e-10 if dtype == F64 else 1e-5)


def test_default_outputs_are_fp32_and_orthonormal():
    A = make_matrix(300, 40, SLOW, seed=14).float()
    res = randomized_svd(A, 7)
    assert res.S.dtype == res.V.dtype == torch.float32 and res.mean is None
    torch.testing.assert_close(res.V.T @ res.V, torch.eye(7), rtol=0, atol=1e-5)


def test_seed_makes_randomized_reproducible():
    A = make_matrix(200, 40, SLOW, seed=15).float()
    a = randomized_svd(A, 5, method="randomized", n_iter=0, seed=123)
    b = randomized_svd(A, 5, method="randomized", n_iter=0, seed=123)
    assert torch.equal(a.S, b.S) and torch.equal(a.V, b.V)


# ---- errors -----------------------------------------------------------------------------


A_SMALL = torch.randn(20, 8, dtype=F64)


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_rank_larger_than_d_is_rejected(method):
    with pytest.raises(ValueError, match=r"rank must be <= min\(n, d\)"):
        randomized_svd(A_SMALL, 9, method=method)


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_rank_larger_than_streamed_n_is_rejected_after_first_pass(method):
    chunks = [torch.randn(3, 8), torch.randn(2, 8)]
    with pytest.raises(ValueError, match=r"rank.*min\(5, 8\)"):
        randomized_svd(chunks, 6, method=method)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"rank": 3, "n_iter": -1}, "n_iter must be an integer >= 0, got -1"),
    ({"rank": 3, "oversample": -2}, "oversample must be an integer >= 0, got -2"),
    ({"rank": 3, "method": "qr"}, "method must be one of"),
    ({"rank": 3, "dtype": torch.float16}, "dtype must be torch.float32 or torch.float64"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        randomized_svd(A_SMALL, **kwargs)


def test_rank_must_be_int():
    with pytest.raises(TypeError, match="rank must be an integer >= 1, got 2.0"):
        randomized_svd(A_SMALL, 2.0)


def test_non_floating_input_is_rejected():
    with pytest.raises(ValueError, match="floating dtype.*int64"):
        randomized_svd(torch.ones(10, 4, dtype=torch.int64), 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_chunk_is_named(bad):
    chunks = [torch.randn(5, 4), torch.randn(6, 4), torch.randn(5, 4)]
    chunks[1][2, 3] = bad
    with pytest.raises(ValueError, match="chunk 1 contains NaN or Inf"):
        randomized_svd(chunks, 2)


def test_mismatched_d_and_batch_dims_are_rejected():
    with pytest.raises(ValueError, match="chunk 1 has d=5, expected d=4"):
        randomized_svd([torch.randn(5, 4), torch.randn(5, 5)], 2)
    with pytest.raises(ValueError, match=r"chunk 1 has batch dims \(3,\), expected \(2,\)"):
        randomized_svd([torch.randn(2, 5, 4), torch.randn(3, 5, 4)], 2)


def test_one_shot_generator_is_rejected_with_advice():
    gen = (c for c in [torch.randn(5, 4)])
    with pytest.raises(ValueError, match="zero-argument callable"):
        randomized_svd(gen, 2, method="randomized")


def test_stream_that_changes_between_passes_is_rejected():
    it = iter([torch.randn(6, 4), torch.randn(6, 4)])
    with pytest.raises(ValueError, match="same rows on every pass"):
        randomized_svd(lambda: it, 2, method="randomized")  # exhausted after pass 1


def test_empty_and_one_dimensional_inputs_are_rejected():
    with pytest.raises(ValueError, match="no rows"):
        randomized_svd([], 1)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., n, d\]"):
        randomized_svd(torch.randn(5), 1)
