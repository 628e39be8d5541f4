"""Collection: hooked outputs at the real tokens only, windows, max_tokens, hooks that never outlive a forward, stores."""
from __future__ import annotations

import pytest
import torch

from flashsae.sae.hf import (
    DEFAULT_TEXT,
    SITES,
    collect_activations,
    collect_to_store,
    iter_texts,
    load_model,
    num_layers,
    resolve_hook,
    resolve_site,
    text_source_hash,
)
from flashsae.sae.hf.collect import forward_kwargs, text_batches
from tests.tiny_hf import LONG_TEXT, SENTENCES, build, close, collect_all, reference_rows, tokenizer_for


def test_collected_dtype_is_the_fp32_values_rounded(bos_tokenizer):
    model = build("llama", wrapper=False)
    _, module = resolve_site(model, "resid", 1)
    full = collect_all(model, bos_tokenizer, {"r": module}, SENTENCES)["r"]
    for dtype in (torch.bfloat16, torch.float16):
        low = collect_all(model, bos_tokenizer, {"r": module}, SENTENCES, dtype=dtype)["r"]
        assert low.dtype == dtype and low.device.type == "cpu"
        assert torch.equal(low, full.to(dtype))
    # Ordinary tensors, not inference-mode ones: a consumer can train on them.
    assert not full.is_inference()
    weight = torch.randn(full.shape[1], requires_grad=True)
    (full @ weight).square().sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Tokens: filtering, windows, max_tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_only_real_tokens_are_collected(arch, skip_special_tokens, request):
    """Rows are exactly the unpadded (and, when asked, non-special) tokens, in order, for every name."""
    model = build(arch, wrapper=False)
    tokenizer = tokenizer_for(arch, request)
    modules = {"attn": resolve_site(model, "attn_out", 0)[1], "resid": resolve_site(model, "resid", 0)[1]}
    batches = list(
        collect_activations(model, tokenizer, modules, SENTENCES, batch_size=4,
                            skip_special_tokens=skip_special_tokens, progress=False)
    )
    assert len(batches) == 2  # 6 texts, batches of 4 windows
    enc = tokenizer(SENTENCES, return_special_tokens_mask=True)
    per_text = [len(m) - (sum(m) if skip_special_tokens else 0) for m in enc["special_tokens_mask"]]
    assert [b["resid"].shape[0] for b in batches] == [sum(per_text[:4]), sum(per_text[4:])]
    assert all(b["attn"].shape == b["resid"].shape for b in batches)
    hs, keep = reference_rows(model, tokenizer, SENTENCES, skip_special_tokens=skip_special_tokens)
    assert int(keep.sum()) < keep.numel()  # the reference batch does hold padding
    close(torch.cat([b["resid"] for b in batches]), hs[1])


def test_long_texts_are_cut_into_windows_not_truncated(bos_tokenizer):
    model = build("llama", wrapper=False)
    _, module = resolve_site(model, "resid", 0)
    seq_len = 16
    n_text = len(bos_tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"])
    assert n_text > 5 * seq_len
    batches = list(collect_activations(model, bos_tokenizer, {"r": module}, [LONG_TEXT, "Short."],
                                       seq_len=seq_len, batch_size=3, progress=False))
    rows = torch.cat([b["r"] for b in batches])
    n_short = len(bos_tokenizer("Short.", add_special_tokens=False)["input_ids"])
    assert rows.shape[0] == n_text + n_short  # every token of the long text, BOS skipped in each window
    per_window = seq_len - 1
    n_windows = -(-n_text // per_window) + 1
    assert len(batches) == -(-n_windows // 3)
    # Each window is a fresh sequence: its rows equal the model run on that window alone.
    ids = bos_tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"]
    for w in (0, 2):
        window = [bos_tokenizer.bos_token_id] + ids[w * per_window : (w + 1) * per_window]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([window]), output_hidden_states=True)
        close(rows[w * per_window : (w + 1) * per_window], out.hidden_states[1][0, 1:])


@pytest.mark.parametrize("max_tokens", [1, 37, 100])
def test_max_tokens_stops_after_exactly_that_many(cls_tokenizer, max_tokens):
    model = build("bert", wrapper=False)
    modules = {s: resolve_site(model, s, 1)[1] for s in SITES}
    full = collect_all(model, cls_tokenizer, modules, SENTENCES * 3, batch_size=3)
    assert full["resid"].shape[0] > 100
    got = collect_all(model, cls_tokenizer, modules, SENTENCES * 3, batch_size=3, max_tokens=max_tokens)
    for site in SITES:
        assert got[site].shape[0] == max_tokens
        assert torch.equal(got[site], full[site][:max_tokens])


def test_collection_arguments_are_validated(bos_tokenizer):
    model = build("llama", wrapper=False)
    _, module = resolve_site(model, "resid", 0)
    cases = [
        (dict(seq_len=0), "seq_len"), (dict(seq_len=1), "seq_len"), (dict(seq_len=129), "128, the longest"),
        (dict(batch_size=0), "batch_size"), (dict(max_tokens=0), "max_tokens"),
    ]
    for kwargs, word in cases:  # raised at the call, before any text is read
        with pytest.raises(ValueError, match=word):
            collect_activations(model, bos_tokenizer, {"r": module}, SENTENCES, progress=False, **kwargs)
    with pytest.raises(TypeError, match="dtype"):
        collect_activations(model, bos_tokenizer, {"r": module}, SENTENCES, dtype=torch.int8, progress=False)
    with pytest.raises(TypeError, match="single str"):
        collect_activations(model, bos_tokenizer, {"r": module}, SENTENCES[0], progress=False)
    with pytest.raises(ValueError, match="modules"):
        collect_activations(model, bos_tokenizer, {}, SENTENCES, progress=False)
    stranger = torch.nn.Linear(4, 4)
    # RoBERTa's positions start after the padding index: 130 position embeddings hold 129 tokens.
    roberta = build("roberta", wrapper=False)
    _, layer = resolve_site(roberta, "resid", 0)
    with pytest.raises(ValueError, match="129, the longest"):
        collect_activations(roberta, bos_tokenizer, {"r": layer}, [LONG_TEXT], seq_len=130, progress=False)
    rows = collect_all(roberta, bos_tokenizer, {"r": layer}, [LONG_TEXT], seq_len=129)["r"]
    assert rows.shape[0] == len(bos_tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"])

    with pytest.raises(RuntimeError, match="did not run"):
        next(collect_activations(model, bos_tokenizer, {"x": stranger}, SENTENCES, progress=False))


def test_slow_tokenizers_are_refused_at_the_call():
    model = build("bert", wrapper=False)
    _, module = resolve_site(model, "resid", 0)

    class SlowTokenizer:  # what a Python (non-Rust) tokenizer reports
        is_fast = False
        pad_token_id = 0

    slow = SlowTokenizer()
    # Raised at the call (neither returns a generator that checks only once it is started).
    with pytest.raises(TypeError, match="fast.*SlowTokenizer"):
        collect_activations(model, slow, {"r": module}, SENTENCES, progress=False)
    with pytest.raises(TypeError, match="fast.*SlowTokenizer"):
        text_batches(slow, SENTENCES, 16, 2)


def test_forward_kwargs_turn_off_the_cache_only_where_the_forward_takes_one():
    assert forward_kwargs(build("llama", wrapper=True)) == {"use_cache": False}
    assert forward_kwargs(build("gpt2", wrapper=False)) == {"use_cache": False}
    assert forward_kwargs(torch.nn.Linear(4, 4)) == {}


# --------------------------------------------------------------------------------------------
# Hooks never outlive a forward pass
# --------------------------------------------------------------------------------------------


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_are_removed_when_the_consumer_stops_early(bos_tokenizer):
    model = build("gpt2", wrapper=True)
    modules = {s: resolve_site(model, s, 1)[1] for s in SITES}
    before = _hook_count(model)
    gen = collect_activations(model, bos_tokenizer, modules, SENTENCES, batch_size=2, progress=False)
    first = next(gen)
    assert first["resid"].shape[0] > 0
    assert _hook_count(model) == before  # none left attached while the generator is suspended
    assert not torch.is_inference_mode_enabled()
    gen.close()
    assert _hook_count(model) == before


def test_hooks_are_removed_after_an_exception(bos_tokenizer):
    model = build("llama", wrapper=True)
    modules = {s: resolve_site(model, s, 0)[1] for s in SITES}
    before = _hook_count(model)

    def boom(*_):
        raise RuntimeError("forward failed")

    # An exception inside the forward pass, before the hooked layer finishes.
    handle = model.model.layers[0].mlp.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        collect_all(model, bos_tokenizer, modules, SENTENCES)
    handle.remove()
    assert _hook_count(model) == before

    # An exception from the texts, between forward passes.
    def texts():
        yield from SENTENCES
        raise OSError("text source broke")

    with pytest.raises(OSError, match="text source broke"):
        collect_all(model, bos_tokenizer, modules, texts(), batch_size=2)
    assert _hook_count(model) == before


def test_stopping_the_forward_early_changes_no_values(bos_tokenizer):
    model = build("qwen2", wrapper=True)
    modules = {"a": resolve_site(model, "attn_out", 0)[1], "r": resolve_site(model, "resid", 0)[1]}
    early = collect_all(model, bos_tokenizer, modules, SENTENCES, stop_early=True)
    full = collect_all(model, bos_tokenizer, modules, SENTENCES, stop_early=False)
    for name in modules:
        assert torch.equal(early[name], full[name])


# --------------------------------------------------------------------------------------------
# Stores and the embedded model
# --------------------------------------------------------------------------------------------


def test_collect_to_store_round_trip(tmp_path, bos_tokenizer):
    model = build("llama", wrapper=True)
    path, module = resolve_site(model, "mlp_out", 1)
    store = collect_to_store(
        tmp_path / "store", model, bos_tokenizer, path, module, SENTENCES,
        model_name="tiny-llama", site="mlp_out", layer=1, text_source=None, n_tokens=50, shard_tokens=16,
        batch_size=2, progress=False,
    )
    m = store.manifest
    assert (m["model"], m["site"], m["layer"], m["hook"]) == ("tiny-llama", "mlp_out", 1, path)
    assert m["text_source"] == DEFAULT_TEXT and m["text_source_hash"] == text_source_hash()
    assert store.n_tokens == 50 and store.d_model == 48 and len(store.shards) == 4
    expected = collect_all(model, bos_tokenizer, {"m": module}, SENTENCES, max_tokens=50)["m"]
    assert torch.equal(store.load_all(), expected)


def test_collect_to_store_by_hook_path_and_short_texts(tmp_path, bos_tokenizer):
    model = build("gemma", wrapper=False)
    path = "layers.1.mlp.down_proj"
    n_available = sum(len(ids) - 1 for ids in bos_tokenizer(SENTENCES)["input_ids"])
    with pytest.warns(UserWarning, match=f"after {n_available} tokens"):
        store = collect_to_store(
            tmp_path / "hooked", model, bos_tokenizer, path, resolve_hook(model, path), SENTENCES,
            model_name="tiny-gemma", site=None, layer=None, text_source=None, n_tokens=10_000, progress=False,
        )
    assert (store.manifest["site"], store.manifest["layer"], store.manifest["hook"]) == (path, 1, path)
    assert store.n_tokens == n_available


@pytest.mark.model
def test_embedded_minilm_collects_every_site_at_layer_3():
    model, tokenizer = load_model()
    assert model.config.model_type == "bert" and num_layers(model) == 6
    modules = {site: resolve_site(model, site, 3) for site in SITES}
    modules["resid2"] = resolve_site(model, "resid", 2)  # layer 3's input
    got = collect_all(model, tokenizer, modules, iter_texts(), max_tokens=600, seq_len=64, batch_size=8)
    for site in SITES:
        assert got[site].shape == (600, 384) and got[site].dtype == torch.float32
        assert torch.isfinite(got[site]).all()
    assert got["attn_out"].var(dim=0).mean() > 1e-3
    # The real weights obey a BERT layer's post-LN algebra: LN(LN(x + attn_out) + mlp_out) == resid.
    block = model.encoder.layer[3]
    with torch.no_grad():
        h_mid = block.attention.output.LayerNorm(got["resid2"] + got["attn_out"])
        torch.testing.assert_close(block.output.LayerNorm(h_mid + got["mlp_out"]), got["resid"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got["mlp_in"], h_mid, rtol=1e-4, atol=1e-4)  # the MLP reads LN(x + attn_out)
        torch.testing.assert_close(block.attention.output.dense(got["attn_z"]), got["attn_out"], rtol=1e-4, atol=1e-4)
