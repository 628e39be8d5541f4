"""A run directory (``--out``): what a run writes there, and the identity that ties it to one run.

``run.json``, written before anything else, records the run's id, a hash of its configuration (the
options a resumed run must keep: every one not declared ``resumable``) and the configuration. The
run id also goes into every checkpoint (`checkpoints.TrainerState.run_id`), so ``--resume`` reads
only this run's checkpoints and pruning removes only this run's.

A new run takes a directory that is missing or empty, or that holds nothing but a run that never
got to train (its run.json and activation cache). Any other directory is refused in one line: one
holding a run's results (unless ``--overwrite``, which deletes those results and keeps the cache),
or files that belong to no run (never deleted).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError, InputError
from ..atomic import atomic_write
from . import checkpoints
from .config import FIELDS, RESUMABLE, TrainConfig, flag
from .metrics_log import METRICS_FILE, TENSORBOARD_DIR, WANDB_DIR

RUN_FILE = "run.json"
CACHE_DIR = "activations"  # the default activation cache
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
DENSITY_PLOT = "firing_density.png"
# What a run writes besides run.json and its activation cache: the results --overwrite deletes.
RESULTS = (checkpoints.CHECKPOINTS_DIR, FINAL_DIR, SUMMARY_FILE, METRICS_FILE, DENSITY_PLOT, TENSORBOARD_DIR,
           WANDB_DIR)
# The options that define a run: a resumed run must keep each one, and they make its config hash.
IDENTITY_OPTIONS = tuple(f.name for f in FIELDS if f.name not in RESUMABLE)


@dataclass(frozen=True)
class RunIdentity:
    """Which run a directory and its checkpoints belong to: a random ``run_id`` and the ``config_hash``."""

    run_id: str
    config_hash: str


def config_hash(config: TrainConfig | dict[str, Any]) -> str:
    """sha256 (16 hex digits) of the options in `IDENTITY_OPTIONS`: equal exactly when a run may resume the other."""
    values = config.to_dict() if isinstance(config, TrainConfig) else config
    kept = {name: values.get(name) for name in IDENTITY_OPTIONS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def new_identity(cfg: TrainConfig) -> RunIdentity:
    return RunIdentity(secrets.token_hex(6), config_hash(cfg))


def read_run(directory: str | Path) -> tuple[RunIdentity, dict[str, Any]] | None:
    """(identity, configuration) from ``directory/run.json``; None without one; InputError if it is unreadable."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return RunIdentity(str(record["run_id"]), str(record["config_hash"])), dict(record["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path} is not a readable run record ({type(err).__name__}: {err}); "
                         "move it away if the directory holds no run you want") from None


def latest_run_checkpoint(directory: str | Path, notify: Callable[[str], object] | None = None) -> Path:
    """The newest intact checkpoint of the run recorded in ``directory`` (any run's, without a run.json)."""
    recorded = read_run(directory)
    return checkpoints.latest_checkpoint(directory, run_id=recorded[0].run_id if recorded else None, notify=notify)


def resumed_identity(directory: str | Path, cfg: TrainConfig, checkpoint_run_id: str | None) -> RunIdentity:
    """The identity of the run resumed from ``directory`` with (merged) configuration ``cfg``.

    InputError when the directory's run.json records another configuration than its checkpoint's.
    """
    recorded = read_run(directory)
    identity = RunIdentity(checkpoint_run_id or (recorded[0].run_id if recorded else secrets.token_hex(6)),
                           config_hash(cfg))
    if recorded is not None and recorded[0].config_hash != identity.config_hash:
        raise InputError(
            f"{Path(directory) / RUN_FILE} records another configuration than its newest checkpoint "
            f"({_differences(recorded[1], cfg.to_dict())}); the directory mixes two runs"
        )
    return identity


def claim(out: Path, identity: RunIdentity, cfg: TrainConfig, *, overwrite: bool = False) -> None:
    """Make ``out`` the directory of run ``identity`` and write its run.json.

    The directory a run resumes from (``cfg.resume``), or one that records the same run, is kept as
    it is. Otherwise ConfigError naming --out when it holds files of no run, or another run's
    results (unless ``overwrite``: those results are then deleted; the activation cache stays).
    Also ConfigError when nothing can be written there.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    recorded = read_run(out) if out.is_dir() else None
    resuming_here = cfg.resume is not None and out.resolve() == Path(cfg.resume).resolve()
    if not resuming_here and (recorded is None or recorded[0].run_id != identity.run_id):
        _make_room(out, identity, cfg, recorded, overwrite)
    record = {"run_id": identity.run_id, "config_hash": identity.config_hash, "config": cfg.to_dict()}
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write there ({err.strerror or err})") from None


def _make_room(out: Path, identity: RunIdentity, cfg: TrainConfig,
               recorded: tuple[RunIdentity, dict[str, Any]] | None, overwrite: bool) -> None:
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = {RUN_FILE, CACHE_DIR, *RESULTS, *_named_inside(out, cfg.cache, cfg.store)}
    foreign = [name for name in entries if name not in ours and not _leftover(name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"--out {out} holds files of no flashsae run ({shown}); give an empty or new directory")
    results = [name for name in entries if name in RESULTS]
    if not results:  # nothing trained here yet: take it over
        return
    if not overwrite:
        raise ConfigError(f"--out {out} already holds {_describe(out, identity, cfg, recorded, results)}")
    for name in [*results, *filter(_leftover, entries)]:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _named_inside(out: Path, *paths: str | None) -> list[str]:
    """The names of those ``paths`` that sit directly inside ``out`` (a --cache or --store kept there)."""
    return [Path(p).name for p in paths if p is not None and Path(p).resolve().parent == out.resolve()]


def _leftover(name: str) -> bool:
    """A temporary file of an atomic write that a killed run left behind."""
    return name.startswith(".") and name.endswith(".tmp")


def _describe(out: Path, identity: RunIdentity, cfg: TrainConfig,
              recorded: tuple[RunIdentity, dict[str, Any]] | None, results: list[str]) -> str:
    """What the refused directory holds, and what to do instead, for the one-line error."""
    finished = SUMMARY_FILE in results
    state = "a finished run" if finished else "an unfinished run"
    if recorded is None:
        what = f"{state}'s results ({', '.join(results)})"
    elif recorded[0].config_hash == identity.config_hash:
        what = f"{state} with these options (run {recorded[0].run_id})"
    else:
        what = f"{state} with other options (run {recorded[0].run_id}: {_differences(recorded[1], cfg.to_dict())})"
    again = "" if finished else f"pass --resume {out} to continue it, "
    return f"{what}: {again}pass --overwrite to replace it, or choose another --out"


def _differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 3) -> str:
    """The first ``limit`` identity options in which ``saved`` differs from ``current``, as '--k 16 there, 32 here'."""
    changed = [name for name in IDENTITY_OPTIONS if saved.get(name) != current.get(name)]
    shown = ", ".join(f"{flag(name)} {saved.get(name)!r} there, {current.get(name)!r} here" for name in changed[:limit])
    return (shown + (", ..." if len(changed) > limit else "")) or "the same options"
