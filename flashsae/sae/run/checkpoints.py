"""Full training-state checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory ``CHECKPOINTS/step-NNNNNNNN/`` holding

- ``cfg.json`` + ``model.safetensors``: the SAE (`TopKSAE.save`'s format),
- ``optimizer.pt``: the optimizer's ``state_dict`` (SparseAdam's per-row step counts and moments,
  or Adam's); a feature-parallel run instead writes one ``optimizer-rankR.pt`` per rank (each
  rank's features), written by the ranks themselves into the staging directory,
- ``trainer.pt``: step, data position (epoch, batch within the epoch), normalization scale,
  the `FiringTracker` state, the torch / numpy / Python RNG states and the run's id,
- ``config.json``: the run's configuration,
- ``manifest.json``, written last: the run's id and the sha256 and size of every other file.

It is first written under a hidden staging name, every file and the directory are fsynced,
and only then is it renamed into place; older checkpoints are removed after that, so a crash at
any moment leaves at least one complete checkpoint. Only the run's own checkpoints (by the run id
in their manifest) are pruned, and `latest_checkpoint` picks the newest intact one of a run,
reporting each newer broken one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
CHECKPOINTS_DIR = "checkpoints"
_PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint is missing, partial or corrupt."""


@dataclass
class TrainerState:
    """Where the run stands: ``step`` steps done; the next batch is batch ``batch`` of epoch ``epoch``.

    ``run_id``: the run's identity (`flashsae.sae.run.rundir`); None in checkpoints written before runs had one.
    ``target_norm_scale``: a transcoder's normalization of its targets (None for an autoencoder).
    """

    step: int
    epoch: int
    batch: int
    norm_scale: float
    tokens: int
    firing: dict[str, Any]
    rng: dict[str, Any]
    run_id: str | None = None
    target_norm_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def capture_rng() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and Python RNG states."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_shard_file(rank: int) -> str:
    """File name of rank ``rank``'s optimizer state in a feature-parallel checkpoint."""
    return f"optimizer-rank{rank}.pt"


def staging_dir(root: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` is assembled before it is renamed into place."""
    return Path(root) / f".{checkpoint_name(step)}.tmp"


def prepare_staging(root: str | os.PathLike, step: int) -> Path:
    """An empty staging directory for ``step``; staging left behind by a killed run is removed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{_PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = staging_dir(root, step)
    tmp.mkdir()
    return tmp


def save_optimizer_shard(root: str | os.PathLike, step: int, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Write this rank's optimizer state into the (already prepared) staging directory of ``step``."""
    path = staging_dir(root, step) / optimizer_shard_file(rank)
    torch.save(optimizer.state_dict(), path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    root: str | os.PathLike,
    *,
    sae: Any,
    optimizer: torch.optim.Optimizer | None,
    state: TrainerState,
    config: dict[str, Any],
    keep: int = 2,
    optimizer_shards: int = 0,
) -> Path:
    """Write the checkpoint for ``state.step`` under ``root`` atomically; keep the newest ``keep`` of its run.

    Checkpoints of other runs (another run id in their manifest) are left alone.

    ``optimizer_shards=N`` (feature parallel): ``optimizer`` is None and ranks 0..N-1 have already
    written their `save_optimizer_shard` files into `prepare_staging`'s directory.
    """
    root = Path(root)
    final = root / checkpoint_name(state.step)
    tmp = staging_dir(root, state.step) if optimizer_shards else prepare_staging(root, state.step)
    sae.save(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    torch.save(state.to_dict(), tmp / TRAINER_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    manifest = {"step": state.step, "run_id": state.run_id, "optimizer_shards": optimizer_shards, "files": {}}
    for name in files:
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
        manifest["files"][name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    with open(tmp / MANIFEST_FILE, "w") as f:
        f.write(json.dumps(manifest, indent=2))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in [path for path in list_checkpoints(root) if _manifest_run_id(path) == state.run_id][keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


_UNREADABLE = object()  # what `_manifest_run_id` returns for a checkpoint without a readable manifest


def _manifest_run_id(path: Path) -> str | None | object:
    """The run id in ``path``'s manifest (None if it names none), or `_UNREADABLE`."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        return manifest.get("run_id")
    except (OSError, ValueError, AttributeError):
        return _UNREADABLE


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``root``, newest (highest step) first; temporary ones excluded."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError naming the file when ``path`` is not a complete, intact checkpoint."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing (the checkpoint was not finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path} is not a valid checkpoint manifest: {exc}") from exc
    shards = manifest.get("optimizer_shards", 0)
    optimizer_files = [optimizer_shard_file(r) for r in range(shards)] if shards else [OPTIMIZER_FILE]
    for name in (CONFIG_FILE, TRAINER_FILE, "cfg.json", "model.safetensors", *optimizer_files):
        if name not in files:
            raise CheckpointError(f"{manifest_path} does not list {name}")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file} has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        digest = _sha256(file)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{file} is corrupt: sha256 {digest} does not match the manifest's {entry['sha256']}")


def checkpoints_root(directory: str | os.PathLike) -> Path:
    """The folder holding ``step-*`` checkpoints for a run directory (or that folder itself)."""
    directory = Path(directory)
    if (directory / CHECKPOINTS_DIR).is_dir():
        return directory / CHECKPOINTS_DIR
    return directory


def latest_checkpoint(
    directory: str | os.PathLike, *, run_id: str | None = None, notify: Callable[[str], object] | None = None
) -> Path:
    """The newest intact checkpoint of a run directory (of run ``run_id`` only, when given).

    Each newer broken one is reported through ``notify`` (default: a warning) by the file that is
    wrong; checkpoints whose manifest names another run are passed over.
    """
    root = checkpoints_root(directory)
    candidates = [path for path in list_checkpoints(root)
                  if run_id is None or _manifest_run_id(path) in (_UNREADABLE, run_id)]
    if not candidates:
        whose = f" of run {run_id}" if run_id is not None else ""
        raise FileNotFoundError(f"no training checkpoints (step-*){whose} found in {directory}")
    problems: list[str] = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            message = f"skipping a broken checkpoint: {problem}; resuming from {path} instead"
            if notify is None:
                warnings.warn(message, stacklevel=2)
            else:
                notify(message)
        return path
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(problems))


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a verified checkpoint: {"config", "trainer" (TrainerState), "optimizer", "optimizer_shards", "path"}.

    "optimizer" is the state_dict, or None for a feature-parallel checkpoint
    ("optimizer_shards" > 0), whose ranks each read their own with `load_optimizer_shard`.
    """
    path = Path(path)
    verify_checkpoint(path)
    shards = json.loads((path / MANIFEST_FILE).read_text()).get("optimizer_shards", 0)
    trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    optimizer = None if shards else torch.load(path / OPTIMIZER_FILE, map_location=device, weights_only=False)
    return {
        "path": path,
        "config": json.loads((path / CONFIG_FILE).read_text()),
        "trainer": TrainerState(**trainer),
        "optimizer": optimizer,
        "optimizer_shards": shards,
    }


def load_optimizer_shard(
    checkpoint: dict[str, Any], rank: int, world_size: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Rank ``rank``'s optimizer state_dict from a feature-parallel checkpoint read by `load_checkpoint`."""
    shards = checkpoint["optimizer_shards"]
    if shards != world_size:
        raise CheckpointError(
            f"{checkpoint['path']} was written by {shards} feature-parallel ranks; resume it with "
            f"--nproc-per-node {shards} (this run has {world_size})"
        )
    return torch.load(checkpoint["path"] / optimizer_shard_file(rank), map_location=device, weights_only=False)
