"""Training metrics: ``OUT/metrics.jsonl`` always, TensorBoard and Weights & Biases when asked for.

A resumed run first cuts ``metrics.jsonl`` back to its checkpoint's step (`truncate_metrics`), so
the steps it trains again are logged once.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..atomic import atomic_write

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # where wandb.init(dir=OUT) keeps its files


def check_log_backends(backends: Iterable[str]) -> None:
    """Fail before any work when a requested metrics sink is not installed."""
    needs = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for backend in backends:
        if backend in needs and importlib.util.find_spec(needs[backend]) is None:
            raise ValueError(f"--log {backend} needs the {needs[backend]} package (pip install {needs[backend]})")


class MetricsLog:
    """``OUT/metrics.jsonl`` (always) plus TensorBoard and/or Weights & Biases when asked for."""

    def __init__(self, out: Path, backends: Iterable[str], config: dict[str, Any], enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / METRICS_FILE
        self.tb = self.wandb = None
        if not enabled:
            return
        backends = set(backends)
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("--log tensorboard needs the tensorboard package (pip install tensorboard)") from exc
            self.tb = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
        if "wandb" in backends:
            try:
                import wandb
            except ImportError as exc:
                raise ValueError("--log wandb needs the wandb package (pip install wandb)") from exc
            self.wandb = wandb.init(project="flashsae", dir=str(out), config=config)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(f"train/{name}", value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate_metrics(out: Path, step: int) -> int:
    """Keep only the records of ``OUT/metrics.jsonl`` up to ``step`` (and drop a line cut short by a kill),
    atomically; returns how many records were dropped. A resumed run calls it with its checkpoint's step."""
    path = out / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) != len(lines):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def format_metrics(step: int, record: dict[str, Any]) -> str:
    """One progress line of a metrics record (k and the subspace energy only when they are logged)."""
    extra = f" | k {record['k']}" if "k" in record else ""
    if "subspace_energy" in record:
        extra += f" | in subspace {record['subspace_energy']:.3f}"
    return (
        f"step {step} | tokens {record['tokens']} | mse {record['mse']:.4g} | fvu {record['fvu']:.4f} | "
        f"l0 {record['l0']:.1f} | dead {100 * record['dead_frac']:.1f}% | aux {record['aux_loss']:.4g} | "
        f"lr {record['lr']:.3g}{extra} | {record['tokens_per_s']:.0f} tok/s"
    )
