"""Compile every Triton kernel of flashsae for Hopper (sm_90) as a real launch would, without a GPU.

Each case calls a kernel's own launcher (`launch_select`, for the main and the AuxK lists, `range_lists`, `fold_pre_bias`, the row
and Adam launchers) on tensors of a real run's shapes, on the meta device (small CPU tensors where a
launcher needs data), with the kernel launch intercepted. The captured launch then goes through
Triton's own launch path for an sm_90 target: the same binder specializes the arguments (16-byte
aligned pointers and integers divisible by 16 get divisibility hints, integers equal to 1 become
constants) and the same options are parsed, so what compiles here is what a launch would run. Cases
that specialize identically compile once.

Run as a script (TRITON_INTERPRET must be unset: the interpreter patches the compiler):

    python tests/sm90_compile.py [--subset] [--only TEXT] [--table PATH]

One JSON line per case: ``ok``, the error if any, registers / stack bytes per thread (stack > 0 means
spills), shared memory, whether Hopper MMA (wgmma) was emitted, whether every pointer offset that is
a product is 64-bit (``wide_offsets``: F * d above 2^31 elements stays addressable; see
`i32_product_offsets`) and the SASS instruction count of every loop (outer before inner). ``--table`` also writes the Markdown table
(benchmarks/results/compile-sm90.md). ``--subset`` compiles the CI subset: every kernel and block
config at the headline shape and at one odd shape, with k = 1, 5 and 64 (the three ways k
specializes); the full matrix adds every k = 2, 4, ..., 512 and the second headline width.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from unittest import mock

TARGET = ("cuda", 90, 32)  # H100 / H200: compute capability 9.0, warp size 32
# (B, d, F): the headline shapes and an odd one (odd B, d, F: no divisibility hints).
HEADLINE = [(4096, 4096, 1 << 20), (4096, 768, 1 << 20)]
ODD = (7, 40, 1000)
FULL_KS = (1, 2, 4, 5, 8, 16, 32, 64, 128, 256, 512)
SUBSET_KS = (1, 5, 64)
# AuxK's k for the dead lists' launch (Gao et al.'s 512, and d / 2 at the headline widths).
FULL_AUX_KS = (384, 512, 2048)
SUBSET_AUX_KS = (512,)


@dataclass
class Case:
    """One launch configuration: ``launch()`` calls the launcher; ``wgmma`` says whether Hopper MMA is required."""

    name: str
    kernel: str
    launch: Callable[[], object]
    wgmma: bool = False
    notes: dict = field(default_factory=dict)


def _meta(*shape, dtype=None):
    import torch

    return torch.empty(*shape, dtype=dtype or torch.float32, device="meta")


def _dtypes():
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _select_cases(shapes, ks, label: str = "select") -> Iterator[Case]:
    """The select launches of `chunked_encode.topk_encode` (``label`` "select aux": the second launch of
    `chunked_encode.topk_encode_with_aux`, over the same chunk buffer with the dead lists' k = aux_k)."""
    import torch

    from flashsae.kernels import chunked_encode

    for B, _, F in shapes:
        for k in ks:
            plan = chunked_encode.select_plan(B, F, k, n_sms=132)
            starts = sorted({0, (F - 1) // plan.chunk * plan.chunk})  # the first and the last chunk
            for bias_dtype in ("fp32", "bf16"):  # folded with b_pre, or b_enc itself
                for start in starts:
                    width = min(plan.chunk, F - start)
                    lists = (_meta(B, plan.n_slices, plan.capacity, dtype=torch.int64),
                             _meta(B, plan.n_slices, dtype=torch.int32))
                    floors = [_meta(B, plan.n_slices, dtype=torch.int32) for _ in range(2)]
                    args = (_meta(B, width), _meta(F, dtype=_dtypes()[bias_dtype]), *lists, *floors, start, k, plan)
                    yield Case(f"{label} B={B} F={F} k={k} bias={bias_dtype} chunk@{start} "
                               f"BM={plan.blocks['BM']} BN={plan.blocks['BN']} slices={plan.n_slices}",
                               "select", lambda args=args: chunked_encode.launch_select(*args))


def _fused_cases(shapes, ks) -> Iterator[Case]:
    from flashsae.kernels import fused_encode

    for name, dtype in _dtypes().items():
        for B, d, F in shapes:
            for k in ks:
                plan = fused_encode.encode_plan(B, F, d, k, n_sms=132, dtype=dtype)
                for config in plan["configs"]:
                    blocks = "BM={BM} BN={BN} BK={BK} warps={num_warps} stages={num_stages}".format(**config)
                    args = (_meta(B, d, dtype=dtype), _meta(F, d, dtype=dtype), _meta(F), k, plan)
                    yield Case(f"fused {name} B={B} d={d} F={F} k={k} {blocks}", "fused",
                               lambda args=args, config=config: fused_encode.range_lists(*args, config=config),
                               wgmma=name != "fp32")


def _fold_cases(shapes) -> Iterator[Case]:
    from flashsae.kernels import triton_common

    for name, dtype in _dtypes().items():
        for _, d, F in shapes:
            args = (_meta(F, d, dtype=dtype), _meta(F, dtype=dtype), _meta(d, dtype=dtype))
            yield Case(f"fold_pre_bias {name} d={d} F={F}", "fold_pre_bias",
                       lambda args=args: triton_common.fold_pre_bias(*args))


def _row_cases(shapes, ks) -> Iterator[Case]:
    import torch

    from flashsae.kernels import pairs, rows, sparse_adam

    for name in ("bf16", "fp32"):
        dtype = _dtypes()[name]
        for B, d, F in shapes:
            for k in ks:
                idx = _meta(B, k, dtype=torch.int64)
                gather = (_meta(B, k, dtype=dtype), idx, _meta(F, d, dtype=dtype), _meta(d, dtype=dtype),
                          _meta(B, d, dtype=dtype))
                yield Case(f"gather_rows {name} B={B} d={d} k={k}", "gather_rows",
                           lambda a=gather: rows.gather_rows(*a[:4], out=a[4]))
                dots = (_meta(B, d, dtype=dtype), idx, _meta(F, d, dtype=dtype))
                yield Case(f"row_dots {name} B={B} d={d} k={k}", "row_dots", lambda a=dots: rows.row_dots(*a))
                # The fired pairs are grouped by a sort first: real (CPU) indices, the launch itself intercepted.
                g = torch.Generator().manual_seed(0)
                real_idx = torch.randint(0, F, (B, k), generator=g)
                groups = pairs.group_pairs(real_idx, torch.ones(B, k, dtype=torch.bool), F)
                vecs, shift = torch.zeros(B, d, dtype=dtype), torch.zeros(d, dtype=dtype)
                for coef, with_shift in ((torch.float32, True), (dtype, False)):  # encoder's grad_pre; decoder's vals
                    seg = (torch.rand(B, k, generator=g).to(coef), groups, vecs, shift if with_shift else None)
                    yield Case(f"segment_rows {name} coef={_dtype_name(coef)} B={B} d={d} k={k}", "segment_rows",
                               lambda a=seg: rows.segment_rows(*a))
        B, d, F = shapes[0]
        for moments in ("fp32", "bf16"):
            for master in (False, True) if name == "bf16" else (False,):
                touched = min(F, B * 64)
                adam = (_meta(F, d, dtype=dtype), _meta(touched, d), _meta(touched, dtype=torch.int64),
                        _meta(touched, dtype=torch.bool), _meta(F, d, dtype=_dtypes()[moments]),
                        _meta(F, d, dtype=_dtypes()[moments]), _meta(F, dtype=torch.int64))
                low = _meta(F, d, dtype=torch.int16) if master else None
                yield Case(f"sparse_adam {name} moments={moments} master={master} d={d}", "sparse_adam",
                           lambda a=adam, low=low: sparse_adam.sparse_adam_step_(
                               *a, low=low, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, unit_norm=True))


def _dtype_name(dtype) -> str:
    return {v: k for k, v in _dtypes().items()}[dtype]


def cases(subset: bool) -> Iterator[Case]:
    """Every launch configuration of every kernel (the CI subset with ``subset``)."""
    shapes = [HEADLINE[0], ODD] if subset else [*HEADLINE, ODD]
    ks = SUBSET_KS if subset else FULL_KS
    yield from _select_cases(shapes, ks)
    yield from _select_cases(shapes, SUBSET_AUX_KS if subset else FULL_AUX_KS, "select aux")
    yield from _fused_cases(shapes, ks)
    yield from _fold_cases(shapes)
    yield from _row_cases(shapes, SUBSET_KS)


# ------------------------------------------------------------------------------------ compiling
def capture(launch: Callable[[], object]) -> list[tuple]:
    """The kernel launches ``launch()`` makes, as (JITFunction, args, kwargs), none of them run."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    with mock.patch.object(JITFunction, "run", record):
        launch()
    return launches


def specialize(fn, args, kwargs):
    """Triton's own launch-time specialization for an sm_90 target -> (src, options, key)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget(*TARGET))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                sorted(options.__dict__.items())))
    return ASTSource(fn, signature, constexprs, attrs), options, key


def _tool(name: str) -> str:
    import triton

    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _cubin_text(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), *flags, f.name], capture_output=True, text=True, check=True).stdout


def loop_sizes(sass: str) -> list[int]:
    """SASS instructions of every loop (a backward branch's span), outer before inner."""
    address = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
    spans = []
    for line in sass.splitlines():
        found = address.search(line)
        if not found:
            continue
        at, instruction = int(found.group(1), 16), found.group(2)
        branch = re.search(r"\bBRA\s+(0x[0-9a-f]+)", instruction)
        if branch and int(branch.group(1), 16) < at:
            spans.append((int(branch.group(1), 16), at))
    spans.sort(key=lambda s: (s[0], -s[1]))
    return [(stop - start) // 16 + 1 for start, stop in spans]


def i32_product_offsets(ttir: str) -> list[str]:
    """The ``tt.addptr`` ops whose offset is a 32-bit value computed with a multiplication: the
    offsets that could wrap past 2^31 (F * d above 2^31 elements). A 32-bit offset that is a loop
    index, an argument or a sum of those stays below 2^31 and is fine; 64-bit offsets are fine."""
    defs = {}
    for line in ttir.splitlines():
        found = re.match(r"\s*(%[\w.]+)(?::\d+)? = (.*)", line)
        if found:
            defs[found.group(1)] = found.group(2)

    def has_product(name: str, seen: set) -> bool:
        if name in seen or name not in defs:  # not defined by an op: a block argument
            return False
        seen.add(name)
        body = defs[name]
        if body.startswith("arith.muli"):
            return True
        return any(has_product(operand, seen) for operand in re.findall(r"%[\w.]+", body.split(" : ")[0]))

    flagged = []
    for line in ttir.splitlines():
        found = re.search(r"tt\.addptr (%[\w.]+), (%[\w.]+) : [^,]+, (tensor<[^>]*xi32>|i32)(\s|$)", line)
        if found and has_product(found.group(2), set()):
            flagged.append(line.strip()[:200])
    return flagged


def analyze(compiled) -> dict:
    """Registers, stack, shared memory, wgmma, 32-bit product offsets and loop sizes of a compiled kernel."""
    usage = re.search(r"REG:(\d+) STACK:(\d+)", _cubin_text(compiled.asm["cubin"], "-res-usage"))
    products = i32_product_offsets(compiled.asm["ttir"])
    return {
        "regs": int(usage.group(1)), "stack": int(usage.group(2)), "shared": compiled.metadata.shared,
        "wgmma": "wgmma.mma_async" in compiled.asm["ptx"],
        "wide_offsets": not products, "i32_product_offsets": products[:3],
        "loops": loop_sizes(_cubin_text(compiled.asm["cubin"], "-sass")),
    }


def run(selected: list[Case]) -> Iterator[dict]:
    """Compile each case (each distinct specialization once) and yield its record."""
    import triton
    from triton.backends.compiler import GPUTarget

    done: dict[str, dict] = {}
    for case in selected:
        record: dict = {"case": case.name, "kernel": case.kernel, "wgmma_required": case.wgmma}
        try:
            launches = capture(case.launch)
            if len(launches) != 1:
                raise RuntimeError(f"expected one launch, captured {len(launches)}")
            src, options, key = specialize(*launches[0])
            if key not in done:
                compiled = triton.compile(src, target=GPUTarget(*TARGET), options=options.__dict__)
                done[key] = analyze(compiled)
            record.update(ok=True, **done[key])
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
            record.update(ok=False, error="".join(traceback.format_exception(exc))[-4000:])
        yield record


def write_table(records: list[dict], path: str) -> None:
    """The Markdown table of every case: the committed benchmarks/results/compile-sm90.md."""
    import triton

    lines = [
        "# Triton kernels compiled for sm_90 (H100 / H200), as a real launch specializes them",
        "",
        f"Produced by `python tests/sm90_compile.py --table {path}` (Triton {triton.__version__}; no GPU). "
        "Registers and stack are per thread (stack > 0 means spills); shared memory per program; "
        "wgmma: Hopper MMA emitted; wide: every pointer offset computed with a multiplication is 64-bit "
        "(F x d above 2^31 elements stays addressable); loops: SASS instructions of each loop (a "
        "backward branch's span), outer before inner.",
        "",
        "| case | ok | regs | stack | shared | wgmma | wide | loops (SASS instructions) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if not r["ok"]:
            lines.append(f"| {r['case']} | error | | | | | | {r['error'].splitlines()[-1][:120]} |")
            continue
        lines.append(f"| {r['case']} | yes | {r['regs']} | {r['stack']} | {r['shared']} | "
                     f"{'yes' if r['wgmma'] else 'no'} | {'yes' if r['wide_offsets'] else 'no'} | "
                     f"{', '.join(map(str, r['loops']))} |")
    pathlib.Path(path).write_text("\n".join(lines) + "\n")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler's semantics")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", action="store_true", help="the CI subset")
    parser.add_argument("--only", default="", help="cases whose name contains this text")
    parser.add_argument("--table", help="also write the Markdown table here")
    options = parser.parse_args()
    records = []
    for record in run([c for c in cases(options.subset) if options.only in c.name]):
        print(json.dumps(record), flush=True)
        records.append(record)
    if options.table:
        write_table(records, options.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
