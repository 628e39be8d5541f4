"""``flashsae export`` / ``flashsae import``: convert between our checkpoints and SAELens / sparsify.

`add_interop_commands` registers both on the main CLI's argparse subparsers; each sets
``func`` to its handler, which takes the parsed namespace and returns an exit code.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ...errors import InputError, reraise_as
from ..atomic import make_output_dir
from ..model import TopKSAE
from .saelens import export_saelens, import_saelens
from .sparsify import export_sparsify, import_sparsify

FORMATS = ("saelens", "sparsify")
_EXPORTERS = {"saelens": export_saelens, "sparsify": export_sparsify}
_IMPORTERS = {"saelens": import_saelens, "sparsify": import_sparsify}


def add_interop_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``import`` to ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    export = subparsers.add_parser(
        "export", help="write a flashsae checkpoint in SAELens or sparsify format",
        description="Write a flashsae checkpoint (cfg.json + model.safetensors) as a SAELens SAE "
        "(cfg.json + sae_weights.safetensors: 'topk', or for BatchTopK 'jumprelu' and 'jumprelu_transcoder' / "
        "'jumprelu_skip_transcoder') or a sparsify SparseCoder (cfg.json + sae.safetensors; TopK SAEs and "
        "transcoders). A norm_scale in the metadata is folded into the weights.",
    )
    export.add_argument("--format", required=True, choices=FORMATS, help="target format")
    export.add_argument("checkpoint", type=Path, help="flashsae checkpoint directory")
    export.add_argument("out", type=Path, help="output directory")
    export.set_defaults(func=run_export)

    imp = subparsers.add_parser(
        "import", help="read a SAELens or sparsify SAE into a flashsae checkpoint",
        description="Read a SAELens 'topk' SAE or a sparsify SparseCoder directory and write a flashsae "
        "checkpoint computing the same map.",
    )
    imp.add_argument("--format", required=True, choices=FORMATS, help="source format")
    imp.add_argument("path", type=Path, help="SAELens / sparsify SAE directory")
    imp.add_argument("out", type=Path, help="output flashsae checkpoint directory")
    imp.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    sae = TopKSAE.load(args.checkpoint, backend="torch")
    # A variant the format cannot express is a ConfigError of the exporter's own: one line, exit code 2.
    out = _EXPORTERS[args.format](sae, make_output_dir(args.out, "the output directory"))
    print(f"wrote {args.format} SAE (d={sae.d_model}, F={sae.n_features}, k={sae.k}) to {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    with reraise_as(InputError, FileNotFoundError, ValueError):  # a missing file, or a SAE the format rejects
        sae = _IMPORTERS[args.format](args.path)
    out = sae.save(make_output_dir(args.out, "the output directory"))
    print(f"wrote flashsae checkpoint (d={sae.d_model}, F={sae.n_features}, k={sae.k}) to {out}")
    return 0
