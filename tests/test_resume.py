"""Exact resume after SIGKILL, fallback past broken checkpoints, config checks, and torchrun end to end.

Every run is a real ``python -m flashsae train`` subprocess on a small synthetic activation store
(no transformer), with one intra-op thread so that the runs' arithmetic is identical.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flashsae.sae.run import checkpoints
from tests.synthetic import synthetic_activations, write_store

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RUN = ["--n-features", "1024", "--k", "8", "--batch-size", "64", "--epochs", "6", "--checkpoint-every", "20",
       "--log-every", "1000", "--no-progress", "--backend", "torch", "--aux-k", "16", "--dead-window", "2000"]
TIMEOUT_S = 120


def synthetic_store(directory: Path, n: int = 4000, d: int = 32, seed: int = 0) -> Path:
    x = synthetic_activations(n, d, rank=12, seed=seed, offset=1.5, density=0.3)
    return write_store(directory, x, layer=0, shard_tokens=900)


def flashsae_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "flashsae", "train", *args]


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert not check or done.returncode == 0, f"{cmd} failed:\n{done.stderr[-3000:]}"
    return done


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return synthetic_store(tmp_path_factory.mktemp("resume") / "store")


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(flashsae_train("--store", str(store), "--out", str(out), *RUN))
    return out


def test_run_killed_mid_training_resumes_to_identical_weights(store, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(flashsae_train("--store", str(store), "--out", str(out), *RUN), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not list((out / checkpoints.CHECKPOINTS_DIR).glob(f"step-*/{checkpoints.MANIFEST_FILE}")):
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists(), "the run finished before it was killed"
    resumed = run(flashsae_train("--resume", str(out)))
    assert "resumed from" in resumed.stderr
    assert_same_weights(final_weights(out), final_weights(uninterrupted))


def test_broken_newest_checkpoints_fall_back_to_the_previous_good_one(uninterrupted, tmp_path):
    out = tmp_path / "broken"
    (out / checkpoints.CHECKPOINTS_DIR).mkdir(parents=True)
    kept = checkpoints.list_checkpoints(uninterrupted / checkpoints.CHECKPOINTS_DIR)
    assert len(kept) == 2
    for path in kept:
        subprocess.run(["cp", "-r", str(path), str(out / checkpoints.CHECKPOINTS_DIR)], check=True)
    newest, previous = (out / checkpoints.CHECKPOINTS_DIR / p.name for p in kept)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    partial = out / checkpoints.CHECKPOINTS_DIR / checkpoints.checkpoint_name(10**7)  # a write that never finished
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")

    resumed = run(flashsae_train("--resume", str(out)))
    assert f"{weights} has" in resumed.stderr and "truncated" in resumed.stderr
    notes = [line for line in resumed.stderr.splitlines() if "skipping a broken checkpoint" in line]
    assert len(notes) == 2 and all(line.startswith("note: skipping a broken checkpoint: ") for line in notes)
    assert "UserWarning" not in resumed.stderr and "warnings.warn" not in resumed.stderr
    assert f"{partial / checkpoints.MANIFEST_FILE} is missing" in resumed.stderr
    assert f"resumed from {previous}" in resumed.stderr
    assert_same_weights(final_weights(out), final_weights(uninterrupted))


def test_corrupt_checkpoint_is_rejected_by_its_hash(uninterrupted, tmp_path):
    copy = tmp_path / checkpoints.checkpoint_name(5)
    subprocess.run(["cp", "-r", str(checkpoints.latest_checkpoint(uninterrupted)), str(copy)], check=True)
    checkpoints.verify_checkpoint(copy)
    data = bytearray((copy / checkpoints.OPTIMIZER_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / checkpoints.OPTIMIZER_FILE).write_bytes(bytes(data))
    with pytest.raises(checkpoints.CheckpointError, match=r"optimizer\.pt is corrupt: sha256"):
        checkpoints.verify_checkpoint(copy)
    with pytest.raises(checkpoints.CheckpointError, match="no intact checkpoint"):
        checkpoints.latest_checkpoint(tmp_path)


def test_resume_with_another_config_is_a_clear_error(uninterrupted, capsys):
    from flashsae.sae.cli import main

    code = main(["train", "--resume", str(uninterrupted), "--n-features", "512"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--n-features 512 differs from the checkpoint's n_features=1024" in err[0]


def test_resume_takes_the_checkpoints_config_and_a_resumable_change(uninterrupted):
    from flashsae.sae.cli import build_parser
    from flashsae.sae.run.command import config_from_args

    argv = ["train", "--resume", str(uninterrupted), "--log-every", "7", "--n-features", "1024"]
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    assert (cfg.log_every, cfg.n_features, cfg.k, cfg.aux_k) == (7, 1024, 8, 16)
    assert cfg.out == cfg.resume == str(uninterrupted)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "flashsae", "train"]


@pytest.mark.parametrize("parallel", ["feature", "data"])
def test_parallel_run_resumes_from_a_mid_run_checkpoint_to_identical_weights(store, tmp_path, parallel):
    """SparseAdam's state in a checkpoint of two ranks (feature parallel: each rank's own shard; data
    parallel: rank 0's copy of the replicated state): resuming the older of the two kept checkpoints
    (the newer one and the final SAE removed, as if the run had died after that checkpoint) under
    torchrun ends with the uninterrupted run's weights. AuxK is on in the data-parallel run."""
    args = ["--store", str(store), "--n-features", "96", "--k", "4", "--batch-size", "128", "--epochs", "1",
            "--log-every", "1000", "--no-progress", "--backend", "torch", "--checkpoint-every", "10",
            "--aux-k", "0" if parallel == "feature" else "8", "--dead-window", "1000", "--parallel", parallel]
    full = tmp_path / "full"
    run([*TORCHRUN, "--out", str(full), *args])
    kept = checkpoints.list_checkpoints(full / checkpoints.CHECKPOINTS_DIR)
    assert [p.name for p in kept] == [checkpoints.checkpoint_name(30), checkpoints.checkpoint_name(20)]
    files = {p.name for p in kept[1].iterdir()}
    if parallel == "feature":
        assert {checkpoints.optimizer_shard_file(0), checkpoints.optimizer_shard_file(1)} <= files
    else:
        assert checkpoints.OPTIMIZER_FILE in files
        state = checkpoints.load_checkpoint(kept[1])["optimizer"]["state"]
        steps = [s["step"] for s in state.values() if s["step"].numel() == 96]
        assert steps and all(0 < int(t.max()) <= 20 and int(t.min()) < 20 for t in steps), "lazy per-row counts"

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / checkpoints.CHECKPOINTS_DIR / checkpoints.checkpoint_name(30))
    resumed = run([*TORCHRUN, "--resume", str(cut)])
    assert f"resumed from {cut / checkpoints.CHECKPOINTS_DIR / checkpoints.checkpoint_name(20)}" in resumed.stderr
    assert_same_weights(final_weights(cut), final_weights(full))

    if parallel == "feature":
        single = run(flashsae_train("--resume", str(cut)), check=False)
        assert single.returncode == 2 and "feature-parallel checkpoint" in single.stderr


@pytest.mark.parametrize("parallel", ["data", "feature"])
def test_torchrun_two_ranks_match_one_process(store, tmp_path, parallel):
    # 768 features fired by 4 x 128 slots a step: many are dead after the 1000-token window, so AuxK
    # runs. Feature parallel runs without it here: a dead feature whose pre-activation sits at the
    # ReLU's zero within fp32 rounding (slices of W_enc round differently) fires in one run and not
    # in the other, and Adam turns that into a full step; tests/test_distributed.py checks its AuxK
    # on exact arithmetic instead.
    aux_k = "0" if parallel == "feature" else "8"
    common = ["--store", str(store), "--n-features", "768", "--k", "4", "--batch-size", "128", "--epochs", "1",
              "--log-every", "10", "--no-progress", "--backend", "torch", "--checkpoint-every", "10",
              "--aux-k", aux_k, "--dead-window", "1000"]
    single = tmp_path / "single"
    run(flashsae_train("--out", str(single), *common, "--parallel", "none"))
    metrics = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["dead_frac"] > 0 and (metrics[-1]["aux_loss"] > 0) == (aux_k != "0")
    dist_out = tmp_path / parallel
    run([*TORCHRUN, "--out", str(dist_out), *common, "--parallel", parallel])
    a, b = final_weights(single), final_weights(dist_out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    assert checkpoints.list_checkpoints(dist_out / checkpoints.CHECKPOINTS_DIR)  # rank 0 wrote them
    dist_metrics = [json.loads(line) for line in (dist_out / "metrics.jsonl").read_text().splitlines()]
    for got, expected in zip(dist_metrics, metrics, strict=True):
        assert math.isclose(got["aux_loss"], expected["aux_loss"], rel_tol=1e-4), (got, expected)


def test_bf16_mixed_precision_run_resumes_to_identical_weights_and_master_bits(store, tmp_path):
    """--dtype bfloat16 on the CPU: the optimizer's master low bits go into the checkpoint, so a run
    resumed from its older checkpoint ends bit for bit where the uninterrupted one did."""
    from flashsae.sae.run.config import TrainConfig
    from flashsae.sae.run.driver import train

    settings = dict(store=str(store), n_features=256, k=4, batch_size=128, epochs=1, log_every=1000,
                    checkpoint_every=10, progress=False, backend="torch", aux_k=4, dead_window=1000,
                    dtype="bfloat16")
    full = tmp_path / "full"
    train(TrainConfig(out=str(full), **settings))
    kept = checkpoints.list_checkpoints(full / checkpoints.CHECKPOINTS_DIR)
    state = checkpoints.load_checkpoint(kept[0])["optimizer"]["state"]
    assert all(s["master_low"].dtype == torch.int16 for s in state.values() if s["exp_avg"].dim() == 2)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / checkpoints.CHECKPOINTS_DIR / kept[0].name)
    from flashsae.sae.cli import main

    assert main(["train", "--resume", str(cut)]) == 0
    weights = final_weights(full)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert_same_weights(final_weights(cut), weights)


def test_a_run_resumed_where_auto_means_triton_continues_with_the_triton_kernels(tmp_path, monkeypatch):
    """--backend auto is Triton on a GPU and torch on the CPU, so a run checkpointed on one machine may
    resume on the other. Here the first steps run on the torch backend and the rest, resumed from the
    checkpoint with "auto" meaning Triton (the interpreter), continue from the saved SparseAdam state
    and firing counts with the Triton kernels; the weights end where the all-torch run's do, up to the
    kernels' different fp32 rounding."""
    from flashsae.kernels import registry
    from flashsae.sae.cli import main

    store = write_store(tmp_path / "store", synthetic_activations(640, 16, rank=6, seed=3, offset=1.0, density=0.4),
                        layer=0, shard_tokens=320)
    args = ["--store", str(store), "--n-features", "64", "--k", "4", "--batch-size", "64", "--epochs", "1",
            "--checkpoint-every", "4", "--log-every", "1000", "--no-progress", "--aux-k", "4", "--dead-window", "128",
            "--backend", "auto"]
    assert main(["train", "--out", str(tmp_path / "torch"), *args]) == 0
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "torch", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / checkpoints.CHECKPOINTS_DIR / checkpoints.checkpoint_name(8))

    calls = {"topk_encode": 0, "topk_encode_with_aux": 0, "sparse_adam_step_": 0}
    triton = registry.get_backend("triton", "cpu")

    def counted(name):
        def call(*a, **kw):
            calls[name] += 1
            return getattr(triton, name)(*a, **kw)
        return call

    counting = dataclasses.replace(triton, **{name: counted(name) for name in calls})
    monkeypatch.setitem(registry.AUTO_BY_DEVICE_TYPE, "cpu", "triton")
    with registry.override_backend("triton", counting):
        assert main(["train", "--resume", str(cut)]) == 0
    # Steps 5-10 on Triton: an encoder call per forward (with AuxK on, one call selecting both), four
    # parameters per Adam step.
    assert calls["topk_encode"] + calls["topk_encode_with_aux"] >= 6 and calls["topk_encode_with_aux"] > 0
    assert calls["sparse_adam_step_"] == 6 * 4
    expected = final_weights(tmp_path / "torch")
    for name, weights in final_weights(cut).items():
        torch.testing.assert_close(weights, expected[name], rtol=1e-4, atol=1e-5, msg=name)
