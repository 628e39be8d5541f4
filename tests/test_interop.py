"""Interop with the real SAELens and sparsify packages, checkpoint formats: their loaders read our
exports, ours read theirs (our ops inside their SAEs: test_interop_saelens_patch.py and
test_interop_sparsify_patch.py)."""
from __future__ import annotations

import argparse

import pytest
import torch

from flashsae import TopKSAE
from flashsae.sae.interop import NORM_SCALE_KEY, export_saelens, export_sparsify, import_saelens, import_sparsify
from flashsae.sae.interop.cli import add_interop_commands
from tests.interop_peers import D, DTYPES, F, K, close, dense, random_sae, x_batch

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[interop]')")
sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e '.[interop]')")
from sae_lens import SAE, TopKSAEConfig  # noqa: E402
from sae_lens import TopKSAE as SLTopKSAE  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402


# ---------------------------------------------------------------- SAELens format


def test_saelens_export_names_the_model_hook_and_sae_lens_version_of_a_trained_sae(tmp_path):
    import importlib.metadata
    import json
    import re
    from pathlib import Path

    from flashsae.sae.interop import saelens

    trained = {"model": "gpt2", "hook": "transformer.h.3.attn.c_proj", "seq_len": 64, "text": "corpus.jsonl",
               "site": "attn_out", "layer": 3}
    export_saelens(random_sae(2, metadata=trained), tmp_path)
    metadata = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert metadata["sae_lens_version"] == importlib.metadata.version("sae-lens")
    assert (metadata["model_name"], metadata["hook_name"]) == ("gpt2", "transformer.h.3.attn.c_proj")
    assert (metadata["context_size"], metadata["dataset_path"]) == (64, "corpus.jsonl")
    theirs = SAE.load_from_disk(tmp_path)
    assert (theirs.cfg.metadata.model_name, theirs.cfg.metadata.hook_name) == ("gpt2", "transformer.h.3.attn.c_proj")
    assert import_saelens(tmp_path).metadata == trained  # our metadata comes back whole, nothing added
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"sae-lens==([^"]+)"', pyproject).group(1) == saelens.TESTED_SAELENS_VERSION


@pytest.mark.parametrize("norm_scale", [None, 2.5])
def test_saelens_loader_reads_export_and_computes_our_map(tmp_path, norm_scale):
    meta = {"hook_name": "blocks.1.hook_mlp_out", "site": "mlp_out"}
    if norm_scale is not None:
        meta[NORM_SCALE_KEY] = norm_scale
    ours = random_sae(0, metadata=meta)
    export_saelens(ours, tmp_path)
    theirs = SAE.load_from_disk(tmp_path)
    assert isinstance(theirs, SLTopKSAE) and theirs.cfg.k == K and theirs.cfg.metadata.hook_name == meta["hook_name"]
    x = x_batch(1)  # raw activations; our SAE sees them scaled by norm_scale
    s = 1.0 if norm_scale is None else norm_scale
    out = ours(x * s)
    with torch.no_grad():
        acts = theirs.encode(x)
        recon = theirs.decode(acts)
    close(acts, dense(out.vals, out.idx).detach())
    close(recon, out.x_hat.detach() / s)
    assert (acts > 0).sum(-1).min() > 0  # non-trivial selection


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_import_of_saelens_saved_sae_matches_their_forward(tmp_path, rescale, apply_b_dec):
    torch.manual_seed(3)
    cfg = TopKSAEConfig(d_in=D, d_sae=F, k=K, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply_b_dec)
    theirs = SLTopKSAE(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    theirs.save_model(tmp_path)
    ours = import_saelens(tmp_path, backend="torch")
    x = x_batch(4)
    with torch.no_grad():
        acts = theirs.encode(x)
        recon = theirs.decode(acts)
        out = ours(x)
    close(dense(out.vals, out.idx), acts)
    close(out.x_hat, recon)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_import_round_trip_is_exact_in_each_dtype(tmp_path, dtype, fmt):
    ours = random_sae(5, dtype=dtype, metadata={"layer": 2})
    export, load = (export_saelens, import_saelens) if fmt == "saelens" else (export_sparsify, import_sparsify)
    back = load(export(ours, tmp_path))
    assert back.dtype == dtype and back.metadata == {"layer": 2} and back.k == K
    for name, p in ours.named_parameters():
        assert torch.equal(getattr(back, name), p), name


def test_saelens_import_refuses_per_input_normalization(tmp_path):
    theirs = SLTopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=K, normalize_activations="layer_norm"))
    theirs.save_model(tmp_path)
    with pytest.raises(ValueError, match="layer_norm"):
        import_saelens(tmp_path)


# ---------------------------------------------------------------- sparsify format


@pytest.mark.parametrize("norm_scale", [None, 0.75])
def test_sparsify_loader_reads_export_and_computes_our_map(tmp_path, norm_scale):
    meta = {} if norm_scale is None else {NORM_SCALE_KEY: norm_scale}
    ours = random_sae(6, metadata=meta)
    export_sparsify(ours, tmp_path)
    theirs = SparseCoder.load_from_disk(tmp_path)
    assert theirs.num_latents == F and theirs.cfg.k == K and theirs.d_in == D
    x = x_batch(7)
    s = 1.0 if norm_scale is None else norm_scale
    out = ours(x * s)
    with torch.no_grad():
        res = theirs(x)
    close(dense(res.latent_acts, res.latent_indices), dense(out.vals, out.idx).detach())
    close(res.sae_out, out.x_hat.detach() / s)


@pytest.mark.parametrize("transcode", [False, True])
def test_import_of_sparsify_saved_coder_matches_their_encode_decode(tmp_path, transcode):
    torch.manual_seed(8)
    theirs = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K, transcode=transcode))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    theirs.save_to_disk(tmp_path)
    ours = import_sparsify(tmp_path, backend="torch")
    assert ours.metadata.get("transcode", False) == transcode
    x = x_batch(9)
    with torch.no_grad():
        enc = theirs.encode(x)
        recon = theirs.decode(enc.top_acts, enc.top_indices)
        out = ours(x)
    close(dense(out.vals, out.idx), dense(enc.top_acts, enc.top_indices))
    close(out.x_hat, recon)


def test_sparsify_import_of_multi_topk_coder_records_the_setting(tmp_path):
    torch.manual_seed(15)
    theirs = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K, multi_topk=True))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    theirs.save_to_disk(tmp_path)
    ours = import_sparsify(tmp_path, backend="torch")
    assert ours.metadata["multi_topk"] is True and ours.k == K
    x = x_batch(16)
    with torch.no_grad():
        res, out = theirs(x), ours(x)
        enc = theirs.encode(x)
        recon = theirs.decode(enc.top_acts, enc.top_indices)
    close(out.x_hat, recon)  # the top-k map is imported ...
    assert res.latent_indices.shape[-1] == 4 * K  # ... while sparsify's forward reports its top-4k one
    assert (res.sae_out - out.x_hat).abs().max() > 1e-3
    plain = tmp_path / "plain"
    SparseCoder(D, SparseCoderConfig(num_latents=F, k=K)).save_to_disk(plain)
    assert "multi_topk" not in import_sparsify(plain).metadata


def test_sparsify_import_refuses_groupmax(tmp_path):
    SparseCoder(D, SparseCoderConfig(num_latents=40, k=K, activation="groupmax")).save_to_disk(tmp_path)
    with pytest.raises(ValueError, match="groupmax"):
        import_sparsify(tmp_path)


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_cli_export_then_import_round_trips(tmp_path, fmt, capsys):
    parser = argparse.ArgumentParser(prog="flashsae")
    add_interop_commands(parser.add_subparsers(dest="command", required=True))
    ours = random_sae(13, metadata={NORM_SCALE_KEY: 2.0})
    ours.save(tmp_path / "ckpt")
    for argv in (
        ["export", "--format", fmt, str(tmp_path / "ckpt"), str(tmp_path / "peer")],
        ["import", "--format", fmt, str(tmp_path / "peer"), str(tmp_path / "back")],
    ):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    peer = SAE.load_from_disk(tmp_path / "peer") if fmt == "saelens" else SparseCoder.load_from_disk(tmp_path / "peer")
    assert peer is not None
    back = TopKSAE.load(tmp_path / "back", backend="torch")
    assert back.metadata == {"norm_scale_folded": 2.0}
    x = x_batch(14)
    a, b = ours(x * 2.0), back(x)  # the folded checkpoint takes raw activations
    close(dense(b.vals, b.idx).detach(), dense(a.vals, a.idx).detach())
    close(b.x_hat.detach(), a.x_hat.detach() / 2.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--format", "onnx", "a", "b"])
