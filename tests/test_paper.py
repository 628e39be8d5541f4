"""``flashsae paper --quick``: the whole report pipeline on toy sizes, so it cannot rot between full runs."""
from __future__ import annotations

import json

import pytest

from flashsae.sae import cli
from flashsae.sae.paper.collapse import COLLAPSE_SITES
from flashsae.sae.paper.runs import d_init_values
from flashsae.sae.paper.plan import FULL, QUICK

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
@pytest.mark.slow
def test_quick_report_has_every_part_with_figures_and_raw_results(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["paper", "--out", str(out), "--quick", "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    for heading in ("## 1. Where the collapse is", "## 2. Dead features against dictionary size",
                    "## 3. The d_init sweep", "## 4. The failure signature", "## 5. Subspace drift",
                    "## Why ASI can start worse"):
        assert heading in report
    figures = ["collapse_by_layer.png", "collapse_by_head.png", "dead_vs_size.png", "d_init_sweep.png", "drift.png",
               "calibration.png"]
    for name in figures:
        assert f"]({name})" in report and (out / name).read_bytes().startswith(PNG_MAGIC)
    assert not (out / "work").exists()  # the activations and run directories are removed
    results = json.loads((out / "results.json").read_text())
    collapse, saes = results["collapse"], results["saes"]
    assert {(r["site"], r["layer"]) for r in collapse["sites"]} == {(s, l) for s in COLLAPSE_SITES for l in range(6)}
    assert len(collapse["heads"]) == 6 * collapse["n_heads"] and collapse["head_dim"] * collapse["n_heads"] == 384
    runs = saes["runs"]
    assert set(saes["sweeps"]["size"]) == {f"{i}-x{e}" for i in ("random", "asi") for e in QUICK.expansions}
    for r in runs.values():
        assert r["tokens"] == saes["store_tokens"] == QUICK.train_tokens  # the same token budget for every run
        assert 0 <= r["dead_frac"] <= 1 and 0 < r["eval"]["fvu"] < 2 and 0 <= r["curve"][-1]["subspace_energy"] <= 1
    annealed = runs[f"asi-x{QUICK.anneal_expansion}-anneal"]["curve"]
    assert annealed[0]["k"] > QUICK.k and annealed[-1]["k"] == QUICK.k  # k really was annealed
    calibrated = runs[f"asi-x{QUICK.calibrate_expansion}-calibrated"]
    uncalibrated = runs[f"asi-x{QUICK.calibrate_expansion}"]
    assert calibrated["init_fvu"] <= uncalibrated["init_fvu"]  # the least-squares scale cannot start worse


def test_d_init_sweep_adds_the_99_percent_rank_without_repeats():
    assert d_init_values(FULL, 384, 196) == [115, 192, 196, 269, 346]
    assert d_init_values(FULL, 384, 192) == [115, 192, 269, 346]
