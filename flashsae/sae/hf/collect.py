"""Activations of a Hugging Face model's modules, collected with forward hooks over tokenized texts.

Texts become windows of <= ``seq_len`` tokens (`token_windows`), padded batches of them
(`token_batches`), then one forward pass per batch with a hook on each module (attached for that
pass only). `collect_activations` yields the hooked outputs at the real tokens; `collect_to_store`
writes one module's outputs into an activation store, or, with a ``target``, each token's pair of
activations (a transcoder's input and target, read in the same forward pass) into a paired store.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ...checks import DTYPES, require_dtype, require_int
from ..store import DEFAULT_SHARD_TOKENS, ActivationStore, ActivationStoreWriter
from .sites import HookPoint, layer_from_path
from .texts import DEFAULT_TEXT, text_source_hash


class _StopForward(Exception):
    """Raised from the last hook that fires: nothing after the hooked modules needs to run."""


def token_windows(tokenizer, texts: Iterable[str], seq_len: int, group: int) -> Iterator[tuple[list[int], list[int]]]:
    """``(input_ids, special_tokens_mask)`` of consecutive windows of <= ``seq_len`` tokens (special
    tokens included) of each non-blank text; every window gets the tokenizer's special tokens."""
    pending: list[str] = []

    def flush() -> Iterator[tuple[list[int], list[int]]]:
        encoded = tokenizer(
            pending,
            add_special_tokens=True,
            truncation=True,
            max_length=seq_len,
            return_overflowing_tokens=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
        )
        for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
            if not all(special):
                yield ids, special

    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must yield str, got {type(text).__name__}")
        if text.strip():
            pending.append(text)
        if len(pending) == group:
            yield from flush()
            pending = []
    if pending:
        yield from flush()


def token_batches(windows: Iterator[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
    """Right-padded ``(input_ids, attention_mask, special)`` int64 tensors [B, T], B <= batch_size."""
    while True:
        batch = [w for _, w in zip(range(batch_size), windows)]
        if not batch:
            return
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        special = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, (ids, mask) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            special[row, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
        yield input_ids, attention_mask, special


def text_batches(tokenizer, texts: Iterable[str], seq_len: int, batch_size: int):
    """`token_windows` of ``texts`` in `token_batches` of <= ``batch_size`` windows, padded with the
    tokenizer's pad token (id 0 without one): ``(input_ids, attention_mask, special)`` [B, T].

    ``tokenizer`` must be a fast (Rust) tokenizer (checked at the call, before any text is read).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer must be a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return token_batches(token_windows(tokenizer, texts, seq_len, group=batch_size), batch_size, pad_id)


def forward_kwargs(model: nn.Module) -> dict[str, object]:
    """Keyword arguments for every forward of ``model``: ``use_cache=False`` where its forward takes
    it (a decoder would otherwise build a key/value cache that nothing reads), else none."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _hook_points(modules: Mapping[str, nn.Module | HookPoint]) -> dict[str, HookPoint]:
    """name -> HookPoint; a bare module stands for its output."""
    return {name: m if isinstance(m, HookPoint) else HookPoint(name, m) for name, m in modules.items()}


def _forward_captured(
    model: nn.Module,
    points: Mapping[str, HookPoint],
    inputs: dict[str, torch.Tensor],
    keep: torch.Tensor,
    dtype: torch.dtype,
    stop_early: bool,
) -> dict[str, torch.Tensor]:
    """One forward with hooks on ``points`` (attached for this call only): name -> [keep.sum(), d]."""
    captured: dict[str, torch.Tensor] = {}
    shape = tuple(keep.shape)

    def recorder(name: str) -> Callable[[torch.Tensor], None]:
        def record(out: torch.Tensor) -> None:
            if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"{name!r} is {got}; expected a tensor [batch, seq, d] with [batch, seq] = {shape}"
                )
            if name in captured:
                raise ValueError(f"module {name!r} ran twice in one forward pass; hook a module that runs once")
            captured[name] = out[keep]
            if stop_early and len(captured) == len(points):
                raise _StopForward

        return record

    with contextlib.ExitStack() as stack:
        for name, point in points.items():
            stack.enter_context(point.capture(recorder(name)))
        try:
            with torch.inference_mode():
                model(**inputs)
        except _StopForward:
            pass
    missing = [name for name in points if name not in captured]
    if missing:
        raise RuntimeError(f"modules {missing} did not run in the forward pass: they are not part of the model")
    # Copies made outside inference mode are ordinary tensors, usable in autograd by the consumer.
    return {name: rows.to("cpu", dtype, copy=True) for name, rows in captured.items()}


def _max_seq_len(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None if unbounded or unknown)."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int):
        return None
    if getattr(config, "model_type", None) in ("roberta", "xlm-roberta"):  # positions start after the padding index
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def collect_activations(
    model: nn.Module,
    tokenizer,
    modules: Mapping[str, nn.Module | HookPoint],
    texts: Iterable[str],
    *,
    seq_len: int = 128,
    batch_size: int = 32,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    skip_special_tokens: bool = True,
    progress: bool = True,
    stop_early: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Stream ``texts`` through ``model`` and yield, per batch of ``batch_size`` windows, name -> [n, d]
    CPU ``dtype`` activations of ``modules``: a module's output (the first element of tuple outputs),
    or a `HookPoint`'s activation (a module's output or input).

    Each text is cut into consecutive windows of <= ``seq_len`` tokens, each carrying the
    tokenizer's special tokens ([CLS] ... [SEP] for BERT, BOS for Llama), so long texts are read
    whole. Rows are the real tokens only, in (window, position) order, the same for every name:
    padding never appears and, with ``skip_special_tokens``, neither do the special tokens, whose
    activations are atypical (BOS in particular carries outsized norms) and would skew an SAE.
    Collection stops after exactly ``max_tokens`` rows (None: all texts). Hooks are attached only
    while the model runs, so none is left behind on an error or when the consumer stops early.
    ``stop_early`` ends each forward once every hooked module has run (skipping later layers and
    the LM head).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of str, not a single str")
    if not modules:
        raise ValueError("modules must name at least one module to hook")
    require_int("seq_len", seq_len)
    require_int("batch_size", batch_size)
    if max_tokens is not None:
        require_int("max_tokens", max_tokens)
    require_dtype("dtype", dtype, tuple(DTYPES.values()))
    batches = text_batches(tokenizer, texts, seq_len, batch_size)
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    if seq_len <= n_special:
        raise ValueError(f"seq_len must exceed the {n_special} special tokens the tokenizer adds, got {seq_len}")
    max_positions = _max_seq_len(model)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(
            f"seq_len must be <= {max_positions}, the longest sequence the model's positions allow, got {seq_len}"
        )
    extra = forward_kwargs(model)
    return _collect(model, _hook_points(modules), batches, extra, max_tokens, dtype, skip_special_tokens, progress,
                    stop_early)


def _collect(
    model: nn.Module,
    points: Mapping[str, HookPoint],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    extra: dict[str, object],
    max_tokens: int | None,
    dtype: torch.dtype,
    skip_special_tokens: bool,
    progress: bool,
    stop_early: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """The generator behind `collect_activations` (arguments already validated)."""
    device = _model_device(model)
    bar = tqdm(total=max_tokens, unit="tok", desc="collecting activations", disable=not progress)
    done = 0
    try:
        for input_ids, attention_mask, special in batches:
            keep = attention_mask.bool()
            if skip_special_tokens:
                keep &= ~special
            if max_tokens is not None:
                keep &= keep.flatten().cumsum(0).view_as(keep) <= max_tokens - done
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), **extra}
            captured = _forward_captured(model, points, inputs, keep.to(device), dtype, stop_early)
            n = int(keep.sum())
            if n == 0:
                continue
            done += n
            bar.update(n)
            yield captured
            if max_tokens is not None and done >= max_tokens:
                return
    finally:
        bar.close()


def collect_to_store(
    out_dir: str | os.PathLike,
    model: nn.Module,
    tokenizer,
    module_path: str,
    module: nn.Module,
    texts: Iterable[str],
    *,
    model_name: str,
    site: str | None,
    layer: int | None,
    text_source: str | None,
    n_tokens: int | None,
    seq_len: int = 128,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    shard_tokens: int | None = None,
    overwrite: bool = False,
    skip_special_tokens: bool = True,
    progress: bool = True,
    target: HookPoint | None = None,
    target_site: str | None = None,
) -> ActivationStore:
    """Collect ``module``'s output (its input when ``module_path`` ends with ``:input``) for ``n_tokens``
    tokens (None: all texts) into an activation store.

    The manifest records ``model``, ``revision``, ``site`` (``module_path`` when None), ``layer``
    (when None, the first integer in ``module_path``), ``hook`` (= ``module_path``),
    ``text_source``, ``text_source_hash``, ``seq_len`` and ``skip_special_tokens``. With a
    ``target`` `HookPoint` the store is paired (`flashsae.sae.store`): each row holds the token's
    activation at ``module_path`` then at the target, read in the same forward pass; the manifest
    adds ``target_hook`` and ``target_site`` (the target's path when None). Returns the opened
    `ActivationStore`; warns when the texts run out before ``n_tokens``.
    """
    if layer is None:
        layer = layer_from_path(module_path)
        if layer is None:
            raise ValueError(f"layer must be given: the hook path {module_path!r} holds no layer number")
    fields = {
        "model": model_name,
        "revision": revision,
        "site": site if site is not None else module_path,
        "layer": layer,
        "hook": module_path,
        "text_source": text_source if text_source is not None else DEFAULT_TEXT,
        "text_source_hash": text_source_hash(text_source),
        "seq_len": seq_len,
        "skip_special_tokens": skip_special_tokens,
    }
    points = {module_path: HookPoint(module_path, module)}
    if target is not None:
        if target.path == module_path:
            raise ValueError(f"target must be another activation than the input's {module_path!r}")
        fields.update(target_hook=target.path, target_site=target_site if target_site is not None else target.path)
        points[target.path] = target
    batches = collect_activations(
        model, tokenizer, points, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=n_tokens, dtype=dtype,
        skip_special_tokens=skip_special_tokens, progress=progress,
    )
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("the texts yielded no tokens to collect")
    writer = ActivationStoreWriter(
        out_dir, fields, shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS, dtype=dtype, overwrite=overwrite,
        target_width=first[target.path].shape[1] if target is not None else 0,
    )
    collected = 0
    with writer:
        for batch in itertools.chain([first], batches):
            rows = batch[module_path] if target is None else torch.cat([batch[module_path], batch[target.path]], 1)
            writer.add(rows)
            collected += rows.shape[0]
    if n_tokens is not None and collected < n_tokens:
        warnings.warn(
            f"the texts ran out after {collected} tokens of the {n_tokens} requested; the store holds {collected}",
            stacklevel=2,
        )
    return ActivationStore(out_dir)
