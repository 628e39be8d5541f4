"""Mixed precision: bf16 parameters with exact fp32 master weights, and SparseAdam on float32 RowGrads.

The scheme's promise is exact: the master (the bf16 parameter's bits plus 16 low bits) follows
the same update an fp32 parameter gets, bit for bit, and the bf16 parameter is its rounding. So
the tolerance of the long-run test is zero for the master and half a bf16 unit for the parameter.
"""
from __future__ import annotations

import pytest
import torch

from flashsae.kernels import reference
from flashsae.kernels.reference import join_master, split_master
from flashsae.kernels.registry import get_backend
from flashsae.optim import SparseAdam
from flashsae.rowgrad import RowGrad
from tests.oracles import STATIC_TORCH, static_torch_adam

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _static_torch_adam_backend():
    with static_torch_adam():
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_split_and_join_are_exact_and_the_high_half_rounds_to_nearest():
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int32)
    edges = (torch.tensor([0x3F80, 0x0000, 0x8000, 0x0001, 0x7F7F, 0xBF80], dtype=torch.int32)[:, None] << 16) | lows
    w = torch.cat([patterns, edges.reshape(-1)]).view(torch.float32)
    w = w[torch.isfinite(w)]
    high, low = split_master(w)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(bits(join_master(high, low)), bits(w)), "the master is exact"
    # Round to nearest: the error is at most half a bf16 unit of the result (ties away from zero).
    err = (high.double() - w.double()).abs()
    ulp = (high.double().abs() * 2.0**-7).clamp(min=2.0**-133)  # subnormals are 2^-133 apart
    assert (err <= ulp / 2 * (1 + 2**-7)).all()
    same_as_torch = high == w.to(torch.bfloat16)
    tie = (bits(w) & 0xFFFF) == 0x8000
    assert same_as_torch[~tie].all(), "outside exact ties it is torch's own rounding"


def tiny_step_grads(n_rows: int, width: int, steps: int, seed: int):
    """Per step: a random half of the rows (row 0 always, row 1 never) and small gradients with a steady
    direction, so that Adam moves each element by about lr every step."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(n_rows, width, generator=g)
    for _ in range(steps):
        rows = torch.cat([torch.tensor([0]), torch.randperm(n_rows - 2, generator=g)[: n_rows // 2] + 2]).sort().values
        yield rows, 1e-3 * (direction[rows] + 0.3 * torch.randn(rows.shape[0], width, generator=g))


def padded_row_grad(like: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, pad: int) -> RowGrad:
    """A RowGrad as the backward makes them: ``pad`` padding slots after the rows, naming row 0."""
    valid = torch.cat([torch.ones(rows.shape[0], dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    rows = torch.cat([rows, torch.zeros(pad, dtype=torch.int64)])
    values = torch.cat([values, torch.zeros(pad, *values.shape[1:])])
    return RowGrad.of(like, rows, values, valid)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unit_norm", [False, True])
def test_a_thousand_tiny_steps_on_bf16_end_exactly_where_fp32_ends(backend, unit_norm):
    n_rows, width, steps, lr = 6, 19, 1000, 1e-5
    w0 = (1 + 0.1 * torch.randn(n_rows, width, generator=torch.Generator().manual_seed(1))).bfloat16()
    if unit_norm:
        w0 = (w0.float() / w0.float().norm(dim=1, keepdim=True)).bfloat16()
    runs = {}
    for name, dtype, master in (("fp32", torch.float32, True), ("master", torch.bfloat16, True),
                                ("rounded", torch.bfloat16, False)):
        if name == "rounded" and backend != "torch":  # the loss without master weights: shown once
            continue
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        opt = SparseAdam([p], lr=lr, backend=backend, master_weights=master, unit_norm=[p] if unit_norm else [])
        for rows, values in tiny_step_grads(n_rows, width, steps, seed=2):
            p.grad = padded_row_grad(p, rows, values, pad=3)
            opt.step()
        runs[name] = (p.detach(), opt.master(p), opt.state[p])
    fp32, master = runs["fp32"][0], runs["master"][1]
    assert torch.equal(bits(master), bits(fp32)), "the fp32 master takes exactly the fp32 steps"
    assert torch.equal(runs["master"][0], fp32.bfloat16() if not unit_norm else split_master(fp32)[0])
    assert torch.equal(runs["master"][2]["step"], runs["fp32"][2]["step"])
    assert torch.equal(bits(w0[1]), bits(runs["master"][0][1])), "a row never touched is never written"
    moved = (fp32[0].double() - w0[0].double()).abs().max()
    assert moved > 2**-8, "the fp32 run moved row 0 by more than a bf16 unit"
    if "rounded" in runs:
        lost = (runs["rounded"][0][0].double() - fp32[0].double()).abs().max()
        assert lost > moved / 2, f"without master weights bf16 rounding loses the updates ({lost} vs {moved})"


def lazy_adam_float64(w0, steps, lr, betas, eps, unit_norm):
    """Float64 lazy Adam over (rows, grads) steps; per-row step counts; untouched rows frozen."""
    w, m, v = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64), torch.zeros_like(w0, dtype=torch.float64)
    t = torch.zeros(w0.shape[0], dtype=torch.int64)
    b1, b2 = betas
    for rows, grads in steps:
        g = grads.double()
        if unit_norm:
            wr = w[rows]
            g = g - (g * wr).sum(1, keepdim=True) / (wr * wr).sum(1, keepdim=True) * wr
        t[rows] += 1
        m[rows] = b1 * m[rows] + (1 - b1) * g
        v[rows] = b2 * v[rows] + (1 - b2) * g * g
        tr = t[rows].double()[:, None]
        w[rows] = w[rows] - lr / (1 - b1**tr) * m[rows] / ((v[rows] / (1 - b2**tr)).sqrt() + eps)
        if unit_norm:
            w[rows] = w[rows] / w[rows].norm(dim=1, keepdim=True)
    return w, m, v, t


@pytest.mark.parametrize("backend,pad", [("torch", 1), ("torch", 3), (STATIC_TORCH, 1), (STATIC_TORCH, 3), ("triton", 1)],
                         ids=["torch", "torch-pad3", "torch-static", "torch-static-pad3", "triton"])
@pytest.mark.parametrize("width", [384, 768, 4096])
@pytest.mark.parametrize("dtype,moments", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_sparse_adam_on_padded_row_grads_matches_float64_at_production_widths(backend, pad, width, dtype, moments):
    """Five rows, two touched per step, with one padding slot or three (as many slots as rows). On the CPU
    the torch backend compacts the valid rows; its static-size step (other devices) gathers every slot,
    padding included, and writes back only the valid ones."""
    n_rows, lr, betas, eps = 5, 1e-2, (0.9, 0.999), 1e-8
    g = torch.Generator().manual_seed(width)
    w0 = torch.randn(n_rows, width, generator=g)
    w0 = (w0 / w0.norm(dim=1, keepdim=True)).to(dtype)
    steps = [(torch.tensor([0, 3]), torch.randn(2, width, generator=g)),
             (torch.tensor([3, 4]), torch.randn(2, width, generator=g)),
             (torch.tensor([0, 3]), torch.randn(2, width, generator=g))]
    p = torch.nn.Parameter(w0.clone())
    opt = SparseAdam([p], lr=lr, betas=betas, eps=eps, moment_dtype=moments, backend=backend, unit_norm=[p])
    for rows, grads in steps:
        p.grad = padded_row_grad(p, rows, grads, pad=pad)
        opt.step()
    w_ref, m_ref, v_ref, t_ref = lazy_adam_float64(w0, steps, lr, betas, eps, unit_norm=True)
    state = opt.state[p]
    assert torch.equal(state["step"], t_ref)
    for i in (1, 2):  # never touched: bit-identical, moments still zero
        assert torch.equal(bits(p.detach()[i]), bits(w0[i])) and not state["exp_avg"][i].any()
    tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype if moments == torch.float32 else moments]
    touched = [0, 3, 4]
    torch.testing.assert_close(opt.master(p)[touched].double(), w_ref[touched], rtol=0, atol=tol)
    for key, ref in (("exp_avg", m_ref), ("exp_avg_sq", v_ref)):  # rounding relative to the moment's scale
        scale = ref[touched].abs().max().item()
        torch.testing.assert_close(state[key][touched].double(), ref[touched], rtol=tol, atol=tol * scale, msg=key)
    norms = opt.master(p)[touched].double().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5 if dtype != torch.float16 else 2e-3)


@pytest.mark.parametrize("width", [384, 4096])
def test_the_triton_master_weight_step_is_the_torch_step(width):
    """Both backends on the same bf16 + low-bits state: masters equal to fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, width, generator=g)
    high, low = split_master(w)
    rows, valid = torch.tensor([5, 0, 2, 0]), torch.tensor([True, True, True, False])
    grad = torch.randn(4, width, generator=g) * valid[:, None]
    results = []
    for backend in (*BACKENDS, STATIC_TORCH):
        state = [high.clone(), low.clone(), torch.zeros(7, width), torch.zeros(7, width), torch.zeros(7, dtype=torch.long)]
        get_backend(backend, "cpu").sparse_adam_step_(
            state[0], grad, rows, valid, state[2], state[3], state[4], low=state[1],
            lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, unit_norm=True,
        )
        results.append(join_master(state[0], state[1]))
        assert torch.equal(state[4], torch.tensor([1, 0, 1, 0, 0, 1, 0]))
        assert torch.equal(results[-1][[1, 3, 4, 6]], w[[1, 3, 4, 6]]), "untouched rows keep every bit"
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=0, atol=1e-6)


def test_reference_scalars_skip_padding_and_count_each_valid_row_once():
    step = torch.tensor([0, 4, 0, 1])
    size, bc2 = reference.adam_row_scalars(step, torch.tensor([1, 3, 0, 0]), torch.tensor([True, True, False, False]),
                                           lr=1.0, beta1=0.5, beta2=0.75)
    assert step.tolist() == [0, 5, 0, 2]
    torch.testing.assert_close(size[:2], torch.tensor([1 / (1 - 0.5**5), 1 / (1 - 0.5**2)]))
    assert torch.isfinite(size).all() and torch.isfinite(bc2).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_step_keeps_every_master_bit_pattern_and_leaves_rows_unnormalized(backend):
    """With lr = 0 the update is w itself, so storing it must give back every master bit for bit: the low
    halves are random, with every rounding boundary (0x7FFF / 0x8000 and the ends) in each row. The step is
    called without ``unit_norm``: by default the rows are not rescaled."""
    g = torch.Generator().manual_seed(4)
    n, width = 12, 300
    master = torch.randn(n, width, generator=g)
    patterns = torch.randint(0, 1 << 16, (n, width), generator=g, dtype=torch.int32)
    patterns[:, :8] = torch.tensor([0, 1, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF], dtype=torch.int32)
    master = ((master.view(torch.int32) & ~0xFFFF) | patterns).view(torch.float32)
    high, low = split_master(master)
    m, v, step = torch.zeros(n, width), torch.zeros(n, width), torch.zeros(n, dtype=torch.long)
    rows, valid = torch.randperm(n, generator=g), torch.ones(n, dtype=torch.bool)
    grad = torch.randn(n, width, generator=g)
    get_backend(backend, "cpu").sparse_adam_step_(high, grad, rows, valid, m, v, step, low=low, lr=0.0, beta1=0.9,
                                                  beta2=0.999, eps=1e-8)
    assert torch.equal(bits(join_master(high, low)), bits(master))
    assert torch.equal(bits(high), bits(split_master(master)[0])) and torch.equal(step, torch.ones(n, dtype=torch.long))
    torch.testing.assert_close(m[rows], 0.1 * grad, rtol=1e-6, atol=0)
