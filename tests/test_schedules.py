"""k annealing: the schedule's values, and the trainer applying it before each step; the subspace energy metric."""
from __future__ import annotations

import torch

from flashsae.sae.model import TopKSAE
from flashsae.sae.schedules import linear_k
from flashsae.sae.trainer import Trainer


def test_linear_k_falls_from_k_start_to_k_and_stays():
    k_at = linear_k(128, 32, 4)
    assert [k_at(s) for s in range(7)] == [128, 104, 80, 56, 32, 32, 32]
    assert [linear_k(40, 32, 3)(s) for s in range(4)] == [40, 37, 35, 32]  # rounded, never below k
    assert linear_k(64, 32, 0)(0) == 32 and linear_k(32, 32, 10)(5) == 32


def test_trainer_sets_k_before_each_step_and_the_codes_follow_it():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4, backend="torch")
    trainer = Trainer(sae, torch.optim.Adam(sae.parameters(), lr=1e-3), k_schedule=linear_k(12, 4, 4))
    x = torch.randn(32, 16)
    ks = []
    for _ in range(6):
        trainer.step(x)
        ks.append(sae.k)
        assert sae(x).vals.shape == (32, sae.k)
        l0 = trainer.read_metrics()["l0"]
        assert 0 < l0 <= sae.k
    assert ks == [12, 10, 8, 6, 4, 4]


def test_subspace_energy_is_the_float64_mean_fraction_of_row_energy_inside_the_subspace():
    from flashsae.sae.diagnostics import subspace_energy_sums

    g = torch.Generator().manual_seed(0)
    d, r, n = 40, 12, 300
    V = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    W = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g)  # rows of any norm
    inside, rows = subspace_energy_sums(W, V.float()).tolist()
    W64 = W.double()
    expected = ((W64 @ V).pow(2).sum(1) / W64.pow(2).sum(1)).mean()
    assert rows == n and abs(inside / rows - float(expected)) < 1e-6
    assert abs(inside / rows - r / d) < 0.05  # random rows: about r / d of their energy
    inside, rows = subspace_energy_sums((torch.randn(n, r, generator=g).double() @ V.T).float(), V.float()).tolist()
    assert abs(inside / rows - 1) < 1e-6  # rows inside the subspace: all of it
