"""The mutation-testing driver (tests/mutation) without mutmut: its groups select real tests, its explanations
name real source lines, its line filter and its fork server work. `make mutate` itself installs mutmut."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.mutation.__main__ import MUTMUT_CONFIG, function_lines, selected_lines
from tests.mutation.forkserver import client
from tests.mutation.groups import GROUPS, Group
from tests.mutation.report import MutantResult, RunInfo, load_explanations, load_run, merge_rerun, write_report

REPO = Path(__file__).resolve().parents[1]


def test_pytest_args_keep_each_expression_to_its_own_tests():
    group = Group("m.py", (("tests/a.py::test_x", "fast"), ("tests/a.py", ""), ("tests/b.py", "c or d")))
    assert group.pytest_args() == [
        "tests/a.py::test_x", "tests/a.py", "tests/b.py", "-k", "(test_x and (fast)) or (a) or (b and (c or d))",
    ]


def test_every_group_names_an_existing_module_and_functions():
    modules = [g.module for g in GROUPS]
    assert len(modules) == len(set(modules))
    for group in GROUPS:
        assert (REPO / group.module).is_file(), group.module
        for path, _ in group.tests:
            assert (REPO / path.split("::")[0]).is_file(), path
        if group.functions:  # raises SystemExit naming a function that moved
            ranges = function_lines(REPO / group.module, group.functions)
            assert all(0 <= first < last for first, last in ranges)


def test_every_explained_survivor_is_a_line_of_its_module():
    group_modules = {g.module for g in GROUPS}
    explanations = load_explanations()
    assert explanations
    for (module, line, mutant), reason in explanations.items():
        assert module in group_modules, module
        source = {raw.strip() for raw in (REPO / module).read_text().splitlines()}
        assert line in source, f"{module}: no line {line!r} (tests/mutation/explained.toml is out of date)"
        assert mutant != line and reason.strip(), (module, line)


def test_the_mutmut_hook_skips_lines_outside_the_selected_functions():
    namespace: dict = {}
    exec(MUTMUT_CONFIG.format(ranges=json.dumps({"m.py": [[3, 5], [9, 9]]})), namespace)

    class Context:
        def __init__(self, filename, line):
            self.filename, self.current_line_index, self.skip = filename, line, False

    for filename, line, skipped in [("m.py", 2, True), ("m.py", 3, False), ("m.py", 5, False), ("m.py", 6, True),
                                    ("m.py", 9, False), ("m.py", 10, True), ("other.py", 0, False)]:
        context = Context(filename, line)
        namespace["pre_mutation"](context)
        assert context.skip is skipped, (filename, line)


_COUNT_SELECTIONS = """
import json, sys
import pytest
from tests.mutation.groups import GROUPS, _name

class Count:
    def pytest_collection_finish(self, session):
        self.n = len(session.items)

counts = {}
for group in GROUPS:
    for path, expr in group.tests:
        keyword = f"{_name(path)} and ({expr})" if expr else _name(path)
        count = Count()
        status = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", path,
                              "-k", keyword], plugins=[count])
        counts[f"{group.module} {path} -k {expr!r}"] = (int(status), getattr(count, "n", 0))
json.dump(counts, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_every_test_selection_of_every_group_selects_tests(tmp_path):
    """Each (path, -k) pair of a group selects at least one test: a renamed test or parameter would
    otherwise drop silently out of the selection while the rest of the group still passes."""
    out = tmp_path / "counts.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", _COUNT_SELECTIONS, str(out)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    counts = json.loads(out.read_text())
    assert len(counts) == sum(len(g.tests) for g in GROUPS)
    empty = {name: c for name, c in counts.items() if c[0] != 0 or c[1] == 0}
    assert not empty, empty


def _wait_for_server(server: subprocess.Popen, path: Path) -> None:
    assert server.stdout.readline().strip() == "ready"
    for _ in range(100):
        if path.exists():
            return
        time.sleep(0.05)
    raise AssertionError("the fork server did not listen")


def test_the_fork_server_reports_passing_and_failing_pytest_runs(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        def test_passes():
            assert 1 + 1 == 2

        def test_fails():
            assert 1 + 1 == 3
    """))
    path = tmp_path / "server.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "tests.mutation.forkserver", "serve", str(path)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        _wait_for_server(server, path)
        common = ["-q", "-p", "no:cacheprovider", "test_sample.py"]
        assert client(str(path), [*common, "-k", "passes"]) == 0
        assert client(str(path), [*common, "-k", "fails"]) == 1
        assert client(str(path), [*common, "-k", "no_such_test"]) == 1  # an empty selection is a failure
        assert client(str(path), [*common, "-k", "passes"]) == 0  # the server outlives its children
    finally:
        server.kill()
        server.wait()


def test_a_recorded_run_is_reported_again_with_new_explanations(tmp_path):
    """`--report-only` rewrites the README from results.json: the same mutants and run, the
    explanations as they are now (an explanation added after the run turns its survivor explained)."""
    survivor = MutantResult("flashsae/m.py", 3, "a = 1", 0, "survived", "a = 2")
    results = [survivor, MutantResult("flashsae/m.py", 4, "b = a + 1", 0, "killed", "b = a - 1")]
    run = RunInfo("make mutate", "2026-01-01", 42.0, 2, "2.5.1", 60, {"flashsae/m.py": "tests/test_m.py"})
    assert write_report(results, run, {}, tmp_path) == 1
    assert "**UNEXPLAINED**" in (tmp_path / "README.md").read_text()
    again, again_run = load_run(tmp_path)
    assert again == results and again_run == run
    reason = "Equivalent: a is never read."
    assert write_report(again, again_run, {("flashsae/m.py", "a = 1", "a = 2"): reason}, tmp_path) == 0
    text = (tmp_path / "README.md").read_text()
    assert reason in text and "**UNEXPLAINED**" not in text and "42 minutes" in text
    assert "| flashsae/m.py | `tests/test_m.py` | 2 | 1 | 0 | 1 (1) | 0 |" in text


def test_a_rerun_of_some_modules_replaces_only_their_mutants():
    """`--only M --merge`: module M's mutants and selection come from the rerun, every other module's
    from the recorded run, and the record names the rerun."""
    kept = MutantResult("flashsae/a.py", 1, "x = 1", 0, "survived", "x = 2")
    stale = MutantResult("flashsae/b.py", 1, "y = 1", 0, "survived", "y = 2")
    fresh = MutantResult("flashsae/b.py", 1, "y = 1", 0, "killed", "y = 2")
    first = RunInfo("make mutate", "2026-01-01", 60.0, 2, "2.5.1", 60, {"flashsae/a.py": "t_a", "flashsae/b.py": "t_b"})
    again = RunInfo("python -m tests.mutation --only b.py", "2026-01-02", 5.0, 2, "2.5.1", 60, {"flashsae/b.py": "t_b2"})
    results, run = merge_rerun(([kept, stale], first), ([fresh], again))
    assert results == [kept, fresh]
    assert run.command == "make mutate" and run.minutes == 60.0
    assert run.tests == {"flashsae/a.py": "t_a", "flashsae/b.py": "t_b2"}
    assert run.reruns == ("flashsae/b.py: run again on 2026-01-02 (5 minutes)",)


def test_the_parts_of_a_sharded_group_cover_every_line_once(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("".join(f"x{i} = {i}\n" for i in range(101)))
    for shards in (1, 2, 3):
        group = Group("m.py", (("tests/test_m.py", ""),), shards=shards)
        parts = [selected_lines(source, group, shard) for shard in range(shards)]
        if shards == 1:
            assert parts == [None]  # every line
            continue
        covered = [line for ranges in parts for a, b in ranges for line in range(a, b + 1)]
        assert covered == list(range(101))
    sharded_functions = Group("m.py", (("tests/test_m.py", ""),), functions=("f",), shards=2)
    with pytest.raises(ValueError, match="not sharded"):
        selected_lines(source, sharded_functions, 0)
