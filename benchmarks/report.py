"""Raw benchmark JSON -> Markdown table + PNG plots, next to the JSON.

``python -m benchmarks.report RESULTS.json`` writes ``results.md``, ``step_time_vs_F.png`` and
``fraction_of_floor.png`` into the JSON's folder.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FLASHSAE, REPEAT, TORCH = "flashsae", "flashsae (repeat)", "torch"
PEERS = ("sae_lens", "sparsify")
SYSTEMS = (FLASHSAE, REPEAT, TORCH, *PEERS)
FLASHSAE_OPS = ("encode", "decode", "backward", "optimizer")
LABELS = {
    FLASHSAE: "flashsae",
    REPEAT: "flashsae (2nd run)",
    TORCH: "plain torch",
    "sae_lens": "SAELens TopK",
    "sparsify": "sparsify SparseCoder",
}
COLORS = {FLASHSAE: "tab:blue", REPEAT: "tab:cyan", TORCH: "tab:gray", "sae_lens": "tab:orange", "sparsify": "tab:green"}


def load(path: str | Path) -> dict[str, Any]:
    """The raw JSON, its shape list cut to the shapes that have results (a run may be filtered)."""
    doc = json.loads(Path(path).read_text())
    measured = {r["shape_id"] for r in doc["results"]}
    doc["shapes"] = [s for s in doc["shapes"] if s["id"] in measured]
    return doc


def index(doc: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(shape_id, system, op) -> record."""
    return {(r["shape_id"], r["system"], r["op"]): r for r in doc["results"]}


def _ms(rec: dict | None, spread: bool = False) -> str:
    if rec is None:
        return "–"
    if rec["status"] != "ok":
        return rec["status"].upper()
    text = f"{rec['median_ms']:.3g}"
    return f"{text} ({rec['min_ms']:.3g}–{rec['max_ms']:.3g})" if spread else text


def _median(rec: dict | None) -> float | None:
    return rec["median_ms"] if rec and rec["status"] == "ok" else None


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}×" if num and den else "–"


def shape_table(doc: dict[str, Any], shape: dict[str, Any]) -> list[str]:
    """Markdown lines for one shape: floor rows, then one row per system."""
    idx, sid = index(doc), shape["id"]
    matmul, copy = idx.get((sid, "floor", "matmul")), idx.get((sid, "floor", "copy"))
    floor_ms = _median(matmul)
    torch_ms = _median(idx.get((sid, TORCH, "step")))
    peer_ms = [m for m in (_median(idx.get((sid, p, "step"))) for p in PEERS) if m]
    best_peer = min(peer_ms) if peer_ms else None
    lines = [
        f"### B={shape['B']} d={shape['d']} F={shape['F']} (2^{shape['F'].bit_length() - 1}) k={shape['k']} {shape['dtype']}",
        "",
        f"Floor: dense encoder matmul `x @ W_enc.T` {_ms(matmul, True)} ms; "
        + (f"copy of B·k·d elements {_ms(copy, True)} ms"
           + (f" ({copy['gb_per_s']:.3g} GB/s)" if copy and copy["status"] == "ok" else "")),
        "",
        "| system | encode ms | decode ms | backward ms | optimizer ms | step ms median (min–max) | tokens/s "
        "| step / floor | speed-up vs torch | vs fastest peer | peak extra memory | params + optimizer state |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system in SYSTEMS:
        step = idx.get((sid, system, "step"))
        if step is None:
            continue
        per_op = [_ms(idx.get((sid, system, op))) if (sid, system, op) in idx else "–" for op in FLASHSAE_OPS]
        ms = _median(step)
        ok = step["status"] == "ok"
        tokens = f"{step['tokens_per_s']:,.0f}" if ok else "–"
        lines.append(
            f"| {LABELS[system]} | " + " | ".join(per_op)
            + f" | {_ms(step, True)} | {tokens} | {_ratio(ms, floor_ms)} | {_ratio(torch_ms, ms)} "
            f"| {_ratio(best_peer, ms)} | {_bytes(step.get('peak_extra_bytes')) if ok else '–'} "
            f"| {_bytes(step.get('state_bytes')) if ok else '–'} |"
        )
    return lines + [""] + encoder_table(doc, shape) + floor_table(doc, shape)


def encoder_table(doc: dict[str, Any], shape: dict[str, Any]) -> list[str]:
    """Markdown lines comparing the encoders alone: the matmul floor, matmul + torch.topk, flashsae
    (and, on CUDA, the opt-in fused encoder)."""
    idx, sid = index(doc), shape["id"]
    floor_ms = _median(idx.get((sid, "floor", "matmul")))
    flop = 2 * shape["B"] * shape["d"] * shape["F"]
    rows = [("dense matmul (floor)", idx.get((sid, "floor", "matmul"))),
            ("matmul + torch.topk", idx.get((sid, TORCH, "encode"))),
            ("flashsae topk_encode", idx.get((sid, FLASHSAE, "encode"))),
            ("flashsae topk_encode, triton-fused", idx.get((sid, FLASHSAE, "encode-fused")))]
    lines = ["Encoder alone:", "", "| encoder | ms median (min–max) | × floor | TFLOP/s | peak extra memory |",
             "|---|---|---|---|---|"]
    for label, rec in rows:
        if rec is None:
            continue
        ms = _median(rec)
        tflops = f"{flop / ms / 1e9:.3g}" if ms else "–"
        lines.append(f"| {label} | {_ms(rec, True)} | {_ratio(ms, floor_ms)} | {tflops} "
                     f"| {_bytes(rec.get('peak_extra_bytes')) if rec.get('status') == 'ok' else '–'} |")
    return lines + [""]


SPARSE_OPS = (("decode", "decode"), ("backward", "backward (both matrices)"), ("optimizer", "optimizer"))


def floor_table(doc: dict[str, Any], shape: dict[str, Any]) -> list[str]:
    """Markdown lines: flashsae's decode, backward and optimizer beside their bandwidth floors, their sum
    against the encoder floor, and the step against matmul + those floors."""
    idx, sid = index(doc), shape["id"]
    copy = idx.get((sid, "floor", "copy"))
    matmul_ms = _median(idx.get((sid, "floor", "matmul")))
    if not copy or copy["status"] != "ok":
        return []
    gbps = copy["gb_per_s"]
    lines = [f"Sparse parts against their bandwidth floor (the bytes each must move, `benchmarks/traffic.py`, over the "
             f"copy bandwidth measured above, {gbps:.3g} GB/s):", "",
             "| op | ms | bytes | floor ms | × floor |", "|---|---|---|---|---|"]
    total_ms = total_floor = 0.0
    for op, label in SPARSE_OPS:
        rec = idx.get((sid, FLASHSAE, op))
        ms = _median(rec)
        if ms is None or rec.get("bytes_moved") is None:
            return []
        floor = rec["bytes_moved"] / gbps / 1e6
        total_ms, total_floor = total_ms + ms, total_floor + floor
        lines.append(f"| {label} | {_ms(rec, True)} | {_bytes(rec['bytes_moved'])} | {floor:.3g} | {_ratio(ms, floor)} |")
    lines.append(f"| decode + backward + optimizer | {total_ms:.3g} | | {total_floor:.3g} | {_ratio(total_ms, total_floor)} |")
    step = _median(idx.get((sid, FLASHSAE, "step")))
    if step and matmul_ms:
        lines.append(f"| step (encoder matmul + the floors above) | {step:.3g} | | {matmul_ms + total_floor:.3g} "
                     f"| {_ratio(step, matmul_ms + total_floor)} |")
        lines += ["", f"Decode + backward + optimizer take {100 * total_ms / matmul_ms:.0f}% of the encoder floor "
                      f"({matmul_ms:.3g} ms); their own floors add up to {100 * total_floor / matmul_ms:.0f}% of it."]
    return lines + [""]


def largest_f_table(doc: dict[str, Any]) -> list[str]:
    """Per system and (d, k): the largest F whose step ran, and the smallest that ran out of memory."""
    shapes = {s["id"]: s for s in doc["shapes"]}
    ran: dict[tuple, list[int]] = defaultdict(list)
    oom: dict[tuple, list[int]] = defaultdict(list)
    for r in doc["results"]:
        if r["op"] != "step" or r["shape_id"] not in shapes:
            continue
        s = shapes[r["shape_id"]]
        key = (r["system"], s["d"], s["k"])
        (ran if r["status"] == "ok" else oom)[key].append(s["F"])
    keys = sorted(set(ran) | set(oom), key=lambda t: (SYSTEMS.index(t[0]) if t[0] in SYSTEMS else 99, t[1], t[2]))
    lines = ["| system | d | k | largest F trained | smallest F out of memory |", "|---|---|---|---|---|"]
    for system, d, k in keys:
        big = max(ran[(system, d, k)], default=None)
        small = min(oom[(system, d, k)], default=None)
        lines.append(f"| {LABELS.get(system, system)} | {d} | {k} | {big or '–'} | {small or 'none tried'} |")
    return lines


def spread_lines(doc: dict[str, Any]) -> list[str]:
    """How far the two flashsae step timings of one run disagree, per shape."""
    idx = index(doc)
    lines = []
    for s in doc["shapes"]:
        a, b = _median(idx.get((s["id"], FLASHSAE, "step"))), _median(idx.get((s["id"], REPEAT, "step")))
        if a and b:
            lines.append(f"- {s['id']}: {a:.3g} ms then {b:.3g} ms ({100 * (b - a) / a:+.1f}%)")
    return lines


def _load(avg: list[float] | None) -> str:
    return "/".join(f"{a:.1f}" for a in avg) if avg else "?"


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    v = meta["versions"]
    kind = "GPU" if meta["device"] == "cuda" else "CPU"
    head = [
        f"# flashsae training-step benchmark: {meta['device_name']} ({kind} measurements)",
        "",
        f"Run {meta['date']}; torch {v.get('torch')}, triton {v.get('triton')}, flashsae {v.get('flashsae')}, "
        f"sae-lens {v.get('sae-lens')}, eai-sparsify {v.get('eai-sparsify')}; Python {meta['python']}, "
        f"torch threads: {meta['torch_threads']}."
        + (f" Load average (1/5/15 min) at start {_load(meta.get('load_average_start'))}, "
           f"at end {_load(meta.get('load_average_end'))}." if meta.get("load_average_start") else "")
        + (f" CUDA {meta.get('cuda')}, driver {meta.get('driver')}." if meta["device"] == "cuda" else ""),
        f"Timer: `{meta['timer']}`; {meta['warmup_rounds']} warm-up + {meta['rounds']} timed rounds per entry, "
        "inputs rotated. Times are medians (min–max) in ms. flashsae encoder backend: "
        f"`{meta['flashsae_encoder_backend']}`.",
        "",
        "Columns: per-op times are flashsae's (`ops.topk_encode`, `ops.sparse_decode`, `loss.backward()`, "
        "`SparseAdam.step`), and plain torch's encode (matmul + `torch.topk`); *step / floor* is the step time over the dense encoder matmul alone; "
        "*speed-up* columns are the other system's step time over this row's; "
        f"*peak extra memory*: {meta['peak_memory']}.",
        "",
    ]
    body = [line for s in doc["shapes"] for line in shape_table(doc, s)]
    tail = ["## Largest F each system trained", "", *largest_f_table(doc), "",
            "## Run-to-run spread (flashsae timed twice in the run)", "", *(spread_lines(doc) or ["- none"]), ""]
    return "\n".join(head + ["## Per shape", ""] + body + tail)


def _groups(doc: dict[str, Any]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in doc["shapes"]:
        groups[(s["d"], s["k"], s["B"], s["dtype"])].append(s)
    return {key: sorted(v, key=lambda s: s["F"]) for key, v in groups.items()}


def _plot(doc: dict[str, Any], path: Path, fraction: bool) -> None:
    idx, groups = index(doc), _groups(doc)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False)
    for ax, ((d, k, B, dtype), shapes) in zip(axes[0], groups.items()):
        Fs = [s["F"] for s in shapes]
        floor = [_median(idx.get((s["id"], "floor", "matmul"))) for s in shapes]
        if not fraction:
            ax.plot(Fs, [f if f else float("nan") for f in floor], "k--", marker="x", label="floor: x @ W_enc.T")
        for system in SYSTEMS:
            ys = []
            for s, f in zip(shapes, floor):
                ms = _median(idx.get((s["id"], system, "step")))
                ys.append(float("nan") if ms is None else (f / ms if fraction and f else ms))
            if any(y == y for y in ys):
                ax.plot(Fs, ys, marker="o", color=COLORS[system], label=LABELS[system],
                        linestyle=":" if system == REPEAT else "-")
        ax.set_xscale("log", base=2)
        if fraction:
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.set_xticks(Fs)
        ax.set_title(f"d={d}, k={k}, B={B}, {dtype}")
        ax.set_xlabel("features F")
        ax.set_ylabel("floor time / step time" if fraction else "step time (ms, median)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    kind = "GPU" if doc["meta"]["device"] == "cuda" else "CPU"
    what = "Fraction of the encoder-matmul floor" if fraction else "Training step time vs F"
    fig.suptitle(f"{what} — {doc['meta']['device_name']} ({kind})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(json_path: str | Path) -> list[Path]:
    """Write results.md and the two PNGs next to ``json_path``; returns their paths."""
    json_path = Path(json_path)
    doc = load(json_path)
    out = json_path.parent
    md, steps, frac = out / "results.md", out / "step_time_vs_F.png", out / "fraction_of_floor.png"
    md.write_text(markdown(doc))
    _plot(doc, steps, fraction=False)
    _plot(doc, frac, fraction=True)
    return [md, steps, frac]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="raw results JSON written by benchmarks/bench_sae_step.py")
    args = parser.parse_args(argv)
    for path in write_report(args.results):
        print(path)


if __name__ == "__main__":
    main()
