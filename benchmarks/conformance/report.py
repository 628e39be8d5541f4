"""Compare a suite's unpatched and patched outcomes; write results.json and results.md."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

OUTCOMES = ("passed", "failed", "error", "skipped")

# Why a test that passes unpatched fails patched, for each such test a run has shown (by test id).
# A regression without an entry here is reported as unexplained.
EXPLANATIONS: dict[str, str] = {}


def compare(unpatched: dict[str, dict[str, str]], patched: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Counts per run, and the tests whose outcome differs (regressions: passed unpatched, not patched)."""
    ids = sorted(set(unpatched) | set(patched))
    missing = {"outcome": "missing", "message": ""}
    rows = {test: (unpatched.get(test, missing), patched.get(test, missing)) for test in ids}
    regressions = [
        {"test": t, "unpatched": a["outcome"], "patched": b["outcome"], "message": b["message"],
         "explanation": EXPLANATIONS.get(t)}
        for t, (a, b) in rows.items() if a["outcome"] == "passed" and b["outcome"] != "passed"
    ]
    fixed = [t for t, (a, b) in rows.items() if a["outcome"] != "passed" and b["outcome"] == "passed"]
    failing_both = {t: a["message"] for t, (a, b) in rows.items()
                    if a["outcome"] in ("failed", "error") and b["outcome"] in ("failed", "error")}
    return {
        "counts": {
            "unpatched": _counts(unpatched),
            "patched": _counts(patched),
        },
        "regressions": regressions,
        "passing_only_patched": fixed,
        "failing_both": failing_both,
        "tests": {t: [a["outcome"], b["outcome"]] for t, (a, b) in rows.items()},
    }


def _counts(outcomes: dict[str, dict[str, str]]) -> dict[str, int]:
    counts = Counter(o["outcome"] for o in outcomes.values())
    return {name: counts.get(name, 0) for name in OUTCOMES}


def write(results: dict[str, Any], out: Path) -> None:
    """``out/results.json`` (everything) and ``out/results.md`` (the summary)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "results.md").write_text(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# Conformance: the peers' own test suites with flashsae patched in",
        "",
        f"{machine['date']}, {machine['device']}, torch {machine['versions'].get('torch')}, flashsae at "
        f"{machine.get('flashsae_commit')}. Each suite runs twice under pytest: unpatched, then with every "
        "SAELens TopK SAE / sparsify SparseCoder patched (`patch_saelens` / `patch_sparsify`) as it is "
        "constructed. `make conformance` reproduces it (benchmarks/README.md).",
        "",
    ]
    for peer, suite in results["suites"].items():
        lines += _suite_markdown(peer, suite)
    return "\n".join(lines) + "\n"


def _suite_markdown(peer: str, suite: dict[str, Any]) -> list[str]:
    lines = [f"## {peer} {suite['version']}", ""]
    if suite["status"] != "ran":
        return lines + [f"**Not run**: {suite['reason']}. Run it where that source is reachable, or with "
                        f"`--{peer}-src` naming a checkout of the release.", ""]
    lines += [f"Tests from {suite['source']}: {', '.join(suite['files'])}.", ""]
    for path, why in suite.get("excluded", {}).items():
        lines.append(f"- Left out: `{path}`: {why}.")
    if suite.get("notes"):
        lines += [f"- {note}" for note in suite["notes"]]
    lines += ["", "| run | " + " | ".join(OUTCOMES) + " |", "|---|" + "---|" * len(OUTCOMES)]
    for run in ("unpatched", "patched"):
        counts = suite["counts"][run]
        lines.append(f"| {run} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    stats = ", ".join(f"{k}: {v}" for k, v in sorted(suite["stats"].items())) or "none"
    lines += ["", f"Patched run: {stats}.", ""]
    regressions = suite["regressions"]
    lines.append(f"**Pass unpatched, fail patched: {len(regressions)}.**")
    for r in regressions:
        lines.append(f"- `{r['test']}` ({r['patched']}): {r['explanation'] or 'UNEXPLAINED: ' + r['message']}")
    if suite["passing_only_patched"]:
        lines += ["", "Pass only patched:"] + [f"- `{t}`" for t in suite["passing_only_patched"]]
    if suite["failing_both"]:
        lines += ["", f"Fail both ways ({len(suite['failing_both'])}), first line of the unpatched failure:"]
        lines += [f"- `{t}`: {m}" for t, m in suite["failing_both"].items()]
    return lines + [""]
