"""The one optimization step, for any SAE, optimizer and parallel strategy (no transformer needed).

`Trainer.step` is the only training step in flashsae, for every `flashsae.sae.architecture`
variant: MSE loss (a transcoder's against its target; a Matryoshka model's summed over its
levels) plus the AuxK loss on dead features in one backward pass, dead-feature tracking, a BatchTopK
model's threshold estimate, non-finite checks, and metrics accumulated on the device. Nothing in a step makes the host wait on the device (sizes are fixed by the batch, which
and how many features are dead or fired stays on the device): checks and metrics are read back
only at log and checkpoint steps, and the step can be recorded once in a CUDA graph and replayed
(`CapturedStep`). What differs between one process, data parallel and feature parallel comes from
the `flashsae.sae.parallel` strategy it is given.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..optim import SparseAdam
from .diagnostics import FiringTracker
from .losses import aux_k_loss_from_selection
from .model import SAEOutput, Selection, TopKSAE
from .parallel.strategy import SingleProcess

# A feature is dead when it has not fired in this many tokens (Gao et al. and the ASI paper use 10M).
DEFAULT_DEAD_WINDOW = 10_000_000


class NonFiniteError(FloatingPointError):
    """NaN or Inf in a batch of activations or in the loss."""


class Trainer:
    """One SAE, its optimizer and the run's per-step bookkeeping.

    ``model``: the SAE this rank trains (``strategy.wrap(sae)``). ``k_schedule(steps taken)`` sets the
    model's k before each step (k annealing); None keeps it. ``lr_schedule(steps taken)`` multiplies
    each parameter group's learning rate as the optimizer held it when the trainer was built (warm-up
    and decay, `flashsae.sae.schedules.lr_factor`); None keeps the rates. ``strategy``: how the step is
    spread over processes (default: one process); x given to `step` is this rank's part of the
    global batch as the strategy's ``data_shard`` says. The decoder rows stay on the unit sphere:
    by the optimizer itself when it is a `SparseAdam` that normalizes W_dec, otherwise by removing
    the gradient's parallel component before and renormalizing the rows after each step.
    """

    def __init__(
        self,
        model: TopKSAE,
        optimizer: torch.optim.Optimizer,
        *,
        strategy: SingleProcess | None = None,
        tracker: FiringTracker | None = None,
        aux_k: int = 0,
        aux_coef: float = 1 / 32,
        dead_window: int = DEFAULT_DEAD_WINDOW,
        k_schedule: Callable[[int], int] | None = None,
        lr_schedule: Callable[[int], float] | None = None,
        check_every_step: bool | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.strategy = strategy or SingleProcess()
        self.device = model.W_dec.device
        self.tracker = tracker or FiringTracker(model.n_features, dead_window, device=self.device)
        self.aux_k, self.aux_coef = aux_k, aux_coef
        self.k_schedule = k_schedule
        self.lr_schedule = lr_schedule
        # The rates the schedule multiplies: read now, so a resumed optimizer state (whose groups hold
        # the scheduled rate of its last step) does not change them.
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.unit_norm_by_optimizer = isinstance(optimizer, SparseAdam) and optimizer.normalizes(model.W_dec)
        # A host check costs nothing on CPU; on GPUs it is deferred to log and checkpoint steps.
        self.check_every_step = self.device.type == "cpu" if check_every_step is None else check_every_step
        # On the device, updated in place (a recorded step keeps writing into them): the step number;
        # [squared error, centered variance, positive activations, aux loss * steps, then the squared
        # error of each Matryoshka level below the whole] in float64; the first bad step (x, loss), 0 = none.
        self._step_index = torch.zeros((), dtype=torch.int64, device=self.device)
        self._inner_widths = list(model.arch.matryoshka_widths[:-1]) if model.arch.nested else []
        self._sums = torch.zeros(4 + len(self._inner_widths), dtype=torch.float64, device=self.device)
        self._bad = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.step_count = 0
        self._reset_metrics()

    @property
    def step_count(self) -> int:
        """Steps taken (the host's count; a resumed run sets it, and the device's copy follows)."""
        return self._step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step_count = value
        self._step_index.fill_(value)

    def _reset_metrics(self) -> None:
        self._sums.zero_()
        self._bad.zero_()
        self._tokens = 0
        self._steps = 0
        self._time = time.perf_counter()

    def _note_nonfinite(self, x_bad: torch.Tensor, loss_bad: torch.Tensor) -> None:
        flags = torch.stack([x_bad, loss_bad]).to(torch.int64) * self._step_index
        self._bad.copy_(torch.where(self._bad == 0, flags, self._bad))  # in place: a recorded step keeps it
        if self.check_every_step:
            self.check_finite()

    def check_finite(self) -> None:
        """Raise NonFiniteError (naming the step) if any step so far saw NaN/Inf; one host sync."""
        bad_x, bad_loss = self._bad.tolist()
        if bad_x:
            raise NonFiniteError(f"step {bad_x}: the batch of activations contains NaN or Inf; training stopped")
        if bad_loss:
            raise NonFiniteError(f"step {bad_loss}: the loss is NaN or Inf; training stopped")

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """One optimization step on x [b, d] (already normalized, on the model's device and dtype) and, for a
        transcoder, its target y [b, d_out] (likewise); no host sync (a BatchTopK model's selection has
        one: its codes' width depends on the batch)."""
        if self.model.arch.transcoder != (y is not None):
            raise ValueError("a transcoder's step needs its target y [b, d_out]" if y is None else
                             "y is the target of a transcoder; this model reconstructs its input x")
        self._schedule_k()
        self._schedule_lr()
        aux_active = self._aux_active()
        self._count_step(x.shape[0])
        self._device_step(x, y, aux_active)

    def _schedule_k(self) -> None:
        """Set the model's k for the next step from ``k_schedule`` (k annealing); a host decision."""
        if self.k_schedule is not None:
            self.model.k = self.k_schedule(self.step_count)

    def _schedule_lr(self) -> None:
        """Set each group's learning rate for the next step from ``lr_schedule``; a host decision."""
        if self.lr_schedule is not None:
            factor = self.lr_schedule(self.step_count)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor

    def _count_step(self, local_tokens: int) -> None:
        """The host's count of steps and tokens for the metrics (the device counts its own steps)."""
        self._step_count += 1
        self._tokens += self.strategy.global_tokens(local_tokens)
        self._steps += 1

    def current_lrs(self) -> list[float]:
        """Each parameter group's learning rate now."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def _aux_active(self) -> bool:
        """AuxK runs once a whole window has been seen: before that "never fired" means nothing yet."""
        return bool(self.aux_k and self.aux_coef and self.tracker.tokens_seen >= self.tracker.window)

    def _device_step(self, x: torch.Tensor, y: torch.Tensor | None, aux_active: bool) -> None:
        """Everything `step` does on the device, reading only device state (capturable in a CUDA graph)."""
        model, opt, strategy = self.model, self.optimizer, self.strategy
        target = x if y is None else y
        self._step_index += 1
        if self.check_every_step:  # stop before a bad batch touches the weights
            bad_x = ~torch.isfinite(x).all() if y is None else ~(torch.isfinite(x).all() & torch.isfinite(y).all())
            self._note_nonfinite(bad_x, torch.zeros((), dtype=torch.bool, device=x.device))
        opt.zero_grad(set_to_none=True)
        out, aux_selection = self._forward(x, aux_active)
        err = out.x_hat.float() - target.float()
        sq_err = err.pow(2).sum()
        inner = self._inner_errors(out.levels, target)
        n = strategy.global_tokens(x.shape[0])
        loss = (sq_err + inner.sum()) / (n * target.shape[1])
        aux = self._aux_k_loss(aux_selection, err) if aux_active else torch.zeros((), device=x.device)
        (loss + self.aux_coef * aux).backward()
        codes = strategy.gather_codes(out.vals.detach(), out.idx)
        self.tracker.update(*codes)
        if model.arch.batch_topk:
            model.update_threshold_(codes[0])
        strategy.reduce_gradients(model)
        stats = torch.stack([
            sq_err.double(), target.double().pow(2).sum(), (out.vals > 0).sum().double(), aux.detach().double(),
            *inner.detach().double(),
        ])
        packed = strategy.reduce_sum(torch.cat([stats, target.double().sum(0)]))
        stats, t_sum = packed[: stats.shape[0]], packed[stats.shape[0] :]
        stats[1] = stats[1] - t_sum.pow(2).sum() / n  # centered: sum ||target - mean(target)||^2
        self._note_nonfinite(torch.zeros((), dtype=torch.bool, device=x.device), ~torch.isfinite(stats[:2]).all())
        if not self.unit_norm_by_optimizer:
            model.remove_parallel_grads_()
        opt.step()
        if not self.unit_norm_by_optimizer:
            model.normalize_decoder_()
        self._sums += stats

    def _inner_errors(self, levels: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """The squared error of each Matryoshka level below the whole ([G - 1] fp32; empty without levels)."""
        if levels is None:
            return torch.zeros(0, device=target.device)
        return (levels[:-1].float() - target.float()).pow(2).sum((1, 2))

    def _forward(self, x: torch.Tensor, aux_active: bool) -> tuple[SAEOutput, Selection | None]:
        """The model's output on x and, with AuxK active, its selection among the features dead before this
        batch, from the same encoder pass. The step's own NaN/Inf check is deferred (no host sync)."""
        if not aux_active:
            return self.model(x, check_finite=False), None
        return self.model.forward_with_aux(x, self.tracker.dead_mask(), self.aux_k, check_finite=False)

    def _aux_k_loss(self, selection: Selection, err: torch.Tensor) -> torch.Tensor:
        """The AuxK loss of the dead features' ``selection`` (differentiable; 0 when none is dead)."""
        residual = (-err).detach().to(self.model.dtype)
        denominator = self.strategy.reduce_sum(residual.float().pow(2).sum())
        return aux_k_loss_from_selection(self.model, selection, residual, self.tracker.dead_mask(),
                                         denominator=denominator)

    def read_metrics(self) -> dict[str, float]:
        """Metrics since the last call (one host sync), then reset: mse, fvu, l0, aux_loss, dead_frac, ...;
        a Matryoshka model's ``fvu_m{width}`` of each level below the whole, a BatchTopK model's
        ``threshold``."""
        self.check_finite()
        sq_err, var, positives, aux, *inner = self._sums.tolist()
        tokens, steps = max(self._tokens, 1), max(self._steps, 1)
        elapsed = time.perf_counter() - self._time
        d = self.model.d_out
        metrics = {
            "mse": sq_err / (tokens * d),
            "fvu": sq_err / var if var > 0 else float("nan"),
            "l0": positives / tokens,
            "aux_loss": aux / steps,
            "dead_frac": self.tracker.dead_fraction(),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "tokens_per_s": self._tokens / elapsed if elapsed > 0 else float("nan"),
        }
        for width, level_err in zip(self._inner_widths, inner):
            metrics[f"fvu_m{width}"] = level_err / var if var > 0 else float("nan")
        if self.model.arch.batch_topk:
            metrics["threshold"] = float(self.model.threshold)
        self._reset_metrics()
        return metrics


class CapturedStep:
    """`Trainer.step` recorded once in a CUDA graph and replayed for every later batch (CUDA only).

    ``CapturedStep(trainer, x)`` (a transcoder's: ``CapturedStep(trainer, x, y)``) runs the step on
    ``x`` eagerly on a side stream (the warm-up a capture needs: lazily created state, library
    workspaces), then records it; each call ``captured(x)`` (``captured(x, y)``) copies x (the
    recorded shape and dtype) into the recorded input and replays,
    then does the host's bookkeeping a replay skips. The step reads only device state, so replays
    train exactly as eager steps would. It is recorded again (with that batch run eagerly first)
    when AuxK switches on after the dead-feature window and whenever ``k_schedule`` changes k or
    ``lr_schedule`` the learning rate (the optimizer's launch reads the rate as a number), so a run
    records again at every step of a warm-up or decay. A parallel strategy whose collectives cannot
    be captured, or replaced parameter tensors need a new CapturedStep. A BatchTopK model's step
    cannot be recorded: the width of its codes depends on each batch.
    """

    def __init__(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        if x.device.type != "cuda":
            raise ValueError(f"CapturedStep needs CUDA tensors, got x on {x.device}")
        if trainer.model.arch.batch_topk:
            raise ValueError("a BatchTopK step cannot be recorded in a CUDA graph: its codes' width depends on the "
                             "batch; call Trainer.step instead")
        self.trainer = trainer
        self.x = torch.empty_like(x)
        self.y = None if y is None else torch.empty_like(y)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._record(x, y)

    def _record(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Run ``x``'s step eagerly on a side stream, then record the step on the same stream."""
        trainer = self.trainer
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            self.x.copy_(x)
            if y is not None:
                self.y.copy_(y)
            trainer.step(self.x, self.y)
            trainer._schedule_k()
            trainer._schedule_lr()
            self.aux_active, self.k, self.lrs = trainer._aux_active(), trainer.model.k, trainer.current_lrs()
            tokens_seen = trainer.tracker.tokens_seen
            self.graph = None  # free the previous recording's memory first
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                trainer._device_step(self.x, self.y, self.aux_active)
            trainer.tracker.count_tokens(tokens_seen - trainer.tracker.tokens_seen)  # recording ran nothing
            self.graph = graph
        torch.cuda.current_stream(x.device).wait_stream(stream)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """One training step on x [b, d] (and a transcoder's target y), the recorded shapes, dtype and device."""
        trainer = self.trainer
        trainer._schedule_k()
        trainer._schedule_lr()
        if trainer._aux_active() != self.aux_active or trainer.model.k != self.k or trainer.current_lrs() != self.lrs:
            self._record(x, y)
            return
        for name, given, recorded in (("x", x, self.x), ("y", y, self.y)):
            if (given is None) != (recorded is None):
                raise ValueError(f"{name} must be {'given' if recorded is not None else 'None'}, as recorded")
            if given is not None and (given.shape, given.dtype, given.device) != (recorded.shape, recorded.dtype,
                                                                                  recorded.device):
                raise ValueError(f"{name} must be {tuple(recorded.shape)} {recorded.dtype} on {recorded.device} as "
                                 f"recorded, got {tuple(given.shape)} {given.dtype} on {given.device}")
        self.x.copy_(x)
        if y is not None:
            self.y.copy_(y)
        trainer._count_step(x.shape[0])
        self.graph.replay()
        trainer.tracker.count_tokens(trainer.strategy.global_tokens(x.shape[0]))


@torch.no_grad()
def reconstruction_metrics(
    model: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096, *, target: torch.Tensor | None = None
) -> dict[str, float]:
    """FVU, MSE and L0 of ``model`` on x [n, d] (normalized, on the model's device) against ``target``
    [n, d_out] (default x; a transcoder's target), in eval mode (a BatchTopK model encodes with its
    JumpReLU threshold; in training mode, before any batch has set one, with its batch selection)."""
    target = x if target is None else target
    sq_err = positives = 0.0
    was_training = model.training
    if getattr(getattr(model, "arch", None), "batch_topk", False) and model.threshold < 0:
        model.train()
    else:
        model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            out = model(x[start : start + batch_size])
            sq_err += float((out.x_hat.float() - target[start : start + batch_size].float()).pow(2).sum())
            positives += float((out.vals > 0).sum())
    finally:
        model.train(was_training)
    tf = target.double()
    var = float((tf - tf.mean(0)).pow(2).sum())
    return {"fvu": sq_err / var, "mse": sq_err / target.numel(), "l0": positives / x.shape[0]}
