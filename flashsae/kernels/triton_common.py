"""Triton pieces both Triton encoders share: b_pre folded into the bias, and keys on registers.

- ``fold_pre_bias``: ``bias = b_enc - W_enc @ b_pre`` in fp32, one GEMV, so the encoder's matmul
  runs on x itself (bf16/fp16 tensor-core operands stay exact inputs; subtracting b_pre from x
  first would force fp32 operands). Equal to the reference up to fp32 accumulation.
- ``relu_bits``: the int32 bit pattern of relu(value) under the NaN policy (a NaN pre-activation
  counts as -inf, so it is a zero after the ReLU, like every non-positive value).
- ``pack_key`` / ``key_index``: `flashsae.kernels.keys` on registers (same format, same constants).
- Candidate lists: one list of at most ``capacity`` packed keys per (token, list) in global memory,
  owned by one program. ``append_survivors`` appends the keys of a tile's elements that beat their
  list's floor (the value of the list's k-th best key, -1 before k keys exist) and compacts a list
  that would overflow to its exact top-k (``compact_lists``), which raises the floor;
  ``best_of_lists`` takes the final exact top-k over every list of a token. With features appended
  in ascending index order, a strict ``> floor`` is exact: an element equal to the floor can never
  enter the top-k, k lower-index keys with a value >= it exist.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .keys import EMPTY_KEY, INDEX_MASK, INF_BITS as _INF_BITS, unpack_keys

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# fold_pre_bias tiles (a GEMV: memory bound; sized to stay clear of register spills on sm_90).
FOLD_BLOCK_F, FOLD_BLOCK_D, FOLD_WARPS = 64, 64, 8
# A key that unpacks to NaN at index -2^31: buffers filled with it show any slot left unwritten.
POISON_KEY = torch.iinfo(torch.int64).max
# The key format's constants, as constexprs the kernels may read (see `flashsae.kernels.keys`).
KEY_INDEX_MASK = tl.constexpr(INDEX_MASK)
KEY_EMPTY = tl.constexpr(EMPTY_KEY)
# fp32 +inf's bit pattern: patterns above it (as int32, sign clear) are NaN.
INF_BITS = tl.constexpr(_INF_BITS)


# Tiling: program f owns bias[f*BLOCK_F : (f+1)*BLOCK_F] and sweeps d in BLOCK_D chunks, summing
# W_enc[f, j] * b_pre[j] in fp32; it stores b_enc[f] - that sum.
@triton.jit
def _fold_pre_bias_kernel(
    w_ptr, b_ptr, pre_ptr, out_ptr,
    n_features, d,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    feats = pid * BLOCK_F + tl.arange(0, BLOCK_F).to(tl.int64)
    feat_mask = feats < n_features
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        col_mask = cols < d
        w = tl.load(w_ptr + feats[:, None] * d + cols[None, :], mask=feat_mask[:, None] & col_mask[None, :], other=0.0)
        pre = tl.load(pre_ptr + cols, mask=col_mask, other=0.0)
        acc += tl.sum(w.to(tl.float32) * pre.to(tl.float32)[None, :], axis=1)
    b = tl.load(b_ptr + feats, mask=feat_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + feats, b - acc, mask=feat_mask)


def fold_block_d(d: int) -> int:
    """fold_pre_bias's BLOCK_D for width d."""
    return min(FOLD_BLOCK_D, triton.next_power_of_2(max(d, 16)))


def fold_pre_bias(
    W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``b_enc - W_enc @ b_pre`` in fp32: W_enc [F, d], b_enc [F], b_pre [d] -> [F] fp32 (written into
    ``out``, contiguous fp32 [F], when given)."""
    n_features, d = W_enc.shape
    if out is None:
        out = torch.empty(n_features, dtype=torch.float32, device=W_enc.device)
    _fold_pre_bias_kernel[(triton.cdiv(n_features, FOLD_BLOCK_F),)](
        W_enc, b_enc, b_pre, out, n_features, d, BLOCK_F=FOLD_BLOCK_F, BLOCK_D=fold_block_d(d), num_warps=FOLD_WARPS
    )
    return out


def encoder_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor | None) -> torch.Tensor:
    """The bias the encoders add to ``x @ W_enc.T``: b_enc itself, or fold_pre_bias with b_pre."""
    return b_enc if b_pre is None else fold_pre_bias(W_enc, b_enc, b_pre)


@triton.jit
def relu_bits(value):
    """fp32 value -> the int32 bit pattern of relu(value); NaN (either sign) counts as -inf, i.e. 0.

    Non-negative fp32 patterns order like the values, so the result compares like relu(value).
    """
    bits = tl.maximum(value.to(tl.int32, bitcast=True), 0)  # negatives and -0.0 -> +0.0's pattern
    return tl.where(bits > INF_BITS, 0, bits)  # positive-signed NaN patterns lie above +inf's


@triton.jit
def pack_key(bits, index):
    """int32 fp32-bit pattern of a value >= +0.0 and int64 feature index -> int64 key."""
    return (bits.to(tl.int64) << 32) | (KEY_INDEX_MASK - index)


@triton.jit
def key_index(key):
    """The feature index of an int64 key (meaningless for the empty key); low 32 bits by arithmetic shifts."""
    return KEY_INDEX_MASK - (key - ((key >> 32) << 32))


# ------------------------------------------------------------------------------ candidate lists
# Tiling: rows are the BM lists of one program, [BM, BL] at a time. The k-th largest key of each row
# marked ``needs`` is found bit by bit (63 counting passes over the row's keys: keys are distinct
# and non-negative, so the largest value with at least k keys >= it is exactly the k-th key); then
# the keys >= it (exactly k) are moved to the front in order, in place (each tile is loaded before
# any store into it, and stores only land at or below the loaded positions).
@triton.jit
def compact_lists(keys_ptr, list_row, count, floor, needs, capacity, k, BM: tl.constexpr, BL: tl.constexpr):
    tl.debug_barrier()  # this program's appends are visible to all of its threads
    n_max = tl.max(tl.where(needs, count, 0), axis=0)
    kth = tl.zeros((BM,), dtype=tl.int64)
    for i in range(0, 63):
        trial = kth | (tl.full((BM,), 1, dtype=tl.int64) << (62 - i))
        n_ge = tl.zeros((BM,), dtype=tl.int32)
        for l0 in range(0, n_max, BL):
            slots = l0 + tl.arange(0, BL).to(tl.int64)
            valid = needs[:, None] & (slots[None, :] < count[:, None])
            key = tl.load(keys_ptr + (list_row[:, None] * capacity + slots[None, :]), mask=valid, other=KEY_EMPTY)
            n_ge += tl.sum((key >= trial[:, None]).to(tl.int32), axis=1)
        kth = tl.where(n_ge >= k, trial, kth)
    written = tl.zeros((BM,), dtype=tl.int32)
    for l0 in range(0, n_max, BL):
        slots = l0 + tl.arange(0, BL).to(tl.int64)
        valid = needs[:, None] & (slots[None, :] < count[:, None])
        key = tl.load(keys_ptr + (list_row[:, None] * capacity + slots[None, :]), mask=valid, other=KEY_EMPTY)
        keep = valid & (key >= kth[:, None])
        dest = written[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
        tl.store(keys_ptr + (list_row[:, None] * capacity + dest), key, mask=keep)
        written += tl.sum(keep.to(tl.int32), axis=1)
    tl.debug_barrier()  # the compacted lists are visible before the next appends
    count = tl.where(needs, written, count)
    floor = tl.where(needs, tl.maximum(floor, (kth >> 32).to(tl.int32)), floor)
    return count, floor


# Tiling: the tile of one program is features x tokens: bits [BN, BM] int32 are relu_bits of its
# elements (-1 for elements outside the matrix), feats [BN] int64 their feature indices; each token
# (column) has its list. (Features along the first axis let the fused kernel's GEMM put BN on the
# wgmma M dimension and keep few elements per thread.)
@triton.jit
def append_survivors(keys_ptr, list_row, count, floor, bits, feats, capacity, k, BM: tl.constexpr, BL: tl.constexpr):
    """Append the tile's elements that beat their list's floor; returns the new (count, floor) [BM].

    One compare per element; a tile with survivors computes their slots with a prefix sum and
    stores their keys. A list that would overflow is compacted first (capacity >= k + BN, so it
    always has room afterwards), and the survivors are compared again with its raised floor.
    """
    beats = bits > floor[None, :]
    n_new = tl.sum(beats.to(tl.int32), axis=0)
    if tl.max(n_new, axis=0) > 0:
        needs = count + n_new > capacity
        if tl.max(needs.to(tl.int32), axis=0) > 0:
            count, floor = compact_lists(keys_ptr, list_row, count, floor, needs, capacity, k, BM, BL)
            beats = bits > floor[None, :]
            n_new = tl.sum(beats.to(tl.int32), axis=0)
        slot = count[None, :] + tl.cumsum(beats.to(tl.int32), axis=0) - 1
        key = pack_key(bits, feats[:, None])
        tl.store(keys_ptr + (list_row[None, :] * capacity + slot), key, mask=beats)
        count += n_new
    return count, floor


def best_of_lists(keys: torch.Tensor, counts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k over every list of each token: keys [B, L, capacity] int64, counts [B, L] int32
    (valid keys per list) -> (vals [B, k] fp32 descending, idx [B, k] int64). Overwrites the unused
    slots of ``keys`` with the empty key; one torch top-k over packed keys, no host sync."""
    slots = torch.arange(keys.shape[-1], device=keys.device)
    keys.masked_fill_(slots >= counts.unsqueeze(-1), EMPTY_KEY)
    best = keys.view(keys.shape[0], -1).topk(k, dim=1, sorted=True).values
    return unpack_keys(best)
