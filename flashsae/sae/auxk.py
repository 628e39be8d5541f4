"""Gao et al. (2024)'s AuxK loss: dead features learn to explain what the live ones miss.

The top-``aux_k`` pre-activations among the dead features reconstruct the main reconstruction's
residual; only the dead rows of W_enc, b_enc and W_dec get gradient, and nothing of size [B, F]
is formed (the ops run on the dead rows' slices).
"""
from __future__ import annotations

import torch

from .. import ops
from .model import TopKSAE


def aux_k_loss(
    x: torch.Tensor,
    residual: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_pre: torch.Tensor,
    aux_k: int,
    *,
    denominator: torch.Tensor | None = None,
    backend: str = "auto",
    sparse_grad: bool = False,
) -> torch.Tensor:
    """Gao et al. (2024)'s AuxK loss on a set of (dead) features: fp32 scalar.

    x: [B, d] the SAE input, residual: [B, d] its reconstruction error ``x - x_hat`` (detached);
    W_enc, W_dec: [n, d] and b_enc: [n] the dead features' rows; b_pre: [d] (detached b_dec).
    ``e_hat = topk_aux(relu((x - b_pre) W_enc^T + b_enc)) @ W_dec`` and the loss is
    ``sum ||residual - e_hat||^2 / denominator`` (default ``sum ||residual||^2``), i.e. the
    fraction of the residual the dead features fail to explain.
    """
    vals, idx = ops.topk_encode(x, W_enc, b_enc, aux_k, b_pre=b_pre, backend=backend, sparse_grad=sparse_grad)
    zero_bias = torch.zeros(W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    e_hat = ops.sparse_decode(vals, idx, W_dec, zero_bias, backend=backend, sparse_grad=sparse_grad)
    return unexplained_fraction(e_hat, residual, denominator)


def unexplained_fraction(
    e_hat: torch.Tensor, residual: torch.Tensor, denominator: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum ||residual - e_hat||^2 / denominator`` (default ``sum ||residual||^2``): [B, d], [B, d] -> fp32 scalar."""
    if denominator is None:
        denominator = residual.float().pow(2).sum()
    return (e_hat.float() - residual.float()).pow(2).sum() / denominator.clamp_min(torch.finfo(torch.float32).tiny)


def scatter_row_grad_(param: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Add ``grad`` (of ``param[rows]``: sparse COO over its rows, or dense) into ``param.grad``."""
    if grad is None:
        return
    if grad.is_sparse:
        grad = grad.coalesce()
        full = torch.sparse_coo_tensor(
            rows[grad.indices()[0]].unsqueeze(0), grad.values(), param.shape, check_invariants=False
        )
        param.grad = full.coalesce() if param.grad is None else (param.grad + full).coalesce()
        return
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    if param.grad.is_sparse:
        param.grad = param.grad.to_dense()
    param.grad.index_add_(0, rows, grad.to(param.grad.dtype))


def add_aux_k_grads_(
    sae: TopKSAE,
    x: torch.Tensor,
    residual: torch.Tensor,
    dead: torch.Tensor,
    aux_k: int,
    coef: float,
    *,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backpropagate ``coef * aux_k_loss`` over the dead features ``dead`` (int64 [n]) into sae's grads.

    Only the dead rows of W_enc, b_enc and W_dec receive gradient (as sparse rows with
    ``sae.sparse_grad``, else added to the dense gradients); nothing of size [B, F] is formed.
    Returns the (detached) AuxK loss; zero when no feature is dead.
    """
    if dead.numel() == 0 or aux_k == 0 or coef == 0:
        return torch.zeros((), device=x.device)
    leaves = [sae.W_enc.detach()[dead].requires_grad_(), sae.b_enc.detach()[dead].requires_grad_(),
              sae.W_dec.detach()[dead].requires_grad_()]
    loss = aux_k_loss(
        x, residual, *leaves, sae.b_dec.detach(), min(aux_k, dead.numel()), denominator=denominator,
        backend=sae.backend, sparse_grad=sae.sparse_grad,
    )
    (coef * loss).backward()
    for param, leaf in zip((sae.W_enc, sae.b_enc, sae.W_dec), leaves):
        scatter_row_grad_(param, dead, leaf.grad)
    return loss.detach()
