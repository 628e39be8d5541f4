"""The variants' exports, loaded by the real sae-lens and sparsify: their maps are ours."""
from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # before sparsify is imported (see test_interop.py)

import pytest
import torch

from flashsae import TopKSAE
from flashsae.sae.architecture import Architecture
from flashsae.sae.interop import export_saelens, export_sparsify, import_sparsify

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[interop]')")
sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e '.[interop]')")

pytestmark = pytest.mark.usefixtures("one_thread")
D, F, K, B = 13, 41, 5, 24
warnings.filterwarnings("ignore", category=DeprecationWarning)


def variant_sae(arch: Architecture, *, dtype=torch.float32, metadata=None, seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(D, F, K, backend="torch", dtype=dtype, metadata=metadata, arch=arch)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.5).to(dtype))
        sae.b_enc.add_(0.2)
        if arch.batch_topk:
            sae.threshold.fill_(0.6)
    return sae.eval()


def load_saelens(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sae_lens.SAE.load_from_disk(str(path))


CASES = {
    "batchtopk": (Architecture(activation="batchtopk"), "jumprelu"),
    "matryoshka-batchtopk": (Architecture(activation="batchtopk", matryoshka_widths=(10, F)), "jumprelu"),
    "matryoshka-topk": (Architecture(matryoshka_widths=(10, 30, F)), "topk"),
    "batchtopk-transcoder": (Architecture(activation="batchtopk", transcoder=True, d_out=7), "jumprelu_transcoder"),
    "batchtopk-skip-transcoder": (Architecture(activation="batchtopk", transcoder=True, skip_connection=True, d_out=7),
                                  "jumprelu_skip_transcoder"),
}


@pytest.mark.parametrize("scales", [(None, None), (0.75, 1.6)])
@pytest.mark.parametrize("name", list(CASES))
def test_sae_lens_loads_each_variant_and_computes_our_map(tmp_path, name, scales):
    arch, architecture = CASES[name]
    s, t = scales
    metadata = {} if s is None else {"norm_scale": s, **({"target_norm_scale": t} if arch.transcoder else {})}
    metadata.update(model="gpt2", hook="h.1.mlp:input", target_hook="h.1.mlp" if arch.transcoder else None)
    ours = variant_sae(arch, metadata=metadata)
    export_saelens(ours, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == architecture
    theirs = load_saelens(tmp_path)
    assert theirs.cfg.architecture() == architecture
    if arch.transcoder:
        assert theirs.cfg.d_out == 7 and cfg["metadata"]["hook_name_out"] == "h.1.mlp"
    if arch.batch_topk:
        assert cfg["metadata"]["training_architecture"] == ("matryoshka_batchtopk" if arch.matryoshka_widths
                                                            else "batchtopk")
    s = 1.0 if s is None else s
    t = (1.0 if t is None else t) if arch.transcoder else s
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 2  # raw activations
    with torch.no_grad():
        mine = ours(x * s)
        recon = theirs(x)
        acts = theirs.encode(x)
    dense = torch.zeros(B, F).scatter(1, mine.idx, mine.vals)
    counts = (dense > 0).sum(1)
    assert counts.min() > 0 and (counts.max() > counts.min()) == arch.batch_topk  # JumpReLU rows vary
    torch.testing.assert_close(acts, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, mine.x_hat / t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_sae_lens_exports_keep_every_tensor_exactly_in_16_bit_dtypes(tmp_path, name, dtype):
    arch, _ = CASES[name]
    ours = variant_sae(arch, dtype=dtype)
    export_saelens(ours, tmp_path)
    theirs = load_saelens(tmp_path)
    assert theirs.W_enc.dtype == dtype and torch.equal(theirs.W_enc, ours.W_enc.T)
    for name_ in ("b_enc", "W_dec", "b_dec", *(("W_skip",) if arch.skip_connection else ())):
        assert torch.equal(getattr(theirs, name_), getattr(ours, name_)), name_
    if arch.batch_topk:
        assert torch.equal(theirs.threshold, torch.full((F,), 0.6, dtype=dtype))


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_loads_a_topk_transcoder_and_imports_it_back(tmp_path, skip):
    arch = Architecture(transcoder=True, skip_connection=skip)
    ours = variant_sae(arch, metadata={"norm_scale": 0.5, "target_norm_scale": 2.0})
    export_sparsify(ours, tmp_path)
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path)
    assert theirs.cfg.transcode and theirs.cfg.skip_connection == skip
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mine = ours(x * 0.5)
        res = theirs(x, torch.zeros(B, D))
    dense = torch.zeros(B, F).scatter(1, mine.idx, mine.vals)
    torch.testing.assert_close(torch.zeros(B, F).scatter(1, res.latent_indices, res.latent_acts), dense,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.sae_out, mine.x_hat / 2.0, atol=1e-5, rtol=1e-5)
    back = import_sparsify(tmp_path, backend="torch")
    assert back.arch == arch and back.metadata["transcode"]
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, mine.x_hat / 2.0, atol=1e-5, rtol=1e-5)


def test_variants_a_format_cannot_express_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="SAELens has no TopK transcoder"):
        export_saelens(variant_sae(Architecture(transcoder=True)), tmp_path / "a")
    with pytest.raises(ValueError, match="sparsify has no JumpReLU coder"):
        export_sparsify(variant_sae(Architecture(activation="batchtopk")), tmp_path / "b")
    with pytest.raises(ValueError, match="target has d_out=7"):
        export_sparsify(variant_sae(Architecture(transcoder=True, d_out=7)), tmp_path / "c")
    untrained = TopKSAE(D, F, K, backend="torch", arch=Architecture(activation="batchtopk"))
    with pytest.raises(ValueError, match="no JumpReLU threshold yet"):
        export_saelens(untrained, tmp_path / "d")


def test_export_cli_names_what_the_format_cannot_express(tmp_path, capsys):
    from flashsae.sae.cli import main

    variant_sae(Architecture(transcoder=True)).save(tmp_path / "ckpt")
    assert main(["export", "--format", "saelens", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SAELens has no TopK transcoder" in err[0] and "--format sparsify" in err[0]
