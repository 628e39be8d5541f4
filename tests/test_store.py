"""Activation store: shards and manifest on disk, verification, deterministic resumable batching."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from flashsae.sae import store as store_mod
from flashsae.sae.store import ActivationStore, ActivationStoreWriter, InMemorySource

FIELDS = {"model": "tiny-lm", "revision": "abc123", "site": "resid", "layer": 3, "text_source_hash": "f00d"}


def write_store(path, x, *, shard_tokens=37, fields=FIELDS, chunk=23, **kwargs):
    with ActivationStoreWriter(path, fields, shard_tokens=shard_tokens, **kwargs) as writer:
        for start in range(0, x.shape[0], chunk):
            writer.add(x[start : start + chunk])
    return ActivationStore(path, expect={k: fields[k] for k in ("model", "site", "layer")})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shards_read_back_bit_exact_and_manifest_records_the_source(tmp_path, dtype):
    torch.manual_seed(0)
    x = torch.randn(203, 11).to(dtype)
    store = write_store(tmp_path, x, fields={**FIELDS, "normalization": {"scale": 0.5}})
    assert store.load_all().dtype == dtype
    assert torch.equal(store.load_all().view(torch.int16 if dtype != torch.float32 else torch.int32),
                       x.view(torch.int16 if dtype != torch.float32 else torch.int32))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["n_tokens"] == 203 and manifest["d_model"] == 11
    assert manifest["dtype"] == str(dtype).removeprefix("torch.")
    assert [s["n_tokens"] for s in manifest["shards"]] == [37] * 5 + [18]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    for key, value in FIELDS.items():
        assert manifest[key] == value
    assert manifest["normalization"] == {"scale": 0.5} == store.normalization
    assert manifest["format_version"] == store_mod.FORMAT_VERSION
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("field, value", [("model", "other-lm"), ("site", "mlp_out"), ("layer", 4)])
def test_mismatched_manifest_field_is_rejected_naming_expected_and_found(tmp_path, field, value):
    write_store(tmp_path, torch.randn(50, 4))
    expect = {"model": "tiny-lm", "site": "resid", "layer": 3, field: value}
    with pytest.raises(ValueError, match=rf"{field} expected {value!r}, found {FIELDS[field]!r}"):
        ActivationStore(tmp_path, expect=expect)


def test_flipped_byte_in_a_shard_is_reported_as_a_sha256_mismatch(tmp_path):
    write_store(tmp_path, torch.randn(100, 8))
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    store = ActivationStore(tmp_path)
    with pytest.raises(ValueError, match=r"shard-00001.safetensors is corrupt: sha256 expected"):
        store.verify()
    with pytest.raises(ValueError, match="is corrupt"):
        list(store.batches(10, seed=0, epoch=0, shuffle_buffer=40))


def test_missing_or_truncated_shard_and_missing_manifest_fail_at_open(tmp_path):
    write_store(tmp_path / "a", torch.randn(100, 8))
    (tmp_path / "a" / "shard-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00002.safetensors is missing"):
        ActivationStore(tmp_path / "a")
    write_store(tmp_path / "b", torch.randn(100, 8))
    shard = tmp_path / "b" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ValueError, match="shard-00000.safetensors has .* bytes"):
        ActivationStore(tmp_path / "b")
    writer = ActivationStoreWriter(tmp_path / "c", FIELDS, shard_tokens=10)
    writer.add(torch.randn(25, 8))  # never closed: shards but no manifest
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        ActivationStore(tmp_path / "c")


def test_writer_refuses_to_overwrite_and_requires_the_identity_fields(tmp_path):
    write_store(tmp_path, torch.randn(30, 4))
    with pytest.raises(FileExistsError):
        ActivationStoreWriter(tmp_path, FIELDS)
    with pytest.raises(ValueError, match="missing \\['layer'\\]"):
        ActivationStoreWriter(tmp_path / "new", {"model": "m", "site": "resid"})
    with pytest.raises(ValueError, match="d=5 but earlier chunks had d=4"):
        w = ActivationStoreWriter(tmp_path / "new2", FIELDS)
        w.add(torch.randn(3, 4))
        w.add(torch.randn(3, 5))


def drain(source, batch_size, **kwargs):
    return list(source.batches(batch_size, **kwargs))


def test_batches_are_a_deterministic_permutation_that_changes_with_seed_and_epoch(tmp_path):
    x = torch.arange(230 * 3, dtype=torch.float32).reshape(230, 3)
    store = write_store(tmp_path, x, dtype=torch.float32)
    run = dict(seed=7, epoch=1, shuffle_buffer=50)
    a, b = drain(store, 20, **run), drain(store, 20, **run, prefetch=0)
    assert len(a) == 230 // 20 and all(t.shape == (20, 3) and t.dtype == torch.float32 for t in a)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    seen = torch.cat(a)[:, 0].long() // 3
    assert seen.unique().numel() == seen.numel()  # no token twice
    assert not torch.equal(seen, torch.arange(seen.numel()))  # shuffled
    other_epoch = torch.cat(drain(store, 20, seed=7, epoch=2, shuffle_buffer=50))
    other_seed = torch.cat(drain(store, 20, seed=8, epoch=1, shuffle_buffer=50))
    assert not torch.equal(other_epoch, torch.cat(a)) and not torch.equal(other_seed, torch.cat(a))


def test_rows_move_only_within_one_shuffle_buffer_block(tmp_path):
    x = torch.arange(200, dtype=torch.float32).unsqueeze(1)
    store = write_store(tmp_path, x, shard_tokens=200)  # one shard: the stream is in file order
    out = torch.cat(drain(store, 10, seed=1, epoch=0, shuffle_buffer=40)).squeeze(1).long()
    for block in range(5):
        assert sorted(out[block * 40 : (block + 1) * 40].tolist()) == list(range(block * 40, (block + 1) * 40))


@pytest.mark.parametrize("start_batch", [1, 4, 7, 11])
@pytest.mark.parametrize("world_size", [1, 3])
def test_start_batch_resumes_exactly_where_an_uninterrupted_epoch_would_be(tmp_path, start_batch, world_size):
    torch.manual_seed(1)
    x = torch.randn(251, 5).to(torch.bfloat16)
    store = write_store(tmp_path, x)
    run = dict(seed=3, epoch=2, shuffle_buffer=45, world_size=world_size, rank=world_size - 1)
    full = drain(store, 7, **run)
    resumed = drain(store, 7, **run, start_batch=start_batch)
    assert len(resumed) == max(len(full) - start_batch, 0)
    assert all(torch.equal(p, q) for p, q in zip(full[start_batch:], resumed))


def test_resume_skips_the_shards_before_its_block(tmp_path, monkeypatch):
    store = write_store(tmp_path, torch.randn(370, 4), shard_tokens=37)
    loaded = []
    original = ActivationStore._load_shard
    monkeypatch.setattr(ActivationStore, "_load_shard", lambda self, i: loaded.append(i) or original(self, i))
    drain(store, 10, seed=0, epoch=0, shuffle_buffer=37, start_batch=30, prefetch=0)
    assert len(loaded) <= 3  # tokens 300..369 span blocks 8..9 -> at most the last three shards read


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_slices_partition_the_single_process_global_batch(tmp_path, world_size):
    torch.manual_seed(2)
    x = torch.randn(300, 6)
    sources = [write_store(tmp_path, x), InMemorySource(x, shard_tokens=37)]
    for source in sources:
        run = dict(seed=5, epoch=0, shuffle_buffer=64)
        single = drain(source, 8 * world_size, **run)
        per_rank = [drain(source, 8, **run, rank=r, world_size=world_size) for r in range(world_size)]
        assert all(len(p) == len(single) for p in per_rank)
        for i, global_batch in enumerate(single):
            assert torch.equal(torch.cat([p[i] for p in per_rank]), global_batch)


def test_in_memory_source_matches_a_store_with_the_same_shards_and_defaults_to_a_full_permutation(tmp_path):
    x = torch.randn(120, 4)
    store = write_store(tmp_path, x, shard_tokens=30)
    run = dict(seed=9, epoch=3, shuffle_buffer=50)
    in_memory = drain(InMemorySource(x, shard_tokens=30), 12, **run)
    assert all(torch.equal(a, b) for a, b in zip(drain(store, 12, **run), in_memory))
    full = torch.cat(drain(InMemorySource(x), 12, seed=9, epoch=3))
    assert full.shape == x.shape
    assert torch.equal(full[full[:, 0].argsort()], x[x[:, 0].argsort()])


def test_prefetch_thread_exception_reaches_the_consumer():
    class Boom(InMemorySource):
        def _load_shard(self, i):
            if i == 2:
                raise OSError("disk went away")
            return super()._load_shard(i)

    source = Boom(torch.arange(100.0).unsqueeze(1), shard_tokens=10)
    with pytest.raises(OSError, match="disk went away"):
        drain(source, 5, seed=0, epoch=0, shuffle_buffer=10)


def test_closing_the_generator_stops_the_prefetch_thread():
    source = InMemorySource(torch.randn(1000, 4), shard_tokens=50)
    before = {t for t in threading.enumerate() if t.name == "flashsae-prefetch"}
    gen = source.batches(4, seed=0, epoch=0, shuffle_buffer=50, prefetch=2)
    next(gen)
    running = {t for t in threading.enumerate() if t.name == "flashsae-prefetch"} - before
    assert len(running) == 1
    gen.close()
    (thread,) = running
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_bad_arguments_name_themselves():
    source = InMemorySource(torch.randn(10, 2))
    with pytest.raises(ValueError, match="batch_size"):
        source.batches(0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="rank"):
        source.batches(2, seed=0, epoch=0, rank=2, world_size=2)


@pytest.mark.parametrize("change, message", [
    ({"d_model": None}, "lacks 'd_model'"),
    ({"dtype": "float64"}, "dtype must be one of float32, bfloat16, float16, found 'float64'"),
    ({"n_tokens": "100"}, "n_tokens must be a positive integer, found '100'"),
    ({"shards": [{"file": "shard-00000.safetensors"}]}, "shard 0 needs a int 'n_tokens'"),
])
def test_a_manifest_missing_a_field_names_the_file_and_the_field(tmp_path, change, message):
    write_store(tmp_path, torch.randn(30, 4))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for key, value in change.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{tmp_path / 'manifest.json'}.*{message}"):
        ActivationStore(tmp_path)
