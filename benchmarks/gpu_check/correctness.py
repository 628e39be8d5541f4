"""Phase 1: every backend of the registry against float64 references, on the device, compiled.

For each backend (`flashsae.kernels.registry.backend_names`, so backends added later are covered)
and each (dtype, k) of the profile, at odd shapes: the encoder's values and indices, the encoder's
backward, the sparse decode and its backward, SparseAdam's lazy step; then one problem whose
weight matrices hold more than 2^31 elements. The judges are the tests' own
(`tests.oracles`, `tests.encoder_checks`), so the CPU tests and this check agree on what
passes. Before each op the device's cached allocator blocks are filled with 0xFF bytes, so an
output element a kernel never writes reads as NaN (or index -1) and fails the check.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from flashsae import ops
from flashsae.kernels.registry import AUTO, backend_names, resolve_backend
from flashsae.optim import SparseAdam
from tests import oracles
from tests.encoder_checks import assert_exact_topk, make_inputs

from .phase import Context

# Rows at the end of W_enc whose bias is raised so that tokens pick them: on the GPU profile their
# element offsets (row * d) lie above 2^31.
HIGH_ROWS, HIGH_BIAS = 512, 2.0
# Seconds a check needs at least before it is started (compiling a kernel variant takes a few).
MIN_CHECK_S = 4.0
LARGE_CHECK_S = 20.0


def poison_cached_memory(device: torch.device) -> None:
    """Fill blocks of the CUDA caching allocator with 0xFF bytes and free them: outputs carved from
    them later start as NaN (floats) or -1 (int64). Best effort; nothing to do on the CPU."""
    if device.type != "cuda":
        return
    blocks = [torch.empty(n, dtype=torch.uint8, device=device).fill_(0xFF) for n in (256 << 20, 32 << 20)]
    blocks += [torch.empty(64 << 10, dtype=torch.uint8, device=device).fill_(0xFF) for _ in range(64)]
    del blocks


def _on(device: torch.device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def dense(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as a dense tensor, whatever form the op gave it (dense, sparse COO, row gradient)."""
    return grad.to_dense()


# ----------------------------------------------------------------------------------------- checks
def encoder_forward(backend: str, dtype: torch.dtype, k: int, shape, with_pre: bool, seed: int,
                    device: torch.device) -> dict:
    """topk_encode's values and indices are a float64 top-k up to the accumulation's rounding."""
    B, d, F = shape
    x, W, b, b_pre = _on(device, *make_inputs(B, d, F, dtype, seed, with_pre=with_pre))
    poison_cached_memory(device)
    vals, idx = ops.topk_encode(x, W, b, k, b_pre=b_pre, backend=backend)
    assert_exact_topk(vals, idx, x, W, b, b_pre, k)
    return {"positive_fraction": round(float((vals > 0).float().mean()), 4)}


def encoder_backward(backend: str, dtype: torch.dtype, k: int, shape, seed: int, device: torch.device) -> None:
    """The encoder's gradients (x, W_enc, b_enc, b_pre), dense and sparse, against float64 autograd."""
    B, d, F = shape
    x, W, b, b_pre = _on(device, *make_inputs(B, d, F, dtype, seed))
    grad_vals = torch.randn(B, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(device)
    for sparse_grad in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, W, b, b_pre)]
        poison_cached_memory(device)
        vals, idx = ops.topk_encode(*leaves[:3], k, b_pre=leaves[3], backend=backend, sparse_grad=sparse_grad)
        vals.backward(grad_vals)
        refs = oracles.encoder_grads_float64(x, W, b, b_pre, idx, grad_vals)
        for name, leaf, ref in zip(("x", "W_enc", "b_enc", "b_pre"), leaves, refs):
            oracles.assert_close(dense(leaf.grad), ref, dtype, f"grad {name} (sparse_grad={sparse_grad})")


def decode_backward(backend: str, dtype: torch.dtype, k: int, shape, seed: int, device: torch.device) -> None:
    """sparse_decode's output and gradients (vals, W_dec, b_dec), dense and sparse, against float64 autograd."""
    B, d, F = shape
    vals, idx, W, b, grad_out = _on(device, *oracles.make_decode(B, d, F, k, dtype, seed))
    ref_x, ref_gv, ref_gW, ref_gb = oracles.dense_decode_grads(vals, idx, W, b, grad_out)
    for sparse_grad in (False, True):
        v, Wp, bp = (t.clone().requires_grad_() for t in (vals, W, b))
        poison_cached_memory(device)
        x_hat = ops.sparse_decode(v, idx, Wp, bp, backend=backend, sparse_grad=sparse_grad)
        oracles.assert_close(x_hat, ref_x, dtype, f"x_hat (sparse_grad={sparse_grad})")
        x_hat.backward(grad_out)
        oracles.assert_close(v.grad, ref_gv, dtype, f"grad vals (sparse_grad={sparse_grad})")
        oracles.assert_close(dense(Wp.grad), ref_gW, dtype, f"grad W_dec (sparse_grad={sparse_grad})")
        oracles.assert_close(bp.grad, ref_gb, dtype, f"grad b_dec (sparse_grad={sparse_grad})")


# ------------------------------------------------------------------- more than 2^31 elements
def _random_rows(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int, scale: float) -> torch.Tensor:
    """A [n, d] ``dtype`` matrix of scale * N(0, 1) entries, drawn in blocks of rows (no fp32 copy of it all)."""
    out = torch.empty(n, d, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, 1 << 16):
        block = out[start:start + (1 << 16)]
        block.copy_(torch.randn(block.shape, generator=g, device=device).mul_(scale))
    return out


def _large_encoder_inputs(shape, dtype, device):
    B, d, F, _ = shape
    g = torch.Generator(device=device).manual_seed(31)
    x = (torch.randn(B, d, generator=g, device=device) + 0.3).to(dtype)
    W = _random_rows(F, d, dtype, device, seed=32, scale=d ** -0.5)
    b = 0.2 * torch.randn(F, generator=g, device=device) - 0.1
    b[-HIGH_ROWS:] += HIGH_BIAS
    b_pre = 0.3 + 0.1 * torch.randn(d, generator=g, device=device)
    return x, W, b.to(dtype), b_pre.to(dtype)


def large_encoder(backend: str, shape, device: torch.device) -> dict:
    """topk_encode with W_enc of F * d elements (above 2^31 on the GPU), the top rows picked often."""
    B, d, F, k = shape
    x, W, b, b_pre = _large_encoder_inputs(shape, torch.bfloat16, device)
    poison_cached_memory(device)
    vals, idx = ops.topk_encode(x, W, b, k, b_pre=b_pre, backend=backend)
    high = int((idx >= F - HIGH_ROWS).sum())
    assert high > 0, "no token picked one of the last rows; the test did not reach the high offsets"
    assert_exact_topk(vals, idx, x, W, b, b_pre, k)
    return {"elements": F * d, "slots_in_last_rows": high, "largest_offset": int(idx.max() + 1) * d}


def _large_selection(shape, device):
    """vals [B, k] >= 0 (some zero) and distinct idx [B, k] drawn from the first rows and the last ones."""
    B, d, F, k = shape
    g = torch.Generator().manual_seed(33)
    pool = torch.cat([torch.arange(HIGH_ROWS), torch.arange(F - HIGH_ROWS, F)])
    idx = torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:k]] for _ in range(B)])
    vals = torch.rand(B, k, generator=g) * 2
    vals[::3, k // 2:] = 0.0
    return vals.to(device), idx.to(device)


def large_decode_and_adam(backend: str, shape, device: torch.device) -> dict:
    """sparse_decode and its backward on W_dec of F * d elements, then one SparseAdam step on it.

    Judged on the rows the batch touches, with the tests' float64 references on that sub-problem;
    rows it does not touch must keep a zero gradient and stay bit-identical.
    """
    B, d, F, k = shape
    vals, idx = _large_selection(shape, device)
    W = _random_rows(F, d, torch.float32, device, seed=34, scale=d ** -0.5)
    W.div_(W.norm(dim=1, keepdim=True))
    b = 0.1 * torch.randn(d, generator=torch.Generator(device=device).manual_seed(35), device=device)
    grad_out = torch.randn(B, d, generator=torch.Generator(device=device).manual_seed(36), device=device)
    rows = torch.unique(idx)
    local = torch.searchsorted(rows, idx)
    ref_x, ref_gv, ref_gW, _ = oracles.dense_decode_grads(vals, local, W[rows], b, grad_out)

    param = torch.nn.Parameter(W)
    v = vals.clone().requires_grad_()
    poison_cached_memory(device)
    x_hat = ops.sparse_decode(v, idx, param, b, backend=backend, sparse_grad=True)
    oracles.assert_close(x_hat, ref_x, torch.float32, "x_hat")
    x_hat.backward(grad_out)
    oracles.assert_close(v.grad, ref_gv, torch.float32, "grad vals")
    grad_dense = dense(param.grad)
    oracles.assert_close(grad_dense[rows], ref_gW, torch.float32, "grad W_dec (touched rows)")
    fired = oracles.fired_rows(idx, vals)
    outside = torch.ones(F, dtype=torch.bool, device=device)
    outside[fired] = False
    assert not grad_dense.abs().sum(dim=1)[outside].any(), "a row no token fired has a non-zero gradient"
    grad_rows = grad_dense[fired]
    del grad_dense

    w_before, last_before = param.detach()[fired].clone(), param.detach()[-1].clone()
    sample = outside.nonzero().squeeze(1)[:: max(1, int(outside.sum()) // 4096)]
    sample_before = param.detach()[sample].clone()
    param.grad = oracles.sparse_rows_grad(fired, grad_rows, tuple(param.shape))
    opt = SparseAdam([param], lr=oracles.LR, betas=oracles.BETAS, eps=oracles.EPS, backend=backend, unit_norm=[param])
    opt.step()
    w_ref = oracles.lazy_adam_reference(w_before, [(torch.arange(fired.numel()), grad_rows)], unit_norm=True)[0]
    torch.testing.assert_close(param.detach()[fired].double().cpu(), w_ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(oracles.bits(param.detach()[sample]), oracles.bits(sample_before)), "an untouched row moved"
    if not bool((fired == F - 1).any()):
        assert torch.equal(oracles.bits(param.detach()[-1]), oracles.bits(last_before)), "the untouched last row moved"
    return {"elements": F * d, "rows_touched": int(fired.numel()), "largest_offset": int(fired.max() + 1) * d}


# ------------------------------------------------------------------------------------------ plan
Check = tuple[int, str, Callable[[], dict | None], float]  # (tier, name, run, seconds needed)


def pair_tiers(pairs: list[tuple[torch.dtype, int]]) -> list[int]:
    """Priority of each (dtype, k): bf16 at k=64 (the headline) first, then one pair per other dtype, then the rest."""
    first = next((i for i, pair in enumerate(pairs) if pair == (torch.bfloat16, 64)), 0)
    seen = {pairs[first][0]}
    tiers = []
    for i, (dtype, _) in enumerate(pairs):
        tiers.append(0 if i == first else 1 if dtype not in seen else 2)
        seen.add(dtype)
    return tiers


def plan(ctx: Context) -> list[Check]:
    """Every check of the phase by tier: one of each kind per backend first (the backend "auto"
    picks on this device leading), then one per dtype and the large problem, then the rest."""
    p, device = ctx.profile, ctx.device
    auto = resolve_backend(AUTO, device)
    backends = sorted((name for name in backend_names() if name != AUTO), key=lambda name: name != auto)
    pairs = p.dtype_k_pairs()
    checks: list[Check] = []
    for bi, backend in enumerate(backends):
        for i, ((dtype, k), tier) in enumerate(zip(pairs, pair_tiers(pairs))):
            enc_shape = p.encoder_shapes[i % len(p.encoder_shapes)]
            grad_shape = p.grad_shapes[i % len(p.grad_shapes)]
            tag = f"{backend} {str(dtype).removeprefix('torch.')} k={k}"
            seed = 1000 * bi + 17 * i + k
            checks += [
                (tier, f"encoder forward {tag} {enc_shape}",
                 partial(encoder_forward, backend, dtype, k, enc_shape, i % 2 == 0, seed, device), MIN_CHECK_S),
                (tier, f"encoder backward {tag} {grad_shape}",
                 partial(encoder_backward, backend, dtype, k, grad_shape, seed, device), MIN_CHECK_S),
                (tier, f"decode + backward {tag} {grad_shape}",
                 partial(decode_backward, backend, dtype, k, grad_shape, seed, device), MIN_CHECK_S),
            ]
        checks += [
            (0, f"SparseAdam lazy step {backend} fp32",
             partial(oracles.check_lazy_adam, backend, False, device), MIN_CHECK_S),
            (1, f"SparseAdam lazy step {backend} fp32 unit_norm",
             partial(oracles.check_lazy_adam, backend, True, device), MIN_CHECK_S),
            (1, f"SparseAdam {backend} bf16 moments", partial(oracles.check_bf16_moments, backend, device), MIN_CHECK_S),
            (1, f"SparseAdam {backend} bf16 params", partial(oracles.check_bf16_params, backend, device), MIN_CHECK_S),
            (1, f"encoder forward {backend} bf16 F*d={p.large[1] * p.large[2]:,}",
             partial(large_encoder, backend, p.large, device), LARGE_CHECK_S),
            (1, f"decode + backward + SparseAdam {backend} fp32 F*d={p.large[1] * p.large[2]:,}",
             partial(large_decode_and_adam, backend, p.large, device), LARGE_CHECK_S),
        ]
    return sorted(checks, key=lambda c: c[0])


def run(ctx: Context) -> None:
    for tier, name, fn, min_s in plan(ctx):
        ctx.recorder.check(name, fn, until=ctx.until, min_s=min_s, tier=tier)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
