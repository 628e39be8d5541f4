"""One phase in a process of its own: ``python -m benchmarks.gpu_check.phase NAME --out DIR --until T``.

The supervisor (`benchmarks.gpu_check.cli`) starts one such process per phase, so a CUDA fault in
one phase cannot poison the next and a phase that overruns its slice can be stopped. The process
records a ``meta`` line (device, driver, versions), then runs the phase's checks in order; each
check first asks whether enough of the slice is left.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import machine
from .budget import SliceExpired, raise_on_sigterm
from .profiles import DRY_RUN, GPU, Profile
from .records import Recorder

@dataclass
class Context:
    """What a phase's checks share: sizes, device, deadline, where records and scratch files go."""

    profile: Profile
    recorder: Recorder
    until: float  # absolute deadline, time.time() seconds
    out: Path
    scratch: Path  # files the phase needs but the report does not (run directories, activation stores)
    model_dir: Path | None  # the MiniLM to load (a directory), None when it is not there

    @property
    def device(self) -> torch.device:
        return torch.device(self.profile.device)


def _phase_runner(name: str):
    """The ``run(ctx)`` function of phase ``name`` (imported here, so each process loads only its own)."""
    if name == "correctness":
        from .correctness import run
    elif name == "performance":
        from .performance import run
    else:
        from .science import run
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.phase")
    parser.add_argument("name", choices=("correctness", "performance", "science"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--until", type=float, required=True, help="deadline, seconds since the epoch")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    raise_on_sigterm()
    profile = DRY_RUN if args.dry_run else GPU
    recorder = Recorder(args.out, args.name)
    recorder.write(meta=machine.describe(profile.device), profile=profile.name)
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{args.name}-") as scratch:
        ctx = Context(profile, recorder, args.until, args.out, Path(scratch), args.model_dir)
        try:
            _phase_runner(args.name)(ctx)
        except SliceExpired:
            print(f"{args.name}: time slice spent; stopped", flush=True)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
