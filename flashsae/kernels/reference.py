"""The torch backend's row and Adam primitives (`flashsae.kernels.registry.Backend`) in plain torch
(the Adam step on the CPU in the C++ kernel of `flashsae.kernels.cpu_native` when it is built).

They run on any device (the CPU backend) and are the oracle the Triton kernels are tested against;
the backend's encoder is `flashsae.kernels.torch_encode`. Nothing here materializes a dense [F, d]
gradient: the sparse parts work on the B * k (token, feature) pairs in chunks. Accumulation is fp32
(float64 for float64 inputs). Shapes and return conventions are the `Backend` docstring's. The
backward and optimizer primitives keep static sizes (padding slots, masked writes): none of them
makes a CUDA stream wait on the host.
"""
from __future__ import annotations

import warnings
from types import ModuleType

import torch

from ..rowgrad import write_rows_
from . import cpu_native
from .pairs import PairGroups

# Most values a chunk of work holds at once (4M: 16 MiB of fp32 values).
CHUNK_ELEMENTS = 1 << 22


def math_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype for inputs like ``t``: float64 for float64, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_step(width: int) -> int:
    """Items per chunk so that a [chunk, width] fp32 block stays under CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(width, 1))


def take_rows(W: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``W[index]`` for W [F, ...] and an int64 index of any shape, via index_select (several times
    faster than advanced indexing on CPU)."""
    return W.index_select(0, index.reshape(-1)).view(*index.shape, *W.shape[1:])


def _sparse_on_cpu(t: torch.Tensor, n_pairs: int) -> bool:
    """Whether to run a pair sum as a weighted ``embedding_bag`` (the sums) or a CSR sampled product
    (the row dots): on the CPU, several to tens of times faster than gathers and index_add there;
    elsewhere the gathers keep the step free of library-side syncs."""
    return t.device.type == "cpu" and n_pairs > 0


def _bag_sums(rows: torch.Tensor, table: torch.Tensor, starts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[u] = sum_{starts[u] <= e < next start} weights[e] * table[rows[e]]`` (the last bag runs to the
    end): one weighted ``embedding_bag`` in table's dtype, each bag summed in entry order -> [len(starts), d]."""
    return torch.nn.functional.embedding_bag(rows, table, starts, mode="sum", per_sample_weights=weights)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A [len(crow) - 1, n_cols] CSR matrix over our own index lists (valid by construction, so unchecked)."""
    with warnings.catch_warnings():  # torch's one-time notice that CSR support is in beta
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=(crow.shape[0] - 1, n_cols), check_invariants=False)


def gather_rows(
    coef: torch.Tensor,
    idx: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j coef[t, j] * W[idx[t, j]] (+ bias)`` in fp32 (float64 for float64 W): coef
    [B, k], idx [B, k], W [F, d] -> [B, d].

    ``out`` defaults to a new [B, d] tensor in the math dtype; a given one is written in its own dtype.
    """
    n_tokens, k = idx.shape
    acc_dtype = math_dtype(W)
    if W.dtype == acc_dtype and _sparse_on_cpu(W, n_tokens * k):
        starts = torch.arange(0, n_tokens * k, k, device=W.device)
        acc = _bag_sums(idx.reshape(-1), W, starts, coef.reshape(-1).to(acc_dtype))
        if bias is not None:
            acc += bias.to(acc_dtype)
        return acc if out is None else out.copy_(acc)
    if out is None:
        out = torch.empty(n_tokens, W.shape[1], dtype=acc_dtype, device=W.device)
    step = _chunk_step(k * W.shape[1])
    for start in range(0, n_tokens, step):
        part = slice(start, start + step)
        picked = take_rows(W, idx[part]).to(acc_dtype)  # [b, k, d]
        acc = torch.bmm(coef[part].to(acc_dtype).unsqueeze(1), picked).squeeze(1)
        if bias is not None:
            acc += bias.to(acc_dtype)
        out[part] = acc
    return out


def row_dots(grad: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``out[t, j] = <grad[t], W[idx[t, j]]>`` in fp32 (float64 for float64 W): grad [B, d], idx [B, k],
    W [F, d] -> [B, k] in the math dtype."""
    n_tokens, k = idx.shape
    acc_dtype = math_dtype(W)
    if W.dtype == acc_dtype and _sparse_on_cpu(W, n_tokens * k):
        # The products sampled at (t, idx[t, j]), in idx's own order: W is read once, not B * k times.
        crow = torch.arange(0, n_tokens * k + 1, k, device=W.device)
        pattern = _csr(crow, idx.reshape(-1), torch.zeros(n_tokens * k, dtype=acc_dtype, device=W.device), W.shape[0])
        return torch.sparse.sampled_addmm(pattern, grad.to(acc_dtype), W.t(), beta=0.0).values().view(n_tokens, k)
    out = torch.empty(n_tokens, k, dtype=acc_dtype, device=W.device)
    step = _chunk_step(k * W.shape[1])
    for start in range(0, n_tokens, step):
        part = slice(start, start + step)
        picked = take_rows(W, idx[part]).to(acc_dtype)  # [b, k, d]
        out[part] = torch.bmm(picked, grad[part].to(acc_dtype).unsqueeze(2)).squeeze(2)
    return out


def segment_rows(
    coef: torch.Tensor,
    groups: PairGroups,
    vecs: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot sums over the fired pairs of ``groups``: the compact row gradient.

    coef [B, k], groups: `flashsae.kernels.pairs.PairGroups` of the same selection (R slots), vecs
    [B, d], shift [d] or None. Returns grad_rows [R, d] fp32 (float64 for float64 vecs) with
    ``grad_rows[u] = sum_{pairs of slot u} coef[t, j] * (vecs[t] - shift)`` (zeros in padding
    slots) and coef_sums [R] in that dtype, the per-slot sums of coef. Pairs that did not fire add
    zeros (static sizes: no host sync).
    """
    n_slots, width = groups.n_slots, vecs.shape[1]
    acc_dtype = math_dtype(vecs)
    weights = torch.where(groups.fired, coef.reshape(-1).to(acc_dtype)[groups.pairs], 0.0)
    tokens = groups.pairs // groups.k
    coef_sums = torch.zeros(n_slots, dtype=acc_dtype, device=coef.device)
    coef_sums.index_add_(0, groups.segment, weights)
    if _sparse_on_cpu(vecs, weights.shape[0]):
        # Slot u's pairs are entries offsets[u]:offsets[u + 1] of ``pairs``; the pairs that did not fire
        # (zero weights) fall in the last bag, which runs to the end.
        grad_rows = _bag_sums(tokens, vecs.to(acc_dtype), groups.offsets[:n_slots], weights)
        if shift is not None:  # minus the outer product coef_sums x shift, in place
            grad_rows.addr_(coef_sums, shift.to(acc_dtype), alpha=-1)
        return grad_rows, coef_sums
    grad_rows = torch.zeros(n_slots, width, dtype=acc_dtype, device=vecs.device)
    step = _chunk_step(width)
    for start in range(0, weights.shape[0], step):
        part = slice(start, start + step)
        picked = take_rows(vecs, tokens[part]).to(acc_dtype)
        if shift is not None:
            picked -= shift.to(acc_dtype)
        grad_rows.index_add_(0, groups.segment[part], weights[part].unsqueeze(1) * picked)
    return grad_rows, coef_sums


def adam_row_scalars(
    step: torch.Tensor, rows: torch.Tensor | None, valid: torch.Tensor | None, lr: float, beta1: float, beta2: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the per-row step counts of the touched rows and return their Adam scalars.

    step [n] int64 is incremented in place, without a host sync, at the ``rows`` ([U] int64; None =
    every row) where ``valid`` ([U] bool, or [n] with rows=None; None = all). Returns step_size =
    lr / (1 - beta1**t) and bc2_sqrt = sqrt(1 - beta2**t), [U] in ``dtype`` (computed in float64, as
    torch.optim.Adam does, then rounded); entries that are not valid get finite values nothing uses.
    """
    if rows is None and valid is None:
        t = step.add_(1).to(torch.float64)
    elif rows is None:
        t = step.add_(valid.to(torch.int64)).clamp(min=1).to(torch.float64)
    elif valid is None:
        t_int = step[rows] + 1
        step[rows] = t_int
        t = t_int.to(torch.float64)
    else:
        step.index_add_(0, rows, valid.to(torch.int64))
        t = step[rows].clamp(min=1).to(torch.float64)
    step_size = lr / (1 - beta1**t)
    bc2_sqrt = (1 - beta2**t).sqrt()
    return step_size.to(dtype), bc2_sqrt.to(dtype)


def join_master(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp32 master weights held as a bf16 tensor ``high`` and its int16 ``low`` bits: exact."""
    return ((high.view(torch.int16).to(torch.int32) << 16) + low.to(torch.int32)).view(torch.float32)


def split_master(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 w -> (bf16 high: w rounded to nearest, ties away from zero; int16 low: the rest), exactly.

    ``low = bits(w) - bits(high) << 16`` lies in [-2^15, 2^15) because the rounding adds half a bf16
    unit (0x8000) to the bit pattern before truncating, so `join_master` gives w back bit for bit.
    """
    bits = w.view(torch.int32)
    low = ((bits + 0x8000) & 0xFFFF) - 0x8000
    high = ((bits - low) >> 16).to(torch.int16).view(torch.bfloat16)
    return high, low.to(torch.int16)


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
    """One lazy Adam step on the touched rows of ``param``, in place; other rows keep every bit.

    param [n, m] (any float dtype), exp_avg / exp_avg_sq [n, m] fp32 | bf16, step [n] int64; grad
    [U, m] (fp32, or any float dtype) holds the gradient of rows ``rows`` [U] int64 where ``valid``
    [U] bool (None: all; valid rows distinct, the others name row 0 and hold zeros), or is [n, m]
    with rows=None (every row, or the rows where ``valid`` [n] when given). ``low`` [n, m] int16
    (bf16 params only): the low bits of fp32 master weights (`join_master`); the update then runs
    on the exact fp32 master and writes both halves back. Math in fp32 (float64 for a float64 param),
    in the order of `_adam_rows_`. ``unit_norm``: remove each gradient row's component along its
    parameter row first, and rescale the updated rows to unit norm after the step.

    On the CPU the C++ kernel (`flashsae.kernels.cpu_native`) updates each touched row in one pass (fp32
    params, or bf16 with low bits, and fp32 moments; its row norms sum in float64, so it agrees with the
    torch ops up to rounding); otherwise the CPU runs `_blocked_adam_step_` (the rows in cache-sized
    blocks); elsewhere the sizes stay static (the slots are gathered, padding included, and only the valid
    ones written back).
    """
    if _blocked_on_cpu(param):
        native = _native_adam_kernels(param, low, exp_avg, exp_avg_sq)
        if native is not None:
            native.adam_rows_(param, low, exp_avg, exp_avg_sq, step, grad.to(torch.float32).contiguous(), rows, valid,
                              lr, beta1, beta2, eps, unit_norm)
            return
        _blocked_adam_step_(param, grad, rows, valid, exp_avg, exp_avg_sq, step, low=low, lr=lr, beta1=beta1,
                            beta2=beta2, eps=eps, unit_norm=unit_norm)
        return
    acc_dtype = math_dtype(param)
    step_size, bc2_sqrt = adam_row_scalars(step, rows, valid, lr, beta1, beta2, acc_dtype)
    pick = (lambda t: t.clone()) if rows is None else (lambda t: take_rows(t, rows))
    w = join_master(pick(param), pick(low)) if low is not None else pick(param).to(acc_dtype)
    m, v = pick(exp_avg).to(acc_dtype), pick(exp_avg_sq).to(acc_dtype)
    _adam_rows_(w, grad.to(acc_dtype), m, v, step_size, bc2_sqrt, valid if rows is None else None, beta1=beta1,
                beta2=beta2, eps=eps, unit_norm=unit_norm, stored_dtype=None if low is not None else param.dtype)
    new, new_low = split_master(w) if low is not None else (w.to(param.dtype), None)
    if rows is None:  # rows that are not valid kept their values (see _adam_rows_)
        param.copy_(new)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        if low is not None:
            low.copy_(new_low)
        return
    write_rows_(param, rows, new, valid)
    write_rows_(exp_avg, rows, m, valid)
    write_rows_(exp_avg_sq, rows, v, valid)
    if low is not None:
        write_rows_(low, rows, new_low, valid)


def _blocked_on_cpu(param: torch.Tensor) -> bool:
    """Whether `sparse_adam_step_` runs `_blocked_adam_step_` (on the CPU, where a host sync is free and
    a pass over a large temporary costs a trip to memory)."""
    return param.device.type == "cpu"


def _native_adam_kernels(
    param: torch.Tensor, low: torch.Tensor | None, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor
) -> ModuleType | None:
    """The C++ CPU kernels (`flashsae.kernels.cpu_native`) when they take this step: an fp32 parameter, or a
    bf16 one with master low bits, with fp32 moments; None otherwise (the torch ops run it)."""
    if not (param.dtype == torch.float32 and low is None or param.dtype == torch.bfloat16 and low is not None):
        return None
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        return None
    return cpu_native.kernels()


# Most elements of one block of rows in the CPU step (512 KiB in fp32): its temporaries stay in cache.
ADAM_BLOCK_ELEMENTS = 1 << 17


def _blocked_adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    rows: torch.Tensor | None,
    valid: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    low: torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    unit_norm: bool,
) -> None:
    """`sparse_adam_step_` on the CPU, in blocks of at most `ADAM_BLOCK_ELEMENTS`: the valid rows of a
    gradient from rows (compacted: distinct) are gathered, updated and written back; a dense gradient
    updates its blocks in place, the rows that are not ``valid`` written back as they were."""
    acc_dtype = math_dtype(param)
    if rows is not None and valid is not None:
        kept = valid.nonzero().squeeze(1)
        rows, grad, valid = rows.index_select(0, kept), grad.index_select(0, kept), None
    step_size, bc2_sqrt = adam_row_scalars(step, rows, valid, lr, beta1, beta2, acc_dtype)
    block = max(1, ADAM_BLOCK_ELEMENTS // max(grad.shape[1], 1))
    for start in range(0, grad.shape[0], block):
        part = slice(start, start + block)
        if rows is None:  # ``.to`` returns a block already in the math dtype itself: updated in place
            take = lambda t: t[part]  # noqa: E731
            put = lambda t, new: None if new.data_ptr() == t[part].data_ptr() else t[part].copy_(new)  # noqa: E731
        else:
            index = rows[part]
            take = lambda t: take_rows(t, index)  # noqa: E731
            put = lambda t, new: write_rows_(t, index, new, None)  # noqa: E731
        w = join_master(take(param), take(low)) if low is not None else take(param).to(acc_dtype)
        m, v = take(exp_avg).to(acc_dtype), take(exp_avg_sq).to(acc_dtype)
        _adam_rows_(w, grad[part].to(acc_dtype), m, v, step_size[part], bc2_sqrt[part],
                    None if valid is None else valid[part], beta1=beta1, beta2=beta2, eps=eps, unit_norm=unit_norm,
                    stored_dtype=None if low is not None else param.dtype)
        if low is not None:
            new, new_low = split_master(w)
            put(param, new)
            put(low, new_low)
        else:
            put(param, w.to(param.dtype))
        put(exp_avg, m)
        put(exp_avg_sq, v)


def _adam_rows_(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step_size: torch.Tensor,
    bc2_sqrt: torch.Tensor,
    live: torch.Tensor | None,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    unit_norm: bool,
    stored_dtype: torch.dtype | None,
) -> None:
    """The Adam arithmetic on rows, in place on ``w``, ``m``, ``v`` ([r, m] in the math dtype); ``g`` [r, m]
    is read only; ``step_size`` / ``bc2_sqrt`` [r] (`adam_row_scalars`). Rows where ``live`` ([r] bool;
    None: all) is False keep every bit of w, m and v (their new values are computed and dropped).
    With ``unit_norm`` the gradient loses its component along w first and the updated row is rescaled to
    unit norm after: the row as stored in ``stored_dtype`` (None: the exact row, for master weights) over
    the exact row's norm, as the Triton kernel does. Every torch path runs this one sequence, so they agree
    bit for bit."""
    tiny = torch.finfo(w.dtype).tiny
    if unit_norm:
        along = torch.linalg.vecdot(g, w).div_(torch.linalg.vecdot(w, w).clamp_min_(tiny))
        g = torch.addcmul(g, along[:, None], w, value=-1.0)
    in_place = live is None
    new_m = m.lerp_(g, 1 - beta1) if in_place else torch.lerp(m, g, 1 - beta1)  # m + (1 - beta1) (g - m)
    new_v = (v.mul_(beta2) if in_place else torch.mul(v, beta2)).addcmul_(g, g, value=1 - beta2)
    denom = new_v.sqrt().div_(bc2_sqrt[:, None]).add_(eps)
    step = torch.mul(new_m, step_size[:, None]).div_(denom)
    new_w = w.sub_(step) if in_place else torch.sub(w, step, out=step)  # w - step_size m / denom
    if unit_norm:
        norm = torch.linalg.vector_norm(new_w, dim=1, keepdim=True).clamp_min_(tiny)
        if stored_dtype is not None and stored_dtype != new_w.dtype:
            new_w.copy_(new_w.to(stored_dtype))
        new_w.div_(norm)
    if not in_place:
        keep = live[:, None]
        for old, new in ((w, new_w), (m, new_m), (v, new_v)):
            torch.where(keep, new, old, out=old)
