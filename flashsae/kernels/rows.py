"""Triton row kernels: the sparse primitives of the "triton" backend, shared by decode and encoder backward.

Three primitives, each one kernel (the `flashsae.kernels.registry.Backend` docstring has the contract):

- ``gather_rows``:  out[t] = sum_j coef[t, j] * W[idx[t, j]] (+ bias)     (decode; encoder grad_x)
- ``row_dots``:     out[t, j] = <grad[t], W[idx[t, j]]>                   (decoder grad_vals)
- ``segment_rows``: grad_rows[u] = sum_{idx[t, j] = rows[u]} coef[t, j] * (vec[t] - shift)
                                                                          (grad W_dec / W_enc rows)

The segment step groups the (token, slot) pairs that fired by feature with one stable sort of the
B * k pairs (O(B k), never O(F)); then one program sums one feature's pairs in a fixed order, so the
row gradients are deterministic (no atomics). All math is fp32; outputs are cast on store.
Launchers are plain Python with the signatures of `flashsae.kernels.reference`; inputs are assumed
validated and contiguous (`flashsae.ops` does that). `flashsae.ops` composes the ops from them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile sizes. Gathered rows are read once per (token, slot) pair whatever the tiling, so the tiles
# only need to be wide enough along d for coalesced loads and tall enough to amortize idx loads.
BLOCK_TOKENS = 32
BLOCK_PAIRS = 16
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
# Tiling: program (u, n) owns grad_rows[u, n*BLOCK_D : (n+1)*BLOCK_D]. Feature rows[u]'s pairs are
# pairs[offsets[u] : offsets[u + 1]] (flat positions t * k + j, ascending); the program walks them
# BLOCK_P at a time, gathers vec[t] - shift and sums coef * vec in fp32, always in the same order.
# The n == 0 programs also write the per-feature sum of coef.
@triton.jit
def _segment_rows_kernel(
    coef_ptr, pairs_ptr, offsets_ptr, vec_ptr, shift_ptr, out_ptr, coef_sum_ptr,
    k, d,
    HAS_SHIFT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
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
    coef_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(start, stop, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        pair_mask = p < stop
        flat = tl.load(pairs_ptr + p, mask=pair_mask, other=0)
        c = tl.load(coef_ptr + flat, mask=pair_mask, other=0.0).to(tl.float32)
        tokens = flat // k
        tile_mask = pair_mask[:, None] & col_mask[None, :]
        v = tl.load(vec_ptr + tokens[:, None] * d + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            v = tl.where(tile_mask, v - shift[None, :], 0.0)
        acc += tl.sum(c[:, None] * v, axis=0)
        coef_acc += c
    tl.store(out_ptr + u * d + cols, acc, mask=col_mask)
    tl.store(coef_sum_ptr + u, tl.sum(coef_acc, axis=0), mask=pid_d == 0)


def group_pairs(idx: torch.Tensor, fired: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the fired (token, slot) pairs by feature with one stable sort of the B * k pairs.

    idx [B, k] int64, fired [B, k] bool. Returns rows [U] int64 (sorted unique fired features),
    offsets [U + 1] int64 and pairs [P] int64 (flat positions t * k + j, feature-major, ascending
    within a feature): feature rows[u] owns pairs[offsets[u] : offsets[u + 1]].
    """
    flat_idx = idx.reshape(-1)
    positions = torch.nonzero(fired.reshape(-1)).squeeze(1)
    features, order = torch.sort(flat_idx[positions], stable=True)
    rows, counts = torch.unique_consecutive(features, return_counts=True)
    offsets = torch.zeros(rows.shape[0] + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return rows, offsets, positions[order]


def segment_rows(
    coef: torch.Tensor,
    idx: torch.Tensor,
    vecs: torch.Tensor,
    fired: torch.Tensor,
    shift: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-feature sums over the pairs where ``fired``: the compact row gradient.

    coef [B, k], idx [B, k] int64, vecs [B, d], fired [B, k] bool, shift [d] or None. Returns
    rows [U] int64 (sorted unique features that fired), grad_rows [U, d] fp32 with
    ``grad_rows[u] = sum_{idx[t, j] = rows[u], fired} coef[t, j] * (vecs[t] - shift)`` and
    coef_sums [U] fp32. ``out`` (optional, fp32 [>= U, d]) receives grad_rows; tests poison it.
    """
    rows, offsets, pairs = group_pairs(idx, fired)
    n_touched, d = rows.shape[0], vecs.shape[1]
    grad_rows = out[:n_touched] if out is not None else torch.empty(n_touched, d, dtype=torch.float32, device=vecs.device)
    coef_sums = torch.empty(n_touched, dtype=torch.float32, device=vecs.device)
    if n_touched == 0 or d == 0:
        return rows, grad_rows, coef_sums.zero_()
    block_d = _block_d(d)
    grid = (n_touched, triton.cdiv(d, block_d))
    _segment_rows_kernel[grid](
        coef, pairs, offsets, vecs, shift if shift is not None else vecs, grad_rows, coef_sums,
        idx.shape[1], d,
        HAS_SHIFT=shift is not None, BLOCK_P=BLOCK_PAIRS, BLOCK_D=block_d,
    )
    return rows, grad_rows, coef_sums
