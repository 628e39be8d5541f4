"""``flashsae train`` on the command line: its parser, built from `TrainConfig`'s option declarations, and the command.

Every option's argparse default is SUPPRESS, so the parsed namespace holds exactly the options the
user gave: a new run fills the rest from `TrainConfig`, ``--resume`` from the checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ...errors import ConfigError, InputError, reraise_as
from .. import hf
from ..parallel import process_group
from ..trainer import NonFiniteError
from . import checkpoints, rundir
from .config import (
    FIELDS, GROUPS, TrainConfig, declaration, flag, merge_resumed_config, overwrite_conflict, value_type,
)
from .driver import train
from .metrics_log import check_log_backends
from .source import open_store


def describe_default(f: dataclasses.Field) -> str:
    """``f``'s default as --help says it: the declared text, else the value ('on'/'off' for switches)."""
    text = declaration(f).default_text
    if text is not None:
        return text
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return " ".join(map(str, default))
    return f"{default:g}" if isinstance(default, float) else str(default)


def _help(f: dataclasses.Field) -> str:
    spec = declaration(f)
    text = spec.help
    if spec.choices is not None:
        text += f"; {'any' if value_type(f)[1] else 'one'} of {', '.join(spec.choices)}"
    return f"{text} (default: {describe_default(f)})".replace("%", "%%")


def _argument(f: dataclasses.Field) -> dict[str, Any]:
    """``add_argument`` keywords for field ``f``: its type, and default SUPPRESS (a missing option stays missing)."""
    spec = declaration(f)
    kind, many = value_type(f)
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f)}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = spec.parse or kind
        if many:
            kwargs["nargs"] = "+"
    if spec.metavar is not None:
        kwargs["metavar"] = spec.metavar
    return kwargs


def add_train_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``flashsae train``, one option per `TrainConfig` field; returns its parser."""
    p = subparsers.add_parser(
        "train",
        help="train a TopK SAE on a transformer's activations",
        description=(
            "Collect a model's activations at one site into an activation store (once), then train a TopK "
            "SAE on them for several epochs. The defaults train 4096 features, k=32 on all-MiniLM-L6-v2 "
            "layer 3 attn_out over Python's pydoc topics. Launch with `torchrun --nproc-per-node N -m "
            "flashsae train ...` for data- or feature-parallel training."
        ),
    )
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    for f in FIELDS:
        groups[declaration(f).group].add_argument(flag(f.name), **_argument(f))
    p.set_defaults(func=run_train_command)

    def one_line_error(message: str) -> None:
        p.exit(2, f"{p.prog}: error: {message}\n")

    p.error = one_line_error  # type: ignore[method-assign]
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a parsed ``flashsae train`` command line (a resumed run's, with --resume); not validated."""
    given = {f.name: getattr(args, f.name) for f in FIELDS if hasattr(args, f.name)}
    if "resume" not in given:
        return TrainConfig(**given)
    if given.get("overwrite"):
        raise ConfigError(overwrite_conflict())
    given.setdefault("out", str(Path(given["resume"])))
    with reraise_as(InputError, FileNotFoundError, checkpoints.CheckpointError, culprit="--resume"):
        path = rundir.latest_run_checkpoint(given["resume"], notify=lambda message: None)  # train() reports them
    return merge_resumed_config(json.loads((path / checkpoints.CONFIG_FILE).read_text()), given)


def check_inputs(cfg: TrainConfig) -> None:
    """Before any work, ConfigError / InputError naming the culprit unless: the --log sinks are installed,
    a --store opens, the --text source can be read, and, where activations are still to be collected,
    the --model can be found and has the --site/--layer or --hook (checked on its weightless skeleton)."""
    with reraise_as(ConfigError, ValueError):
        check_log_backends(cfg.log)
    if cfg.store is not None:
        store = open_store(cfg.store, "--store")
        _check_transcoding(cfg, bool(store.target_width))
        return
    _check_transcoding(cfg, cfg.transcodes)
    hf.check_text_source(cfg.text)
    cache = Path(cfg.cache) if cfg.cache else Path(cfg.out) / rundir.CACHE_DIR
    if not (cache / "manifest.json").is_file():
        skeleton = hf.model_skeleton(cfg.model, revision=cfg.revision)
        if cfg.hook:
            hf.hook_point(skeleton, cfg.hook)
        else:
            hf.resolve_site(skeleton, cfg.site, cfg.layer)
        if cfg.target_hook:
            hf.hook_point(skeleton, cfg.target_hook)
        elif cfg.target_site:
            hf.resolve_site(skeleton, cfg.target_site, cfg.layer)


def _check_transcoding(cfg: TrainConfig, transcodes: bool) -> None:
    """ConfigError when --skip-connection asks for a transcoder the options (or the --store) do not train."""
    if cfg.skip_connection and not transcodes:
        where = f"--store {cfg.store} holds no targets" if cfg.store is not None else (
            "give --target-site or --target-hook")
        raise ConfigError(f"--skip-connection is for transcoders: {where}")


def run_train_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()
    check_inputs(cfg)
    try:
        train(cfg)
    except NonFiniteError as exc:
        print(f"flashsae train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        process_group.destroy_distributed()
    return 0
