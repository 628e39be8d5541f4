"""The check's output folder, rewritten from ``records.jsonl`` after every phase and at the end.

At most 8 files: ``records.jsonl`` (every event, written as it happens), ``log.txt`` (all output),
``results.json`` (machine, versions, date, the budget and what each phase used, every check's last
record), ``results.md`` (the tables), ``step_times.png`` and ``fraction_of_floor.png``.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..report import _bytes  # noqa: E402
from .budget import PHASES  # noqa: E402
from .records import final_records, read_records  # noqa: E402

FILES = ("records.jsonl", "log.txt", "results.json", "results.md", "step_times.png", "fraction_of_floor.png")
JSON_FILE, MD_FILE, STEP_PLOT, FLOOR_PLOT = FILES[2:]


def meta_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The machine description the phases recorded (the first one on a GPU, else the first)."""
    metas = [r["meta"] for r in records if "meta" in r]
    return next((m for m in metas if m.get("device") == "cuda"), metas[0] if metas else {})


def document(out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """results.json's content: ``run`` (command, budget, phases) + the machine + every check."""
    records = read_records(out)
    checks = final_records(records)
    counts = {phase: dict(Counter(c["status"] for c in checks if c["phase"] == phase)) for phase in PHASES}
    return {"meta": {**meta_of(records), **run}, "summary": counts, "checks": checks}


def write(out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """Rewrite results.json, results.md and the plots in ``out``; returns the document."""
    doc = document(out, run)
    (out / JSON_FILE).write_text(json.dumps(doc, indent=1, default=str))
    (out / MD_FILE).write_text(markdown(doc))
    perf = [c for c in doc["checks"] if c["phase"] == "performance" and c["status"] == "pass" and "shape" in c]
    if any(c.get("op", "").startswith("step") for c in perf):
        plot_steps(perf, out / STEP_PLOT, doc["meta"])
    if any(c.get("floor_fraction") for c in perf):
        plot_floor_fractions(perf, out / FLOOR_PLOT, doc["meta"])
    return doc


# ------------------------------------------------------------------------------------ Markdown
def _ms(c: dict[str, Any]) -> str:
    return f"{c['median_ms']:.3g} ({c['min_ms']:.3g}–{c['max_ms']:.3g})"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def header(doc: dict[str, Any]) -> list[str]:
    m, v = doc["meta"], doc["meta"].get("versions", {})
    lines = [
        f"# flashsae GPU check: {m.get('device_name', '?')}"
        + (" (DRY RUN on the CPU: numbers mean nothing)" if m.get("dry_run") else ""),
        "",
        f"{m.get('date', '?')}; driver {m.get('driver')}, CUDA {m.get('cuda')}, torch {v.get('torch')}, "
        f"triton {v.get('triton')}, transformers {v.get('transformers')}, sae-lens {v.get('sae-lens')}, "
        f"eai-sparsify {v.get('eai-sparsify')}; Python {m.get('python')}. Command: `{m.get('command', '')}`.",
        "",
        f"Budget: {m.get('plan', '?')}.",
        "",
        "| phase | slice s | used s | ended | pass | fail | error | oom | skipped | timeout | killed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in PHASES:
        run = m.get("phases", {}).get(phase, {})
        n = doc["summary"].get(phase, {})
        counts = " | ".join(str(n.get(s, 0)) for s in ("pass", "fail", "error", "oom", "skipped", "timeout", "killed"))
        lines.append(f"| {phase} | {run.get('slice_s', '–')} | {run.get('seconds', '–')} | "
                     f"{run.get('ended', 'not run')} | {counts} |")
    return lines + [""]


def correctness_lines(checks: list[dict[str, Any]]) -> list[str]:
    rows = [c for c in checks if c["phase"] == "correctness"]
    if not rows:
        return []
    bad = [c for c in rows if c["status"] != "pass"]
    lines = ["## Phase 1: compiled correctness against float64 references", "",
             f"{len(rows) - len(bad)} of {len(rows)} checks passed." + (" Not passed:" if bad else ""), ""]
    lines += [f"- **{c['status']}** {c['check']}: {_cell(c.get('message', ''))}" for c in bad]
    lines += ["", "| check | status | s |", "|---|---|---|"]
    lines += [f"| {_cell(c['check'])} | {c['status']} | {c.get('seconds', '')} |" for c in rows]
    return lines + [""]


def performance_lines(checks: list[dict[str, Any]]) -> list[str]:
    perf = [c for c in checks if c["phase"] == "performance"]
    lines = ["## Phase 2: performance beside its floors", "",
             "Medians (min–max) in ms over the timed rounds; *floor* is measured in the same run: the dense encoder "
             "matmul for encoders, bytes over the measured copy bandwidth for sparse ops, their sum for steps; "
             "*× floor* is time over floor.", ""]
    by_shape: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in perf:
        if c.get("search") != "largest_f" and "shape" in c:
            by_shape[c["shape"]["id"]].append(c)
    for shape_id, rows in by_shape.items():
        lines += [f"### {shape_id}", "",
                  "| system | op | ms | floor ms | × floor | tokens/s | peak extra | params + state | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in rows:
            if c["status"] != "pass":
                lines.append(f"| {c['system']} | {c['op']} | {c['status'].upper()} | | | | | "
                             f"| {_cell(c.get('message', ''))} |")
                continue
            floor = c.get("floor_ms")
            over = f"{c['median_ms'] / floor:.2f}×" if floor else "–"
            tokens = f"{c['tokens_per_s']:,.0f}" if "tokens_per_s" in c else ""
            floor_text = f"{floor:.3g}" if floor else "–"
            lines.append(f"| {c['system']} | {c['op']} | {_ms(c)} | {floor_text} | {over} | {tokens} | "
                         f"{_bytes(c.get('peak_extra_bytes'))} | {_bytes(c.get('state_bytes'))} "
                         f"| {_cell(c.get('floor_basis', ''))} |")
        lines.append("")
    return lines + largest_f_lines(perf)


def largest_f_lines(perf: list[dict[str, Any]]) -> list[str]:
    """Per system: the largest F whose step ran and the smallest that ran out of memory (search and headline)."""
    ran: dict[str, list[int]] = defaultdict(list)
    oom: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for c in perf:
        if c.get("search") != "largest_f":
            continue
        F = c["shape"]["F"]
        if c["status"] == "pass":
            ran[c["system"]].append(F)
        elif c["status"] == "oom":
            oom[c["system"]].append((F, c.get("message", "")))
    if not ran and not oom:
        return []
    lines = ["### Largest F each system trains on the card", "",
             "| system | largest F trained | smallest F out of memory | where it ran out |", "|---|---|---|---|"]
    for system in dict.fromkeys([*ran, *oom]):
        big = max(ran[system], default=None)
        small = min(oom[system], default=None)
        lines.append(f"| {system} | {big or '–'} | {small[0] if small else 'none tried'} | "
                     f"{_cell(small[1].split(':')[0]) if small else ''} |")
    return lines + [""]


def science_lines(checks: list[dict[str, Any]]) -> list[str]:
    rows = [c for c in checks if c["phase"] == "science"]
    if not rows:
        return []
    lines = ["## Phase 3: the science on MiniLM (through the flashsae command line)", "",
             "| run | status | s | result |", "|---|---|---|---|"]
    for c in rows:
        if c["check"] == "flashsae rank" and c["status"] == "pass":
            attn = c["ranks"].get("attn_out", {})
            result = "attn_out erank / d per layer: " + ", ".join(
                f"{layer}: {r['erank_frac']:.2f}" for layer, r in attn.items())
        elif "dead_frac" in c and isinstance(c["dead_frac"], dict):
            result = f"dead: random {c['dead_frac']['random']:.4f}, ASI {c['dead_frac']['asi']:.4f}"
        elif "dead_frac" in c:
            result = f"FVU {c.get('fvu', float('nan')):.4f}, dead {c['dead_frac']:.4f}, {c.get('steps')} steps"
        else:
            result = c.get("message", "")
        lines.append(f"| {c['check']} | {c['status']} | {c.get('seconds', '')} | {_cell(result)} |")
    return lines + [""]


def markdown(doc: dict[str, Any]) -> str:
    checks = doc["checks"]
    return "\n".join(header(doc) + correctness_lines(checks) + performance_lines(checks) + science_lines(checks))


# --------------------------------------------------------------------------------------- plots
def _shapes(perf: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(c["shape"]["id"] for c in perf if c.get("search") != "largest_f"))


def _step_label(c: dict[str, Any]) -> str:
    return f"{c['system']} {c['op']}".removesuffix(" step")


def _lookup(rows: list[dict[str, Any]], key: str, shape_id: str, match: Callable[[dict[str, Any]], bool]) -> float:
    return next((c[key] for c in rows if c["shape"]["id"] == shape_id and match(c) and c.get(key)), float("nan"))


def _bar_chart(path: Path, groups: list[str], series: list[str], value: Callable[[str, str], float], *,
               ylabel: str, title: str, log: bool, tick_labels: list[str], marks: list[float] | None = None) -> None:
    """Bars of ``value(group, series)``: one cluster per group, one colour per series; ``marks``: one
    black tick per group (a floor)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * max(1, len(series))), 4.5))
    width = 0.8 / max(1, len(series))
    centres = [j + 0.4 - width / 2 for j in range(len(groups))]
    for i, name in enumerate(series):
        ax.bar([j + i * width for j in range(len(groups))], [value(g, name) for g in groups], width, label=name)
    if marks is not None:
        ax.scatter(centres, marks, marker="_", s=600, color="k", label="step floor", zorder=3)
    ax.set_xticks(centres, tick_labels, fontsize=7, rotation=0 if log else 60, ha="center" if log else "right")
    ax.set_yscale("log") if log else ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(perf: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    """Step time (median, log scale) of every system at every shape, with the step floor."""
    shapes = _shapes(perf)
    steps = [c for c in perf if c.get("op", "").startswith("step") and c.get("search") != "largest_f"]
    _bar_chart(path, shapes, list(dict.fromkeys(map(_step_label, steps))),
               lambda s, label: _lookup(steps, "median_ms", s, lambda c: _step_label(c) == label),
               ylabel="step time, ms (median)", title=f"Training step per system — {meta.get('device_name', '?')}",
               log=True, tick_labels=[s.replace("-", "\n", 3) for s in shapes],
               marks=[_lookup(steps, "floor_ms", s, lambda c: True) for s in shapes])


def plot_floor_fractions(perf: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    """floor / time (1 = at the floor) for every op with a floor, per shape."""
    rows = [c for c in perf if c.get("floor_fraction") and c.get("search") != "largest_f"]
    labels = list(dict.fromkeys(f"{c['system']}:{c['op']}" for c in rows))
    _bar_chart(path, labels, _shapes(perf),
               lambda label, s: _lookup(rows, "floor_fraction", s, lambda c: f"{c['system']}:{c['op']}" == label),
               ylabel="floor time / measured time", title=f"Fraction of the floor — {meta.get('device_name', '?')}",
               log=False, tick_labels=labels)
