"""Running a function on several CPU processes (gloo) for the distributed tests."""
from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from flashsae.sae.parallel import process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, out_dir: str, world: int, timeout_s: float,
              body: Callable[[process_group.DistInfo], dict]) -> None:
    """A spawned rank: join the gloo group as torchrun would, run ``body(info)`` on one thread and save
    its dict (or the traceback, as "error") for `run_ranks`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        info = process_group.init_distributed(timeout_s=timeout_s)
        result = body(info)
        process_group.destroy_distributed()
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(worker: Callable[[int, int, str], None], out_dir: Path, world: int, timeout_s: float) -> list[dict]:
    """Spawn ``worker(rank, port, out_dir)`` for every rank; each saves a dict to ``out_dir/rank{r}.pt``.

    Returns the ranks' dicts in rank order; fails the test when a rank hangs or saved an "error".
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} rank(s) did not finish within {timeout_s}s"
    results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results
