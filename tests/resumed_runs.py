"""Resuming a finished run from its older checkpoint, as if it had died right after writing it."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from flashsae.sae.cli import main
from flashsae.sae.run import checkpoints


def resume_from_older_checkpoint(full: Path, cut: Path, kept_steps: tuple[int, int]) -> None:
    """Copy the finished run ``full`` to ``cut`` without its final SAE and newest checkpoint (the two it
    kept are at ``kept_steps``, newest first), resume it there with ``flashsae train --resume``, and
    check that it ends with ``full``'s weights and buffers, bit for bit."""
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    kept = checkpoints.list_checkpoints(cut / checkpoints.CHECKPOINTS_DIR)
    assert [path.name for path in kept] == [checkpoints.checkpoint_name(step) for step in kept_steps]
    shutil.rmtree(kept[0])
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
