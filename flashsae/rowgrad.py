"""`RowGrad`: a parameter's gradient held as the few rows that are not zero, in float32.

``sparse_grad=True`` ops return one for W_enc, b_enc and W_dec. To autograd, ``param.grad`` and
every optimizer it looks like a tensor of the parameter's shape and dtype; inside it holds parts
``(rows [R] int64, values [R, ...] float32, valid [R] bool)``: the gradient is the sum over parts
of ``values[i]`` at row ``rows[i]`` for every i. Sizes are fixed by the batch (R = min(B * k, F)),
so producing one never waits on the device: slots that hold no row are padding (``valid`` False,
row 0, values 0: every producer keeps to this), and a part's valid rows are distinct.

- The values stay float32 whatever the parameter's dtype (float64 for a float64 parameter, whose
  ops compute in float64): autograd would cast a plain tensor
  gradient to a bf16 parameter's dtype (a full pass over U x d, and rounding the optimizer then
  reads back); `flashsae.optim.SparseAdam` reads them as they are.
- Gradients that add up (AuxK plus the main loss, two uses of one parameter) become parts of one
  `RowGrad`; `coalesce` merges them (one sort of the row lists, no host sync).
- Anything else (``torch.optim.Adam``, ``clip_grad_norm_``, printing) sees the dense gradient in
  the parameter's dtype, materialized on use (`to_dense`). In-place changes other than scaling and
  zeroing raise, rather than being silently lost.

`write_rows_` is the masked row write the optimizer and the decoder upkeep share.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_map

from .kernels.pairs import unique_rows

aten = torch.ops.aten

class RowPart(NamedTuple):
    """rows [R] int64, values [R, *row shape] float32, valid [R] bool (see `RowGrad`)."""

    rows: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor


class RowGrad(torch.Tensor):
    """A gradient of ``like``'s shape and dtype that is zero outside the rows its parts name (see module)."""

    parts: tuple[RowPart, ...]
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, like: torch.Tensor, parts: Sequence[RowPart] = ()) -> "RowGrad":
        grad = torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device)
        grad.parts = tuple(parts)
        return grad

    def __init__(self, like: torch.Tensor, parts: Sequence[RowPart] = ()) -> None:
        super().__init__()

    @classmethod
    def of(cls, like: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> "RowGrad":
        """The gradient of ``like`` [n, ...] that is ``values[i]`` at ``rows[i]`` where ``valid[i]`` (rows distinct there)."""
        return cls(like, [RowPart(rows, values, valid)])

    def __repr__(self) -> str:
        return f"RowGrad(shape={tuple(self.shape)}, dtype={self.dtype}, parts={len(self.parts)})"

    def _like(self, parts: Sequence[RowPart]) -> "RowGrad":
        return RowGrad(self, parts)

    # ------------------------------------------------------------------------------ reading it
    def coalesce(self) -> "RowGrad":
        """One part with distinct valid rows, sorted ascending (itself when it has one part already)."""
        if len(self.parts) == 1:
            return self
        if not self.parts:
            return self._like([_empty_part(self)])
        n_rows = self.shape[0] if self.dim() else 1
        rows = torch.cat([p.rows for p in self.parts])
        union, valid = unique_rows(rows, torch.cat([p.valid for p in self.parts]), n_rows)
        total = torch.zeros((union.shape[0], *self.row_shape), dtype=value_dtype(self), device=self.device)
        last = max(union.shape[0] - 1, 0)
        for part in self.parts:  # one part at a time: distinct positions within each, so the sums are deterministic
            total.index_add_(0, torch.searchsorted(union, part.rows).clamp_(max=last), part.values)
        return self._like([RowPart(torch.where(valid, union, 0), total, valid)])

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one row: ``shape[1:]`` ([] for a 1-D parameter)."""
        return tuple(self.shape[1:])

    def rows_values_valid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [R], values [R, ...] float32, valid [R]) of the coalesced gradient."""
        return tuple(self.coalesce().parts[0])  # type: ignore[return-value]

    def to_dense(self, dtype: torch.dtype | None = None, **_: Any) -> torch.Tensor:
        """The gradient as a plain tensor, in the parameter's dtype (or ``dtype``), rounded once."""
        rows, values, _valid = self.rows_values_valid()
        dense = torch.zeros(self.shape, dtype=dtype or self.dtype, device=self.device)
        # Padding slots add zeros to row 0; valid rows are distinct, so each is rounded once.
        return dense.index_put_((rows,), values.to(dense.dtype), accumulate=True)

    # --------------------------------------------------------------------------- changing it
    def map_values(self, fn) -> "RowGrad":
        """A `RowGrad` with ``fn(rows, values) -> values`` applied to every part (rows and validity kept)."""
        return self._like([RowPart(r, fn(r, v), m) for r, v, m in self.parts])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if any(isinstance(a, RowGrad) for a in _written_args(func, args, kwargs)):
            raise RuntimeError(
                f"{func} would change a RowGrad (a sparse_grad=True gradient) in place; it supports only "
                "+= another gradient, scaling by a number and zeroing. Use sparse_grad=False for dense gradients."
            )
        dense = lambda t: t.to_dense() if isinstance(t, RowGrad) else t  # noqa: E731
        return func(*tree_map(dense, args), **tree_map(dense, kwargs))


def value_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype of a `RowGrad`'s values for a parameter like ``like``: float32, or float64 for float64."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _empty_part(like: RowGrad) -> RowPart:
    empty = torch.empty(0, dtype=torch.int64, device=like.device)
    values = torch.empty((0, *like.row_shape), dtype=value_dtype(like), device=like.device)
    return RowPart(empty, values, empty.bool())


def _written_args(func, args, kwargs) -> list[Any]:
    """The arguments ``func`` writes to (its schema's mutable ones)."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written.extend(value if isinstance(value, (list, tuple)) else [value])
    return written


def _scale(grad: RowGrad, factor: Any, invert: bool = False) -> RowGrad:
    if isinstance(factor, RowGrad) or (isinstance(factor, torch.Tensor) and factor.numel() != 1):
        raise RuntimeError("a RowGrad can be scaled in place only by a number or a one-element tensor")
    if invert:
        factor = 1 / factor
    grad.parts = tuple(RowPart(r, v * factor, m) for r, v, m in grad.parts)
    return grad


def _add(a: Any, b: Any, alpha: Any = 1) -> Any:
    if isinstance(a, RowGrad) and isinstance(b, RowGrad) and alpha == 1:
        return a._like(a.parts + b.parts)
    return aten.add.Tensor(_dense(a), _dense(b), alpha=alpha)


def _add_(a: Any, b: Any, alpha: Any = 1) -> Any:
    if isinstance(a, RowGrad):
        if not isinstance(b, RowGrad) or alpha != 1:
            raise RuntimeError("a RowGrad can only accumulate another RowGrad in place")
        a.parts = a.parts + b.parts
        return a
    return aten.add_.Tensor(a, _dense(b), alpha=alpha)


def _copy_(dst: Any, src: Any, non_blocking: bool = False) -> Any:
    if isinstance(dst, RowGrad):
        if not isinstance(src, RowGrad):
            raise RuntimeError("only a RowGrad can be copied into a RowGrad")
        dst.parts = src.parts
        return dst
    return aten.copy_.default(dst, _dense(src), non_blocking)


def _dense(t: Any) -> Any:
    return t.to_dense() if isinstance(t, RowGrad) else t


def _zero_(grad: RowGrad) -> RowGrad:
    grad.parts = ()
    return grad


# The ops a RowGrad handles itself; autograd's accumulation (detach, add, add_, and the
# new_empty_strided + copy_ of its layout contract) stays compact.
_HANDLERS = {
    aten.detach.default: lambda g: g._like(g.parts),
    aten.alias.default: lambda g: g._like(g.parts),
    aten.clone.default: lambda g, **_: g._like([RowPart(*(t.clone() for t in p)) for p in g.parts]),
    aten.new_empty_strided.default: lambda g, *args, **kwargs: g._like([]),
    aten.copy_.default: _copy_,
    aten.add.Tensor: _add,
    aten.add_.Tensor: _add_,
    aten.mul_.Tensor: lambda g, f: _scale(g, f) if isinstance(g, RowGrad) else aten.mul_.Tensor(g, _dense(f)),
    aten.mul_.Scalar: lambda g, f: _scale(g, f),
    aten.div_.Tensor: lambda g, f: _scale(g, f, invert=True) if isinstance(g, RowGrad) else aten.div_.Tensor(g, _dense(f)),
    aten.div_.Scalar: lambda g, f: _scale(g, f, invert=True),
    aten.zero_.default: _zero_,
}


def write_rows_(dst: torch.Tensor, rows: torch.Tensor, new: torch.Tensor, valid: torch.Tensor | None) -> None:
    """``dst[rows[i]] = new[i]`` where ``valid[i]`` (every i when None); the other entries change nothing.

    dst [n, ...], rows [R] int64 (distinct where valid; entries that are not valid name row 0, the
    padding convention), new [R, ...] (cast to dst's dtype). One ``index_copy_``, exact and without
    host sync: every entry naming row 0 carries the same value (the valid row-0 entry's, or row 0's
    own), so whichever of them lands last, row 0 ends right.
    """
    new = new.to(dst.dtype)
    if valid is not None:
        at_zero = valid & (rows == 0)
        first = at_zero.to(torch.uint8).argmax()
        row0 = torch.where(at_zero.any(), new.index_select(0, first.view(1))[0], dst[0])  # no host read of first
        new = torch.where(valid.view(-1, *[1] * (new.dim() - 1)), new, row0)
    dst.index_copy_(0, rows, new)
