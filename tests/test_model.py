"""TopKSAE: construction, forward, decoder-norm upkeep, save/load."""
from __future__ import annotations

import json

import pytest
import torch

from flashsae import TopKSAE
from flashsae.errors import InputError
from flashsae.rowgrad import RowGrad
from tests.grads import touched_rows


def perturbed_sae(d=24, F=100, k=6, dtype=torch.float32, **kwargs) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(d, F, k, dtype=dtype, backend="torch", **kwargs)
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.1 * torch.randn(F))
        sae.b_dec.copy_(torch.randn(d))
    return sae


def test_initial_decoder_rows_are_unit_norm_and_encoder_tied():
    sae = TopKSAE(40, 300, 8)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(300))
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert not sae.b_enc.any() and not sae.b_dec.any()


def test_forward_matches_encode_then_decode_with_leading_dims():
    sae = perturbed_sae()
    x = torch.randn(2, 5, 24)
    out = sae(x)
    assert out.x_hat.shape == (2, 5, 24) and out.vals.shape == out.idx.shape == (2, 5, 6)
    vals, idx = sae.encode(x.reshape(10, 24))
    torch.testing.assert_close(out.x_hat.reshape(10, 24), sae.decode(vals, idx))
    # b_dec is also the pre-encoder bias.
    pre = torch.relu((x.reshape(10, 24) - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    torch.testing.assert_close(vals, pre.topk(6).values)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_remove_parallel_grads_leaves_only_the_orthogonal_part(sparse_grad):
    sae = perturbed_sae(sparse_grad=sparse_grad)
    x = torch.randn(9, 24)
    out = sae(x)
    (out.x_hat - x).pow(2).sum().backward()
    before = sae.W_dec.grad.to_dense().clone()
    sae.remove_parallel_grads_()
    after = sae.W_dec.grad.to_dense()
    W = sae.W_dec.detach()
    expected = before - (before * W).sum(1, keepdim=True) * W
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert (after * W).sum(1).abs().max() < 1e-4
    assert isinstance(sae.W_dec.grad, RowGrad) == sparse_grad


def test_normalize_decoder_touches_only_rows_with_a_sparse_gradient():
    sae = perturbed_sae(sparse_grad=True)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    x = torch.randn(4, 24)
    out = sae(x)
    (out.x_hat - x).pow(2).sum().backward()
    rows = touched_rows(sae.W_dec.grad)
    sae.normalize_decoder_()
    norms = sae.W_dec.detach().norm(dim=1)
    touched = torch.zeros(100, dtype=torch.bool)
    touched[rows] = True
    torch.testing.assert_close(norms[touched], torch.ones(int(touched.sum())))
    torch.testing.assert_close(norms[~touched], torch.full((int((~touched).sum()),), 3.0))
    sae.W_dec.grad = None
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    sae = perturbed_sae(dtype=dtype, metadata={"site": "attn_out", "layer": 3, "scale": 1.5})
    sae.save(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "cfg.json").read_text())
    assert cfg["d_model"] == 24 and cfg["n_features"] == 100 and cfg["k"] == 6
    assert cfg["dtype"] == str(dtype).removeprefix("torch.") and cfg["metadata"]["layer"] == 3
    loaded = TopKSAE.load(tmp_path / "ckpt", backend="torch")
    assert loaded.dtype == dtype and loaded.metadata == sae.metadata
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name
    assert not list((tmp_path / "ckpt").glob("*.tmp")), "no temporary files are left behind"


def test_load_of_a_folder_without_weights_names_the_missing_file(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        TopKSAE.load(tmp_path)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((24, 100, 0), {}, r"k must be in \[1, n_features=100\], got k=0"),
        ((24, 10, 11), {}, r"k must be in \[1, n_features=10\], got k=11"),
        ((0, 10, 1), {}, "d_model must be an integer >= 1, got 0"),
        ((24, 1000, 1001), {}, r"k must be in \[1, n_features=1000\], got k=1001"),
        ((24, 100, 4), {"backend": "gpu"}, "backend must be one of"),
    ],
)
def test_bad_constructor_arguments_are_named(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopKSAE(*args, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-fused"])
@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 2)])
def test_forward_of_no_tokens_gives_empty_outputs_of_the_right_shapes(backend, lead):
    sae = TopKSAE(24, 100, 6, dtype=torch.bfloat16, backend=backend, sparse_grad=True)
    out = sae(torch.randn(*lead, 24).to(torch.bfloat16))
    assert out.x_hat.shape == (*lead, 24) and out.vals.shape == out.idx.shape == (*lead, 6)
    assert out.x_hat.dtype == out.vals.dtype == torch.bfloat16 and out.idx.dtype == torch.int64
    out.x_hat.float().sum().backward()
    assert isinstance(sae.W_enc.grad, RowGrad) and not sae.W_enc.grad.rows_values_valid()[2].any()


def test_forward_checks_x_for_nan_unless_told_not_to():
    sae = perturbed_sae()
    x = torch.randn(4, 24)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x row 3 contains NaN or Inf"):
        sae(x)
    with pytest.raises(ValueError, match="x row 3 contains NaN or Inf"):
        sae.encode(x)
    out = sae(x, check_finite=False)
    assert torch.equal(out.idx[:3], sae(x[:3]).idx)


def test_the_trainer_defers_its_nan_check_instead_of_the_encoder_raising():
    from flashsae.optim import SparseAdam
    from flashsae.sae.trainer import NonFiniteError, Trainer

    sae = perturbed_sae(sparse_grad=True)
    trainer = Trainer(sae, SparseAdam(sae.parameters(), lr=1e-3, backend="torch"), check_every_step=False)
    x = torch.randn(8, 24)
    x[5] = float("inf")
    trainer.step(x)  # no ValueError from the encoder: the trainer's own check comes later
    with pytest.raises(NonFiniteError, match="step 1"):
        trainer.check_finite()


def test_k_above_512_trains_and_selects_exactly():
    sae = perturbed_sae(d=16, F=2000, k=700)
    x = torch.randn(3, 16)
    out = sae(x)
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    torch.testing.assert_close(out.vals, pre.topk(700).values)


def test_calibrated_encoder_scale_is_the_float64_least_squares_factor_and_keeps_the_selection():
    d, F, k, n = 24, 96, 5, 200
    g = torch.Generator().manual_seed(3)
    sae = TopKSAE(d, F, k, backend="torch")
    sae.reset_parameters(generator=g)
    x = torch.randn(n, d, generator=g) * 3 + 0.5
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        before = sae(x)
    # float64 dense reference: z = topk(relu((x - b) W^T)), D = z W, s* = <x - b, D> / <D, D>
    x64, b64, W64 = x.double(), sae.b_dec.double(), sae.W_dec.detach().double()
    pre = torch.relu((x64 - b64) @ sae.W_enc.detach().double().T)
    top = pre.topk(k, dim=1)
    D = torch.zeros_like(pre).scatter(1, top.indices, top.values) @ W64
    expected = float(((x64 - b64) * D).sum() / D.pow(2).sum())
    scale = sae.calibrate_encoder_scale_(x)
    assert abs(scale - expected) <= 1e-5 * abs(expected) and scale != 1.0
    with torch.no_grad():
        after = sae(x)
    assert torch.equal(after.idx, before.idx)  # the selection is unchanged
    err = lambda out: float((out.x_hat.double() - x64).pow(2).sum())  # noqa: E731
    assert err(after) < err(before)
    for factor in (0.9, 1.1):  # and no nearby factor does better
        with torch.no_grad():
            sae.W_enc.mul_(factor)
            assert err(sae(x)) > err(after)
            sae.W_enc.div_(factor)


# ---------------------------------------------------------------------------------------------
# Loading checks cfg.json against the weights


def saved(tmp_path, **cfg_changes):
    """A saved SAE (d=8, F=16, k=2, fp32) whose cfg.json then gets ``cfg_changes`` (None deletes a key)."""
    folder = TopKSAE(8, 16, 2, metadata={"norm_scale": 1.5}).save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in cfg_changes.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_load_refuses_a_cfg_dtype_the_weights_do_not_have(tmp_path):
    folder = saved(tmp_path, dtype="bfloat16")
    with pytest.raises(InputError, match=r"model.safetensors: W_enc is float32, but .*cfg.json says dtype bfloat16"):
        TopKSAE.load(folder)


@pytest.mark.parametrize("change, message", [
    ({"d_model": 12}, r"W_enc has shape \[16, 8\], but .*cfg.json \(d_model=12, n_features=16\) needs \[16, 12\]"),
    ({"n_features": 32}, r"W_enc has shape \[16, 8\], but .*\(d_model=8, n_features=32\) needs \[32, 8\]"),
])
def test_load_names_the_tensor_whose_shape_disagrees_with_the_cfg(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        TopKSAE.load(saved(tmp_path, **change))


@pytest.mark.parametrize("change, message", [
    ({"k": None}, r"cfg.json lacks 'k'"),
    ({"k": 17}, r"cfg.json: k must be in \[1, n_features=16\], got k=17"),
    ({"dtype": "float64"}, r"cfg.json: dtype must be one of float32, bfloat16, float16, got 'float64'"),
    ({"metadata": {"norm_scale": -1}}, r"cfg.json: metadata norm_scale must be a finite number > 0, got -1"),
    ({"metadata": [1]}, r"cfg.json: metadata must be a JSON object"),
])
def test_load_names_a_missing_or_invalid_cfg_field(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        TopKSAE.load(saved(tmp_path, **change))


def test_load_names_a_cfg_that_is_not_json_and_weights_that_are_truncated(tmp_path):
    folder = saved(tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:-40])
    with pytest.raises(InputError, match=r"model.safetensors is not a readable safetensors file \(truncated"):
        TopKSAE.load(folder)
    (folder / "cfg.json").write_text('{"d_model": 8,')
    with pytest.raises(InputError, match=rf"{folder / 'cfg.json'} is not valid JSON"):
        TopKSAE.load(folder)


def test_load_names_weights_of_another_kind_of_model(tmp_path):
    from safetensors.torch import save_file

    folder = saved(tmp_path)
    save_file({"encoder.weight": torch.zeros(16, 8)}, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match=r"holds tensors \['encoder.weight'\]; a flashsae SAE has"):
        TopKSAE.load(folder)
