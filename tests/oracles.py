"""Float64 references and tolerances shared by the tests and the GPU acceptance check (`benchmarks.gpu_check`).

Both import these, so a kernel is judged the same way on the CPU (under the Triton interpreter) and
on a GPU. Inputs are drawn on the CPU from seeded generators; pass ``device`` to run elsewhere.

- Row primitives, sparse decode and the encoder backward: `TOL`, `assert_close`, `make_decode`,
  `dense_decode_grads`, `encoder_grads_float64`, `fired_rows`.
- SparseAdam: `LR`, `BETAS`, `EPS`, `sparse_rows_grad`, `bits`, `lazy_adam_reference`,
  `skipping_steps` and the three lazy-Adam checks `check_lazy_adam`, `check_bf16_moments`,
  `check_bf16_params`.
- The torch backend's variants the tests run: without its C++ CPU kernels (`cpu_kernels_off`,
  `without_cpu_kernels`, `torch_ops_adam`), with the static-size Adam step (`static_torch_adam`), without
  AuxK's fold (`unfolded_torch`).
"""
from __future__ import annotations

import contextlib
import os

import torch

from flashsae.kernels import cpu_native
from flashsae.kernels.reference import split_master
from flashsae.optim import SparseAdam

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Max error relative to the reference's largest magnitude (at least 1), per dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
# The SparseAdam hyper-parameters the lazy reference uses.
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8


# ------------------------------------------------------------------ row primitives and sparse decode
def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``got`` equals the float64 ``ref`` within TOL[dtype] times ref's largest magnitude (at least 1)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite entries"
    scale = ref.abs().max().clamp_min(1.0).item() if ref.numel() else 1.0
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} * {scale:.3g}"


def make_decode(B, d, F, k, dtype, seed):
    """vals >= 0 with some zeros, idx distinct per row from a small pool so features repeat across tokens.

    Returns vals [B, k], idx [B, k] int64, W [F, d], b [d], grad_out [B, d] (CPU, ``dtype`` but idx).
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(F, generator=g)[: min(F, k + 3)]
    idx = torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:k]] for _ in range(B)])
    vals = torch.rand(B, k, generator=g) * 2
    vals[::3, k // 2 :] = 0.0  # rows with fewer than k active features
    W = torch.randn(F, d, generator=g) / d**0.5
    b = 0.1 * torch.randn(d, generator=g)
    grad_out = torch.randn(B, d, generator=g)
    return vals.to(dtype), idx, W.to(dtype), b.to(dtype), grad_out.to(dtype)


def dense_decode_grads(vals, idx, W, b, grad_out):
    """float64 autograd of (vals[..., None] * W[idx]).sum(1) + b: (x_hat, grad_vals, grad_W, grad_b)."""
    v, Wd, bd = (t.detach().double().requires_grad_() for t in (vals, W, b))
    x_hat = (v[:, :, None] * Wd[idx]).sum(1) + bd
    x_hat.backward(grad_out.double())
    return x_hat.detach(), v.grad, Wd.grad, bd.grad


def encoder_grads_float64(x, W, b, b_pre, idx, grad_vals):
    """float64 gradients of relu((x - b_pre) @ W.T + b) gathered at the fixed selection ``idx``.

    Returns (grad_x, grad_W, grad_b, grad_b_pre) for an upstream gradient ``grad_vals`` [B, k].
    """
    xd, Wd, bd, bpd = (t.detach().double().requires_grad_() for t in (x, W, b, b_pre))
    torch.relu((xd - bpd) @ Wd.T + bd).gather(1, idx).backward(grad_vals.double())
    return xd.grad, Wd.grad, bd.grad, bpd.grad


def fired_rows(idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The sorted features that fired (a positive value) anywhere in ``idx``."""
    return torch.unique(idx[vals > 0])


# --------------------------------------------------------------------------------------- SparseAdam
def sparse_rows_grad(rows: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A coalesced sparse COO gradient holding ``values`` [U, ...] at ``rows`` [U] of a ``shape`` parameter."""
    return torch.sparse_coo_tensor(rows[None], values, shape, is_coalesced=True, check_invariants=True)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so NaN == NaN and -0.0 != 0.0."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def lazy_adam_reference(w0, steps, unit_norm):
    """Plain-Python float64 lazy Adam, one row at a time: per-row step counts, untouched rows frozen.

    w0 [n, m]; steps: a list of (rows [U] int64, grads [U, m]). Returns (w, m, v, step counts).
    """
    w = w0.double().cpu().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    t = [0] * w.shape[0]
    b1, b2 = BETAS
    for rows, grads in steps:
        for r, gr in zip(rows.tolist(), grads.double().cpu()):
            if unit_norm:
                gr = gr - (gr @ w[r]) / (w[r] @ w[r]) * w[r]
            t[r] += 1
            m[r] = b1 * m[r] + (1 - b1) * gr
            v[r] = b2 * v[r] + (1 - b2) * gr * gr
            m_hat, v_hat = m[r] / (1 - b1 ** t[r]), v[r] / (1 - b2 ** t[r])
            w[r] = w[r] - LR * m_hat / (v_hat.sqrt() + EPS)
            if unit_norm:
                w[r] = w[r] / w[r].norm()
    return w, m, v, torch.tensor(t)


def skipping_steps(n_rows, width, n_steps, seed):
    """Random row subsets per step; rows 0..2 are never touched, row 3 every step."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        chosen = torch.randperm(n_rows - 4, generator=g)[: (n_rows - 4) // 3] + 4
        rows = torch.cat([torch.tensor([3]), chosen]).sort().values
        steps.append((rows, torch.randn(rows.numel(), width, generator=g)))
    return steps


def check_lazy_adam(backend: str, unit_norm: bool, device: str | torch.device = "cpu",
                    n_rows: int = 41, width: int = 19, n_steps: int = 5) -> None:
    """fp32 SparseAdam on rows touched now and then equals the float64 lazy reference; untouched rows
    (NaN ones included) and their state stay bit-identical at every step."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(n_rows, width, generator=g)
    if unit_norm:
        w0 = w0 / w0.norm(dim=1, keepdim=True)
    w0[:3] = float("nan")  # never touched: must come out bit-identical, NaN and all
    steps = skipping_steps(n_rows, width, n_steps, seed=2)
    param = torch.nn.Parameter(w0.clone().to(device))
    opt = SparseAdam([param], lr=LR, betas=BETAS, eps=EPS, backend=backend, unit_norm=[param] if unit_norm else [])
    for rows, grads in steps:
        param.grad = sparse_rows_grad(rows.to(device), grads.to(device), (n_rows, width))
        before = {k: v.clone() for k, v in opt.state[param].items()}
        w_before = param.detach().clone()
        opt.step()
        untouched = torch.ones(n_rows, dtype=torch.bool, device=device)
        untouched[rows.to(device)] = False
        assert torch.equal(bits(param.detach()[untouched]), bits(w_before[untouched])), "an untouched row moved"
        for key, value in before.items():
            assert torch.equal(bits(opt.state[param][key][untouched]), bits(value[untouched])), f"untouched {key} moved"
    w_ref, m_ref, v_ref, t_ref = lazy_adam_reference(w0, steps, unit_norm)
    live = slice(3, None)
    state = opt.state[param]
    torch.testing.assert_close(param.detach()[live].double().cpu(), w_ref[live], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(state["exp_avg"][live].double().cpu(), m_ref[live], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state["exp_avg_sq"][live].double().cpu(), v_ref[live], atol=1e-6, rtol=1e-5)
    assert torch.equal(state["step"].cpu(), t_ref), "per-row step counts differ from the reference"
    if unit_norm:
        norms = param.detach()[live].double().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)


def check_bf16_moments(backend: str, device: str | torch.device = "cpu",
                       n_rows: int = 41, width: int = 19, n_steps: int = 5) -> None:
    """bf16 moments keep fp32 params within 2e-2 * LR per step of the float64 lazy reference."""
    w0 = torch.randn(n_rows, width, generator=torch.Generator().manual_seed(3))
    steps = skipping_steps(n_rows, width, n_steps, seed=4)
    param = torch.nn.Parameter(w0.clone().to(device))
    opt = SparseAdam([param], lr=LR, moment_dtype=torch.bfloat16, backend=backend)
    for rows, grads in steps:
        param.grad = sparse_rows_grad(rows.to(device), grads.to(device), (n_rows, width))
        opt.step()
    assert opt.state[param]["exp_avg"].dtype == opt.state[param]["exp_avg_sq"].dtype == torch.bfloat16
    w_ref = lazy_adam_reference(w0, steps, unit_norm=False)[0]
    # bf16 moments carry ~2^-8 relative error; each update is at most ~lr per element.
    err = (param.detach().double().cpu() - w_ref).abs().max().item()
    assert err <= 2e-2 * LR * n_steps, f"params off the lazy reference by {err:.3g}"


def check_bf16_params(backend: str, device: str | torch.device = "cpu",
                      n_rows: int = 41, width: int = 19, n_steps: int = 3) -> None:
    """bf16 params follow the float64 lazy reference of the same bf16 start and gradients."""
    w0 = torch.randn(n_rows, width, generator=torch.Generator().manual_seed(5)).bfloat16()
    steps = skipping_steps(n_rows, width, n_steps, seed=6)
    param = torch.nn.Parameter(w0.clone().to(device))
    opt = SparseAdam([param], lr=LR, backend=backend)
    for rows, grads in steps:
        param.grad = sparse_rows_grad(rows.to(device), grads.bfloat16().to(device), (n_rows, width))
        opt.step()
    w_ref = lazy_adam_reference(w0, [(r, gr.bfloat16()) for r, gr in steps], unit_norm=False)[0]
    assert param.dtype == torch.bfloat16
    # The fp32 master takes fp32 Adam steps (errors of fp32 rounding, far below one step's lr), and
    # the parameter is its rounding to bf16, bit for bit.
    master = opt.master(param).cpu()
    torch.testing.assert_close(master.double(), w_ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(bits(param.detach().cpu()), bits(split_master(master)[0]))
    moved = (w_ref - w0.double()).abs().max().item()
    assert moved > 100 * 2e-6, "the steps moved the weights far more than the tolerance"


# The torch backend's Adam as it runs off the CPU (static sizes: padding slots, masked writes), under
# its own backend name on the CPU, where the torch backend otherwise compacts the rows into blocks.
STATIC_TORCH = "torch-static-adam"


def static_sparse_adam_step_(*args, **kwargs) -> None:
    from unittest import mock

    from flashsae.kernels import reference

    with mock.patch.object(reference, "_blocked_on_cpu", lambda param: False):
        reference.sparse_adam_step_(*args, **kwargs)


@contextlib.contextmanager
def cpu_kernels_off():
    """The torch backend's C++ CPU kernels (`flashsae.kernels.cpu_native`) switched off inside the block:
    its torch ops run instead."""
    saved = os.environ.get(cpu_native.SWITCH)
    os.environ[cpu_native.SWITCH] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[cpu_native.SWITCH]
        else:
            os.environ[cpu_native.SWITCH] = saved


def without_cpu_kernels(fn):
    """``fn`` run with the C++ CPU kernels switched off (`cpu_kernels_off`)."""

    def run(*args, **kwargs):
        with cpu_kernels_off():
            return fn(*args, **kwargs)

    return run


def torch_backend_variant(name: str, **changes):
    """A context in which backend ``name`` is the torch backend with ``changes`` to its fields."""
    import dataclasses

    from flashsae.kernels.registry import get_backend, override_backend

    return override_backend(name, dataclasses.replace(get_backend("torch", "cpu"), name=name, **changes))


def static_torch_adam():
    """A context in which backend `STATIC_TORCH` is the torch backend with the static-size Adam step."""
    return torch_backend_variant(STATIC_TORCH, sparse_adam_step_=static_sparse_adam_step_)


TORCH_OPS = "torch-ops"


def torch_ops_adam():
    """A context in which backend `TORCH_OPS` is the torch backend whose CPU Adam step runs torch ops
    (`_blocked_adam_step_`) rather than the C++ kernel."""
    from flashsae.kernels import reference

    return torch_backend_variant(TORCH_OPS, sparse_adam_step_=without_cpu_kernels(reference.sparse_adam_step_))


UNFOLDED_TORCH = "torch-unfolded"


def unfolded_torch():
    """A context in which backend `UNFOLDED_TORCH` is the torch backend without AuxK's fold: the ops take
    AuxK's selection from a second, masked pass (as for a backend that cannot fold it)."""
    return torch_backend_variant(UNFOLDED_TORCH, topk_encode_with_aux=None)
