"""Training losses on a `TopKSAE` (whole or feature-parallel): Gao et al. (2024)'s AuxK loss.

AuxK: the top-``aux_k`` pre-activations among the dead features reconstruct the main
reconstruction's residual, so dead features learn what the live ones miss. Only the dead rows of
W_enc, b_enc and W_dec get gradient, and nothing of size [B, F] is formed: the selection and the
decode run on the dead rows' slices through the model's own `_select` / `_decode_rows`, so a
feature-parallel model selects across its ranks exactly as a single process does.
"""
from __future__ import annotations

import torch

from .model import TopKSAE


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


def keep_rows(grad: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """A sparse row gradient restricted to the rows where ``keep`` (bool [n]); anything else as it is.

    Under feature parallelism a local candidate that lost the global top-k has zero gradient, but as
    a row of a sparse gradient it would still count as touched for `SparseAdam` (stale momentum
    would move it); a single process never lists it.
    """
    if grad is None or keep is None or not grad.is_sparse:
        return grad
    grad = grad.coalesce()
    index = grad.indices()[0]
    kept = keep[index]
    return torch.sparse_coo_tensor(
        index[kept].unsqueeze(0), grad.values()[kept], grad.shape, is_coalesced=True, check_invariants=False
    )


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
    """Backpropagate ``coef * AuxK loss`` over the dead features into ``sae``'s gradients; returns the loss.

    x: [B, d] the SAE input, residual: [B, d] its reconstruction error ``x - x_hat`` (detached);
    dead: int64 [n] ascending global indices of the dead features (the same on every rank).
    ``e_hat = topk_aux(relu((x - b_dec) W_enc[dead]^T + b_enc[dead])) @ W_dec[dead]`` and the loss is
    ``sum ||residual - e_hat||^2 / denominator`` (default ``sum ||residual||^2``). Only the dead rows
    that won a slot receive gradient (sparse rows with ``sae.sparse_grad``, else added to the dense
    gradients); b_dec gets none. Zero when no feature is dead (the same on every rank).
    """
    if dead.numel() == 0 or aux_k == 0 or coef == 0:
        return torch.zeros((), device=x.device)
    offset = sae.feature_offset
    held = dead[(dead >= offset) & (dead < offset + sae.n_held)]
    rows = held - offset
    leaves = [p.detach()[rows].requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec)]
    b_pre = sae.b_dec.detach()
    # x was the main forward's input: checked there, or by the caller's own deferred check.
    selection = sae._select(x, leaves[0], leaves[1], b_pre, min(aux_k, dead.numel()), held, check_finite=False)
    e_hat = sae._decode_rows(selection.vals, selection.idx, leaves[2], torch.zeros_like(b_pre), held)
    loss = unexplained_fraction(e_hat, residual, denominator)
    if loss.requires_grad:  # a rank without dead rows has nothing to differentiate
        (coef * loss).backward()
    for param, leaf in zip((sae.W_enc, sae.b_enc, sae.W_dec), leaves):
        scatter_row_grad_(param, rows, keep_rows(leaf.grad, selection.won))
    return loss.detach()
