"""The variants as options of the one model and training step: forwards and losses against float64
dense references, the BatchTopK threshold, save/load, and the option checks."""
from __future__ import annotations

import json

import pytest
import torch

from flashsae import TopKSAE
from flashsae.errors import InputError
from flashsae.optim import SparseAdam
from flashsae.rowgrad import RowGrad
from flashsae.sae.architecture import Architecture
from flashsae.sae.losses import aux_k_loss
from flashsae.sae.trainer import Trainer, reconstruction_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def random_sae(d, F, k, arch, seed=0, **kwargs) -> TopKSAE:
    """Untied encoder, non-zero biases (and W_skip), so every term of the map shows."""
    torch.manual_seed(seed)
    sae = TopKSAE(d, F, k, backend="torch", arch=arch, **kwargs)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.2 * torch.randn(F))
        sae.b_dec.copy_(0.1 * torch.randn(sae.d_out))
        if sae.W_skip is not None:
            sae.W_skip.copy_(0.2 * torch.randn_like(sae.W_skip))
    return sae


def dense_codes(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """float64 [B, F] codes of the model's own selection (its choice of entries), values recomputed densely."""
    vals, idx = sae.encode(x)
    chosen = torch.zeros(x.shape[0], sae.n_features, dtype=torch.bool).scatter(1, idx, vals.detach() > 0)
    shift = 0 if sae.encoder_shift is None else sae.encoder_shift.double()
    pre = (x.double() - shift) @ sae.W_enc.double().T + sae.b_enc.double()
    return torch.relu(pre) * chosen


def dense_prediction(sae: TopKSAE, x: torch.Tensor, z: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """float64 reconstruction from the first ``width`` features of codes z [B, F] (all when None)."""
    width = sae.n_features if width is None else width
    out = z[:, :width] @ sae.W_dec.double()[:width] + sae.b_dec.double()
    return out if sae.W_skip is None else out + x.double() @ sae.W_skip.double().T


ARCHS = {
    "matryoshka": Architecture(matryoshka_widths=(5, 20, 48)),
    "batchtopk-matryoshka": Architecture(activation="batchtopk", matryoshka_widths=(16, 48)),
    "transcoder": Architecture(transcoder=True, d_out=11),
    "skip-transcoder": Architecture(transcoder=True, skip_connection=True, d_out=11),
    "batchtopk-skip-transcoder": Architecture(activation="batchtopk", transcoder=True, skip_connection=True),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_forward_matches_the_float64_dense_map_level_by_level(name):
    arch = ARCHS[name]
    sae = random_sae(13, 48, 4, arch)
    x = torch.randn(21, 13)
    out = sae(x)
    z = dense_codes(sae, x)
    assert out.x_hat.shape == (21, sae.d_out)
    torch.testing.assert_close(out.x_hat.double(), dense_prediction(sae, x, z), atol=1e-5, rtol=1e-5)
    if arch.nested:
        assert out.levels.shape == (len(arch.matryoshka_widths), 21, sae.d_out)
        for level, width in zip(out.levels, arch.matryoshka_widths):
            torch.testing.assert_close(level.double(), dense_prediction(sae, x, z, width), atol=1e-5, rtol=1e-5)
    else:
        assert out.levels is None


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("name", list(ARCHS))
def test_the_training_loss_and_its_gradients_match_float64_dense_autograd(name, sparse_grad):
    """The step's loss: the squared error of every Matryoshka level against the target, over n * d_out."""
    arch = ARCHS[name]
    sae = random_sae(13, 48, 4, arch, sparse_grad=sparse_grad)
    x = torch.randn(21, 13)
    y = torch.randn(21, sae.d_out) if arch.transcoder else x
    out = sae(x)
    levels = out.levels if out.levels is not None else out.x_hat.unsqueeze(0)
    loss = (levels.float() - y).pow(2).sum() / y.numel()
    loss.backward()
    ref = {n: p.detach().double().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    z_chosen = dense_codes(sae, x) > 0
    shift = 0 if arch.transcoder else ref["b_dec"]
    z = torch.relu((x.double() - shift) @ ref["W_enc"].T + ref["b_enc"]) * z_chosen
    widths = arch.matryoshka_widths or (48,)
    preds = [z[:, :w] @ ref["W_dec"][:w] + ref["b_dec"] + (x.double() @ ref["W_skip"].T if "W_skip" in ref else 0)
             for w in widths]
    ref_loss = sum((p - y.double()).pow(2).sum() for p in preds) / y.numel()
    ref_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for n, p in sae.named_parameters():
        grad = p.grad.to_dense() if isinstance(p.grad, RowGrad) else p.grad
        assert isinstance(p.grad, RowGrad) == (sparse_grad and n in ("W_enc", "b_enc", "W_dec")), n
        torch.testing.assert_close(grad.double(), ref[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def test_trainer_reports_each_matryoshka_levels_fvu_from_the_step_it_took():
    sae = random_sae(12, 40, 3, Architecture(matryoshka_widths=(4, 16, 40)))
    x = torch.randn(50, 12)
    with torch.no_grad():
        out = sae(x)
    trainer = Trainer(sae, torch.optim.Adam(sae.parameters(), lr=1e-3))
    trainer.step(x)
    metrics = trainer.read_metrics()
    var = (x.double() - x.double().mean(0)).pow(2).sum()
    for width, level in zip((4, 16), out.levels):
        assert metrics[f"fvu_m{width}"] == pytest.approx(float((level.double() - x).pow(2).sum() / var), rel=1e-5)
    assert metrics["fvu"] == pytest.approx(float((out.x_hat.double() - x).pow(2).sum() / var), rel=1e-5)
    assert "fvu_m40" not in metrics


def test_transcoder_steps_need_their_target_and_aux_k_reconstructs_its_residual():
    sae = random_sae(10, 30, 3, Architecture(transcoder=True, d_out=7), sparse_grad=True)
    opt = SparseAdam(sae.parameters(), lr=1e-3, unit_norm=[sae.W_dec], backend="torch")
    trainer = Trainer(sae, opt, aux_k=4, dead_window=1)
    x, y = torch.randn(16, 10), torch.randn(16, 7)
    with pytest.raises(ValueError, match="target y"):
        trainer.step(x)
    plain = Trainer(TopKSAE(10, 30, 3, backend="torch"), torch.optim.Adam([torch.zeros(1, requires_grad=True)]))
    with pytest.raises(ValueError, match="y is the target of a transcoder"):
        plain.step(x, y)
    for _ in range(3):
        trainer.step(x, y)
    assert trainer.read_metrics()["aux_loss"] > 0
    # AuxK: the dead features' top-k of relu(x W_enc^T + b_enc) (no b_dec: another space) against the residual.
    dead = torch.zeros(30, dtype=torch.bool)
    dead[::3] = True
    residual = torch.randn(16, 7)
    loss = aux_k_loss(sae, x, residual, dead, 4)
    pre = torch.relu(x.double() @ sae.W_enc.double().T + sae.b_enc.double()).masked_fill(~dead, -1)
    top = pre.topk(4, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp_min(0))
    expected = (z @ sae.W_dec.double() - residual.double()).pow(2).sum() / residual.double().pow(2).sum()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_batch_topk_threshold_is_the_moving_average_of_each_batchs_smallest_selected_activation():
    arch = Architecture(activation="batchtopk", threshold_lr=0.25)
    sae = random_sae(12, 40, 3, arch)
    trainer = Trainer(sae, torch.optim.Adam(sae.parameters(), lr=1e-3))
    assert float(sae.threshold) == -1.0
    expected = None
    for step in range(4):
        x = torch.randn(20, 12)
        with torch.no_grad():
            vals = sae(x).vals
        smallest = float(vals[vals > 0].min())
        expected = smallest if expected is None else 0.75 * expected + 0.25 * smallest
        trainer.step(x)
        assert float(sae.threshold) == pytest.approx(expected, rel=1e-12)
        assert trainer.read_metrics()["threshold"] == pytest.approx(expected, rel=1e-12)
    assert sae.threshold.dtype == torch.float64


def test_batch_topk_encodes_by_its_threshold_in_eval_mode_and_needs_one():
    sae = random_sae(12, 40, 3, Architecture(activation="batchtopk"))
    x = torch.randn(30, 12)
    sae.eval()
    with pytest.raises(RuntimeError, match="no JumpReLU threshold yet"):
        sae(x)
    fvu_before = reconstruction_metrics(sae, x)["fvu"]  # before any threshold: the batch selection
    assert fvu_before > 0 and not sae.training
    sae.threshold.fill_(0.4)
    out = sae(x)
    pre = torch.relu((x.double() - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double())
    dense = torch.zeros(30, 40, dtype=torch.float64).scatter(1, out.idx, out.vals.double())
    torch.testing.assert_close(dense, pre * (pre > 0.4), atol=1e-5, rtol=1e-5)
    sae.train()
    assert int((sae(x).vals > 0).sum()) == 30 * 3  # training mode: the batch's 30 * 3 largest


def test_calibrating_a_batch_topk_encoder_scales_its_threshold_and_keeps_its_codes():
    sae = random_sae(12, 40, 3, Architecture(activation="batchtopk"))
    sae.threshold.fill_(0.2)
    x = torch.randn(30, 12)
    sae.eval()
    before = sae(x)
    scale = sae.calibrate_encoder_scale_(x)
    after = sae(x)
    assert float(sae.threshold) == pytest.approx(0.2 * scale)
    assert torch.equal(before.idx, after.idx)


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_keep_the_variant_and_its_map(tmp_path, name, dtype):
    arch = ARCHS[name]
    sae = random_sae(13, 48, 4, arch, dtype=dtype, metadata={"site": "mlp_in"})
    if arch.batch_topk:
        sae.threshold.fill_(0.123456789)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert Architecture.from_dict(cfg["architecture"]) == arch
    back = TopKSAE.load(tmp_path, backend="torch")
    assert back.arch == arch and back.dtype == dtype and back.d_out == sae.d_out
    for n, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[n], t), n
    sae.eval()
    back.eval()
    x = torch.randn(9, 13).to(dtype)
    assert torch.equal(back(x).x_hat, sae(x).x_hat)


def test_a_checkpoint_without_an_architecture_loads_as_plain_topk_and_bad_buffers_are_named(tmp_path):
    sae = random_sae(8, 20, 2, Architecture())
    sae.save(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "cfg.json").read_text())
    del cfg["architecture"]
    (tmp_path / "plain" / "cfg.json").write_text(json.dumps(cfg))
    assert TopKSAE.load(tmp_path / "plain").arch == Architecture()

    from safetensors.torch import load_file, save_file

    batch = random_sae(8, 20, 2, Architecture(activation="batchtopk"))
    batch.save(tmp_path / "batch")
    weights = load_file(str(tmp_path / "batch" / "model.safetensors"))
    save_file({**weights, "threshold": weights["threshold"].float()}, str(tmp_path / "batch" / "model.safetensors"))
    with pytest.raises(InputError, match="threshold is float32, but a flashsae SAE keeps it in float64"):
        TopKSAE.load(tmp_path / "batch")
    save_file({n: t for n, t in weights.items() if n != "threshold"}, str(tmp_path / "batch" / "model.safetensors"))
    with pytest.raises(InputError, match="threshold"):
        TopKSAE.load(tmp_path / "batch")
    cfg = json.loads((tmp_path / "batch" / "cfg.json").read_text())
    cfg["architecture"]["matryoshka_widths"] = [15, 10, 20]
    (tmp_path / "batch" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="matryoshka_widths must rise strictly"):
        TopKSAE.load(tmp_path / "batch")


@pytest.mark.parametrize("arch, message", [
    (Architecture(activation="jumprelu"), "activation"),
    (Architecture(matryoshka_widths=(10, 5, 20)), "rise strictly"),
    (Architecture(matryoshka_widths=(10,)), "end at n_features=20"),
    (Architecture(matryoshka_widths=(0, 20)), r"matryoshka_widths\[0\]"),
    (Architecture(skip_connection=True), "skip_connection needs transcoder"),
    (Architecture(d_out=5), "only a transcoder"),
    (Architecture(threshold_lr=0.0), "threshold_lr"),
    (Architecture(threshold_lr=2.0), "threshold_lr"),
])
def test_bad_architectures_name_the_field(arch, message):
    with pytest.raises((TypeError, ValueError), match=message):
        TopKSAE(8, 20, 2, arch=arch)


def test_feature_parallel_refuses_batch_topk_before_any_collective():
    from flashsae.sae.parallel.feature import FeatureParallelSAE

    with pytest.raises(ValueError, match="BatchTopK SAE cannot be split over features"):
        FeatureParallelSAE(8, 20, 2, rank=0, world_size=2, arch=Architecture(activation="batchtopk"))


def test_transcoder_encoder_scale_fits_the_target_after_the_skip_path():
    sae = random_sae(10, 30, 3, Architecture(transcoder=True, skip_connection=True, d_out=6))
    x, y = torch.randn(40, 10), torch.randn(40, 6)
    out = sae(x)
    rest = sae.b_dec.double() + x.double() @ sae.W_skip.double().T
    D = out.x_hat.double() - rest
    expected = float((((y.double() - rest) * D).sum() / D.pow(2).sum()).detach())
    assert sae.optimal_encoder_scale(x, y) == pytest.approx(expected, rel=1e-6)
