"""Text sources for collection and evaluation: documents as an iterator of str, and a hash of them.

A source is None / `DEFAULT_TEXT` (Python's ``pydoc_data.topics``: always there, no network,
~128k tokens), `STDLIB_TEXT` (the docstrings and comment blocks of this Python's standard library,
deduplicated: ~1M tokens, no network), a local file (``.txt`` and the like: blank-line separated
paragraphs; ``.jsonl``: each line's "text"), or any other name, read as a Hugging Face
``datasets`` dataset.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import re
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

DEFAULT_TEXT = "pydoc_data.topics"
STDLIB_TEXT = "python-stdlib"
_LOCAL_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".json")
# Shorter docstrings and comment blocks are mostly boilerplate ("Return self.", "noqa").
_MIN_DOCSTRING_CHARS = 40
_MIN_COMMENT_CHARS = 60


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
    if source == STDLIB_TEXT:
        return list(_stdlib_texts())
    path = Path(source).expanduser()
    if path.is_file():
        return _file_texts(path)
    if path.exists():
        raise ValueError(f"text source {source!r} is a directory; give a file (.txt paragraphs or .jsonl with 'text')")
    if _looks_like_path(source):
        raise FileNotFoundError(f"text source {source!r} looks like a file path but does not exist")
    return None


def iter_texts(source: str | None = None, *, split: str = "train", text_column: str = "text") -> Iterator[str]:
    """Documents from ``source``: None / `DEFAULT_TEXT` (Python's pydoc topics, sorted by name),
    `STDLIB_TEXT` (the standard library's docstrings and comments), a local file (blank-line separated paragraphs; ``.jsonl``: each line's "text"), or a Hugging Face
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
