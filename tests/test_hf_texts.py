"""Text sources: the default pydoc topics, local files, streamed datasets, and the source hash."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from flashsae.sae.hf import DEFAULT_TEXT, iter_texts, text_source_hash
from flashsae.sae.hf.texts import STDLIB_TEXT


def test_default_texts_are_the_pydoc_topics_in_a_fixed_order():
    from pydoc_data.topics import topics

    texts = list(iter_texts())
    assert len(texts) == len(topics) > 10
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert texts == list(iter_texts(DEFAULT_TEXT)) == [topics[k] for k in sorted(topics)]


def test_stdlib_texts_are_deduplicated_docstrings_and_comments_of_the_standard_library():
    import ast
    import json as json_module
    from pathlib import Path

    texts = list(iter_texts(STDLIB_TEXT))
    assert len(texts) == len(set(texts)) > 5000  # no exact duplicates, and a large corpus
    assert sum(map(len, texts)) > 2_000_000  # characters: about a million tokens
    assert all(len(t) >= 40 for t in texts)
    # json's module docstring is a document, and so is a comment block of its encoder.
    assert ast.get_docstring(ast.parse(Path(json_module.__file__).read_text())) in texts
    assert ("This doesn't pass the iterator directly to ''.join() because the exceptions aren't as detailed.  "
            "The list call should be roughly equivalent to the PySequence_Fast that ''.join() would do.") in texts
    assert text_source_hash(STDLIB_TEXT) == text_source_hash(STDLIB_TEXT) != text_source_hash(DEFAULT_TEXT)


def test_file_texts_are_paragraphs_or_jsonl_rows(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph,\nsecond line.\n\n  \n\nSecond paragraph.\n   \nThird.\n\n")
    assert list(iter_texts(str(txt))) == ["First paragraph,\nsecond line.", "Second paragraph.", "Third."]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "one\n\nstill one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert list(iter_texts(str(jsonl))) == ["one\n\nstill one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(iter_texts(str(bad)))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_texts(str(tmp_path / "missing.txt")))


def test_other_names_stream_a_hugging_face_dataset(monkeypatch):
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([{"text": "alpha", "n": 1}, {"text": "beta", "n": 2}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(iter_texts("someone/corpus", split="validation")) == ["alpha", "beta"]
    assert calls == [("someone/corpus", "validation", True)]
    with pytest.raises(ValueError, match="no column 'body'.*'n', 'text'"):
        list(iter_texts("someone/corpus", text_column="body"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        list(iter_texts("someone/corpus"))


def test_text_source_hash_is_stable_and_content_sensitive(tmp_path):
    assert text_source_hash() == text_source_hash(DEFAULT_TEXT) == text_source_hash(None)
    assert len(text_source_hash()) == 64
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta\n\ngamma")
    b.write_text("alpha beta\n\ngamma")
    assert text_source_hash(str(a)) == text_source_hash(str(b)) != text_source_hash()
    b.write_text("alpha beta\n\ngammA")
    assert text_source_hash(str(a)) != text_source_hash(str(b))
    b.write_text("alpha\n\nbeta\n\ngamma")  # same characters, other documents
    assert text_source_hash(str(a)) != text_source_hash(str(b))
    assert text_source_hash("x/y", split="train") != text_source_hash("x/y", split="test")
    assert text_source_hash("x/y") != text_source_hash("x/z")


def test_a_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    from flashsae.errors import InputError

    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"ok\n\nabc\xa2 def\n")
    with pytest.raises(InputError, match=rf"text file {bad}: byte 0xa2 at offset 7 is not UTF-8"):
        list(iter_texts(str(bad)))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(InputError, match="rows.jsonl:2: not valid JSON"):
        list(iter_texts(str(jsonl)))


def test_held_out_documents_are_one_in_ten_by_hash_and_never_in_the_training_part():
    from flashsae.sae.hf import HELDOUT_EVERY, is_heldout

    texts = list(iter_texts())
    train, heldout = list(iter_texts(documents="train")), list(iter_texts(documents="heldout"))
    assert sorted(train + heldout) == sorted(texts) and not set(train) & set(heldout)
    assert heldout == [t for t in texts if is_heldout(t)] and 0 < len(heldout) < len(texts) / 4
    assert HELDOUT_EVERY == 10
    many = [f"document number {i}" for i in range(5000)]  # about one in ten, whatever the texts
    assert 400 < sum(map(is_heldout, many)) < 600
    assert is_heldout("same text") == is_heldout("same text")  # a property of the text alone
    with pytest.raises(ValueError, match="documents must be one of all, train, heldout"):
        list(iter_texts(documents="test"))


def test_check_text_source_fails_fast_for_every_kind_of_unusable_source(tmp_path, monkeypatch):
    from flashsae.errors import ConfigError, InputError, InputNotFoundError
    from flashsae.sae.hf import check_text_source, texts
    from flashsae.sae.hf.hub import HubProblem

    check_text_source(None)
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(InputError, match="holds no text"):
        check_text_source(str(tmp_path / "blank.txt"))
    with pytest.raises(InputNotFoundError, match="does not exist"):
        check_text_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="is a directory"):
        check_text_source(str(tmp_path))

    installed = {"datasets": False}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if installed["datasets"] else None) if name == "datasets" else real_find_spec(name, *a)))
    with pytest.raises(ConfigError, match="needs the `datasets` package: pip install datasets"):
        check_text_source("someone/corpus")
    installed["datasets"] = True
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError, match="offline mode is set"):
        check_text_source("someone/corpus")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(texts, "probe_hub", lambda name, kind: HubProblem("the hub cannot be reached (DNS)", False))
    with pytest.raises(InputError, match="'someone/corpus' is not a local file, so it is streamed .* cannot be reached"):
        check_text_source("someone/corpus")
    monkeypatch.setattr(texts, "probe_hub", lambda name, kind: None)
    check_text_source("someone/corpus")
