"""One full SAE training step: flashsae (sparse grads + SparseAdam) vs the dense torch path, side by side.

flashsae: topk_encode -> sparse_decode -> MSE -> backward (sparse COO grads of W_enc, W_dec, b_enc)
-> SparseAdam(unit_norm=[W_dec]) (parallel-grad removal and renormalization fused into the step).
dense torch: x @ W_enc.T -> relu -> torch.topk -> scatter into [B, F] -> z @ W_dec -> MSE -> backward
(dense F x d grads) -> remove parallel grads -> torch.optim.Adam -> renormalize W_dec.

Run: ``pytest benchmarks/bench_train_step.py --benchmark-json out.json``. On CUDA: the shapes
below in bf16 with bf16 moments on both sides; on CPU a tiny fp32 shape with the torch backend.
``extra_info`` holds ms_per_step and tokens_per_s. A dense run that runs out of memory is skipped
with that reason (it is a result: the dense path does not fit).
"""
from __future__ import annotations

import pytest
import torch

from flashsae import TopKSAE
from flashsae.optim import SparseAdam

CUDA = torch.cuda.is_available()
if CUDA:
    SHAPES = [
        dict(B=4096, d=4096, F=1 << 20, k=64, dtype=torch.bfloat16),
        dict(B=4096, d=768, F=1 << 20, k=32, dtype=torch.bfloat16),
    ]
else:
    SHAPES = [dict(B=64, d=48, F=2048, k=8, dtype=torch.float32)]
DEVICE = "cuda" if CUDA else "cpu"
LR = 1e-4


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def flashsae_step(B, d, F, k, dtype):
    sae = TopKSAE(d, F, k, dtype=dtype, device=DEVICE, sparse_grad=True)
    opt = SparseAdam(sae.parameters(), lr=LR, moment_dtype=torch.bfloat16 if CUDA else torch.float32, unit_norm=[sae.W_dec])
    x = torch.randn(B, d, device=DEVICE, dtype=dtype)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (sae(x).x_hat.float() - x.float()).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        _sync()

    return step


def dense_torch_step(B, d, F, k, dtype):
    factory = dict(device=DEVICE, dtype=dtype)
    W_dec = torch.randn(F, d, **factory)
    W_dec /= W_dec.float().norm(dim=1, keepdim=True).to(dtype)
    W_dec = torch.nn.Parameter(W_dec)
    W_enc = torch.nn.Parameter(W_dec.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(F, **factory))
    b_dec = torch.nn.Parameter(torch.zeros(d, **factory))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=LR)
    x = torch.randn(B, d, **factory)

    def step():
        opt.zero_grad(set_to_none=True)
        pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
        vals, idx = pre.topk(k, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, vals)
        x_hat = z @ W_dec + b_dec
        loss = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        loss.backward()
        with torch.no_grad():
            W, g = W_dec.float(), W_dec.grad.float()
            W_dec.grad.copy_(g - (g * W).sum(1, keepdim=True) * W)
            opt.step()
            W_dec.div_(W_dec.float().norm(dim=1, keepdim=True).to(dtype))
        _sync()

    return step


IMPLS = {"flashsae": flashsae_step, "dense_torch": dense_torch_step}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s['B']}-d{s['d']}-F{s['F']}-k{s['k']}-{str(s['dtype'])[6:]}")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_train_step(benchmark, impl, shape):
    benchmark.group = f"train_step B={shape['B']} d={shape['d']} F={shape['F']} k={shape['k']}"
    try:
        step = IMPLS[impl](**shape)
        step()  # optimizer moments, kernel compilation
    except torch.cuda.OutOfMemoryError:
        if CUDA:
            torch.cuda.empty_cache()
        pytest.skip(f"{impl} ran out of GPU memory at this shape")
    benchmark.pedantic(step, rounds=10 if CUDA else 5, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(impl=impl, ms_per_step=1e3 * mean, tokens_per_s=shape["B"] / mean, device=DEVICE)
