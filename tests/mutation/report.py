"""The mutation report: per-module counts and every survivor, explained or not.

``tests/mutation/explained.toml`` holds the survivors that are not killed on purpose, each as
``[[survivor]]`` with ``module``, ``line`` (the source line, stripped), ``mutant`` (the mutated
line, stripped) and ``reason`` (why no test can or should kill it: an equivalent mutant, a tile
size that changes only speed, code that runs only on a GPU, ...). A survivor matches an entry by
those three texts, so line numbers may move; identical lines share one entry.
"""
from __future__ import annotations

import json
import tomllib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

EXPLAINED = Path(__file__).with_name("explained.toml")


@dataclass(frozen=True)
class MutantResult:
    """One mutant: its module, 1-based line number, source line, mutmut's index on that line, status
    (killed | survived | timeout | skipped | untested) and the mutated line."""

    module: str
    line_number: int
    line: str
    index: int
    status: str
    mutant: str


def mutated_line(path: Path, module: str, line: str, line_number: int, index: int) -> str:
    """The text of ``line`` (0-based ``line_number`` of ``path``) under mutmut's mutant ``index``."""
    from mutmut import Context, RelativeMutationID, mutate

    mutation = RelativeMutationID(line=line, index=index, line_number=line_number, filename=module)
    context = Context(mutation_id=mutation, filename=str(path), dict_synonyms=[])
    source, _ = mutate(context)
    mutated = source.split("\n")
    original = context.source.split("\n")
    if len(mutated) == len(original):
        return mutated[line_number]
    # A mutation that removed lines (a decorator): show what is left of the neighbourhood.
    return "\n".join(mutated[max(0, line_number - 1): line_number + 1]) + "  (line removed)"


def load_explanations(path: Path = EXPLAINED) -> dict[tuple[str, str, str], str]:
    """(module, stripped line, stripped mutant) -> reason."""
    entries = tomllib.loads(path.read_text()).get("survivor", []) if path.exists() else []
    return {(e["module"], e["line"].strip(), e["mutant"].strip()): e["reason"] for e in entries}


def _key(result: MutantResult) -> tuple[str, str, str]:
    return result.module, result.line.strip(), result.mutant.strip()


@dataclass(frozen=True)
class RunInfo:
    """What was run: the command, its date, minutes, workers, mutmut's version, the per-test time limit
    and each group's test selection (module -> text)."""

    command: str
    date: str
    minutes: float
    workers: int
    mutmut: str
    test_timeout_s: int
    tests: dict[str, str]
    reruns: tuple[str, ...] = ()


def merge_rerun(old: tuple[list[MutantResult], RunInfo], new: tuple[list[MutantResult], RunInfo]):
    """A recorded run with some modules run again (``new``, after tests were added): the new run's
    mutants and selections replace those modules' and the rerun is noted in the run's record."""
    (old_results, old_run), (new_results, new_run) = old, new
    modules = set(new_run.tests)
    results = [r for r in old_results if r.module not in modules] + new_results
    note = f"{', '.join(sorted(modules))}: run again on {new_run.date} ({new_run.minutes:.0f} minutes)"
    run = RunInfo(old_run.command, old_run.date, old_run.minutes, old_run.workers, old_run.mutmut,
                  old_run.test_timeout_s, {**old_run.tests, **new_run.tests}, (*old_run.reruns, note))
    return results, run


def describe_tests(group) -> str:
    """A group's selection as the report prints it."""
    return "; ".join(f"{path} -k {expr!r}" if expr else path for path, expr in group.tests)


def write_report(results: list[MutantResult], run: RunInfo, explanations: dict, out: Path) -> int:
    """README.md and results.json (the run and every mutant) in ``out``; returns the number of
    survivors without an explanation."""
    survivors = [r for r in results if r.status in ("survived", "untested")]
    unexplained = [r for r in survivors if _key(r) not in explanations]
    lines = [
        "# Mutation testing: kernels, optimizer, trainer loss code",
        "",
        f"`{run.command}` on {run.date} (mutmut {run.mutmut}, {run.workers} workers, {run.minutes:.0f} minutes). "
        "Each mutant is written into the source file and the module's test selection "
        "(tests/mutation/groups.py) runs under the Triton interpreter; a mutant times out at ten times the "
        f"unmutated run, and a single test past {run.test_timeout_s} s fails (it kills the mutant). String "
        "literals are not mutated. Survivors are explained in tests/mutation/explained.toml.",
        *(["", "Modules run again after tests were added (their rows below are from the later run):", "",
           *[f"- {note}" for note in run.reruns]] if run.reruns else []),
        "",
        "| module | tests | mutants | killed | timeout | survived (explained) | skipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for module, tests in run.tests.items():
        mine = [r for r in results if r.module == module]
        counts = Counter(r.status for r in mine)
        alive = [r for r in survivors if r.module == module]
        explained = sum(_key(r) in explanations for r in alive)
        lines.append(f"| {module} | `{tests}` | {len(mine) - counts['skipped']} | "
                     f"{counts['killed']} | {counts['timeout']} | {len(alive)} ({explained}) | {counts['skipped']} |")
    lines += ["", f"## Survivors ({len(survivors)}, {len(unexplained)} unexplained)", ""]
    for r in sorted(survivors, key=lambda r: (r.module, r.line_number, r.index)):
        reason = explanations.get(_key(r), "**UNEXPLAINED**")
        lines += [f"- `{r.module}:{r.line_number}` `{r.line.strip()}` -> `{r.mutant.strip()}`: {reason}"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines) + "\n")
    record = {"run": asdict(run), "mutants": [asdict(r) for r in results]}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    return len(unexplained)


def load_run(out: Path) -> tuple[list[MutantResult], RunInfo]:
    """The mutants and the run recorded in ``out``/results.json (to report them again with the
    explanations as they are now)."""
    record = json.loads((out / "results.json").read_text())
    run = record["run"]
    return [MutantResult(**r) for r in record["mutants"]], RunInfo(**{**run, "reruns": tuple(run.get("reruns", ()))})
