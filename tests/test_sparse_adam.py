"""SparseAdam: torch.optim.Adam when every row is touched, a plain-Python lazy Adam when rows are skipped."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from flashsae import TopKSAE
from flashsae.optim import SparseAdam
from flashsae.rowgrad import RowGrad
from tests.grads import touched_rows
from tests.oracles import (
    BETAS, EPS, LR, STATIC_TORCH, TORCH_OPS, bits, check_bf16_moments, check_bf16_params, check_lazy_adam,
    lazy_adam_reference, skipping_steps, sparse_rows_grad, static_torch_adam, torch_ops_adam,
)

# "torch" runs the C++ CPU kernel on the CPU; TORCH_OPS its torch ops (the touched rows compacted into
# blocks); STATIC_TORCH its static-size step (GPUs).
BACKENDS = ["torch", TORCH_OPS, STATIC_TORCH, "triton"]


@pytest.fixture(autouse=True)
def _torch_adam_variants():
    with static_torch_adam(), torch_ops_adam():
        yield


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_adam_when_every_row_is_touched(backend):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(37, 20, generator=g), torch.randn(37, generator=g), torch.randn(5, 3, generator=g), torch.randn((), generator=g)]
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = SparseAdam(ours, lr=LR, betas=BETAS, eps=EPS, backend=backend)
    ref = torch.optim.Adam(theirs, lr=LR, betas=BETAS, eps=EPS)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        all_rows = torch.arange(37)
        ours[0].grad = sparse_rows_grad(all_rows, grads[0], (37, 20))  # sparse, every row
        ours[1].grad = sparse_rows_grad(all_rows, grads[1], (37,))  # sparse 1-D (like b_enc)
        ours[2].grad, ours[3].grad = grads[2].clone(), grads[3].clone()  # dense
        for p, grad in zip(theirs, grads):
            p.grad = grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert torch.equal(opt.state[ours[0]]["step"], torch.full((37,), 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unit_norm", [False, True])
def test_lazy_semantics_match_plain_python_reference(backend, unit_norm):
    check_lazy_adam(backend, unit_norm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_moments_stay_close_to_fp32_lazy_adam(backend):
    check_bf16_moments(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_params_follow_fp32_lazy_adam(backend):
    check_bf16_params(backend)


@pytest.mark.parametrize("moment_dtype,param_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_state_dict_round_trip_resumes_bit_identically(moment_dtype, param_dtype):
    n_rows, width = 23, 7
    steps = skipping_steps(n_rows, width, 4, seed=7)
    param = torch.nn.Parameter(torch.randn(n_rows, width).to(param_dtype))
    bias = torch.nn.Parameter(torch.randn(width).to(param_dtype))
    opt = SparseAdam([param, bias], lr=LR, moment_dtype=moment_dtype, backend="torch", unit_norm=[param])

    def run(opt, param, bias, part):
        for rows, grads in part:
            param.grad = sparse_rows_grad(rows, grads.to(param_dtype), (n_rows, width))
            bias.grad = grads[0].to(param_dtype)
            opt.step()

    run(opt, param, bias, steps[:2])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    param2, bias2 = torch.nn.Parameter(param.detach().clone()), torch.nn.Parameter(bias.detach().clone())
    opt2 = SparseAdam([param2, bias2], lr=LR, moment_dtype=moment_dtype, backend="torch", unit_norm=[param2])
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer))
    assert opt2.state[param2]["exp_avg"].dtype == moment_dtype
    assert opt2.state[param2]["step"].dtype == torch.int64
    run(opt, param, bias, steps[2:])
    run(opt2, param2, bias2, steps[2:])
    assert torch.equal(bits(param.detach()), bits(param2.detach()))
    assert torch.equal(bits(bias.detach()), bits(bias2.detach()))
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[param][key], opt2.state[param2][key])


def test_rejects_bad_arguments():
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(TypeError, match="moment_dtype"):
        SparseAdam([p], moment_dtype=torch.float16)
    with pytest.raises(ValueError, match="unit_norm"):
        SparseAdam([p], unit_norm=[torch.nn.Parameter(torch.randn(4, 3))])
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        SparseAdam([p], betas=(1.0, 0.5))
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        SparseAdam([p], betas=(0.5, 1.0))
    with pytest.raises(ValueError, match="backend"):
        SparseAdam([p], backend="cuda")
    with pytest.raises(ValueError, match="lr must be a real number >= 0"):
        SparseAdam([p], lr=float("nan"))
    with pytest.raises(ValueError, match="eps must be a real number >= 0"):
        SparseAdam([p], eps=-1e-8)


def test_defaults_are_torch_adams():
    p = torch.nn.Parameter(torch.randn(4, 3))
    ours, theirs = SparseAdam([p]).defaults, torch.optim.Adam([p]).defaults
    assert (ours["lr"], ours["betas"], ours["eps"]) == (theirs["lr"], theirs["betas"], theirs["eps"])


def test_step_returns_the_closures_loss_and_skips_params_without_gradient():
    first, second = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    before = first.detach().clone(), second.detach().clone()
    opt = SparseAdam([first, second], lr=LR, backend="torch")
    second.grad = torch.randn(4, 3)
    assert opt.step(lambda: torch.tensor(2.5)) == 2.5
    assert opt.step() is None
    assert torch.equal(first.detach(), before[0]) and first not in opt.state
    assert not torch.equal(second.detach(), before[1]), "a param after one without gradient was skipped"


def test_loading_state_restores_every_param_after_one_without_state_and_copies_it():
    first, second = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    opt = SparseAdam([first, second], lr=LR, backend="torch")
    second.grad = torch.randn(4, 3)
    opt.step()
    saved = opt.state_dict()
    kept = {key: value.clone() for key, value in saved["state"][1].items()}
    first2, second2 = torch.nn.Parameter(first.detach().clone()), torch.nn.Parameter(second.detach().clone())
    opt2 = SparseAdam([first2, second2], lr=LR, backend="torch")
    opt2.load_state_dict(saved)
    assert torch.equal(opt2.state[second2]["exp_avg"], kept["exp_avg"])
    second2.grad = torch.randn(4, 3)
    opt2.step()
    for key, value in kept.items():
        assert torch.equal(saved["state"][1][key], value), f"stepping the loaded optimizer changed the saved {key}"


@pytest.mark.parametrize("master_weights", [True, False])
def test_master_weights_option_decides_whether_bf16_params_keep_low_bits(master_weights):
    p = torch.nn.Parameter(torch.randn(5, 3).bfloat16())
    opt = SparseAdam([p], lr=LR, backend="torch", master_weights=master_weights)
    p.grad = torch.randn(5, 3).bfloat16()
    opt.step()
    assert ("master_low" in opt.state[p]) == master_weights


def test_normalizes_names_exactly_the_unit_norm_params():
    W, b, other = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 3))
    opt = SparseAdam([W, b], unit_norm=[W])
    assert opt.normalizes(W)
    assert not opt.normalizes(b) and not opt.normalizes(other)
    assert not SparseAdam([W, b]).normalizes(W)


def sae_loss(sae, x):
    return (sae(x).x_hat - x).pow(2).sum(-1).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sae_sparse_training_step_equals_dense_adam_on_first_step(backend):
    """Step 1 from fresh moments: rows without gradient do not move under Adam either, so both paths agree."""
    d, F, k, B = 24, 300, 8, 33
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(8)  # the init too: the first step's m / sqrt(v) is ill-conditioned where |g| nears eps
    sparse = TopKSAE(d, F, k, backend=backend, sparse_grad=True)
    dense = copy.deepcopy(sparse)
    dense.sparse_grad = False
    opt_s = SparseAdam(sparse.parameters(), lr=LR, backend=backend, unit_norm=[sparse.W_dec])
    opt_d = torch.optim.Adam(dense.parameters(), lr=LR)
    sae_loss(sparse, x).backward()
    assert all(isinstance(p.grad, RowGrad) for p in (sparse.W_dec, sparse.W_enc, sparse.b_enc))
    opt_s.step()
    sae_loss(dense, x).backward()
    dense.remove_parallel_grads_()
    opt_d.step()
    dense.normalize_decoder_()
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sae_sparse_training_reduces_loss_and_keeps_dead_rows_frozen(backend):
    d, F, k, B = 24, 200, 4, 17
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(9))
    sae = TopKSAE(d, F, k, backend=backend, sparse_grad=True)
    opt = SparseAdam(sae.parameters(), lr=LR, backend=backend, unit_norm=[sae.W_dec])
    start = {n: p.detach().clone() for n, p in sae.named_parameters()}
    ever = torch.zeros(F, dtype=torch.bool)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = sae_loss(sae, x)
        loss.backward()
        ever[touched_rows(sae.W_dec.grad)] = True
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert (~ever).any()
    for name in ("W_enc", "W_dec", "b_enc"):
        assert torch.equal(bits(getattr(sae, name).detach()[~ever]), bits(start[name][~ever])), name
    norms = sae.W_dec.detach()[ever].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)
    assert math.isfinite(losses[-1])


def padded_rows_grad(like: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, pad: int) -> RowGrad:
    """A RowGrad as the backward makes them: ``pad`` padding slots (row 0, zeros) after the rows."""
    valid = torch.cat([torch.ones(rows.shape[0], dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    return RowGrad.of(like, torch.cat([rows, torch.zeros(pad, dtype=torch.int64)]),
                      torch.cat([values, torch.zeros(pad, *values.shape[1:])]), valid)


GRAD_KINDS = ["row-grad", "sparse-coo", "dense"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unit_norm", [False, True])
@pytest.mark.parametrize("kind", GRAD_KINDS)
def test_many_touched_rows_of_a_wide_parameter_match_float64_lazy_adam(backend, unit_norm, kind):
    """Touched rows spanning several of the Triton kernel's row blocks (2048 elements a tile: 8 rows of
    256 columns) and each row several column blocks, so every loop over rows and columns runs more than once."""
    n_rows, width, n_steps = 40, 768, 3
    g = torch.Generator().manual_seed(21)
    w0 = torch.randn(n_rows, width, generator=g)
    w0 = w0 / w0.norm(dim=1, keepdim=True)
    steps = []
    for _ in range(n_steps):
        rows = torch.arange(n_rows) if kind == "dense" else torch.randperm(n_rows, generator=g)[:25].sort().values
        steps.append((rows, torch.randn(rows.numel(), width, generator=g)))
    param = torch.nn.Parameter(w0.clone())
    opt = SparseAdam([param], lr=LR, betas=BETAS, eps=EPS, backend=backend, unit_norm=[param] if unit_norm else [])
    for rows, grads in steps:
        if kind == "row-grad":
            param.grad = padded_rows_grad(param, rows, grads, pad=7)
        elif kind == "sparse-coo":
            param.grad = sparse_rows_grad(rows, grads, (n_rows, width))
        else:
            param.grad = grads.clone()
        opt.step()
    w_ref, m_ref, v_ref, t_ref = lazy_adam_reference(w0, steps, unit_norm)
    assert torch.equal(opt.state[param]["step"], t_ref) and t_ref.max() == n_steps and (t_ref < n_steps).any() == (kind != "dense")
    torch.testing.assert_close(param.detach().double(), w_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(opt.state[param]["exp_avg"].double(), m_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(opt.state[param]["exp_avg_sq"].double(), v_ref, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sparse-coo", "row-grad"])
def test_uncoalesced_accumulated_sparse_gradients_are_summed_per_row(backend, kind):
    """Two gradients of one parameter added up (two uses of it; AuxK plus the main loss) name some rows
    twice: an uncoalesced COO tensor, or a RowGrad of two parts. Each row steps once, on the sum."""
    n_rows, width = 30, 300
    g = torch.Generator().manual_seed(22)
    w0 = torch.randn(n_rows, width, generator=g)
    w0 = w0 / w0.norm(dim=1, keepdim=True)
    first_rows, second_rows = torch.tensor([2, 5, 9, 17, 29]), torch.tensor([0, 5, 17, 20])
    first, second = torch.randn(5, width, generator=g), torch.randn(4, width, generator=g)
    param = torch.nn.Parameter(w0.clone())
    opt = SparseAdam([param], lr=LR, betas=BETAS, eps=EPS, backend=backend, unit_norm=[param])
    if kind == "sparse-coo":
        # As autograd accumulates sparse gradients: the entries of both, concatenated, not summed.
        param.grad = torch.sparse_coo_tensor(torch.cat([second_rows, first_rows])[None], torch.cat([second, first]),
                                             (n_rows, width), check_invariants=True)
        assert not param.grad.is_coalesced() and param.grad._nnz() == 9
    else:
        param.grad = padded_rows_grad(param, first_rows, first, pad=2) + padded_rows_grad(param, second_rows, second, pad=3)
        assert len(param.grad.parts) == 2
    opt.step()
    dense = torch.zeros(n_rows, width)
    dense.index_add_(0, first_rows, first).index_add_(0, second_rows, second)
    rows = torch.tensor([0, 2, 5, 9, 17, 20, 29])
    w_ref, m_ref, _, t_ref = lazy_adam_reference(w0, [(rows, dense[rows])], unit_norm=True)
    assert torch.equal(opt.state[param]["step"], t_ref) and t_ref.sum() == 7
    torch.testing.assert_close(param.detach().double(), w_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(opt.state[param]["exp_avg"].double(), m_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["few-rows", "many-rows", "dense", "dense-with-valid"])
@pytest.mark.parametrize("dtype,moments", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_the_torch_cpu_blocked_step_is_the_static_step_bit_for_bit(monkeypatch, kind, dtype, moments):
    """The CPU step in torch ops (blocks of 3 rows here: the valid rows gathered, or a dense gradient's blocks updated in
    place) and the static-size step (padding slots, masked writes) run the same arithmetic: every
    parameter, moment, step count and low bit agrees."""
    from flashsae.kernels import reference
    from tests.oracles import static_sparse_adam_step_, without_cpu_kernels

    monkeypatch.setattr(reference, "ADAM_BLOCK_ELEMENTS", 3 * 16)
    n, width = 23, 16  # more rows than columns: a loop over the wrong dimension would miss rows
    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(n, width, generator=g).to(dtype)
    w0[:, 0] = -0.0
    m0 = torch.randn(n, width, generator=g).to(moments)
    m0[:, 1] = -0.0  # negative zeros, which an untouched row must keep as they are
    v0 = torch.rand(n, width, generator=g).to(moments)
    states = []
    for _ in range(2):
        low = torch.zeros(n, width, dtype=torch.int16) if dtype == torch.bfloat16 else None
        states.append([w0.clone(), m0.clone(), v0.clone(), torch.zeros(n, dtype=torch.int64), low])
    ever = torch.zeros(n, dtype=torch.bool)
    for step in range(3):
        n_touched = 15 if kind == "many-rows" else 9
        touched = torch.randperm(n, generator=g)[:n_touched].sort().values
        if step == 1:
            touched[0] = 0  # a valid row 0 among the padding slots that also name row 0
        ever[touched] = kind != "dense"  # a dense gradient without valid touches every row
        if kind.endswith("rows"):
            rows = torch.cat([touched, torch.zeros(4, dtype=torch.int64)])
            valid = torch.arange(n_touched + 4) < n_touched
            grad = torch.randn(n_touched + 4, width, generator=g) * valid[:, None]
        else:
            rows = None
            valid = torch.zeros(n, dtype=torch.bool).index_fill_(0, touched, True) if kind == "dense-with-valid" else None
            grad = torch.randn(n, width, generator=g)
        for state, run in zip(states, (without_cpu_kernels(reference.sparse_adam_step_), static_sparse_adam_step_)):
            run(state[0], grad, rows, valid, state[1], state[2], state[3], low=state[4], lr=1e-2, beta1=0.9,
                beta2=0.999, eps=1e-8, unit_norm=True)
    for blocked, static, name in zip(states[0], states[1], ("param", "exp_avg", "exp_avg_sq", "step", "low")):
        if blocked is not None:
            assert torch.equal(bits(blocked) if blocked.is_floating_point() else blocked,
                               bits(static) if static.is_floating_point() else static), name
    assert not torch.equal(states[0][0], w0)
    if kind == "dense":
        assert torch.equal(states[0][3], torch.full((n,), 3))
    else:  # rows never touched keep every bit of their weights and moments, whatever their gradient held
        assert (~ever).any() and torch.equal(bits(states[0][0][~ever]), bits(w0[~ever]))
        assert torch.equal(bits(states[0][1][~ever]), bits(m0[~ever]))
        assert torch.equal(bits(states[0][2][~ever]), bits(v0[~ever]))


@pytest.mark.parametrize("backend", ["torch", STATIC_TORCH])
@pytest.mark.parametrize("unit_norm", [False, True])
def test_torch_step_with_a_dense_gradient_and_valid_rows_matches_float64_lazy_adam(backend, unit_norm):
    """The backend contract's dense form (grad [n, m], rows=None, valid [n]): the valid rows take lazy Adam's
    float64 update with their own step counts, the others keep every bit whatever their gradient holds."""
    from flashsae.kernels.registry import get_backend

    n, width = 11, 384
    g = torch.Generator().manual_seed(12)
    w0 = torch.randn(n, width, generator=g)
    w0 = w0 / w0.norm(dim=1, keepdim=True)
    state = [w0.clone(), torch.zeros(n, width), torch.zeros(n, width), torch.zeros(n, dtype=torch.int64)]
    steps = []
    for touched in ([0, 3, 4, 9], [3, 5, 9, 10], [0, 3]):
        rows = torch.tensor(touched)
        grad = torch.randn(n, width, generator=g)
        steps.append((rows, grad[rows]))
        valid = torch.zeros(n, dtype=torch.bool).index_fill_(0, rows, True)
        get_backend(backend, "cpu").sparse_adam_step_(state[0], grad, None, valid, *state[1:], lr=LR, beta1=BETAS[0],
                                                       beta2=BETAS[1], eps=EPS, unit_norm=unit_norm)
    w_ref, m_ref, v_ref, t_ref = lazy_adam_reference(w0, steps, unit_norm)
    assert torch.equal(state[3], t_ref)
    torch.testing.assert_close(state[0].double(), w_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(state[1].double(), m_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state[2].double(), v_ref, rtol=1e-5, atol=1e-9)
    never = torch.tensor([1, 2, 6, 7, 8])
    assert torch.equal(bits(state[0][never]), bits(w0[never])) and not state[1][never].any()
