"""The training loop on any SAE, optimizer and stream of activation batches (no transformer needed).

`Trainer.step` is one optimization step: MSE loss plus the AuxK loss on dead features,
dead-feature tracking, non-finite checks, and metrics accumulated on the device (read back only
at log steps, so the hot loop has no host sync on a GPU). `fit` runs it over an iterable.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from ..optim import SparseAdam
from . import distributed as D
from .auxk import add_aux_k_grads_
from .diagnostics import FiringTracker

# A feature is dead when it has not fired in this many tokens (Gao et al. and the ASI paper use 10M).
DEFAULT_DEAD_WINDOW = 10_000_000


class NonFiniteError(FloatingPointError):
    """NaN or Inf in a batch of activations or in the loss."""


class Trainer:
    """One SAE, its optimizer and the run's per-step bookkeeping.

    ``parallel``: "none", "data" (x is this rank's slice of the global batch; gradients are
    summed over ranks, the firing statistics see the whole global batch) or "feature" (the model
    is a `FeatureParallelSAE` and every rank gets the whole batch; AuxK selects across the ranks).
    ``unit_norm_by_optimizer``: the optimizer keeps decoder rows on the sphere itself
    (`SparseAdam` with ``unit_norm=[W_dec]``); otherwise parallel gradient components are removed
    before and rows renormalized after each step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        tracker: FiringTracker | None = None,
        aux_k: int = 0,
        aux_coef: float = 1 / 32,
        dead_window: int = DEFAULT_DEAD_WINDOW,
        parallel: str = "none",
        unit_norm_by_optimizer: bool | None = None,
        check_every_step: bool | None = None,
    ) -> None:
        if parallel not in ("none", "data", "feature"):
            raise ValueError(f"parallel must be 'none', 'data' or 'feature', got {parallel!r}")
        self.model, self.optimizer, self.parallel = model, optimizer, parallel
        self.device = model.W_dec.device
        self.tracker = tracker or FiringTracker(model.n_features, dead_window, device=self.device)
        self.aux_k, self.aux_coef = aux_k, aux_coef
        if unit_norm_by_optimizer is None:
            unit_norm_by_optimizer = isinstance(optimizer, SparseAdam) and bool(optimizer._unit_norm)
        self.unit_norm_by_optimizer = unit_norm_by_optimizer
        # A host check costs nothing on CPU; on GPUs it is deferred to log and checkpoint steps.
        self.check_every_step = self.device.type == "cpu" if check_every_step is None else check_every_step
        self.step_count = 0
        self.world = D.get_world_size() if parallel == "data" else 1
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        # [squared error, centered variance, positive activations, aux loss * steps], float64 on device
        self._sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._tokens = 0
        self._steps = 0
        self._time = time.perf_counter()
        self._bad = torch.zeros(2, dtype=torch.int64, device=self.device)  # first bad step (x, loss), 0 = none

    def _note_nonfinite(self, x_bad: torch.Tensor, loss_bad: torch.Tensor) -> None:
        flags = torch.stack([x_bad, loss_bad]).to(torch.int64) * self.step_count
        self._bad = torch.where(self._bad == 0, flags, self._bad)
        if self.check_every_step:
            self.check_finite()

    def check_finite(self) -> None:
        """Raise NonFiniteError (naming the step) if any step so far saw NaN/Inf; one host sync."""
        bad_x, bad_loss = self._bad.tolist()
        if bad_x:
            raise NonFiniteError(f"step {bad_x}: the batch of activations contains NaN or Inf; training stopped")
        if bad_loss:
            raise NonFiniteError(f"step {bad_loss}: the loss is NaN or Inf; training stopped")

    def step(self, x: torch.Tensor) -> None:
        """One optimization step on x [b, d] (already normalized, on the model's device and dtype)."""
        self.step_count += 1
        model, opt = self.model, self.optimizer
        if self.check_every_step:  # stop before a bad batch touches the weights
            self._note_nonfinite(~torch.isfinite(x).all(), torch.zeros((), dtype=torch.bool, device=x.device))
        opt.zero_grad(set_to_none=True)
        out = model(x)
        err = out.x_hat.float() - x.float()
        sq_err = err.pow(2).sum()
        loss = sq_err / (x.shape[0] * self.world * x.shape[1])
        loss.backward()

        vals, idx = out.vals.detach(), out.idx
        if self.parallel == "data":
            vals, idx = _all_gather_cat(vals), _all_gather_cat(idx)
        aux = torch.zeros((), device=x.device)
        # AuxK starts once a whole window has been seen: before that "never fired" means nothing yet.
        if self.aux_k and self.aux_coef and self.tracker.tokens_seen >= self.tracker.window:
            dead = self.tracker.dead_mask().nonzero().squeeze(1)
            if dead.numel():
                residual = (-err).detach().to(x.dtype)
                denominator = residual.float().pow(2).sum()
                if self.parallel == "data":
                    dist.all_reduce(denominator)
                if self.parallel == "feature":
                    aux = model.add_aux_k_grads_(x, residual, dead, self.aux_k, self.aux_coef, denominator=denominator)
                else:
                    aux = add_aux_k_grads_(model, x, residual, dead, self.aux_k, self.aux_coef,
                                           denominator=denominator)
        self.tracker.update(vals, idx)

        stats = torch.stack([
            sq_err.double(), x.double().pow(2).sum(), (out.vals > 0).sum().double(), aux.double(),
        ])
        x_sum = x.double().sum(0)
        if self.parallel == "data":
            D.allreduce_gradients(model, average=False)
            packed = torch.cat([stats, x_sum])
            dist.all_reduce(packed)
            stats, x_sum = packed[:4], packed[4:]
        n = x.shape[0] * self.world
        stats[1] = stats[1] - x_sum.pow(2).sum() / n  # centered: sum ||x - mean(x)||^2
        self._note_nonfinite(torch.zeros((), dtype=torch.bool, device=x.device), ~torch.isfinite(stats[:2]).all())
        if not self.unit_norm_by_optimizer:
            model.remove_parallel_grads_()
        opt.step()
        if not self.unit_norm_by_optimizer:
            model.normalize_decoder_()
        self._sums += stats
        self._tokens += n
        self._steps += 1

    def read_metrics(self) -> dict[str, float]:
        """Metrics since the last call (one host sync), then reset: mse, fvu, l0, aux_loss, dead_frac, ..."""
        self.check_finite()
        sq_err, var, positives, aux = self._sums.tolist()
        tokens, steps = max(self._tokens, 1), max(self._steps, 1)
        elapsed = time.perf_counter() - self._time
        d = self.model.d_model
        metrics = {
            "mse": sq_err / (tokens * d),
            "fvu": sq_err / var if var > 0 else float("nan"),
            "l0": positives / tokens,
            "aux_loss": aux / steps,
            "dead_frac": self.tracker.dead_fraction(),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "tokens_per_s": self._tokens / elapsed if elapsed > 0 else float("nan"),
        }
        self._reset_metrics()
        return metrics


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` [b, ...] in rank order (all ranks' b must match)."""
    parts = [torch.empty_like(t) for _ in range(D.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor],
    *,
    norm_scale: float = 1.0,
    aux_k: int = 0,
    aux_coef: float = 1 / 32,
    dead_window: int = DEFAULT_DEAD_WINDOW,
    tracker: FiringTracker | None = None,
    parallel: str = "none",
    log_every: int = 0,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` on ``batches`` (each [b, d], scaled by ``norm_scale``); returns the metrics since the last log.

    The lower-level loop behind `train`, for synthetic or already-collected activations.
    ``on_log(step, metrics)`` is called every ``log_every`` steps (0: never).
    """
    trainer = Trainer(model, optimizer, tracker=tracker, aux_k=aux_k, aux_coef=aux_coef,
                      dead_window=dead_window, parallel=parallel)
    last: dict[str, float] = {}
    for x in batches:
        trainer.step((x.to(trainer.device, torch.float32) * norm_scale).to(model.dtype))
        if log_every and trainer.step_count % log_every == 0:
            last = trainer.read_metrics()
            if on_log is not None:
                on_log(trainer.step_count, last)
    trainer.check_finite()
    return trainer.read_metrics() if trainer._steps else last


@torch.no_grad()
def reconstruction_metrics(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """FVU, MSE and L0 of ``model`` on x [n, d] (normalized, on the model's device)."""
    sq_err = positives = 0.0
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        out = model(chunk)
        sq_err += float((out.x_hat.float() - chunk.float()).pow(2).sum())
        positives += float((out.vals > 0).sum())
    xf = x.double()
    var = float((xf - xf.mean(0)).pow(2).sum())
    return {"fvu": sq_err / var, "mse": sq_err / x.numel(), "l0": positives / x.shape[0]}
