"""What ``flashsae paper`` runs: one `PaperPlan`, from a preset and the command line's overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..hf import DEFAULT_TEXT, EMBEDDED_MODEL
from ..hf.texts import STDLIB_TEXT


@dataclass(frozen=True)
class PaperPlan:
    """The experiments' sizes; every run shares ``seed``, the data order and the token budget.

    Collapse: spectra per layer and site over ``rank_tokens`` tokens. SAEs: at ``site`` of ``layer``,
    trained on ``train_tokens`` tokens (one pass, batches of ``batch_size``) at dictionary sizes
    ``expansions`` x d, random vs ASI (``d_init``); the ``d_init`` sweep (``d_init_sweep`` fractions of d
    plus the 99%-variance rank) at ``sweep_expansion``; k annealed from ``anneal_factor`` x k over the first
    ``anneal_fraction`` of the steps at ``anneal_expansion``; initial-scale calibration at
    ``calibrate_expansion``. Evaluation on ``eval_tokens`` tokens of the held-out documents (one in ten, as
    `flashsae eval` picks them), never collected for training.
    """

    model: str = EMBEDDED_MODEL
    text: str = STDLIB_TEXT
    site: str = "attn_out"
    layer: int = 3
    seq_len: int = 128
    rank_tokens: int = 50_000
    train_tokens: int = 131_072
    eval_tokens: int = 16_384
    k: int = 32
    batch_size: int = 512
    lr_scale: float = 4.0
    aux_k: int = 0
    dead_window: int = 65_536
    expansions: tuple[int, ...] = (8, 32, 128)
    d_init: float = 0.5
    d_init_sweep: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    sweep_expansion: int = 32
    anneal_expansion: int = 32
    anneal_factor: int = 4
    anneal_fraction: float = 0.5
    calibrate_expansion: int = 8
    log_every: int = 16
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"

    def replace(self, **changes: object) -> "PaperPlan":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# About an hour on a 2-core CPU (the cost grows with train_tokens x the sum of the runs' F): the
# size sweep spans 8x-128x; the d_init and anneal sweeps share the 32x runs.
FULL = PaperPlan()
# A few minutes on a 2-core CPU: every part of the report, at toy sizes.
QUICK = PaperPlan(
    text=DEFAULT_TEXT, rank_tokens=1024, train_tokens=4096, eval_tokens=512, batch_size=256, expansions=(1, 2),
    d_init_sweep=(0.3,), sweep_expansion=2, anneal_expansion=2, calibrate_expansion=1, dead_window=2048, log_every=4,
    seq_len=64,
)
