"""The GPU acceptance check (benchmarks/gpu_check): its CPU dry run end to end, the one-line refusal
without a GPU, the budget's watchdog, the records, the compact MiniLM and the SAELens stand-in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import budget, carry, records
from benchmarks.gpu_check.report import FILES
from flashsae.kernels.registry import AUTO, backend_names

REPO = Path(__file__).resolve().parents[1]
BAD = {"fail", "error", "timeout", "killed"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", **extra)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``python -m benchmarks.gpu_check --dry-run``: every phase at tiny sizes on the CPU."""
    out = tmp_path_factory.mktemp("gpu-check-dry")
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--budget-s", "420"]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    doc = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return done, out, doc


@pytest.mark.slow
def test_dry_run_passes_every_check_and_writes_at_most_8_files(dry_run):
    done, out, doc = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and set(names) <= set(FILES), names
    assert {"results.json", "results.md", "records.jsonl", "log.txt"} <= set(names)
    bad = [c for c in doc["checks"] if c["status"] in BAD | {"skipped"}]
    assert not bad, bad
    meta = doc["meta"]
    assert meta["dry_run"] and meta["date"] and meta["versions"]["torch"] and meta["versions"]["triton"]
    assert all(meta["phases"][phase]["ended"] == "finished" for phase in budget.PHASES)


@pytest.mark.slow
def test_dry_run_covers_every_backend_dtype_and_k_in_phase_1(dry_run):
    _, _, doc = dry_run
    names = [c["check"] for c in doc["checks"] if c["phase"] == "correctness"]
    for backend in (b for b in backend_names() if b != AUTO):
        for kind in ("encoder forward", "encoder backward", "decode + backward", "SparseAdam lazy step"):
            assert any(n.startswith(f"{kind} {backend} ") for n in names), (kind, backend)
        assert any(n.startswith(f"encoder forward {backend} bf16 F*d=") for n in names)
        for dtype in ("float32", "bfloat16", "float16"):
            assert any(f"{backend} {dtype} " in n for n in names), (backend, dtype)
        for k in (1, 32):
            assert any(f"{backend} " in n and f" k={k} " in n for n in names), (backend, k)


@pytest.mark.slow
def test_dry_run_times_every_system_beside_a_floor_and_runs_the_science(dry_run):
    _, out, doc = dry_run
    perf = {(c["system"], c["op"]): c for c in doc["checks"] if c["phase"] == "performance" and "op" in c}
    assert perf[("floor", "matmul")]["median_ms"] > 0
    for system in ("flashsae[torch]", "torch", "sparsify", "sae_lens"):
        assert perf[(system, "step")]["status"] == "pass", system
    assert perf[("flashsae[torch]", "step")]["floor_ms"] > 0
    assert any(c.get("search") == "largest_f" and c["status"] == "pass" for c in doc["checks"])
    science = {c["check"]: c for c in doc["checks"] if c["phase"] == "science"}
    assert science["flashsae rank"]["ranks"]["attn_out"]["3"]["d"] == 384
    assert science["flashsae train --init asi"]["steps"] > 0
    text = (out / "results.md").read_text()
    assert "Phase 1" in text and "Phase 2" in text and "Phase 3" in text


def test_without_cuda_a_real_run_fails_fast_in_one_line(tmp_path):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu-check: no CUDA device"), done.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out").exists()


def test_make_gpu_check_without_cuda_says_why_without_a_traceback(tmp_path):
    done = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}", f"GPU_OUT={tmp_path / 'out'}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1 and ours[0].startswith("gpu-check: no CUDA device"), done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_bad_arguments_are_refused_by_name(tmp_path):
    cases = ((["--phases", "speed"], "--phases must name"), (["--budget-s", "0"], "--budget-s must be positive"))
    for args, message in cases:
        command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path), *args]
        done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr


# ------------------------------------------------------------------------------- budget, watchdog
def test_plan_splits_the_budget_and_passes_unused_time_on():
    plan = budget.Plan(400.0)
    first = plan.planned()
    assert sum(first.values()) == pytest.approx(400.0 - plan.reserve_s)
    assert first["performance"] > first["correctness"] > first["science"]
    assert plan.slice_for("correctness") == pytest.approx(first["correctness"], rel=1e-3)
    plan.start -= first["correctness"]  # correctness used its whole slice: performance gets its planned one
    assert plan.slice_for("performance") == pytest.approx(first["performance"], rel=1e-3)
    plan.start += first["correctness"] - 10.0  # correctness ended after 10 s: the later phases share the rest
    later = plan.slice_for("performance")
    assert later > first["performance"]
    assert later == pytest.approx((390.0 - plan.reserve_s) * budget.SHARES["performance"]
                                  / (budget.SHARES["performance"] + budget.SHARES["science"]), rel=1e-3)
    plan.start -= 1000.0
    assert plan.slice_for("science") == 0.0


def test_watchdog_stops_a_phase_at_the_end_of_its_slice(tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        outcome = budget.supervise([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                                   1.0, log, grace_s=5.0)
    assert outcome.timed_out and not outcome.killed and outcome.seconds < 10
    assert "up" in (tmp_path / "log.txt").read_text()


def test_watchdog_kills_a_phase_that_ignores_the_request_to_stop(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    with open(tmp_path / "log.txt", "w") as log:
        outcome = budget.supervise([sys.executable, "-c", code], 1.0, log, grace_s=1.0)
    assert outcome.timed_out and outcome.killed and outcome.returncode is None and outcome.seconds < 10


def test_a_check_interrupted_at_the_end_of_its_slice_is_recorded_as_a_timeout(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from benchmarks.gpu_check.budget import SliceExpired, deadline_after, raise_on_sigterm
        from benchmarks.gpu_check.records import Recorder
        raise_on_sigterm()
        rec = Recorder({str(tmp_path)!r}, "correctness")
        rec.check("quick", lambda: None, until=deadline_after(60))
        try:
            rec.check("slow", lambda: time.sleep(60), until=deadline_after(60))
        except SliceExpired:
            sys.exit(3)
    """)
    with open(tmp_path / "log.txt", "w") as log:
        outcome = budget.supervise([sys.executable, "-c", script], 4.0, log, env=_env(), cwd=REPO, grace_s=10.0)
    assert outcome.returncode == 3 and not outcome.killed
    final = {r["check"]: r for r in records.final_records(records.read_records(tmp_path))}
    assert final["quick"]["status"] == "pass" and final["slow"]["status"] == "timeout"


def test_records_keep_failures_errors_and_skips_and_the_phase_goes_on(tmp_path):
    rec = records.Recorder(tmp_path, "performance")
    until = budget.deadline_after(60)

    def fails():
        assert 1 + 1 == 3, "arithmetic is off"

    def breaks():
        raise ValueError("bad value")

    rec.check("fails", fails, until=until)
    rec.check("breaks", breaks, until=until)
    rec.check("measures", lambda: {"median_ms": 1.5, "status": "oom", "message": "step: out of memory"}, until=until)
    rec.check("too long", lambda: None, until=until, min_s=120.0)
    rec.write(check="cut off", status="start")
    with open(tmp_path / records.RECORDS_FILE, "a") as f:
        f.write('{"phase": "perf')  # a line torn by a kill
    all_records = records.read_records(tmp_path)
    final = {r["check"]: r for r in records.final_records(all_records)}
    assert final["fails"]["status"] == "fail" and "arithmetic is off" in final["fails"]["message"]
    assert final["breaks"]["status"] == "error" and final["breaks"]["message"] == "ValueError: bad value"
    assert final["measures"]["status"] == "oom" and final["measures"]["median_ms"] == 1.5
    assert final["too long"]["status"] == "skipped"
    assert records.unfinished(all_records, "performance") == ["cut off"]


# ------------------------------------------------------------------------- carried model, peers
def test_carry_selection_names_the_wheels_of_each_peer():
    assert carry.selection("model") == (True, [])
    model, wheels = carry.selection("peers")
    assert not model and "eai-sparsify==1.3.3" in wheels and "sae-lens==6.54.12" in wheels
    assert len(wheels) == len(set(wheels))
    with pytest.raises(SystemExit, match="--what takes some of"):
        carry.selection("model,weights")


@pytest.mark.model
def test_compact_minilm_is_under_50_mib_and_gives_the_same_activations(tmp_path):
    from flashsae.sae.hf import load_model

    path = carry.write_model(tmp_path / "minilm")
    assert carry.size_of(path) < 50 << 20
    compact, tokenizer = load_model(str(path))
    full, full_tokenizer = load_model()
    batch = tokenizer(["Sparse autoencoders find features.", "def f(x): return x"], return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], full_tokenizer(["Sparse autoencoders find features.", "def f(x): return x"],
                                                         return_tensors="pt", padding=True)["input_ids"])
    assert compact.dtype == torch.float32
    with torch.no_grad():
        a, b = compact(**batch).last_hidden_state, full(**batch).last_hidden_state
    assert (a - b).norm() / b.norm() < 1e-2


def test_saelens_algorithm_equals_the_sae_lens_step():
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    from benchmarks.shapes import Shape
    from benchmarks.systems import SAELensTopKAlgorithm

    shape = Shape(9, 16, 64, 4, "float32")
    torch.manual_seed(0)
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, dtype="float32", device="cpu"))
    ours = SAELensTopKAlgorithm(shape, "cpu")
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(ours, name).copy_(getattr(theirs, name) + 0.01 * torch.randn_like(getattr(theirs, name)))
            getattr(theirs, name).copy_(getattr(ours, name))
    x = torch.randn(9, 16)
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    theirs.training_forward_pass(step).loss.backward()
    ours.loss(x).backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, msg=name)
