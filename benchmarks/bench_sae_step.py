"""One SAE training step per system and shape, with flashsae's ops one by one, against the floor.

Run: ``make bench`` (CPU) or ``make bench-gpu`` (CUDA headline shapes), or directly
``pytest benchmarks/bench_sae_step.py [--bench-device cuda] [--bench-grid full]``. For each shape,
in this order: the floor (dense encoder matmul, a copy of the B*k*d gathered rows), flashsae's
full step and ops, plain torch, SAELens, sparsify, and flashsae's full step again (rebuilt) to
show the run-to-run spread. A system that runs out of GPU memory is recorded as "oom" and
skipped. Raw JSON goes to benchmarks/results/<device-slug>/results.json (see conftest.py);
``python -m benchmarks.report`` turns it into a table and plots.
"""
from __future__ import annotations

import pytest
import torch

from .conftest import CUDA_CLOCK, bench_device
from .shapes import Shape, shapes_for
from .systems import BUILDERS, System
from .timing import peak_extra_bytes, release_memory, summarize, synchronize

# (system, op) in the order they run for each shape.
MEASURES = [
    ("floor", "matmul"),
    ("floor", "copy"),
    ("flashsae", "step"),
    ("flashsae", "step-auxk"),
    ("flashsae", "step-auxk-2pass"),
    ("flashsae", "encode"),
    ("flashsae", "encode-fused"),
    ("flashsae", "decode"),
    ("flashsae", "backward"),
    ("flashsae", "optimizer"),
    ("torch", "step"),
    ("torch", "encode"),
    ("sae_lens", "step"),
    ("sparsify", "step"),
    ("flashsae (repeat)", "step"),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cases = [(s, m) for s in shapes_for(bench_device(config), config.getoption("bench_grid")) for m in MEASURES]
    metafunc.parametrize(("shape", "measure"), cases, ids=[f"{s.id}-{m[0]}-{m[1]}".replace(" ", "") for s, m in cases])


class _Current:
    """The one system alive at a time (built once, used by all its ops), and the ones that failed."""

    key: tuple[str, str] | None = None
    system: System | None = None
    failed: dict[tuple[str, str], str] = {}


def _system(shape: Shape, name: str, device: str) -> System:
    key = (shape.id, name)
    if _Current.key != key:
        _Current.key, _Current.system = None, None
        release_memory(device)
        torch.manual_seed(0)
        _Current.system = BUILDERS[name](shape, device)
        _Current.key = key
    return _Current.system


def _drop(device: str) -> None:
    _Current.key, _Current.system = None, None
    release_memory(device)


def test_op(benchmark, recorder, request, shape: Shape, measure: tuple[str, str]) -> None:
    device = recorder.device
    if device == "cuda":
        assert request.config.getoption("benchmark_timer") == CUDA_CLOCK, "CUDA timings must come from CUDA events"
    name, op_name = measure
    benchmark.group = shape.id
    benchmark.name = f"{name}:{op_name}"
    record = dict(shape_id=shape.id, system=name, op=op_name)
    if (shape.id, name) in _Current.failed:
        recorder.add(**record, status="oom", error=_Current.failed[(shape.id, name)])
        pytest.skip(f"{name} ran out of memory at {shape.id}")

    oom = None
    try:
        system = _system(shape, name, device)
        if op_name not in system.ops:
            pytest.skip(f"{name} has no {op_name} op on {device}")
        op = system.ops[op_name]
        setup = lambda: (op.setup(), {})  # noqa: E731
        benchmark.pedantic(op.target, setup=setup, rounds=recorder.rounds, warmup_rounds=recorder.warmup)
        timing = summarize(benchmark.stats.stats.data)
        peak = peak_extra_bytes(device, op.setup, op.target)
        synchronize(device)
    except torch.OutOfMemoryError as err:
        oom = str(err).splitlines()[0]
    if oom is not None:
        system = op = setup = None  # noqa: F841  (drop this frame's references before freeing memory)
        _Current.failed[(shape.id, name)] = oom
        _drop(device)
        recorder.add(**record, status="oom", error=oom)
        pytest.skip(f"{name} ran out of memory at {shape.id}: {oom}")

    record.update(status="ok", **timing, peak_extra_bytes=peak, state_bytes=system.state_bytes(), notes=system.notes)
    if op.bytes_moved is not None:
        record.update(bytes_moved=op.bytes_moved, gb_per_s=op.bytes_moved / timing["median_ms"] / 1e6)
    if op_name == "step":
        record["tokens_per_s"] = shape.B / (timing["median_ms"] / 1e3)
    benchmark.extra_info.update({k: v for k, v in record.items() if k != "samples_ms"})
    recorder.add(**record)
    if measure == MEASURES[-1]:
        _drop(device)
