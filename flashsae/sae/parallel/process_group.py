"""The torch.distributed process group: joining it under torchrun, and the few collectives the strategies share."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank (GPU index on its node) and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is set."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(backend: str | None = None, *, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for a lone process.

    backend: None picks NCCL when CUDA is available (and binds this process to GPU LOCAL_RANK),
    gloo otherwise. Without torchrun's variables returns rank 0 of 1 on cuda:0 or CPU.
    Idempotent: a second call returns the current group's info.
    """
    cuda = torch.cuda.is_available() and backend != "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, device)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend or ("nccl" if cuda else "gloo"),
            init_method="env://",
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if cuda else {}),
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_distributed() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a lone process): the rank that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_gather_list(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (all ranks' shapes must match), in rank order."""
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` [b, ...] along dim 0 in rank order (all ranks' shapes must match)."""
    return torch.cat(all_gather_list(t))
