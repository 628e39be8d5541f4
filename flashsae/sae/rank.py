"""``flashsae rank``: singular-value spectra and effective rank of a model's activations per site and layer.

All requested (site, layer) pairs are hooked at once and read in a single pass over the text: every
batch of activations becomes one chunk ``[P, n, d]`` (P = number of pairs) of the batched, streaming
`flashsae.linalg.randomized_svd`, which accumulates one d x d Gram per pair (method "gram": exact, the
full spectrum, so the 99% count is meaningful). Sites narrower than the widest one are zero-padded to
its width; zero columns add only zero singular values, which are cut off again.
"""
from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..analysis import EffectiveRank, effective_rank, plot_effective_rank, plot_spectra
from ..checks import device_or_default, require_int
from ..errors import ConfigError, InputError, reraise_as
from ..linalg import randomized_svd
from . import hf
from .atomic import atomic_write, make_output_dir

RANK_FILE = "rank.json"
SPECTRA_FILE = "spectra.safetensors"
RANK_PLOT = "effective_rank.png"

Pair = tuple[str, int]
# Sites as wide as the model's hidden size in every architecture of the site table (attn_z is
# heads x head_dim wide, which may differ), so --n-tokens is checked against it before any work.
_HIDDEN_WIDE_SITES = {"attn_out", "mlp_out", "resid", "mlp_in"}


def parse_sites(text: str) -> tuple[str, ...]:
    """'attn_out,mlp_out' -> ('attn_out', 'mlp_out'); every name must be one of `hf.SITES`."""
    sites = tuple(s.strip() for s in text.split(",") if s.strip())
    if not sites:
        raise ConfigError(f"--sites must name at least one of {', '.join(hf.SITES)}, got {text!r}")
    bad = [s for s in sites if s not in hf.SITES]
    if bad:
        raise ConfigError(f"--sites: unknown site {bad[0]!r}; choose from {', '.join(hf.SITES)}")
    return tuple(dict.fromkeys(sites))


def parse_layers(text: str, n_layers: int) -> tuple[int, ...]:
    """'0,2,5' or 'all' -> layer indices, each in [0, n_layers)."""
    if text.strip().lower() == "all":
        return tuple(range(n_layers))
    layers = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            layer = int(part)
        except ValueError:
            raise ConfigError(f"--layers must be comma-separated integers or 'all', got {text!r}") from None
        if not 0 <= layer < n_layers:
            raise ConfigError(f"--layers: layer {layer} is out of range; the model has layers 0..{n_layers - 1}")
        layers.append(layer)
    if not layers:
        raise ConfigError(f"--layers must name at least one layer (or 'all'), got {text!r}")
    return tuple(dict.fromkeys(layers))


def _pair_name(site: str, layer: int) -> str:
    return f"{site}.{layer}"


def _stacked_chunks(batches: Iterable[Mapping[str, Tensor]], names: Sequence[str], width: int) -> Iterator[Tensor]:
    """Each batch {name: [n, d_name]} -> one chunk [P, n, width] (zero-padded on the right), in ``names`` order."""
    for batch in batches:
        parts = []
        for name in names:
            x = batch[name]
            if x.shape[-1] < width:
                x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
            parts.append(x)
        yield torch.stack(parts)


def spectra_with_count(
    model: nn.Module,
    tokenizer: Any,
    sites: Sequence[str],
    layers: Sequence[int],
    texts: Iterable[str],
    *,
    n_tokens: int,
    center: bool = True,
    seq_len: int = 128,
    batch_size: int = 32,
    method: str = "gram",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[dict[Pair, Tensor], int]:
    """Singular values of the (centered) activations [n, d] at every (site, layer), from one pass over ``texts``.

    n_tokens: number of (non-special) tokens to read; at least the widest site's d. method: "gram"
    (one pass, exact) or "randomized" (at full rank d also exact, but it re-reads the text
    n_iter + 2 times). dtype: accumulation dtype (torch.float32 or torch.float64).
    Returns ({(site, layer): S [d] in ``dtype``, descending}, tokens read); sum(S**2) is n times
    the total variance. The text may run out before ``n_tokens``.
    """
    require_int("n_tokens", n_tokens)
    pairs = [(site, layer) for layer in layers for site in sites]
    if not pairs:
        raise ValueError("sites and layers must each name at least one entry")
    modules = {_pair_name(s, l): hf.resolve_site(model, s, l) for s, l in pairs}
    names = list(modules)
    if method == "randomized" and not isinstance(texts, (list, tuple)):
        texts = list(texts)  # read n_iter + 2 times

    def collect() -> Iterator[Mapping[str, Tensor]]:
        return hf.collect_activations(
            model, tokenizer, modules, texts, seq_len=seq_len, batch_size=batch_size,
            max_tokens=n_tokens, progress=progress,
        )

    # The first batch tells each site's width, which fixes the (padded) SVD width before the pass.
    batches = iter(collect())
    first = next(batches, None)
    if first is None:
        raise InputError("the text yielded no tokens")
    widths = {name: int(first[name].shape[-1]) for name in names}
    width = max(widths.values())
    if n_tokens < width:
        raise ConfigError(f"n_tokens must be >= d = {width} for a full spectrum, got {n_tokens}")
    fresh = [itertools.chain([first], batches)]

    def chunks() -> Iterator[Tensor]:
        return _stacked_chunks(fresh.pop() if fresh else collect(), names, width)

    try:
        result = randomized_svd(chunks, width, center=center, method=method, dtype=dtype, seed=0)
    except ValueError as err:
        if not str(err).startswith("rank must be"):
            raise
        raise InputError(
            f"the text ran out before d = {width} tokens: a full spectrum needs at least d tokens") from None
    spectra = {pair: result.S[i, : widths[name]] for i, (pair, name) in enumerate(zip(pairs, names))}
    return spectra, result.n_rows


def activation_spectra(*args: Any, **kwargs: Any) -> dict[Pair, Tensor]:
    """`spectra_with_count` (same arguments) without the token count."""
    return spectra_with_count(*args, **kwargs)[0]


def effective_ranks(spectra: Mapping[Pair, Tensor]) -> dict[Pair, EffectiveRank]:
    """`flashsae.analysis.effective_rank` of every spectrum (fractions relative to its own d)."""
    return {pair: effective_rank(S, d=S.shape[-1]) for pair, S in spectra.items()}


def format_table(ranks: Mapping[Pair, EffectiveRank]) -> str:
    """One line per (layer, site): d, entropy erank (and / d), the 90/95/99% counts (and / d)."""
    head = f"{'layer':>5}  {'site':<9} {'d':>5}  {'erank':>7} {'/d':>5}  " + "  ".join(
        f"{f'n{p}':>5} {'/d':>5}" for p in (90, 95, 99))
    lines = [head, "-" * len(head)]
    for (site, layer), r in sorted(ranks.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        counts = "  ".join(f"{int(n):>5} {float(n) / r.d:>5.3f}" for n in (r.n90, r.n95, r.n99))
        lines.append(f"{layer:>5}  {site:<9} {r.d:>5}  {float(r.erank):>7.1f} {float(r.erank_frac):>5.3f}  {counts}")
    return "\n".join(lines)


def write_report(out: Path, spectra: Mapping[Pair, Tensor], ranks: Mapping[Pair, EffectiveRank],
                 info: Mapping[str, Any]) -> list[Path]:
    """Write rank.json, spectra.safetensors and the PNGs into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    sites = list(dict.fromkeys(site for site, _ in ranks))
    layers = sorted({layer for _, layer in ranks})
    report = dict(info)
    report["ranks"] = {site: {str(layer): ranks[(site, layer)].as_dict() for layer in layers
                              if (site, layer) in ranks} for site in sites}
    paths = [out / RANK_FILE]
    atomic_write(paths[0], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    tensors = {_pair_name(*pair): S.detach().float().contiguous().cpu() for pair, S in spectra.items()}
    atomic_write(out / SPECTRA_FILE, lambda tmp: save_file(tensors, tmp))  # with the user's umask
    paths.append(out / SPECTRA_FILE)
    per_site = {site: {layer: ranks[(site, layer)] for layer in layers if (site, layer) in ranks} for site in sites}
    paths.append(plot_effective_rank(per_site, out / RANK_PLOT,
                                     title=f"Effective dimensionality per layer ({info.get('model', '')})"))
    for site in sites:
        curves = {f"layer {layer}": spectra[(site, layer)] for layer in layers if (site, layer) in spectra}
        paths.append(plot_spectra(curves, out / f"spectra_{site}.png", title=f"Cumulative explained variance: {site}"))
    for layer in layers:
        curves = {site: spectra[(site, layer)] for site in sites if (site, layer) in spectra}
        paths.append(plot_spectra(curves, out / f"spectra_layer{layer}.png",
                                  title=f"Cumulative explained variance: layer {layer}"))
    return paths


# ---------------------------------------------------------------------------------------------
# Command line


def add_rank_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``rank`` to ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "rank", help="spectra and effective rank of activations per site and layer",
        description="Collect activations at every requested site and layer in one pass over the text, compute "
        "their full singular-value spectra (mean-centered by default) and report the entropy effective rank and "
        "the number of components for 90/95/99% of the variance, as counts and as fractions of d. Writes "
        f"{RANK_FILE}, {SPECTRA_FILE} and PNG plots to --out.",
    )
    p.add_argument("--model", default=hf.EMBEDDED_MODEL,
                   help="Hugging Face model id or directory (default: the embedded %(default)s)")
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    p.add_argument("--layers", default="all", help="comma-separated layer indices or 'all' (default: all)")
    p.add_argument("--sites", default=",".join(hf.SITES),
                   help="comma-separated sites among %(default)s (default: all three)")
    p.add_argument("--n-tokens", type=int, default=20_000, help="tokens to read (default: %(default)s)")
    p.add_argument("--text", default=None,
                   help=f"text source: a file, directory or Python module (default: {hf.DEFAULT_TEXT})")
    p.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract the mean activation before the SVD (default: on)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--method", choices=("gram", "randomized"), default="gram",
                   help="SVD method of flashsae.linalg.randomized_svd (default: %(default)s)")
    p.add_argument("--float64", action="store_true", help="accumulate the Gram matrices in float64")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=Path("rank_report"), help="output directory (default: %(default)s)")
    p.set_defaults(func=run_rank)


def run_rank(args: argparse.Namespace) -> int:
    sites = parse_sites(args.sites)
    for name in ("n_tokens", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    with reraise_as(ConfigError, ValueError):
        device = device_or_default("--device", args.device)
    hf.check_text_source(args.text)
    width = getattr(hf.load_config(args.model, revision=args.revision), "hidden_size", None)
    if isinstance(width, int) and args.n_tokens < width and set(sites) & _HIDDEN_WIDE_SITES:
        raise ConfigError(f"--n-tokens {args.n_tokens} is less than d = {width}, the model's hidden size: a full "
                          "spectrum needs at least d tokens")
    make_output_dir(args.out)
    model, tokenizer = hf.load_model(args.model, device=device, revision=args.revision)
    layers = parse_layers(args.layers, hf.num_layers(model))
    spectra, n_read = spectra_with_count(
        model, tokenizer, sites, layers, hf.iter_texts(args.text), n_tokens=args.n_tokens,
        center=args.center, seq_len=args.seq_len, batch_size=args.batch_size, method=args.method,
        dtype=torch.float64 if args.float64 else torch.float32,
    )
    ranks = effective_ranks(spectra)
    print(format_table(ranks))
    info = {
        "model": args.model, "revision": args.revision, "text": args.text or hf.DEFAULT_TEXT,
        "text_hash": hf.text_source_hash(args.text), "n_tokens": n_read,
        "center": args.center, "seq_len": args.seq_len, "method": args.method,
        "sites": list(sites), "layers": list(layers),
        "hooks": {_pair_name(s, l): hf.resolve_site(model, s, l)[0] for l in layers for s in sites},
    }
    paths = write_report(args.out, spectra, ranks, info)
    print(f"wrote {', '.join(p.name for p in paths[:3])} and {len(paths) - 3} more plots to {args.out}")
    return 0
