"""The training driver: the Python API that ``flashsae train`` runs.

- `train(TrainConfig) -> dict`: the whole run. Activations are collected once into an activation
  store (``OUT/activations`` or ``--cache``; reused when its manifest matches the model, site,
  layer and text), normalized, optionally used for Active Subspace Initialization, and passed over
  ``epochs`` times in the store's deterministic order by `flashsae.sae.trainer.Trainer`. Full
  training-state checkpoints (`flashsae.sae.trainer_state`) make ``--resume`` continue
  bit-for-bit on CPU. Its options are declared in `flashsae.sae.run.config`; the command line is
  `flashsae.sae.run.command`.

Under ``torchrun`` the run is data parallel (each rank reads its slice of every global batch,
gradients are summed over ranks) or feature parallel (`FeatureParallelSAE`); rank 0 alone logs
and writes files.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import ops
from ..errors import ConfigError, InputError
from ..optim import SparseAdam
from . import hf
from .parallel import process_group
from .parallel.strategy import make_strategy
from . import trainer_state as TS
from .hf import DEFAULT_TEXT
from .asi import active_subspace, init_active_subspace, resolve_d_init
from .checkpoint import atomic_write
from .diagnostics import FiringTracker, plot_firing_density
from .metrics_log import MetricsLog, check_log_backends, format_metrics
from ..checks import parse_dtype
from .model import TopKSAE
from .run.config import TrainConfig, default_lr, merge_resumed_config
from .store import ActivationStore
from .trainer import DEFAULT_DEAD_WINDOW, NonFiniteError, Trainer, reconstruction_metrics

NORM_TOKENS = 1 << 16  # tokens used to estimate the normalization scale
EVAL_TOKENS = 1 << 16  # tokens of the final evaluation in the summary
COLLECTION_FILE = "collection.json"  # beside the cache's manifest: the token count requested
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
DENSITY_PLOT = "firing_density.png"


# ---------------------------------------------------------------------------------------------
# Activations


def _text_name(cfg: TrainConfig) -> str:
    return cfg.text or DEFAULT_TEXT


def open_activation_source(cfg: TrainConfig, info: process_group.DistInfo) -> tuple[ActivationStore, dict[str, Any]]:
    """The run's activation store and what it holds (model, revision, site, layer, hook, text, seq_len).

    ``cfg.store``: an existing store, used as it is. Otherwise the cache (``cfg.cache`` or
    ``OUT/activations``) is reused when its manifest matches the run and filled (by rank 0) when
    it is empty; a cache for other activations is an error.
    """
    if cfg.store is not None:
        store = ActivationStore(cfg.store)
        m = store.manifest
        site, layer = m.get("site"), m.get("layer")
        return store, {
            "model": m.get("model"), "revision": m.get("revision"), "site": site, "layer": layer,
            "hook": m.get("hook", m.get("module_path")), "text": m.get("text", m.get("text_source")),
            "seq_len": m.get("seq_len"),
        }
    cache = Path(cfg.cache) if cfg.cache else Path(cfg.out) / "activations"
    site, layer = _store_site(cfg)
    expect: dict[str, Any] = {
        "model": cfg.model, "revision": cfg.revision, "site": site, "layer": layer,
        "text_source_hash": hf.text_source_hash(cfg.text), "seq_len": cfg.seq_len,
        "requested_tokens": cfg.n_tokens,
    }
    if info.is_main and not (cache / "manifest.json").is_file():
        _collect(cfg, cache, site, layer)
    process_group.barrier()
    store = ActivationStore(cache)
    request = cache / COLLECTION_FILE
    found_fields = {**store.manifest, **(json.loads(request.read_text()) if request.is_file() else {})}
    for name, expected in expect.items():
        found = found_fields.get(name)
        if found != expected:
            flag = {"text_source_hash": "text", "requested_tokens": "n-tokens", "seq_len": "seq-len"}.get(name, name)
            raise InputError(
                f"--cache {cache} holds other activations: its {name} is {found!r} but this run's --{flag} needs "
                f"{expected!r} (pass another --cache, or delete that directory)"
            )
    return store, {
        "model": cfg.model, "revision": cfg.revision, "site": None if cfg.hook else cfg.site,
        "layer": None if cfg.hook else cfg.layer, "hook": store.manifest.get("hook", cfg.hook),
        "text": _text_name(cfg), "seq_len": cfg.seq_len,
    }


def _store_site(cfg: TrainConfig) -> tuple[str, int]:
    """(site, layer) as the activation store records them; a --hook path stands for its own site."""
    if not cfg.hook:
        return cfg.site, cfg.layer
    layer = hf.layer_from_path(cfg.hook)
    return cfg.hook, -1 if layer is None else layer


def _collect(cfg: TrainConfig, cache: Path, site: str, layer: int) -> None:
    """Run the model over the text once and write its activations at the run's site into ``cache``."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = hf.load_model(cfg.model, device=device, revision=cfg.revision)
    if cfg.hook:
        module_path, module = cfg.hook, hf.resolve_hook(model, cfg.hook)
    else:
        module_path, module = hf.resolve_site(model, cfg.site, cfg.layer)
    print(f"collecting activations of {cfg.model} {module_path} into {cache}", file=sys.stderr)
    hf.collect_to_store(
        cache, model, tokenizer, module_path, module, hf.iter_texts(cfg.text),
        model_name=cfg.model, site=site, layer=layer, text_source=cfg.text, n_tokens=cfg.n_tokens,
        seq_len=cfg.seq_len, revision=cfg.revision, progress=cfg.progress, overwrite=True,
    )
    # What was asked for (the texts may hold fewer tokens), so a later run can tell whether the cache fits.
    request = json.dumps({"requested_tokens": cfg.n_tokens})
    atomic_write(cache / COLLECTION_FILE, lambda tmp: Path(tmp).write_text(request))


def leading_tokens(source: Any, n: int, seed: int) -> torch.Tensor:
    """The first ``n`` tokens (all, if fewer) of epoch 0's batch order: fp32 [n, d] on CPU."""
    n = min(n, source.n_tokens)
    return next(iter(source.batches(n, seed=seed, epoch=0, prefetch=0)))


def mean_sq_norm_scale(x: torch.Tensor) -> float:
    """s with ``mean ||s x||^2 = d`` for x [n, d]."""
    mean_sq = float(x.double().pow(2).sum(1).mean())
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise InputError(f"cannot normalize: the activations' mean squared norm is {mean_sq}")
    return math.sqrt(x.shape[1] / mean_sq)


# ---------------------------------------------------------------------------------------------
# The run


def _resolve_device(cfg: TrainConfig, info: process_group.DistInfo) -> torch.device:
    if cfg.device == "auto":
        return info.device
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available")
    return device


def _build_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sparse-adam":
        return SparseAdam(model.parameters(), lr=lr, unit_norm=[model.W_dec], backend=cfg.backend)
    return torch.optim.Adam(model.parameters(), lr=lr)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg`` to the end; returns the summary (also written to ``OUT/summary.json`` by rank 0)."""
    start_time = time.perf_counter()
    resumed: dict[str, Any] | None = None
    if cfg.resume:
        path = TS.latest_checkpoint(cfg.resume)
        resumed = TS.load_checkpoint(path)
        cfg = merge_resumed_config(resumed["config"], cfg.to_dict())
    cfg.validate()
    check_log_backends(cfg.log)
    info = process_group.init_distributed(timeout_s=1800.0)
    strategy = make_strategy(cfg.parallel, info)
    parallel = strategy.name
    if resumed is not None:
        resumed["optimizer"] = strategy.optimizer_state(resumed)
    device = _resolve_device(cfg, info)
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)

    source, origin = open_activation_source(cfg, info)
    d_model = source.d_model
    world = strategy.data_shard()[1]
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of the number of ranks ({world})")
    local_batch = cfg.batch_size // world
    n_batches = source.num_batches(cfg.batch_size)
    if n_batches == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {source.n_tokens} tokens in the store")
    total_steps = n_batches * cfg.epochs
    dtype = parse_dtype(cfg.dtype)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.n_features)
    aux_k = cfg.aux_k if cfg.aux_k is not None else min(d_model // 2, ops.MAX_K)
    dead_window = cfg.dead_window or min(DEFAULT_DEAD_WINDOW, n_batches * cfg.batch_size)

    if resumed is not None:
        state: TS.TrainerState = resumed["trainer"]
        norm_scale = state.norm_scale
    else:
        norm_scale = 1.0
        if cfg.normalize == "mean-sq-norm":
            norm_scale = mean_sq_norm_scale(leading_tokens(source, NORM_TOKENS, cfg.seed))
    d_init = resolve_d_init(cfg.d_init, d_model) if cfg.init == "asi" else None
    metadata = {
        **origin, "norm_scale": norm_scale, "init": cfg.init, "d_init": d_init,
        "n_tokens": source.n_tokens, "epochs": cfg.epochs, "seed": cfg.seed, "normalize": cfg.normalize,
    }

    torch.manual_seed(cfg.seed)
    sparse_grad = cfg.optimizer == "sparse-adam"
    sae = TopKSAE(d_model, cfg.n_features, cfg.k, dtype=dtype, backend=cfg.backend, sparse_grad=sparse_grad,
                  metadata=metadata)
    if resumed is not None:
        weights = TopKSAE.load(resumed["path"], dtype=dtype)
        sae.load_state_dict(weights.state_dict())
    else:
        x0 = leading_tokens(source, cfg.asi_tokens, cfg.seed) * norm_scale
        if not torch.isfinite(x0).all():
            raise NonFiniteError(
                f"the run's first {x0.shape[0]} tokens (--asi-tokens) contain NaN or Inf; nothing was trained"
            )
        with torch.no_grad():  # b_dec starts at the mean activation, so the features model the variation
            sae.b_dec.copy_(x0.double().mean(0).to(sae.b_dec.dtype))
        if cfg.init == "asi":
            if d_init > min(x0.shape):
                raise ConfigError(f"--d-init {d_init} exceeds the {x0.shape[0]} tokens available for ASI (--asi-tokens)")
            init_active_subspace(sae, active_subspace(x0, d_init, center=cfg.asi_center, seed=cfg.seed))
    sae = sae.to(device)
    model = strategy.wrap(sae)
    optimizer = _build_optimizer(cfg, model, lr)
    tracker = FiringTracker(cfg.n_features, dead_window, device=device)
    step, epoch, batch = 0, 0, 0
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        tracker.load_state_dict(state.firing)
        TS.restore_rng(state.rng)
        step, epoch, batch = state.step, state.epoch, state.batch
    trainer = Trainer(model, optimizer, strategy=strategy, tracker=tracker, aux_k=aux_k, aux_coef=cfg.aux_coef)
    trainer.step_count = step
    tokens = step * cfg.batch_size

    log = MetricsLog(out, cfg.log, cfg.to_dict(), enabled=info.is_main)
    checkpoints = out / TS.CHECKPOINTS_DIR
    can_checkpoint = cfg.checkpoint_every > 0

    def save_state() -> None:
        trainer.check_finite()  # never checkpoint weights that saw NaN/Inf
        state = TS.TrainerState(
            step=step, epoch=epoch, batch=batch, norm_scale=norm_scale, tokens=tokens,
            firing=tracker.state_dict(), rng=TS.capture_rng(),
        )
        strategy.save_checkpoint(checkpoints, model, optimizer, state, cfg.to_dict())

    if info.is_main:
        where = f" resumed from {resumed['path']} at step {step}" if resumed else ""
        print(
            f"training {cfg.n_features} features, k={cfg.k}, d={d_model} on {source.n_tokens} tokens x "
            f"{cfg.epochs} epochs ({total_steps} steps of {cfg.batch_size}), lr {lr:.3g}, {cfg.optimizer}, "
            f"init {cfg.init}, parallel {parallel}, device {device}{where}",
            file=sys.stderr,
        )
    show_bar = cfg.progress and info.is_main
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not show_bar, dynamic_ncols=True)
    try:
        while epoch < cfg.epochs:
            rank, ranks = strategy.data_shard()
            epoch_batches = source.batches(
                local_batch, seed=cfg.seed, epoch=epoch, rank=rank, world_size=ranks, start_batch=batch
            )
            for x in epoch_batches:
                trainer.step((x.to(device) * norm_scale).to(dtype))
                step, batch, tokens = step + 1, batch + 1, tokens + cfg.batch_size
                bar.update(1)
                if step % cfg.log_every == 0 or step == total_steps:
                    record = {"step": step, "tokens": tokens, **trainer.read_metrics()}
                    log.write(record)
                    if info.is_main:
                        bar.write(format_metrics(step, record))
                if batch == n_batches:
                    epoch, batch = epoch + 1, 0
                if can_checkpoint and step % cfg.checkpoint_every == 0:
                    save_state()
            if batch != 0:  # the store ended early: move on
                epoch, batch = epoch + 1, 0
        trainer.check_finite()
    finally:
        bar.close()
        log.close()

    final_sae = strategy.full_model(model)
    eval_x = (leading_tokens(source, EVAL_TOKENS, cfg.seed).to(device) * norm_scale).to(dtype)
    final_metrics = reconstruction_metrics(model, eval_x)
    dead_frac = tracker.dead_fraction()
    summary: dict[str, Any] = {}
    if info.is_main:
        final_path = final_sae.save(out / FINAL_DIR)
        density = tracker.firing_density()
        plot_firing_density(density, out / DENSITY_PLOT, title=f"Feature firing density, F = {cfg.n_features}")
        summary = {
            **final_metrics, "dead_frac": dead_frac, "dead_window": dead_window,
            "never_fired_frac": float((tracker.fire_count == 0).float().mean()),
            "tokens": tokens, "steps": step, "epochs": cfg.epochs, "n_features": cfg.n_features, "k": cfg.k,
            "lr": lr, "aux_k": aux_k, "norm_scale": norm_scale, "init": cfg.init, "d_init": d_init,
            "time_s": time.perf_counter() - start_time, "checkpoint": str(final_path),
            "eval_tokens": eval_x.shape[0], "parallel": parallel, "world_size": info.world_size,
        }
        atomic_write(out / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        print(
            f"done: FVU {summary['fvu']:.4f}, L0 {summary['l0']:.1f}, dead {100 * dead_frac:.2f}% "
            f"(window {dead_window} tokens), {tokens} tokens in {summary['time_s']:.1f} s; "
            f"SAE saved to {final_path}"
        )
    process_group.barrier()
    return summary
