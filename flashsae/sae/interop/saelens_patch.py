"""`patch_saelens`: SAELens' own TopK SAEs running `flashsae.ops` for the top-k encode and the decode.

SAELens' TopK encode is ``hidden_pre = hook_sae_acts_pre((x' @ W_enc + b_enc) [* ||W_dec rows||])``
then ``feature_acts = hook_sae_acts_post(topk_relu(hidden_pre))`` (dense [..., d_sae], or sparse COO
with ``use_sparse_activations``) and its decode is ``feature_acts [/ ||W_dec rows||] @ W_dec + b_dec``.
The patch computes the same codes with `ops.topk_encode` (no dense pre-activation matmul) and
decodes them with `ops.sparse_decode`, as long as nothing can have changed them in between: the
codes are handed from encode to decode only when decode gets the very tensor encode returned,
not modified in place since (its version counter; an exact content check for inference-mode
tensors, which have none), and no backward hook waits on ``hook_sae_acts_post``. Anything else
(an edit, a hook that returns or modifies the activations, a tensor from elsewhere) is decoded by
SAELens' own ``decode``. A hook on ``hook_sae_acts_pre`` (``run_with_cache`` adds one) can change
the selection itself, so with one registered the encode is SAELens' own. This module does not
import ``sae_lens``.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple

import torch

from ... import ops
from ...checks import require_choice
from .patching import has_hooks, patch_methods, patch_state, unchanged_since, version_of

HIDDEN_PRE_MODES = ("lazy", "always")
"""``patch_saelens(hidden_pre=...)``: when ``TrainStepOutput.hidden_pre`` is computed (see there)."""


class _Codes(NamedTuple):
    """What encode hands to decode: the activations it returned (weakly) and the codes behind them."""

    acts: weakref.ref
    version: int | None
    vals: torch.Tensor  # [N, k]
    idx: torch.Tensor  # [N, k] int64
    norms: torch.Tensor | None  # [d_sae] decoder row norms (rescale_acts_by_decoder_norm) or None
    lead: torch.Size


def patch_saelens(sae: Any, *, backend: str = "auto", sparse_grad: bool = False, hidden_pre: str = "lazy") -> Any:
    """Run a SAELens TopK SAE (``TopKSAE`` or ``TopKTrainingSAE``) on `flashsae.ops`, in place.

    ``encode`` / ``encode_with_hidden_pre`` select the top-k with `ops.topk_encode` and ``decode`` of
    the activations they returned runs `ops.sparse_decode`; everything else (``forward``, hooks,
    activation normalization, the loss, ``training_forward_pass``, ``SAETrainer``, its optimizer) is
    SAELens' own code, and gradients land in the SAE's own parameters. The map is the same, with
    ``apply_b_dec_to_input``, ``rescale_acts_by_decoder_norm`` and ``use_sparse_activations``.

    Activations stay SAELens' [..., d_sae] tensors (built by a scatter of the k values), and every
    way of touching them behaves as in SAELens: decoding an edited tensor, hooks on
    ``hook_sae_acts_post`` that edit or replace it, and hooks on ``hook_sae_acts_pre`` (which run
    SAELens' own encode) — see the module docstring. The dense pre-activations ``hidden_pre``
    (a [..., d_sae] matmul, the cost the patch exists to avoid) are computed when something reads
    them: ``encode_with_hidden_pre`` always returns them; ``training_forward_pass`` computes them
    when its aux loss needs them (some feature dead) and otherwise, with ``hidden_pre="lazy"``,
    returns a ``TrainStepOutput`` whose ``hidden_pre`` is computed on first read — before the
    parameters change (an ``optimizer.step()``), else RuntimeError; ``hidden_pre="always"``
    computes them in every step. ``sparse_grad=True`` gives float32 `flashsae.rowgrad.RowGrad`
    gradients (`SparseAdam` reads them compactly; other optimizers see dense tensors). Returns ``sae``; `flashsae.sae.interop.unpatch` restores it.
    """
    cfg = getattr(sae, "cfg", None)
    architecture = cfg.architecture() if cfg is not None and hasattr(cfg, "architecture") else None
    if architecture != "topk":
        raise ValueError(f"patch_saelens needs a SAELens 'topk' SAE, got architecture {architecture!r}")
    require_choice("hidden_pre", hidden_pre, HIDDEN_PRE_MODES)
    methods: dict[str, Callable[..., Any]] = {"decode": _decode, "encode": _encode}
    if hasattr(sae, "encode_with_hidden_pre"):
        methods.update(encode_with_hidden_pre=_encode_with_hidden_pre, training_forward_pass=_training_forward_pass)
    patch_methods(sae, methods, backend=backend, sparse_grad=sparse_grad, hidden_pre=hidden_pre)
    return sae


# ----------------------------------------------------------------------------------------- encode
def _encode(sae: Any, x: torch.Tensor) -> torch.Tensor:
    if has_hooks(sae.hook_sae_acts_pre):
        patch_state(sae).scratch.pop("codes", None)
        return type(sae).encode(sae, x)
    return _sparse_encode(sae, x)[0]


def _encode_with_hidden_pre(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scratch = patch_state(sae).scratch
    if has_hooks(sae.hook_sae_acts_pre):
        scratch.pop("codes", None)
        return type(sae).encode_with_hidden_pre(sae, x)
    feature_acts, sae_in = _sparse_encode(sae, x)
    if scratch.get("defer_hidden_pre"):  # training_forward_pass computes it on first read
        scratch["deferred"] = _deferred_hidden_pre(sae, sae_in)
        return feature_acts, sae_in.new_empty(*sae_in.shape[:-1], 0)
    return feature_acts, _dense_hidden_pre(sae, sae_in)


def _sparse_encode(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature_acts as SAELens returns them, sae_in [..., d_in]) with the top-k from `ops.topk_encode`."""
    state = patch_state(sae)
    sae_in = sae.process_sae_in(x)  # dtype cast, reshaping, input hook, normalization, minus b_dec
    lead, d_in = sae_in.shape[:-1], sae_in.shape[-1]
    W_enc, b_enc = sae.W_enc.T, sae.b_enc  # [d_sae, d_in], [d_sae]
    norms = None
    if sae.cfg.rescale_acts_by_decoder_norm:
        norms = sae.W_dec.norm(dim=-1)
        W_enc, b_enc = W_enc * norms[:, None], b_enc * norms
    k = getattr(sae.activation_fn, "k", sae.cfg.k)  # SAELens' TopK module keeps the k it was built with
    vals, idx = ops.topk_encode(sae_in.reshape(-1, d_in), W_enc, b_enc, k, **state.ops_kwargs)
    acts = _activations(sae, vals, idx, lead)
    version = version_of(acts)
    post = sae.hook_sae_acts_post(acts)
    handed_on = (post is acts and (version is None or version_of(post) == version)
                 and not has_hooks(sae.hook_sae_acts_post, backward_only=True))
    state.scratch["codes"] = _Codes(weakref.ref(post), version, vals, idx, norms, lead) if handed_on else None
    return post, sae_in


def _activations(sae: Any, vals: torch.Tensor, idx: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """SAELens' feature_acts [*lead, d_sae] from vals / idx [N, k]: dense, or sparse COO as its TopK builds them."""
    d_sae = sae.cfg.d_sae
    if not getattr(sae.activation_fn, "use_sparse_activations", False):
        return vals.new_zeros(vals.shape[0], d_sae).scatter(-1, idx, vals).reshape(*lead, d_sae)
    rows = torch.arange(vals.shape[0], device=vals.device).repeat_interleave(vals.shape[1])
    coords = torch.stack([*torch.unravel_index(rows, tuple(lead)), idx.flatten()])
    return torch.sparse_coo_tensor(coords, vals.flatten(), (*lead, d_sae))


def _dense_hidden_pre(sae: Any, sae_in: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """SAELens' hidden_pre [..., d_sae] (its formula, differentiable, as its aux loss expects).

    ``params``: W_enc, b_enc, W_dec to use instead of the SAE's current ones; the hook
    ``hook_sae_acts_pre`` runs only without them (a step computing it now, not later).
    """
    p = params if params is not None else {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec}
    hidden_pre = sae_in @ p["W_enc"] + p["b_enc"]
    if params is None:
        hidden_pre = sae.hook_sae_acts_pre(hidden_pre)
    if sae.cfg.rescale_acts_by_decoder_norm:
        hidden_pre = hidden_pre * p["W_dec"].norm(dim=-1)
    return hidden_pre


# ---------------------------------------------------------------------------------- training step
def _training_forward_pass(sae: Any, step_input: Any) -> Any:
    state = patch_state(sae)
    mask = step_input.dead_neuron_mask
    # SAELens' TopK aux loss reads hidden_pre only when some feature is dead.
    needed = state.options["hidden_pre"] == "always" or (mask is not None and bool(mask.any()))
    state.scratch["defer_hidden_pre"] = not needed
    try:
        out = type(sae).training_forward_pass(sae, step_input)
    finally:
        state.scratch.pop("defer_hidden_pre", None)
        deferred = state.scratch.pop("deferred", None)
    return out if deferred is None else _with_deferred_hidden_pre(out, deferred)


def _deferred_hidden_pre(sae: Any, sae_in: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function computing this step's hidden_pre later, exactly as the step would have.

    It keeps the parameters the step used and their version counters (RuntimeError once an
    optimizer step or another in-place update changed them), the grad mode and the autocast state.
    """
    params = {name: getattr(sae, name) for name in ("W_enc", "b_enc", "W_dec")}
    versions = {name: version_of(p) for name, p in params.items()}
    device = sae_in.device.type
    grad, autocast = torch.is_grad_enabled(), torch.is_autocast_enabled(device)
    autocast_dtype = torch.get_autocast_dtype(device)

    def compute() -> torch.Tensor:
        changed = [name for name, p in params.items() if not unchanged_since(p, versions[name])]
        if changed:
            raise RuntimeError(
                f"hidden_pre of this training step is computed on first read (patch_saelens(hidden_pre='lazy')), "
                f"but {', '.join(changed)} changed since the step; read it before optimizer.step(), or patch "
                f"with hidden_pre='always'"
            )
        with torch.set_grad_enabled(grad), torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            return _dense_hidden_pre(sae, sae_in, params)

    return compute


_DEFERRED_KEY = "_flashsae_hidden_pre"
_LAZY_OUTPUT_CLASSES: dict[type, type] = {}


def _read_hidden_pre(out: Any) -> torch.Tensor:
    value = out.__dict__[_DEFERRED_KEY]
    if callable(value):
        value = out.__dict__[_DEFERRED_KEY] = value()
    return value


def _write_hidden_pre(out: Any, value: torch.Tensor) -> None:
    out.__dict__[_DEFERRED_KEY] = value


def _with_deferred_hidden_pre(out: Any, compute: Callable[[], torch.Tensor]) -> Any:
    """``out`` (a SAELens TrainStepOutput) as an instance of a subclass whose ``hidden_pre`` is ``compute()`` on first read."""
    base = type(out)
    cls = _LAZY_OUTPUT_CLASSES.get(base)
    if cls is None:
        doc = f"{base.__name__} whose hidden_pre is computed on first read (flashsae.sae.interop.patch_saelens)."
        cls = type(base.__name__, (base,), {"hidden_pre": property(_read_hidden_pre, _write_hidden_pre), "__doc__": doc})
        _LAZY_OUTPUT_CLASSES[base] = cls
    out.__dict__.pop("hidden_pre", None)
    out.__dict__[_DEFERRED_KEY] = compute
    out.__class__ = cls
    return out


# ----------------------------------------------------------------------------------------- decode
def _decode(sae: Any, feature_acts: torch.Tensor) -> torch.Tensor:
    codes = patch_state(sae).scratch.pop("codes", None)
    if codes is None or codes.acts() is not feature_acts or not _unedited(feature_acts, codes):
        return type(sae).decode(sae, feature_acts)
    vals, idx = codes.vals, codes.idx
    if codes.norms is not None:  # rescale_acts_by_decoder_norm: activations divided by the decoder row norms
        vals = vals / codes.norms[idx]
    out = ops.sparse_decode(vals, idx, sae.W_dec, sae.b_dec, **patch_state(sae).ops_kwargs)
    out = sae.hook_sae_recons(out.reshape(*codes.lead, -1))
    out = sae.run_time_activation_norm_fn_out(out)
    return sae.reshape_fn_out(out, sae.d_head)


def _unedited(feature_acts: torch.Tensor, codes: _Codes) -> bool:
    """Whether ``feature_acts`` still holds exactly the codes: by its version counter, or, for an
    inference-mode tensor (no counter), by comparing its [N, d_sae] contents with the codes."""
    if codes.version is not None:
        return unchanged_since(feature_acts, codes.version)
    if feature_acts.is_sparse:
        return False
    dense = feature_acts.reshape(-1, feature_acts.shape[-1])
    return bool(torch.equal(dense.gather(-1, codes.idx), codes.vals)
                and torch.count_nonzero(dense) == torch.count_nonzero(codes.vals))
