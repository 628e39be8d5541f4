"""`flashsae eval`: reconstruction metrics match a direct computation; splicing is exact for an exact SAE."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel

from flashsae import TopKSAE
from flashsae.sae import hf
from flashsae.sae.cli import main
from flashsae.sae.evaluate import DENSITY_PLOT, EVAL_FILE, evaluate

D = 32  # the width of conftest's tiny models
SEQ_LEN = 48
N_TOKENS = 300
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_encoder(tokenizer):
    """A randomly initialized 2-layer BERT encoder (d = 32)."""
    torch.manual_seed(1)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    return BertModel(config).eval()


def identity_sae(d: int) -> TopKSAE:
    """x_hat == x exactly: F = 2d features +e_i and -e_i, k = d (one of each pair fires with |x_i|)."""
    sae = TopKSAE(d, 2 * d, d, backend="torch")
    E = torch.cat([torch.eye(d), -torch.eye(d)])
    with torch.no_grad():
        sae.W_enc.copy_(E)
        sae.W_dec.copy_(E)
    return sae


def zero_sae(d: int) -> TopKSAE:
    sae = TopKSAE(d, 4 * d, 4, backend="torch")
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def run(sae, model, tokenizer, site, layer, documents="all", **kwargs):
    module = hf.resolve_site(model, site, layer)[1]
    kwargs = {"n_tokens": N_TOKENS, "seq_len": SEQ_LEN, "batch_size": 4, "progress": False, **kwargs}
    return evaluate(sae, model, tokenizer, module, hf.iter_texts(documents=documents), **kwargs)


@pytest.mark.parametrize("site, layer", [("attn_out", 0), ("mlp_out", 1), ("resid", 0)])
def test_identity_sae_leaves_the_lm_loss_unchanged(tiny_gpt2, tokenizer, site, layer):
    r = run(identity_sae(D), tiny_gpt2, tokenizer, site, layer, norm_scale=0.5)
    assert r["downstream"] == "next_token_ce"
    assert r["ce_spliced"] == r["ce_clean"]
    assert r["ce_zero_ablated"] != r["ce_clean"]
    assert r["ce_recovered"] == 1.0
    assert r["ce_recovered_mean"] == 1.0
    assert r["fvu"] == 0.0 and r["mse"] == 0.0
    assert r["n_tokens"] >= N_TOKENS
    assert math.isfinite(r["ce_mean_ablated"])


def test_zero_sae_equals_zero_ablation(tiny_gpt2, tokenizer):
    r = run(zero_sae(D), tiny_gpt2, tokenizer, "mlp_out", 0, mean_ablation=False)
    assert r["ce_spliced"] == r["ce_zero_ablated"]
    assert r["ce_spliced"] != r["ce_clean"]
    assert r["ce_recovered"] == 0.0
    assert "ce_mean_ablated" not in r


@pytest.mark.parametrize("splice_special_tokens", [False, True])
def test_identity_sae_keeps_the_embeddings_of_an_encoder(tiny_encoder, tokenizer, splice_special_tokens):
    r = run(identity_sae(D), tiny_encoder, tokenizer, "attn_out", 1, splice_special_tokens=splice_special_tokens)
    assert r["downstream"] == "embedding_cosine"
    assert r["cos_spliced"] == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= r["cos_zero_ablated"] < 0.999
    zero = run(zero_sae(D), tiny_encoder, tokenizer, "attn_out", 1, splice_special_tokens=splice_special_tokens,
               mean_ablation=False)
    assert zero["cos_spliced"] == zero["cos_zero_ablated"]


def test_reconstruction_metrics_match_a_direct_computation(tiny_gpt2, tokenizer):
    torch.manual_seed(3)
    sae = TopKSAE(D, 96, 5, backend="torch")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)   # some features always lose, so some never fire
        sae.b_dec.normal_(0, 0.1)
    scale = 0.7
    r = run(sae, tiny_gpt2, tokenizer, "mlp_out", 1, norm_scale=scale)
    module = hf.resolve_site(tiny_gpt2, "mlp_out", 1)[1]
    x = torch.cat([b["m"] for b in hf.collect_activations(tiny_gpt2, tokenizer, {"m": module}, hf.iter_texts(),
                                                           seq_len=SEQ_LEN, batch_size=4, max_tokens=r["n_tokens"],
                                                           progress=False)]).double() * scale
    assert x.shape[0] == r["n_tokens"]
    with torch.no_grad():
        out = sae(x.float())
    x_hat = out.x_hat.double()
    fvu = (x_hat - x).square().sum() / (x - x.mean(0)).square().sum()
    assert r["fvu"] == pytest.approx(float(fvu), rel=1e-5)
    assert r["mse"] == pytest.approx(float((x_hat - x).square().mean()), rel=1e-5)
    assert r["l0"] == pytest.approx(float((out.vals > 0).sum(1).double().mean()), rel=1e-12)
    fired = torch.zeros(96, dtype=torch.bool)
    fired[out.idx[out.vals > 0]] = True
    assert r["n_dead"] == int((~fired).sum()) > 0
    assert r["dead_fraction"] == pytest.approx(float((~fired).double().mean()))
    density = torch.bincount(out.idx[out.vals > 0], minlength=96).double() / x.shape[0]
    torch.testing.assert_close(r["firing_density"], density)


def test_width_mismatch_names_both_widths(tiny_gpt2, tokenizer):
    with pytest.raises(ValueError, match="d_model=16 but the hooked module outputs d=32"):
        run(identity_sae(16), tiny_gpt2, tokenizer, "resid", 0)


def test_cli_evaluates_a_checkpoint_from_its_metadata(saved_gpt2, tiny_gpt2, tokenizer, tmp_path, capsys):
    torch.manual_seed(4)
    sae = TopKSAE(D, 64, 4, backend="torch", metadata={
        "model": str(saved_gpt2), "revision": None, "site": "mlp_out", "layer": 1, "hook": "transformer.h.1.mlp",
        "text": None, "seq_len": SEQ_LEN, "norm_scale": 0.8})
    ckpt = sae.save(tmp_path / "ckpt")
    out = tmp_path / "eval"
    rc = main(["eval", str(ckpt), "--n-tokens", str(N_TOKENS), "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "next-token CE" in printed and "FVU" in printed
    report = json.loads((out / EVAL_FILE).read_text())
    assert report["hook"] == "transformer.h.1.mlp" and report["norm_scale"] == 0.8 and report["seq_len"] == SEQ_LEN
    # By default eval reads the held-out documents only; this SAE's metadata does not say training left them out.
    assert report["documents"] == "heldout" and report["held_out_from_training"] is None
    expected = run(sae, tiny_gpt2, tokenizer, "mlp_out", 1, documents="heldout", norm_scale=0.8)
    for key in ("n_tokens", "fvu", "l0", "n_dead", "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated"):
        assert report[key] == pytest.approx(expected[key], rel=1e-6), key
    assert (out / DENSITY_PLOT).read_bytes()[:8] == PNG_MAGIC


def test_the_progress_bar_stops_at_its_total(tiny_gpt2, tokenizer, capsys):
    r = run(identity_sae(D), tiny_gpt2, tokenizer, "resid", 0, progress=True)
    assert r["n_tokens"] > N_TOKENS  # whole batches: the last one passes the total
    bars = capsys.readouterr().err.replace("\r", "\n").splitlines()
    final = [line for line in bars if "evaluating" in line][-1]
    assert f" {N_TOKENS}/{N_TOKENS} " in final, final


def test_cli_says_which_tokens_it_reads_and_where_it_writes(saved_gpt2, tmp_path, capsys):
    torch.manual_seed(4)
    meta = {"model": str(saved_gpt2), "site": "mlp_out", "layer": 1, "text": "pydoc_data.topics", "seq_len": SEQ_LEN,
            "documents": "train"}
    ckpt = TopKSAE(D, 64, 4, backend="torch", metadata=meta).save(tmp_path / "ckpt")
    assert main(["eval", str(ckpt), "--n-tokens", "100", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert (f"evaluating {ckpt} on the held-out documents of pydoc_data.topics (one in 10), none of them trained "
            f"on; results go to {ckpt / 'eval'}") in err
    report = json.loads((ckpt / "eval" / EVAL_FILE).read_text())
    assert report["documents"] == "heldout" and report["held_out_from_training"] is True
    assert main(["eval", str(ckpt), "--n-tokens", "100", "--batch-size", "4", "--documents", "all",
                 "--out", str(tmp_path / "all")]) == 0
    assert "every document of pydoc_data.topics, including those the SAE was trained on" in capsys.readouterr().err
    assert json.loads((tmp_path / "all" / EVAL_FILE).read_text())["held_out_from_training"] is False


def test_cli_needs_a_model_when_the_metadata_has_none(tmp_path, capsys):
    ckpt = TopKSAE(D, 64, 4).save(tmp_path / "ckpt")
    assert main(["eval", str(ckpt), "--out", str(tmp_path / "eval")]) == 2
    assert "names no model: pass --model" in capsys.readouterr().err


def test_cli_rejects_a_bad_token_count(tmp_path, capsys):
    ckpt = TopKSAE(D, 64, 4).save(tmp_path / "ckpt")
    assert main(["eval", str(ckpt), "--n-tokens", "0"]) == 2
    assert "--n-tokens must be a positive integer" in capsys.readouterr().err


@pytest.mark.model
def test_minilm_eval_of_a_random_sae_reports_cosines():
    model, tokenizer = hf.load_model()
    torch.manual_seed(0)
    sae = TopKSAE(384, 1536, 16)
    r = run(sae, model, tokenizer, "attn_out", 3, n_tokens=500, seq_len=128)
    r.pop("firing_density")
    print("\nrandom SAE on MiniLM layer 3 attn_out:", r)
    for key in ("cos_spliced", "cos_zero_ablated", "cos_mean_ablated"):
        assert -1.0 <= r[key] <= 1.0
    assert r["cos_zero_ablated"] < 1.0
    assert r["l0"] <= 16 and 0.0 <= r["dead_fraction"] < 1.0 and r["fvu"] > 0
