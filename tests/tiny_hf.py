"""Tiny random Hugging Face models (2 layers, each as its base model and its LM-head wrapper) and
byte-level BPE tokenizers trained on a few sentences: what the hf tests run on, no download."""
from __future__ import annotations

from typing import NamedTuple

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from flashsae.sae.hf import collect_activations

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


def train_tokenizer(template: str, specials: list[str]) -> PreTrainedTokenizerFast:
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


def make_bos_tokenizer() -> PreTrainedTokenizerFast:
    """Decoder style: BOS before every sequence."""
    tok = train_tokenizer("<s> $A", ["<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )


def make_cls_tokenizer() -> PreTrainedTokenizerFast:
    """Encoder style: [CLS] ... [SEP]."""
    tok = train_tokenizer("[CLS] $A [SEP]", ["[CLS]", "[SEP]"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>", padding_side="right"
    )


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
