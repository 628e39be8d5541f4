"""Active Subspace Initialization: the decoder lands in the activations' subspace."""
from __future__ import annotations

import pytest
import torch

from flashsae import TopKSAE
from flashsae.sae.asi import active_subspace, init_active_subspace, resolve_d_init


def low_rank_activations(n=2000, d=32, r=6, seed=0):
    """Activations [n, d] = offset + (n x r noise) @ (r x d orthonormal basis); returns them and the basis."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q.T  # [r, d]
    coeffs = torch.randn(n, r, generator=g, dtype=torch.float64) * torch.linspace(3, 1, r, dtype=torch.float64)
    offset = 5 * torch.randn(d, generator=g, dtype=torch.float64)
    return (coeffs @ basis + offset).float(), basis


def test_active_subspace_recovers_the_span_of_centered_activations():
    acts, basis = low_rank_activations()
    V = active_subspace(acts, 6)
    assert V.shape == (32, 6)
    # Every true basis vector lies in span(V), and V is orthonormal.
    residual = basis.float().T - V @ (V.T @ basis.float().T)
    assert residual.norm() < 1e-3
    torch.testing.assert_close(V.T @ V, torch.eye(6), atol=1e-5, rtol=0)


def test_uncentered_subspace_is_pulled_towards_the_offset():
    acts, basis = low_rank_activations()
    V = active_subspace(acts, 6, center=False)
    residual = basis.float().T - V @ (V.T @ basis.float().T)
    assert residual.norm() > 0.1  # the mean direction took one of the six slots


def test_init_projects_normalizes_and_ties_the_encoder():
    acts, basis = low_rank_activations()
    V = active_subspace(acts, 6)
    sae = TopKSAE(32, 200, 4)
    init_active_subspace(sae, V)
    W = sae.W_dec.detach()
    torch.testing.assert_close(W.norm(dim=1), torch.ones(200))
    torch.testing.assert_close(W @ V @ V.T, W, atol=1e-5, rtol=0)
    assert torch.equal(sae.W_enc, sae.W_dec)


def test_init_with_full_subspace_keeps_the_random_decoder():
    sae = TopKSAE(16, 50, 4)
    before = sae.W_dec.detach().clone()
    init_active_subspace(sae, torch.eye(16))
    torch.testing.assert_close(sae.W_dec.detach(), before)


def test_asi_features_fire_on_low_rank_data_where_random_ones_are_outside():
    acts, _ = low_rank_activations(d=64, r=4)
    x = acts - acts.mean(0)
    torch.manual_seed(1)
    random_sae = TopKSAE(64, 256, 4)
    asi_sae = TopKSAE(64, 256, 4)
    init_active_subspace(asi_sae, active_subspace(acts, 4))
    # The decoder's energy inside the data subspace: all of it for ASI, about r/d for random rows.
    V = active_subspace(acts, 4)
    inside = lambda sae: (sae.W_dec.detach() @ V).pow(2).sum(1).mean().item()
    assert inside(asi_sae) == pytest.approx(1.0, abs=1e-5)
    assert inside(random_sae) < 0.2
    fired = lambda sae: torch.unique(sae.encode(x)[1]).numel()
    assert fired(asi_sae) >= fired(random_sae)


@pytest.mark.parametrize("d_init,expected", [(0.5, 32), (10, 10), (64, 64), (0.01, 1)])
def test_resolve_d_init_counts_and_fractions(d_init, expected):
    assert resolve_d_init(d_init, 64) == expected


@pytest.mark.parametrize("d_init", [0, -3, 65, 2.5, True])
def test_resolve_d_init_rejects_bad_values(d_init):
    with pytest.raises(ValueError, match="d_init"):
        resolve_d_init(d_init, 64)


def test_init_rejects_a_subspace_of_the_wrong_width():
    with pytest.raises(ValueError, match="V_active must have shape"):
        init_active_subspace(TopKSAE(16, 50, 4), torch.eye(12))
