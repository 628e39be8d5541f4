"""The activation store: activations collected once into sharded safetensors files, streamed back in batches.

On disk a store is a directory of shards (``shard-00000.safetensors``, one tensor ``activations``
[n, d] each, written atomically) and a ``manifest.json`` written last, so a directory without a
manifest is a collection that did not finish. A paired store (a transcoder's: the activations at
one site and, for the same tokens, at another) keeps each token's pair in one row, the input's
columns then the target's (``target_width`` of them, recorded in the manifest), so every batch,
shuffle and shard split keeps the pairs aligned by construction; `split_pairs` separates them. The manifest records what the activations are
(model, revision, site, layer, text-source hash, normalization) and each shard's token count and
sha256; every shard is verified against its hash when it is read.

Batch order (`batches`, the same for the store and for `InMemorySource`):

1. Shards are visited in an order drawn from ``(seed, epoch)``; their rows are concatenated into
   one token stream.
2. The stream is cut into consecutive blocks of ``shuffle_buffer`` tokens (the last may be
   shorter); the rows of block ``j`` are permuted by a permutation drawn from ``(seed, epoch, j)``.
3. The shuffled stream is cut into global batches of ``G = batch_size * world_size`` tokens;
   a trailing partial global batch is dropped, so an epoch has ``n_tokens // G`` batches.
4. Rank ``r`` receives rows ``[r * batch_size, (r + 1) * batch_size)`` of each global batch.

So the ranks' batches, concatenated in rank order, are exactly the batch a single process gets
with ``batch_size * world_size`` and the same seed and epoch. ``start_batch=s`` resumes at global
batch ``s``: it starts reading at the shard holding the first token of that batch's block, so
nothing before that block is read.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..checks import DTYPES, dtype_name, require_dtype, require_int
from .atomic import atomic_write

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSOR_NAME = "activations"
DEFAULT_SHARD_TOKENS = 1 << 16
DEFAULT_SHUFFLE_BUFFER = 1 << 18
REQUIRED_FIELDS = ("model", "site", "layer")
# Fields the writer fills in itself; a caller may not set them.
_WRITER_FIELDS = ("format_version", "dtype", "d_model", "n_tokens", "shard_tokens", "shards", "target_width")
def _seed_of(*parts: int | str) -> int:
    """A 63-bit generator seed from ``parts``, stable across processes and platforms."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def split_pairs(rows: torch.Tensor, target_width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A paired store's rows [n, d_in + d_out] -> (inputs [n, d_in], targets [n, d_out]); (rows, None)
    for a store without targets (``target_width`` 0). Views, no copies."""
    if not target_width:
        return rows, None
    return rows[:, : rows.shape[1] - target_width], rows[:, rows.shape[1] - target_width :]


def _permutation(n: int, *parts: int | str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed_of(*parts))
    return torch.randperm(n, generator=gen)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class ActivationStoreWriter:
    """Write activations [n, d] into shards of ``shard_tokens`` tokens, then a manifest.

    ``manifest_fields`` must hold ``model``, ``site`` and ``layer``; ``revision``,
    ``text_source_hash`` and ``normalization`` (and any other JSON value, such as a paired store's
    ``target_site``) are recorded as given. ``dtype`` is the stored dtype (default: the first
    chunk's). ``target_width`` > 0 makes a paired store: each added row is an input then its
    target, the last ``target_width`` columns. Use as a context manager, or call `close`; leaving
    the ``with`` block on an exception writes no manifest.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        manifest_fields: Mapping[str, Any],
        *,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
        target_width: int = 0,
    ) -> None:
        missing = [f for f in REQUIRED_FIELDS if manifest_fields.get(f) is None]
        if missing:
            raise ValueError(f"manifest_fields must give {list(REQUIRED_FIELDS)}; missing {missing}")
        reserved = [f for f in _WRITER_FIELDS if f in manifest_fields]
        if reserved:
            raise ValueError(f"manifest_fields may not set {reserved}: the writer records them")
        require_int("shard_tokens", shard_tokens)
        require_int("target_width", target_width, 0)
        self.target_width = target_width
        if dtype is not None:
            require_dtype("dtype", dtype, tuple(DTYPES.values()))
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / MANIFEST_FILE
        if manifest.exists():
            if not overwrite:
                raise FileExistsError(f"{self.directory} already holds an activation store (pass overwrite=True)")
            manifest.unlink()
            for old in self.directory.glob("shard-*.safetensors"):
                old.unlink()
        self.fields = json.loads(json.dumps(dict(manifest_fields)))  # a JSON-clean copy
        self.shard_tokens, self.dtype = shard_tokens, dtype
        self.d_model: int | None = None
        self.n_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self._pending: list[torch.Tensor] = []
        self._n_pending = 0
        self._closed = False

    def add(self, chunk: torch.Tensor) -> None:
        """Append ``chunk`` [n, d] (any float dtype, any device); full shards are written as they fill."""
        if self._closed:
            raise RuntimeError("add() after close()")
        if not isinstance(chunk, torch.Tensor) or chunk.dim() != 2 or not chunk.is_floating_point():
            raise ValueError(f"chunk must be a 2-D float tensor [n, d], got {getattr(chunk, 'shape', type(chunk))}")
        if self.d_model is None:
            self.d_model = chunk.shape[1]
            self.dtype = self.dtype or chunk.dtype
            if self.dtype not in DTYPES.values():
                raise TypeError(f"activations must be float32, bfloat16 or float16, got {self.dtype}")
        if chunk.shape[1] != self.d_model:
            raise ValueError(f"chunk has d={chunk.shape[1]} but earlier chunks had d={self.d_model}")
        if self.target_width >= chunk.shape[1]:
            raise ValueError(f"chunk has d={chunk.shape[1]} columns, not more than target_width={self.target_width}: "
                             "a paired row holds its input's columns before its target's")
        self._pending.append(chunk.detach().to("cpu", self.dtype))
        self._n_pending += chunk.shape[0]
        self.n_tokens += chunk.shape[0]
        while self._n_pending >= self.shard_tokens:
            rows = torch.cat(self._pending)
            self._write_shard(rows[: self.shard_tokens])
            rest = rows[self.shard_tokens :]
            self._pending, self._n_pending = [rest], rest.shape[0]

    def _write_shard(self, rows: torch.Tensor) -> None:
        data = save_safetensors({TENSOR_NAME: rows.contiguous()})
        name = _shard_name(len(self.shards))
        atomic_write(self.directory / name, lambda tmp: Path(tmp).write_bytes(data))
        self.shards.append(
            {"file": name, "n_tokens": rows.shape[0], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )

    def close(self) -> Path:
        """Write the last (possibly short) shard and ``manifest.json``; returns the manifest's path."""
        if self._closed:
            return self.directory / MANIFEST_FILE
        if self.n_tokens == 0:
            raise ValueError("no activations were added; refusing to write an empty store")
        if self._n_pending:
            self._write_shard(torch.cat(self._pending))
        self._pending, self._n_pending = [], 0
        manifest = {
            "format_version": FORMAT_VERSION,
            **self.fields,
            "revision": self.fields.get("revision"),
            "text_source_hash": self.fields.get("text_source_hash"),
            "normalization": self.fields.get("normalization"),
            "dtype": dtype_name(self.dtype),
            "d_model": self.d_model,
            "n_tokens": self.n_tokens,
            "shard_tokens": self.shard_tokens,
            "shards": self.shards,
        }
        if self.target_width:
            manifest["target_width"] = self.target_width
        path = self.directory / MANIFEST_FILE
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
        self._closed = True
        return path

    def __enter__(self) -> "ActivationStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class _ShardedSource(abc.ABC):
    """Batching shared by the disk store and the in-memory source: subclasses give shard sizes and loads.

    ``d_model`` is a row's width; a paired source's rows hold ``input_width`` input columns, then
    ``target_width`` target columns.
    """

    shard_sizes: list[int]
    d_model: int
    target_width: int = 0
    default_shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER

    @property
    def input_width(self) -> int:
        """The width of the inputs (a row's, without a paired store's target columns)."""
        return self.d_model - self.target_width

    @abc.abstractmethod
    def _load_shard(self, i: int) -> torch.Tensor:
        """Shard ``i``'s activations [n_i, d]."""

    @property
    def n_tokens(self) -> int:
        return sum(self.shard_sizes)

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Batches per epoch for each rank: ``n_tokens // (batch_size * world_size)``."""
        return self.n_tokens // (batch_size * world_size)

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int | None = None,
        prefetch: int = 2,
        start_batch: int = 0,
    ) -> Iterator[torch.Tensor]:
        """One epoch of fp32 CPU batches [batch_size, d] for ``rank`` (see the module docstring for the order).

        ``prefetch`` > 0 prepares up to that many batches in a background thread (its exceptions
        are raised here; closing the generator stops it); 0 works in the caller's thread.
        """
        checks = (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("prefetch", prefetch, 0),
                  ("start_batch", start_batch, 0))
        for name, value, low in checks:
            require_int(name, value, low)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        buffer = self.default_shuffle_buffer if shuffle_buffer is None else shuffle_buffer
        if buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {buffer}")
        produce = self._produce(batch_size, seed, epoch, rank, world_size, buffer, start_batch)
        return produce if prefetch == 0 else _prefetched(produce, prefetch)

    def _blocks(self, seed: int, epoch: int, buffer: int, first_block: int) -> Iterator[torch.Tensor]:
        """The shuffled blocks of the epoch's token stream, from block ``first_block`` on."""
        order = _permutation(len(self.shard_sizes), seed, epoch, "shards").tolist()
        start = first_block * buffer
        offset, pos = start, 0
        while pos < len(order) and offset >= self.shard_sizes[order[pos]]:
            offset -= self.shard_sizes[order[pos]]
            pos += 1
        block = first_block
        pending: list[torch.Tensor] = []
        n_pending = 0
        for shard in order[pos:]:
            rows = self._load_shard(shard)
            if offset:
                rows, offset = rows[offset:], 0
            pending.append(rows)
            n_pending += rows.shape[0]
            while n_pending >= buffer:
                stream = pending[0] if len(pending) == 1 else torch.cat(pending)
                yield stream[:buffer][_permutation(buffer, seed, epoch, block)]
                block += 1
                pending, n_pending = [stream[buffer:]], stream.shape[0] - buffer
        if n_pending:
            stream = torch.cat(pending)
            yield stream[_permutation(stream.shape[0], seed, epoch, block)]

    def _produce(
        self, batch_size: int, seed: int, epoch: int, rank: int, world_size: int, buffer: int, start_batch: int
    ) -> Iterator[torch.Tensor]:
        global_batch = batch_size * world_size
        n_batches = self.n_tokens // global_batch
        if start_batch >= n_batches:
            return
        start = start_batch * global_batch
        skip = start - (start // buffer) * buffer
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        pending: list[torch.Tensor] = []
        n_pending, emitted = 0, start_batch
        for block in self._blocks(seed, epoch, buffer, start // buffer):
            if skip:
                block, skip = block[skip:], 0
            pending.append(block)
            n_pending += block.shape[0]
            while n_pending >= global_batch and emitted < n_batches:
                stream = pending[0] if len(pending) == 1 else torch.cat(pending)
                yield stream[:global_batch][mine].to(torch.float32, copy=True)
                emitted += 1
                pending, n_pending = [stream[global_batch:]], stream.shape[0] - global_batch
            if emitted == n_batches:
                return


_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _prefetched(source: Iterator[torch.Tensor], depth: int) -> Iterator[torch.Tensor]:
    """Run ``source`` in a daemon thread, ``depth`` items ahead, through a bounded queue."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Raised(exc))
        finally:
            source.close()

    thread = threading.Thread(target=work, name="flashsae-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


_SHARD_FIELDS = {"file": str, "n_tokens": int, "bytes": int, "sha256": str}


def _check_manifest(path: Path, manifest: Any) -> None:
    """ValueError naming ``path`` and the field unless ``manifest`` has every field a reader needs, of its type."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version must be {FORMAT_VERSION}, found {version!r}")
    for field in ("dtype", "d_model", "n_tokens", "shards"):
        if field not in manifest:
            raise ValueError(f"{path} lacks {field!r}: it is not a complete activation store manifest")
    if manifest["dtype"] not in DTYPES:
        raise ValueError(f"{path}: dtype must be one of {', '.join(DTYPES)}, found {manifest['dtype']!r}")
    for field in ("d_model", "n_tokens"):
        value = manifest[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {field} must be a positive integer, found {value!r}")
    width = manifest.get("target_width", 0)
    if isinstance(width, bool) or not isinstance(width, int) or not 0 <= width < manifest["d_model"]:
        raise ValueError(f"{path}: target_width must be an integer in [0, d_model={manifest['d_model']}), "
                         f"found {width!r}")
    if not isinstance(manifest["shards"], list):
        raise ValueError(f"{path}: shards must be a list, found {manifest['shards']!r}")
    for number, shard in enumerate(manifest["shards"]):
        for field, kind in _SHARD_FIELDS.items():
            if not isinstance(shard, dict) or not isinstance(shard.get(field), kind) or isinstance(shard.get(field), bool):
                raise ValueError(f"{path}: shard {number} needs a {kind.__name__} {field!r}, found {shard!r}")


class ActivationStore(_ShardedSource):
    """Read a directory written by `ActivationStoreWriter`.

    ``expect`` (e.g. ``{"model": ..., "site": ..., "layer": ...}``) is compared with the manifest;
    a mismatch raises ValueError naming the field with the expected and found values. Every shard
    must exist with its recorded size (checked here) and sha256 (checked on each read; `verify`
    checks them all now).
    """

    def __init__(
        self, directory: str | os.PathLike, expect: Mapping[str, Any] | None = None, *, verify_reads: bool = True
    ) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.directory} is not a finished activation store: {MANIFEST_FILE} is missing"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        _check_manifest(path, self.manifest)
        for field, expected in (expect or {}).items():
            found = self.manifest.get(field)
            if found != expected:
                raise ValueError(
                    f"activation store {self.directory} does not match: {field} expected {expected!r}, found {found!r}"
                )
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.d_model = int(self.manifest["d_model"])
        self.target_width = int(self.manifest.get("target_width", 0))
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self.shard_sizes = [int(s["n_tokens"]) for s in self.shards]
        if sum(self.shard_sizes) != self.manifest["n_tokens"]:
            raise ValueError(
                f"{path}: shard token counts sum to {sum(self.shard_sizes)}, n_tokens says {self.manifest['n_tokens']}"
            )
        for shard in self.shards:
            file = self.directory / shard["file"]
            if not file.is_file():
                raise FileNotFoundError(f"activation store {self.directory}: shard {shard['file']} is missing")
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise ValueError(
                    f"activation store {self.directory}: shard {shard['file']} has {size} bytes, "
                    f"manifest says {shard['bytes']}"
                )
        self.verify_reads = verify_reads

    @property
    def normalization(self) -> Any:
        """The normalization info recorded at collection time (None if none was given)."""
        return self.manifest.get("normalization")

    def _read_verified(self, i: int) -> bytes:
        shard = self.shards[i]
        data = (self.directory / shard["file"]).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard["sha256"]:
            raise ValueError(
                f"activation store {self.directory}: shard {shard['file']} is corrupt: "
                f"sha256 expected {shard['sha256']}, found {digest}"
            )
        return data

    def verify(self) -> None:
        """Hash every shard now; raises ValueError on the first mismatch."""
        for i in range(len(self.shards)):
            self._read_verified(i)

    def _load_shard(self, i: int) -> torch.Tensor:
        shard = self.shards[i]
        if self.verify_reads:
            data = self._read_verified(i)
        else:
            data = (self.directory / shard["file"]).read_bytes()
        rows = load_safetensors(data)[TENSOR_NAME]
        if tuple(rows.shape) != (shard["n_tokens"], self.d_model) or rows.dtype != self.dtype:
            raise ValueError(
                f"activation store {self.directory}: shard {shard['file']} holds {tuple(rows.shape)} {rows.dtype}, "
                f"manifest says {(shard['n_tokens'], self.d_model)} {self.dtype}"
            )
        return rows

    def load_all(self) -> torch.Tensor:
        """Every token in shard order: [n_tokens, d] in the stored dtype (for small stores and tests)."""
        return torch.cat([self._load_shard(i) for i in range(len(self.shards))])


class InMemorySource(_ShardedSource):
    """Activations already in memory [N, d], batched exactly like a store with the same shard size.

    With the default ``shard_tokens=None`` (one shard) and ``shuffle_buffer=None`` (the whole
    tensor) each epoch is a full permutation of the rows. ``target_width``: the last columns of
    each row are a paired target (as in a paired store).
    """

    def __init__(self, activations: torch.Tensor, *, shard_tokens: int | None = None, target_width: int = 0) -> None:
        if not isinstance(activations, torch.Tensor) or activations.dim() != 2 or not activations.is_floating_point():
            got = getattr(activations, "shape", type(activations))
            raise ValueError(f"activations must be a 2-D float tensor [N, d], got {got}")
        self.activations = activations.detach().cpu()
        self.d_model = activations.shape[1]
        require_int("target_width", target_width, 0, self.d_model - 1)
        self.target_width = target_width
        n = activations.shape[0]
        step = shard_tokens or max(n, 1)
        self._starts = list(range(0, n, step))
        self.shard_sizes = [min(step, n - s) for s in self._starts]
        self.default_shuffle_buffer = max(n, 1)

    def _load_shard(self, i: int) -> torch.Tensor:
        start = self._starts[i]
        return self.activations[start : start + self.shard_sizes[i]]
