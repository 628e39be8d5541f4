"""Results written as they happen: one JSON line per event in ``records.jsonl``, flushed at once.

A check writes a ``start`` line, then one final line with its status. Statuses: ``pass`` (a
correctness check held, or a measurement was taken), ``fail`` (an assertion did not hold: its
message is kept), ``error`` (an exception: its type and message), ``oom`` (out of device
memory, a result for a size search), ``skipped`` (not started: too little time left, or something
it needs is missing), ``timeout`` (its phase's slice ran out while it ran) and ``killed`` (its
phase's process had to be killed; written by the supervisor). Whatever happens, every line
written before is on disk.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .budget import SliceExpired, seconds_until

RECORDS_FILE = "records.jsonl"
FINAL = ("pass", "fail", "error", "oom", "skipped", "timeout", "killed")


class Recorder:
    """Appends records of one phase to ``out/records.jsonl``."""

    def __init__(self, out: Path, phase: str) -> None:
        self.path = Path(out) / RECORDS_FILE
        self.phase = phase

    def write(self, **record: Any) -> dict[str, Any]:
        record = {"phase": self.phase, "t": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record

    def check(self, name: str, fn: Callable[[], dict[str, Any] | None], *, until: float,
              min_s: float = 0.0, **info: Any) -> dict[str, Any]:
        """Run ``fn`` as check ``name`` and record how it ended; returns the final record.

        Not started when fewer than ``min_s`` seconds are left before ``until``. ``fn`` may return a
        dict of results (its ``status`` key, if any, overrides ``pass``). `SliceExpired` is recorded
        as ``timeout`` and raised again, so the phase stops.
        """
        if seconds_until(until) < min_s:
            return self.write(check=name, status="skipped", message=f"out of time: needs about {min_s:.0f} s", **info)
        self.write(check=name, status="start", **info)
        print(f"  {self.phase}: {name} ...", flush=True)
        start = time.monotonic()
        status, message, data = "pass", "", {}
        try:
            data = fn() or {}
            status = data.pop("status", "pass")
            message = data.pop("message", "")
        except SliceExpired:
            self.write(check=name, status="timeout", seconds=round(time.monotonic() - start, 3),
                       message="the phase's time slice ran out during this check", **info)
            raise
        except AssertionError as err:
            status, message = "fail", _first_lines(str(err)) or "assertion failed"
        except Exception as err:  # noqa: BLE001 - every failure becomes a record; the run goes on
            status, message = "error", f"{type(err).__name__}: {_first_lines(str(err))}"
            traceback.print_exc(file=sys.stdout)
        seconds = round(time.monotonic() - start, 3)
        print(f"  {self.phase}: {name}: {status} ({seconds:.1f} s){' - ' + message if message else ''}", flush=True)
        return self.write(check=name, status=status, message=message, seconds=seconds, **info, **data)


def _first_lines(text: str, n: int = 6, width: int = 600) -> str:
    """The first ``n`` lines of a message, cut to ``width`` characters."""
    short = "\n".join(text.strip().splitlines()[:n])
    return short if len(short) <= width else short[: width - 3] + "..."


def read_records(out: Path) -> list[dict[str, Any]]:
    """Every record in ``out/records.jsonl`` (a torn last line, from a kill mid-write, is dropped)."""
    path = Path(out) / RECORDS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def final_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last final record of each (phase, check), in the order the checks started."""
    order: dict[tuple[str, str], int] = {}
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        if "check" not in rec:
            continue
        key = (rec["phase"], rec["check"])
        order.setdefault(key, len(order))
        if rec["status"] in FINAL:
            last[key] = rec
    return [last[key] for key in sorted(last, key=order.__getitem__)]


def unfinished(records: list[dict[str, Any]], phase: str) -> list[str]:
    """Checks of ``phase`` that started and never recorded an end."""
    started, ended = [], set()
    for rec in records:
        if rec.get("phase") != phase or "check" not in rec:
            continue
        if rec["status"] == "start":
            started.append(rec["check"])
        elif rec["status"] in FINAL:
            ended.add(rec["check"])
    return [name for name in started if name not in ended]
