"""Phase 2: the headline numbers, each beside its floor measured in the same run.

Per shape of the profile (B=4096 bf16 on the GPU: d=4096 k=64 and d=768 k=32, at F=2^20 and
2^16), in this order: the floor (the dense encoder matmul through cuBLAS; a device copy of the
B·k·d gathered elements, whose bandwidth turns each sparse op's byte count into its floor),
flashsae on the backend "auto" picks (encode, decode, backward, optimizer, the full
`Trainer.step`, and the step replayed from a CUDA graph where the trainer offers one), matmul +
torch.topk and the plain torch step, the peers (sparsify, SAELens; SAELens's algorithm
re-implemented when the package is missing), then every other registered backend (encode and
step). Then the largest F each system trains on the card: the F its headline step's memory
predicts, then steps up or down until one fits and one does not, then bisection, a few tries
each. Timings: `benchmarks.timing.time_rounds` (CUDA events, warm-up, rotated inputs, median);
peak memory: `benchmarks.timing.peak_extra_bytes`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from flashsae.kernels.registry import AUTO, backend_names, resolve_backend

from .. import systems
from ..shapes import Shape
from ..timing import peak_extra_bytes, release_memory, synchronize, time_rounds
from .budget import seconds_until
from .phase import Context

HEADLINE_SHARE = 0.75  # of the phase's slice; the largest-F search gets the rest
F_STEP = 1 << 16  # the largest-F search's sizes are multiples of this
MIN_OP_S = 6.0  # seconds left, at least, to start timing an op (warm-up, rounds, peak memory)
MIN_BUILD_S = 15.0  # ... to build a system (allocating and initializing its weights)
PEERS = {"sparsify": "sparsify", "sae_lens": "sae_lens"}  # system -> module it imports
FLASHSAE_OPS = ("encode", "decode", "backward", "optimizer", "step", "step_graph")
CARRY_HINT = "bring it as wheels: benchmarks/README.md, 'Bringing packages to a GPU machine'"


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Floors:
    """What one shape's floor measured: the matmul time and the copy bandwidth."""

    def __init__(self) -> None:
        self.matmul_ms: float | None = None
        self.gb_per_s: float | None = None
        self.sparse_ms: dict[str, float] = {}

    def for_op(self, op_name: str, op: systems.Op) -> dict[str, Any]:
        """The floor beside ``op``: bytes over the measured bandwidth, or the encoder matmul for encode
        and, for a step, the matmul plus the sparse ops' byte floors measured so far."""
        if op.bytes_moved is not None and self.gb_per_s:
            ms = op.bytes_moved / self.gb_per_s / 1e6
            self.sparse_ms[op_name] = ms
            return {"floor_ms": ms, "floor_basis": f"{op.bytes_moved:,} bytes at the measured copy bandwidth"}
        if op_name == "encode" and self.matmul_ms:
            return {"floor_ms": self.matmul_ms, "floor_basis": "dense encoder matmul"}
        if op_name.startswith("step") and self.matmul_ms:
            parts = ["encoder matmul", *sorted(self.sparse_ms)]
            return {"floor_ms": self.matmul_ms + sum(self.sparse_ms.values()), "floor_basis": " + ".join(parts)}
        return {}


def measure(system: systems.System, op_name: str, shape: Shape, ctx: Context, floors: Floors) -> dict[str, Any]:
    """Time one op of ``system``, its peak extra memory and its floor; an OOM becomes status ``oom``.
    The state bytes are read after the timed calls (optimizers create their moments at the first step)."""
    op = system.ops[op_name]
    device, p = ctx.profile.device, ctx.profile
    try:
        timing = time_rounds(op.target, op.setup, device=device, rounds=p.rounds, warmup=p.warmup)
        peak = peak_extra_bytes(device, op.setup, op.target)
        synchronize(device)
    except Exception as err:  # noqa: BLE001
        if not _is_oom(err):
            raise
        return {"status": "oom", "message": str(err).splitlines()[0]}
    record = {**timing, "peak_extra_bytes": peak, "state_bytes": system.state_bytes(), "notes": system.notes,
              **floors.for_op(op_name, op)}
    if op.bytes_moved is not None:
        record.update(bytes_moved=op.bytes_moved, gb_per_s=op.bytes_moved / timing["median_ms"] / 1e6)
    if op_name.startswith("step"):
        record["tokens_per_s"] = shape.B / (timing["median_ms"] / 1e3)
    if record.get("floor_ms"):
        record["floor_fraction"] = record["floor_ms"] / timing["median_ms"]
    return record


def time_system(ctx: Context, shape: Shape, name: str, build: Callable[[], systems.System],
                op_names: tuple[str, ...], floors: Floors, until: float) -> dict[str, dict[str, Any]]:
    """Build system ``name`` at ``shape`` and record each of its ops there (returns op -> record); a
    failed build is recorded against every op (``oom``, or ``error`` / ``skipped`` with the reason)."""
    info = {"shape": shape.as_dict(), "system": name}
    if seconds_until(until) < MIN_BUILD_S:
        return _record_all(ctx, shape, name, op_names, info, "skipped", "out of time")
    system, failure = _build(build)
    if failure is not None:
        release_memory(ctx.profile.device)
        return _record_all(ctx, shape, name, op_names, info, *failure)
    records = {}
    for op_name in op_names:
        if op_name not in system.ops:
            continue
        rec = records[op_name] = ctx.recorder.check(
            f"{shape.id} {name}:{op_name}", partial(measure, system, op_name, shape, ctx, floors),
            until=until, min_s=MIN_OP_S, op=op_name, **info)
        if name == "floor" and rec["status"] == "pass":
            if op_name == "matmul":
                floors.matmul_ms = rec["median_ms"]
            elif op_name == "copy":
                floors.gb_per_s = rec["gb_per_s"]
    system = None  # drop the reference before freeing the memory
    release_memory(ctx.profile.device)
    return records


def _build(build: Callable[[], systems.System]) -> tuple[systems.System | None, tuple[str, str] | None]:
    """(the built system, None), or (None, (status, message)) when the build failed."""
    torch.manual_seed(0)
    try:
        return build(), None
    except ImportError as err:
        return None, ("skipped", f"{err}; {CARRY_HINT}")
    except Exception as err:  # noqa: BLE001 - a failed build is a result, the phase goes on
        return None, ("oom" if _is_oom(err) else "error", f"build: {type(err).__name__}: {str(err).splitlines()[0]}")


def _record_all(ctx, shape, name, op_names, info, status, message) -> dict[str, dict[str, Any]]:
    return {op: ctx.recorder.write(check=f"{shape.id} {name}:{op}", status=status, message=message, op=op, **info)
            for op in op_names}


def peer_builder(name: str) -> tuple[str, Callable[[Shape, str], systems.System]]:
    """(label, builder) for peer ``name``: the package when it imports, else SAELens's algorithm
    re-implemented (labelled so); sparsify has no stand-in and reports what is missing."""
    try:
        importlib.import_module(PEERS[name])
    except ImportError as err:
        if name == "sae_lens":
            return "sae_lens (algorithm re-implemented)", systems.saelens_algorithm
        reason = f"{name} cannot be imported ({type(err).__name__}: {err})"

        def missing(shape: Shape, device: str) -> systems.System:
            raise ImportError(reason)

        return name, missing
    return name, systems.BUILDERS[name]


def other_backends(device: str) -> list[str]:
    """Registered backends other than the one "auto" picks on ``device``, in registry order."""
    auto = resolve_backend(AUTO, torch.device(device))
    return [name for name in backend_names() if name not in (AUTO, auto)]


def measure_shape(ctx: Context, shape: Shape, until: float) -> dict[str, dict[str, Any]]:
    """Every system's ops at ``shape``; returns system -> its step record."""
    device, floors = ctx.profile.device, Floors()
    auto = resolve_backend(AUTO, torch.device(device))
    plan: list[tuple[str, Callable[[], systems.System], tuple[str, ...]]] = [
        ("floor", partial(systems.floor, shape, device), ("matmul", "copy")),
        (f"flashsae[{auto}]", partial(systems.flashsae, shape, device, auto), FLASHSAE_OPS),
        ("torch", partial(systems.dense_torch, shape, device), ("encode", "step")),
    ]
    for peer in PEERS:
        label, build = peer_builder(peer)
        plan.append((label, partial(build, shape, device), ("step",)))
    plan += [(f"flashsae[{b}]", partial(systems.flashsae, shape, device, b), ("encode", "step"))
             for b in other_backends(device)]
    steps = {}
    for name, build, op_names in plan:
        records = time_system(ctx, shape, name, build, op_names, floors, until)
        if "step" in records:
            steps[name] = records["step"]
    return steps


# ----------------------------------------------------------------------------- the largest F
def trains_at(ctx: Context, name: str, build: Callable[[Shape, str], systems.System], shape: Shape) -> dict[str, Any]:
    """One step of system ``name`` at ``shape``: status ``pass``, or ``oom`` saying where it ran out."""
    device, where = ctx.profile.device, "build"
    system = None
    try:
        torch.manual_seed(0)
        system = build(shape, device)
        where = "step"
        step = system.ops["step"]
        step.target(*(step.setup() or ()))
        synchronize(device)
        return {"state_bytes": system.state_bytes(), "F": shape.F}
    except Exception as err:  # noqa: BLE001
        if not _is_oom(err):
            raise
        return {"status": "oom", "message": f"{where}: {str(err).splitlines()[0]}", "F": shape.F}
    finally:
        system = step = None  # noqa: F841 - drop the references before freeing the memory
        release_memory(device)


def predicted_f(step: dict[str, Any] | None, free_bytes: int | None, unit: int) -> int | None:
    """The F (a multiple of ``unit``) whose state and step memory, linear in F as measured in a
    headline step, fill 90% of the free device memory."""
    if not step or step.get("status") != "pass" or not free_bytes or step.get("peak_extra_bytes") is None:
        return None
    per_feature = (step["state_bytes"] + step["peak_extra_bytes"]) / step["shape"]["F"]
    return _aligned(0.9 * free_bytes / per_feature, unit)


def _aligned(F: float, unit: int) -> int:
    return max(unit, int(F) // unit * unit)


def next_f(F: int, ok: int | None, bad: int | None, growth: float, unit: int) -> int | None:
    """The next F to try: up by ``growth`` until one does not fit, down until one does, then bisect
    down to ``unit``; None when the search is done."""
    if bad is None:
        return _aligned(F * growth, unit)
    if ok is None:
        return _aligned(F / growth, unit) if F > unit else None
    return _aligned((ok + bad) / 2, unit) if bad - ok > unit else None


def largest_f(ctx: Context, until: float, headline_steps: dict[str, dict[str, Any]]) -> None:
    """Per system, the largest F whose step runs: first the F its headline step's memory predicts
    (state + peak, linear in F), then 15% steps up or down and a bisection; without a prediction,
    doubling from the profile's first F. At most the profile's number of tries per system."""
    B, d, k, first_F, tries = ctx.profile.largest_f
    dtype, device, unit = ctx.profile.perf_shapes[0].dtype, ctx.profile.device, min(F_STEP, first_F)
    auto = resolve_backend(AUTO, torch.device(device))
    candidates = [(f"flashsae[{auto}]", partial(systems.flashsae, backend=auto)), ("torch", systems.dense_torch)]
    candidates += [peer_builder(peer) for peer in PEERS]
    for name, build in candidates:
        release_memory(device)
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
        guess = predicted_f(headline_steps.get(name), free, unit)
        F, growth = (guess, 1.15) if guess else (first_F, 2.0)
        ok = bad = None
        for _ in range(tries):
            shape = Shape(B, d, F, k, dtype)
            rec = ctx.recorder.check(f"largest F {name} F={F}", partial(trains_at, ctx, name, build, shape),
                                     until=until, min_s=MIN_BUILD_S, system=name, search="largest_f",
                                     shape=shape.as_dict(), predicted_F=guess)
            if rec["status"] == "pass":
                ok = max(ok or 0, F)
            elif rec["status"] == "oom":
                bad = min(bad or F, F)
            else:
                break
            F = next_f(F, ok, bad, growth, unit)
            if F is None:
                break


def run(ctx: Context) -> None:
    B, d, k, _, _ = ctx.profile.largest_f
    headline_until = ctx.until - (1 - HEADLINE_SHARE) * max(0.0, seconds_until(ctx.until))
    steps: dict[str, dict[str, Any]] = {}
    for shape in ctx.profile.perf_shapes:
        measured = measure_shape(ctx, shape, headline_until)
        if (shape.B, shape.d, shape.k) == (B, d, k):
            steps.update({name: rec for name, rec in measured.items() if rec["status"] == "pass"})
    largest_f(ctx, ctx.until, steps)
