"""``flashsae eval``: how well a trained SAE reconstructs its site, and what splicing it in does downstream.

Reconstruction, over the eval tokens (the real, non-special tokens, exactly the rows
`hf.collect_activations` yields and an SAE is trained on), in the SAE's input units
(``norm_scale * x``):
  - FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, MSE per element, L0 (firing features per token),
  - dead features: the fraction that never fired over the eval tokens, and a firing-density histogram.

Downstream, three or four forward passes per batch with a hook on the site (a module's output or input):
  - clean: unchanged;
  - spliced: the activation replaced by ``sae(norm_scale * out).x_hat / norm_scale``;
  - zero-ablated: replaced by zeros; mean-ablated: replaced by its mean over the eval tokens.
A transcoder is spliced in place of the computation it learned: its target activation (the MLP's
output for mlp_in -> mlp_out) is replaced by ``transcoder(norm_scale * input) / target_norm_scale``,
its input read in the same forward pass; the reconstruction metrics and the ablations are those of
the target. A BatchTopK SAE is evaluated in eval mode: its JumpReLU threshold encodes each token
alone. Replacement happens at the positions the SAE was trained on: real, non-special tokens. Special
tokens ([CLS]/[SEP], BOS) keep their clean output unless ``splice_special_tokens``; padding is never
touched (it cannot reach real positions: masked keys in encoders, later positions in causal LMs).
Causal LMs report the next-token cross-entropy over all real positions (clean, spliced, ablated) and
the fraction of the loss gap the SAE recovers, ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``;
encoders report the cosine similarity of each sequence's mean-pooled (over the attention mask)
last hidden state with the clean one, averaged over sequences.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import device_or_default, require_int
from ..errors import ConfigError, InputError, reraise_as
from . import hf
from .atomic import atomic_write, make_output_dir
from .diagnostics import FiringTracker, plot_firing_density
from .hf import is_causal_lm
from .hf.collect import forward_kwargs, text_batches
from .model import TopKSAE

EVAL_FILE = "eval.json"
DENSITY_PLOT = "firing_density.png"


class _ReconstructionStats:
    """Running sums (float64) for FVU, MSE and L0, plus the firing tracker; inputs in the SAE's units."""

    def __init__(self, sae: TopKSAE, device: torch.device) -> None:
        self.n = 0
        self.d = sae.d_out
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(sae.d_out, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.tracker = FiringTracker(sae.n_features, window=1 << 62, device=device)

    def update(self, x: Tensor, x_hat: Tensor, vals: Tensor, idx: Tensor) -> None:
        """x (the target: the input itself for an autoencoder), x_hat: [n, d_out]; vals, idx: [n, k]."""
        x64 = x.double()
        self.n += x.shape[0]
        self.sq_err += (x_hat.double() - x64).square().sum()
        self.sum_x += x64.sum(0)
        self.sum_sq += x64.square().sum()
        self.active += (vals > 0).sum()
        self.tracker.update(vals, idx)

    def result(self) -> dict[str, Any]:
        n = max(self.n, 1)
        total_var = float(self.sum_sq - self.sum_x.square().sum() / n)
        fired = self.tracker.fire_count > 0
        return {
            "fvu": float(self.sq_err) / total_var if total_var > 0 else float("nan"),
            "mse": float(self.sq_err) / (n * self.d),
            "l0": float(self.active) / n,
            "dead_fraction": float((~fired).double().mean()),
            "n_dead": int((~fired).sum()),
        }


def _next_token_ce(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over positions whose input and target are both real tokens, and their count."""
    valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
    loss = nn.functional.cross_entropy(
        logits[:, :-1][valid].float(), input_ids[:, 1:][valid], reduction="sum")
    return float(loss), int(valid.sum())


def _pooled(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over the attention mask of hidden [B, T, d] -> [B, d] fp32."""
    m = attention_mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def evaluate(
    sae: TopKSAE,
    model: nn.Module,
    tokenizer: Any,
    module: nn.Module | hf.HookPoint,
    texts: Iterable[str],
    *,
    n_tokens: int,
    norm_scale: float = 1.0,
    seq_len: int = 128,
    batch_size: int = 16,
    splice_special_tokens: bool = False,
    mean_ablation: bool = True,
    progress: bool = True,
    target: hf.HookPoint | None = None,
    target_norm_scale: float = 1.0,
) -> dict[str, Any]:
    """Evaluate ``sae`` on the output of ``module`` (a submodule of ``model``, or a `hf.HookPoint`: a module's
    output or input) over about ``n_tokens`` tokens; a transcoder's on its ``target`` `hf.HookPoint`
    (required for a transcoder), predicted from ``module``'s activation, with ``target_norm_scale``.

    Whole batches of ``batch_size`` windows of <= ``seq_len`` tokens are read until at least
    ``n_tokens`` real tokens were seen (the count is reported). ``norm_scale``: the SAE sees
    ``norm_scale * x`` for the module's output x. Returns a dict of plain numbers (see the module
    docstring): n_tokens, n_sequences, fvu, mse, l0, dead_fraction, n_dead, n_features, k, then either
    ce_clean / ce_spliced / ce_zero_ablated / ce_recovered (+ ce_mean_ablated / ce_recovered_mean) for
    causal LMs or cos_spliced / cos_zero_ablated (+ cos_mean_ablated) for encoders; plus
    "firing_density": fp64 [F] tensor (fraction of eval tokens each feature fired on).
    """
    for name, value in (("n_tokens", n_tokens), ("seq_len", seq_len), ("batch_size", batch_size)):
        require_int(name, value)
    for name, value in (("norm_scale", norm_scale), ("target_norm_scale", target_norm_scale)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if sae.arch.transcoder != (target is not None):
        raise ValueError("a transcoder is evaluated at its target: give target=HookPoint" if target is None else
                         "target is a transcoder's; this SAE reconstructs its own input")
    was_training = sae.training
    sae.eval()
    try:
        return _evaluate(sae, model, tokenizer, module, texts, n_tokens=n_tokens, norm_scale=norm_scale,
                         seq_len=seq_len, batch_size=batch_size, splice_special_tokens=splice_special_tokens,
                         mean_ablation=mean_ablation, progress=progress, target=target,
                         target_norm_scale=target_norm_scale)
    finally:
        sae.train(was_training)


def _evaluate(
    sae: TopKSAE, model: nn.Module, tokenizer: Any, module: nn.Module | hf.HookPoint, texts: Iterable[str], *,
    n_tokens: int, norm_scale: float, seq_len: int, batch_size: int, splice_special_tokens: bool,
    mean_ablation: bool, progress: bool, target: hf.HookPoint | None, target_norm_scale: float,
) -> dict[str, Any]:
    """`evaluate` with checked arguments and the SAE in eval mode."""
    source = module if isinstance(module, hf.HookPoint) else hf.HookPoint("", module)
    point = source if target is None else target  # where the activation is replaced
    batches = text_batches(tokenizer, texts, seq_len, batch_size)
    causal = is_causal_lm(model)
    device = next(model.parameters()).device
    sae_device = sae.W_dec.device
    scale = float(norm_scale)
    out_scale = scale if target is None else float(target_norm_scale)
    stats = _ReconstructionStats(sae, sae_device)
    extra = forward_kwargs(model)
    where: dict[str, Tensor] = {}  # the current batch's splice mask [B, T] on the model's device

    def check(out: Tensor, width: int, what: str) -> None:
        if out.dim() != 3 or tuple(out.shape[:2]) != tuple(where["mask"].shape):
            raise ValueError(f"the hooked module returned {tuple(out.shape)}; expected [batch, seq, d]")
        if out.shape[-1] != width:
            raise ValueError(f"the SAE has {what}={width} but the hooked module outputs d={out.shape[-1]}")

    def remember_source(activation: Tensor) -> None:
        check(activation, sae.d_model, "d_model")
        where["source"] = activation

    def splice(out: Tensor) -> Tensor:
        check(out, sae.d_out, "d_out" if target is not None else "d_model")
        mask = where["mask"]
        if target is not None and "source" not in where:
            raise ValueError(f"the transcoder's input {source.path} did not run before its target {target.path}")
        x = (out if target is None else where.pop("source"))[mask].to(sae_device, sae.dtype) * scale
        y = x if target is None else out[mask].to(sae_device, sae.dtype) * out_scale
        rec = sae(x)
        stats.update(y, rec.x_hat, rec.vals, rec.idx)
        new = out.clone()
        new[mask] = (rec.x_hat / out_scale).to(out.device, out.dtype)
        return new

    def ablate(value: Tensor | None) -> Callable[[Tensor], Tensor]:
        def replace(out: Tensor) -> Tensor:
            check(out, sae.d_out, "d_out" if target is not None else "d_model")
            new = out.clone()
            new[where["mask"]] = 0 if value is None else value.to(out.device, out.dtype)
            return new
        return replace

    def run(inputs: dict[str, Tensor], replace: Callable[[Tensor], Tensor] | None):
        with contextlib.ExitStack() as stack:
            if replace is splice and target is not None:
                stack.enter_context(source.capture(remember_source))
            if replace is not None:
                stack.enter_context(point.replace(replace))
            out = model(**inputs, **extra)
        return out.logits if causal else (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    def score(output: Tensor, inputs: dict[str, Tensor], clean: Tensor | None):
        """Summed CE and its count (causal) or summed cosine with ``clean`` pooled embeddings and B."""
        if causal:
            return _next_token_ce(output, inputs["input_ids"], inputs["attention_mask"])
        pooled = _pooled(output, inputs["attention_mask"])
        if clean is None:
            return pooled
        return float(nn.functional.cosine_similarity(pooled, clean, dim=-1).sum()), pooled.shape[0]

    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0}
    count = 0
    seen = 0
    kept: list[tuple[dict[str, Tensor], Tensor, Tensor | None]] = []
    bar = tqdm(total=n_tokens, unit="tok", desc="evaluating", disable=not progress)
    try:
        for input_ids, attention_mask, special in batches:
            mask = attention_mask.bool() if splice_special_tokens else attention_mask.bool() & ~special
            where["mask"] = mask.to(device)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
            clean_out = run(inputs, None)
            if causal:
                value, n = score(clean_out, inputs, None)
                sums["clean"] += value
                count += n
                clean_ref = None
            else:
                clean_ref = score(clean_out, inputs, None)
                count += input_ids.shape[0]
            del clean_out
            for key, replace in (("spliced", splice), ("zero", ablate(None))):
                sums[key] += score(run(inputs, replace), inputs, clean_ref)[0]
            kept.append((inputs, where["mask"], clean_ref))
            n_new = int(mask.sum())
            seen += n_new
            bar.update(min(n_new, n_tokens - bar.n))  # the last batch may pass n_tokens; the bar stops at it
            if seen >= n_tokens:
                break
    finally:
        bar.close()
    if seen == 0:
        raise InputError("the texts yielded no tokens to evaluate on")

    if mean_ablation:
        mean = (stats.sum_x / stats.n / out_scale).float()
        for inputs, mask, clean_ref in kept:
            where["mask"] = mask
            sums["mean"] += score(run(inputs, ablate(mean)), inputs, clean_ref)[0]

    result: dict[str, Any] = {"n_tokens": stats.n, "n_sequences": sum(i["input_ids"].shape[0] for i, _, _ in kept),
                              "n_features": sae.n_features, "k": sae.k, "norm_scale": scale,
                              **({"target_norm_scale": out_scale} if target is not None else {}),
                              "splice_special_tokens": splice_special_tokens, **stats.result()}
    if causal:
        ce = {key: value / max(count, 1) for key, value in sums.items()}
        result.update({"downstream": "next_token_ce", "ce_clean": ce["clean"], "ce_spliced": ce["spliced"],
                       "ce_zero_ablated": ce["zero"],
                       "ce_recovered": _recovered(ce["zero"], ce["spliced"], ce["clean"])})
        if mean_ablation:
            result.update({"ce_mean_ablated": ce["mean"],
                           "ce_recovered_mean": _recovered(ce["mean"], ce["spliced"], ce["clean"])})
    else:
        cos = {key: value / max(count, 1) for key, value in sums.items()}
        result.update({"downstream": "embedding_cosine", "cos_spliced": cos["spliced"],
                       "cos_zero_ablated": cos["zero"]})
        if mean_ablation:
            result["cos_mean_ablated"] = cos["mean"]
    result["firing_density"] = stats.tracker.firing_density().cpu()
    return result


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    """(ablated - spliced) / (ablated - clean): 1 when splicing costs nothing, 0 when it is as bad as ablating."""
    gap = ablated - clean
    return (ablated - spliced) / gap if gap != 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Command line


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` to ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "eval", help="reconstruction quality, dead features and downstream effect of a trained SAE",
        description="Evaluate a flashsae checkpoint: FVU, L0 and dead features over the eval tokens, a firing-"
        "density histogram, and the effect of splicing the reconstruction into the model at its site against the "
        "clean model and the zero- and mean-ablated site (next-token loss for causal LMs, cosine similarity of mean-"
        "pooled embeddings for encoders). Model, site, hook, text, sequence length and norm scale default to the "
        "checkpoint's metadata. By default only the text's held-out documents are read (one in "
        f"{hf.HELDOUT_EVERY}, chosen by their hash), which flashsae train never collects, so no token was trained "
        f"on. Writes {EVAL_FILE} and {DENSITY_PLOT} to --out (default: CHECKPOINT/eval).",
    )
    p.add_argument("checkpoint", type=Path, help="flashsae checkpoint directory (cfg.json + model.safetensors)")
    p.add_argument("--model", default=None, help="Hugging Face model id or directory (default: from the checkpoint)")
    p.add_argument("--revision", default=None, help="model revision (default: from the checkpoint)")
    p.add_argument("--site", choices=hf.SITES, default=None, help="site (default: from the checkpoint)")
    p.add_argument("--layer", type=int, default=None, help="layer (default: from the checkpoint)")
    p.add_argument("--hook", default=None, help="dotted module path to hook instead of --site/--layer")
    p.add_argument("--target-hook", default=None,
                   help="a transcoder's target: the dotted module path whose activation it replaces (default: from "
                   "the checkpoint)")
    p.add_argument("--norm-scale", type=float, default=None,
                   help="the SAE sees norm_scale * activation (default: from the checkpoint, else 1)")
    p.add_argument("--text", default=None, help="text source (default: from the checkpoint, else pydoc topics)")
    p.add_argument("--documents", choices=("heldout", "all"), default="heldout",
                   help=f"heldout: only the one document in {hf.HELDOUT_EVERY} that training leaves out; all: every "
                   "document, including those trained on (default: %(default)s)")
    p.add_argument("--n-tokens", type=int, default=20_000, help="tokens to evaluate on (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: from the checkpoint, else 128)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--splice-special-tokens", action="store_true",
                   help="also replace the output at special tokens ([CLS], [SEP], BOS)")
    p.add_argument("--mean-ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the mean-ablated site (one more forward per batch; default: on)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: CHECKPOINT/eval)")
    p.set_defaults(func=run_eval)


def _resolve_module(args: argparse.Namespace, meta: dict[str, Any],
                    model: nn.Module) -> tuple[hf.HookPoint, Any, Any]:
    """(hook point, site, layer) from the command line, falling back to the checkpoint metadata."""
    if args.hook:
        return hf.hook_point(model, args.hook), args.site, args.layer
    if args.site is not None or args.layer is not None:
        site = args.site if args.site is not None else meta.get("site")
        layer = args.layer if args.layer is not None else meta.get("layer")
        if site not in hf.SITES or not isinstance(layer, int):
            raise ConfigError(
                f"--site and --layer: need a site in {hf.SITES} and a layer, got {site!r}, {layer!r}")
        return hf.resolve_site(model, site, layer), site, layer
    if meta.get("hook"):
        return hf.hook_point(model, meta["hook"]), meta.get("site"), meta.get("layer")
    if meta.get("site") in hf.SITES and isinstance(meta.get("layer"), int):
        return hf.resolve_site(model, meta["site"], meta["layer"]), meta["site"], meta["layer"]
    raise ConfigError("the checkpoint's metadata names no hook or site/layer: pass --hook or --site and --layer")


def _resolve_target(args: argparse.Namespace, meta: dict[str, Any], model: nn.Module, layer: Any) -> hf.HookPoint:
    """A transcoder's target hook point: --target-hook, else the checkpoint's target hook or target site."""
    if args.target_hook:
        return hf.hook_point(model, args.target_hook)
    if meta.get("target_hook"):
        return hf.hook_point(model, meta["target_hook"])
    if meta.get("target_site") in hf.SITES and isinstance(layer, int):
        return hf.resolve_site(model, meta["target_site"], layer)
    raise ConfigError("the transcoder's metadata names no target hook or site: pass --target-hook")


def run_eval(args: argparse.Namespace) -> int:
    for name in ("n_tokens", "batch_size", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.norm_scale is not None and not args.norm_scale > 0:
        raise ConfigError(f"--norm-scale must be > 0, got {args.norm_scale}")
    with reraise_as(ConfigError, ValueError):
        device = device_or_default("--device", args.device)
    sae = TopKSAE.load(args.checkpoint, device=device)
    meta = sae.metadata
    model_name = args.model or meta.get("model")
    if not model_name:
        raise ConfigError("the checkpoint's metadata names no model: pass --model")
    revision = args.revision if args.revision is not None else (meta.get("revision") if args.model is None else None)
    norm_scale = args.norm_scale if args.norm_scale is not None else float(meta.get("norm_scale") or 1.0)
    text = args.text if args.text is not None else meta.get("text")
    seq_len = args.seq_len or int(meta.get("seq_len") or 128)
    hf.check_text_source(text)
    out = args.out if args.out is not None else args.checkpoint / "eval"
    make_output_dir(out)
    texts = _nonempty(hf.iter_texts(text, documents=args.documents), text, args.documents)
    held_out = _held_out_from_training(meta, text, args.documents)
    print(f"evaluating {args.checkpoint} on {_describe_tokens(text, args.documents, held_out)}; "
          f"results go to {out}", file=sys.stderr)
    model, tokenizer = hf.load_model(model_name, device=device, revision=revision)
    with reraise_as(ConfigError, ValueError):  # a site, layer or hook path this model lacks
        point, site, layer = _resolve_module(args, meta, model)
        target = _resolve_target(args, meta, model, layer) if sae.arch.transcoder else None
    result = evaluate(sae, model, tokenizer, point, texts, n_tokens=args.n_tokens,
                      norm_scale=norm_scale, seq_len=seq_len, batch_size=args.batch_size,
                      splice_special_tokens=args.splice_special_tokens, mean_ablation=args.mean_ablation,
                      target=target, target_norm_scale=float(meta.get("target_norm_scale") or 1.0))
    density = result.pop("firing_density")
    report = {"checkpoint": str(args.checkpoint), "model": model_name, "revision": revision, "site": site,
              "layer": layer, "hook": point.path, "text": text or hf.DEFAULT_TEXT, "documents": args.documents,
              **({"target_hook": target.path} if target is not None else {}),
              "held_out_from_training": held_out, "seq_len": seq_len, **result}
    atomic_write(out / EVAL_FILE, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    plot_firing_density(density, out / DENSITY_PLOT,
                        title=f"Firing density over {result['n_tokens']} tokens: {point.path}, F = {sae.n_features}")
    print(format_summary(report))
    print(f"wrote {EVAL_FILE} and {DENSITY_PLOT} to {out}")
    return 0


def _held_out_from_training(meta: dict[str, Any], text: str | None, documents: str) -> bool | None:
    """Whether no eval token was trained on: True when the SAE's training read only the other documents of
    this text (or another text), False for --documents all of the training text, None when the metadata
    does not say which documents training read."""
    same_text = (text or hf.DEFAULT_TEXT) == (meta.get("text") or hf.DEFAULT_TEXT)
    if not same_text and meta.get("text") is not None:
        return True
    if documents == "all":
        return False
    return True if meta.get("documents") == "train" else None


def _describe_tokens(text: str | None, documents: str, held_out: bool | None) -> str:
    """Which tokens eval reads, for the line it prints before it starts."""
    name = text or hf.DEFAULT_TEXT
    which = (f"the held-out documents of {name} (one in {hf.HELDOUT_EVERY})" if documents == "heldout"
             else f"every document of {name}")
    if held_out is None:
        return which + ", which the SAE's metadata does not say its training left out"
    return which + (", none of them trained on" if held_out else ", including those the SAE was trained on")


def _nonempty(texts: Iterator[str], source: str | None, documents: str) -> Iterator[str]:
    """``texts``, once its first non-blank document is read; InputError naming the source when there is none."""
    first = next((t for t in texts if t.strip()), None)
    if first is None:
        which = "held-out documents" if documents == "heldout" else "text"
        hint = " (pass --documents all, or a --text with more documents)" if documents == "heldout" else ""
        raise InputError(f"--text {source or hf.DEFAULT_TEXT} has no {which} to evaluate on{hint}")
    return itertools.chain([first], texts)


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines of an eval report."""
    lines = [
        f"{report.get('hook')}{' -> ' + report['target_hook'] if report.get('target_hook') else ''} of "
        f"{report.get('model')}: F = {report['n_features']}, k = {report['k']}, "
        f"{report['n_tokens']} tokens",
        f"  FVU {report['fvu']:.4f}   MSE {report['mse']:.4g}   L0 {report['l0']:.2f}   "
        f"dead {100 * report['dead_fraction']:.2f}% ({report['n_dead']} never fired)",
    ]
    if report["downstream"] == "next_token_ce":
        line = (f"  next-token CE: clean {report['ce_clean']:.4f}   spliced {report['ce_spliced']:.4f}   "
                f"zero-ablated {report['ce_zero_ablated']:.4f}   recovered {report['ce_recovered']:.3f}")
        if "ce_mean_ablated" in report:
            line += (f"\n  mean-ablated {report['ce_mean_ablated']:.4f}   "
                     f"recovered vs mean {report['ce_recovered_mean']:.3f}")
    else:
        line = (f"  embedding cosine vs clean: spliced {report['cos_spliced']:.4f}   "
                f"zero-ablated {report['cos_zero_ablated']:.4f}")
        if "cos_mean_ablated" in report:
            line += f"   mean-ablated {report['cos_mean_ablated']:.4f}"
    lines.append(line)
    return "\n".join(lines)
