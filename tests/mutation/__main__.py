"""``python -m tests.mutation``: mutation testing of the kernels, the optimizer and the trainer's loss code.

mutmut 2 (pinned by `make mutate`) writes each mutant into the source file and runs the group's
tests (`tests.mutation.groups`); it never rewrites functions into trampolines, so the source that
Triton parses for a ``@triton.jit`` kernel is the mutated source itself. The tree is copied into
one scratch directory per worker (the checkout is never mutated, and workers run side by side);
each worker has a fork server (`tests.mutation.forkserver`) so a test run costs pytest, not the
import of torch. A mutant's tests time out at ten times their unmutated run (mutmut's rule), and a
single test that runs past `TEST_TIMEOUT_S` fails, which kills the mutant.

The report (`tests.mutation.report`) goes to ``--out``: every survivor with its diff and, from
``tests/mutation/explained.toml``, why it cannot or need not be killed. The exit status is 1
when a survivor is not explained there.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import queue
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from tests.mutation.groups import GROUPS, Group
from tests.mutation.report import (
    MutantResult, RunInfo, describe_tests, load_explanations, load_run, merge_rerun, mutated_line, write_report,
)

REPO = Path(__file__).resolve().parents[2]
# Messages and other string literals are not mutated: their wording is the API tests' business.
DISABLED_TYPES = "string,fstring"
# One test past this many seconds fails (pytest-timeout), which kills its mutant: a mutant that hangs a
# kernel's loop under the interpreter costs this, not mutmut's ten times the group's whole run. The
# slowest test of any group takes a few seconds unmutated.
TEST_TIMEOUT_S = 60
STATUS = {"ok_killed": "killed", "ok_suspicious": "killed", "bad_survived": "survived", "bad_timeout": "timeout",
          "skipped": "skipped", "untested": "untested"}


def copy_tree(dest: Path) -> None:
    """The package, the tests and the project config, without caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mutmut-cache*")
    for name in ("flashsae", "tests"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")


def function_lines(path: Path, names: tuple[str, ...]) -> list[tuple[int, int]]:
    """0-based [first, last] line ranges of the functions ``names`` (``Class.method`` or ``name``) in ``path``."""
    tree = ast.parse(path.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{item.name}"] = item
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"{path}: no function {', '.join(missing)} (tests/mutation/groups.py is out of date)")
    return [(found[n].lineno - 1, found[n].end_lineno - 1) for n in names]


MUTMUT_CONFIG = '''"""mutmut's hook (written by tests.mutation): skip mutants outside the selected lines."""
import json

_RANGES = json.loads({ranges!r})


def pre_mutation(context):
    ranges = _RANGES.get(context.filename)
    if ranges is not None and not any(a <= context.current_line_index <= b for a, b in ranges):
        context.skip = True
'''


class Worker:
    """A scratch copy of the tree with its own fork server."""

    def __init__(self, root: Path, python: str) -> None:
        self.root, self.python = root, python
        copy_tree(root)
        self.socket = str(root / "forkserver.sock")
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        self.server = subprocess.Popen([python, "-m", "tests.mutation.forkserver", "serve", self.socket], cwd=root,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.server.stdout.readline().strip() != "ready":
            raise SystemExit(f"the fork server in {root} did not start")

    def close(self) -> None:
        self.server.kill()
        self.server.wait()

    def run(self, group: Group, shard: int, mutmut: list[str], log: Path) -> list[MutantResult]:
        """Every mutant of ``group.module`` (of its part ``shard`` when sharded), tested by ``group.tests``;
        mutmut's output to ``log`` and its cache next to it."""
        cache = self.root / ".mutmut-cache"
        cache.unlink(missing_ok=True)
        ranges = selected_lines(self.root / group.module, group, shard)
        config = {group.module: ranges} if ranges is not None else {}
        (self.root / "mutmut_config.py").write_text(MUTMUT_CONFIG.format(ranges=json.dumps(config)))
        runner = shlex.join([self.python, "-m", "tests.mutation.forkserver", "client", self.socket, "--",
                           "-x", "-q", "-p", "no:cacheprovider", "--timeout", str(TEST_TIMEOUT_S),
                           *group.pytest_args()])
        command = [*mutmut, "run", "--paths-to-mutate", group.module, "--runner", runner, "--tests-dir", "tests",
                   "--disable-mutation-types", DISABLED_TYPES, "--no-progress", "--simple-output"]
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(self.root)}
        with open(log, "w") as out:
            done = subprocess.run(command, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT)
        if not cache.exists() or done.returncode & 1:  # 1: mutmut's fatal error (the unmutated tests failed)
            raise RuntimeError(f"mutmut failed on {group.module} (exit {done.returncode}); see {log}")
        shutil.copy2(cache, log.with_suffix(".mutmut-cache"))
        results = read_results(self.root, cache, group.module)
        if group.shards > 1:  # the other parts' lines were skipped here and are reported by their own jobs
            results = [r for r in results if any(a <= r.line_number - 1 <= b for a, b in ranges)]
        return results


def selected_lines(path: Path, group: Group, shard: int) -> list[tuple[int, int]] | None:
    """0-based [first, last] line ranges mutated in part ``shard`` of ``group``; None: every line."""
    if group.functions:
        if group.shards > 1:
            raise ValueError(f"{group.module}: a group limited to functions is not sharded")
        return function_lines(path, group.functions)
    if group.shards == 1:
        return None
    n_lines = len(path.read_text().splitlines())
    bounds = [n_lines * i // group.shards for i in range(group.shards + 1)]
    return [(bounds[shard], bounds[shard + 1] - 1)]


def read_results(root: Path, cache: Path, module: str) -> list[MutantResult]:
    """The statuses mutmut recorded for ``module``, with each mutant's changed line."""
    with sqlite3.connect(cache) as db:
        rows = db.execute(
            "SELECT l.line, l.line_number, m.'index', m.status FROM Mutant m JOIN Line l ON m.line = l.id "
            "JOIN SourceFile f ON l.sourcefile = f.id WHERE f.filename = ? ORDER BY l.line_number, m.'index'",
            (module,),
        ).fetchall()
    return [MutantResult(module, number + 1, line, index, STATUS[status],
                         mutated_line(root / module, module, line, number, index))
            for line, number, index, status in rows]


def run_all(groups: list[Group], workers: list[Worker], mutmut: list[str], logs: Path) -> list[MutantResult]:
    """The groups' jobs (one per shard), in the groups' order, on the workers side by side."""
    todo: queue.Queue[tuple[Group, int]] = queue.Queue()
    for group in groups:
        for shard in range(group.shards):
            todo.put((group, shard))
    results: list[MutantResult] = []
    failures: list[str] = []
    lock = threading.Lock()

    def work(worker: Worker) -> None:
        while True:
            try:
                group, shard = todo.get_nowait()
            except queue.Empty:
                return
            name = group.module if group.shards == 1 else f"{group.module} (part {shard + 1} of {group.shards})"
            log = logs / (group.module.replace("/", "_") + ("" if group.shards == 1 else f".part{shard + 1}") + ".log")
            start = time.monotonic()
            try:
                found = worker.run(group, shard, mutmut, log)
            except RuntimeError as err:
                with lock:
                    failures.append(str(err))
                continue
            with lock:
                results.extend(found)
                counts = {s: sum(r.status == s for r in found) for s in ("killed", "survived", "timeout")}
                print(f"{name}: {len(found)} mutants, {counts} in {time.monotonic() - start:.0f} s", flush=True)

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit("\n".join(failures))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="groups tested side by side (default 2)")
    parser.add_argument("--only", nargs="*", default=[], help="only the groups whose module contains one of these")
    parser.add_argument("--out", default=str(REPO / "reports" / "mutation"), help="report directory")
    parser.add_argument("--logs", default=str(REPO / "runs" / "mutation-logs"), help="mutmut's output, per module")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the tests (with torch)")
    parser.add_argument("--mutmut", default=str(Path(sys.executable).with_name("mutmut")), help="mutmut 2's script")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report of the run recorded in --out again, with today's explanations")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: replace those modules' mutants in the run recorded in --out")
    args = parser.parse_args(argv)
    if args.merge and not args.only:
        parser.error("--merge needs --only (the modules to run again)")
    out, logs = Path(args.out), Path(args.logs)
    previous = load_run(out) if args.merge else None  # (read first: a missing record fails before the run)
    if args.report_only:
        results, run = load_run(out)
    else:
        groups = [g for g in GROUPS if not args.only or any(o in g.module for o in args.only)]
        logs.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="flashsae-mutation-") as scratch:
            workers = [Worker(Path(scratch) / f"worker-{i}", args.python) for i in range(max(1, args.workers))]
            try:
                results = run_all(groups, workers, [args.mutmut], logs)
            finally:
                for w in workers:
                    w.close()
        import mutmut

        run = RunInfo(
            command="make mutate" if not args.only else "python -m tests.mutation --only " + " ".join(args.only),
            date=date.today().isoformat(), minutes=round((time.monotonic() - start) / 60, 1), workers=len(workers),
            mutmut=mutmut.__version__, test_timeout_s=TEST_TIMEOUT_S, tests={g.module: describe_tests(g) for g in groups},
        )
        if previous is not None:
            results, run = merge_rerun(previous, (results, run))
    unexplained = write_report(results, run, load_explanations(), out)
    print(f"report: {out / 'README.md'}; {unexplained} unexplained survivors")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
