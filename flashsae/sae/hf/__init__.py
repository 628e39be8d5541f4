"""Hugging Face `transformers` models as a source of activations.

`models` loads a model and its tokenizer (the embedded MiniLM by default), `sites` names the
module output or input that is a site (``attn_out``, ``attn_z``, ``mlp_in``, ``mlp_out``,
``resid``) at a layer, `texts` reads the documents (and holds some out for evaluation), `hub`
asks the Hugging Face hub whether it has a model or dataset, and `collect` runs the texts through
the model and gathers the hooked activations (into memory or an activation store).
"""
from .collect import collect_activations, collect_to_store
from .models import (
    EMBEDDED_MODEL, embedded_model_path, find_model, is_causal_lm, load_config, load_model, model_skeleton,
)
from .sites import (
    SITES, HookPoint, hook_point, layer_from_path, num_layers, resolve_hook, resolve_site, supported_architectures,
)
from .texts import (
    DEFAULT_TEXT, DOCUMENTS, HELDOUT_EVERY, check_text_source, is_heldout, iter_texts, text_source_hash,
)

__all__ = [
    "EMBEDDED_MODEL", "embedded_model_path", "find_model", "is_causal_lm", "load_config", "load_model",
    "model_skeleton",
    "SITES", "HookPoint", "hook_point", "layer_from_path", "num_layers", "resolve_hook", "resolve_site",
    "supported_architectures",
    "DEFAULT_TEXT", "DOCUMENTS", "HELDOUT_EVERY", "check_text_source", "is_heldout", "iter_texts",
    "text_source_hash",
    "collect_activations", "collect_to_store",
]
