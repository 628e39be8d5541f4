"""The functional API: `topk_encode` and `sparse_decode`, validated here and dispatched to a backend.

Backends: ``"triton"`` (fused GPU kernels; on CPU tensors only under ``TRITON_INTERPRET=1``),
``"torch"`` (`flashsae.kernels.reference`, runs anywhere) and ``"auto"`` (Triton on CUDA tensors,
torch elsewhere). Both backends share one autograd Function per op, so gradients are the same
sparse computation whatever runs the forward.

With ``sparse_grad=True`` the gradients of ``W_enc``, ``W_dec`` and ``b_enc`` are coalesced sparse
COO tensors holding only the rows of features that fired (``flashsae.optim.SparseAdam`` consumes
them); with ``sparse_grad=False`` they are dense-shaped, for any torch optimizer.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from .kernels import reference

BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_K = 512


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("triton" or "torch") that runs on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton to use the interpreter, or use backend='torch'"
        )
    return backend


def _kernel_module(backend: str, op: str) -> ModuleType:
    """The module implementing ``op`` on ``backend``; Triton modules are imported on first use."""
    if backend == "torch":
        return reference
    return importlib.import_module(f"flashsae.kernels.{op}")


def _check_float(name: str, t: torch.Tensor, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def _check_k(k: int, n_features: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= min(n_features, MAX_K):
        raise ValueError(f"k must be in [1, min(n_features={n_features}, {MAX_K})], got k={k}")


def _row_gradient(rows: torch.Tensor, grad_rows: torch.Tensor, like: torch.Tensor, sparse: bool) -> torch.Tensor:
    """W's (or b's) gradient from its compact rows: sparse COO, or scattered into a dense tensor."""
    grad_rows = grad_rows.to(like.dtype)
    if sparse:
        return torch.sparse_coo_tensor(rows.unsqueeze(0), grad_rows, like.shape, is_coalesced=True, check_invariants=False)
    dense = torch.zeros_like(like)
    dense[rows] = grad_rows
    return dense


class TopKEncode(torch.autograd.Function):
    """relu((x - b_pre) @ W_enc.T + b_enc) -> top-k; backward touches only the selected features."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, k: int, backend: str, sparse_grad: bool):
        vals, idx = _kernel_module(backend, "topk_encode").topk_encode_forward(x, W_enc, b_enc, k, b_pre)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(x, W_enc, b_pre, vals, idx)
        ctx.backend, ctx.sparse_grad, ctx.b_enc_like = backend, sparse_grad, b_enc
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, _grad_idx):
        x, W_enc, b_pre, vals, idx = ctx.saved_tensors
        kernels = _kernel_module(ctx.backend, "sparse_decode")
        grad_x, rows, grad_W_rows, grad_b_rows = kernels.topk_encode_backward(
            grad_vals, vals, idx, x, W_enc, b_pre
        )
        need = ctx.needs_input_grad
        grad_W = _row_gradient(rows, grad_W_rows, W_enc, ctx.sparse_grad) if need[1] else None
        grad_b = _row_gradient(rows, grad_b_rows, ctx.b_enc_like, ctx.sparse_grad) if need[2] else None
        grad_b_pre = (-grad_x.sum(0)).to(b_pre.dtype) if b_pre is not None and need[3] else None
        return grad_x.to(x.dtype), grad_W, grad_b, grad_b_pre, None, None, None


class SparseDecode(torch.autograd.Function):
    """sum_j vals[:, j] * W_dec[idx[:, j]] + b_dec; backward touches only the rows that fired."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec, b_dec, backend: str, sparse_grad: bool):
        x_hat = _kernel_module(backend, "sparse_decode").sparse_decode_forward(vals, idx, W_dec, b_dec)
        ctx.save_for_backward(vals, idx, W_dec)
        ctx.backend, ctx.sparse_grad = backend, sparse_grad
        return x_hat

    @staticmethod
    def backward(ctx, grad_out):
        vals, idx, W_dec = ctx.saved_tensors
        kernels = _kernel_module(ctx.backend, "sparse_decode")
        grad_vals, rows, grad_rows = kernels.sparse_decode_backward(grad_out.contiguous(), vals, idx, W_dec)
        need = ctx.needs_input_grad
        grad_W = _row_gradient(rows, grad_rows, W_dec, ctx.sparse_grad) if need[2] else None
        grad_b = grad_out.sum(0, dtype=torch.float32).to(W_dec.dtype) if need[3] else None
        return grad_vals.to(vals.dtype), None, grad_W, grad_b, None, None


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
    _check_float("x", x, 2)
    _check_float("W_enc", W_enc, 2)
    _check_same("W_enc", W_enc, "x", x)
    n_features, d = W_enc.shape
    if x.shape[1] != d:
        raise ValueError(f"x has {x.shape[1]} columns but W_enc [F, d] has d={d}")
    _check_float("b_enc", b_enc, 1)
    _check_same("b_enc", b_enc, "x", x)
    _check_shape("b_enc", b_enc, (n_features,))
    if b_pre is not None:
        _check_float("b_pre", b_pre, 1)
        _check_same("b_pre", b_pre, "x", x)
        _check_shape("b_pre", b_pre, (d,))
        b_pre = b_pre.contiguous()
    _check_k(k, n_features)
    resolved = resolve_backend(backend, x.device)
    return TopKEncode.apply(
        x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_pre, k, resolved, sparse_grad
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
    _check_float("vals", vals, 2)
    _check_float("W_dec", W_dec, 2)
    _check_same("W_dec", W_dec, "vals", vals)
    _check_float("b_dec", b_dec, 1)
    _check_same("b_dec", b_dec, "vals", vals)
    _check_shape("b_dec", b_dec, (W_dec.shape[1],))
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"idx must be an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    _check_shape("idx", idx, tuple(vals.shape))
    if idx.device != vals.device:
        raise ValueError(f"idx is on {idx.device} but vals is on {vals.device}; they must match")
    if idx.device.type == "cpu" and idx.numel() and (idx.min() < 0 or idx.max() >= W_dec.shape[0]):
        raise ValueError(f"idx entries must lie in [0, {W_dec.shape[0]}), got [{idx.min()}, {idx.max()}]")
    resolved = resolve_backend(backend, vals.device)
    return SparseDecode.apply(
        vals.contiguous(), idx.contiguous(), W_dec.contiguous(), b_dec.contiguous(), resolved, sparse_grad
    )
