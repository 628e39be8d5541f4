"""Schedules: k annealing and learning-rate warm-up and decay, their values and the trainer applying them; the subspace energy metric."""
from __future__ import annotations

import pytest
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


# ---------------------------------------------------------------------------------------------
# Learning-rate warm-up and decay


def test_lr_factor_warms_up_linearly_then_holds():
    from flashsae.sae.schedules import lr_factor

    at = lr_factor(10, warmup_steps=4)
    assert [at(s) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert at(50) == 1.0


def test_lr_factor_decays_linearly_or_by_cosine_over_the_last_steps_to_the_final_fraction():
    import math

    from flashsae.sae.schedules import lr_factor

    linear = lr_factor(8, decay="linear", decay_steps=4, final_fraction=0.2)
    assert [round(linear(s), 12) for s in range(8)] == [1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    cosine = lr_factor(8, warmup_steps=2, decay="cosine", decay_steps=4, final_fraction=0.0)
    expected = [0.5, 1.0, 1.0, 1.0] + [(1 + math.cos(math.pi * p / 4)) / 2 for p in range(1, 5)]
    assert [cosine(s) for s in range(8)] == pytest.approx(expected, abs=1e-15)
    assert cosine(7) == 0.0 and cosine(100) == 0.0
    # decay_steps None: the whole run after the warm-up; overlapping phases take the smaller factor.
    whole = lr_factor(5, warmup_steps=1, decay="linear", final_fraction=0.0)
    assert [whole(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    overlap = lr_factor(4, warmup_steps=4, decay="linear", decay_steps=4, final_fraction=0.0)
    assert [overlap(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("bad, named", [
    (dict(total_steps=0), "total_steps"), (dict(warmup_steps=-1), "warmup_steps"), (dict(decay="step"), "decay"),
    (dict(decay_steps=-2), "decay_steps"), (dict(final_fraction=1.5), "final_fraction"),
])
def test_lr_factor_rejects_bad_arguments_by_name(bad, named):
    from flashsae.sae.schedules import lr_factor

    args = {"total_steps": 10, **bad}
    with pytest.raises((TypeError, ValueError), match=named):
        lr_factor(args.pop("total_steps"), **args)


def test_trainer_scales_each_groups_rate_from_the_rate_it_was_built_with():
    from flashsae.sae.schedules import lr_factor

    torch.manual_seed(0)
    sae = TopKSAE(8, 32, 2, backend="torch")
    opt = torch.optim.Adam([{"params": [sae.W_enc, sae.b_enc], "lr": 1e-2},
                            {"params": [sae.W_dec, sae.b_dec], "lr": 4e-3}])
    trainer = Trainer(sae, opt, lr_schedule=lr_factor(6, warmup_steps=2, decay="linear", decay_steps=2,
                                                      final_fraction=0.5))
    seen = []
    for _ in range(6):
        trainer.step(torch.randn(16, 8))
        seen.append(trainer.current_lrs())
    factors = [0.5, 1.0, 1.0, 1.0, 0.75, 0.5]
    assert [lr for lrs in seen for lr in lrs] == pytest.approx([lr * f for f in factors for lr in (1e-2, 4e-3)])
    assert trainer.read_metrics()["lr"] == pytest.approx(5e-3)


@pytest.mark.usefixtures("one_thread")
def test_a_run_with_warmup_and_cosine_decay_logs_its_rates_and_resumes_to_identical_weights(tmp_path):
    import json

    from flashsae.sae.run.config import TrainConfig
    from flashsae.sae.run.driver import train
    from flashsae.sae.schedules import lr_factor
    from tests.resumed_runs import resume_from_older_checkpoint
    from tests.synthetic import synthetic_activations, write_store

    store = write_store(tmp_path / "store", synthetic_activations(1200, 16, rank=6, seed=3), layer=0,
                        shard_tokens=500)
    settings = dict(store=str(store), n_features=64, k=4, batch_size=100, epochs=2, log_every=1, lr=1e-2,
                    checkpoint_every=8, progress=False, backend="torch", lr_warmup_steps=5, lr_decay="cosine",
                    lr_decay_steps=10, lr_final_fraction=0.05)
    full = tmp_path / "full"
    summary = train(TrainConfig(out=str(full), **settings))
    assert summary["steps"] == 24 and summary["lr"] == 1e-2
    logged = [json.loads(line)["lr"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    factor = lr_factor(24, warmup_steps=5, decay="cosine", decay_steps=10, final_fraction=0.05)
    assert logged == pytest.approx([1e-2 * factor(s) for s in range(24)], rel=1e-12)
    run_json = json.loads((full / "run.json").read_text())
    assert run_json["config"]["lr_decay"] == "cosine" and run_json["config"]["lr_warmup_steps"] == 5

    cut = tmp_path / "cut"  # resumed from step 16, inside the decay
    resume_from_older_checkpoint(full, cut, (24, 16))
    resumed = [json.loads(line)["lr"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert resumed == logged
