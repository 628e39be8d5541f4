"""No host sync inside a training step: single process, data parallel and feature parallel, AuxK on.

On the CPU, `tests.sync_guard.SyncGuard` fails the step on any op that would make a CUDA stream wait
for the host; on a GPU the same guard also turns on ``torch.cuda.set_sync_debug_mode("error")``,
and the step is recorded in a CUDA graph and replayed (`flashsae.sae.trainer.CapturedStep`). The
torch encoder's CPU path sizes its survivor lists by the data and its Adam step compacts the touched
rows (both free on a CPU), so the CPU runs use their static variants, the ones the torch backend runs
on every other device.
"""
from __future__ import annotations

import dataclasses
import functools
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from flashsae import TopKSAE
from flashsae.kernels import torch_encode
from flashsae.kernels.registry import get_backend, override_backend
from flashsae.optim import SparseAdam
from flashsae.sae.parallel import process_group
from flashsae.sae.parallel.strategy import SingleProcess, make_strategy
from flashsae.sae.trainer import CapturedStep, Trainer
from tests.oracles import static_sparse_adam_step_
from tests.sync_guard import SyncError, SyncGuard
from tests.ranks import rank_main, run_ranks

D, F, K, B, AUX_K = 16, 203, 4, 24, 6
WINDOW = 2 * B  # AuxK switches on at the third step
EAGER_STEPS, GUARDED_STEPS = 3, 3
WORLD, TIMEOUT_S = 2, 80


def make_trainer(dtype: torch.dtype, device: str, strategy: SingleProcess | None = None, backend: str = "torch",
                 window: int = WINDOW) -> Trainer:
    torch.manual_seed(0)
    sae = TopKSAE(D, F, K, dtype=dtype, device=device, backend=backend, sparse_grad=True)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(F, device=device))
    strategy = strategy or SingleProcess()
    model = strategy.wrap(sae)
    opt = SparseAdam(model.parameters(), lr=1e-2, unit_norm=[model.W_dec], backend=backend)
    return Trainer(model, opt, strategy=strategy, aux_k=AUX_K, dead_window=window, check_every_step=False)


def batches(n: int, device: str, dtype: torch.dtype, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(B * world, D, generator=g) for _ in range(n)]
    return [x[rank * B : (rank + 1) * B].to(device=device, dtype=dtype) for x in data]


@contextmanager
def static_torch_encoder() -> Iterator[None]:
    """The torch backend with its static encoder and Adam step on the CPU too (see the module docstring)."""
    static = functools.partial(torch_encode.topk_encode, static=True)
    static_with_aux = functools.partial(torch_encode.topk_encode_with_aux, static=True)
    backend = dataclasses.replace(get_backend("torch", "cpu"), topk_encode=static, topk_encode_with_aux=static_with_aux,
                                  sparse_adam_step_=static_sparse_adam_step_)
    with override_backend("torch", backend):
        yield


def guarded_run(trainer: Trainer, xs: list[torch.Tensor]) -> dict:
    """EAGER_STEPS steps, then GUARDED_STEPS under the guard; the metrics of the guarded ones."""
    for x in xs[:EAGER_STEPS]:
        trainer.step(x)
    trainer.read_metrics()
    assert trainer._aux_active(), "AuxK must be on for the guarded steps"
    with SyncGuard():
        for x in xs[EAGER_STEPS:]:
            trainer.step(x)
    return trainer.read_metrics()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_process_step_with_aux_k_never_synchronizes(dtype):
    trainer = make_trainer(dtype, "cpu")
    with static_torch_encoder():
        metrics = guarded_run(trainer, batches(EAGER_STEPS + GUARDED_STEPS, "cpu", dtype))
    assert metrics["dead_frac"] > 0 and metrics["aux_loss"] > 0, metrics


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.sum().item(),
        lambda t: bool(t.sum() > 0),
        lambda t: int(t[0, 0] > 0),
        lambda t: t.tolist(),
        lambda t: t.numpy(),
        lambda t: t.nonzero(),
        lambda t: t[t > 0],
        lambda t: torch.unique(t),
        lambda t: torch.unique_consecutive(t),
        lambda t: torch.masked_select(t, t > 0),
        lambda t: torch.equal(t, t),
        lambda t: t.repeat_interleave(torch.tensor([1, 2, 1]), dim=0),
    ],
    ids=["item", "bool", "int", "tolist", "numpy", "nonzero", "mask-index", "unique", "unique_consecutive",
         "masked_select", "equal", "repeat_interleave"],
)
def test_the_guard_catches_every_kind_of_host_sync(call):
    t = torch.randn(3, 4)
    with pytest.raises(SyncError):
        with SyncGuard():
            call(t)
    with SyncGuard():  # and lets the sync-free counterparts through
        torch.where(t > 0, t, 0).sum()
        t.index_select(0, torch.tensor([2, 0]))
        t.repeat_interleave(torch.tensor([1, 2, 1]), dim=0, output_size=4)


def _rank_body(info: process_group.DistInfo) -> dict:
    result = {}
    for name in ("data", "feature"):
        strategy = make_strategy(name, info)
        world = strategy.data_shard()[1]
        xs = batches(EAGER_STEPS + GUARDED_STEPS, "cpu", torch.float32, info.rank if world > 1 else 0, world)
        try:
            with static_torch_encoder():
                result[name] = guarded_run(make_trainer(torch.float32, "cpu", strategy), xs)
        except SyncError:
            result[name] = {"sync": traceback.format_exc()}
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    rank_main(rank, port, out_dir, WORLD, TIMEOUT_S, _rank_body)


def test_data_and_feature_parallel_steps_with_aux_k_never_synchronize(tmp_path):
    for r, res in enumerate(run_ranks(_worker, tmp_path, WORLD, TIMEOUT_S)):
        for name in ("data", "feature"):
            assert "sync" not in res[name], f"rank {r}, {name} parallel:\n{res[name]['sync']}"
            assert res[name]["dead_frac"] > 0 and res[name]["aux_loss"] > 0, (r, name, res[name])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_step_with_aux_k_never_synchronizes(dtype):
    trainer = make_trainer(dtype, "cuda", backend="auto")
    metrics = guarded_run(trainer, batches(EAGER_STEPS + GUARDED_STEPS, "cuda", dtype))
    assert metrics["dead_frac"] > 0 and metrics["aux_loss"] > 0, metrics


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_train_exactly_as_eager_steps(dtype):
    """The same batches eagerly and through a CapturedStep (recorded before the AuxK window and again
    when AuxK switches on) end with the same weights, optimizer state and metrics."""
    xs = batches(6, "cuda", dtype)
    eager = make_trainer(dtype, "cuda", backend="auto", window=4 * B)
    for x in xs:
        eager.step(x)
    graphed = make_trainer(dtype, "cuda", backend="auto", window=4 * B)
    graphed.step(xs[0])  # the optimizer's state exists before recording
    step = CapturedStep(graphed, xs[1])  # recorded without AuxK
    assert not step.aux_active
    for x in xs[2:]:  # AuxK switches on at the fifth step: recorded again
        step(x)
    assert step.aux_active
    assert graphed.step_count == eager.step_count and graphed.tracker.tokens_seen == eager.tracker.tokens_seen
    for (name, a), b in zip(graphed.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for a, b in zip(graphed.optimizer.state.values(), eager.optimizer.state.values()):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert torch.equal(graphed.tracker.last_fired, eager.tracker.last_fired)
    got, expected = graphed.read_metrics(), eager.read_metrics()
    for key in ("mse", "fvu", "l0", "aux_loss", "dead_frac"):
        assert got[key] == expected[key], key
