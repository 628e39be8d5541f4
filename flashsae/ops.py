"""The functional API: `topk_encode` and `sparse_decode`, validated here and composed from backend primitives.

Each op is one autograd Function whose forward and backward call only the primitives of a
`flashsae.kernels.registry.Backend` (``topk_encode``, ``gather_rows``, ``row_dots``,
``segment_rows``), so every backend computes the same sparse gradients. ``backend`` picks the
primitives by name (`BACKENDS`): ``"triton"`` (GPU kernels; on CPU tensors only under
``TRITON_INTERPRET=1``), ``"torch"`` (runs anywhere) or ``"auto"`` (Triton on CUDA tensors, torch
elsewhere).

With ``sparse_grad=True`` the gradients of ``W_enc``, ``W_dec`` and ``b_enc`` are coalesced sparse
COO tensors holding only the rows of features that fired (``flashsae.optim.SparseAdam`` consumes
them); with ``sparse_grad=False`` they are dense-shaped, for any torch optimizer.
"""
from __future__ import annotations

import torch

from .checks import require_float_tensor, require_k, require_like, require_shape
from .kernels.registry import Backend, backend_names, get_backend

# The names a ``backend`` argument accepts.
BACKENDS = backend_names()


def _row_gradient(rows: torch.Tensor, grad_rows: torch.Tensor, like: torch.Tensor, sparse: bool) -> torch.Tensor:
    """W's (or b's) gradient from its compact rows: sparse COO, or scattered into a dense tensor."""
    grad_rows = grad_rows.to(like.dtype)
    if sparse:
        return torch.sparse_coo_tensor(rows.unsqueeze(0), grad_rows, like.shape, is_coalesced=True, check_invariants=False)
    dense = torch.zeros_like(like)
    dense[rows] = grad_rows
    return dense


class TopKEncode(torch.autograd.Function):
    """relu((x - b_pre) @ W_enc.T + b_enc) -> top-k; backward touches only the selected features.

    Backward, with fired = vals > 0 and grad_pre = grad_vals where fired (the ReLU's gate):
    grad_x = gather_rows(grad_pre, idx, W_enc), grad_b_pre = -grad_x.sum(0), and the rows of W_enc
    and b_enc that fired from segment_rows(grad_pre, idx, x, fired, shift=b_pre).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, k: int, backend: Backend, sparse_grad: bool):
        vals, idx = backend.topk_encode(x, W_enc, b_enc, k, b_pre)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(x, W_enc, b_pre, vals, idx)
        ctx.backend, ctx.sparse_grad, ctx.b_enc_like = backend, sparse_grad, b_enc
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, _grad_idx):
        x, W_enc, b_pre, vals, idx = ctx.saved_tensors
        backend, need = ctx.backend, ctx.needs_input_grad
        fired = vals > 0
        grad_pre = torch.where(fired, grad_vals.to(torch.float32), 0.0).contiguous()
        grad_x = grad_W = grad_b = grad_b_pre = None
        if need[0] or need[3]:
            grad_x = backend.gather_rows(grad_pre, idx, W_enc)
            grad_b_pre = (-grad_x.sum(0)).to(b_pre.dtype) if b_pre is not None and need[3] else None
            grad_x = grad_x.to(x.dtype) if need[0] else None
        if need[1] or need[2]:
            rows, grad_W_rows, grad_b_rows = backend.segment_rows(grad_pre, idx, x, fired, shift=b_pre)
            grad_W = _row_gradient(rows, grad_W_rows, W_enc, ctx.sparse_grad) if need[1] else None
            grad_b = _row_gradient(rows, grad_b_rows, ctx.b_enc_like, ctx.sparse_grad) if need[2] else None
        return grad_x, grad_W, grad_b, grad_b_pre, None, None, None


class SparseDecode(torch.autograd.Function):
    """sum_j vals[:, j] * W_dec[idx[:, j]] + b_dec; backward touches only the rows that fired.

    Forward: gather_rows(vals, idx, W_dec, bias=b_dec) into an output of W_dec's dtype. Backward:
    grad_vals = row_dots(grad_out, idx, W_dec), the rows of W_dec that fired from
    segment_rows(vals, idx, grad_out, vals > 0), grad_b_dec = grad_out.sum(0).
    """

    @staticmethod
    def forward(ctx, vals, idx, W_dec, b_dec, backend: Backend, sparse_grad: bool):
        out = torch.empty(idx.shape[0], W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
        x_hat = backend.gather_rows(vals, idx, W_dec, b_dec, out=out)
        ctx.save_for_backward(vals, idx, W_dec)
        ctx.backend, ctx.sparse_grad = backend, sparse_grad
        return x_hat

    @staticmethod
    def backward(ctx, grad_out):
        vals, idx, W_dec = ctx.saved_tensors
        backend, need = ctx.backend, ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_vals = backend.row_dots(grad_out, idx, W_dec).to(vals.dtype) if need[0] else None
        grad_W = None
        if need[2]:
            rows, grad_rows, _ = backend.segment_rows(vals, idx, grad_out, vals > 0)
            grad_W = _row_gradient(rows, grad_rows, W_dec, ctx.sparse_grad)
        grad_b = grad_out.sum(0, dtype=torch.float32).to(W_dec.dtype) if need[3] else None
        return grad_vals, None, grad_W, grad_b, None, None


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    b_pre: torch.Tensor | None = None,
    backend: str = "auto",
    sparse_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per row, never forming the [B, F] matrix.

    x: [B, d], W_enc: [F, d], b_enc: [F], b_pre: [d] or None; one dtype of fp32 | bf16 | fp16,
    one device; accumulation is fp32. Returns vals [B, k] in x's dtype, sorted descending, and
    idx [B, k] int64 (ties to the lower feature index; rows with fewer than k positive values are
    filled with zeros at the lowest unchosen indices). Differentiable w.r.t. x, W_enc, b_enc, b_pre.
    Non-contiguous inputs are copied to contiguous ones.
    """
    require_float_tensor("x", x, 2)
    require_float_tensor("W_enc", W_enc, 2)
    require_like("W_enc", W_enc, "x", x)
    n_features, d = W_enc.shape
    if x.shape[1] != d:
        raise ValueError(f"x has {x.shape[1]} columns but W_enc [F, d] has d={d}")
    require_float_tensor("b_enc", b_enc, 1)
    require_like("b_enc", b_enc, "x", x)
    require_shape("b_enc", b_enc, (n_features,))
    if b_pre is not None:
        require_float_tensor("b_pre", b_pre, 1)
        require_like("b_pre", b_pre, "x", x)
        require_shape("b_pre", b_pre, (d,))
        b_pre = b_pre.contiguous()
    require_k(k, n_features)
    kernels = get_backend(backend, x.device)
    return TopKEncode.apply(
        x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_pre, k, kernels, sparse_grad
    )


def sparse_decode(
    vals: torch.Tensor,
    idx: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    backend: str = "auto",
    sparse_grad: bool = False,
) -> torch.Tensor:
    """``x_hat = sum_j vals[:, j, None] * W_dec[idx[:, j]] + b_dec`` as a gather, fp32 accumulation.

    vals: [B, k] and W_dec: [F, d], b_dec: [d] of one dtype (fp32 | bf16 | fp16); idx: [B, k]
    int64 with entries in [0, F). Returns x_hat [B, d] in W_dec's dtype. Differentiable w.r.t.
    vals, W_dec, b_dec. Indices are checked on the host only for CPU tensors (a device check
    would synchronize).
    """
    require_float_tensor("vals", vals, 2)
    require_float_tensor("W_dec", W_dec, 2)
    require_like("W_dec", W_dec, "vals", vals)
    require_float_tensor("b_dec", b_dec, 1)
    require_like("b_dec", b_dec, "vals", vals)
    require_shape("b_dec", b_dec, (W_dec.shape[1],))
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"idx must be an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    require_shape("idx", idx, tuple(vals.shape))
    require_like("idx", idx, "vals", vals, dtype=False)
    if idx.device.type == "cpu" and idx.numel() and (idx.min() < 0 or idx.max() >= W_dec.shape[0]):
        raise ValueError(f"idx entries must lie in [0, {W_dec.shape[0]}), got [{idx.min()}, {idx.max()}]")
    kernels = get_backend(backend, vals.device)
    return SparseDecode.apply(
        vals.contiguous(), idx.contiguous(), W_dec.contiguous(), b_dec.contiguous(), kernels, sparse_grad
    )
