"""Torch versions of every op: the CPU backend, and the twin the Triton kernels are tested against.

Every function here works on any device and never materializes a [B, F] matrix or a dense [F, d]
gradient: the encoder sweeps features in chunks with a running top-k, and the sparse parts work on
the B * k (token, feature) pairs in row chunks. Accumulation is fp32 whatever the input dtype.

Top-k ordering uses packed int64 keys, the same scheme as the Triton encoder: for a non-negative
fp32 value the bit pattern orders like the value, so ``key = bits << 32 | (2**31 - 1 - index)``
sorts by value, then by lower index, which makes ties resolve exactly and deterministically.
"""
from __future__ import annotations

import torch

# Most values a chunk of work holds at once (4M: 48 MiB of fp32 values and int64 keys).
CHUNK_ELEMENTS = 1 << 22
_INDEX_MASK = (1 << 31) - 1
_LOW32 = (1 << 32) - 1


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed top-k keys -> (fp32 values, int64 indices)."""
    index = _INDEX_MASK - (keys & _LOW32)
    values = (keys >> 32).to(torch.int32).view(torch.float32)
    return values, index


def feature_chunk_size(n_rows: int, n_features: int, k: int) -> int:
    """Features per chunk for the running top-k, so a chunk holds at most CHUNK_ELEMENTS values."""
    return max(k, min(n_features, CHUNK_ELEMENTS // max(n_rows, 1)))


def topk_encode_forward(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_pre: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per row, sweeping features in chunks.

    x: [B, d], W_enc: [F, d], b_enc: [F], b_pre: [d] or None (one float dtype).
    Returns vals [B, k] in x's dtype, sorted descending, and idx [B, k] int64; ties go to the
    lower feature index, and rows with fewer than k positive values fill up with zeros at the
    lowest unchosen indices. Extra memory is O(B * chunk_size + B * k), never O(B * F).
    """
    n_rows, n_features = x.shape[0], W_enc.shape[0]
    chunk = chunk_size or feature_chunk_size(n_rows, n_features, k)
    xc = x.to(torch.float32)
    if b_pre is not None:
        xc = xc - b_pre.to(torch.float32)
    best = torch.empty(n_rows, 0, dtype=torch.int64, device=x.device)
    for start in range(0, n_features, chunk):
        stop = min(start + chunk, n_features)
        act = torch.addmm(b_enc[start:stop].to(torch.float32), xc, W_enc[start:stop].to(torch.float32).T)
        # In place to keep the chunk's footprint at 12 bytes per value; adding +0.0 turns -0.0
        # into +0.0, which the bit-pattern order needs.
        act.clamp_(min=0).add_(0.0)
        keys = act.view(torch.int32).to(torch.int64)
        del act
        keys <<= 32
        keys |= _INDEX_MASK - torch.arange(start, stop, device=x.device)
        if keys.shape[1] > k:
            keys = keys.topk(k, dim=1, sorted=False).values
        best = torch.cat([best, keys], dim=1)
        if best.shape[1] > k:
            best = best.topk(k, dim=1, sorted=False).values
    best = best.sort(dim=1, descending=True).values
    vals, idx = unpack_keys(best)
    return vals.to(x.dtype), idx


def _row_chunks(n_rows: int, width: int) -> range:
    """Row-chunk starts so that a [chunk, width] fp32 block stays under CHUNK_ELEMENTS."""
    return range(0, n_rows, max(1, CHUNK_ELEMENTS // max(width, 1)))


def take_rows(W: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``W[index]`` for W [F, ...] and an int64 index of any shape, via index_select (several times
    faster than advanced indexing on CPU)."""
    return W.index_select(0, index.reshape(-1)).view(*index.shape, *W.shape[1:])


def gather_rows(coef: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j coef[t, j] * W[idx[t, j]]`` in fp32: coef [B, k], idx [B, k], W [F, d] -> [B, d]."""
    n_rows, k = idx.shape
    out = torch.empty(n_rows, W.shape[1], dtype=torch.float32, device=W.device)
    step = _row_chunks(n_rows, k * W.shape[1]).step
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        picked = take_rows(W, idx[rows]).to(torch.float32)  # [b, k, d]
        out[rows] = torch.bmm(coef[rows].to(torch.float32).unsqueeze(1), picked).squeeze(1)
    return out


def row_dots(grad: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``out[t, j] = <grad[t], W[idx[t, j]]>`` in fp32: grad [B, d], idx [B, k], W [F, d] -> [B, k]."""
    n_rows, k = idx.shape
    out = torch.empty(n_rows, k, dtype=torch.float32, device=W.device)
    step = _row_chunks(n_rows, k * W.shape[1]).step
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        picked = take_rows(W, idx[rows]).to(torch.float32)  # [b, k, d]
        out[rows] = torch.bmm(picked, grad[rows].to(torch.float32).unsqueeze(2)).squeeze(2)
    return out


def segment_rows(
    coef: torch.Tensor, idx: torch.Tensor, vecs: torch.Tensor, fired: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, slot) pairs where ``fired`` is true by feature.

    coef [B, k], idx [B, k] int64, vecs [B, d], fired [B, k] bool. Returns ``rows`` [U] int64 (sorted unique features
    that fired), ``grad_rows`` [U, d] fp32 with ``grad_rows[u] = sum_{idx[t,j]=rows[u]} coef[t,j] * vecs[t]``
    and ``coef_sums`` [U] fp32 with the per-feature sum of coef.
    """
    rows, inverse = torch.unique(idx[fired], sorted=True, return_inverse=True)
    tokens = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)[fired]
    weights = coef.to(torch.float32)[fired]
    grad_rows = torch.zeros(rows.shape[0], vecs.shape[1], dtype=torch.float32, device=vecs.device)
    step = _row_chunks(weights.shape[0], vecs.shape[1]).step
    for start in range(0, weights.shape[0], step):
        part = slice(start, start + step)
        contrib = weights[part].unsqueeze(1) * take_rows(vecs, tokens[part]).to(torch.float32)
        grad_rows.index_add_(0, inverse[part], contrib)
    coef_sums = torch.zeros(rows.shape[0], dtype=torch.float32, device=coef.device)
    coef_sums.index_add_(0, inverse, weights)
    return rows, grad_rows, coef_sums


def sparse_decode_forward(
    vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """``x_hat = sum_j vals[:, j, None] * W_dec[idx[:, j]] + b_dec``: [B, k], [B, k], [F, d], [d] -> [B, d] in W_dec's dtype."""
    return (gather_rows(vals, idx, W_dec) + b_dec.to(torch.float32)).to(W_dec.dtype)


def sparse_decode_backward(
    grad_out: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder gradients from grad_out [B, d].

    Returns grad_vals [B, k] fp32, and W_dec's gradient in compact form: rows [U] int64 (features
    with a positive value in ``vals``) and grad_rows [U, d] fp32. b_dec's gradient is grad_out.sum(0).
    """
    grad_vals = row_dots(grad_out, idx, W_dec)
    rows, grad_rows, _ = segment_rows(vals, idx, grad_out, vals > 0)
    return grad_vals, rows, grad_rows


def topk_encode_backward(
    grad_vals: torch.Tensor,
    vals: torch.Tensor,
    idx: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_pre: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder gradients through the top-k and the ReLU, from grad_vals [B, k].

    Returns grad_x [B, d] fp32 (b_pre's gradient is -grad_x.sum(0)), and the compact gradients of
    the active features: rows [U] int64, grad_W_rows [U, d] fp32, grad_b_rows [U] fp32.
    """
    fired = vals > 0
    grad_pre = torch.where(fired, grad_vals.to(torch.float32), 0.0)
    grad_x = gather_rows(grad_pre, idx, W_enc)
    xc = x.to(torch.float32)
    if b_pre is not None:
        xc = xc - b_pre.to(torch.float32)
    rows, grad_W_rows, grad_b_rows = segment_rows(grad_pre, idx, xc, fired)
    return grad_x, rows, grad_W_rows, grad_b_rows


def adam_row_scalars(
    step: torch.Tensor, rows: torch.Tensor | None, lr: float, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the per-row step counts of the touched rows and return their Adam scalars.

    step [n] int64 is incremented in place at ``rows`` ([U] int64, unique; None = every row).
    Returns step_size = lr / (1 - beta1**t) and bc2_sqrt = sqrt(1 - beta2**t), both fp32 [U]
    (computed in float64, as torch.optim.Adam does, then rounded).
    """
    if rows is None:
        t = step.add_(1).to(torch.float64)
    else:
        t_int = step[rows] + 1
        step[rows] = t_int
        t = t_int.to(torch.float64)
    step_size = lr / (1 - beta1**t)
    bc2_sqrt = (1 - beta2**t).sqrt()
    return step_size.to(torch.float32), bc2_sqrt.to(torch.float32)


def sparse_adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    rows: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    unit_norm: bool = False,
) -> None:
    """One lazy Adam step on the touched rows of ``param``, in place; other rows are not read or written.

    param [n, m] (any float dtype), exp_avg / exp_avg_sq [n, m] fp32 | bf16, step [n] int64;
    grad [U, m] holds the gradient of rows ``rows`` [U] int64 (unique), or is [n, m] with rows=None
    (every row). Math in fp32. ``unit_norm``: remove each gradient row's component along its
    parameter row first, and rescale the updated rows to unit norm after the step.
    """
    step_size, bc2_sqrt = adam_row_scalars(step, rows, lr, beta1, beta2)
    pick = (lambda t: t) if rows is None else (lambda t: take_rows(t, rows))
    w = pick(param).to(torch.float32)
    g = grad.to(torch.float32)
    if unit_norm:
        along = (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        g = g - along * w
    m = pick(exp_avg).to(torch.float32)
    v = pick(exp_avg_sq).to(torch.float32)
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    w = w - step_size[:, None] * m / (v.sqrt() / bc2_sqrt[:, None] + eps)
    new = w.to(param.dtype)
    if unit_norm:
        # Rescale the stored (rounded) row by the norm of the fp32 row, as the Triton kernel does.
        norm = w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        new = (new.to(torch.float32) / norm).to(param.dtype)
    if rows is None:
        param.copy_(new)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    else:
        param.index_copy_(0, rows, new)
        exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
        exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))
