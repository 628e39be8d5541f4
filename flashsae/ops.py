"""The functional API: `topk_encode` and `sparse_decode`, validated here and composed from backend primitives.

Each op is one autograd Function whose forward and backward call only the primitives of a
`flashsae.kernels.registry.Backend` (``topk_encode``, ``gather_rows``, ``row_dots``,
``segment_rows``), so every backend computes the same sparse gradients. ``backend`` picks the
primitives by name (`BACKENDS`): ``"triton"`` (the chunked encoder and the Triton row kernels; on
CPU tensors only under ``TRITON_INTERPRET=1``), ``"triton-fused"`` (the fused encoder, opt-in),
``"torch"`` (runs anywhere) or ``"auto"`` ("triton" on CUDA tensors, torch elsewhere).

With ``sparse_grad=True`` the gradients of ``W_enc``, ``W_dec`` and ``b_enc`` are `RowGrad`s:
float32 values of only the rows of features that fired, in sizes fixed by the batch (no host
sync), which `flashsae.optim.SparseAdam` reads as they are (other optimizers see them as dense
tensors); with ``sparse_grad=False`` they are dense tensors of the parameters' dtype. Both
backward passes of one selection share one grouping of its fired pairs (`SharedGrouping`).

`topk_encode_with_aux` adds AuxK's top-aux_k among the dead features to a selection from the same
encoder pass (one GEMM over W_enc where the backend folds it, `Backend.folds_aux`).

Dtypes: one float dtype per call, the inputs' own; math accumulates in fp32 (float64 for float64
inputs, which only the torch backend takes; their `RowGrad` values are float64 too). Under
``torch.autocast`` the ops run with autocast disabled, in their inputs' dtypes, so they select the
same features as outside it; cast the inputs yourself (e.g. to bf16) to get bf16 tensor cores.
"""
from __future__ import annotations

import contextlib

import torch

from .checks import (
    OP_DTYPES, dtype_name, require_float_tensor, require_int, require_k, require_like, require_number, require_shape,
)
from .kernels.batch_select import above_threshold, batch_topk, candidate_count
from .kernels import batch_select
from .kernels.pairs import PairGroups, group_pairs
from .kernels.reference import math_dtype
from .kernels.registry import Backend, backend_names, get_backend
from .rowgrad import RowGrad, value_dtype

# The names a ``backend`` argument accepts.
BACKENDS = backend_names()


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast for ``device``'s type (a no-op where autocast does not exist or is
    not on: entering and leaving an autocast context costs several microseconds per op)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class SharedGrouping:
    """The grouping by feature of one selection's fired pairs, made once and shared by its backward passes.

    Give the same instance to `topk_encode` and to the `sparse_decode` of that encoder's (vals, idx):
    the encoder binds it to its outputs, and whichever backward runs first groups the pairs
    (`flashsae.kernels.pairs.group_pairs`, one sort of the B * k pairs); the other reuses it.
    """

    def __init__(self) -> None:
        self.vals: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None
        self.n_features = 0
        self._fired: torch.Tensor | None = None
        self._groups: PairGroups | None = None

    def bind(self, vals: torch.Tensor, idx: torch.Tensor, n_features: int) -> None:
        """Attach to a selection: vals [B, k], idx [B, k] int64 of features < n_features."""
        if self.idx is not None and not self.matches(vals, idx):
            raise ValueError("grouping is already bound to another selection; use one SharedGrouping per encoder call")
        self.vals, self.idx, self.n_features = vals, idx, n_features

    def matches(self, vals: torch.Tensor, idx: torch.Tensor) -> bool:
        """True when bound to exactly these tensors (the encoder's outputs themselves)."""
        return vals is self.vals and idx is self.idx

    def limit_to(self, fired: torch.Tensor) -> None:
        """Group only the pairs where ``fired`` (bool [B, k], within vals > 0), before any backward runs.

        For pairs whose gradient is known to be zero (a feature-parallel rank's local candidates
        that lost the global selection): their rows are then not touched at all.
        """
        if self._groups is not None:
            raise RuntimeError("the pairs are already grouped: limit_to must come before the backward")
        self._fired = fired

    def groups(self) -> PairGroups:
        """The fired pairs (vals > 0, or those of `limit_to`) grouped by feature; computed on the first call."""
        if self._groups is None:
            fired = self.vals > 0 if self._fired is None else self._fired
            self._groups = group_pairs(self.idx, fired, self.n_features)
        return self._groups


def _row_gradient(like: torch.Tensor, groups: PairGroups, grad_rows: torch.Tensor, sparse: bool) -> torch.Tensor:
    """The gradient of ``like`` (W or b) from its per-slot rows: a float32 `RowGrad`, or a dense tensor."""
    if sparse:  # float64 values for a float64 parameter even when the incoming gradient was fp32
        return RowGrad.of(like, groups.rows, grad_rows.to(value_dtype(like)), groups.valid)
    dense = torch.zeros_like(like)
    # Padding slots add zeros to row 0; the fired rows are distinct, so each is rounded once.
    return dense.index_put_((groups.rows,), grad_rows.to(like.dtype), accumulate=True)


class TopKEncode(torch.autograd.Function):
    """relu((x - b_pre) @ W_enc.T + b_enc) -> top-k; backward touches only the selected features.

    Backward, with fired = vals > 0 and grad_pre = grad_vals where fired (the ReLU's gate):
    grad_x = gather_rows(grad_pre, idx, W_enc), grad_b_pre = -grad_x.sum(0), and the rows of W_enc
    and b_enc that fired from segment_rows(grad_pre, groups, x, shift=b_pre), the groups shared
    with the decoder's backward through a `SharedGrouping`.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, k: int, backend: Backend, sparse_grad: bool, mask, grouping):
        bias = b_enc if mask is None else b_enc.masked_fill(~mask, float("-inf"))
        with _autocast_off(x.device):
            vals, idx = backend.topk_encode(x, W_enc, bias, k, b_pre)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(x, W_enc, b_pre, vals, idx)
        grouping = grouping if grouping is not None else SharedGrouping()
        grouping.bind(vals, idx, W_enc.shape[0])
        ctx.backend, ctx.sparse_grad, ctx.b_enc_like, ctx.grouping = backend, sparse_grad, b_enc, grouping
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, _grad_idx):
        with _autocast_off(grad_vals.device):
            return TopKEncode._backward(ctx, grad_vals)

    @staticmethod
    def _backward(ctx, grad_vals):
        x, W_enc, b_pre, vals, idx = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _selection_grads(ctx, x, W_enc, b_pre, vals, idx, grad_vals, ctx.grouping, need[:4])
        return (*grads, None, None, None, None, None)


def _selection_grads(ctx, x, W_enc, b_pre, vals, idx, grad_vals, grouping: SharedGrouping, need):
    """(grad_x, grad_W_enc, grad_b_enc, grad_b_pre) of one selection (vals, idx) [B, k], each None where
    ``need`` (four bools, in that order) is False; see `TopKEncode`."""
    backend = ctx.backend
    grad_pre = torch.where(vals > 0, grad_vals.to(math_dtype(x)), 0.0).contiguous()
    grad_x = grad_W = grad_b = grad_b_pre = None
    if need[0] or need[3]:
        grad_x = backend.gather_rows(grad_pre, idx, W_enc)
        grad_b_pre = (-grad_x.sum(0)).to(b_pre.dtype) if b_pre is not None and need[3] else None
        grad_x = grad_x.to(x.dtype) if need[0] else None
    if need[1] or need[2]:
        groups = grouping.groups()
        grad_W_rows, grad_b_rows = backend.segment_rows(grad_pre, groups, x, shift=b_pre)
        grad_W = _row_gradient(W_enc, groups, grad_W_rows, ctx.sparse_grad) if need[1] else None
        grad_b = _row_gradient(ctx.b_enc_like, groups, grad_b_rows, ctx.sparse_grad) if need[2] else None
    return grad_x, grad_W, grad_b, grad_b_pre


class BatchEncode(TopKEncode):
    """`TopKEncode` with a selection across the batch (`flashsae.kernels.batch_select`): BatchTopK or
    JumpReLU. The (vals, idx) it makes are zero-padded rows; the backward is `TopKEncode`'s."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, select, backend: Backend, sparse_grad: bool, mask, grouping):
        with _autocast_off(x.device):
            vals, idx = select(backend.topk_encode, x, W_enc, b_enc, b_pre)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(x, W_enc, b_pre, vals, idx)
        grouping = grouping if grouping is not None else SharedGrouping()
        grouping.bind(vals, idx, W_enc.shape[0])
        ctx.backend, ctx.sparse_grad, ctx.b_enc_like, ctx.grouping = backend, sparse_grad, b_enc, grouping
        return vals, idx


def _encoder_with_aux(backend: Backend, aux_k: int, dead: torch.Tensor, found: list):
    """An encoder with `Backend.topk_encode`'s signature that also appends to ``found`` the top-``aux_k``
    among the ``dead`` features of each call: from the same pass where the backend folds them
    (`Backend.topk_encode_with_aux`), else from a second pass with the dead features as the mask."""

    def encode(x, W_enc, b_enc, k, b_pre):
        if backend.folds_aux:
            vals, idx, aux_vals, aux_idx = backend.topk_encode_with_aux(x, W_enc, b_enc, k, aux_k, dead, b_pre)
        else:
            vals, idx = backend.topk_encode(x, W_enc, b_enc, k, b_pre)
            aux_vals, aux_idx = backend.topk_encode(x, W_enc, b_enc.masked_fill(~dead, float("-inf")), aux_k, b_pre)
        found.append((aux_vals, aux_idx))
        return vals, idx

    return encode


class EncodeWithAux(torch.autograd.Function):
    """A selection (`TopKEncode`'s per token, or `BatchEncode`'s across the batch) and AuxK's per-token
    top-aux_k among the dead features, from one encoder pass.

    Backward: the main selection's as `TopKEncode` (x, W_enc, b_enc, b_pre). The auxiliary one's
    reaches W_enc and b_enc only (AuxK holds x and b_pre constant): segment_rows over its own pairs,
    grouped once by ``aux_grouping`` and shared with its decode; the two add (as parts of one
    `RowGrad` under ``sparse_grad``, never a dense F x d tensor).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, select, aux_k: int, dead, backend: Backend, sparse_grad: bool,
                grouping, aux_grouping):
        found: list = []
        with _autocast_off(x.device):
            vals, idx = select(_encoder_with_aux(backend, aux_k, dead, found), x, W_enc, b_enc, b_pre)
        (aux_vals, aux_idx), = found
        ctx.mark_non_differentiable(idx, aux_idx)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, W_enc, b_pre, vals, idx, aux_vals, aux_idx)
        n_features = W_enc.shape[0]
        grouping = grouping if grouping is not None else SharedGrouping()
        aux_grouping = aux_grouping if aux_grouping is not None else SharedGrouping()
        grouping.bind(vals, idx, n_features)
        aux_grouping.bind(aux_vals, aux_idx, n_features)
        ctx.backend, ctx.sparse_grad, ctx.b_enc_like = backend, sparse_grad, b_enc
        ctx.grouping, ctx.aux_grouping, ctx.device = grouping, aux_grouping, x.device
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, grad_vals, _grad_idx, grad_aux_vals, _grad_aux_idx):
        with _autocast_off(ctx.device):
            return EncodeWithAux._backward(ctx, grad_vals, grad_aux_vals)

    @staticmethod
    def _backward(ctx, grad_vals, grad_aux_vals):
        x, W_enc, b_pre, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        grads = [None] * 4
        if grad_vals is not None:
            grads = list(_selection_grads(ctx, x, W_enc, b_pre, vals, idx, grad_vals, ctx.grouping, need))
        if grad_aux_vals is not None and (need[1] or need[2]):
            aux = _selection_grads(ctx, x, W_enc, b_pre, aux_vals, aux_idx, grad_aux_vals, ctx.aux_grouping,
                                   (False, need[1], need[2], False))
            for i in (1, 2):
                grads[i] = _add_gradients(grads[i], aux[i])
        return (*grads, None, None, None, None, None, None, None)


def _add_gradients(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b for two gradients of one parameter (two `RowGrad`s: one with both's parts)."""
    return b if a is None else a if b is None else a + b


class SparseDecode(torch.autograd.Function):
    """sum_j vals[:, j] * W_dec[idx[:, j]] + b_dec; backward touches only the rows that fired.

    Forward: gather_rows(vals, idx, W_dec, bias=b_dec) into an output of W_dec's dtype. Backward:
    grad_vals = row_dots(grad_out, idx, W_dec), the rows of W_dec that fired from
    segment_rows(vals, groups, grad_out) (groups of vals > 0, shared with the encoder when it was
    given the same `SharedGrouping`), grad_b_dec = grad_out.sum(0).
    """

    @staticmethod
    def forward(ctx, vals, idx, W_dec, b_dec, backend: Backend, sparse_grad: bool, grouping):
        out = torch.empty(idx.shape[0], W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
        with _autocast_off(W_dec.device):
            x_hat = backend.gather_rows(vals, idx, W_dec, b_dec, out=out)
        ctx.save_for_backward(vals, idx, W_dec)
        if grouping is None:
            grouping = SharedGrouping()
            grouping.bind(vals, idx, W_dec.shape[0])
        ctx.backend, ctx.sparse_grad, ctx.grouping = backend, sparse_grad, grouping
        return x_hat

    @staticmethod
    def backward(ctx, grad_out):
        with _autocast_off(grad_out.device):
            return SparseDecode._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        vals, idx, W_dec = ctx.saved_tensors
        backend, need = ctx.backend, ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_vals = backend.row_dots(grad_out, idx, W_dec).to(vals.dtype) if need[0] else None
        grad_W = None
        if need[2]:
            groups = ctx.grouping.groups()
            grad_rows, _ = backend.segment_rows(vals, groups, grad_out)
            grad_W = _row_gradient(W_dec, groups, grad_rows, ctx.sparse_grad)
        grad_b = grad_out.sum(0, dtype=math_dtype(W_dec)).to(W_dec.dtype) if need[3] else None
        return grad_vals, None, grad_W, grad_b, None, None, None


class NestedDecode(torch.autograd.Function):
    """The G nested reconstructions of one selection: ``out[i] = b_dec + sum over slots of level <= i
    of vals[t, j] * W_dec[idx[t, j]]`` (Matryoshka prefixes; the last one is the whole decode).

    Forward: one gather_rows per level over that level's slots (the others masked to zero), summed
    in fp32 as a running prefix. Backward: each slot's gradient vector is the sum of the output
    gradients of every level that contains it, ``ghat[g] = sum_{i >= g} grad_out[i]`` (a reverse
    prefix sum), so per level: grad_vals from row_dots(ghat[g], idx, W_dec) on its slots and the rows
    of W_dec from segment_rows(vals of its slots, groups, ghat[g]), all on the selection's one
    grouping (shared with the encoder through a `SharedGrouping`).
    """

    @staticmethod
    def forward(ctx, vals, idx, level, n_levels: int, W_dec, b_dec, backend: Backend, sparse_grad: bool, grouping):
        out = torch.empty(n_levels, idx.shape[0], W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
        acc = b_dec.to(math_dtype(W_dec)).expand(idx.shape[0], -1)
        with _autocast_off(W_dec.device):
            for g in range(n_levels):
                acc = acc + backend.gather_rows(torch.where(level == g, vals, 0).contiguous(), idx, W_dec)
                out[g] = acc
        ctx.save_for_backward(vals, idx, level, W_dec)
        if grouping is None:
            grouping = SharedGrouping()
            grouping.bind(vals, idx, W_dec.shape[0])
        ctx.n_levels, ctx.backend, ctx.sparse_grad, ctx.grouping = n_levels, backend, sparse_grad, grouping
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with _autocast_off(grad_out.device):
            return NestedDecode._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        vals, idx, level, W_dec = ctx.saved_tensors
        backend, need = ctx.backend, ctx.needs_input_grad
        math = math_dtype(W_dec)
        ghat = grad_out.to(math).flip(0).cumsum(0).flip(0)  # [G, B, d]: sum over the levels >= g
        grad_vals = torch.zeros(vals.shape, dtype=math, device=vals.device) if need[0] else None
        grad_rows = None
        groups = ctx.grouping.groups() if need[4] else None
        for g in range(ctx.n_levels):
            mine = level == g
            ghat_g = ghat[g].contiguous()
            if need[0]:
                grad_vals += torch.where(mine, backend.row_dots(ghat_g, idx, W_dec), 0.0)
            if need[4]:
                rows_g, _ = backend.segment_rows(torch.where(mine, vals, 0).contiguous(), groups, ghat_g)
                grad_rows = rows_g if grad_rows is None else grad_rows + rows_g
        grad_W = _row_gradient(W_dec, groups, grad_rows, ctx.sparse_grad) if need[4] else None
        grad_b = grad_out.sum((0, 1), dtype=math).to(W_dec.dtype) if need[5] else None
        return (grad_vals.to(vals.dtype) if need[0] else None, None, None, None, grad_W, grad_b, None, None, None)


def nested_levels(idx: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The Matryoshka level of each slot: the first i with ``idx < widths[i]`` ([B, k] int64; widths
    [G] int64 ascending, the last > every idx)."""
    return torch.searchsorted(widths, idx, right=True)


def _check_encoder(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor | None
) -> torch.Tensor | None:
    """Check an encoder's inputs (x [B, d], W_enc [F, d], b_enc [F], b_pre [d] or None: one float dtype and
    device); returns b_pre contiguous."""
    require_float_tensor("x", x, 2, OP_DTYPES)
    require_float_tensor("W_enc", W_enc, 2, OP_DTYPES)
    require_like("W_enc", W_enc, "x", x)
    n_features, d = W_enc.shape
    if x.shape[1] != d:
        raise ValueError(f"x has {x.shape[1]} columns but W_enc [F, d] has d={d}")
    require_float_tensor("b_enc", b_enc, 1, OP_DTYPES)
    require_like("b_enc", b_enc, "x", x)
    require_shape("b_enc", b_enc, (n_features,))
    if b_pre is not None:
        require_float_tensor("b_pre", b_pre, 1, OP_DTYPES)
        require_like("b_pre", b_pre, "x", x)
        require_shape("b_pre", b_pre, (d,))
        b_pre = b_pre.contiguous()
    return b_pre


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    b_pre: torch.Tensor | None = None,
    backend: str = "auto",
    sparse_grad: bool = False,
    mask: torch.Tensor | None = None,
    grouping: SharedGrouping | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per row, never forming the [B, F] matrix.

    x: [B, d] (B may be 0), W_enc: [F, d], b_enc: [F], b_pre: [d] or None; one dtype of fp32 |
    bf16 | fp16 (or float64 on the torch backend), one device; accumulation is fp32 (float64 for
    float64). 1 <= k <= F. Returns vals [B, k] in x's dtype, sorted descending, and idx [B, k]
    int64 (ties to the lower feature index; rows with fewer than k positive values are filled
    with zeros at the lowest unchosen indices). Differentiable w.r.t. x, W_enc, b_enc, b_pre.
    Non-contiguous inputs are copied to contiguous ones.

    ``mask`` (bool [F]): select only among the features where it is True (the others count as
    -inf before the ReLU, so they can fill a row's zero slots but never fire; AuxK's dead features).
    ``grouping``: a `SharedGrouping` to bind to this selection and share with its `sparse_decode`.

    NaN policy: inside every backend a NaN pre-activation counts as -inf (a zero after the ReLU,
    never a firing feature). ``check_finite`` (default True) first checks x for NaN / Inf and
    raises a ValueError naming the first bad row; that check reads x on the host (a device sync
    on a GPU), so callers with a deferred check of their own pass ``check_finite=False``.
    """
    b_pre = _check_encoder(x, W_enc, b_enc, b_pre)
    n_features = W_enc.shape[0]
    require_k(k, n_features)
    if mask is not None:
        _require_feature_mask("mask", mask, x, n_features)
    kernels = get_backend(backend, x.device)
    _require_backend_dtype("x", x, kernels)
    if check_finite:
        require_finite_rows("x", x)
    return TopKEncode.apply(
        x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_pre, k, kernels, sparse_grad, mask, grouping
    )


def topk_encode_with_aux(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    aux_k: int,
    dead: torch.Tensor,
    *,
    b_pre: torch.Tensor | None = None,
    batch_topk: bool = False,
    backend: str = "auto",
    sparse_grad: bool = False,
    grouping: SharedGrouping | None = None,
    aux_grouping: SharedGrouping | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_encode` (or, with ``batch_topk``, `batch_topk_encode`) and AuxK's selection, from one encoder pass.

    Returns (vals, idx) as the main op returns them (the top-k over every feature; dead ones take
    part as usual) and (aux_vals [B, aux_k] in x's dtype, aux_idx [B, aux_k] int64): per token, the
    top-``aux_k`` of ``relu((x - b_pre) @ W_enc.T + b_enc)`` among the features where ``dead``
    (bool [F]) is True, exactly `topk_encode` with ``mask=dead`` (ties to the lower index; rows
    with fewer than aux_k positive dead features end in zeros at the lowest unchosen indices).
    Backends that fold AuxK (`flashsae.kernels.registry.Backend.folds_aux`: "torch" and "triton")
    take both from the same pre-activations, one GEMM over W_enc; "triton-fused" runs a second,
    masked pass. Inputs, dtypes, NaN policy and ``check_finite`` as `topk_encode`; 1 <= aux_k <= F.

    Differentiable: the main pair as its op; aux_vals w.r.t. W_enc and b_enc only (x and b_pre are
    constants for AuxK). ``grouping`` / ``aux_grouping``: `SharedGrouping`s bound to each pair, for
    their `sparse_decode`s.
    """
    b_pre = _check_encoder(x, W_enc, b_enc, b_pre)
    n_features = W_enc.shape[0]
    require_k(k, n_features)
    require_k(aux_k, n_features, name="aux_k")
    _require_feature_mask("dead", dead, x, n_features)
    kernels = get_backend(backend, x.device)
    _require_backend_dtype("x", x, kernels)
    if check_finite:
        require_finite_rows("x", x)
    if batch_topk:
        candidates = candidate_count(k, n_features)

        def select(encode, x, W, b, pre):
            return batch_select.batch_topk(encode, x, W, b, k, pre, candidates=candidates)
    else:
        def select(encode, x, W, b, pre):
            return encode(x, W, b, k, pre)

    return EncodeWithAux.apply(x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_pre, select, aux_k,
                               dead, kernels, sparse_grad, grouping, aux_grouping)


def _require_feature_mask(name: str, mask: object, x: torch.Tensor, n_features: int) -> None:
    """TypeError / ValueError naming ``name`` unless ``mask`` is a bool [F] tensor on x's device."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    require_shape(name, mask, (n_features,))
    require_like(name, mask, "x", x, dtype=False)


def batch_topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    b_pre: torch.Tensor | None = None,
    backend: str = "auto",
    sparse_grad: bool = False,
    grouping: SharedGrouping | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK: the B * k largest entries of ``relu((x - b_pre) @ W_enc.T + b_enc)`` over the whole batch,
    never forming the [B, F] matrix (`flashsae.kernels.batch_select.batch_topk`).

    Inputs as `topk_encode`. Only positive entries are chosen (all of them when fewer than B * k
    are positive); ties at the (B k)-th value go to the lower (row, feature) index, rows first.
    Returns zero-padded rows: vals [B, k_max] in x's dtype (each row descending) and idx [B, k_max]
    int64, k_max the largest row's count this batch (rows short of it end in zeros at their lowest
    unchosen features). Differentiable as `topk_encode` (the chosen entries' gradients only); reads
    the device for its data-dependent sizes. NaN policy and ``check_finite`` as `topk_encode`.
    """
    b_pre = _check_encoder(x, W_enc, b_enc, b_pre)
    require_k(k, W_enc.shape[0])
    candidates = candidate_count(k, W_enc.shape[0])

    def select(encode, x, W, b, pre):
        return batch_topk(encode, x, W, b, k, pre, candidates=candidates)

    return _batch_encode(x, W_enc, b_enc, b_pre, select, backend, sparse_grad, grouping, check_finite)


def threshold_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: float | torch.Tensor,
    *,
    b_pre: torch.Tensor | None = None,
    k_hint: int = 32,
    backend: str = "auto",
    sparse_grad: bool = False,
    grouping: SharedGrouping | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU: every entry of ``(x - b_pre) @ W_enc.T + b_enc`` strictly above ``threshold`` (a number
    >= 0, or a 0-d tensor), never forming the [B, F] matrix (`flashsae.kernels.batch_select.above_threshold`).

    Inputs as `topk_encode`; ``k_hint``: about how many fire per row (the per-row candidates are a few
    times it; any value is exact, a close one is fastest). Returns zero-padded rows as
    `batch_topk_encode`. Differentiable as `topk_encode`; NaN policy and ``check_finite`` as `topk_encode`.
    """
    b_pre = _check_encoder(x, W_enc, b_enc, b_pre)
    value = float(threshold)
    require_number("threshold", value, 0.0)
    require_int("k_hint", k_hint)
    candidates = candidate_count(min(k_hint, W_enc.shape[0]), W_enc.shape[0])

    def select(encode, x, W, b, pre):
        return above_threshold(encode, x, W, b, value, pre, candidates=candidates)

    return _batch_encode(x, W_enc, b_enc, b_pre, select, backend, sparse_grad, grouping, check_finite)


def _batch_encode(x, W_enc, b_enc, b_pre, select, backend: str, sparse_grad: bool, grouping, check_finite: bool):
    """`BatchEncode` of checked inputs (contiguous) with ``select`` on the ``backend`` of x's device."""
    kernels = get_backend(backend, x.device)
    _require_backend_dtype("x", x, kernels)
    if check_finite:
        require_finite_rows("x", x)
    return BatchEncode.apply(x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_pre, select,
                             kernels, sparse_grad, None, grouping)


def require_finite_rows(name: str, x: torch.Tensor) -> None:
    """ValueError naming ``name`` and its first row holding NaN or Inf (x [B, d]); reads x on the host."""
    bad = ~torch.isfinite(x).all(dim=1)
    if x.shape[0] and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} row {row} contains NaN or Inf; the encoder needs finite inputs "
            "(check_finite=False skips this check)"
        )


def _require_backend_dtype(name: str, t: torch.Tensor, kernels: Backend) -> None:
    """TypeError naming ``name`` when ``kernels`` does not take ``t``'s dtype (float64 off the torch backend)."""
    if t.dtype not in kernels.float_dtypes:
        allowed = ", ".join(dtype_name(d) for d in kernels.float_dtypes)
        raise TypeError(f"{name} is {dtype_name(t.dtype)}, which backend {kernels.name!r} does not take "
                        f"(it takes {allowed}); float64 runs on backend='torch'")


def sparse_decode(
    vals: torch.Tensor,
    idx: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    backend: str = "auto",
    sparse_grad: bool = False,
    grouping: SharedGrouping | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """``x_hat = sum_j vals[:, j, None] * W_dec[idx[:, j]] + b_dec`` as a gather, fp32 accumulation.

    vals: [B, k] (B may be 0) and W_dec: [F, d], b_dec: [d] of one dtype (fp32 | bf16 | fp16, or
    float64 on the torch backend); idx: [B, k] int64 with entries in [0, F). Returns x_hat [B, d] in
    W_dec's dtype. Differentiable w.r.t. vals, W_dec, b_dec. Indices are checked on the host only for CPU tensors (a device check
    would synchronize), and only with ``check_indices`` (callers passing an encoder's own idx
    skip it). ``grouping``: the `SharedGrouping` given to the `topk_encode` that made (vals, idx).
    """
    require_float_tensor("vals", vals, 2, OP_DTYPES)
    require_float_tensor("W_dec", W_dec, 2, OP_DTYPES)
    require_like("W_dec", W_dec, "vals", vals)
    require_float_tensor("b_dec", b_dec, 1, OP_DTYPES)
    require_like("b_dec", b_dec, "vals", vals)
    require_shape("b_dec", b_dec, (W_dec.shape[1],))
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"idx must be an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    require_shape("idx", idx, tuple(vals.shape))
    require_like("idx", idx, "vals", vals, dtype=False)
    if check_indices and idx.device.type == "cpu" and idx.numel() and (idx.min() < 0 or idx.max() >= W_dec.shape[0]):
        raise ValueError(f"idx entries must lie in [0, {W_dec.shape[0]}), got [{idx.min()}, {idx.max()}]")
    if grouping is not None and not grouping.matches(vals, idx):
        raise ValueError("grouping is bound to another selection: give sparse_decode the encoder's own (vals, idx)")
    kernels = get_backend(backend, vals.device)
    _require_backend_dtype("vals", vals, kernels)
    return SparseDecode.apply(
        vals.contiguous(), idx.contiguous(), W_dec.contiguous(), b_dec.contiguous(), kernels, sparse_grad, grouping
    )


def sparse_decode_nested(
    vals: torch.Tensor,
    idx: torch.Tensor,
    level: torch.Tensor,
    n_levels: int,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    backend: str = "auto",
    sparse_grad: bool = False,
    grouping: SharedGrouping | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """The nested (Matryoshka) decodes of one selection: [G, B, d] with
    ``out[i] = b_dec + sum_{j: level[:, j] <= i} vals[:, j, None] * W_dec[idx[:, j]]``.

    vals, idx: as `sparse_decode`; level [B, k] int64 in [0, n_levels): the first prefix each slot
    belongs to (`nested_levels` of idx and the prefix widths). The last level is `sparse_decode`'s
    x_hat (up to the summation order). Never forms a [B, F] matrix; costs G decodes forward and G
    row_dots / segment_rows backward, on one grouping of the fired pairs. Differentiable w.r.t.
    vals, W_dec, b_dec; gradients as in `sparse_decode` (``sparse_grad``: a `RowGrad` for W_dec).
    """
    require_float_tensor("vals", vals, 2, OP_DTYPES)
    require_float_tensor("W_dec", W_dec, 2, OP_DTYPES)
    require_like("W_dec", W_dec, "vals", vals)
    require_float_tensor("b_dec", b_dec, 1, OP_DTYPES)
    require_like("b_dec", b_dec, "vals", vals)
    require_shape("b_dec", b_dec, (W_dec.shape[1],))
    for name, t in (("idx", idx), ("level", level)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        require_shape(name, t, tuple(vals.shape))
        require_like(name, t, "vals", vals, dtype=False)
    require_int("n_levels", n_levels)
    if check_indices and idx.device.type == "cpu" and idx.numel():
        if idx.min() < 0 or idx.max() >= W_dec.shape[0]:
            raise ValueError(f"idx entries must lie in [0, {W_dec.shape[0]}), got [{idx.min()}, {idx.max()}]")
        if level.min() < 0 or level.max() >= n_levels:
            raise ValueError(f"level entries must lie in [0, {n_levels}), got [{level.min()}, {level.max()}]")
    if grouping is not None and not grouping.matches(vals, idx):
        raise ValueError("grouping is bound to another selection: give the encoder's own (vals, idx)")
    kernels = get_backend(backend, vals.device)
    _require_backend_dtype("vals", vals, kernels)
    return NestedDecode.apply(vals.contiguous(), idx.contiguous(), level.contiguous(), n_levels, W_dec.contiguous(),
                              b_dec.contiguous(), kernels, sparse_grad, grouping)
