"""Interop with the real SAELens and sparsify packages: their loaders read our exports, ours read
theirs, and their own training loops give the same losses with our ops swapped in."""
from __future__ import annotations

import argparse
import os
import warnings

# sparsify's Triton decoder needs latent counts divisible by its block size and a GPU; its own
# switch selects the eager (embedding_bag) decoder. Must be set before sparsify is imported.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import pytest
import torch

from flashsae import TopKSAE
from flashsae.sae.interop import (
    NORM_SCALE_KEY,
    export_saelens,
    export_sparsify,
    import_saelens,
    import_sparsify,
    patch_saelens,
    patch_sparsify,
    unpatch,
)
from flashsae.sae.interop.cli import add_interop_commands

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[interop]')")
sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e '.[interop]')")
from sae_lens import SAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens import TopKSAE as SLTopKSAE  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

D, F, K, B = 13, 41, 5, 24
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
warnings.filterwarnings("ignore", category=DeprecationWarning)


def _random_sae(seed: int, *, dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> TopKSAE:
    """A TopKSAE with untied encoder, non-unit decoder rows and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(D, F, K, backend="torch", dtype=dtype, metadata=metadata)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.5).to(dtype))
        sae.b_enc.add_(0.2)
    return sae


def _x(seed: int, n: int = B) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _dense(vals: torch.Tensor, idx: torch.Tensor, n_features: int = F) -> torch.Tensor:
    return vals.new_zeros(vals.shape[0], n_features).scatter(-1, idx, vals)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- SAELens format


def test_saelens_export_names_the_model_hook_and_sae_lens_version_of_a_trained_sae(tmp_path):
    import importlib.metadata
    import json
    import re
    from pathlib import Path

    from flashsae.sae.interop import saelens

    trained = {"model": "gpt2", "hook": "transformer.h.3.attn.c_proj", "seq_len": 64, "text": "corpus.jsonl",
               "site": "attn_out", "layer": 3}
    export_saelens(_random_sae(2, metadata=trained), tmp_path)
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
    ours = _random_sae(0, metadata=meta)
    export_saelens(ours, tmp_path)
    theirs = SAE.load_from_disk(tmp_path)
    assert isinstance(theirs, SLTopKSAE) and theirs.cfg.k == K and theirs.cfg.metadata.hook_name == meta["hook_name"]
    x = _x(1)  # raw activations; our SAE sees them scaled by norm_scale
    s = 1.0 if norm_scale is None else norm_scale
    out = ours(x * s)
    with torch.no_grad():
        acts = theirs.encode(x)
        recon = theirs.decode(acts)
    _close(acts, _dense(out.vals, out.idx).detach())
    _close(recon, out.x_hat.detach() / s)
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
    x = _x(4)
    with torch.no_grad():
        acts = theirs.encode(x)
        recon = theirs.decode(acts)
        out = ours(x)
    _close(_dense(out.vals, out.idx), acts)
    _close(out.x_hat, recon)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_import_round_trip_is_exact_in_each_dtype(tmp_path, dtype, fmt):
    ours = _random_sae(5, dtype=dtype, metadata={"layer": 2})
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
    ours = _random_sae(6, metadata=meta)
    export_sparsify(ours, tmp_path)
    theirs = SparseCoder.load_from_disk(tmp_path)
    assert theirs.num_latents == F and theirs.cfg.k == K and theirs.d_in == D
    x = _x(7)
    s = 1.0 if norm_scale is None else norm_scale
    out = ours(x * s)
    with torch.no_grad():
        res = theirs(x)
    _close(_dense(res.latent_acts, res.latent_indices), _dense(out.vals, out.idx).detach())
    _close(res.sae_out, out.x_hat.detach() / s)


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
    x = _x(9)
    with torch.no_grad():
        enc = theirs.encode(x)
        recon = theirs.decode(enc.top_acts, enc.top_indices)
        out = ours(x)
    _close(_dense(out.vals, out.idx), _dense(enc.top_acts, enc.top_indices))
    _close(out.x_hat, recon)


def test_sparsify_import_refuses_groupmax(tmp_path):
    SparseCoder(D, SparseCoderConfig(num_latents=40, k=K, activation="groupmax")).save_to_disk(tmp_path)
    with pytest.raises(ValueError, match="groupmax"):
        import_sparsify(tmp_path)


# ---------------------------------------------------------------- their training loops on our ops


def _saelens_trainer(patched: bool) -> tuple[SAETrainer, TopKTrainingSAE]:
    torch.manual_seed(10)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K, aux_loss_coefficient=0.5))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D) * 0.3)
        sae.b_enc.copy_(torch.randn(F) * 0.1)
    if patched:
        patch_saelens(sae, backend="torch")
    cfg = SAETrainerConfig(
        total_training_samples=10_000, train_batch_size_samples=B, lr=3e-3, lr_end=3e-3, dead_feature_window=1
    )
    return SAETrainer(cfg, sae, data_provider=iter(())), sae


def test_saelens_trainer_steps_match_with_our_ops():
    (ref_trainer, ref), (our_trainer, ours) = _saelens_trainer(False), _saelens_trainer(True)
    assert ref.cfg.rescale_acts_by_decoder_norm  # SAELens' training default; the patch keeps it
    aux_steps = 0
    for step in range(6):
        batch = _x(100 + step) * 2.0
        a, b = ref_trainer.step(batch), our_trainer.step(batch)
        ref_trainer.n_training_steps += 1
        our_trainer.n_training_steps += 1
        _close(b.loss, a.loss, 1e-4)
        _close(b.losses["mse_loss"], a.losses["mse_loss"], 1e-4)
        _close(b.losses["auxiliary_reconstruction_loss"], a.losses["auxiliary_reconstruction_loss"], 1e-4)
        _close(b.feature_acts, a.feature_acts, 1e-4)
        aux_steps += int(a.losses["auxiliary_reconstruction_loss"] > 0)
    assert aux_steps > 0, "no step exercised the aux loss (dense hidden_pre path)"
    for name, p in ref.named_parameters():
        _close(getattr(ours, name), p, 1e-4)


def test_saelens_patched_gradients_match_dense_autograd():
    ref, ours = _saelens_trainer(False)[1], _saelens_trainer(True)[1]
    x = _x(11)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    for sae in (ref, ours):
        step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
        sae.training_forward_pass(step).loss.backward()
    for name, p in ref.named_parameters():
        _close(getattr(ours, name).grad, p.grad, 1e-5)
    assert unpatch(ours).encode.__func__ is TopKTrainingSAE.encode


def _sparsify_run(patched: bool, multi_topk: bool, steps: int = 6) -> tuple[list[torch.Tensor], SparseCoder]:
    """sparsify's training step (Trainer.fit's body without the model): FVU + AuxK (+ Multi-TopK)."""
    torch.manual_seed(12)
    coder = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K, multi_topk=multi_topk))
    with torch.no_grad():
        coder.b_dec.copy_(torch.randn(D) * 0.3)
    if patched:
        patch_sparsify(coder, backend="torch")
    opt = torch.optim.Adam(coder.parameters(), lr=3e-3)
    since_fired = torch.zeros(F, dtype=torch.long)
    losses = []
    for step in range(steps):
        x = _x(200 + step) * 2.0
        dead_mask = since_fired > 1
        out = coder(x, dead_mask=dead_mask)
        loss = out.fvu + out.auxk_loss / 32 + out.multi_topk_fvu / 8
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        coder.set_decoder_norm_to_unit_norm()
        since_fired += x.shape[0]
        since_fired[out.latent_indices.flatten()] = 0
        losses.append(torch.stack([out.fvu, out.auxk_loss, out.multi_topk_fvu]).detach())
    return losses, coder


@pytest.mark.parametrize("multi_topk", [False, True])
def test_sparsify_training_steps_match_with_our_ops(multi_topk):
    ref_losses, ref = _sparsify_run(False, multi_topk)
    our_losses, ours = _sparsify_run(True, multi_topk)
    for a, b in zip(ref_losses, our_losses):
        _close(b, a, 1e-4)
    # With Multi-TopK, sparsify reports the 4k indices, so every latent fires on this data.
    assert multi_topk or any(a[1] > 0 for a in ref_losses), "no step exercised the AuxK loss"
    assert all((a[2] > 0) == multi_topk for a in ref_losses)
    for name, p in ref.named_parameters():
        _close(dict(ours.named_parameters())[name], p, 1e-4)


def test_patch_refuses_wrong_architectures():
    with pytest.raises(ValueError, match="topk"):
        patch_sparsify(SparseCoder(D, SparseCoderConfig(num_latents=40, k=K, activation="groupmax")))
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K))
    patch_saelens(sae)
    with pytest.raises(ValueError, match="already patched"):
        patch_saelens(sae)


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_cli_export_then_import_round_trips(tmp_path, fmt, capsys):
    parser = argparse.ArgumentParser(prog="flashsae")
    add_interop_commands(parser.add_subparsers(dest="command", required=True))
    ours = _random_sae(13, metadata={NORM_SCALE_KEY: 2.0})
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
    x = _x(14)
    a, b = ours(x * 2.0), back(x)  # the folded checkpoint takes raw activations
    _close(_dense(b.vals, b.idx).detach(), _dense(a.vals, a.idx).detach())
    _close(b.x_hat.detach(), a.x_hat.detach() / 2.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--format", "onnx", "a", "b"])
