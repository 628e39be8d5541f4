"""`patch_saelens` inside the real SAELens: its trainer, its hooks, edited activations, run_with_cache,
hidden_pre, autocast and float64 give what SAELens itself gives."""
from __future__ import annotations

import copy

import pytest
import torch

from flashsae.sae.interop import patch_saelens, unpatch
from flashsae.sae.interop import saelens_patch
from tests.interop_peers import B, D, F, K, close, randomize_, x_batch

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[interop]')")
from sae_lens import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

CLASSES = {
    "TopKSAE": (TopKSAE, TopKSAEConfig),
    "TopKTrainingSAE": (TopKTrainingSAE, TopKTrainingSAEConfig),
}


def _pair(kind: str, seed: int = 20, **cfg) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(SAELens' SAE, a patched copy) of class ``kind`` with random parameters (SAELens' defaults otherwise)."""
    cls, cfg_cls = CLASSES[kind]
    ref = randomize_(cls(cfg_cls(d_in=D, d_sae=F, k=K, **cfg)), seed)
    with torch.no_grad():
        ref.b_enc.add_(0.3)
    return ref, patch_saelens(copy.deepcopy(ref), backend="torch")


@pytest.fixture
def decode_calls(monkeypatch) -> list[int]:
    """Counts the patched decodes that ran `ops.sparse_decode` (the codes were handed on)."""
    calls: list[int] = []
    real = saelens_patch.ops.sparse_decode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(saelens_patch.ops, "sparse_decode", counting)
    return calls


def _grads(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in sae.named_parameters()}


def _assert_same_grads(ours: torch.nn.Module, ref: torch.nn.Module, tol: float = 1e-4) -> None:
    for name, g in _grads(ref).items():
        assert g is not None, name
        close(_grads(ours)[name], g, tol)


# ---------------------------------------------------------------- SAELens' trainer on our ops


def _saelens_trainer(patched: bool, **trainer_cfg) -> tuple[SAETrainer, TopKTrainingSAE]:
    torch.manual_seed(10)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K, aux_loss_coefficient=0.5))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D) * 0.3)
        sae.b_enc.copy_(torch.randn(F) * 0.1)
    if patched:
        patch_saelens(sae, backend="torch")
    cfg = SAETrainerConfig(
        total_training_samples=10_000, train_batch_size_samples=B, lr=3e-3, lr_end=3e-3, dead_feature_window=1,
        **trainer_cfg,
    )
    return SAETrainer(cfg, sae, data_provider=iter(())), sae


def test_saelens_trainer_steps_match_with_our_ops():
    (ref_trainer, ref), (our_trainer, ours) = _saelens_trainer(False), _saelens_trainer(True)
    assert ref.cfg.rescale_acts_by_decoder_norm  # SAELens' training default; the patch keeps it
    aux_steps = 0
    for step in range(6):
        batch = x_batch(100 + step) * 2.0
        a, b = ref_trainer.step(batch), our_trainer.step(batch)
        ref_trainer.n_training_steps += 1
        our_trainer.n_training_steps += 1
        close(b.loss, a.loss, 1e-4)
        close(b.losses["mse_loss"], a.losses["mse_loss"], 1e-4)
        close(b.losses["auxiliary_reconstruction_loss"], a.losses["auxiliary_reconstruction_loss"], 1e-4)
        close(b.feature_acts, a.feature_acts, 1e-4)
        aux_steps += int(a.losses["auxiliary_reconstruction_loss"] > 0)
    assert aux_steps > 0, "no step exercised the aux loss (dense hidden_pre path)"
    for name, p in ref.named_parameters():
        close(getattr(ours, name), p, 1e-4)


def test_saelens_patched_gradients_match_dense_autograd():
    ref, ours = _saelens_trainer(False)[1], _saelens_trainer(True)[1]
    x = x_batch(11)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    for sae in (ref, ours):
        step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
        sae.training_forward_pass(step).loss.backward()
    _assert_same_grads(ours, ref)


def test_saelens_autocast_training_step():
    """autocast=True: our ops run in the parameters' dtype (fp32), SAELens' own matmuls (the aux
    loss) under autocast; the codes and MSE equal SAELens' fp32 step, the total loss its autocast one."""
    fp32_trainer, _ = _saelens_trainer(False)
    amp_trainer, _ = _saelens_trainer(False, autocast=True)
    our_trainer, ours = _saelens_trainer(True, autocast=True)
    assert our_trainer.cfg.autocast
    batch = x_batch(30) * 2.0
    our_trainer.n_forward_passes_since_fired += 2  # every feature dead: the aux loss runs under autocast
    amp_trainer.n_forward_passes_since_fired += 2
    ref, amp, out = fp32_trainer.step(batch), amp_trainer.step(batch), our_trainer.step(batch)
    close(out.feature_acts, ref.feature_acts, 1e-5)
    close(out.losses["mse_loss"], ref.losses["mse_loss"], 1e-5)
    assert out.losses["auxiliary_reconstruction_loss"] > 0
    torch.testing.assert_close(out.loss, amp.loss, rtol=2e-2, atol=0)
    assert out.feature_acts.dtype == amp.feature_acts.dtype and out.sae_out.dtype == amp.sae_out.dtype
    for step in range(3):
        assert torch.isfinite(our_trainer.step(x_batch(31 + step)).loss)
    assert all(torch.isfinite(p).all() for p in ours.parameters())


@pytest.mark.parametrize("kind", list(CLASSES))
def test_saelens_float64_module_patched_matches(kind):
    ref, ours = _pair(kind, dtype="float64")
    assert ours.W_enc.dtype == torch.float64
    x = x_batch(32, dtype=torch.float64)
    outs = [sae(x) for sae in (ref, ours)]
    assert outs[1].dtype == torch.float64
    close(outs[1], outs[0], 1e-10)
    for sae, out in zip((ref, ours), outs):
        out.pow(2).sum().backward()
    _assert_same_grads(ours, ref, 1e-9)


# ---------------------------------------------------------------- activations edited between encode and decode


def _edit(acts: torch.Tensor, how: str) -> None:
    """Edit ``acts`` [N, F] in place, the ways users ablate and steer."""
    fired = int(acts[0].abs().argmax())
    if how == "ablate":
        acts[:, fired] = 0
    elif how == "scale_row_view":
        acts[0].mul_(2.0)
    elif how == "steer_unfired":
        acts[:, int((acts == 0).all(0).nonzero()[0])] = 3.0
    elif how == "through_detach":
        acts.detach()[:, fired] = 0


EDITS = ["ablate", "scale_row_view", "steer_unfired", "through_detach"]


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("how", EDITS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_decode_of_edited_activations_matches_saelens(kind, how, mode, decode_calls):
    ref, ours = _pair(kind)
    x = x_batch(21)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    recons = []
    for sae in (ref, ours):
        with context():
            acts = sae.encode(x)
            _edit(acts, how)
            recons.append(sae.decode(acts))
    assert (recons[0] - ref.decode(ref.encode(x))).abs().max() > 1e-3, "the edit changed nothing"
    close(recons[1], recons[0])
    assert decode_calls == []  # the edited tensor was decoded, not the codes behind it
    if mode == "grad":
        for sae, recon in zip((ref, ours), recons):
            recon.pow(2).sum().backward()
        _assert_same_grads(ours, ref)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_decode_of_unedited_activations_uses_the_codes(kind, mode, decode_calls):
    ref, ours = _pair(kind)
    x = x_batch(22)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        recon = ours.decode(ours.encode(x))
        close(recon, ref.decode(ref.encode(x)))
        assert len(decode_calls) == 1
        close(ours.decode(ours.encode(x) * 1.0), recon)  # another tensor: SAELens' decode
        assert len(decode_calls) == 1


# ---------------------------------------------------------------- hooks


def _post_hook(how: str):
    """A forward hook on hook_sae_acts_post: ablation or steering, by returning or in place."""
    def hook(acts: torch.Tensor, hook) -> torch.Tensor | None:
        if how == "ablate_returning":
            return acts * (torch.arange(acts.shape[-1]) % 2 == 0)
        if how == "ablate_in_place":
            acts[..., ::2] = 0
            return None
        if how == "steer":
            return acts + torch.linspace(-1.0, 1.0, acts.shape[-1])
        hook.ctx["seen"] = acts.detach().clone()  # read only
        return None

    return hook


@pytest.mark.parametrize("how", ["ablate_returning", "ablate_in_place", "steer", "read_only"])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_hooks_on_acts_post_match_saelens(kind, how, decode_calls):
    ref, ours = _pair(kind)
    x = x_batch(23)
    outs = [sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", _post_hook(how))]) for sae in (ref, ours)]
    close(outs[1], outs[0])
    if how != "read_only":
        assert (outs[0] - ref(x)).abs().max() > 1e-3, "the hook changed nothing"
        assert decode_calls == []
    else:  # a hook that only reads leaves the codes valid
        assert len(decode_calls) == 1
    for sae, out in zip((ref, ours), outs):
        out.pow(2).sum().backward()
    _assert_same_grads(ours, ref)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_hook_on_acts_pre_fires_and_steers_the_selection(kind):
    ref, ours = _pair(kind)
    x = x_batch(24)
    boosted = F - 1

    def boost(hidden_pre: torch.Tensor, hook) -> torch.Tensor:
        hook.ctx["fired"] = hook.ctx.get("fired", 0) + 1
        return hidden_pre + 10.0 * (torch.arange(hidden_pre.shape[-1]) == boosted)

    acts = []
    for sae in (ref, ours):
        with sae.hooks(fwd_hooks=[("hook_sae_acts_pre", boost)]):
            acts.append(sae.encode(x))
            assert sae.hook_sae_acts_pre.ctx["fired"] == 1
    assert (acts[0][:, boosted] > 0).all()
    close(acts[1], acts[0])
    close(ours.decode(ours.encode(x)), ref.decode(ref.encode(x)))  # hooks gone: our encode again


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_run_with_cache_matches_saelens(kind, use_error_term):
    ref, ours = _pair(kind)
    ref.use_error_term = ours.use_error_term = use_error_term
    x = x_batch(25).reshape(4, 6, D)
    with torch.no_grad():
        (out_ref, cache_ref), (out, cache) = ref.run_with_cache(x), ours.run_with_cache(x)
    close(out, out_ref)
    assert sorted(cache.keys()) == sorted(cache_ref.keys())
    assert "hook_sae_acts_pre" in cache
    for name in cache_ref.keys():
        close(cache[name], cache_ref[name])


@pytest.mark.parametrize("kind", list(CLASSES))
def test_backward_hook_on_acts_post_fires(kind, decode_calls):
    ref, ours = _pair(kind)
    x = x_batch(26)
    grads = []
    for sae in (ref, ours):
        seen = {}

        def record(grad: torch.Tensor, hook) -> None:
            seen["grad"] = grad.detach().clone()

        with sae.hooks(bwd_hooks=[("hook_sae_acts_post", record)]):
            sae(x).pow(2).sum().backward()
        grads.append(seen["grad"])
    close(grads[1], grads[0])
    _assert_same_grads(ours, ref)
    assert decode_calls == []


# ---------------------------------------------------------------- hidden_pre


def _train_step(sae: torch.nn.Module, x: torch.Tensor, dead: torch.Tensor | None = None) -> TrainStepOutput:
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    return sae.training_forward_pass(step)


@pytest.fixture
def hidden_pre_computations(monkeypatch) -> list[int]:
    """Counts the dense [N, d_sae] pre-activation matmuls the patch runs."""
    calls: list[int] = []
    real = saelens_patch._dense_hidden_pre

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(saelens_patch, "_dense_hidden_pre", counting)
    return calls


def test_training_hidden_pre_is_computed_on_first_read(hidden_pre_computations):
    ref, ours = _pair("TopKTrainingSAE")
    x = x_batch(27)
    a, b = _train_step(ref, x), _train_step(ours, x)
    assert isinstance(b, TrainStepOutput) and hidden_pre_computations == []
    close(b.hidden_pre, a.hidden_pre)
    close(b.hidden_pre, a.hidden_pre)
    assert len(hidden_pre_computations) == 1
    (b.loss + b.hidden_pre.relu().sum()).backward()  # differentiable, as SAELens' is
    (a.loss + a.hidden_pre.relu().sum()).backward()
    _assert_same_grads(ours, ref)
    close(b.sae_out, a.sae_out)
    assert repr(b).startswith("TrainStepOutput(")


def test_training_hidden_pre_read_after_the_parameters_changed_is_an_error():
    _, ours = _pair("TopKTrainingSAE")
    out = _train_step(ours, x_batch(28))
    out.loss.backward()
    torch.optim.SGD(ours.parameters(), lr=0.1).step()
    with pytest.raises(RuntimeError, match="hidden_pre='always'"):
        _ = out.hidden_pre


def test_training_hidden_pre_always_and_when_features_are_dead(hidden_pre_computations):
    ref, _ = _pair("TopKTrainingSAE")
    always = patch_saelens(copy.deepcopy(ref), backend="torch", hidden_pre="always")
    lazy = patch_saelens(copy.deepcopy(ref), backend="torch")
    x = x_batch(29)
    expected = _train_step(ref, x).hidden_pre
    out = _train_step(always, x)
    assert type(out) is TrainStepOutput and len(hidden_pre_computations) == 1
    close(out.hidden_pre, expected)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::4] = True
    out = _train_step(lazy, x, dead)  # the aux loss needs it: computed in the step
    assert type(out) is TrainStepOutput and len(hidden_pre_computations) == 2
    close(out.hidden_pre, expected)
    with pytest.raises(ValueError, match="hidden_pre"):
        patch_saelens(copy.deepcopy(ref), hidden_pre="never")


# ---------------------------------------------------------------- sparse activations, copies, unpatching


def test_sparse_activations_match_saelens():
    ref, ours = _pair("TopKTrainingSAE", use_sparse_activations=True)
    dense_ref, _ = _pair("TopKTrainingSAE")  # same parameters; SAELens' sparse backward fails on CPU
    x = x_batch(33)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[1::5] = True
    a, b, c = _train_step(ref, x, dead), _train_step(ours, x, dead), _train_step(dense_ref, x, dead)
    assert a.feature_acts.is_sparse and b.feature_acts.is_sparse
    close(b.feature_acts.to_dense(), a.feature_acts.to_dense())
    close(b.loss, a.loss)
    b.loss.backward()
    c.loss.backward()
    _assert_same_grads(ours, dense_ref)


def test_patched_module_copies_and_unpatches():
    ref, ours = _pair("TopKTrainingSAE")
    x = x_batch(34)
    acts = ours.encode(x)  # codes held for decode; the copy must not carry them
    twin = copy.deepcopy(ours)
    close(twin(x), ref(x))
    close(ours.decode(acts), ref.decode(ref.encode(x)))
    with pytest.raises(ValueError, match="already patched"):
        patch_saelens(twin)
    assert unpatch(ours).encode.__func__ is TopKTrainingSAE.encode
    assert "decode" not in ours.__dict__ and not hasattr(ours, "_flashsae_patch")
    close(ours(x), ref(x))


def test_patch_saelens_refuses_other_architectures():
    from sae_lens import StandardSAE, StandardSAEConfig

    with pytest.raises(ValueError, match="topk"):
        patch_saelens(StandardSAE(StandardSAEConfig(d_in=D, d_sae=F)))
    with pytest.raises(ValueError, match="backend"):
        patch_saelens(_pair("TopKSAE")[0], backend="cuda-graphs")
