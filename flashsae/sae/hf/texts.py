"""Text sources for collection and evaluation: documents as an iterator of str, and a hash of them.

A source is None / `DEFAULT_TEXT` (Python's ``pydoc_data.topics``: always there, no network,
~128k tokens), `STDLIB_TEXT` (the docstrings and comment blocks of this Python's standard library,
deduplicated: ~1M tokens, no network), a local file (``.txt`` and the like: blank-line separated
paragraphs; ``.jsonl``: each line's "text"), or any other name, read as a Hugging Face
``datasets`` dataset.

Held-out documents: one document in `HELDOUT_EVERY`, chosen by the sha256 of its text, is held out.
Training collects only the others (``documents="train"``) and ``flashsae eval`` reads only the
held-out ones by default (``documents="heldout"``), so evaluation never sees a token the SAE was
trained on. The choice depends on nothing but the text itself: it is the same in any order, for
any source, streamed or not, and identical documents fall on the same side.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

from ...errors import ConfigError, InputError, InputNotFoundError
from .hub import hub_offline, probe_hub

DEFAULT_TEXT = "pydoc_data.topics"
STDLIB_TEXT = "python-stdlib"
_LOCAL_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".json")
HELDOUT_EVERY = 10
DOCUMENTS = ("all", "train", "heldout")
# Shorter docstrings and comment blocks are mostly boilerplate ("Return self.", "noqa").
_MIN_DOCSTRING_CHARS = 40
_MIN_COMMENT_CHARS = 60


def is_heldout(text: str) -> bool:
    """Whether document ``text`` is one of the held-out ones (one in `HELDOUT_EVERY`, by its sha256)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % HELDOUT_EVERY == 0


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


@functools.lru_cache(maxsize=1)
def _stdlib_texts() -> tuple[str, ...]:
    """Docstrings (module, class, function) and comment blocks of every standard-library ``.py`` file.

    Files in sorted path order (site-packages excluded), each file's docstrings then its comment
    blocks (consecutive comment lines joined), exact duplicates dropped after their first place.
    Deterministic for a given Python installation.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    texts: list[str] = []
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():  # old escape sequences in some modules' strings
                warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
                tree = ast.parse(source)
            found = _docstrings(tree) + _comment_blocks(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError):
            continue  # the standard library ships a few deliberately broken files for its tests
        for text in found:
            if text not in seen:
                seen.add(text)
                texts.append(text)
    return tuple(texts)


def _docstrings(tree: ast.AST) -> list[str]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [d for d in docs if d and len(d) >= _MIN_DOCSTRING_CHARS]


def _comment_blocks(source: str) -> list[str]:
    blocks, block = [], []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            block.append(tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            text = " ".join(block)
            if len(text) >= _MIN_COMMENT_CHARS:
                blocks.append(text)
            block = []
    return blocks


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path (``./x``, ``/x``, ``~/x``, ``x.txt``) rather than a hub name."""
    return name.startswith((".", "/", "~")) or name.endswith(_LOCAL_SUFFIXES)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"text file {path}: byte 0x{data[err.start]:02x} at offset {err.start} is not UTF-8; "
            "text sources are read as UTF-8 (convert the file, e.g. with iconv)"
        ) from None


def _file_texts(path: Path) -> list[str]:
    """A .jsonl file's "text" fields, or any other text file's blank-line separated paragraphs."""
    content = _read_utf8(path)
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InputError(f"{path}:{number}: each line must be a JSON object with a string 'text' field")
            texts.append(row["text"])
        return texts
    paragraphs = re.split(r"\n[ \t]*\n", content)
    return [p.strip() for p in paragraphs if p.strip()]


def _local_texts(source: str | None) -> list[str] | None:
    """The texts of the default source or of a local file; None when ``source`` names a dataset."""
    if source is None or source == DEFAULT_TEXT:
        return _pydoc_topics()
    if source == STDLIB_TEXT:
        return list(_stdlib_texts())
    path = Path(source).expanduser()
    if path.is_file():
        return _file_texts(path)
    if path.exists():
        raise InputError(f"text source {source!r} is a directory; give a file (.txt paragraphs or .jsonl with 'text')")
    if looks_like_path(source):
        raise InputNotFoundError(f"text source {source!r} looks like a file path but does not exist")
    return None


def _select(texts: Iterator[str], documents: str) -> Iterator[str]:
    if documents not in DOCUMENTS:
        raise ValueError(f"documents must be one of {', '.join(DOCUMENTS)}, got {documents!r}")
    for text in texts:
        if documents == "all" or is_heldout(text) == (documents == "heldout"):
            yield text


def iter_texts(
    source: str | None = None, *, split: str = "train", text_column: str = "text", documents: str = "all"
) -> Iterator[str]:
    """Documents from ``source``: None / `DEFAULT_TEXT` (Python's pydoc topics, sorted by name),
    `STDLIB_TEXT` (the standard library's docstrings and comments), a local file (blank-line
    separated paragraphs; ``.jsonl``: each line's "text"), or a Hugging Face ``datasets`` name
    (streamed, ``split``, column ``text_column``). ``documents``: "all", "train" (all but the
    held-out ones) or "heldout" (see the module docstring)."""
    local = _local_texts(source)
    if local is not None:
        yield from _select(iter(local), documents)
        return
    yield from _select(_dataset_texts(source, split, text_column), documents)


def _dataset_texts(source: str, split: str, text_column: str) -> Iterator[str]:
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


def check_text_source(source: str | None) -> None:
    """Before any work: a local source is a readable UTF-8 file with some text; a dataset name needs the
    ``datasets`` package and a reachable Hugging Face hub that has it (it is streamed from there).

    Raises InputError (InputNotFoundError for a missing file) or ConfigError naming the source; a
    probe of the hub waits at most `PROBE_TIMEOUT_S` seconds.
    """
    local = _local_texts(source)
    if local is not None:
        if not local:
            raise InputError(f"text source {source!r} holds no text")
        return
    if importlib.util.find_spec("datasets") is None:  # not imported: that takes seconds
        raise ConfigError(
            f"text source {source!r} is not a local file, so it is read as a Hugging Face dataset, which needs "
            "the `datasets` package: pip install datasets"
        )
    if hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise InputError(
            f"text source {source!r} is not a local file, so it would be streamed from the Hugging Face hub, "
            "but offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); give a local text file"
        )
    problem = probe_hub(source, kind="dataset")
    if problem is not None:
        raise InputError(f"text source {source!r} is not a local file, so it is streamed from the Hugging Face "
                         f"hub as a dataset, but {problem.reason}")


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

