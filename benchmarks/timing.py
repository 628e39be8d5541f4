"""Clocks and summaries for the suite.

On CUDA pytest-benchmark is given `cuda_event_clock` as its timer: each call records a CUDA event
on the current stream, waits for it and returns the GPU time since a reference event, so a round
(``end - start``) is the GPU time between two events around the timed call (launch gaps
included). On CPU pytest-benchmark's own timer (``time.perf_counter``) is used unchanged.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

_reference_event: torch.cuda.Event | None = None


def cuda_event_clock() -> float:
    """Seconds of GPU time since the first call, read from CUDA events (synchronizes)."""
    global _reference_event
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    if _reference_event is None:
        _reference_event = event
        return 0.0
    return _reference_event.elapsed_time(event) / 1e3


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median / min / max in ms of per-round times in seconds."""
    ms = [1e3 * s for s in seconds]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "rounds": len(ms),
        "samples_ms": ms,
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release_memory(device: str) -> None:
    """Collect garbage and hand cached CUDA blocks back, so the next system starts clean."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def peak_extra_bytes(device: str, setup: Callable[[], Any], target: Callable[..., Any]) -> int | None:
    """CUDA: bytes allocated at the peak of one ``target(*setup())`` beyond what was allocated before it.

    What is allocated before the call is the parameters, the optimizer state and the input
    batches (gradients are set to None by ``setup``), so the result is the working memory of the
    call itself. Returns None on CPU: torch's CPU allocator keeps no such statistics.
    """
    if device != "cuda":
        return None
    args = setup() or ()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = target(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out, args
    return peak


def time_rounds(target: Callable[..., Any], setup: Callable[[], Any], *, device: str, rounds: int,
                warmup: int) -> dict[str, Any]:
    """`summarize` of ``rounds`` timed calls ``target(*setup())`` after ``warmup`` untimed ones.

    ``setup`` (drawing the next input from a rotating pool, running what must precede the timed
    part) is never timed. CUDA: a pair of events around each call, so a round is GPU time; CPU:
    ``time.perf_counter`` around the call.
    """
    for _ in range(warmup):
        target(*(setup() or ()))
    synchronize(device)
    seconds = []
    for _ in range(rounds):
        args = setup() or ()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target(*args)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            target(*args)
            seconds.append(time.perf_counter() - begin)
        del args
    return summarize(seconds)
