"""`patch_sparsify` inside the real sparsify: its training step and Trainer (k decay included), rows
with fewer than k positive pre-activations and float64 give what sparsify itself gives."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from flashsae.sae.interop import patch_sparsify, unpatch
from tests.interop_peers import D, F, K, close, randomize_, x_batch

sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e '.[interop]')")
from sparsify import SaeConfig, SparseCoder, SparseCoderConfig, TrainConfig, Trainer  # noqa: E402


@pytest.fixture
def own_encodes(monkeypatch) -> list[int]:
    """Counts the encodes of patched coders that ran sparsify's own encoder (rows short of k positives)."""
    calls: list[int] = []
    real = SparseCoder.encode

    def counting(coder, x):
        if "_flashsae_patch" in coder.__dict__:
            calls.append(1)
        return real(coder, x)

    monkeypatch.setattr(SparseCoder, "encode", counting)
    return calls


def _grads(coder: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in coder.named_parameters()}


# ---------------------------------------------------------------- sparsify's training step on our ops


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
        x = x_batch(200 + step) * 2.0
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
def test_sparsify_training_steps_match_with_our_ops(multi_topk, own_encodes):
    ref_losses, ref = _sparsify_run(False, multi_topk)
    our_losses, ours = _sparsify_run(True, multi_topk)
    assert own_encodes == []  # every row had k positive pre-activations: our ops did the encoding
    for a, b in zip(ref_losses, our_losses):
        close(b, a, 1e-4)
    # With Multi-TopK, sparsify reports the 4k indices, so every latent fires on this data.
    assert multi_topk or any(a[1] > 0 for a in ref_losses), "no step exercised the AuxK loss"
    assert all((a[2] > 0) == multi_topk for a in ref_losses)
    for name, p in ref.named_parameters():
        close(dict(ours.named_parameters())[name], p, 1e-4)


# ---------------------------------------------------------------- rows with fewer than k positive pre-activations


def test_rows_short_of_k_positive_pre_activations_match_sparsify(own_encodes):
    """sparsify passes gradient to latents selected with value 0 and counts them as fired; which
    zero latents it selects is torch.topk's choice. Such batches get sparsify's own encoder."""
    ref = randomize_(SparseCoder(D, SparseCoderConfig(num_latents=F, k=K)), 40)
    with torch.no_grad():
        ref.encoder.bias.sub_(1.5)  # most pre-activations negative
    ours = patch_sparsify(copy.deepcopy(ref), backend="torch")
    x = x_batch(41)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    a, b = ref(x, dead_mask=dead), ours(x, dead_mask=dead)
    short = (a.latent_acts == 0).any(-1)
    assert short.any() and not short.all()  # some rows short of k positives, some not
    assert len(own_encodes) == 1
    assert torch.equal(b.latent_indices, a.latent_indices)  # the same zero latents: the same firing counts
    close(b.latent_acts, a.latent_acts)
    close(b.sae_out, a.sae_out)
    (a.fvu + a.auxk_loss).backward()
    (b.fvu + b.auxk_loss).backward()
    for name, g in _grads(ref).items():
        close(_grads(ours)[name], g, 1e-5)
    zero = a.latent_acts == 0
    only_zero = sorted(set(a.latent_indices[zero].tolist()) - set(a.latent_indices[~zero].tolist()))
    assert only_zero and (_grads(ours)["encoder.bias"][only_zero] != 0).all()  # sparsify's gradient semantics


# ---------------------------------------------------------------- sparsify's Trainer with k decay (k > 512)


def _trainer_run(tmp_path, patched: bool, positive_pre_acts: bool) -> Trainer:
    """sparsify's Trainer on a 1-layer GPT-2 (d=64, 1024 latents), 5 steps: k decays from min(F, 10 d) = 640 to 32."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=64, n_positions=16))
    tokens = torch.randint(0, 64, (20, 16), generator=torch.Generator().manual_seed(1))
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    cfg = TrainConfig(
        SaeConfig(expansion_factor=16, k=32), batch_size=4, k_decay_steps=4, layers=[0], optimizer="adam",
        lr=1e-3, lr_warmup_steps=0, auxk_alpha=1 / 32, dead_feature_threshold=64, log_to_wandb=False,
        save_every=1000, save_dir=str(tmp_path / ("patched" if patched else "ref")),
    )
    trainer = Trainer(cfg, dataset, model)
    assert trainer.initial_k == 640
    for coder in trainer.saes.values():
        if positive_pre_acts:
            with torch.no_grad():
                coder.encoder.bias.add_(3.0)
        if patched:
            patch_sparsify(coder, backend="torch")
    precision = torch.get_float32_matmul_precision()
    try:
        trainer.fit()
    finally:
        torch.set_float32_matmul_precision(precision)
    return trainer


@pytest.mark.parametrize("positive_pre_acts", [True, False], ids=["our-ops", "rows-short-of-k"])
def test_sparsify_trainer_with_k_decay_above_512_matches(tmp_path, positive_pre_acts, own_encodes):
    ref = _trainer_run(tmp_path, False, positive_pre_acts)
    ours = _trainer_run(tmp_path, True, positive_pre_acts)
    # All pre-activations positive: our ops encode with k = 640, 488, 336, 184, 32; else sparsify's encoder does.
    assert (own_encodes == []) == positive_pre_acts
    for name, coder in ref.saes.items():
        assert coder.cfg.k == 32
        for pname, p in coder.named_parameters():
            close(dict(ours.saes[name].named_parameters())[pname], p, 1e-4)
        assert torch.equal(ours.num_tokens_since_fired[name], ref.num_tokens_since_fired[name])


# ---------------------------------------------------------------- float64, copies, refusals


def test_sparsify_float64_coder_patched_matches():
    ref = randomize_(SparseCoder(D, SparseCoderConfig(num_latents=F, k=K), dtype=torch.float64), 42)
    ours = patch_sparsify(copy.deepcopy(ref), backend="torch")
    x = x_batch(43, dtype=torch.float64)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[1::4] = True
    a, b = ref(x, dead_mask=dead), ours(x, dead_mask=dead)
    assert b.sae_out.dtype == torch.float64
    close(b.sae_out, a.sae_out, 1e-10)
    close(b.auxk_loss, a.auxk_loss, 1e-10)
    (a.fvu + a.auxk_loss).backward()
    (b.fvu + b.auxk_loss).backward()
    for name, g in _grads(ref).items():
        close(_grads(ours)[name], g, 1e-10)


def test_patched_coder_copies_pickles_and_unpatches():
    ref = randomize_(SparseCoder(D, SparseCoderConfig(num_latents=F, k=K)), 44)
    ours = patch_sparsify(copy.deepcopy(ref), backend="torch")
    x = x_batch(45)
    for twin in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        close(twin(x).sae_out, ref(x).sae_out)
        with pytest.raises(ValueError, match="already patched"):
            patch_sparsify(twin)
    assert unpatch(ours).forward.__func__ is SparseCoder.forward
    assert "encode" not in ours.__dict__


def test_patch_sparsify_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="topk"):
        patch_sparsify(SparseCoder(D, SparseCoderConfig(num_latents=40, k=K, activation="groupmax")))
    with pytest.raises(ValueError, match="decoder"):
        patch_sparsify(SparseCoder(D, SparseCoderConfig(num_latents=F, k=K), decoder=False))
    with pytest.raises(ValueError, match="backend"):
        patch_sparsify(SparseCoder(D, SparseCoderConfig(num_latents=F, k=K)), backend="cuda-graphs")
