"""Time per training step on CPU (gloo): single process vs 2-rank data parallel vs 2-rank feature parallel.

Run: ``python benchmarks/distributed_overhead.py [--d 64 --features 4096 --k 16 --batch 256]``.
Every process uses one thread, so the 2-rank runs use twice the cores of the single one; the
numbers show the cost of the collectives and the extra work each scheme does, not a speedup
(gloo on CPU is a correctness path; NCCL on GPUs is the production one). Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from flashsae.sae.model import TopKSAE
from flashsae.sae.parallel import process_group
from flashsae.sae.parallel.strategy import SingleProcess, make_strategy
from flashsae.sae.trainer import Trainer


def timed_steps(sae: TopKSAE, x_batches, strategy: SingleProcess) -> list[float]:
    """Seconds per `Trainer.step` (the product step, AuxK off) under ``strategy``."""
    model = strategy.wrap(sae)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), strategy=strategy)
    times = []
    for x in x_batches:
        process_group.barrier()
        start = time.perf_counter()
        trainer.step(x)
        times.append(time.perf_counter() - start)
    return times


def make(args) -> tuple[TopKSAE, list[torch.Tensor]]:
    torch.manual_seed(0)
    sae = TopKSAE(args.d, args.features, args.k, backend="torch")
    data = [torch.randn(args.batch, args.d) for _ in range(args.warmup + args.steps)]
    return sae, data


def worker(rank: int, port: int, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = process_group.init_distributed()
    sae, data = make(args)
    half = args.batch // 2
    dp = timed_steps(sae, [x[rank * half : (rank + 1) * half] for x in data], make_strategy("data", info))
    sae, data = make(args)
    fp = timed_steps(sae, data, make_strategy("feature", info))
    process_group.destroy_distributed()
    if rank == 0:
        torch.save({"data": dp[args.warmup :], "feature": fp[args.warmup :]}, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="distributed_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sae, data = make(args)
    single = timed_steps(sae, data, SingleProcess())[args.warmup :]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = args.out + ".ranks.pt"
    mp.spawn(worker, args=(port, args, tmp), nprocs=2, join=True)
    ranks = torch.load(tmp)
    os.unlink(tmp)
    result = {"config": vars(args), "ms_per_step": {}}
    for name, times in (("single", single), ("data_parallel_2", ranks["data"]), ("feature_parallel_2", ranks["feature"])):
        result["ms_per_step"][name] = round(1000 * statistics.median(times), 2)
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
