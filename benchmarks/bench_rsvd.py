"""randomized_svd (Gram and randomized methods) vs torch.svd_lowrank: time and accuracy.

Run: pytest benchmarks/bench_rsvd.py [--benchmark-only]
Set FLASHSAE_BENCH_RESULTS=1 to write raw results (device, torch version, date, shapes,
times, errors) to benchmarks/results/rsvd-<device>-<date>.json.

Shapes: on CUDA, A = 2M x 4096 bf16 held on the GPU and read in 65536-row chunks, rank 1024,
n_iter 2 (svd_lowrank gets an fp32 copy, made outside the timing). Elsewhere 20000 x 384
fp32, rank 96. The data have a power-law spectrum s_i = (i + 1)^-0.5 in a random basis.

Accuracy against a float64 Gram G of the same data:
  sin_theta: sine of the largest principal angle to the exact top-rank subspace;
  captured: trace(V^T G V) / (sum of the top-rank eigenvalues of G), the fraction of the best
    possible rank-`rank` variance that V captures (1 is optimal);
  s_rel_err: max relative error of the rank singular values.
Pass cost: the randomized method makes n_iter + 2 passes, each 2 products with A; the Gram
method one pass (one n x d x d product); svd_lowrank(niter=q) 2q + 2 products with A.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from flashsae.linalg import randomized_svd

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    CFG = dict(n=2_000_000, d=4096, rank=1024, n_iter=2, oversample=10, dtype=torch.bfloat16,
               chunk_rows=65536, rounds=1)
else:
    CFG = dict(n=20_000, d=384, rank=96, n_iter=2, oversample=10, dtype=torch.float32,
               chunk_rows=65536, rounds=3)

RESULTS: list[dict] = []


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def case():
    n, d, dtype, rows = CFG["n"], CFG["d"], CFG["dtype"], CFG["chunk_rows"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    W = torch.linalg.qr(torch.randn(d, d, generator=g, device=DEVICE)).Q
    s = (torch.arange(d, device=DEVICE, dtype=torch.float32) + 1) ** -0.5
    A = torch.empty(n, d, dtype=dtype, device=DEVICE)
    for i in range(0, n, rows):
        z = torch.randn(min(rows, n - i), d, generator=g, device=DEVICE)
        A[i:i + rows] = ((z * s) @ W.T).to(dtype)
    G = torch.zeros(d, d, dtype=torch.float64, device=DEVICE)
    for i in range(0, n, rows):
        c = A[i:i + rows].double()
        G += c.T @ c
    w, U = torch.linalg.eigh(G)
    w, U = w.flip(-1), U.flip(-1)
    yield dict(A=A, G=G, w=w, U=U)
    if RESULTS and os.environ.get("FLASHSAE_BENCH_RESULTS"):
        _write_results()


def _errors(case, S: torch.Tensor, V: torch.Tensor) -> dict:
    r = CFG["rank"]
    V = V.to(torch.float64)
    U = case["U"][:, :r]
    sin = torch.linalg.matrix_norm(V - U @ (U.T @ V), ord=2).item()
    captured = (torch.trace(V.T @ case["G"] @ V) / case["w"][:r].sum()).item()
    s_true = case["w"][:r].clamp_min(0).sqrt()
    s_err = ((S.to(torch.float64) - s_true) / s_true).abs().max().item()
    return dict(sin_theta=sin, captured=captured, s_rel_err=s_err)


def _impl(case, impl: str):
    """The zero-argument function timed for ``impl``; returns (S [rank], V [d, rank])."""
    r, q, p, rows = CFG["rank"], CFG["n_iter"], CFG["oversample"], CFG["chunk_rows"]
    A = case["A"]
    if impl == "gram":
        return lambda: randomized_svd(A, r, method="gram", chunk_rows=rows)[:2]
    if impl.startswith("randomized"):
        return lambda: randomized_svd(A, r, method="randomized", n_iter=q, oversample=p, seed=0,
                                      chunk_rows=rows)[:2]
    if "A32" not in case:  # svd_lowrank needs fp32: one copy, made outside the timing
        case["A32"] = A if A.dtype == torch.float32 else A.float()
    A32, niter = case["A32"], int(impl.rsplit("niter", 1)[1])

    def lowrank():
        _, S, V = torch.svd_lowrank(A32, q=r + p, niter=niter)
        return S[:r], V[:, :r]
    return lowrank


# svd_lowrank's default niter=2, and niter=3, which makes as many products with A (8) as
# randomized_svd(n_iter=2) does in its 4 passes.
IMPLS = ["gram", f"randomized_niter{CFG['n_iter']}", f"svd_lowrank_niter{CFG['n_iter']}",
         f"svd_lowrank_niter{CFG['n_iter'] + 1}"]


@pytest.mark.parametrize("impl", IMPLS)
def test_rsvd(benchmark, case, impl):
    fn = _impl(case, impl)

    def timed():
        out = fn()
        _sync()
        return out

    S, V = benchmark.pedantic(timed, rounds=CFG["rounds"], iterations=1, warmup_rounds=0 if CUDA else 1)
    errs = _errors(case, S, V)
    benchmark.extra_info.update(errs)
    stats = getattr(benchmark, "stats", None)
    RESULTS.append(dict(impl=impl, **errs, min_s=stats.stats.min if stats else None,
                        mean_s=stats.stats.mean if stats else None))
    assert errs["captured"] > 0.9


def _write_results() -> None:
    dev = torch.cuda.get_device_name() if CUDA else (platform.processor() or platform.machine())
    now = datetime.datetime.now(datetime.timezone.utc)
    cfg = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in CFG.items()}
    doc = dict(bench="rsvd", device=dev, torch=torch.__version__, date=now.isoformat(timespec="seconds"),
               threads=torch.get_num_threads(), config=cfg, results=RESULTS)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    safe = "".join(ch if ch.isalnum() else "-" for ch in dev)[:40]
    path = out / f"rsvd-{safe}-{now:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(doc, indent=2))
