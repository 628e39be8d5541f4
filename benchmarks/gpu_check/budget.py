"""The time budget: slices planned up front, and the watchdog that holds a phase's process to its slice.

The whole check has one wall-clock budget. `Plan` gives each phase a share of it; a phase that ends
early passes its unused time on (the slices of the phases still to run are recomputed from what is
left), and `RESERVE_S` stays back for start-up and the last report. `supervise` runs one phase in a
process of its own: at the end of its slice it is asked to stop (SIGTERM, which the phase turns
into `SliceExpired` inside the check it is running), and killed `GRACE_S` later if it has not.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

# Share of the budget per phase, in the order they run; the rest is RESERVE_S.
SHARES = {"correctness": 0.38, "performance": 0.45, "science": 0.17}
PHASES = tuple(SHARES)
RESERVE_FRACTION, RESERVE_MAX_S = 0.08, 40.0  # start-up, reports between phases, the last report
GRACE_S = 10.0  # after SIGTERM, how long a phase may take to record what it was doing


class SliceExpired(Exception):
    """Raised inside a phase when its time slice is spent (SIGTERM from the watchdog)."""


@dataclass
class Plan:
    """One budget over the phases to run; `slice_for` re-plans from the time actually left."""

    total_s: float
    phases: tuple[str, ...] = PHASES
    start: float = field(default_factory=time.monotonic)

    @property
    def reserve_s(self) -> float:
        return min(RESERVE_MAX_S, RESERVE_FRACTION * self.total_s)

    def left_s(self) -> float:
        """Seconds of the whole budget still unspent."""
        return self.total_s - (time.monotonic() - self.start)

    def slice_for(self, phase: str) -> float:
        """Seconds for ``phase`` now: its share of what is left, among the phases from it onwards."""
        rest = self.phases[self.phases.index(phase):]
        available = self.left_s() - self.reserve_s
        return max(0.0, available * SHARES[phase] / sum(SHARES[p] for p in rest))

    def planned(self) -> dict[str, float]:
        """The slices as laid out up front: the budget less the reserve, split by the phases' shares."""
        total_share = sum(SHARES[p] for p in self.phases)
        return {p: (self.total_s - self.reserve_s) * SHARES[p] / total_share for p in self.phases}

    def describe(self) -> str:
        """The plan as first laid out, one line."""
        parts = [f"{p} {s:.0f} s" for p, s in self.planned().items()]
        return (f"budget {self.total_s:.0f} s: " + ", ".join(parts)
                + f", start-up and reports {self.reserve_s:.0f} s; time a phase leaves unused passes to the next")


def deadline_after(seconds: float) -> float:
    """An absolute deadline (``time.time()`` seconds) ``seconds`` from now, for another process."""
    return time.time() + seconds


def seconds_until(deadline: float) -> float:
    return deadline - time.time()


def raise_on_sigterm() -> None:
    """Make SIGTERM raise `SliceExpired` in the main thread (a phase process calls this first)."""

    def handler(signum, frame):
        raise SliceExpired("the phase's time slice is spent")

    signal.signal(signal.SIGTERM, handler)


@dataclass
class Outcome:
    """How a supervised process ended: its exit code (None if killed), whether its slice ran out."""

    returncode: int | None
    timed_out: bool
    killed: bool
    seconds: float


def _pump(stream: TextIO, sinks: Sequence[TextIO]) -> None:
    for line in stream:
        for sink in sinks:
            sink.write(line)
            sink.flush()


def supervise(argv: Sequence[str], slice_s: float, log: TextIO, *, env: dict[str, str] | None = None,
              cwd: str | Path | None = None, grace_s: float = GRACE_S) -> Outcome:
    """Run ``argv`` for at most ``slice_s`` seconds, its output copied to stdout and ``log``.

    At the end of the slice the process group gets SIGTERM, and SIGKILL ``grace_s`` later if it is
    still there (a compiler or a CUDA call may not return to Python in time).
    """
    start = time.monotonic()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, cwd=cwd, start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, (sys.stdout, log)), daemon=True)
    pump.start()
    timed_out = killed = False
    try:
        proc.wait(timeout=max(slice_s, 0.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            killed = True
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    pump.join(timeout=5)
    return Outcome(None if killed else proc.returncode, timed_out, killed, time.monotonic() - start)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group this module started for ``proc`` (it leads the group)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
