"""A run's activations: an existing store, or a cache collected once from the model and reused after.

`open_activation_source` returns the store and what it holds (model, site, layer, text, ...); a
collection reads every document of the text but the held-out ones (`flashsae.sae.hf.texts`);
`leading_tokens` and `mean_sq_norm_scale` give the first tokens of the run's batch order and the
normalization scale estimated from them.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ...errors import InputError, reraise_as
from .. import hf
from ..atomic import atomic_write
from ..parallel import process_group
from ..store import ActivationStore
from . import rundir
from .config import TrainConfig

COLLECTION_FILE = "collection.json"  # beside the cache's manifest: the token count requested, the documents read
TRAIN_DOCUMENTS = "train"  # training collects every document but the held-out ones (`flashsae.sae.hf.texts`)
# Fields a reused cache must match, and the option that sets each.
_CACHE_FLAGS = {"text_source_hash": "text", "documents": "text", "requested_tokens": "n-tokens", "seq_len": "seq-len",
                "target_site": "target-site"}


def open_activation_source(
    cfg: TrainConfig, info: process_group.DistInfo, *, recollect: bool = False
) -> tuple[ActivationStore, dict[str, Any]]:
    """The run's activation store and what it holds (model, revision, site, layer, hook, text, documents, seq_len;
    a transcoder's target_site and target_hook).

    ``cfg.store``: an existing store, used as it is. Otherwise the cache (``cfg.cache`` or
    ``OUT/activations``) is reused when its manifest matches the run and filled (by rank 0) when
    it is empty; a cache for other activations is an error, except that ``recollect`` (--overwrite)
    collects the run's own ``OUT/activations`` again. A transcoder's cache is a paired store of
    --site (or --hook) and its target.
    """
    if cfg.store is not None:
        store = open_store(cfg.store, "--store")
        m = {**store.manifest, **_collection(Path(cfg.store))}
        return store, {
            "model": m.get("model"), "revision": m.get("revision"), "site": m.get("site"), "layer": m.get("layer"),
            "hook": m.get("hook", m.get("module_path")), "text": m.get("text", m.get("text_source")),
            "documents": m.get("documents"), "seq_len": m.get("seq_len"),
            **({"target_site": m.get("target_site"), "target_hook": m.get("target_hook")} if store.target_width else {}),
        }
    own = not cfg.cache
    cache = Path(cfg.cache) if cfg.cache else Path(cfg.out) / rundir.CACHE_DIR
    site, layer = _store_site(cfg)
    expect = {
        "model": cfg.model, "revision": cfg.revision, "site": site, "layer": layer,
        "text_source_hash": hf.text_source_hash(cfg.text), "documents": TRAIN_DOCUMENTS, "seq_len": cfg.seq_len,
        "requested_tokens": cfg.n_tokens, "target_site": _target_site(cfg),
    }
    if info.is_main and (not (cache / "manifest.json").is_file()
                         or (own and recollect and _mismatch(cache, expect) is not None)):
        _collect(cfg, cache, site, layer)  # over a replaced run's activations, too
    process_group.barrier()
    store = open_store(cache, "--cache" if cfg.cache else "the activation cache")
    problem = _mismatch(cache, expect)
    if problem is not None:
        name, found = problem
        remedy = "pass another --cache, or delete that directory" if cfg.cache else "pass --overwrite to collect it again"
        raise InputError(
            f"{'--cache ' if cfg.cache else 'the activation cache '}{cache} holds other activations: its {name} is "
            f"{found!r} but this run's --{_CACHE_FLAGS.get(name, name)} needs {expect[name]!r} ({remedy})"
        )
    origin = {
        "model": cfg.model, "revision": cfg.revision, "site": None if cfg.hook else cfg.site,
        "layer": None if cfg.hook else cfg.layer, "hook": store.manifest.get("hook", cfg.hook),
        "text": cfg.text or hf.DEFAULT_TEXT, "documents": TRAIN_DOCUMENTS, "seq_len": cfg.seq_len,
    }
    if cfg.transcodes:
        origin.update(target_site=cfg.target_site, target_hook=store.manifest.get("target_hook"))
    return store, origin


def open_store(directory: str | Path, culprit: str) -> ActivationStore:
    """The activation store in ``directory``; InputError prefixed with ``culprit`` (the option) when it is unusable."""
    with reraise_as(InputError, FileNotFoundError, ValueError, culprit=culprit):
        return ActivationStore(directory)


def _collection(cache: Path) -> dict[str, Any]:
    """What `_collect` recorded beside a cache's manifest (nothing for a store made otherwise)."""
    request = cache / COLLECTION_FILE
    return json.loads(request.read_text()) if request.is_file() else {}


def _mismatch(cache: Path, expect: dict[str, Any]) -> tuple[str, Any] | None:
    """The first field (and the cache's value) in which the cache differs from what this run needs."""
    try:
        found_fields = {**json.loads((cache / "manifest.json").read_text()), **_collection(cache)}
    except (ValueError, TypeError):  # not JSON objects: `open_store` names the file
        return "manifest", None
    for name, expected in expect.items():
        if found_fields.get(name) != expected:
            return name, found_fields.get(name)
    return None


def _store_site(cfg: TrainConfig) -> tuple[str, int]:
    """(site, layer) as the activation store records them; a --hook path stands for its own site."""
    if not cfg.hook:
        return cfg.site, cfg.layer
    layer = hf.layer_from_path(cfg.hook)
    return cfg.hook, -1 if layer is None else layer


def _target_site(cfg: TrainConfig) -> str | None:
    """What a transcoder's cache records as its target: --target-site, or the --target-hook path; None otherwise."""
    return cfg.target_site if cfg.target_site is not None else cfg.target_hook


def _collect(cfg: TrainConfig, cache: Path, site: str, layer: int) -> None:
    """Run the model over the text once and write its activations at the run's site (and a transcoder's
    target) into ``cache``."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = hf.load_model(cfg.model, device=device, revision=cfg.revision)
    module_path, module = hf.hook_point(model, cfg.hook) if cfg.hook else hf.resolve_site(model, cfg.site, cfg.layer)
    target = None
    if cfg.target_hook is not None:
        target = hf.hook_point(model, cfg.target_hook)
    elif cfg.target_site is not None:
        target = hf.resolve_site(model, cfg.target_site, cfg.layer)
    print(f"collecting activations of {cfg.model} {module_path} into {cache} (all documents but the held-out "
          f"one in {hf.HELDOUT_EVERY}, which flashsae eval reads)", file=sys.stderr)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        hf.collect_to_store(
            cache, model, tokenizer, module_path, module, hf.iter_texts(cfg.text, documents=TRAIN_DOCUMENTS),
            model_name=cfg.model, site=site, layer=layer, text_source=cfg.text, n_tokens=cfg.n_tokens,
            seq_len=cfg.seq_len, revision=cfg.revision, progress=cfg.progress, overwrite=True,
            target=target, target_site=_target_site(cfg),
        )
    for note in notes:  # such as the texts running out before --n-tokens: one line each, not a warning's two
        print(f"note: {note.message}", file=sys.stderr)
    # What was asked for (the texts may hold fewer tokens), so a later run can tell whether the cache fits.
    request = json.dumps({"requested_tokens": cfg.n_tokens, "documents": TRAIN_DOCUMENTS})
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
