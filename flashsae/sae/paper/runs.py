"""The SAEs of the report: one activation store, then every sweep's training runs and held-out evaluations.

Every run is `flashsae.sae.run.driver.train` on the same store (one pass, same seed and data order, same
learning-rate rule), with the decoder's energy in the active subspace tracked, followed by
`flashsae.sae.evaluate.evaluate` spliced into the model on documents never collected for training. Each
run's directory is ``work/runs/NAME``, and its own output goes to ``work/runs/NAME.log`` (beside it:
a run directory holds nothing but the run's files).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import hf
from ..evaluate import evaluate
from ..model import TopKSAE
from ..run.config import TrainConfig, default_lr
from ..run.driver import train
from ..store import ActivationStore
from .plan import PaperPlan


@dataclass
class Data:
    """The model, its tokenizer, the site and the training store; the held-out documents for evaluation."""

    model: nn.Module
    tokenizer: Any
    point: hf.HookPoint
    store: Path
    train_docs: list[str]
    eval_docs: list[str]


def prepare_data(plan: PaperPlan, work: Path, *, progress: bool) -> Data:
    """Load the model, split the documents (the held-out ones, as `flashsae eval` picks them, are never collected
    for training) and collect the training store."""
    model, tokenizer = hf.load_model(plan.model, device="cpu")
    train_docs = list(hf.iter_texts(plan.text, documents="train"))
    eval_docs = list(hf.iter_texts(plan.text, documents="heldout"))
    point = hf.resolve_site(model, plan.site, plan.layer)
    store = work / "activations"
    if store.exists():
        shutil.rmtree(store)
    hf.collect_to_store(store, model, tokenizer, point.path, point.module, train_docs, model_name=plan.model,
                        site=plan.site, layer=plan.layer, text_source=plan.text, n_tokens=plan.train_tokens,
                        seq_len=plan.seq_len, progress=progress)
    return Data(model, tokenizer, point, store, train_docs, eval_docs)


def train_and_evaluate(plan: PaperPlan, data: Data, work: Path, name: str, expansion: int, *, init: str,
                       d_init: float | None = None, k_start: int | None = None, init_scale: str = "unit",
                       progress: bool = False) -> dict[str, Any]:
    """One SAE of ``expansion`` x d features: train it, evaluate it on the held-out documents, return the record."""
    d = ActivationStore(data.store).d_model
    n_features = expansion * d
    steps = ActivationStore(data.store).num_batches(plan.batch_size)
    anneal_steps = round(plan.anneal_fraction * steps) if k_start is not None else 0
    out = work / "runs" / name
    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(
        store=str(data.store), out=str(out), n_features=n_features, k=plan.k, batch_size=plan.batch_size, epochs=1,
        lr=plan.lr_scale * default_lr(n_features), init=init, d_init=d_init if d_init is not None else plan.d_init,
        k_start=k_start, k_anneal_steps=anneal_steps, init_scale=init_scale, track_subspace=True, aux_k=plan.aux_k,
        dead_window=plan.dead_window, log_every=plan.log_every, checkpoint_every=0, progress=progress,
        seed=plan.seed, device=plan.device, backend=plan.backend,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        summary = train(cfg)
    sae = TopKSAE.load(out / "final", device=str(next(data.model.parameters()).device))
    held_out = evaluate(sae, data.model, data.tokenizer, data.point, data.eval_docs, n_tokens=plan.eval_tokens,
                        norm_scale=summary["norm_scale"], seq_len=plan.seq_len, mean_ablation=False, progress=False)
    held_out.pop("firing_density")
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "name": name, "init": init, "expansion": expansion, "n_features": n_features, "k": plan.k,
        "k_start": k_start, "k_anneal_steps": anneal_steps, "init_scale": init_scale,
        "d_init": sae.metadata.get("d_init"), "lr": summary["lr"], "steps": summary["steps"],
        "tokens": summary["tokens"], "time_s": summary["time_s"],
        "dead_frac": summary["dead_frac"], "dead_window": summary["dead_window"],
        "init_fvu": sae.metadata["init_fvu"], "init_optimal_encoder_scale": sae.metadata["init_optimal_encoder_scale"],
        "eval": held_out, "curve": [{key: r[key] for key in ("step", "fvu", "l0", "dead_frac", "k", "subspace_energy")}
                                    for r in curve],
    }


def d_init_values(plan: PaperPlan, d: int, n99: int) -> list[float | int]:
    """The d_init sweep: the plan's fractions of d and the 99%-variance rank (a count), without repeats."""
    counts = {max(1, round(f * d)) for f in plan.d_init_sweep} | {n99}
    return sorted(counts)


def run_sweeps(plan: PaperPlan, data: Data, work: Path, n99: int, *, log: Any = print) -> dict[str, Any]:
    """Every SAE of the report; records keyed by run name, plus the names of each sweep's runs."""
    runs: dict[str, dict[str, Any]] = {}
    d = ActivationStore(data.store).d_model

    def run(name: str, expansion: int, **options: Any) -> str:
        if name not in runs:
            log(f"training {name} ({expansion * d} features)")
            runs[name] = train_and_evaluate(plan, data, work, name, expansion, **options)
            r = runs[name]
            log(f"  FVU {r['eval']['fvu']:.4f}  dead {100 * r['dead_frac']:.1f}%  "
                f"never fired on held-out {100 * r['eval']['dead_fraction']:.1f}%  {r['time_s']:.0f} s")
        return name

    default_count = max(1, round(plan.d_init * d)) if plan.d_init < 1 else int(plan.d_init)
    sweeps: dict[str, list[str]] = {"size": [], "d_init": [], "anneal": [], "calibrate": []}
    for e in plan.expansions:
        for init in ("random", "asi"):
            sweeps["size"].append(run(f"{init}-x{e}", e, init=init))
    e = plan.sweep_expansion
    for count in d_init_values(plan, d, n99):
        name = f"asi-x{e}" if count == default_count else f"asi-x{e}-d{count}"
        sweeps["d_init"].append(run(name, e, init="asi", d_init=count))
    e = plan.anneal_expansion
    for init in ("random", "asi"):
        sweeps["anneal"].append(run(f"{init}-x{e}", e, init=init))
        sweeps["anneal"].append(run(f"{init}-x{e}-anneal", e, init=init, k_start=plan.anneal_factor * plan.k))
    e = plan.calibrate_expansion
    for init in ("random", "asi"):
        sweeps["calibrate"].append(run(f"{init}-x{e}", e, init=init))
        sweeps["calibrate"].append(run(f"{init}-x{e}-calibrated", e, init=init, init_scale="calibrate"))
    return {"runs": runs, "sweeps": sweeps, "n_train_docs": len(data.train_docs), "n_eval_docs": len(data.eval_docs),
            "store_tokens": ActivationStore(data.store).n_tokens, "d_model": d,
            "default_d_init": default_count, "lr_rule": f"{plan.lr_scale:g} x 2e-4 / sqrt(F / 2^14)",
            "finite": all(math.isfinite(r["eval"]["fvu"]) for r in runs.values())}
