"""Sites resolve to the modules whose outputs satisfy each architecture's residual algebra; hook paths and their errors."""
from __future__ import annotations

import pytest
import torch
import transformers

from flashsae.sae.hf import SITES, layer_from_path, num_layers, resolve_hook, resolve_site, supported_architectures
from flashsae.sae.hf.sites import INPUT_SUFFIX
from tests.tiny_hf import ARCHS, N_LAYERS, SENTENCES, VOCAB, build, close, collect_all, reference_rows, tokenizer_for


def test_supported_architectures_list_the_site_table():
    assert set(ARCHS) <= set(supported_architectures())
    assert supported_architectures() == sorted(supported_architectures())


@pytest.mark.parametrize("wrapper", [False, True], ids=["base", "lm_head"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_sites_capture_the_blocks_outputs(arch, wrapper, request):
    """attn_out / mlp_out / resid satisfy the architecture's residual algebra against output_hidden_states;
    attn_z and mlp_in are the inputs that the output projection and the MLP turn into attn_out and mlp_out."""
    model = build(arch, wrapper)
    tokenizer = tokenizer_for(arch, request)
    assert num_layers(model) == N_LAYERS
    base = model.base_model
    modules, paths = {}, {}
    for layer in range(N_LAYERS):
        for site in SITES:
            point = resolve_site(model, site, layer)
            path, module = point
            assert model.get_submodule(path.removesuffix(INPUT_SUFFIX)) is module
            assert point.reads_input == (site in ("attn_z", "mlp_in"))
            paths[site, layer] = path
            modules[f"{site}{layer}"] = point
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
            z, mlp_in = got[f"attn_z{layer}"], got[f"mlp_in{layer}"]
            heads = model.config.num_attention_heads
            assert z.shape[1] == heads * getattr(model.config, "head_dim", model.config.hidden_size // heads)
            close(attn, model.get_submodule(paths["attn_out", layer])(z))
            mlp_block = model.get_submodule(paths["mlp_in", layer].removesuffix(INPUT_SUFFIX))
            close(mlp, block.output.dense(mlp_block(mlp_in)) if family == "post_ln" else mlp_block(mlp_in))
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


def test_site_errors_are_clear():
    model = build("llama", wrapper=True)
    with pytest.raises(ValueError, match="site must be one of.*attn_out"):
        resolve_site(model, "mlp_hidden", 0)
    for layer, error in ((2, ValueError), (-1, ValueError), (True, TypeError), (1.0, TypeError)):
        with pytest.raises(error, match=r"layer \(this model has 2 layers\) must be an integer in \[0, 1\]"):
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


def test_layer_from_path_reads_the_first_integer_component():
    assert layer_from_path("model.layers.3.mlp") == 3
    assert layer_from_path("h.11") == 11
    assert layer_from_path("7.mlp") == 7
    assert layer_from_path("encoder.layer.2.attention.output.dense") == 2
    assert layer_from_path("model.layers.1.self_attn.o_proj") == 1
    assert layer_from_path("mlp.c_proj") is None
    assert layer_from_path("model.layer3.mlp") is None  # a digit inside a name is no layer
    assert layer_from_path("") is None


def test_replacing_an_input_site_changes_what_the_module_reads():
    """HookPoint.replace on an ``:input`` site feeds the module the replacement (positional or keyword input)."""
    model = build("llama", wrapper=False)
    point = resolve_site(model, "attn_z", 0)
    proj = point.module
    z = torch.randn(2, 5, proj.in_features)
    with point.replace(torch.zeros_like):
        assert torch.equal(proj(z), torch.zeros(2, 5, proj.out_features))
        assert torch.equal(proj(input=z), torch.zeros(2, 5, proj.out_features))
    close(proj(z), z @ proj.weight.T)  # the hook is gone after the block
    seen = []
    with point.capture(seen.append):
        proj(z)
    assert len(seen) == 1 and seen[0] is z
