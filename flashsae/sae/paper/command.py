"""``flashsae paper --out DIR``: run the paper's experiments and write the report."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import sys
import time
from pathlib import Path

import torch

from ... import __version__
from ...errors import ConfigError
from .. import hf
from .collapse import measure_collapse
from .plan import FULL, QUICK, PaperPlan
from .report import write_report
from .runs import prepare_data, run_sweeps


def _expansions(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_paper_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "paper", help="reproduce the ASI paper's experiments and write a report",
        description="Measure the dimensional collapse of attention outputs (spectra per layer, site and head), "
        "then train TopK SAEs on one site: random vs ASI initialization against dictionary size, a d_init sweep, "
        "k annealing (the paper's failure case), the decoder's drift out of the active subspace, and the initial "
        "encoder scale. Writes report.md, PNG figures and results.json to --out. The defaults take about an hour "
        "on a 2-core CPU; --quick runs every part at toy sizes in a few minutes; on a GPU, scale up with "
        "--train-tokens and --expansions.",
    )
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--quick", action="store_true", help="toy sizes: every part in a few minutes")
    p.add_argument("--model", help=f"Hugging Face model name or directory (default: {FULL.model})")
    p.add_argument("--text", help=f"text source (default: {FULL.text}, the standard library's docstrings and comments)")
    p.add_argument("--site", choices=hf.SITES, help=f"SAE site (default: {FULL.site})")
    p.add_argument("--layer", type=int, help=f"SAE layer (default: {FULL.layer})")
    p.add_argument("--train-tokens", type=int, help=f"training tokens per SAE (default: {FULL.train_tokens:,})")
    p.add_argument("--rank-tokens", type=int, help=f"tokens for the spectra (default: {FULL.rank_tokens:,})")
    p.add_argument("--eval-tokens", type=int, help=f"held-out tokens per SAE (default: {FULL.eval_tokens:,})")
    p.add_argument("--expansions", type=_expansions,
                   help=f"dictionary sizes as multiples of d (default: {','.join(map(str, FULL.expansions))})")
    p.add_argument("--k", type=int, help=f"active features per token (default: {FULL.k})")
    p.add_argument("--batch-size", type=int, help=f"tokens per step (default: {FULL.batch_size})")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--keep-work", action="store_true", help="keep DIR/work (activations and every run's SAE)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    p.set_defaults(func=run_paper)


def _plan(args: argparse.Namespace) -> PaperPlan:
    plan = (QUICK if args.quick else FULL).replace(
        model=args.model, text=args.text, site=args.site, layer=args.layer, train_tokens=args.train_tokens,
        rank_tokens=args.rank_tokens, eval_tokens=args.eval_tokens, expansions=args.expansions, k=args.k,
        batch_size=args.batch_size, device=args.device,
    )
    for name in ("train_tokens", "rank_tokens", "eval_tokens", "k", "batch_size", "layer"):
        if getattr(plan, name) < (0 if name == "layer" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(plan, name)}")
    if plan.train_tokens < plan.batch_size:
        raise ConfigError(f"--train-tokens {plan.train_tokens} must be at least --batch-size {plan.batch_size}")
    expansions = set(plan.expansions)
    extra = {plan.sweep_expansion, plan.anneal_expansion, plan.calibrate_expansion} - expansions
    if extra and args.expansions is not None:  # keep the sweeps at sizes the size sweep has
        largest, smallest = max(expansions), min(expansions)
        plan = plan.replace(sweep_expansion=largest, anneal_expansion=largest, calibrate_expansion=smallest)
    return plan


def run_paper(args: argparse.Namespace) -> int:
    plan = _plan(args)
    out: Path = args.out
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    start = time.perf_counter()
    say = lambda message: print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", file=sys.stderr)  # noqa: E731
    say(f"loading {plan.model} and collecting {plan.train_tokens:,} training tokens of {plan.site} at layer {plan.layer}")
    data = prepare_data(plan, work, progress=args.progress)
    say(f"spectra of every layer and site over {plan.rank_tokens:,} tokens")
    collapse = measure_collapse(data.model, data.tokenizer, data.train_docs,
                                n_tokens=plan.rank_tokens, seq_len=plan.seq_len, progress=args.progress)
    n99 = next(r["n99"] for r in collapse["sites"] if (r["site"], r["layer"]) == (plan.site, plan.layer))
    sae = run_sweeps(plan, data, work, n99, log=say)
    device = plan.device if plan.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = {
        "command": "flashsae " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(("flashsae", "__main__.py"))
        else f"flashsae paper --out {out}{' --quick' if args.quick else ''}",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)",
        "minutes": (time.perf_counter() - start) / 60, "date": datetime.date.today().isoformat(),
        "version": __version__, "torch": torch.__version__, "plan": dataclasses.asdict(plan),
    }
    report = write_report(out, plan, collapse, sae, info)
    if not args.keep_work:
        shutil.rmtree(work)
    say(f"wrote {report}")
    return 0
