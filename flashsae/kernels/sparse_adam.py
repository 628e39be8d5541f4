"""Triton row-sparse Adam step (the "triton" backend's ``sparse_adam_step_``): reads and writes only
the touched rows of a parameter and its moments.

Same signature and semantics as `flashsae.kernels.reference.sparse_adam_step_`: lazy Adam with a
per-row step count, optional unit-norm rows (gradient component along the row removed before the
step, row rescaled to unit norm after it), optional fp32 master weights held as the bf16 parameter
plus int16 low bits, fused in one kernel so each touched row is read and written once (plus one
re-read of the row when it is rescaled). Padding slots (``valid`` False) are masked in the kernel;
the grid is sized by the slot count alone, so no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import adam_row_scalars

TILE_ELEMENTS = 2048
MAX_BLOCK_D = 256
_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32 (a constexpr: kernels may read it)
_HALF_UNIT = tl.constexpr(0x8000)  # half a bf16 unit in the fp32 bit pattern (see reference.split_master)
_LOW16 = tl.constexpr(0xFFFF)


@triton.jit
def _load_weights(param_ptr, low_ptr, at, mask, HAS_LOW: tl.constexpr):
    """fp32 weights at ``at``: the parameter, or its exact fp32 master (bf16 high bits + int16 low bits)."""
    if HAS_LOW:
        high = tl.load(param_ptr + at, mask=mask, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
        low = tl.load(low_ptr + at, mask=mask, other=0).to(tl.int32)
        w = ((high << 16) + low).to(tl.float32, bitcast=True)
    else:
        w = tl.load(param_ptr + at, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _store_weights(param_ptr, low_ptr, at, w, mask, HAS_LOW: tl.constexpr):
    """Store fp32 ``w``: rounded to the parameter's dtype, or split into bf16 high and int16 low bits."""
    if HAS_LOW:
        bits = w.to(tl.int32, bitcast=True)
        low = ((bits + _HALF_UNIT) & _LOW16) - _HALF_UNIT
        high = ((bits - low) >> 16).to(tl.int16)
        tl.store(param_ptr + at, high.to(tl.bfloat16, bitcast=True), mask=mask)
        tl.store(low_ptr + at, low.to(tl.int16), mask=mask)
    else:
        tl.store(param_ptr + at, w.to(param_ptr.dtype.element_ty), mask=mask)


# Tiling: one program owns BLOCK_R touched rows and sweeps their m columns in BLOCK_D chunks:
# pass 1 (UNIT_NORM only) forms <g, w> and <w, w> per row, pass 2 updates the moments and the row
# and accumulates the new row's squared norm, pass 3 (UNIT_NORM only) re-reads the row it just wrote
# and divides it by that norm.
@triton.jit
def _sparse_adam_kernel(
    param_ptr, grad_ptr, rows_ptr, valid_ptr, low_ptr, m_ptr, v_ptr, step_size_ptr, bc2_sqrt_ptr,
    n_touched, width, beta1, beta2, eps,
    HAS_ROWS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_LOW: tl.constexpr, UNIT_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = r < n_touched
    if HAS_VALID:
        row_mask = row_mask & (tl.load(valid_ptr + r, mask=row_mask, other=0) != 0)
    if HAS_ROWS:
        prow = tl.load(rows_ptr + r, mask=row_mask, other=0)
    else:
        prow = r
    step_size = tl.load(step_size_ptr + r, mask=row_mask, other=0.0)
    bc2_sqrt = tl.load(bc2_sqrt_ptr + r, mask=row_mask, other=1.0)
    along = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if UNIT_NORM:
        gw = tl.zeros((BLOCK_R,), dtype=tl.float32)
        ww = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, width, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = row_mask[:, None] & (cols < width)[None, :]
            g = tl.load(grad_ptr + r[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            w = _load_weights(param_ptr, low_ptr, prow[:, None] * width + cols[None, :], mask, HAS_LOW)
            gw += tl.sum(g * w, axis=1)
            ww += tl.sum(w * w, axis=1)
        along = gw / tl.maximum(ww, _TINY)
    sq_norm = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, width, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < width)[None, :]
        at = prow[:, None] * width + cols[None, :]
        g = tl.load(grad_ptr + r[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = _load_weights(param_ptr, low_ptr, at, mask, HAS_LOW)
        m = tl.load(m_ptr + at, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if UNIT_NORM:
            g = g - along[:, None] * w
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        w = w - step_size[:, None] * m / (tl.sqrt(v) / bc2_sqrt[:, None] + eps)
        w = tl.where(mask, w, 0.0)
        sq_norm += tl.sum(w * w, axis=1)
        tl.store(m_ptr + at, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + at, v.to(v_ptr.dtype.element_ty), mask=mask)
        _store_weights(param_ptr, low_ptr, at, w, mask, HAS_LOW)
    if UNIT_NORM:
        tl.debug_barrier()
        norm = tl.maximum(tl.sqrt(sq_norm), _TINY)
        for c0 in range(0, width, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = row_mask[:, None] & (cols < width)[None, :]
            at = prow[:, None] * width + cols[None, :]
            w = _load_weights(param_ptr, low_ptr, at, mask, HAS_LOW)
            _store_weights(param_ptr, low_ptr, at, w / norm[:, None], mask, HAS_LOW)


def sparse_adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    rows: torch.Tensor | None,
    valid: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    low: torch.Tensor | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    unit_norm: bool = False,
) -> None:
    """One lazy Adam step on the touched rows of ``param``, in place (see reference.sparse_adam_step_).

    param [n, m], exp_avg / exp_avg_sq [n, m] fp32 | bf16, step [n] int64, low [n, m] int16 or None
    (bf16 params), all contiguous; grad [U, m] contiguous for rows ``rows`` [U] int64 where
    ``valid`` [U] bool (None: all), or [n, m] with rows=None.
    """
    step_size, bc2_sqrt = adam_row_scalars(step, rows, valid, lr, beta1, beta2)
    n_touched, width = grad.shape
    if n_touched == 0 or width == 0:
        return
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(max(width, 16)))
    block_r = max(1, TILE_ELEMENTS // block_d)
    grid = (triton.cdiv(n_touched, block_r),)
    _sparse_adam_kernel[grid](
        param, grad, rows if rows is not None else step, valid if valid is not None else step,
        low if low is not None else param, exp_avg, exp_avg_sq, step_size, bc2_sqrt,
        n_touched, width, float(beta1), float(beta2), float(eps),
        HAS_ROWS=rows is not None, HAS_VALID=valid is not None, HAS_LOW=low is not None, UNIT_NORM=unit_norm,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=8,
    )
