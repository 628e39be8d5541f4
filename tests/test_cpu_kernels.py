"""The torch backend's C++ CPU kernels (`flashsae.kernels.cpu_native`): the threshold select and the lazy Adam
step, each against the torch ops it replaces (``FLASHSAE_CPU_KERNELS=0``) and a float64 reference."""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

from flashsae.kernels import cpu_native, reference, torch_encode
from tests.encoder_checks import (
    BF16, FP16, FP32, FP64, assert_exact_topk, assert_reference_order, make_dyadic_inputs, make_inputs,
)
from tests.oracles import bits, check_lazy_adam, cpu_kernels_off


def both_ways(fn):
    """fn() with the C++ kernels, then with the torch ops."""
    assert cpu_native.kernels() is not None
    native = fn()
    with cpu_kernels_off():
        assert cpu_native.kernels() is None
        ops = fn()
    return native, ops


@pytest.fixture(params=["avx2", "16-byte"])
def vector_build(request):
    """Each select test runs on both builds of the kernel's row scan: AVX2, and the 16-byte vectors that CPUs
    without AVX2 (and arm64) run."""
    native = cpu_native.kernels()
    wanted = request.param == "avx2"
    if native.use_avx2(wanted) != wanted:
        native.use_avx2(True)
        pytest.skip("this CPU has no AVX2")
    yield request.param
    native.use_avx2(True)


def assert_same(native, ops):
    for a, b in zip(native, ops, strict=True):
        assert a.dtype == b.dtype and torch.equal(bits(a) if a.is_floating_point() else a,
                                                  bits(b) if b.is_floating_point() else b)


def test_the_kernels_build_and_load_on_this_machine():
    assert cpu_native.build(), "the C++ CPU kernels did not build (is a C++ compiler and ninja installed?)"
    assert cpu_native.kernels() is not None


def test_the_switch_turns_the_kernels_off():
    with cpu_kernels_off():
        assert cpu_native.kernels() is None
    assert cpu_native.kernels() is not None


def test_a_failed_build_warns_once_and_the_torch_ops_run(monkeypatch):
    from torch.utils import cpp_extension

    x, W, b, b_pre = make_inputs(3, 40, 300, FP32, seed=5)
    expected = torch_encode.topk_encode(x, W, b, 7, b_pre)

    def broken(**_):
        raise RuntimeError("no compiler here")

    cpu_native._load.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", broken)
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*no compiler here"):
            assert cpu_native.kernels() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: the second call is quiet
            assert cpu_native.kernels() is None
            got = torch_encode.topk_encode(x, W, b, 7, b_pre)
    finally:
        monkeypatch.undo()
        cpu_native._load.cache_clear()
    assert_same(got, expected)
    assert cpu_native.kernels() is not None


def test_a_stale_build_lock_is_removed_and_a_fresh_one_is_left_to_its_build(monkeypatch, tmp_path):
    """An interrupted build leaves torch's lock file behind, on which every later load would wait forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / cpu_native.EXTENSION_NAME / "lock"
    cpu_native._remove_stale_build_lock()  # no lock: nothing to do
    lock.touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu_native._remove_stale_build_lock()  # a build in progress keeps its lock
    assert lock.exists()
    old = time.time() - cpu_native.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="removing the stale build lock"):
        cpu_native._remove_stale_build_lock()
    assert not lock.exists()


def test_the_ninja_packages_binary_is_found_without_an_activated_environment(monkeypatch):
    import ninja

    monkeypatch.setenv("PATH", "/usr/local/bin")
    cpu_native._put_ninja_on_path()
    cpu_native._put_ninja_on_path()  # once
    assert os.environ["PATH"].split(os.pathsep) == ["/usr/local/bin", ninja.BIN_DIR]


# (B, d, F, k, dtype, features per chunk): the widths users run (one and several chunks, k up to 512),
# odd small shapes (F not a multiple of the column groups or of the kernel's 32-column units, fewer groups
# than k, a chunk narrower than a group), k = F, and every input dtype.
SELECT_CASES = [
    (3, 768, 24577, 32, FP32, None),
    (2, 4096, 5003, 64, FP32, 1000),
    (4, 384, 16384, 512, FP32, 3001),
    (7, 33, 1001, 5, FP32, 100),
    (5, 20, 700, 3, BF16, 64),
    (4, 17, 300, 64, FP16, 37),
    (5, 16, 300, 64, FP64, 37),
    (4, 8, 50, 50, FP32, 7),
    (3, 8, 13, 1, FP32, 5),
]


@pytest.mark.parametrize("B,d,F,k,dtype,chunk", SELECT_CASES)
def test_the_kernel_select_is_the_torch_select_and_the_float64_top_k(B, d, F, k, dtype, chunk, vector_build):
    x, W, b, b_pre = make_inputs(B, d, F, dtype, seed=B + d + F + k)
    native, ops = both_ways(lambda: torch_encode.topk_encode(x, W, b, k, b_pre, chunk_size=chunk))
    assert_same(native, ops)
    assert_exact_topk(*native, x, W, b, b_pre, k)


@pytest.mark.parametrize("chunk", [None, 29, 8])
@pytest.mark.parametrize("k", [1, 6, 40])
def test_ties_go_to_the_lower_index_whatever_order_the_groups_are_read_in(chunk, k, vector_build):
    """Dyadic inputs: many bit-identical pre-activations, in strided groups and across chunks."""
    x, W, b, b_pre = make_dyadic_inputs(6, 12, 203, FP32, seed=k)
    native, ops = both_ways(lambda: torch_encode.topk_encode(x, W, b, k, b_pre, chunk_size=chunk))
    assert_same(native, ops)
    assert_reference_order(*native, x, W, b, b_pre, k)


def test_all_equal_values_overflow_the_candidate_list_and_keep_the_lowest_indices(vector_build):
    """Every entry ties, so every group is read and the candidate list is cut to k many times per row."""
    x, W = torch.ones(3, 4), torch.zeros(4099, 4)
    b = torch.full((4099,), 0.5)
    native, ops = both_ways(lambda: torch_encode.topk_encode(x, W, b, 9))
    assert_same(native, ops)
    assert torch.equal(native[1], torch.arange(9).expand(3, 9)) and (native[0] == 0.5).all()


def test_features_sorted_ascending_raise_the_floor_only_at_the_end(vector_build):
    """Pre-activations that grow with the feature index: each chunk beats the last, so every chunk's
    candidates replace the kept ones (and rows with a negative x choose from the first features)."""
    F, k = 3000, 17
    x = torch.tensor([[1.0], [2.0], [-1.0]])
    W = torch.linspace(0.01, 3.0, F)[:, None]
    b = torch.zeros(F)
    native, ops = both_ways(lambda: torch_encode.topk_encode(x, W, b, k, chunk_size=512))
    assert_same(native, ops)
    assert torch.equal(native[1][:2], torch.arange(F - 1, F - 1 - k, -1).expand(2, k))
    assert torch.equal(native[1][2], torch.arange(k)) and not native[0][2].any(), "no positive: zeros, lowest indices"


def test_rows_with_fewer_positives_than_k_end_in_zeros_at_the_lowest_unchosen_features(vector_build):
    x, W, b, b_pre = make_inputs(6, 64, 2051, FP32, seed=9)
    b = b - 3.0  # a handful of positives per row
    native, ops = both_ways(lambda: torch_encode.topk_encode(x, W, b, 300, b_pre, chunk_size=700))
    assert_same(native, ops)
    vals, idx = native
    assert (vals == 0).any(1).all(), "every row has fewer than k positives"
    assert_exact_topk(vals, idx, x, W, b, b_pre, 300)


def test_nan_never_fires_and_infinite_biases_sort_as_they_should(vector_build):
    x, W, b, b_pre = make_inputs(4, 32, 997, FP32, seed=4)
    W[10] = float("nan")  # feature 10 is NaN for every token
    b[20], b[30] = float("inf"), float("-inf")
    x[3] = float("nan")  # token 3: every pre-activation NaN
    native, ops = both_ways(lambda: torch_encode.topk_encode(x, W, b, 8, b_pre, chunk_size=300))
    assert_same(native, ops)
    vals, idx = native
    assert not (idx[:3] == 10).any() and not (idx[:3] == 30).any()
    assert (idx[:3, 0] == 20).all() and torch.isinf(vals[:3, 0]).all()
    assert torch.equal(idx[3], torch.arange(8)) and not vals[3].any(), "a NaN row has no positive value"


@pytest.mark.parametrize("dtype", [FP32, FP64])
def test_the_aux_selection_sees_only_the_dead_features(dtype, vector_build):
    x, W, b, b_pre = make_inputs(5, 96, 3001, dtype, seed=2)
    dead = torch.rand(3001, generator=torch.Generator().manual_seed(3)) < 0.1
    native, ops = both_ways(
        lambda: torch_encode.topk_encode_with_aux(x, W, b, 16, 64, dead, b_pre, chunk_size=1000))
    assert_same(native, ops)
    aux_vals, aux_idx = native[2:]
    assert dead[aux_idx[aux_vals > 0]].all(), "a live feature entered the aux selection"


def test_the_select_ignores_whatever_its_state_held_beyond_each_rows_count(vector_build):
    """The kernel API directly: poisoned (NaN, out-of-range) state slots beyond each row's count are never read."""
    native = cpu_native.kernels()
    pre = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    offset = torch.zeros(50)
    kept_vals, kept_idx = torch.full((3, 4), float("nan")), torch.full((3, 4), -7)
    sizes = torch.zeros(3, dtype=torch.int64)
    native.select_chunk_(pre, 0, offset, kept_vals, kept_idx, sizes)
    vals, idx = native.select_result(kept_vals, kept_idx, sizes, 50)
    ref = torch.relu(pre).topk(4, dim=1)
    assert torch.equal(vals, ref.values) and torch.equal(idx, ref.indices)


def test_the_kernel_api_rejects_inconsistent_arguments_by_name():
    native = cpu_native.kernels()
    pre = torch.zeros(2, 10)
    kept = (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="offset must be"):
        native.select_chunk_(pre, 5, torch.zeros(10), *kept)  # the chunk runs past the offset's features
    with pytest.raises(RuntimeError, match="k must be at most n_features"):
        native.select_result(*kept, 2)
    with pytest.raises(RuntimeError, match="sizes must hold counts between 0 and k"):
        native.select_chunk_(pre, 0, torch.zeros(10), *kept[:2], torch.tensor([1, 4]))
    p = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="rows holds an index outside"):
        native.adam_rows_(p, None, torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64),
                          torch.ones(1, 3), torch.tensor([4]), None, 1e-3, 0.9, 0.999, 1e-8, False)


@pytest.mark.parametrize("unit_norm", [False, True])
@pytest.mark.parametrize("n_rows,width", [(41, 768), (9, 4096)])
def test_the_kernel_adam_step_is_lazy_adam_in_float64_at_production_widths(unit_norm, n_rows, width):
    assert cpu_native.kernels() is not None
    check_lazy_adam("torch", unit_norm, n_rows=n_rows, width=width, n_steps=4)


def _adam_runs(kind: str, dtype: torch.dtype, unit_norm: bool):
    """Four steps of `reference.sparse_adam_step_` from one start, for each gradient ``kind``."""
    g = torch.Generator().manual_seed(7)
    n, m = 37, 300
    w = torch.nn.functional.normalize(torch.randn(n, m, generator=g), dim=1).to(dtype)
    w[0] = float("nan")  # never touched: stays NaN, bit for bit
    low = torch.zeros(n, m, dtype=torch.int16) if dtype == BF16 else None
    exp_avg, exp_avg_sq = torch.randn(n, m, generator=g), torch.rand(n, m, generator=g)
    exp_avg[1] = -0.0
    step = torch.zeros(n, dtype=torch.int64)
    ever = torch.zeros(n, dtype=torch.bool)
    for _ in range(4):
        touched = (torch.randperm(n - 2, generator=g)[:12] + 2).sort().values
        if kind == "rows":  # padded like a RowGrad: slots that are not valid name row 0 and hold zeros
            rows, valid = torch.cat([touched, torch.zeros(3, dtype=torch.int64)]), torch.arange(15) < 12
            grad = torch.randn(15, m, generator=g) * valid[:, None]
        elif kind == "empty":
            rows, valid, grad = torch.zeros(0, dtype=torch.int64), None, torch.zeros(0, m)
            touched = touched[:0]
        else:  # dense, only the valid rows taken
            rows, valid = None, torch.zeros(n, dtype=torch.bool).index_fill_(0, touched, True)
            grad = torch.randn(n, m, generator=g).to(dtype)
        ever[touched] = True
        reference.sparse_adam_step_(w, grad, rows, valid, exp_avg, exp_avg_sq, step, low=low, lr=1e-2, beta1=0.9,
                                    beta2=0.999, eps=1e-8, unit_norm=unit_norm)
    master = reference.join_master(w, low) if low is not None else w
    return (master, exp_avg, exp_avg_sq, step), ever


@pytest.mark.parametrize("unit_norm", [False, True])
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("kind", ["rows", "dense", "empty"])
def test_the_kernel_adam_step_is_the_torch_step_up_to_rounding(kind, dtype, unit_norm):
    (native, ever), (ops, _) = both_ways(lambda: _adam_runs(kind, dtype, unit_norm))
    assert torch.equal(native[3], ops[3]), "step counts"
    untouched = ~ever
    for got, want in zip(native[:3], ops[:3]):
        assert torch.equal(bits(got[untouched]), bits(want[untouched])), "an untouched row changed"
        torch.testing.assert_close(got[ever], want[ever], atol=3e-7, rtol=3e-6)
    if kind != "empty":
        assert ever.any() and not torch.equal(native[0][ever], _adam_runs("empty", dtype, unit_norm)[0][0][ever])
