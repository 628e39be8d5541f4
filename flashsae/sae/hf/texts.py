"""Text sources for collection and evaluation: documents as an iterator of str, and a hash of them.

A source is None / `DEFAULT_TEXT` (Python's ``pydoc_data.topics``: always there, no network), a
local file (``.txt`` and the like: blank-line separated paragraphs; ``.jsonl``: each line's
"text"), or any other name, read as a Hugging Face ``datasets`` dataset.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

DEFAULT_TEXT = "pydoc_data.topics"
_LOCAL_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".json")


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
