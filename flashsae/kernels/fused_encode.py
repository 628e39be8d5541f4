"""Triton fused TopK encoder (the opt-in "triton-fused" backend's ``topk_encode``):
``top-k(relu((x - b_pre) @ W_enc.T + b_enc))`` without ever writing the [B, F] pre-activations.

Data flow, top to bottom in this file:

1. ``fold_pre_bias`` (only with ``b_pre``, `flashsae.kernels.triton_common`): ``bias = b_enc -
   W_enc @ b_pre`` in fp32, so the matmul runs on x itself (16-bit operands stay tensor-core inputs).
2. `_fused_range_kernel`: program (m, r) owns BM tokens and one contiguous range of features. Tile
   by tile it forms the fp32 pre-activations with ``tl.dot``, adds the bias, and hands the tile to
   `flashsae.kernels.triton_common.append_survivors`: one compare per element against the token's
   floor, the rare survivors appended to the token's candidate list for this range, a list that
   would overflow compacted in place to its exact top-k. No running top-k lives in registers, so
   no tile pays a merge: survivors wait in the list (the pending buffer) and a compaction happens
   about once per ``capacity - k`` survivors of a token.
3. `flashsae.kernels.triton_common.best_of_lists`: the exact top-k over each token's lists (torch,
   packed int64 keys), unpacked to values and indices.

Exactness is the chunked encoder's argument (`flashsae.kernels.chunked_encode`): each list receives
its range's features in ascending order, so its floor with a strict compare never drops a feature
that could be in the top-k, and ties resolve to the lower index through the packed keys.

AuxK: this encoder does not fold the dead features' top-k into its pass (its registry entry has
no ``topk_encode_with_aux``); with AuxK on, `flashsae.ops.topk_encode_with_aux` runs it a second time
with the dead features as the mask, on this backend only.

Planning (`encode_plan`): the grid (token blocks x ranges) is sized in whole waves of the GPU's SMs
(one program per SM at these tile sizes), so the last wave is not left partly idle.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, POISON_KEY, append_survivors, best_of_lists, encoder_bias, relu_bits

# Ranges are whole multiples of this many features (every config's BN divides it).
RANGE_ALIGN = 128
# Lists hold k keys after a compaction plus room for max(k, this many, one tile) before the next.
LIST_HEADROOM = 128
# Bound on the candidate lists, in keys per token over all ranges (stage 3's work and memory).
MAX_LIST_KEYS_PER_ROW = 16384
# Programs per SM the plan assumes resident at once (the tiles use most of an SM's registers).
PROGRAMS_PER_SM = 1
# The plan aims for at least this many waves, so the grid fills the GPU even when B is small.
MIN_WAVES = 4
# SM count assumed when no GPU is visible (an H100 SXM), so plans are reproducible on CPU.
DEFAULT_SMS = 132
# Compaction walks a list this many keys at a time.
BLOCK_L = 32
# One small fixed config for TRITON_INTERPRET (autotuning there is slow and meaningless).
INTERPRET_BLOCKS = {"BM": 16, "BN": 64, "BK": 32}

# (BM, BN, BK, num_warps, num_stages) for Hopper, with 16-bit and with fp32 inputs. Every entry
# compiles for sm_90 without spilling, and the 16-bit ones lower ``tl.dot`` to wgmma
# (tests/test_kernel_compile.py, benchmarks/results/compile-sm90.md).
BLOCK_CONFIGS: list[tuple[int, int, int, int, int]] = [(32, 128, 64, 8, 3), (16, 128, 64, 8, 3)]
BLOCK_CONFIGS_FP32: list[tuple[int, int, int, int, int]] = [(16, 64, 32, 4, 3), (32, 64, 32, 8, 3)]


def block_configs(dtype: torch.dtype) -> list[tuple[int, int, int, int, int]]:
    """The autotune table for the input dtype."""
    return BLOCK_CONFIGS_FP32 if dtype == torch.float32 else BLOCK_CONFIGS


# Tiling: program (m, r) owns tokens m*BM : (m+1)*BM and features r*range_len : (r+1)*range_len.
# For each BN-wide feature tile it accumulates W_enc[tile] @ x[tokens].T over d in BK chunks (fp32
# accumulator [BN, BM]: features on the MMA's M dimension, so a few tokens per program still make a
# Hopper wgmma tile and the select keeps few elements per thread), adds the bias and appends the
# survivors to the tokens' lists for range r.
@triton.jit
def _fused_range_kernel(
    x_ptr, w_ptr, bias_ptr, keys_ptr, count_ptr,
    n_tokens, n_features, d, k, range_len, n_ranges, capacity,
    IEEE_FP32: tl.constexpr, UPCAST_BF16: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BL: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    tokens = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    token_mask = tokens < n_tokens
    list_row = tokens * n_ranges + pid_r
    f_begin = pid_r * range_len
    f_end = tl.minimum(f_begin + range_len, n_features)
    count = tl.zeros((BM,), dtype=tl.int32)
    floor = tl.full((BM,), -1, dtype=tl.int32)
    for f0 in range(f_begin, f_end, BN):
        feats = f0 + tl.arange(0, BN).to(tl.int64)
        feat_mask = feats < f_end
        acc = tl.zeros((BN, BM), dtype=tl.float32)  # features x tokens: BN is the MMA's M dimension
        for k0 in range(0, d, BK):
            cols = k0 + tl.arange(0, BK).to(tl.int64)
            col_mask = cols < d
            a = tl.load(x_ptr + (tokens[:, None] * d + cols[None, :]), mask=token_mask[:, None] & col_mask[None, :], other=0.0)
            w = tl.load(w_ptr + (feats[:, None] * d + cols[None, :]), mask=feat_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST_BF16:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE_FP32 or UPCAST_BF16:
                acc = tl.dot(w, tl.trans(a), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(a), acc)
        acc += tl.load(bias_ptr + feats, mask=feat_mask, other=0.0).to(tl.float32)[:, None]
        bits = tl.where(feat_mask[:, None] & token_mask[None, :], relu_bits(acc), -1)
        count, floor = append_survivors(keys_ptr, list_row, count, floor, bits, feats, capacity, k, BM, BL)
    tl.store(count_ptr + list_row, count, mask=token_mask)


@functools.lru_cache(maxsize=None)
def _autotuned_kernel(dtype: torch.dtype):
    configs = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in block_configs(dtype)
    ]
    # Trials run the kernel for real: each one starts from empty lists. Tensor dtypes join the key.
    return triton.autotune(configs=configs, key=["d", "k"], reset_to_zero=["count_ptr"])(_fused_range_kernel)


def list_capacity(k: int) -> int:
    """Keys per (token, range) list: k after a compaction plus the headroom, a multiple of BLOCK_L."""
    return triton.cdiv(k + max(LIST_HEADROOM, k, max(c[1] for c in BLOCK_CONFIGS)), BLOCK_L) * BLOCK_L


def encode_plan(
    n_tokens: int, n_features: int, d: int, k: int, n_sms: int | None = None, dtype: torch.dtype = torch.bfloat16
) -> dict:
    """How the launcher splits the work: ranges, list sizes and block configs.

    ``n_sms`` defaults to the current CUDA device's SM count, or DEFAULT_SMS without a GPU. The
    range count fills whole waves: among the counts allowed by the list bound and the feature
    count, the one whose grid leaves the least of its last wave idle (ties: the one closest to
    MIN_WAVES waves or more). Returns a dict with n_ranges, range_len, capacity, programs, waves,
    list_bytes (the [B, n_ranges, capacity] int64 lists) and the block configs.
    """
    if n_sms is None:
        n_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count if (
            torch.cuda.is_available() and not INTERPRET) else DEFAULT_SMS
    configs = [{"BM": bm, "BN": bn, "BK": bk, "num_warps": w, "num_stages": s} for bm, bn, bk, w, s in block_configs(dtype)]
    if INTERPRET:
        configs = [dict(INTERPRET_BLOCKS)]
    capacity = list_capacity(k)
    token_blocks = triton.cdiv(max(n_tokens, 1), configs[0]["BM"])
    wave = PROGRAMS_PER_SM * n_sms
    most = max(1, min(MAX_LIST_KEYS_PER_ROW // capacity, triton.cdiv(n_features, RANGE_ALIGN)))
    best = None
    for wanted in range(1, most + 1):
        range_len = triton.cdiv(triton.cdiv(n_features, wanted), RANGE_ALIGN) * RANGE_ALIGN
        n_ranges = triton.cdiv(n_features, range_len)
        programs = token_blocks * n_ranges
        waves = triton.cdiv(programs, wave)
        score = (programs / (waves * wave), min(waves, MIN_WAVES), -n_ranges)
        if best is None or score > best[0]:
            best = (score, n_ranges, range_len, programs, waves)
    _, n_ranges, range_len, programs, waves = best
    return {
        "n_ranges": n_ranges,
        "range_len": range_len,
        "capacity": capacity,
        "programs": programs,
        "waves": waves,
        "list_bytes": n_tokens * n_ranges * capacity * 8,
        "configs": configs,
    }


def range_lists(
    x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int, plan: dict, *,
    config: dict | None = None, poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: every (token, range) list -> (keys [B, n_ranges, capacity] int64, counts [B, n_ranges] int32).

    x [B, d], W_enc [F, d] (one dtype), bias [F] (any float dtype, read as fp32). ``config`` (one
    of the plan's configs) launches those blocks instead of autotuning over the table. ``poison``
    fills the lists with a key that unpacks to NaN first, so tests see any slot read unwritten.
    """
    n_tokens, d = x.shape
    n_features = W_enc.shape[0]
    n_ranges, capacity = plan["n_ranges"], plan["capacity"]
    keys = torch.empty(n_tokens, n_ranges, capacity, dtype=torch.int64, device=x.device)
    if poison:
        keys.fill_(POISON_KEY)
    counts = torch.zeros(n_tokens, n_ranges, dtype=torch.int32, device=x.device)
    args = (x, W_enc, bias, keys, counts, n_tokens, n_features, d, k, plan["range_len"], n_ranges, capacity)
    meta = {
        "IEEE_FP32": x.dtype == torch.float32,
        # Triton's interpreter multiplies bf16 tiles as their raw uint16 storage; bf16 -> fp32 is
        # exact and so are the products, so upcasting there keeps the same math.
        "UPCAST_BF16": INTERPRET and x.dtype == torch.bfloat16,
        "BL": BLOCK_L,
    }
    if INTERPRET or config is not None:
        blocks = config or plan["configs"][0]
        _fused_range_kernel[(triton.cdiv(n_tokens, blocks["BM"]), n_ranges)](*args, **meta, **blocks)
    else:
        grid = lambda META: (triton.cdiv(n_tokens, META["BM"]), n_ranges)  # noqa: E731
        _autotuned_kernel(x.dtype)[grid](*args, **meta)
    return keys, counts


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
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per token; the `Backend` contract.

    x: [B, d], W_enc: [F, d], b_enc: [F], b_pre: [d] or None; one dtype (fp32 | bf16 | fp16),
    contiguous, 1 <= k <= F < 2^31. Returns vals [B, k] in x's dtype sorted descending and idx
    [B, k] int64 (ties to the lower index, zeros at the lowest unchosen indices).
    ``n_ranges`` overrides the plan's range count (tests); ``poison`` see `range_lists`.
    """
    n_tokens = x.shape[0]
    n_features = W_enc.shape[0]
    if n_tokens == 0:
        return x.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=x.device)
    plan = encode_plan(n_tokens, n_features, x.shape[1], k, dtype=x.dtype)
    if n_ranges is not None:
        plan["range_len"] = triton.cdiv(triton.cdiv(n_features, n_ranges), RANGE_ALIGN) * RANGE_ALIGN
        plan["n_ranges"] = triton.cdiv(n_features, plan["range_len"])
    keys, counts = range_lists(x, W_enc, encoder_bias(W_enc, b_enc, b_pre), k, plan, poison=poison)
    vals, idx = best_of_lists(keys, counts, k)
    return vals.to(x.dtype), idx
