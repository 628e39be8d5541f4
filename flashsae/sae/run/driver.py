"""The training driver: `train(TrainConfig) -> summary`, what ``flashsae train`` runs.

A run is set up (`_set_up`: the resumed checkpoint, the run directory and its identity
(`flashsae.sae.run.rundir`), the parallel strategy, the activation source, the sizes and
hyper-parameters, the SAE and its `Trainer`), looped (`_loop`: epochs over the
store's deterministic batch order, metrics, checkpoints) and finished (`_finish`: evaluation, the
final SAE, the firing-density plot and ``summary.json``). Full training-state checkpoints
(`flashsae.sae.run.checkpoints`) make ``--resume`` continue bit-for-bit on CPU. Under ``torchrun``
the strategy (`flashsae.sae.parallel`) decides what each rank holds and reads; rank 0 alone logs
and writes files.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ...checks import parse_dtype
from ...errors import ConfigError
from ...optim import SparseAdam
from ..architecture import Architecture
from ..asi import active_subspace, init_active_subspace, resolve_d_init
from ..atomic import atomic_write
from ..diagnostics import FiringTracker, plot_firing_density, subspace_energy_sums
from ..model import CONFIG_FILE, TopKSAE, read_saved_config
from ..parallel import process_group
from ..parallel.strategy import SingleProcess, make_strategy
from ..schedules import linear_k, lr_factor
from ..store import ActivationStore, split_pairs
from ..trainer import DEFAULT_DEAD_WINDOW, NonFiniteError, Trainer, reconstruction_metrics
from . import checkpoints, rundir
from .config import TrainConfig, default_aux_k, default_lr, merge_resumed_config, resolve_dtype
from .metrics_log import MetricsLog, check_log_backends, format_metrics, truncate_metrics
from .rundir import DENSITY_PLOT, FINAL_DIR, SUMMARY_FILE, RunIdentity
from .source import leading_tokens, mean_sq_norm_scale, open_activation_source

NORM_TOKENS = 1 << 16  # tokens used to estimate the normalization scale
EVAL_TOKENS = 1 << 16  # tokens of the final evaluation in the summary


@dataclass
class Position:
    """Where a run stands: ``step`` steps and ``tokens`` tokens done; the next batch is ``batch`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens: int = 0


@dataclass
class Run:
    """Everything a set-up run holds; built by `_set_up`, advanced by `_loop`, summarized by `_finish`."""

    cfg: TrainConfig
    identity: RunIdentity
    info: process_group.DistInfo
    strategy: SingleProcess
    device: torch.device
    out: Path
    source: ActivationStore
    n_batches: int
    dtype: torch.dtype
    norm_scale: float
    target_scale: float | None  # a transcoder's normalization of its targets; None for an autoencoder
    model: TopKSAE
    trainer: Trainer
    position: Position
    resumed_from: Path | None
    subspace: torch.Tensor | None  # V [d, d_init] of the activations, when the decoder's energy in it is logged

    @property
    def total_steps(self) -> int:
        return self.n_batches * self.cfg.epochs

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A stored batch as the SAE trains on it: (inputs, a transcoder's targets or None), on the device,
        normalized, in the SAE's dtype."""
        x, y = split_pairs(rows.to(self.device), self.source.target_width)
        x = (x * self.norm_scale).to(self.dtype)
        return x, None if y is None else (y * self.target_scale).to(self.dtype)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg`` to the end; returns the summary (also written to ``OUT/summary.json`` by rank 0)."""
    start_time = time.perf_counter()
    resumed: dict[str, Any] | None = None
    if cfg.resume:
        resumed = checkpoints.load_checkpoint(rundir.latest_run_checkpoint(cfg.resume, notify=_note))
        cfg = merge_resumed_config(resumed["config"], cfg.to_dict())
    cfg.validate()
    check_log_backends(cfg.log)
    run = _set_up(cfg, resumed)
    _loop(run)
    return _finish(run, start_time)


# --------------------------------------------------------------------------------------------- set-up
def _set_up(cfg: TrainConfig, resumed: dict[str, Any] | None) -> Run:
    info = process_group.init_distributed(timeout_s=1800.0)
    strategy = make_strategy(cfg.parallel, info)
    if resumed is not None:
        resumed["optimizer"] = strategy.optimizer_state(resumed)
    device = _resolve_device(cfg, info)
    cfg, identity, recollect = _take_out_dir(cfg, info, resumed)
    source, origin = open_activation_source(cfg, info, recollect=recollect)
    n_batches = _check_batch_size(cfg, source, strategy)
    _check_variant(cfg, source, strategy)
    dtype = _resolve_dtype(cfg, device, resumed)
    state: checkpoints.TrainerState | None = resumed["trainer"] if resumed is not None else None
    norm_scale, target_scale = _scales(cfg, source, state)
    x0, y0 = split_pairs(leading_tokens(source, cfg.asi_tokens, cfg.seed), source.target_width)
    x0, y0 = x0 * norm_scale, None if y0 is None else y0 * target_scale
    if not torch.isfinite(x0).all() or (y0 is not None and not torch.isfinite(y0).all()):
        raise NonFiniteError(f"the run's first {x0.shape[0]} tokens (--asi-tokens) contain NaN or Inf; nothing was trained")
    # The decoder's space: a transcoder's targets.
    subspace = _active_subspace(cfg, x0 if y0 is None else y0) if cfg.init == "asi" or cfg.track_subspace else None
    origin = {**origin, "run_id": identity.run_id}
    sae = _build_sae(cfg, source, origin, (norm_scale, target_scale), dtype, resumed, (x0, y0), subspace)
    model = strategy.wrap(sae.to(device))
    dead_window = cfg.dead_window or min(DEFAULT_DEAD_WINDOW, n_batches * cfg.batch_size)
    trainer = _build_trainer(cfg, model, strategy, dead_window, source.input_width, device, n_batches * cfg.epochs)
    position = Position()
    if resumed is not None:
        trainer.optimizer.load_state_dict(resumed["optimizer"])
        trainer.tracker.load_state_dict(state.firing)
        checkpoints.restore_rng(state.rng)
        position = Position(state.step, state.epoch, state.batch, state.step * cfg.batch_size)
    trainer.step_count = position.step
    return Run(cfg, identity, info, strategy, device, Path(cfg.out), source, n_batches, dtype, norm_scale,
               target_scale, model, trainer, position, resumed["path"] if resumed is not None else None, subspace)


def _scales(
    cfg: TrainConfig, source: ActivationStore, state: checkpoints.TrainerState | None
) -> tuple[float, float | None]:
    """(the inputs' normalization scale, a transcoder's targets' or None): a resumed run's own, else
    estimated from the run's first tokens (--normalize mean-sq-norm) or 1."""
    paired = source.target_width > 0
    if state is not None:
        return state.norm_scale, (state.target_norm_scale if paired else None)
    if cfg.normalize != "mean-sq-norm":
        return 1.0, (1.0 if paired else None)
    x, y = split_pairs(leading_tokens(source, NORM_TOKENS, cfg.seed), source.target_width)
    return mean_sq_norm_scale(x), (mean_sq_norm_scale(y) if y is not None else None)


def _check_variant(cfg: TrainConfig, source: ActivationStore, strategy: SingleProcess) -> None:
    """ConfigError when the options ask for a variant these activations or this parallel strategy cannot train."""
    if cfg.transcodes and not source.target_width:
        raise ConfigError(f"--store {cfg.store} holds no transcoder targets (it was collected without "
                          "--target-site / --target-hook); collect a paired store, or drop those options")
    if cfg.init == "asi" and source.target_width:
        raise ConfigError("--init asi ties the encoder to the decoder in one space; a transcoder's encoder reads "
                          "another site: use --init random")
    if cfg.skip_connection and not source.target_width:
        raise ConfigError("--skip-connection is for transcoders: these activations hold no targets (give "
                          "--target-site or --target-hook, or a paired --store)")
    if cfg.activation == "batchtopk" and strategy.name != "none":
        raise ConfigError(f"--activation batchtopk selects across the whole batch and trains in one process; "
                          f"got --parallel {strategy.name}")
    _check_d_init(cfg, source.target_width or source.input_width)


def _take_out_dir(
    cfg: TrainConfig, info: process_group.DistInfo, resumed: dict[str, Any] | None
) -> tuple[TrainConfig, RunIdentity, bool]:
    """Claim --out for this run (rank 0; see `rundir.claim`): (the run's config, its identity, whether
    --overwrite asks for the run's activation cache to be collected again when it does not fit).

    --overwrite acts here, once: the configuration the run records (run.json, checkpoints) says False.
    A resumed run's metrics.jsonl is cut back to its checkpoint's step.
    """
    overwrite, cfg = cfg.overwrite, dataclasses.replace(cfg, overwrite=False)
    if resumed is not None:
        identity = rundir.resumed_identity(cfg.resume, cfg, resumed["trainer"].run_id)
    else:
        identity = rundir.new_identity(cfg)
    if info.is_main:
        rundir.claim(Path(cfg.out), identity, cfg, overwrite=overwrite)
        if resumed is not None:
            truncate_metrics(Path(cfg.out), resumed["trainer"].step)
    return cfg, identity, overwrite


def _note(message: str) -> None:
    """A notice for the user on stderr, one line (not a Python warning with its source line)."""
    print(f"note: {message}", file=sys.stderr)


def _check_d_init(cfg: TrainConfig, d_model: int) -> None:
    """ConfigError naming --d-init when ASI asks for more dimensions than the activations have."""
    if cfg.init == "asi" and cfg.d_init >= 1 and cfg.d_init > d_model:
        raise ConfigError(f"--d-init {cfg.d_init} exceeds d = {d_model}, the width of the run's activations; "
                          f"give a count of at most {d_model} or a fraction")


def _resolve_device(cfg: TrainConfig, info: process_group.DistInfo) -> torch.device:
    if cfg.device == "auto":
        return info.device
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available")
    return device


def _resolve_dtype(cfg: TrainConfig, device: torch.device, resumed: dict[str, Any] | None) -> torch.dtype:
    """The SAE's dtype: a resumed run's own (whatever device it resumes on), else --dtype on this device."""
    if resumed is not None:
        return parse_dtype(read_saved_config(resumed["path"] / CONFIG_FILE)["dtype"])
    return resolve_dtype(cfg.dtype, device, cfg.optimizer)


def _check_batch_size(cfg: TrainConfig, source: ActivationStore, strategy: SingleProcess) -> int:
    """The number of global batches per epoch; ConfigError when the batch does not split or fit."""
    ranks = strategy.data_shard()[1]
    if cfg.batch_size % ranks:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of the number of ranks ({ranks})")
    n_batches = source.num_batches(cfg.batch_size)
    if n_batches == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {source.n_tokens} tokens in the store")
    return n_batches


def _active_subspace(cfg: TrainConfig, x0: torch.Tensor) -> torch.Tensor:
    """V [d, d_init] fp32: the top --d-init directions of the run's first tokens (ConfigError if too few)."""
    d_init = resolve_d_init(cfg.d_init, x0.shape[1])
    if d_init > min(x0.shape):
        raise ConfigError(f"--d-init {d_init} exceeds the {x0.shape[0]} tokens available for ASI (--asi-tokens)")
    return active_subspace(x0, d_init, center=cfg.asi_center, seed=cfg.seed)


def _build_sae(
    cfg: TrainConfig, source: ActivationStore, origin: dict[str, Any], scales: tuple[float, float | None],
    dtype: torch.dtype, resumed: dict[str, Any] | None, first: tuple[torch.Tensor, torch.Tensor | None],
    subspace: torch.Tensor | None,
) -> TopKSAE:
    """The whole SAE on the CPU: the checkpoint's weights, or b_dec at the mean of the run's first targets
    (``first``: inputs x0 [n, d] and a transcoder's targets y0 [n, d_out], else None), a random or ASI
    decoder (``subspace``), and the encoder's scale (--init-scale)."""
    d_init = subspace.shape[1] if cfg.init == "asi" else None
    norm_scale, target_scale = scales
    metadata = {
        **origin, "norm_scale": norm_scale, "init": cfg.init, "d_init": d_init,
        "n_tokens": source.n_tokens, "epochs": cfg.epochs, "seed": cfg.seed, "normalize": cfg.normalize,
    }
    if target_scale is not None:
        metadata["target_norm_scale"] = target_scale
    arch = cfg.architecture(source.target_width > 0, source.target_width or None)
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(source.input_width, cfg.n_features, cfg.k, dtype=dtype, backend=cfg.backend,
                  sparse_grad=cfg.optimizer == "sparse-adam", metadata=metadata, arch=arch)
    if resumed is not None:
        sae.load_state_dict(TopKSAE.load(resumed["path"], dtype=dtype).state_dict())
        return sae
    x0, y0 = first
    target = x0 if y0 is None else y0
    with torch.no_grad():  # b_dec starts at the mean target, so the features model the variation
        sae.b_dec.copy_(target.double().mean(0).to(sae.b_dec.dtype))
    if cfg.init == "asi":
        init_active_subspace(sae, subspace)
    x0, target = x0.to(dtype), target.to(dtype)
    sae.metadata["init_optimal_encoder_scale"] = sae.optimal_encoder_scale(x0, target)
    if cfg.init_scale == "calibrate":
        sae.metadata["init_encoder_scale"] = sae.calibrate_encoder_scale_(x0, target)
    sae.metadata["init_fvu"] = reconstruction_metrics(sae, x0, target=target)["fvu"]
    return sae


def _build_trainer(
    cfg: TrainConfig, model: TopKSAE, strategy: SingleProcess, dead_window: int, d_model: int, device: torch.device,
    total_steps: int,
) -> Trainer:
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.n_features)
    if cfg.optimizer == "sparse-adam":
        optimizer: torch.optim.Optimizer = SparseAdam(model.parameters(), lr=lr, unit_norm=[model.W_dec],
                                                      backend=cfg.backend)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    aux_k = cfg.aux_k if cfg.aux_k is not None else default_aux_k(d_model)
    tracker = FiringTracker(cfg.n_features, dead_window, device=device)
    k_schedule = linear_k(cfg.k_start, cfg.k, cfg.k_anneal_steps) if cfg.k_start is not None else None
    lr_schedule = None
    if cfg.lr_warmup_steps or cfg.lr_decay != "none":
        lr_schedule = lr_factor(total_steps, warmup_steps=cfg.lr_warmup_steps, decay=cfg.lr_decay,
                                decay_steps=cfg.lr_decay_steps, final_fraction=cfg.lr_final_fraction)
    return Trainer(model, optimizer, strategy=strategy, tracker=tracker, aux_k=aux_k, aux_coef=cfg.aux_coef,
                   k_schedule=k_schedule, lr_schedule=lr_schedule)


# ----------------------------------------------------------------------------------------------- loop
def _loop(run: Run) -> None:
    """Epochs over the store from ``run.position``, with metrics every --log-every and checkpoints every
    --checkpoint-every steps; stops with NonFiniteError (naming the step) on NaN/Inf."""
    cfg, pos, trainer = run.cfg, run.position, run.trainer
    _announce(run)
    log = MetricsLog(run.out, cfg.log, cfg.to_dict(), enabled=run.info.is_main)
    bar = tqdm(total=run.total_steps, initial=pos.step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and run.info.is_main))
    shard, shards = run.strategy.data_shard()
    try:
        while pos.epoch < cfg.epochs:
            for x in run.source.batches(cfg.batch_size // shards, seed=cfg.seed, epoch=pos.epoch, rank=shard,
                                        world_size=shards, start_batch=pos.batch):
                trainer.step(*run.batch(x))
                pos.step, pos.batch, pos.tokens = pos.step + 1, pos.batch + 1, pos.tokens + cfg.batch_size
                bar.update(1)
                if pos.step % cfg.log_every == 0 or pos.step == run.total_steps:
                    record = {"step": pos.step, "tokens": pos.tokens, **trainer.read_metrics(), **_extra_metrics(run)}
                    log.write(record)
                    if run.info.is_main:
                        bar.write(format_metrics(pos.step, record))
                if pos.batch == run.n_batches:
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0:
                    _save_checkpoint(run)
            if pos.batch != 0:  # the store ended early: move on
                pos.epoch, pos.batch = pos.epoch + 1, 0
        trainer.check_finite()
    finally:
        bar.close()
        log.close()


def _extra_metrics(run: Run) -> dict[str, float]:
    """The metrics the driver adds to the trainer's: k, and the decoder's energy in the active subspace."""
    metrics = {"k": run.model.k}
    if run.subspace is not None:
        inside, rows = run.strategy.reduce_over_features(subspace_energy_sums(run.model.W_dec, run.subspace)).tolist()
        metrics["subspace_energy"] = inside / rows
    return metrics


def _announce(run: Run) -> None:
    if not run.info.is_main:
        return
    cfg, trainer, model = run.cfg, run.trainer, run.model
    where = f" resumed from {run.resumed_from} at step {run.position.step}" if run.resumed_from else ""
    width = f"d={model.d_model}" + ("" if model.d_out == model.d_model and not model.arch.transcoder else
                                     f" -> {model.d_out}")
    kind = "" if model.arch == Architecture() else f" ({model.arch.describe()})"
    print(
        f"training {cfg.n_features} features{kind}, k={cfg.k}, {width} on {run.source.n_tokens} tokens x "
        f"{cfg.epochs} epochs ({run.total_steps} steps of {cfg.batch_size}), "
        f"lr {trainer.optimizer.param_groups[0]['lr']:.3g}, {cfg.optimizer}, init {cfg.init}, "
        f"parallel {run.strategy.name}, device {run.device}{where}",
        file=sys.stderr,
    )


def _save_checkpoint(run: Run) -> None:
    run.trainer.check_finite()  # never checkpoint weights that saw NaN/Inf
    pos = run.position
    state = checkpoints.TrainerState(
        step=pos.step, epoch=pos.epoch, batch=pos.batch, norm_scale=run.norm_scale, tokens=pos.tokens,
        firing=run.trainer.tracker.state_dict(), rng=checkpoints.capture_rng(), run_id=run.identity.run_id,
        target_norm_scale=run.target_scale,
    )
    run.strategy.save_checkpoint(run.out / checkpoints.CHECKPOINTS_DIR, run.model, run.trainer.optimizer, state,
                                 run.cfg.to_dict())


# --------------------------------------------------------------------------------------------- finish
def _finish(run: Run, start_time: float) -> dict[str, Any]:
    """Evaluate on the first EVAL_TOKENS tokens, save the final SAE, the density plot and the summary."""
    cfg, trainer, tracker = run.cfg, run.trainer, run.trainer.tracker
    if run.info.is_main:
        n_eval = min(EVAL_TOKENS, run.source.n_tokens)
        print(f"trained {run.position.step} steps; measuring the final SAE on its first {n_eval:,} training tokens "
              f"and writing {FINAL_DIR}/, {SUMMARY_FILE} and {DENSITY_PLOT} to {run.out}", file=sys.stderr)
    final_sae = run.strategy.full_model(run.model)
    eval_x, eval_y = run.batch(leading_tokens(run.source, EVAL_TOKENS, cfg.seed))
    final_metrics = reconstruction_metrics(run.model, eval_x, target=eval_y)
    dead_frac = tracker.dead_fraction()
    summary: dict[str, Any] = {}
    if run.info.is_main:
        final_path = final_sae.save(run.out / FINAL_DIR)
        plot_firing_density(tracker.firing_density(), run.out / DENSITY_PLOT,
                            title=f"Feature firing density, F = {cfg.n_features}")
        summary = {
            **final_metrics, "dead_frac": dead_frac, "dead_window": tracker.window,
            "never_fired_frac": float((tracker.fire_count == 0).float().mean()),
            "tokens": run.position.tokens, "steps": run.position.step, "epochs": cfg.epochs,
            "n_features": cfg.n_features, "k": cfg.k, "lr": trainer.base_lrs[0],
            "aux_k": trainer.aux_k, "norm_scale": run.norm_scale, "target_norm_scale": run.target_scale,
            "architecture": final_sae.arch.to_dict(), "init": cfg.init,
            "d_init": final_sae.metadata.get("d_init"), "time_s": time.perf_counter() - start_time,
            "checkpoint": str(final_path), "eval_tokens": eval_x.shape[0], "parallel": run.strategy.name,
            "world_size": run.info.world_size, "run_id": run.identity.run_id,
        }
        atomic_write(run.out / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        print(
            f"done: FVU {summary['fvu']:.4f}, L0 {summary['l0']:.1f}, dead {100 * dead_frac:.2f}% "
            f"(window {tracker.window} tokens), {run.position.tokens} tokens in {summary['time_s']:.1f} s; "
            f"SAE saved to {final_path}"
        )
    process_group.barrier()
    return summary
