"""``python3 -m benchmarks.gpu_check``: the whole GPU acceptance check in one command, within a time budget.

Runs with the interpreter that starts it (on a GPU machine, its own python3 with its torch, triton
and transformers) on the source tree in place: no virtual environment, nothing fetched. Packages
and the MiniLM carried in ``--carry`` (see `benchmarks.gpu_check.carry`) are used when present.
Exit codes: 0 every judged check passed; 1 something failed, errored or ran out of time; 2 the
check cannot run here (no CUDA device, a required package missing), said in one line.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .budget import PHASES, Plan, deadline_after, supervise
from .records import Recorder, final_records, read_records, unfinished

STARTED = time.monotonic()  # the budget counts from here: start-up is part of it
REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("torch", "triton", "numpy", "safetensors", "transformers", "matplotlib", "tqdm")
GPU_BUDGET_S, DRY_RUN_BUDGET_S = 480.0, 240.0
MIN_PHASE_S = 20.0
BAD = ("fail", "error", "timeout", "killed")


class CannotRun(Exception):
    """The check cannot start on this machine; the message is the one line to print."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="output folder (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"wall-clock budget in seconds for everything (default: {GPU_BUDGET_S:.0f}; "
                        f"{DRY_RUN_BUDGET_S:.0f} with --dry-run)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases to run (default: %(default)s)")
    p.add_argument("--carry", type=Path, default=REPO / ".gpu-carry",
                   help="folder of carried wheels and the compact MiniLM (default: .gpu-carry)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU under the Triton interpreter: tests the check itself")
    args = p.parse_args(argv)
    phases = tuple(x for x in args.phases.split(",") if x)
    unknown = [x for x in phases if x not in PHASES]
    if unknown or not phases:
        p.error(f"--phases must name some of {', '.join(PHASES)}, got {args.phases!r}")
    args.phases = tuple(x for x in PHASES if x in phases)
    if args.budget_s is None:
        args.budget_s = DRY_RUN_BUDGET_S if args.dry_run else GPU_BUDGET_S
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


# ------------------------------------------------------------------------------------ preflight
def install_carried_wheels(carry: Path) -> Path | None:
    """Install ``carry/wheels/*.whl`` into ``carry/site`` (once per set of wheels); returns the site
    folder to put on the path, or None when nothing is carried."""
    wheels = sorted((carry / "wheels").glob("*.whl"))
    if not wheels:
        return None
    site, names = carry / "site", "\n".join(w.name for w in wheels)
    stamp = site / ".installed"
    if stamp.is_file() and stamp.read_text() == names:
        return site
    print(f"installing {len(wheels)} carried wheels into {site} (no index, no dependencies)", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"carried wheels not installed (the peers will be reported missing): {done.stderr.strip()[-500:]}",
              flush=True)
        return None
    stamp.write_text(names)
    return site


def preflight(args: argparse.Namespace) -> None:
    """Raise CannotRun unless the required packages are here and, for a real run, a CUDA device."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise CannotRun(f"missing Python packages: {', '.join(missing)} ({sys.executable}); "
                        "benchmarks/README.md says how to bring packages to a GPU machine")
    if args.dry_run:
        return
    import torch

    if not torch.cuda.is_available():
        raise CannotRun(f"no CUDA device: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees none; "
                        "run it on a GPU machine, or `make gpu-check-dry` for the CPU dry run")


def find_model(carry: Path) -> Path | None:
    """The MiniLM to load: the compact copy in ``carry/minilm``, else the installed embedded package."""
    compact = carry / "minilm"
    if (compact / "config.json").is_file():
        return compact
    from flashsae.sae.hf import embedded_model_path

    try:
        return embedded_model_path()
    except FileNotFoundError:
        return None


def child_env(site: Path | None, dry_run: bool) -> dict[str, str]:
    """The phases' environment: this tree (and carried packages) first on the path, unbuffered output."""
    env = dict(os.environ)
    paths = [str(REPO), *([str(site)] if site else []), *filter(None, [env.get("PYTHONPATH")])]
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


# ---------------------------------------------------------------------------------- the phases
def run_phase(phase: str, plan: Plan, args: argparse.Namespace, env: dict[str, str], model: Path | None,
              log) -> dict[str, Any]:
    """Run ``phase`` in its own process for its slice; returns how it went (for results.json)."""
    slice_s = plan.slice_for(phase)
    if slice_s < MIN_PHASE_S:
        Recorder(args.out, phase).write(check=f"{phase} phase", status="skipped",
                                        message=f"only {slice_s:.0f} s of the budget left")
        return {"slice_s": round(slice_s), "seconds": 0, "ended": "skipped: budget spent"}
    say(f"== phase {phase}: {slice_s:.0f} s (of {plan.left_s():.0f} s left)", log)
    argv = [sys.executable, "-m", "benchmarks.gpu_check.phase", phase, "--out", str(args.out),
            "--until", f"{deadline_after(slice_s - 2):.3f}"]
    argv += ["--dry-run"] if args.dry_run else []
    argv += ["--model-dir", str(model)] if model else []
    outcome = supervise(argv, slice_s, log, env=env, cwd=REPO)
    if outcome.killed or (outcome.returncode not in (0, 3)):
        for name in unfinished(read_records(args.out), phase):
            Recorder(args.out, phase).write(
                check=name, status="killed",
                message=f"the phase's process ended (exit {outcome.returncode}) during this check")
    ended = ("killed at the end of its slice" if outcome.killed else "stopped at the end of its slice"
             if outcome.timed_out else "finished" if outcome.returncode == 0 else f"exit code {outcome.returncode}")
    return {"slice_s": round(slice_s), "seconds": round(outcome.seconds, 1), "ended": ended}


def summary_lines(checks: list[dict[str, Any]]) -> list[str]:
    """The last lines printed: per phase counts, then what did not pass (at most 25)."""
    lines = []
    for phase in PHASES:
        mine = [c for c in checks if c["phase"] == phase]
        if mine:
            counts = {s: sum(c["status"] == s for c in mine) for s in dict.fromkeys(c["status"] for c in mine)}
            lines.append(f"{phase}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    bad = [c for c in checks if c["status"] in BAD]
    lines += [f"  {c['status']}: [{c['phase']}] {c['check']}: {c.get('message', '')}"[:300] for c in bad[:25]]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        preflight(args)
    except CannotRun as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        return 2
    from . import report

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in report.FILES:
        (args.out / name).unlink(missing_ok=True)
    site = None if args.dry_run else install_carried_wheels(args.carry)
    model = find_model(args.carry)
    plan = Plan(args.budget_s, args.phases, start=STARTED)
    command = shlex.join([Path(sys.executable).name, "-m", "benchmarks.gpu_check", *(argv or sys.argv[1:])])
    run: dict[str, Any] = {"command": command,
                           "plan": plan.describe(), "budget_s": args.budget_s, "dry_run": args.dry_run,
                           "carried_packages": str(site) if site else None, "model_dir": str(model) if model else None,
                           "phases": {}}
    with open(args.out / "log.txt", "a") as log:
        say(f"gpu-check: {plan.describe()}; results in {args.out}", log)
        for phase in args.phases:
            run["phases"][phase] = run_phase(phase, plan, args, child_env(site, args.dry_run), model, log)
            report.write(args.out, run)
        checks = final_records(read_records(args.out))
        say("\n".join(summary_lines(checks)) + f"\nresults: {args.out / report.MD_FILE}", log)
    return 1 if any(c["status"] in BAD for c in checks) else 0


def say(text: str, log) -> None:
    """Print ``text`` and copy it to the log."""
    print(text, flush=True)
    log.write(text + "\n")
    log.flush()
