"""``python -m benchmarks.conformance``: the peers' published test suites, unpatched and with flashsae patched in.

Fetches each suite (`benchmarks.conformance.suites`), runs it twice under pytest
(`benchmarks.conformance.runner`; the patched run loads the ``flashsae_conformance`` plugin's
patch-on-construction) and writes the comparison (`benchmarks.conformance.report`) to
``benchmarks/results/conformance/`` (results.json, results.md; pytest logs under the cache).
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.conformance import report
from benchmarks.conformance.runner import REPO_ROOT, run_pytest
from benchmarks.conformance.suites import SUITES, SuiteUnavailable, source_tree, stage
from benchmarks.machine import describe

RESULTS = REPO_ROOT / "benchmarks" / "results" / "conformance"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conformance", description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="saelens,sparsify", help="comma-separated suites: saelens, sparsify")
    p.add_argument("--cache", type=Path, default=REPO_ROOT / ".conformance",
                   help="where sdists, checkouts, staged suites and pytest logs go (default: .conformance/)")
    p.add_argument("--saelens-src", type=Path, help="a local SAELens checkout (its tests/) instead of cloning")
    p.add_argument("--sparsify-src", type=Path, help="a local sparsify checkout (its tests/) instead of the sdist")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run (default: %(default)s)")
    args = p.parse_args(argv)
    args.peers = [name.strip() for name in args.peers.split(",") if name.strip()]
    unknown = sorted(set(args.peers) - set(SUITES))
    if unknown:
        p.error(f"--peers: unknown suite(s) {unknown}; choose from {sorted(SUITES)}")
    return args


def run_suite(peer: str, args: argparse.Namespace) -> dict[str, Any]:
    suite = SUITES[peer]
    entry: dict[str, Any] = {"version": suite.version, "files": list(suite.test_files)}
    try:
        tree, source = source_tree(suite, args.cache, getattr(args, f"{peer}_src"))
    except SuiteUnavailable as err:
        print(f"{peer}: not run: {err}", file=sys.stderr)
        return {**entry, "status": "unavailable", "reason": str(err)}
    staged = stage(tree, args.cache / f"{peer}-{suite.version}-suite")
    excluded = {} if torch.cuda.is_available() else dict(suite.excluded_on_cpu)
    files = [f for f in suite.test_files if (staged / f).exists()]
    entry.update(status="ran", source=source, files=files, excluded=excluded, notes=_notes())
    runs = {}
    for patched in (False, True):
        print(f"{peer}: running {'patched' if patched else 'unpatched'} ...", file=sys.stderr)
        runs[patched] = run_pytest(staged, files, list(excluded), patched, args.cache / "logs" / peer, args.timeout)
    entry.update(report.compare(runs[False][0], runs[True][0]), stats=runs[True][1])
    return entry


def _notes() -> list[str]:
    if torch.cuda.is_available():
        return []
    return ["No CUDA device: in both runs, tensors and modules the tests put on `cuda` are put on the CPU, "
            "`torch.cuda.synchronize` does nothing, and sparsify uses its CPU decoder (`SPARSIFY_DISABLE_TRITON=1`)."]


def _commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = {**describe(device), "flashsae_commit": _commit()}
    machine["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = {"machine": machine, "suites": {peer: run_suite(peer, args) for peer in args.peers}}
    report.write(results, args.out)
    print(f"wrote {args.out / 'results.md'}", file=sys.stderr)
    unexplained = [r["test"] for s in results["suites"].values() for r in s.get("regressions", []) if not r["explanation"]]
    if unexplained:
        print(f"{len(unexplained)} test(s) pass unpatched but fail patched, unexplained: {unexplained}", file=sys.stderr)
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
