"""Training losses on a `TopKSAE` (whole or feature-parallel): Gao et al. (2024)'s AuxK loss.

AuxK: the top-``aux_k`` pre-activations among the dead features reconstruct the main
reconstruction's residual, so dead features learn what the live ones miss. In a training step the
selection comes from the main encoder pass itself (`TopKSAE.forward_with_aux`: one GEMM over W_enc
per step); standalone (`aux_k_loss`) it runs through the model's own `_select` with the dead
features as its mask. The decode runs through its `_decode_rows`, on the parameters themselves (no copies of their rows), so a feature-parallel model
selects across its ranks exactly as a single process does, the gradients reach only the dead rows
that won a slot (as compact rows that add to the main loss's), and nothing waits on the host:
which and how many features are dead stays on the device.
"""
from __future__ import annotations

import torch

from .model import Selection, TopKSAE, require_dead_mask


def unexplained_fraction(
    e_hat: torch.Tensor, residual: torch.Tensor, denominator: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum ||residual - e_hat||^2 / denominator`` (default ``sum ||residual||^2``): [B, d], [B, d] -> fp32 scalar."""
    if denominator is None:
        denominator = residual.float().pow(2).sum()
    return (e_hat.float() - residual.float()).pow(2).sum() / denominator.clamp_min(torch.finfo(torch.float32).tiny)


def aux_k_loss(
    sae: TopKSAE,
    x: torch.Tensor,
    residual: torch.Tensor,
    dead: torch.Tensor,
    aux_k: int,
    *,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """The AuxK loss over the dead features, differentiable w.r.t. W_enc, b_enc and W_dec (not b_dec).

    x: [B, d] the SAE input, residual: [B, d_out] its reconstruction error ``target - x_hat`` (both
    detached; the target is x for an autoencoder); dead: bool [F] over all features (the same on
    every rank). With ``z`` the top-aux_k per token (whatever the model's activation) of
    ``relu((x - b_dec) W_enc^T + b_enc)`` (a transcoder's: ``relu(x W_enc^T + b_enc)``) among the
    dead features, ``e_hat = z W_dec`` and the loss is ``sum ||residual - e_hat||^2 / denominator``
    (default ``sum ||residual||^2``); 0 when no feature is dead. Only dead rows that won a slot with a positive value get gradient.

    Standalone, this selects with an encoder pass of its own; a training step that already encodes x
    takes the selection from its own pass instead (`TopKSAE.forward_with_aux`, then
    `aux_k_loss_from_selection`), which is what `flashsae.sae.trainer.Trainer` does.
    """
    require_dead_mask(dead, sae.n_features)
    aux_k = min(aux_k, sae.n_features)
    held = dead[sae.feature_offset : sae.feature_offset + sae.n_held]
    shift = sae.encoder_shift
    b_pre = None if shift is None else shift.detach()
    # x was the main forward's input: checked there, or by the caller's own deferred check.
    selection = sae._select(x.detach(), sae.W_enc, sae.b_enc, b_pre, aux_k, held, check_finite=False)
    return aux_k_loss_from_selection(sae, selection, residual, dead, denominator=denominator)


def aux_k_loss_from_selection(
    sae: TopKSAE,
    selection: Selection,
    residual: torch.Tensor,
    dead: torch.Tensor,
    *,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """`aux_k_loss` of an AuxK selection already made: ``selection`` the top-aux_k among the dead
    features (`TopKSAE.forward_with_aux`'s second output: vals [B, aux_k], global idx), residual
    [B, d_out] (detached here), dead bool [F]; ``sum ||residual - e_hat||^2 / denominator`` with
    ``e_hat = z W_dec`` decoded through the model (a feature-parallel model across its ranks), 0
    when no feature is dead."""
    e_hat = sae._decode_rows(selection.vals, selection.idx, sae.W_dec, torch.zeros_like(sae.b_dec),
                             sae._held_ids(selection.idx.device), selection.grouping)
    return unexplained_fraction(e_hat, residual.detach(), denominator) * dead.any()


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
    """Backpropagate ``coef * aux_k_loss(...)`` into ``sae``'s gradients (added to what is there); returns the loss."""
    loss = aux_k_loss(sae, x, residual, dead, aux_k, denominator=denominator)
    (coef * loss).backward()
    return loss.detach()
