"""How a training step is spread over processes: the single-process strategy every other one refines.

`flashsae.sae.trainer.Trainer.step` is the one optimization step; a strategy tells it (and the
driver) what differs between running alone, data parallel and feature parallel:

- `wrap`: the model each rank trains (feature parallel: this rank's slice of the dictionary),
- `data_shard`: which rows of each global batch this rank reads,
- `global_tokens`: the batch size the loss is normalized by,
- `gather_codes` / `reduce_gradients` / `reduce_sum`: the collectives around the step,
- `full_model`, `save_checkpoint`, `optimizer_state`: what is saved and restored, and by whom.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError
from ..run import checkpoints
from ..model import TopKSAE
from .process_group import DistInfo, get_rank, get_world_size

STRATEGIES = ("auto", "none", "data", "feature")


class SingleProcess:
    """One process holds everything: every collective is the identity."""

    name = "none"

    def __init__(self, info: DistInfo | None = None) -> None:
        self.rank = get_rank() if info is None else info.rank
        self.world_size = get_world_size() if info is None else info.world_size

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes files."""
        return self.rank == 0

    def wrap(self, sae: TopKSAE) -> TopKSAE:
        """The model this rank trains, made from the whole ``sae``."""
        return sae

    def data_shard(self) -> tuple[int, int]:
        """(shard, shards): this rank reads rows [shard * b, (shard + 1) * b) of every global batch of shards * b."""
        return 0, 1

    def global_tokens(self, local_tokens: int) -> int:
        """Tokens in the global batch when this rank's batch holds ``local_tokens``."""
        return local_tokens * self.data_shard()[1]

    def gather_codes(self, vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole global batch's (vals, idx) [B, k] from this rank's."""
        return vals, idx

    def reduce_gradients(self, model: TopKSAE) -> None:
        """Turn this rank's gradients into the global batch's, in place."""

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks that split the batch of a per-rank statistic ``t``."""
        return t

    def reduce_over_features(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks that split the features of a per-rank statistic ``t`` of their features."""
        return t

    def full_model(self, model: TopKSAE) -> TopKSAE | None:
        """The whole SAE on the main rank (None elsewhere); a collective when the features are split."""
        return model

    def save_checkpoint(
        self, root: Path, model: TopKSAE, optimizer: torch.optim.Optimizer, state: Any, config: dict[str, Any]
    ) -> None:
        """Write a full training-state checkpoint of ``state.step`` under ``root`` (the main rank writes)."""
        if self.is_main:
            checkpoints.save_checkpoint(root, sae=model, optimizer=optimizer, state=state, config=config)

    def optimizer_state(self, resumed: dict[str, Any]) -> dict[str, Any]:
        """This rank's optimizer state_dict from a checkpoint read by `load_checkpoint`."""
        if resumed["optimizer_shards"]:
            raise ConfigError(
                f"{resumed['path']} is a feature-parallel checkpoint: resume it with --parallel feature under "
                f"torchrun --nproc-per-node {resumed['optimizer_shards']}"
            )
        return resumed["optimizer"]


def make_strategy(name: str, info: DistInfo) -> SingleProcess:
    """The strategy called ``name`` (one of `STRATEGIES`) for this process; one rank always trains alone."""
    from .data import DataParallel
    from .feature import FeatureParallel

    if name not in STRATEGIES:
        raise ValueError(f"parallel must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if info.world_size == 1 or name == "none":
        return SingleProcess(info)
    if name == "feature":
        return FeatureParallel(info)
    return DataParallel(info)
