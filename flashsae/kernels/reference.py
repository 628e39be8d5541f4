"""The torch backend's row and Adam primitives (`flashsae.kernels.registry.Backend`) in plain torch.

They run on any device (the CPU backend) and are the oracle the Triton kernels are tested against;
the backend's encoder is `flashsae.kernels.torch_encode`. Nothing here materializes a dense [F, d]
gradient: the sparse parts work on the B * k (token, feature) pairs in chunks. Accumulation is fp32
(float64 for float64 inputs). Shapes and return conventions are the `Backend` docstring's.
"""
from __future__ import annotations

import torch

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
    out = torch.empty(n_tokens, k, dtype=acc_dtype, device=W.device)
    step = _chunk_step(k * W.shape[1])
    for start in range(0, n_tokens, step):
        part = slice(start, start + step)
        picked = take_rows(W, idx[part]).to(acc_dtype)  # [b, k, d]
        out[part] = torch.bmm(picked, grad[part].to(acc_dtype).unsqueeze(2)).squeeze(2)
    return out


def segment_rows(
    coef: torch.Tensor,
    idx: torch.Tensor,
    vecs: torch.Tensor,
    fired: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-feature sums over the (token, slot) pairs where ``fired``: the compact row gradient.

    coef [B, k], idx [B, k] int64, vecs [B, d], fired [B, k] bool, shift [d] or None. Returns
    rows [U] int64 (sorted unique features that fired), grad_rows [U, d] fp32 (float64 for float64
    vecs) with ``grad_rows[u] = sum_{idx[t, j] = rows[u], fired} coef[t, j] * (vecs[t] - shift)``
    and coef_sums [U] in that dtype with the per-feature sum of coef.
    """
    acc_dtype = math_dtype(vecs)
    rows, inverse = torch.unique(idx[fired], sorted=True, return_inverse=True)
    tokens = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)[fired]
    weights = coef.to(acc_dtype)[fired]
    grad_rows = torch.zeros(rows.shape[0], vecs.shape[1], dtype=acc_dtype, device=vecs.device)
    n_pairs = weights.shape[0]
    step = _chunk_step(vecs.shape[1])
    for start in range(0, n_pairs, step):
        part = slice(start, start + step)
        picked = take_rows(vecs, tokens[part]).to(acc_dtype)
        if shift is not None:
            picked -= shift.to(acc_dtype)
        grad_rows.index_add_(0, inverse[part], weights[part].unsqueeze(1) * picked)
    coef_sums = torch.zeros(rows.shape[0], dtype=acc_dtype, device=coef.device)
    coef_sums.index_add_(0, inverse, weights)
    return rows, grad_rows, coef_sums


def adam_row_scalars(
    step: torch.Tensor, rows: torch.Tensor | None, lr: float, beta1: float, beta2: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the per-row step counts of the touched rows and return their Adam scalars.

    step [n] int64 is incremented in place at ``rows`` ([U] int64, unique; None = every row).
    Returns step_size = lr / (1 - beta1**t) and bc2_sqrt = sqrt(1 - beta2**t), both [U] in
    ``dtype`` (computed in float64, as torch.optim.Adam does, then rounded).
    """
    if rows is None:
        t = step.add_(1).to(torch.float64)
    else:
        t_int = step[rows] + 1
        step[rows] = t_int
        t = t_int.to(torch.float64)
    step_size = lr / (1 - beta1**t)
    bc2_sqrt = (1 - beta2**t).sqrt()
    return step_size.to(dtype), bc2_sqrt.to(dtype)


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
    (every row). Math in fp32 (float64 for a float64 param). ``unit_norm``: remove each gradient
    row's component along its parameter row first, and rescale the updated rows to unit norm after.
    """
    acc_dtype = math_dtype(param)
    tiny = torch.finfo(acc_dtype).tiny
    step_size, bc2_sqrt = adam_row_scalars(step, rows, lr, beta1, beta2, acc_dtype)
    pick = (lambda t: t) if rows is None else (lambda t: take_rows(t, rows))
    w = pick(param).to(acc_dtype)
    g = grad.to(acc_dtype)
    if unit_norm:
        along = (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(tiny)
        g = g - along * w
    m = pick(exp_avg).to(acc_dtype)
    v = pick(exp_avg_sq).to(acc_dtype)
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    w = w - step_size[:, None] * m / (v.sqrt() / bc2_sqrt[:, None] + eps)
    new = w.to(param.dtype)
    if unit_norm:
        # Rescale the stored (rounded) row by the norm of the fp32 row, as the Triton kernel does.
        norm = w.norm(dim=1, keepdim=True).clamp_min(tiny)
        new = (new.to(acc_dtype) / norm).to(param.dtype)
    if rows is None:
        param.copy_(new)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    else:
        param.index_copy_(0, rows, new)
        exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
        exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))
