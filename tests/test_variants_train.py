"""The variants end to end: paired stores and their collection, `flashsae train` options and errors, exact
resume, the transcoder splice in `flashsae eval`, and the embedded MiniLM trained, exported and loaded
by sae-lens for each variant."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from flashsae import TopKSAE
from flashsae.errors import ConfigError
from flashsae.sae import hf
from flashsae.sae.cli import main
from flashsae.sae.evaluate import evaluate
from flashsae.sae.run.config import TrainConfig
from flashsae.sae.run.driver import train
from flashsae.sae.store import ActivationStore, ActivationStoreWriter, InMemorySource, split_pairs
from tests.resumed_runs import resume_from_older_checkpoint
from tests.synthetic import synthetic_activations
from tests.tiny_hf import SENTENCES, build, collect_all

pytestmark = pytest.mark.usefixtures("one_thread")


def paired_store(directory: Path, n: int = 1500, d_in: int = 16, d_out: int = 12, seed: int = 0) -> Path:
    """A paired store whose targets are a fixed nonlinear map of the inputs plus a little noise."""
    x = synthetic_activations(n, d_in, rank=8, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.relu(x @ torch.randn(d_in, 24, generator=g) / 4) @ torch.randn(24, d_out, generator=g) / 5
    y = y + x[:, :d_out] + 0.01 * torch.randn(n, d_out, generator=g)
    fields = {"model": "synthetic", "site": "mlp_in", "layer": 0, "target_site": "mlp_out"}
    with ActivationStoreWriter(directory, fields, shard_tokens=600, target_width=d_out) as writer:
        writer.add(torch.cat([x, y], 1))
    return directory


# ---------------------------------------------------------------------------------------------
# Paired stores


def test_a_paired_stores_batches_keep_each_input_with_its_target(tmp_path):
    x, y = torch.randn(300, 5), torch.randn(300, 3)
    with ActivationStoreWriter(tmp_path, {"model": "m", "site": "mlp_in", "layer": 1}, shard_tokens=70,
                               target_width=3) as writer:
        writer.add(torch.cat([x, y], 1))
    store = ActivationStore(tmp_path)
    assert (store.target_width, store.input_width, store.d_model) == (3, 5, 8)
    assert store.manifest["target_width"] == 3
    memory = InMemorySource(torch.cat([x, y], 1), shard_tokens=70, target_width=3)
    for got, same in zip(store.batches(64, seed=1, epoch=2, prefetch=0), memory.batches(64, seed=1, epoch=2, prefetch=0)):
        assert torch.equal(got, same)
        inputs, targets = split_pairs(got, store.target_width)
        rows = torch.cdist(inputs, x).argmin(1)  # which tokens this batch holds
        assert torch.equal(inputs, x[rows]) and torch.equal(targets, y[rows])
    assert split_pairs(x, 0) == (x, None)


def test_paired_store_widths_are_checked(tmp_path):
    with pytest.raises(ValueError, match="target_width"):
        ActivationStoreWriter(tmp_path / "a", {"model": "m", "site": "s", "layer": 0}, target_width=-1)
    writer = ActivationStoreWriter(tmp_path / "b", {"model": "m", "site": "s", "layer": 0}, target_width=4)
    with pytest.raises(ValueError, match="not more than target_width=4"):
        writer.add(torch.randn(5, 4))
    with ActivationStoreWriter(tmp_path / "c", {"model": "m", "site": "s", "layer": 0}, target_width=2) as w:
        w.add(torch.randn(5, 6))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["target_width"] = 6
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"target_width must be an integer in \[0, d_model=6\)"):
        ActivationStore(tmp_path / "c")
    with pytest.raises(ValueError, match="target_width"):
        InMemorySource(torch.randn(4, 3), target_width=3)


def test_collect_to_store_pairs_the_mlps_input_and_output_of_each_token(tmp_path, bos_tokenizer):
    model = build("llama", wrapper=True)
    source = hf.resolve_site(model, "mlp_in", 1)
    target = hf.resolve_site(model, "mlp_out", 1)
    store = hf.collect_to_store(
        tmp_path / "store", model, bos_tokenizer, source.path, source.module, SENTENCES, model_name="tiny-llama",
        site="mlp_in", layer=1, text_source=None, n_tokens=40, shard_tokens=16, batch_size=2, progress=False,
        target=target, target_site="mlp_out",
    )
    m = store.manifest
    assert (m["site"], m["target_site"], m["target_hook"], m["target_width"]) == ("mlp_in", "mlp_out", target.path, 48)
    expected = collect_all(model, bos_tokenizer, {"in": source, "out": target}, SENTENCES, max_tokens=40)
    x, y = split_pairs(store.load_all(), store.target_width)
    assert torch.equal(x, expected["in"]) and torch.equal(y, expected["out"])
    with pytest.raises(ValueError, match="another activation"):
        hf.collect_to_store(tmp_path / "same", model, bos_tokenizer, source.path, source.module, SENTENCES,
                            model_name="m", site="mlp_in", layer=1, text_source=None, n_tokens=10, progress=False,
                            target=source)


# ---------------------------------------------------------------------------------------------
# flashsae train


def run_config(store: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(store=str(store), out=str(out), n_features=96, k=4, batch_size=100, epochs=2, log_every=5,
                    checkpoint_every=0, progress=False, backend="torch", lr=5e-3)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_a_skip_transcoder_trains_on_a_paired_store_and_predicts_its_target(tmp_path):
    store = paired_store(tmp_path / "store")
    runs = {skip: train(run_config(store, tmp_path / f"skip{skip}", skip_connection=skip, aux_k=8, epochs=4,
                                   lr=1e-2)) for skip in (False, True)}
    assert runs[True]["fvu"] < runs[False]["fvu"] < 0.3  # the targets have a linear part the skip path takes
    sae = TopKSAE.load(tmp_path / "skipTrue" / "final", backend="torch")
    assert sae.arch.transcoder and sae.arch.skip_connection and (sae.d_model, sae.d_out) == (16, 12)
    assert runs[True]["target_norm_scale"] == sae.metadata["target_norm_scale"] > 0
    assert runs[True]["architecture"]["transcoder"] and sae.metadata["target_site"] == "mlp_out"
    x, y = split_pairs(ActivationStore(store).load_all(), 12)
    with torch.no_grad():
        pred = sae(x * sae.metadata["norm_scale"]).x_hat / sae.metadata["target_norm_scale"]
    fvu = float((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu == pytest.approx(runs[True]["fvu"], rel=1e-4)  # the summary measures the same 1500 tokens


def test_batch_topk_matryoshka_run_resumes_to_identical_weights_and_threshold(tmp_path):
    store = paired_store(tmp_path / "store")
    cfg = dict(activation="batchtopk", matryoshka=[16, 48], threshold_lr=0.2, checkpoint_every=6, log_every=1,
               target_site="mlp_out")
    full = tmp_path / "full"
    train(run_config(store, full, **{k: v for k, v in cfg.items() if k != "target_site"}))
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all("fvu_m16" in m and "fvu_m48" in m and m["threshold"] > 0 for m in metrics)
    assert all(m["l0"] == 4 for m in metrics)  # k per token on average, exactly: the batch's 100 * 4
    sae = TopKSAE.load(full / "final")
    assert sae.arch.batch_topk and sae.arch.matryoshka_widths == (16, 48, 96) and sae.threshold > 0
    assert float(sae.threshold) == pytest.approx(metrics[-1]["threshold"], rel=1e-12)

    resume_from_older_checkpoint(full, tmp_path / "cut", (30, 24))  # the threshold too, bit for bit


def test_options_the_activations_cannot_train_are_named(tmp_path):
    from flashsae.sae.run.driver import _check_variant
    from flashsae.sae.parallel.strategy import SingleProcess

    plain = synthetic_activations(300, 8, rank=4, seed=0)
    with ActivationStoreWriter(tmp_path / "plain", {"model": "m", "site": "attn_out", "layer": 0}) as writer:
        writer.add(plain)
    with pytest.raises(ConfigError, match="holds no transcoder targets"):
        train(run_config(tmp_path / "plain", tmp_path / "a", target_site="mlp_out"))
    paired = ActivationStore(paired_store(tmp_path / "paired", n=300))
    with pytest.raises(ConfigError, match="--init asi ties the encoder"):
        _check_variant(run_config(paired.directory, tmp_path / "b", init="asi"), paired, SingleProcess())

    class DataParallelLike(SingleProcess):
        name = "data"

    with pytest.raises(ConfigError, match="batchtopk selects across the whole batch"):
        _check_variant(run_config(paired.directory, tmp_path / "c", activation="batchtopk"), paired,
                       DataParallelLike())


# ---------------------------------------------------------------------------------------------
# The transcoder splice


def test_the_transcoder_replaces_the_mlp_output_by_its_prediction_from_the_mlp_input(tiny_gpt2, tokenizer):
    from flashsae.sae.architecture import Architecture

    torch.manual_seed(5)
    d = tiny_gpt2.config.n_embd
    sae = TopKSAE(d, 64, 4, backend="torch", arch=Architecture(transcoder=True, skip_connection=True))
    with torch.no_grad():
        sae.W_skip.copy_(0.3 * torch.randn(d, d))
        sae.b_dec.normal_(0, 0.1)
    source, target = hf.resolve_site(tiny_gpt2, "mlp_in", 1), hf.resolve_site(tiny_gpt2, "mlp_out", 1)
    kwargs = dict(n_tokens=200, seq_len=48, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="give target=HookPoint"):
        evaluate(sae, tiny_gpt2, tokenizer, source, hf.iter_texts(documents="all"), **kwargs)
    r = evaluate(sae, tiny_gpt2, tokenizer, source, hf.iter_texts(documents="all"), target=target,
                 norm_scale=0.5, target_norm_scale=2.0, **kwargs)
    assert r["target_norm_scale"] == 2.0 and r["downstream"] == "next_token_ce"
    # The same splice by hand: capture the MLP's input, replace its output at the real tokens.
    got = collect_all(tiny_gpt2, tokenizer, {"in": source, "out": target}, hf.iter_texts(documents="all"),
                      max_tokens=r["n_tokens"], seq_len=48, batch_size=4)
    with torch.no_grad():
        pred = sae(got["in"] * 0.5).x_hat.double() / 2.0
    y = got["out"].double()
    assert r["fvu"] == pytest.approx(float((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()), rel=1e-5)
    from flashsae.sae.hf.collect import text_batches

    total, count, seen_tokens = 0.0, 0, 0
    for ids, mask, special in text_batches(tokenizer, hf.iter_texts(documents="all"), 48, 4):
        keep = mask.bool() & ~special
        seen: dict[str, torch.Tensor] = {}

        def replace(out, keep=keep, seen=seen):
            new = out.clone()
            with torch.no_grad():
                new[keep] = (sae(seen["x"][keep] * 0.5).x_hat / 2.0).to(out.dtype)
            return new

        with source.capture(lambda a, seen=seen: seen.update(x=a)), target.replace(replace), torch.no_grad():
            logits = tiny_gpt2(input_ids=ids, attention_mask=mask).logits
        valid = (mask[:, :-1] * mask[:, 1:]).bool()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid], reduction="sum"))
        count += int(valid.sum())
        seen_tokens += int(keep.sum())
        if seen_tokens >= 200:
            break
    assert seen_tokens == r["n_tokens"]
    assert r["ce_spliced"] == pytest.approx(total / count, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The embedded MiniLM: train, export, load in sae-lens


SMALL = ["--n-tokens", "2000", "--n-features", "256", "--k", "8", "--epochs", "1", "--batch-size", "250",
         "--no-progress", "--log-every", "4", "--seq-len", "64", "--threshold-lr", "0.5"]
VARIANTS = {
    "batchtopk": ["--activation", "batchtopk"],
    "matryoshka-batchtopk": ["--activation", "batchtopk", "--matryoshka", "32", "128"],
    "matryoshka-topk": ["--matryoshka", "64"],
    "skip-transcoder": ["--site", "mlp_in", "--target-site", "mlp_out", "--activation", "batchtopk",
                        "--skip-connection"],
}
SAELENS = {"batchtopk": "jumprelu", "matryoshka-batchtopk": "jumprelu", "matryoshka-topk": "topk",
           "skip-transcoder": "jumprelu_skip_transcoder"}


@pytest.fixture(scope="module")
def minilm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("minilm") / "attn_out"


@pytest.mark.model
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_minilm_trains_each_variant_and_sae_lens_loads_the_export_with_our_reconstructions(
    variant, minilm_cache, tmp_path, capsys
):
    sae_lens = pytest.importorskip("sae_lens")
    cache = [] if variant == "skip-transcoder" else ["--cache", str(minilm_cache)]
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *cache, *SMALL, *VARIANTS[variant]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["fvu"] < 1.5 and summary["steps"] == 8
    assert main(["export", "--format", "saelens", str(out / "final"), str(tmp_path / "saelens")]) == 0
    ours = TopKSAE.load(out / "final", backend="torch").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    assert theirs.cfg.architecture() == SAELENS[variant]
    store = ActivationStore(out / "activations" if not cache else minilm_cache)
    x, y = split_pairs(store.load_all()[:500], store.target_width)
    s = ours.metadata["norm_scale"]
    t = ours.metadata.get("target_norm_scale", s)
    with torch.no_grad():
        mine = ours(x * s)
        recon = theirs(x)
        acts = theirs.encode(x)
    scale = float(mine.x_hat.abs().max() / t)
    torch.testing.assert_close(recon, mine.x_hat / t, atol=2e-5 * scale, rtol=0)
    dense = torch.zeros(500, 256).scatter(1, mine.idx, mine.vals)
    torch.testing.assert_close(acts, dense, atol=2e-5 * float(dense.abs().max()), rtol=0)
    if variant == "skip-transcoder":
        assert y is not None and ours.metadata["target_hook"] == "encoder.layer.3.output.dense"
        capsys.readouterr()
        assert main(["eval", str(out / "final"), "--n-tokens", "300", "--out", str(tmp_path / "eval")]) == 0
        report = json.loads((tmp_path / "eval" / "eval.json").read_text())
        assert report["target_hook"] == "encoder.layer.3.output.dense" and 0 < report["fvu"] < 1.5
        assert "-> encoder.layer.3.output.dense" in capsys.readouterr().out
