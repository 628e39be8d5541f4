"""Run directories: every run has an identity, nothing of another run is overwritten, pruned or resumed,
and a resumed run's metrics continue without repeated steps. Runs are in-process on a synthetic store."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from flashsae.sae.cli import main
from flashsae.sae.run import checkpoints, rundir
from flashsae.sae.run.metrics_log import METRICS_FILE, truncate_metrics
from tests.synthetic import synthetic_activations, write_store

# 1500 tokens in batches of 100: 15 steps an epoch, 30 in two; checkpoints every 5 steps.
RUN = ["--n-features", "64", "--k", "4", "--batch-size", "100", "--epochs", "2", "--log-every", "5",
       "--checkpoint-every", "5", "--no-progress", "--backend", "torch", "--asi-tokens", "200"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x = synthetic_activations(1500, 16, rank=6, seed=8)
    return write_store(tmp_path_factory.mktemp("rundir") / "store", x, layer=0, shard_tokens=400)


def train(store: Path, out: Path, *extra: str, capsys=None) -> tuple[int, list[str]]:
    """``flashsae train`` in this process: (exit code, its stderr lines when ``capsys`` is given)."""
    if capsys is not None:
        capsys.readouterr()
    code = main(["train", "--store", str(store), "--out", str(out), *RUN, *extra])
    return code, (capsys.readouterr().err.strip().splitlines() if capsys is not None else [])


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (relative path -> bytes)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_run_records_its_identity_in_run_json_its_checkpoints_and_its_summary(store, tmp_path):
    out = tmp_path / "run"
    assert train(store, out)[0] == 0
    record = json.loads((out / rundir.RUN_FILE).read_text())
    assert len(record["run_id"]) == 12 and record["config_hash"] == rundir.config_hash(record["config"])
    assert record["config"]["n_features"] == 64 and record["config"]["overwrite"] is False
    for path in checkpoints.list_checkpoints(out / checkpoints.CHECKPOINTS_DIR):
        manifest = json.loads((path / checkpoints.MANIFEST_FILE).read_text())
        assert manifest["run_id"] == record["run_id"]
        assert checkpoints.load_checkpoint(path)["trainer"].run_id == record["run_id"]
    assert json.loads((out / rundir.SUMMARY_FILE).read_text())["run_id"] == record["run_id"]
    assert json.loads((out / "final" / "cfg.json").read_text())["metadata"]["run_id"] == record["run_id"]


def test_the_config_hash_ignores_exactly_the_options_a_resumed_run_may_change():
    from flashsae.sae.run.config import TrainConfig

    base = rundir.config_hash(TrainConfig())
    assert rundir.config_hash(TrainConfig(out="elsewhere", log_every=7, progress=False, device="cpu")) == base
    assert rundir.config_hash(TrainConfig(n_features=512)) != base
    assert rundir.config_hash(TrainConfig(seed=1)) != base


def test_a_new_run_into_another_runs_directory_is_refused_in_one_line_and_changes_nothing(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(store, out)[0] == 0
    before = snapshot(out)
    code, err = train(store, out, "--n-features", "32", capsys=capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"flashsae train: error: --out {out} already holds a finished run with other options")
    assert "--n-features 64 there, 32 here" in err[0] and "--overwrite" in err[0]
    assert snapshot(out) == before


def test_rerunning_the_same_command_is_refused_and_points_to_resume_or_overwrite(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(store, out)[0] == 0
    code, err = train(store, out, capsys=capsys)
    assert code == 2 and len(err) == 1 and "a finished run with these options" in err[0], err
    assert "--overwrite to replace it" in err[0] and "--resume" not in err[0]  # a finished run has nothing to resume
    (out / rundir.SUMMARY_FILE).unlink()  # as if it had been stopped after its checkpoints
    shutil.rmtree(out / rundir.FINAL_DIR)
    code, err = train(store, out, capsys=capsys)
    assert code == 2 and "an unfinished run with these options" in err[0] and f"--resume {out}" in err[0]


def test_a_directory_of_other_files_is_refused_even_with_overwrite(store, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        code, err = train(store, out, *extra, capsys=capsys)
        assert code == 2 and len(err) == 1 and "holds files of no flashsae run (notes.txt)" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_another_runs_results_and_only_the_new_runs_checkpoints_remain(store, tmp_path):
    out = tmp_path / "run"
    assert train(store, out, "--epochs", "4")[0] == 0  # its checkpoints reach step 60
    old_id = json.loads((out / rundir.RUN_FILE).read_text())["run_id"]
    assert train(store, out, "--n-features", "32", "--overwrite")[0] == 0
    record = json.loads((out / rundir.RUN_FILE).read_text())
    assert record["run_id"] != old_id and record["config"]["n_features"] == 32
    kept = checkpoints.list_checkpoints(out / checkpoints.CHECKPOINTS_DIR)
    assert [p.name for p in kept] == [checkpoints.checkpoint_name(30), checkpoints.checkpoint_name(25)]
    assert steps(out) == [5, 10, 15, 20, 25, 30]  # the old run's 60 steps are gone, not mixed in
    resumed = checkpoints.load_checkpoint(rundir.latest_run_checkpoint(out))
    assert resumed["config"]["n_features"] == 32


def test_checkpoints_of_another_run_are_neither_pruned_nor_picked(tmp_path):
    from flashsae import TopKSAE

    root = tmp_path / checkpoints.CHECKPOINTS_DIR

    def save(step: int, run_id: str) -> None:
        state = checkpoints.TrainerState(step=step, epoch=0, batch=step, norm_scale=1.0, tokens=step, firing={},
                                         rng=checkpoints.capture_rng(), run_id=run_id)
        sae = TopKSAE(4, 8, 2)
        checkpoints.save_checkpoint(root, sae=sae, optimizer=torch.optim.Adam(sae.parameters()), state=state,
                                    config={})

    for step in (100, 200):
        save(step, "old")
    for step in (1, 2, 3):
        save(step, "new")
    names = [p.name for p in checkpoints.list_checkpoints(root)]
    assert names == [checkpoints.checkpoint_name(s) for s in (200, 100, 3, 2)]  # only "new" was pruned
    assert checkpoints.latest_checkpoint(tmp_path, run_id="new").name == checkpoints.checkpoint_name(3)
    assert checkpoints.latest_checkpoint(tmp_path, run_id="old").name == checkpoints.checkpoint_name(200)
    with pytest.raises(FileNotFoundError, match="of run other"):
        checkpoints.latest_checkpoint(tmp_path, run_id="other")


def test_a_resumed_run_continues_its_metrics_without_repeating_steps(store, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train(store, full)[0] == 0
    assert train(store, cut)[0] == 0
    # As if the run had died after step 27: its newest checkpoint (30) and results are gone, its metrics
    # reach step 25 and end in a line cut short.
    shutil.rmtree(cut / checkpoints.CHECKPOINTS_DIR / checkpoints.checkpoint_name(30))
    shutil.rmtree(cut / rundir.FINAL_DIR)
    (cut / rundir.SUMMARY_FILE).unlink()
    lines = (cut / METRICS_FILE).read_text().splitlines()
    (cut / METRICS_FILE).write_text("\n".join(lines[:5]) + '\n{"step": 27, "tok')
    assert main(["train", "--resume", str(cut)]) == 0
    assert steps(cut) == steps(full) == [5, 10, 15, 20, 25, 30]
    last = {name: [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()][-1]
            for name, out in (("cut", cut), ("full", full))}
    for record in last.values():
        record.pop("tokens_per_s")
    assert last["cut"] == pytest.approx(last["full"])


def test_truncate_metrics_keeps_records_up_to_the_step_and_drops_a_torn_line(tmp_path):
    records = [{"step": s, "fvu": 1.0 / s} for s in (5, 10, 15, 20)]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 2')
    assert truncate_metrics(tmp_path, 12) == 3
    assert [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()] == records[:2]
    assert truncate_metrics(tmp_path / "nothing-here", 5) == 0


def test_a_directory_whose_run_never_trained_is_taken_over(store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.RUN_FILE).write_text(json.dumps({"run_id": "abc", "config_hash": "0", "config": {}}))
    (out / rundir.CACHE_DIR).mkdir()  # a collection that never finished
    assert train(store, out)[0] == 0
    assert json.loads((out / rundir.RUN_FILE).read_text())["run_id"] != "abc"


def test_resume_refuses_a_directory_whose_run_record_disagrees_with_its_checkpoint(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(store, out, "--epochs", "1")[0] == 0
    record = json.loads((out / rundir.RUN_FILE).read_text())
    record["config_hash"] = "0" * 16
    record["config"]["seed"] = 5
    (out / rundir.RUN_FILE).write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records another configuration than its newest checkpoint" in err[0], err
    assert "--seed 5 there, 0 here" in err[0]


def test_an_out_directory_that_cannot_be_written_is_one_line(store, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = train(store, blocker / "run", capsys=capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"flashsae train: error: --out {blocker / 'run'}: cannot")

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, err = train(store, tmp_path / "ro", capsys=capsys)
    assert code == 2 and err == [f"flashsae train: error: --out {tmp_path / 'ro'}: cannot write there "
                                 "(Read-only file system)"]
