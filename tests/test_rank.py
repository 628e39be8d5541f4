"""`flashsae rank`: spectra from one pass over the text equal the SVD of the collected activations."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flashsae.analysis import effective_rank
from flashsae.sae import hf
from flashsae.sae.cli import main
from flashsae.sae.rank import RANK_FILE, RANK_PLOT, SPECTRA_FILE, activation_spectra, effective_ranks, format_table

D = 32  # the width of conftest's tiny models
SEQ_LEN = 48
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _collected(model, tokenizer, pairs, n_tokens):
    """Activations [n, d] float64 per (site, layer), collected directly."""
    modules = {f"{s}.{l}": hf.resolve_site(model, s, l) for s, l in pairs}
    rows = {name: [] for name in modules}
    for batch in hf.collect_activations(model, tokenizer, modules, hf.iter_texts(), seq_len=SEQ_LEN,
                                         batch_size=8, max_tokens=n_tokens, progress=False):
        for name, x in batch.items():
            rows[name].append(x)
    return {pair: torch.cat(rows[f"{pair[0]}.{pair[1]}"]).double() for pair in pairs}


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectra_equal_svdvals_of_collected_activations(tiny_gpt2, tokenizer, center, dtype):
    n_tokens = 301
    pairs = [(s, l) for l in (0, 1) for s in hf.SITES]
    spectra = activation_spectra(tiny_gpt2, tokenizer, hf.SITES, [0, 1], hf.iter_texts(), n_tokens=n_tokens,
                                 center=center, seq_len=SEQ_LEN, batch_size=8, dtype=dtype, progress=False)
    assert list(spectra) == pairs
    reference = _collected(tiny_gpt2, tokenizer, pairs, n_tokens)
    for pair, x in reference.items():
        assert x.shape == (n_tokens, D)
        if center:
            x = x - x.mean(0)
        expected = torch.linalg.svdvals(x)
        got = spectra[pair]
        assert got.dtype == dtype and got.shape == (D,)
        # Gram-based: the variances S**2 are exact up to accumulation rounding relative to S_1**2.
        tol = (1e-10 if dtype == torch.float64 else 2e-5) * float(expected[0]) ** 2
        torch.testing.assert_close(got.double().square(), expected.square(), atol=tol, rtol=0)


def test_randomized_method_at_full_rank_matches_gram(tiny_gpt2, tokenizer):
    kwargs = dict(n_tokens=200, seq_len=SEQ_LEN, batch_size=8, progress=False, dtype=torch.float64)
    gram = activation_spectra(tiny_gpt2, tokenizer, ["attn_out"], [1], hf.iter_texts(), **kwargs)
    rand = activation_spectra(tiny_gpt2, tokenizer, ["attn_out"], [1], hf.iter_texts(), method="randomized", **kwargs)
    s = gram[("attn_out", 1)]
    torch.testing.assert_close(rand[("attn_out", 1)], s, atol=1e-8 * float(s[0]), rtol=0)


def test_too_few_tokens_for_a_full_spectrum_is_an_error(tiny_gpt2, tokenizer):
    with pytest.raises(ValueError, match="n_tokens must be >= d = 32"):
        activation_spectra(tiny_gpt2, tokenizer, ["resid"], [0], hf.iter_texts(), n_tokens=20, seq_len=SEQ_LEN,
                           progress=False)


def test_table_lists_every_layer_and_site():
    g = torch.Generator().manual_seed(0)
    spectra = {(s, l): torch.rand(16, generator=g).sort(descending=True).values for l in (0, 3) for s in hf.SITES}
    table = format_table(effective_ranks(spectra)).splitlines()
    assert len(table) == 2 + 2 * len(hf.SITES)
    assert table[2].split()[:3] == ["0", "attn_out", "16"]
    assert table[-1].split()[:2] == ["3", "resid"]


def test_cli_writes_report_spectra_and_plots(saved_gpt2, tmp_path, capsys):
    out = tmp_path / "rank"
    rc = main(["rank", "--model", str(saved_gpt2), "--layers", "0,1", "--sites", "attn_out,resid",
               "--n-tokens", "250", "--seq-len", str(SEQ_LEN), "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "attn_out" in printed and "resid" in printed and "mlp_out" not in printed
    report = json.loads((out / RANK_FILE).read_text())
    assert report["n_tokens"] == 250 and report["layers"] == [0, 1] and report["sites"] == ["attn_out", "resid"]
    assert report["hooks"]["attn_out.1"] == "transformer.h.1.attn.c_proj"
    spectra = load_file(str(out / SPECTRA_FILE))
    assert sorted(spectra) == ["attn_out.0", "attn_out.1", "resid.0", "resid.1"]
    for name, S in spectra.items():
        site, layer = name.split(".")
        expected = effective_rank(S).as_dict()
        got = report["ranks"][site][layer]
        assert got["n99"] == expected["n99"] and got["d"] == D
        assert got["erank"] == pytest.approx(expected["erank"], rel=1e-6)
    pngs = [RANK_PLOT, "spectra_attn_out.png", "spectra_resid.png", "spectra_layer0.png", "spectra_layer1.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}  # shareable files


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "2"], "--layers: layer 2 is out of range"),
        (["--layers", "0,x"], "--layers must be comma-separated integers or 'all'"),
        (["--sites", "attn_out,heads"], "--sites: unknown site 'heads'"),
        (["--sites", ","], "--sites must name at least one"),
        (["--n-tokens", "0"], "--n-tokens must be a positive integer"),
    ],
)
def test_cli_rejects_bad_arguments(saved_gpt2, tmp_path, capsys, args, message):
    rc = main(["rank", "--model", str(saved_gpt2), "--n-tokens", "100", "--out", str(tmp_path), *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / RANK_FILE).exists()


# --------------------------------------------------------------------------------------------
# The paper's claim on the embedded all-MiniLM-L6-v2 (real weights)
# --------------------------------------------------------------------------------------------

# Layers where attention outputs need a smaller fraction of d for 99% of the variance than MLP
# outputs on pydoc topics; at layers 4-5 a few outlier MLP dimensions carry most of the variance.
CLAIM_LAYERS = (0, 1, 2, 3)


@pytest.mark.model
def test_minilm_attention_output_is_lower_dimensional_than_mlp_output():
    model, tokenizer = hf.load_model()
    spectra = activation_spectra(model, tokenizer, hf.SITES, range(hf.num_layers(model)), hf.iter_texts(),
                                 n_tokens=4000, progress=False)
    ranks = effective_ranks(spectra)
    print("\nall-MiniLM-L6-v2, pydoc topics, 4000 tokens, centered:\n" + format_table(ranks))
    assert all(r.d == 384 for r in ranks.values())
    for layer in CLAIM_LAYERS:
        attn, mlp = ranks[("attn_out", layer)], ranks[("mlp_out", layer)]
        assert float(attn.frac99) < float(mlp.frac99), f"layer {layer}: attn {attn.as_dict()} vs mlp {mlp.as_dict()}"
