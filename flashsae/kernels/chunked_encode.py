"""The chunked TopK encoder (the "triton" backend's ``topk_encode``, the default on CUDA).

For each chunk of C features, in ascending order:

1. ``pre = x @ W_enc[chunk].T`` through torch / cuBLAS into one reused fp32 buffer [B, C]
   (`chunk_matmul`: bf16/fp16 operands on tensor cores with fp32 accumulation and fp32 output).
2. `_select_chunk_kernel` (Triton) streams ``pre`` once: adds the bias (``b_enc - W_enc @ b_pre``,
   folded once by `flashsae.kernels.triton_common.fold_pre_bias`), applies the ReLU (NaN counts as
   -inf) and appends the packed key (`flashsae.kernels.keys`) of every element that beats its
   list's floor to that list.

Candidate lists: program (m, s) owns tokens m*BM..(m+1)*BM and slice s of every chunk's columns,
and keeps one list of at most ``capacity`` keys per (token, slice), so nothing is shared between
programs (no atomics) and every list receives its features in ascending index order.

Exactness. A list's floor is the value of its k-th best key (-1, "take everything", before that).
Its keys all come from lower feature indices than anything still to come, so an element that does
not beat the floor *strictly* can never enter the top-k: k lower-index keys with a value >= it
exist. At the end of a chunk each program publishes its floor; the next chunk starts from the
largest floor any slice published (valid for every later feature), double-buffered so that no
program reads a floor from the chunk it is in. When a token's list would overflow, the program
compacts it in place to its exact top-k (`_compact_lists`: a bitwise search for the k-th key, then a
stable compaction), which also raises the floor: no candidate is ever dropped unexamined, and the
first lists fill with the first features (zeros included, so rows with fewer than k positive
values end in zeros at the lowest indices, as in the reference). A final exact top-k over all lists'
keys (torch, packed int64) gives the reference's answer whatever order keys were appended in.

AuxK's top-aux_k among the dead features (`topk_encode_with_aux`) shares each chunk's GEMM: the
select kernel runs a second time over the same buffer into lists of its own, with the bias of the
features that are not dead at -inf.

Nothing synchronizes with the host: chunk count, grid, list capacity and every buffer size follow
from the shapes, and the lists' fill counts stay on the device.

Precision. The selection is exact on the fp32 pre-activations the GEMM produced: 16-bit products
are exact in fp32 and accumulate in fp32 (``torch.mm(..., out_dtype=torch.float32)``); fp32 inputs
run torch's fp32 matmul (TF32 only if ``torch.backends.cuda.matmul.allow_tf32`` is set). Without
``out_dtype`` support (older torch, or the CPU interpreter) the 16-bit chunk is upcast first, which
computes the same exact products.

Cost model (B tokens, F features, width d; element = one pre-activation):
GEMM ``2 B F d`` flops at the library's rate, plus ``pre`` written once and read once (8 bytes per
element in fp32: ``8 B F`` bytes of memory traffic, less whatever stays in L2 between the GEMM and
the select), plus the survivors (about ``k (1 + ln(F / capacity))`` appended keys per token, 8 bytes
each) and the final top-k over ``B * n_slices * capacity`` keys. Relative to the GEMM alone the
overhead is ``4 (flop/byte of the machine) / d`` when nothing stays in L2: the select costs one
fp32 load, one add, one compare per element. The candidate lists hold ``8 B n_slices capacity``
bytes and the buffer ``4 B C`` (default at most `DEFAULT_BUFFER_BYTES`): memory O(B (C + k)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, POISON_KEY, append_survivors, best_of_lists, encoder_bias, relu_bits

# Default bound on the fp32 pre-activation buffer of one chunk.
DEFAULT_BUFFER_BYTES = 256 << 20
# Select kernel blocks: BM tokens x BN features per tile; compaction walks a list BL keys at a time.
BLOCK_M, BLOCK_N, BLOCK_L, SELECT_WARPS = 16, 128, 64, 8
# Smaller tiles for TRITON_INTERPRET (numpy per block op: smaller tiles keep the tests quick).
INTERPRET_BLOCKS = {"BM": 8, "BN": 64, "BL": 64}
# Lists hold k keys after a compaction plus room for max(k, this many, one tile) before the next.
LIST_HEADROOM = 512
# The plan aims for this many programs per SM (slices of a chunk fill the grid when B is small).
PROGRAMS_PER_SM = 4
# SM count assumed when no GPU is visible (an H100 SXM), so plans are reproducible on CPU.
DEFAULT_SMS = 132


@dataclass(frozen=True)
class SelectPlan:
    """How `topk_encode` splits the work; every size follows from the shapes (no host sync).

    chunk: features per GEMM (the fp32 buffer is n_tokens x chunk); n_slices: column slices per
    chunk (programs per token block); slice_len: columns per slice (a multiple of BN); capacity: keys
    per (token, slice) list (>= k + BN, a multiple of BL); blocks: the select kernel's BM/BN/BL.
    """

    chunk: int
    n_slices: int
    slice_len: int
    capacity: int
    blocks: dict

    def list_bytes(self, n_tokens: int) -> int:
        return n_tokens * self.n_slices * self.capacity * 8


def select_plan(
    n_tokens: int,
    n_features: int,
    k: int,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    n_sms: int | None = None,
    n_slices: int | None = None,
    headroom: int = LIST_HEADROOM,
) -> SelectPlan:
    """The plan for B = ``n_tokens``, F = ``n_features``, k: see `SelectPlan`.

    ``buffer_bytes`` bounds the chunk buffer (at least one BN-wide chunk). ``n_sms`` defaults to the
    current CUDA device's SM count, or DEFAULT_SMS without a GPU. ``n_slices`` overrides the slice
    count and ``headroom`` the free room of a list after a compaction (tests force compactions with
    a small one; it is raised to at least one tile).
    """
    blocks = dict(INTERPRET_BLOCKS) if INTERPRET else {"BM": BLOCK_M, "BN": BLOCK_N, "BL": BLOCK_L}
    bn, bl = blocks["BN"], blocks["BL"]
    chunk = max(bn, buffer_bytes // (4 * max(n_tokens, 1)) // bn * bn)
    chunk = min(chunk, n_features)
    if n_slices is None:
        n_sms = n_sms or _sm_count()
        token_blocks = triton.cdiv(max(n_tokens, 1), blocks["BM"])
        n_slices = max(1, min(triton.cdiv(PROGRAMS_PER_SM * n_sms, token_blocks), triton.cdiv(chunk, bn)))
    slice_len = triton.cdiv(triton.cdiv(chunk, n_slices), bn) * bn
    n_slices = triton.cdiv(chunk, slice_len)
    capacity = triton.cdiv(k + max(headroom, k, bn), bl) * bl
    return SelectPlan(chunk, n_slices, slice_len, capacity, blocks)


def _sm_count() -> int:
    if torch.cuda.is_available() and not INTERPRET:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return DEFAULT_SMS


def chunk_matmul(x: torch.Tensor, W_chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = x @ W_chunk.T`` in fp32: x [B, d], W_chunk [c, d] (one dtype), out [B, c] fp32 contiguous.

    16-bit inputs on CUDA use ``torch.mm(..., out_dtype=torch.float32)`` (tensor cores, fp32
    accumulation and output); elsewhere, or on a torch without it, the chunk is upcast to fp32 first
    (16-bit products are exact in fp32, so the math is the same).
    """
    if x.dtype == torch.float32:
        return torch.mm(x, W_chunk.T, out=out)
    if x.is_cuda and hasattr(torch.ops.aten.mm, "dtype_out"):
        return torch.mm(x, W_chunk.T, out_dtype=torch.float32, out=out)
    return torch.mm(x.to(torch.float32), W_chunk.to(torch.float32).T, out=out)


# ----------------------------------------------------------------------------------------- kernel
# Tiling: program (m, s) owns tokens m*BM..(m+1)*BM and columns [s*slice_len, (s+1)*slice_len) of
# this chunk, BN at a time. Per element: one fp32 load, the bias add, relu_bits and one compare with
# the row's floor (`append_survivors`, which also appends the rare survivors and compacts a list
# that would overflow).
@triton.jit
def _select_chunk_kernel(
    pre_ptr, bias_ptr, keys_ptr, count_ptr, floor_in_ptr, floor_out_ptr,
    n_tokens, chunk_start, chunk_len, slice_len, n_slices, capacity, k,
    BM: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    tokens = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    token_mask = tokens < n_tokens
    list_row = tokens * n_slices + pid_s
    count = tl.load(count_ptr + list_row, mask=token_mask, other=0)
    floor = tl.full((BM,), -1, dtype=tl.int32)
    for s in range(0, n_slices):
        floor = tl.maximum(floor, tl.load(floor_in_ptr + (tokens * n_slices + s), mask=token_mask, other=-1))
    col_begin = pid_s * slice_len
    col_end = tl.minimum(col_begin + slice_len, chunk_len)
    # Tiles are features x tokens ([BN, BM], see `append_survivors`); the next tile's loads are
    # issued before this tile is selected (two tiles in flight).
    cols = col_begin + tl.arange(0, BN).to(tl.int64)
    pre_next = tl.load(pre_ptr + (tokens[None, :] * chunk_len + cols[:, None]),
                       mask=(cols < col_end)[:, None] & token_mask[None, :], other=0.0)
    bias_next = tl.load(bias_ptr + (chunk_start + cols), mask=cols < col_end, other=0.0)
    for c0 in range(col_begin, col_end, BN):
        cols = c0 + tl.arange(0, BN).to(tl.int64)
        tile_mask = (cols < col_end)[:, None] & token_mask[None, :]
        pre, bias = pre_next, bias_next
        ahead = cols + BN
        pre_next = tl.load(pre_ptr + (tokens[None, :] * chunk_len + ahead[:, None]),
                           mask=(ahead < col_end)[:, None] & token_mask[None, :], other=0.0)
        bias_next = tl.load(bias_ptr + (chunk_start + ahead), mask=ahead < col_end, other=0.0)
        bits = tl.where(tile_mask, relu_bits(pre + bias.to(tl.float32)[:, None]), -1)
        count, floor = append_survivors(keys_ptr, list_row, count, floor, bits, chunk_start + cols, capacity, k, BM, BL)
    tl.store(count_ptr + list_row, count, mask=token_mask)
    tl.store(floor_out_ptr + list_row, floor, mask=token_mask)


def launch_select(
    pre: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
    floor_in: torch.Tensor, floor_out: torch.Tensor, chunk_start: int, k: int, plan: SelectPlan,
) -> None:
    """One chunk's select: pre [B, c] fp32, bias [F], keys [B, S, capacity] int64, counts [B, S] int32,
    floor_in / floor_out [B, S] int32 (read / written)."""
    n_tokens, chunk_len = pre.shape
    blocks = plan.blocks
    grid = (triton.cdiv(n_tokens, blocks["BM"]), plan.n_slices)
    _select_chunk_kernel[grid](
        pre, bias, keys, counts, floor_in, floor_out,
        n_tokens, chunk_start, chunk_len, plan.slice_len, plan.n_slices, plan.capacity, k,
        BM=blocks["BM"], BN=blocks["BN"], BL=blocks["BL"], num_warps=SELECT_WARPS,
    )


# ------------------------------------------------------------------------------------ entry point
def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_pre: torch.Tensor | None = None,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    n_slices: int | None = None,
    headroom: int = LIST_HEADROOM,
    poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per token; the `Backend` contract.

    x: [B, d], W_enc: [F, d], b_enc: [F], b_pre: [d] or None; one dtype of fp32 | bf16 | fp16,
    contiguous, 1 <= k <= F < 2^31. Returns vals [B, k] in x's dtype sorted descending and idx
    [B, k] int64 (ties to the lower index, zeros at the lowest unchosen indices). ``buffer_bytes``
    bounds the fp32 chunk buffer; ``n_slices`` and ``headroom`` see `select_plan`; ``poison`` fills the
    candidate lists with a key that unpacks to NaN first, so tests see any slot read unwritten.
    """
    options = {"buffer_bytes": buffer_bytes, "n_slices": n_slices, "headroom": headroom, "poison": poison}
    (vals, idx), = _encode(x, W_enc, b_enc, b_pre, [(None, k)], **options)
    return vals, idx


def topk_encode_with_aux(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    aux_k: int,
    dead: torch.Tensor,
    b_pre: torch.Tensor | None = None,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    n_slices: int | None = None,
    headroom: int = LIST_HEADROOM,
    poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_encode` and the top-``aux_k`` among the ``dead`` features (bool [F]) from one GEMM per chunk.

    After each chunk's GEMM the select kernel runs twice over the same buffer: once for the main
    lists, once for the dead lists (their own capacity and floors) with the bias of the features
    that are not dead set to -inf, exactly as a masked `topk_encode` (they fill a row's zero slots
    but never fire). A second launch rather than a kernel keeping two lists: the select re-reads
    the fp32 chunk (4 bytes per pre-activation, against the GEMM's 2 d flops) but keeps one
    compiled kernel whose list state and compaction code are not doubled. Returns (vals [B, k],
    idx [B, k], aux_vals [B, aux_k], aux_idx [B, aux_k]); 1 <= aux_k <= F. Options as `topk_encode`.
    """
    options = {"buffer_bytes": buffer_bytes, "n_slices": n_slices, "headroom": headroom, "poison": poison}
    (vals, idx), (aux_vals, aux_idx) = _encode(x, W_enc, b_enc, b_pre, [(None, k), (dead, aux_k)], **options)
    return vals, idx, aux_vals, aux_idx


class _Lists:
    """One selection's candidate lists across the chunks: its plan, bias, keys, fill counts and floors."""

    def __init__(self, plan: SelectPlan, bias: torch.Tensor, k: int, n_tokens: int, poison: bool) -> None:
        device = bias.device
        self.plan, self.bias, self.k = plan, bias, k
        self.keys = torch.empty(n_tokens, plan.n_slices, plan.capacity, dtype=torch.int64, device=device)
        if poison:
            self.keys.fill_(POISON_KEY)
        self.counts = torch.zeros(n_tokens, plan.n_slices, dtype=torch.int32, device=device)
        self.floors = torch.full((2, n_tokens, plan.n_slices), -1, dtype=torch.int32, device=device)

    def select(self, pre: torch.Tensor, chunk_index: int, chunk_start: int) -> None:
        """Append chunk ``chunk_index``'s candidates (pre [B, c] fp32 of features from ``chunk_start``)."""
        i = chunk_index
        launch_select(pre, self.bias, self.keys, self.counts, self.floors[i % 2], self.floors[(i + 1) % 2],
                      chunk_start, self.k, self.plan)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return best_of_lists(self.keys, self.counts, self.k)


def _encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor | None,
    selections: list[tuple[torch.Tensor | None, int]], *, buffer_bytes: int, n_slices: int | None,
    headroom: int, poison: bool,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One GEMM per chunk feeding one set of lists per ``(mask or None, k)`` of ``selections``; returns
    (vals [B, k] in x's dtype, idx [B, k]) per selection, in order."""
    n_tokens, n_features = x.shape[0], W_enc.shape[0]
    if n_tokens == 0:
        return [(x.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=x.device)) for _, k in selections]
    bias = encoder_bias(W_enc, b_enc, b_pre)
    lists = []
    for mask, k in selections:
        plan = select_plan(n_tokens, n_features, k, buffer_bytes=buffer_bytes, n_slices=n_slices, headroom=headroom)
        masked = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        lists.append(_Lists(plan, masked, k, n_tokens, poison))
    chunk = lists[0].plan.chunk  # every plan chunks alike: the chunk size does not depend on k
    buffer = torch.empty(n_tokens * chunk, dtype=torch.float32, device=x.device)
    for i, start in enumerate(range(0, n_features, chunk)):
        width = min(chunk, n_features - start)
        pre = chunk_matmul(x, W_enc[start : start + width], buffer[: n_tokens * width].view(n_tokens, width))
        for selection in lists:
            selection.select(pre, i, start)
    return [(vals.to(x.dtype), idx) for vals, idx in (selection.result() for selection in lists)]
