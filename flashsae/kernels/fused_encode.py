"""Triton fused TopK encoder (the "triton" backend's ``topk_encode``): ``top-k(relu((x - b_pre) @ W_enc.T + b_enc))``
without the [B, F] matrix.

Data flow, top to bottom in this file:

1. ``fold_pre_bias`` (only with ``b_pre``): ``bias = b_enc - W_enc @ b_pre`` in fp32, one GEMV,
   so the matmul runs on x itself (bf16/fp16 tensor-core operands stay exact inputs; subtracting
   b_pre from x first would force fp32 operands). Equal to the reference up to fp32 accumulation.
2. Stage 1 (``_topk_range_kernel``): a program owns BM tokens and one contiguous range of features;
   tile by tile it forms the fp32 pre-activations with ``tl.dot``, compares every element with
   its token's current k-th best key (one 32-bit compare per element) and merges only the elements
   that beat it into a running top-KP kept in registers. The pre-activations are never written.
   Each range's top-KP keys go to a small candidates buffer [B, n_ranges, KP] int64.
3. Stage 2 (``topk_encode``): top-k of each token's n_ranges * KP candidates, unpacked to values
   and indices.

Keys are the packed int64 keys of `flashsae.kernels.keys` (``_pack_key`` below is their in-kernel
form): they order by value, then by lower index, so ties resolve exactly as in
`flashsae.kernels.reference.topk_encode`. Elements outside [B, F] get the empty key, below every
real key (a real zero has key >= 0, so tokens with fewer than k positives fill with zeros at the
lowest unchosen indices, as in the reference).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .keys import EMPTY_KEY, INDEX_MASK, unpack_keys

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Ranges are whole multiples of this many features, a multiple of every config's BN.
RANGE_ALIGN = 512
# Bound on stage 2's work and memory: n_ranges * KP candidate keys per row.
MAX_CANDIDATES_PER_ROW = 8192
# Stage 1 aims for this many programs per SM, so the grid fills the GPU even when B is small.
PROGRAMS_PER_SM = 4
# SM count assumed when no GPU is visible (an H100 SXM), so plans are reproducible on CPU.
DEFAULT_SMS = 132
# fold_pre_bias tiles (a GEMV: memory bound; sized to stay clear of register spills on sm_90).
FOLD_BLOCK_F, FOLD_BLOCK_D, FOLD_WARPS = 64, 64, 8
_POISON_KEY = torch.iinfo(torch.int64).max  # unpacks to NaN at index -2^31: any unwritten slot shows
# The key format's constants, as constexprs the kernels may read (see `flashsae.kernels.keys`).
_INDEX_MASK = tl.constexpr(INDEX_MASK)
_EMPTY_KEY = tl.constexpr(EMPTY_KEY)


def padded_k(k: int) -> int:
    """KP: the power of two >= k that stage 1 keeps per token and range (at least 2)."""
    return max(2, triton.next_power_of_2(k))


# ------------------------------------------------------------------------------- fold b_pre into bias
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


def fold_pre_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor) -> torch.Tensor:
    """``b_enc - W_enc @ b_pre`` in fp32: W_enc [F, d], b_enc [F], b_pre [d] -> [F] fp32."""
    n_features, d = W_enc.shape
    out = torch.empty(n_features, dtype=torch.float32, device=W_enc.device)
    block_d = min(FOLD_BLOCK_D, triton.next_power_of_2(max(d, 16)))
    _fold_pre_bias_kernel[(triton.cdiv(n_features, FOLD_BLOCK_F),)](
        W_enc, b_enc, b_pre, out, n_features, d, BLOCK_F=FOLD_BLOCK_F, BLOCK_D=block_d, num_warps=FOLD_WARPS
    )
    return out


# ------------------------------------------------------------------- keys inside a kernel
# `flashsae.kernels.keys.pack_keys` / `unpack_keys` on registers: the same format, same constants.
@triton.jit
def _pack_key(bits, index):
    """int32 fp32-bit pattern of a value >= +0.0 and int64 feature index -> int64 key."""
    return (bits.to(tl.int64) << 32) | (_INDEX_MASK - index)


@triton.jit
def _key_index(key):
    """The feature index of an int64 key (meaningless for the empty key); low 32 bits by arithmetic shifts."""
    return _INDEX_MASK - (key - ((key >> 32) << 32))


# ------------------------------------------------------------------- stage 1: range-wise running top-k
# Tiling: rows of a [BM, KP] tensor viewed as a hypercube. Each of the LOG_KP half-cleaner stages
# pairs slot i with slot i + half inside blocks of 2 * half slots and puts the larger key first. A
# bitonic row comes out sorted descending. Built from max/min over a size-2 axis (tl.sort's own
# compare-and-swap runs a custom-combine reduction, which the interpreter evaluates element by element).
@triton.jit
def _bitonic_merge_desc(x, BM: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr):
    first = tl.reshape(tl.arange(0, 2), (1, 1, 2, 1)) == 0
    for j in tl.static_range(LOG_KP):
        # Stage j: 2^j blocks of 2 * half slots, half = KP >> (j + 1). (A named constexpr here
        # would be a reassignment inside the unrolled loop, which the compiler rejects.)
        h = tl.reshape(x, (BM, 1 << j, 2, KP >> (j + 1)))
        h = tl.where(first, tl.max(h, axis=2, keep_dims=True), tl.min(h, axis=2, keep_dims=True))
        x = tl.reshape(h, (BM, KP))
    return x


# Tiling: program (m, r) owns tokens m*BM : (m+1)*BM and features r*range_len : (r+1)*range_len.
# For each BN-wide feature tile it accumulates x[tokens] @ W_enc[tile].T over d in BK chunks (fp32
# accumulator, x tile reloaded per d-block), adds the bias, and turns the result into the int32 bit
# pattern of relu(value) (max with 0 on the bits: negatives and -0.0 become +0). The running state is
# best [BM, KP] int64, sorted descending, and each token's k-th best key split into (value bits, index).
# Filter: an element survives if it beats its token's k-th key, one 32-bit compare per element; a tile
# with no survivor for any token costs nothing more. Merge: the survivors' int64 keys are pulled out
# one per-token max at a time (at most KP per round) into an ascending list; max(best, ascending) is the
# top KP of both lists as a bitonic sequence, which one bitonic merge sorts. The k-th key is refreshed and
# survivors that no longer beat it are dropped before the next round. No tile is ever fully sorted:
# after the first tiles of a range only a few elements per token survive (about k / t at tile t).
@triton.jit
def _topk_range_kernel(
    x_ptr, w_ptr, bias_ptr, cand_ptr,
    n_tokens, n_features, d, k, range_len, n_ranges,
    KP: tl.constexpr, LOG_KP: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST_BF16: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    tokens = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    token_mask = tokens < n_tokens
    slots = tl.arange(0, KP)
    f_begin = pid_r * range_len
    f_end = tl.minimum(f_begin + range_len, n_features)

    best = tl.full((BM, KP), _EMPTY_KEY, dtype=tl.int64)
    kth = tl.full((BM,), _EMPTY_KEY, dtype=tl.int64)
    # kth split into (value bits, index); the empty key (-1) maps to (-1, 0), which every real element
    # (bits >= 0) beats and no masked one (bits -1, index >= 0) does.
    kth_bits = tl.full((BM,), -1, dtype=tl.int32)
    kth_index = tl.zeros((BM,), dtype=tl.int32)
    for f0 in range(f_begin, f_end, BN):
        feats = f0 + tl.arange(0, BN).to(tl.int64)
        feat_mask = feats < n_features
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, d, BK):
            cols = k0 + tl.arange(0, BK).to(tl.int64)
            col_mask = cols < d
            a = tl.load(x_ptr + tokens[:, None] * d + cols[None, :], mask=token_mask[:, None] & col_mask[None, :], other=0.0)
            w = tl.load(w_ptr + feats[:, None] * d + cols[None, :], mask=feat_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST_BF16:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE_FP32 or UPCAST_BF16:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        acc += tl.load(bias_ptr + feats, mask=feat_mask, other=0.0).to(tl.float32)[None, :]
        bits = tl.maximum(acc.to(tl.int32, bitcast=True), 0)
        bits = tl.where(token_mask[:, None] & feat_mask[None, :], bits, -1)
        feat32 = feats.to(tl.int32)
        beats = (bits > kth_bits[:, None]) | ((bits == kth_bits[:, None]) & (feat32[None, :] < kth_index[:, None]))
        n_most = tl.max(tl.sum(beats.to(tl.int32), axis=1), axis=0)
        if n_most > 0:
            keys = tl.where(beats, _pack_key(bits, feats[None, :]), _EMPTY_KEY)
            while n_most > 0:
                # Keys are unique per token, so each max removes exactly one survivor (or finds the empty key).
                ascending = tl.full((BM, KP), _EMPTY_KEY, dtype=tl.int64)
                for s in range(0, tl.minimum(n_most, KP)):
                    top = tl.max(keys, axis=1)
                    ascending = tl.where(slots[None, :] == KP - 1 - s, top[:, None], ascending)
                    keys = tl.where(keys == top[:, None], _EMPTY_KEY, keys)
                best = _bitonic_merge_desc(tl.maximum(best, ascending), BM, KP, LOG_KP)
                kth = tl.sum(tl.where(slots[None, :] == k - 1, best, 0), axis=1)
                keys = tl.where(keys > kth[:, None], keys, _EMPTY_KEY)
                n_most = tl.max(tl.sum((keys >= 0).to(tl.int32), axis=1), axis=0)
            kth_bits = (kth >> 32).to(tl.int32)
            kth_index = tl.where(kth < 0, 0, _key_index(kth)).to(tl.int32)
    out = cand_ptr + (tokens[:, None] * n_ranges + pid_r) * KP + slots[None, :]
    tl.store(out, best, mask=token_mask[:, None])


# (BM, BN, BK, num_warps, num_stages) per KP, for Hopper, with 16-bit and with fp32 inputs. The
# running top-k, the tile's int64 keys and the bitonic merge live in registers next to the fp32
# accumulator, so the selection, not the matmul, bounds the tile: every entry compiles for sm_90
# without spilling with Triton 3.9 (tests/test_kernel_compile.py checks it; Triton 3.6 spills at most
# 80 bytes, in the KP=512 row), and a bigger KP takes fewer tokens (BM).
_BLOCK_TABLE: dict[int, list[tuple[int, int, int, int, int]]] = {
    64: [(64, 128, 32, 8, 3), (64, 128, 16, 8, 3), (64, 64, 32, 8, 3)],
    128: [(64, 64, 32, 8, 3), (32, 64, 64, 8, 3)],
    256: [(16, 128, 32, 8, 3), (16, 64, 64, 8, 3)],
    512: [(16, 64, 16, 8, 3), (16, 64, 32, 8, 3)],
}
_BLOCK_TABLE_FP32: dict[int, list[tuple[int, int, int, int, int]]] = {
    2: [(32, 64, 64, 8, 3)],
    64: [(64, 64, 32, 8, 3), (32, 64, 64, 8, 3)],
    128: [(32, 64, 32, 8, 3)],
    256: [(16, 64, 32, 8, 3)],
    512: [(16, 64, 16, 8, 3), (16, 32, 32, 8, 3)],
}


def _block_configs(kp: int, dtype: torch.dtype) -> list[tuple[int, int, int, int, int]]:
    """The block table's row for KP and the input dtype: the row of the smallest key >= KP."""
    table = _BLOCK_TABLE_FP32 if dtype == torch.float32 else _BLOCK_TABLE
    return table[min(key for key in table if key >= kp)]


def _interpreter_blocks(kp: int, d: int) -> dict[str, int]:
    """One small fixed config for TRITON_INTERPRET (autotuning there is slow and meaningless)."""
    return {"BM": 16, "BN": 128, "BK": min(64, triton.next_power_of_2(max(d, 16)))}


@functools.lru_cache(maxsize=None)
def _autotuned_range_kernel(kp: int, dtype: torch.dtype):
    configs = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in _block_configs(kp, dtype)
    ]
    # Tensor dtypes join the key automatically.
    return triton.autotune(configs=configs, key=["d", "k"])(_topk_range_kernel)


def encode_plan(
    n_tokens: int, n_features: int, d: int, k: int, n_sms: int | None = None, dtype: torch.dtype = torch.bfloat16
) -> dict:
    """How the launcher splits the work: ranges, candidates per row and block sizes.

    ``n_sms`` defaults to the current CUDA device's SM count, or DEFAULT_SMS without a GPU.
    Returns a dict with kp, n_ranges, range_len, candidates_per_row, candidates_bytes (the
    [B, n_ranges, KP] int64 buffer) and the block configs stage 1 picks from.
    """
    if n_sms is None:
        n_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count if (
            torch.cuda.is_available() and not INTERPRET) else DEFAULT_SMS
    kp = padded_k(k)
    configs = [{"BM": bm, "BN": bn, "BK": bk, "num_warps": w, "num_stages": s} for bm, bn, bk, w, s in _block_configs(kp, dtype)]
    if INTERPRET:
        configs = [_interpreter_blocks(kp, d)]
    token_blocks = triton.cdiv(max(n_tokens, 1), max(c["BM"] for c in configs))
    wanted = triton.cdiv(PROGRAMS_PER_SM * n_sms, token_blocks)
    n_ranges = max(1, min(wanted, MAX_CANDIDATES_PER_ROW // kp, triton.cdiv(n_features, RANGE_ALIGN)))
    range_len = triton.cdiv(triton.cdiv(n_features, n_ranges), RANGE_ALIGN) * RANGE_ALIGN
    n_ranges = triton.cdiv(n_features, range_len)
    return {
        "kp": kp,
        "n_ranges": n_ranges,
        "range_len": range_len,
        "candidates_per_row": n_ranges * kp,
        "candidates_bytes": n_tokens * n_ranges * kp * 8,
        "configs": configs,
    }


def topk_range_candidates(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    plan: dict,
    *,
    poison: bool = False,
) -> torch.Tensor:
    """Stage 1: each range's top-KP keys per token -> [B, n_ranges, KP] int64 (see `encode_plan`).

    x [B, d], W_enc [F, d] (one dtype), bias [F] (any float dtype, read as fp32). ``poison`` fills
    the buffer with a key that unpacks to NaN first, so tests see any slot the kernel leaves unwritten.
    """
    n_tokens, d = x.shape
    n_features = W_enc.shape[0]
    kp, n_ranges = plan["kp"], plan["n_ranges"]
    cand = torch.empty(n_tokens, n_ranges, kp, dtype=torch.int64, device=x.device)
    if poison:
        cand.fill_(_POISON_KEY)
    args = (x, W_enc, bias, cand, n_tokens, n_features, d, k, plan["range_len"], n_ranges)
    meta = {
        "KP": kp,
        "LOG_KP": kp.bit_length() - 1,
        "IEEE_FP32": x.dtype == torch.float32,
        # Triton's interpreter multiplies bf16 tiles as their raw uint16 storage; bf16 -> fp32 is
        # exact and so are the products, so upcasting there keeps the same math.
        "UPCAST_BF16": INTERPRET and x.dtype == torch.bfloat16,
    }
    if INTERPRET:
        blocks = _interpreter_blocks(kp, d)
        _topk_range_kernel[(triton.cdiv(n_tokens, blocks["BM"]), n_ranges)](*args, **meta, **blocks)
    else:
        grid = lambda META: (triton.cdiv(n_tokens, META["BM"]), n_ranges)  # noqa: E731
        _autotuned_range_kernel(kp, x.dtype)[grid](*args, **meta)
    return cand


# ------------------------------------------------------------------------- stage 2 and the entry point
def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_pre: torch.Tensor | None = None,
    *,
    n_ranges: int | None = None,
    poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per token; the `Backend` contract, as the reference.

    x: [B, d], W_enc: [F, d], b_enc: [F], b_pre: [d] or None; one dtype (fp32 | bf16 | fp16),
    contiguous, 1 <= k <= min(F, 512), F < 2^31. Returns vals [B, k] in x's dtype sorted descending
    and idx [B, k] int64 (ties to the lower index, zeros at the lowest unchosen indices).
    ``n_ranges`` overrides the plan's range count (tests); ``poison`` see `topk_range_candidates`.
    """
    n_tokens, d = x.shape
    n_features = W_enc.shape[0]
    if n_tokens == 0:
        return torch.empty(0, k, dtype=x.dtype, device=x.device), torch.empty(0, k, dtype=torch.int64, device=x.device)
    plan = encode_plan(n_tokens, n_features, d, k, dtype=x.dtype)
    if n_ranges is not None:
        plan["range_len"] = triton.cdiv(triton.cdiv(n_features, n_ranges), RANGE_ALIGN) * RANGE_ALIGN
        plan["n_ranges"] = triton.cdiv(n_features, plan["range_len"])
    bias = b_enc if b_pre is None else fold_pre_bias(W_enc, b_enc, b_pre)
    cand = topk_range_candidates(x, W_enc, bias, k, plan, poison=poison)
    # Stage 2 in torch: at most MAX_CANDIDATES_PER_ROW keys per row, one launch of torch's exact
    # radix-select top-k on int64; a Triton merge would save one small launch and nothing more.
    best = cand.view(n_tokens, -1).topk(k, dim=1, sorted=True).values
    vals, idx = unpack_keys(best)
    return vals.to(x.dtype), idx
