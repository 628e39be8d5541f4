"""The report of ``flashsae paper``: figures (PNG), ``report.md`` with the paper's numbers beside ours, and
``results.json`` with everything measured."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .collapse import COLLAPSE_SITES

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
# The paper's claims we compare with (arXiv 2508.16929), as its text states them.
PAPER = {
    "collapse": "attention outputs need about 60% of d for 99% of the variance; MLP outputs and the residual "
                "stream about 90%",
    "dead": "TopK SAE with 1M features (256x) on Llama-3.1-8B attention output: 87% dead with random "
            "initialization, under 1% with ASI, with better MSE and LM loss",
    "d_init": "d_init about half of d works (1024-2048 for d = 4096); too low hurts reconstruction, too high has "
              "no effect",
    "anneal": "ASI stops helping when training starts at a high L0 that is annealed down: features drift out of "
              "the subspace",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path.name


def plot_collapse(collapse: dict[str, Any], out: Path) -> tuple[str, str]:
    """99%-variance rank / d per layer for every site; each head's 99% rank / head_dim per layer."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for site in COLLAPSE_SITES:
        rows = sorted((r for r in collapse["sites"] if r["site"] == site), key=lambda r: r["layer"])
        axes[0].plot([r["layer"] for r in rows], [r["frac99"] for r in rows], marker="o", label=site)
        axes[1].plot([r["layer"] for r in rows], [r["erank_frac"] for r in rows], marker="o", label=site)
    axes[0].set_ylabel("99%-variance rank / d")
    axes[1].set_ylabel("entropy effective rank / d")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.05)
        ax.legend()
    sites_png = _save(fig, out / "collapse_by_layer.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    layers = sorted({h["layer"] for h in collapse["heads"]})
    grid = [[h["frac99"] for h in collapse["heads"] if h["layer"] == layer] for layer in layers]
    image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_title(f"99%-variance rank / head_dim ({collapse['head_dim']}) per head")
    fig.colorbar(image)
    return sites_png, _save(fig, out / "collapse_by_head.png")


def _series(runs: dict[str, Any], names: list[str], init: str) -> list[dict[str, Any]]:
    return sorted((runs[n] for n in names if runs[n]["init"] == init), key=lambda r: r["n_features"])


def plot_sizes(sae: dict[str, Any], out: Path) -> str:
    """Dead fraction, held-out FVU and embedding-cosine loss against dictionary size, random vs ASI."""
    plt = _plt()
    runs, names = sae["runs"], sae["sweeps"]["size"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for init, style in (("random", "o-"), ("asi", "s-")):
        rows = _series(runs, names, init)
        F = [r["n_features"] for r in rows]
        axes[0].plot(F, [100 * r["dead_frac"] for r in rows], style, label=f"{init}: dead (last window)")
        axes[0].plot(F, [100 * r["eval"]["dead_fraction"] for r in rows], style, alpha=0.5,
                     label=f"{init}: never fired on held-out")
        axes[1].plot(F, [r["eval"]["fvu"] for r in rows], style, label=init)
        axes[2].plot(F, [1 - r["eval"]["cos_spliced"] for r in rows], style, label=init)
    for ax, label in zip(axes, ("dead features (%)", "held-out FVU", "1 - embedding cosine (spliced)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("features F")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    return _save(fig, out / "dead_vs_size.png")


def plot_d_init(sae: dict[str, Any], out: Path) -> str:
    plt = _plt()
    rows = sorted((sae["runs"][n] for n in sae["sweeps"]["d_init"]), key=lambda r: r["d_init"])
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["d_init"] for r in rows]
    ax.plot(x, [100 * r["dead_frac"] for r in rows], "o-", color="tab:red", label="dead (%)")
    ax.set_xlabel("d_init")
    ax.set_ylabel("dead features (%)", color="tab:red")
    twin = ax.twinx()
    twin.plot(x, [r["eval"]["fvu"] for r in rows], "s-", color="tab:blue", label="held-out FVU")
    twin.set_ylabel("held-out FVU", color="tab:blue")
    ax.set_title(f"ASI d_init sweep, F = {rows[0]['n_features']}")
    return _save(fig, out / "d_init_sweep.png")


def plot_curves(sae: dict[str, Any], sweep: str, key: str, ylabel: str, out: Path, filename: str) -> str:
    """``key`` over training for every run of ``sweep``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in sae["sweeps"][sweep]:
        curve = sae["runs"][name]["curve"]
        ax.plot([c["step"] for c in curve], [c[key] for c in curve], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _save(fig, out / filename)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _run_rows(sae: dict[str, Any], names: list[str]) -> list[list[Any]]:
    rows = []
    for name in names:
        r = sae["runs"][name]
        rows.append([name, r["n_features"], r["d_init"] if r["init"] == "asi" else "-", f"{100 * r['dead_frac']:.1f}%",
                     f"{100 * r['eval']['dead_fraction']:.1f}%", r["eval"]["fvu"], r["eval"]["l0"],
                     1 - r["eval"]["cos_spliced"], r["curve"][-1]["subspace_energy"], r["init_fvu"]])
    return rows


RUN_HEADER = ["run", "F", "d_init", "dead (window)", "never fired (held-out)", "held-out FVU", "L0",
              "1 - cos (spliced)", "energy in subspace (end)", "FVU at init"]


def _collapse_section(collapse: dict[str, Any], figures: tuple[str, str]) -> list[str]:
    by = {(r["site"], r["layer"]): r for r in collapse["sites"]}
    layers = sorted({r["layer"] for r in collapse["sites"]})
    rows = [[layer] + [f"{by[(s, layer)]['frac99']:.2f} ({by[(s, layer)]['n99']})" for s in COLLAPSE_SITES]
            + [f"{by[('attn_out', layer)]['erank_frac']:.2f}", f"{by[('mlp_out', layer)]['erank_frac']:.2f}"]
            for layer in layers]
    below_mlp = sum(by[("attn_out", l)]["frac99"] < by[("mlp_out", l)]["frac99"] for l in layers)
    drop = [by[("attn_z", l)]["n99"] - by[("attn_out", l)]["n99"] for l in layers]
    head_sum = {l: sum(h["n99"] for h in collapse["heads"] if h["layer"] == l) for l in layers}
    mean = lambda site: sum(by[(site, l)]["frac99"] for l in layers) / len(layers)  # noqa: E731
    return [
        "## 1. Where the collapse is",
        f"Spectra of the centred activations over {collapse['n_tokens']:,} tokens, every layer; `attn_z` is the "
        "input of the attention output projection W_O (the heads' outputs side by side), `attn_out` its output. "
        "Cells: 99%-variance rank / d (count); erank is the entropy effective rank / d.",
        "",
        _table(["layer", *[f"{s} 99%" for s in COLLAPSE_SITES], "attn_out erank", "mlp_out erank"], rows),
        "",
        f"- Paper: {PAPER['collapse']}.",
        f"- Here (mean over layers of the 99% rank / d): attn_out {mean('attn_out'):.2f}, mlp_out "
        f"{mean('mlp_out'):.2f}, resid {mean('resid'):.2f}, attn_z {mean('attn_z'):.2f}. attn_out needs less of d "
        f"than mlp_out at {below_mlp} of {len(layers)} layers.",
        f"- At W_O: the 99% rank falls from attn_z to attn_out by {', '.join(map(str, drop))} dimensions "
        f"(layers {layers[0]}-{layers[-1]}). The heads' own 99% ranks add up to "
        f"{', '.join(str(head_sum[l]) for l in layers)} per layer ({collapse['n_heads']} heads of "
        f"{collapse['head_dim']} dimensions), against attn_z's {', '.join(str(by[('attn_z', l)]['n99']) for l in layers)}.",
        "",
        f"![99% rank per layer and site]({figures[0]})  ![per head]({figures[1]})",
        "",
    ]


def _compare(sae: dict[str, Any], names: list[str], key: Any) -> tuple[int, int]:
    """(sizes where ASI's ``key`` is below random's, sizes compared) over a sweep's random/ASI pairs."""
    runs = sae["runs"]
    pairs = [(runs[n], runs[n.replace("random", "asi", 1)]) for n in names if n.startswith("random")]
    return sum(key(a) < key(r) for r, a in pairs), len(pairs)


def _sae_sections(plan: Any, sae: dict[str, Any], figures: dict[str, str]) -> list[str]:
    runs, sweeps = sae["runs"], sae["sweeps"]
    fewer_dead, n = _compare(sae, sweeps["size"], lambda r: r["dead_frac"])
    better_fvu, _ = _compare(sae, sweeps["size"], lambda r: r["eval"]["fvu"])
    largest = max(plan.expansions)
    rand, asi = runs[f"random-x{largest}"], runs[f"asi-x{largest}"]
    anneal = {n: runs[n] for n in sweeps["anneal"]}
    e = plan.anneal_expansion
    gap_fixed = anneal[f"random-x{e}"]["dead_frac"] - anneal[f"asi-x{e}"]["dead_frac"]
    gap_anneal = anneal[f"random-x{e}-anneal"]["dead_frac"] - anneal[f"asi-x{e}-anneal"]["dead_frac"]
    c = plan.calibrate_expansion
    cal = {n: runs[n] for n in sweeps["calibrate"]}
    return [
        "## 2. Dead features against dictionary size",
        f"{plan.site} of layer {plan.layer}, k = {plan.k}, {sae['store_tokens']:,} training tokens (one pass, "
        f"batches of {plan.batch_size}), learning rate {sae['lr_rule']}, AuxK {'off' if not plan.aux_k else plan.aux_k}; "
        f"ASI with d_init = {sae['default_d_init']}. Dead: no firing in the last {plan.dead_window:,} training "
        f"tokens; also the features that never fired on the {plan.eval_tokens:,} held-out tokens "
        f"({sae['n_eval_docs']} documents never collected for training), where FVU, L0 and the embedding cosine "
        "of the model with the SAE spliced in (against the clean model) are measured.",
        "",
        _table(RUN_HEADER, _run_rows(sae, sweeps["size"])),
        "",
        f"- Paper: {PAPER['dead']}.",
        f"- Here: ASI leaves fewer dead features than random init at {fewer_dead} of {n} sizes and reaches a lower "
        f"held-out FVU at {better_fvu} of {n}; at the largest F ({rand['n_features']:,}, {largest}x): random "
        f"{100 * rand['dead_frac']:.1f}% dead, ASI {100 * asi['dead_frac']:.1f}%; FVU {rand['eval']['fvu']:.3f} vs "
        f"{asi['eval']['fvu']:.3f}.",
        "",
        f"![dead features, FVU and downstream loss against F]({figures['sizes']})",
        "",
        "## 3. The d_init sweep",
        f"ASI at F = {runs[sweeps['d_init'][0]]['n_features']:,} with d_init from a fraction of d up to all of the "
        "99%-variance rank of this site (measured in part 1).",
        "",
        _table(RUN_HEADER, _run_rows(sae, sorted(sweeps["d_init"], key=lambda n: runs[n]["d_init"]))),
        "",
        f"- Paper: {PAPER['d_init']}.",
        "",
        f"![d_init sweep]({figures['d_init']})",
        "",
        "## 4. The failure signature: k annealed from a high L0",
        f"F = {e * sae['d_model']:,}; k annealed linearly from {plan.anneal_factor * plan.k} down to {plan.k} over "
        f"the first {plan.anneal_fraction:.0%} of the steps, against fixed k.",
        "",
        _table(RUN_HEADER, _run_rows(sae, sweeps["anneal"])),
        "",
        f"- Paper: {PAPER['anneal']}.",
        f"- Here: ASI's dead-feature advantage over random init (percentage points) is {100 * gap_fixed:.1f} with "
        f"fixed k and {100 * gap_anneal:.1f} with k annealed.",
        "",
        "## 5. Subspace drift",
        "The mean fraction of a decoder row's energy inside span(V_active) (the top d_init directions of the "
        "activations) over training; random rows start near d_init / d.",
        "",
        f"![energy in the active subspace during training]({figures['drift']})",
        "",
        "## Why ASI can start worse: the initial scale",
        f"At F = {c * sae['d_model']:,}: the FVU of the initial SAE on the first training tokens, and the factor "
        "by which scaling the encoder would minimize it (the selection does not depend on it). `--init-scale "
        "calibrate` applies that factor.",
        "",
        _table(["run", "FVU at init", "best encoder scale at init", "held-out FVU (end)", "dead (window)"],
               [[n, r["init_fvu"], r["init_optimal_encoder_scale"], r["eval"]["fvu"], f"{100 * r['dead_frac']:.1f}%"]
                for n, r in cal.items()]),
        "",
        f"![FVU during training, unit vs calibrated initial scale]({figures['calibrate']})",
        "",
    ]


def write_report(out: Path, plan: Any, collapse: dict[str, Any], sae: dict[str, Any], info: dict[str, Any]) -> Path:
    """Figures, ``report.md`` and ``results.json`` into ``out``; returns the report's path."""
    figures = {
        "sizes": plot_sizes(sae, out), "d_init": plot_d_init(sae, out),
        "drift": plot_curves(sae, "anneal", "subspace_energy", "energy inside span(V_active)", out, "drift.png"),
        "calibrate": plot_curves(sae, "calibrate", "fvu", "training FVU", out, "calibration.png"),
    }
    lines = [
        f"# Dimensional collapse and ASI on {plan.model}, reproduced with flashsae",
        "",
        f"`{info['command']}` on {info['device']} in {info['minutes']:.1f} minutes ({info['date']}; "
        f"flashsae {info['version']}, torch {info['torch']}). Text: {plan.text} "
        f"({sae['n_train_docs']} documents for training, {sae['n_eval_docs']} held out). Every number below is "
        "measured in this run; the paper's numbers come from much larger models and dictionaries.",
        "",
        *_collapse_section(collapse, plot_collapse(collapse, out)),
        *_sae_sections(plan, sae, figures),
    ]
    report = out / REPORT_FILE
    report.write_text("\n".join(lines))
    (out / RESULTS_FILE).write_text(json.dumps({"plan": info["plan"], "info": info, "collapse": collapse,
                                                "saes": sae}, indent=1))
    return report
