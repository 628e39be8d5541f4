"""Options, the CUDA-event timer and the session-wide recorder that writes the raw JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from flashsae.kernels.registry import resolve_backend

from . import machine
from .shapes import shapes_for

CUDA_CLOCK = "benchmarks.timing.cuda_event_clock"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flashsae benchmarks")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device to time (default: cuda when available, else cpu)")
    group.addoption("--bench-grid", choices=("headline", "full"), default="headline",
                    help="GPU shapes: the headline set or the full d x F x k grid")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per op (default: 10 cpu, 20 cuda)")
    group.addoption("--bench-warmup", type=int, default=None, help="warm-up rounds per op (default: 3)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own choice); one thread is robust on a shared machine")
    group.addoption("--bench-json", default=None,
                    help="where to write the raw results (default: benchmarks/results/<device-slug>/results.json)")


def bench_device(config: pytest.Config) -> str:
    return config.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("bench_device", None) == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--bench-device cuda needs a CUDA device, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Install a CUDA build of torch "
            "(make bench-gpu TORCH=torch) on a machine with an NVIDIA GPU, or run the CPU suite (make bench)."
        )
    threads = config.getoption("bench_threads", None)
    if threads:
        torch.set_num_threads(threads)
    # On CUDA, pytest-benchmark reads CUDA events instead of the host clock (unless told otherwise).
    if bench_device(config) == "cuda" and "perf_counter" in str(config.getoption("benchmark_timer", "")):
        config.option.benchmark_timer = CUDA_CLOCK


class Recorder:
    """Collects one record per (shape, system, op) and writes them with the machine description."""

    def __init__(self, config: pytest.Config) -> None:
        self.device = bench_device(config)
        self.grid = config.getoption("bench_grid")
        self.rounds = config.getoption("bench_rounds") or (20 if self.device == "cuda" else 10)
        self.warmup = config.getoption("bench_warmup")
        if self.warmup is None:
            self.warmup = 3
        json_opt = config.getoption("bench_json")
        self.path = Path(json_opt) if json_opt else machine.results_dir(self.device) / "results.json"
        self.timer = str(config.getoption("benchmark_timer"))
        self.results: list[dict[str, Any]] = []
        self.load_start = os.getloadavg()

    def add(self, **record: Any) -> None:
        self.results.append(record)

    def document(self) -> dict[str, Any]:
        meta = machine.describe(self.device)
        meta.update(
            load_average_start=self.load_start,
            load_average_end=os.getloadavg(),
            grid=self.grid if self.device == "cuda" else "cpu",
            rounds=self.rounds,
            warmup_rounds=self.warmup,
            timer=self.timer,
            flashsae_encoder_backend=resolve_backend("auto", torch.device(self.device)),
            peak_memory=(
                "torch.cuda.max_memory_allocated during one call minus torch.cuda.memory_allocated before it "
                "(parameters, optimizer state, input batches; gradients set to None)"
                if self.device == "cuda"
                else "unavailable: torch's CPU allocator keeps no peak statistics (and tracemalloc does not see it)"
            ),
        )
        return {
            "meta": meta,
            "shapes": [s.as_dict() for s in shapes_for(self.device, self.grid)],
            "results": self.results,
        }

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.document(), indent=1))
        return self.path


@pytest.fixture(scope="session")
def recorder(request: pytest.FixtureRequest):
    rec = Recorder(request.config)
    yield rec
    if rec.results:
        path = rec.write()
        print(f"\nraw results: {path}")
