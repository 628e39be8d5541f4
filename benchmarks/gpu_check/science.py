"""Phase 3: the science on the embedded MiniLM, through the real command line (`flashsae.sae.cli.main`).

``flashsae rank`` (spectra and effective rank of every layer and site), then two short
``flashsae train`` runs on MiniLM layer 3 attn_out that differ only in the decoder's start: random
and Active Subspace Initialization (d_init = d/2, AuxK off, so dead features stay dead). They share
the seed, the data order and one activation store. The claim checked: ASI leaves fewer dead
features than the random start. Run directories go to the phase's scratch folder; the records keep
the numbers.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from flashsae.sae import cli
from flashsae.sae.rank import RANK_FILE
from flashsae.sae.run.driver import SUMMARY_FILE

from .phase import Context

MODEL_HINT = "bring the compact MiniLM: `make gpu-carry` (benchmarks/README.md, 'Bringing packages to a GPU machine')"
MIN_RUN_S = 15.0
SUMMARY_KEYS = ("fvu", "mse", "l0", "dead_frac", "never_fired_frac", "steps", "tokens", "time_s")


def _cli(argv: list[str]) -> None:
    code = cli.main(argv)
    assert code == 0, f"flashsae {' '.join(argv)} exited with {code}"


def rank(ctx: Context) -> dict[str, Any]:
    """``flashsae rank`` over every layer and site; returns the effective ranks it wrote."""
    out = ctx.scratch / "rank"
    _cli(["rank", "--model", str(ctx.model_dir), "--n-tokens", str(ctx.profile.rank_tokens),
          "--device", ctx.profile.device, "--out", str(out), *ctx.profile.rank_args])
    report = json.loads((out / RANK_FILE).read_text())
    return {"n_tokens": report.get("n_tokens"), "ranks": report["ranks"]}


def train(ctx: Context, init: str) -> dict[str, Any]:
    """A short ``flashsae train`` with ``--init init``; returns its summary's numbers."""
    p = ctx.profile
    out = ctx.scratch / init
    _cli(["train", "--model", str(ctx.model_dir), "--site", "attn_out", "--layer", "3",
          "--n-tokens", str(p.train_tokens), "--n-features", str(p.train_features), "--k", str(p.train_k),
          "--batch-size", str(p.train_batch), "--epochs", str(p.train_epochs), "--init", init, "--d-init", "0.5",
          "--aux-k", "0", "--seed", "0", "--device", p.device, "--checkpoint-every", "0", "--no-progress",
          "--cache", str(ctx.scratch / "activations"), "--out", str(out)])
    summary = json.loads((Path(out) / SUMMARY_FILE).read_text())
    return {key: summary[key] for key in SUMMARY_KEYS if key in summary}


def asi_beats_random(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The claim: ASI's dead fraction is below the random start's (both runs must have finished)."""
    random, asi = results.get("random"), results.get("asi")
    if not (random and asi):
        return {"status": "skipped", "message": "needs both training runs, which did not both finish"}
    assert asi["dead_frac"] < random["dead_frac"], (
        f"ASI left {asi['dead_frac']:.4f} of the features dead, random init {random['dead_frac']:.4f}")
    return {"dead_frac": {"random": random["dead_frac"], "asi": asi["dead_frac"]},
            "fvu": {"random": random.get("fvu"), "asi": asi.get("fvu")}}


def run(ctx: Context) -> None:
    rec = ctx.recorder
    if ctx.model_dir is None:
        for name in ("flashsae rank", "flashsae train --init random", "flashsae train --init asi", "ASI vs random"):
            rec.write(check=name, status="skipped", message=f"the embedded MiniLM is not here; {MODEL_HINT}")
        return
    rec.check("flashsae rank", partial(rank, ctx), until=ctx.until, min_s=MIN_RUN_S)
    results: dict[str, dict[str, Any]] = {}
    for init in ("random", "asi"):
        done = rec.check(f"flashsae train --init {init}", partial(train, ctx, init), until=ctx.until, min_s=MIN_RUN_S)
        if done["status"] == "pass":
            results[init] = {key: done[key] for key in SUMMARY_KEYS if key in done}
    rec.check("ASI vs random", partial(asi_beats_random, results), until=ctx.until)
