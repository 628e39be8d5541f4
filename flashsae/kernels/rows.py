"""Triton row kernels: the sparse primitives of the "triton" backend, shared by decode and encoder backward.

Three primitives, each one kernel (the `flashsae.kernels.registry.Backend` docstring has the contract):

- ``gather_rows``:  out[t] = sum_j coef[t, j] * W[idx[t, j]] (+ bias)     (decode; encoder grad_x)
- ``row_dots``:     out[t, j] = <grad[t], W[idx[t, j]]>                   (decoder grad_vals)
- ``segment_rows``: grad_rows[u] = sum_{idx[t, j] = rows[u]} coef[t, j] * (vec[t] - shift)
                                                                          (grad W_dec / W_enc rows)

The segment sums take the grouping of the fired pairs by feature (`flashsae.kernels.pairs`, one
sort per step shared by both backward passes); one program sums one feature's pairs in a fixed
order over a wide slice of d, so the row gradients are deterministic (no atomics) and every lane
loads a useful column. All math is fp32; outputs are cast on store. Nothing here reads a device
value on the host: grids are sized by the shapes alone.
Launchers are plain Python with the signatures of `flashsae.kernels.reference`; inputs are assumed
validated and contiguous (`flashsae.ops` does that). `flashsae.ops` composes the ops from them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pairs import PairGroups

# Tile sizes. Gathered rows are read once per (token, slot) pair whatever the tiling, so the tiles
# only need to be wide enough along d for coalesced loads and tall enough to amortize idx loads.
BLOCK_TOKENS = 32
MAX_BLOCK_D = 128


def _block_d(d: int) -> int:
    return min(MAX_BLOCK_D, triton.next_power_of_2(max(d, 16)))


# --------------------------------------------------------------------------------------------- gather
# Tiling: program (m, n) owns out[m*BLOCK_B : (m+1)*BLOCK_B, n*BLOCK_D : (n+1)*BLOCK_D] and loops over
# the k slots: each step gathers one W row per token of the block (a [BLOCK_B, BLOCK_D] tile) and
# adds coef[:, j] times it to an fp32 accumulator.
@triton.jit
def _gather_rows_kernel(
    coef_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr,
    n_tokens, k, d,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    tokens = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    token_mask = tokens < n_tokens
    col_mask = cols < d
    tile_mask = token_mask[:, None] & col_mask[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for j in range(0, k):
        c = tl.load(coef_ptr + tokens * k + j, mask=token_mask, other=0.0).to(tl.float32)
        row = tl.load(idx_ptr + tokens * k + j, mask=token_mask, other=0)
        w = tl.load(w_ptr + row[:, None] * d + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        acc += c[:, None] * w
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tokens[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


def gather_rows(
    coef: torch.Tensor,
    idx: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j coef[t, j] * W[idx[t, j]] (+ bias)``: coef [B, k], idx [B, k] int64, W [F, d] -> [B, d].

    fp32 accumulation; ``out`` defaults to a new fp32 [B, d] tensor and is written in its own dtype.
    """
    n_tokens, k = idx.shape
    d = W.shape[1]
    if out is None:
        out = torch.empty(n_tokens, d, dtype=torch.float32, device=W.device)
    if n_tokens == 0 or d == 0:
        return out
    block_d = _block_d(d)
    grid = (triton.cdiv(n_tokens, BLOCK_TOKENS), triton.cdiv(d, block_d))
    _gather_rows_kernel[grid](
        coef, idx, W, bias if bias is not None else W, out, n_tokens, k, d,
        HAS_BIAS=bias is not None, BLOCK_B=BLOCK_TOKENS, BLOCK_D=block_d,
    )
    return out


# ------------------------------------------------------------------------------------------- row dots
# Tiling: program (m, j) owns out[m*BLOCK_B : (m+1)*BLOCK_B, j]: it gathers slot j's W row for each
# token of the block and sweeps d in BLOCK_D chunks, summing grad * w per token in fp32.
@triton.jit
def _row_dots_kernel(
    grad_ptr, idx_ptr, w_ptr, out_ptr,
    n_tokens, k, d,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    tokens = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    token_mask = tokens < n_tokens
    row = tl.load(idx_ptr + tokens * k + j, mask=token_mask, other=0)
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        tile_mask = token_mask[:, None] & (cols < d)[None, :]
        g = tl.load(grad_ptr + tokens[:, None] * d + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row[:, None] * d + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * w, axis=1)
    tl.store(out_ptr + tokens * k + j, acc.to(out_ptr.dtype.element_ty), mask=token_mask)


def row_dots(
    grad: torch.Tensor, idx: torch.Tensor, W: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t, j] = <grad[t], W[idx[t, j]]>`` in fp32: grad [B, d], idx [B, k] int64, W [F, d] -> [B, k]."""
    n_tokens, k = idx.shape
    d = W.shape[1]
    if out is None:
        out = torch.empty(n_tokens, k, dtype=torch.float32, device=W.device)
    if n_tokens == 0 or k == 0:
        return out
    grid = (triton.cdiv(n_tokens, BLOCK_TOKENS), k)
    _row_dots_kernel[grid](grad, idx, W, out, n_tokens, k, d, BLOCK_B=BLOCK_TOKENS, BLOCK_D=_block_d(d))
    return out


# -------------------------------------------------------------------------------------- segment sums
# Tiling: program (u, n) owns grad_rows[u, n*BLOCK_D : (n+1)*BLOCK_D], a slice of d wide enough that
# all its lanes load useful columns (`_segment_block_d`). Slot u's pairs are
# pairs[offsets[u] : offsets[u + 1]] (flat positions t * k + j, ascending); the program walks them one
# at a time in that fixed order (deterministic, no atomics): one pair position, one coefficient, then a
# full-width load of vec[t] - shift, accumulated in fp32 registers and stored once. Padding slots own
# no pairs and store zeros. The n == 0 programs also write the slot's sum of coefficients.
@triton.jit
def _segment_rows_kernel(
    coef_ptr, pairs_ptr, offsets_ptr, vec_ptr, shift_ptr, out_ptr, coef_sum_ptr,
    k, d,
    HAS_SHIFT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    start = tl.load(offsets_ptr + u)
    stop = tl.load(offsets_ptr + u + 1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    col_mask = cols < d
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    coef_total = tl.zeros((1,), dtype=tl.float32)
    for p in range(start, stop):
        flat = tl.load(pairs_ptr + p)
        c = tl.load(coef_ptr + flat).to(tl.float32)
        v = tl.load(vec_ptr + (flat // k) * d + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            v = v - shift
        acc += c * v
        coef_total += c
    tl.store(out_ptr + u * d + cols, acc, mask=col_mask)
    tl.store(coef_sum_ptr + u, tl.sum(coef_total, axis=0), mask=pid_d == 0)


# Widest d-slice per segment program, and the most lanes a slice may leave masked (as a fraction of d).
MAX_SEGMENT_BLOCK_D = 1024
SEGMENT_WASTE = 1 / 8


def _segment_block_d(d: int) -> int:
    """The widest power-of-two slice (<= MAX_SEGMENT_BLOCK_D) whose masked tail is <= SEGMENT_WASTE * d (or 128 wide)."""
    block = min(MAX_SEGMENT_BLOCK_D, triton.next_power_of_2(max(d, 16)))
    while block > 128 and triton.cdiv(d, block) * block - d > SEGMENT_WASTE * d:
        block //= 2
    return block


def segment_rows(
    coef: torch.Tensor,
    groups: PairGroups,
    vecs: torch.Tensor,
    shift: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot sums over the fired pairs of ``groups``: the compact row gradient.

    coef [B, k], groups: `flashsae.kernels.pairs.PairGroups` of the same [B, k] selection (R slots),
    vecs [B, d], shift [d] or None. Returns grad_rows [R, d] fp32 with
    ``grad_rows[u] = sum_{pairs of slot u} coef[t, j] * (vecs[t] - shift)`` (zeros in padding slots)
    and coef_sums [R] fp32. ``out`` (optional, fp32 [>= R, d]) receives grad_rows; tests poison it.
    """
    n_slots, d = groups.n_slots, vecs.shape[1]
    grad_rows = out[:n_slots] if out is not None else torch.empty(n_slots, d, dtype=torch.float32, device=vecs.device)
    coef_sums = torch.empty(n_slots, dtype=torch.float32, device=vecs.device)
    if n_slots == 0:
        return grad_rows, coef_sums
    block_d = _segment_block_d(d)
    grid = (n_slots, max(1, triton.cdiv(d, block_d)))  # d == 0: one program per slot still sums the coefficients
    _segment_rows_kernel[grid](
        coef, groups.pairs, groups.offsets, vecs, shift if shift is not None else vecs, grad_rows, coef_sums,
        groups.k, d,
        HAS_SHIFT=shift is not None, BLOCK_D=block_d, num_warps=max(1, min(4, block_d // 256)),
    )
    return grad_rows, coef_sums
