"""The kernel backends, declared once: a name -> factory table, and how a name resolves on a device.

A `Backend` is the set of primitives the ops (`flashsae.ops`) and the optimizer
(`flashsae.optim.SparseAdam`) are composed of; everything above this module is backend-agnostic.
Built-in backends:

- ``"torch"``: the chunked threshold encoder `flashsae.kernels.torch_encode` and the primitives of
  `flashsae.kernels.reference`; runs on any device (the CPU backend, and the oracle the Triton
  kernels are tested against; on the CPU its select and Adam step run in the C++ kernels of
  `flashsae.kernels.cpu_native` once built). The only backend that takes float64.
- ``"triton"``: the chunked encoder (`flashsae.kernels.chunked_encode`: cuBLAS GEMM per chunk of
  features + a Triton threshold select), the row kernels (`flashsae.kernels.rows`) and the sparse
  Adam kernel (`flashsae.kernels.sparse_adam`).
- ``"triton-fused"``: the fused encoder (`flashsae.kernels.fused_encode`: Triton GEMM tiles whose
  epilogue runs the same threshold select) with the same row and Adam kernels; opt-in. It does not
  fold AuxK's selection into its pass (``topk_encode_with_aux`` is None): with AuxK on, the dead
  features' top-k takes a second, masked encoder pass on this backend only.

Triton backends need CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, and are imported
on first use, so flashsae does not import triton while only the torch backend runs.

``"auto"`` is not a backend but a rule: "triton" (the chunked encoder) on CUDA tensors, torch
elsewhere. It picks the chunked encoder over the fused one until a GPU run shows the fused one
faster at some shape (no GPU measurement exists yet).

Adding a backend is one entry in `_TABLE`: a factory that builds its `Backend` (importing its
modules there, so nothing loads before first use) and whether it runs Triton. The two Triton
entries show the pattern: each assembles its encoder with the shared row and Adam modules.

To try one out, or to swap one for a test, use `override_backend`, a context manager that restores
the table on exit::

    fast = dataclasses.replace(get_backend("triton", device), topk_encode=my_encoder)
    with override_backend("triton", fast):
        ops.topk_encode(x, W_enc, b_enc, k, backend="triton")   # runs my_encoder

`register_backend` adds or replaces an entry for the rest of the process.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch

from ..checks import require_choice

AUTO = "auto"
# The float dtypes of the torch backend (the Triton backends take fp32 | bf16 | fp16).
FLOAT_DTYPES_WITH_FLOAT64 = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# What "auto" means: the backend for a device type, or AUTO_FALLBACK for every other device.
AUTO_BY_DEVICE_TYPE = {"cuda": "triton"}
AUTO_FALLBACK = "torch"


@dataclass(frozen=True)
class Backend:
    """The primitives a backend provides. Inputs are validated and contiguous (`flashsae.ops` and
    `SparseAdam` see to it); floats are of one dtype among ``float_dtypes`` (fp32 | bf16 | fp16,
    plus float64 on the torch backend), and math is fp32 (float64 for float64 inputs).
    B tokens (B may be 0), k slots per token, F features, d model width.

    ``topk_encode(x, W_enc, b_enc, k, b_pre) -> (vals, idx)``
        Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per token, never forming [B, F]. x [B, d],
        W_enc [F, d], b_enc [F], b_pre [d] or None, 1 <= k <= F. Returns vals [B, k] in x's dtype
        sorted descending and idx [B, k] int64: ties go to the lower feature index, a NaN
        pre-activation counts as -inf (a zero after the ReLU), and a token with fewer than k
        positive values fills up with zeros at the lowest unchosen indices (the order of
        `flashsae.kernels.keys`).
    ``gather_rows(coef, idx, W, bias=None, out=None) -> out``
        ``out[t] = sum_j coef[t, j] * W[idx[t, j]] (+ bias)``: coef [B, k], idx [B, k] int64,
        W [F, d], bias [d] or None. ``out`` defaults to a new fp32 [B, d] tensor; a given ``out``
        [B, d] is written in its own dtype and returned.
    ``row_dots(grad, idx, W) -> out``
        ``out[t, j] = <grad[t], W[idx[t, j]]>``: grad [B, d], idx [B, k] int64, W [F, d] -> [B, k] fp32.
    ``segment_rows(coef, groups, vecs, shift=None) -> (grad_rows, coef_sums)``
        Per-feature sums over the fired (token, slot) pairs of one selection: coef [B, k], groups a
        `flashsae.kernels.pairs.PairGroups` of that [B, k] selection (R = min(B k, F) row slots, its
        fired features first; computed once per step by `flashsae.kernels.pairs.group_pairs`, which
        every backend shares), vecs [B, d], shift [d] or None. ``grad_rows[u] = sum_{pairs of slot
        u} coef[t, j] * (vecs[t] - shift)`` [R, d] and coef_sums [R] in the math dtype, zeros in
        padding slots. Static sizes: it never waits on the device.
    ``sparse_adam_step_(param, grad, rows, valid, exp_avg, exp_avg_sq, step, *, low=None, lr, beta1, beta2, eps, unit_norm=False) -> None``
        One lazy Adam step, in place, on the touched rows of param [n, m] with moments exp_avg /
        exp_avg_sq [n, m] fp32 | bf16 and per-row step counts step [n] int64. grad [U, m] (fp32 or
        the param's dtype) holds the gradient of rows ``rows`` [U] int64 where ``valid`` [U] bool
        (None: every entry; valid rows distinct, the others are padding: row 0, zero gradient,
        changing nothing), or is [n, m] with rows=None (every row, or those where ``valid`` [n]).
        ``low`` [n, m] int16 with a bf16 param: the low bits of
        fp32 master weights (`flashsae.kernels.reference.join_master`), updated exactly. Untouched
        rows are neither read nor written; see `flashsae.optim.SparseAdam` for the math.

    ``topk_encode_with_aux(x, W_enc, b_enc, k, aux_k, dead, b_pre) -> (vals, idx, aux_vals, aux_idx)``
        ``topk_encode`` and, from the same pass over the pre-activations (no second GEMM over
        W_enc), the top-``aux_k`` among the features where ``dead`` (bool [F]) is True, the others
        counting as -inf before the ReLU (they fill a row's zero slots but never fire): aux_vals
        [B, aux_k] in x's dtype descending, aux_idx [B, aux_k] int64, in `topk_encode`'s order;
        1 <= aux_k <= F. None for a backend that does not fold the two: `flashsae.ops` then runs
        ``topk_encode`` a second time with the dead features as its mask.

    ``float_dtypes``: the float dtypes the primitives take.
    """

    name: str
    topk_encode: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    gather_rows: Callable[..., torch.Tensor]
    row_dots: Callable[..., torch.Tensor]
    segment_rows: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    sparse_adam_step_: Callable[..., None]
    float_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    topk_encode_with_aux: Callable[..., tuple[torch.Tensor, ...]] | None = None

    @property
    def folds_aux(self) -> bool:
        """Whether AuxK's dead-feature selection comes from the main encoder pass (one GEMM over W_enc)."""
        return self.topk_encode_with_aux is not None


BackendFactory = Callable[[], Backend]


@dataclass(frozen=True)
class _Entry:
    factory: BackendFactory
    # Triton backends need CUDA tensors, or TRITON_INTERPRET=1 for tensors on other devices.
    uses_triton: bool


def _assemble(
    name: str, encoder: ModuleType, rows: ModuleType, adam: ModuleType, *, folds_aux: bool = True, **extra
) -> Backend:
    """A `Backend` from the modules holding its primitives, under their interface names; ``folds_aux``:
    the encoder module has ``topk_encode_with_aux`` (AuxK's selection in the main pass)."""
    with_aux = encoder.topk_encode_with_aux if folds_aux else None
    return Backend(name, encoder.topk_encode, rows.gather_rows, rows.row_dots, rows.segment_rows,
                   adam.sparse_adam_step_, topk_encode_with_aux=with_aux, **extra)


def _torch_backend() -> Backend:
    from . import reference, torch_encode

    return _assemble("torch", torch_encode, reference, reference, float_dtypes=FLOAT_DTYPES_WITH_FLOAT64)


def _chunked_backend() -> Backend:
    from . import chunked_encode, rows, sparse_adam

    return _assemble("triton", chunked_encode, rows, sparse_adam)


def _fused_backend() -> Backend:
    from . import fused_encode, rows, sparse_adam

    # The fused kernel keeps one list per (token, range) in its GEMM epilogue; it does not fold AuxK.
    return _assemble("triton-fused", fused_encode, rows, sparse_adam, folds_aux=False)


# The one table of backends: name -> how to build it. Order is the order `backend_names` lists.
_TABLE: dict[str, _Entry] = {
    "torch": _Entry(_torch_backend, uses_triton=False),
    "triton": _Entry(_chunked_backend, uses_triton=True),
    "triton-fused": _Entry(_fused_backend, uses_triton=True),
}
_built: dict[str, Backend] = {}


def backend_names() -> tuple[str, ...]:
    """The names a ``backend`` argument accepts: "auto" and every registered backend."""
    return (AUTO, *_TABLE)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The registered backend that ``name`` runs on tensors of ``device``.

    "auto" is "triton" on CUDA tensors and torch elsewhere. A Triton backend on a non-CUDA device
    needs ``TRITON_INTERPRET=1``; ValueError (naming ``backend``) for that and for unknown names.
    """
    require_choice("backend", name, backend_names())
    device = torch.device(device)
    if name == AUTO:
        return AUTO_BY_DEVICE_TYPE.get(device.type, AUTO_FALLBACK)
    if _TABLE[name].uses_triton and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend={name!r} needs CUDA tensors (got device {device}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton to use the interpreter, or use backend='torch'"
        )
    return name


def get_backend(name: str, device: torch.device | str) -> Backend:
    """The `Backend` that ``name`` resolves to on ``device`` (built on first use, then cached)."""
    resolved = resolve_backend(name, device)
    if resolved not in _built:
        _built[resolved] = _TABLE[resolved].factory()
    return _built[resolved]


def register_backend(name: str, factory: BackendFactory, *, uses_triton: bool) -> None:
    """Add backend ``name`` (or replace it) for the rest of the process.

    ``factory()`` builds the `Backend` on first use; ``uses_triton`` says whether it needs CUDA
    tensors (or the interpreter). "auto" keeps its rule and never picks a new name.
    """
    if name == AUTO or not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string other than {AUTO!r}, got {name!r}")
    _TABLE[name] = _Entry(factory, uses_triton)
    _built.pop(name, None)


@contextmanager
def override_backend(
    name: str, backend: Backend | BackendFactory, *, uses_triton: bool | None = None
) -> Iterator[None]:
    """Within the block, ``name`` runs ``backend`` (a `Backend`, or a factory of one).

    ``uses_triton`` defaults to the overridden entry's (False for a new name). On exit the table
    and the cache are as they were, so tests never patch modules.
    """
    saved_entry, saved_built = _TABLE.get(name), _built.get(name)
    if uses_triton is None:
        uses_triton = saved_entry.uses_triton if saved_entry is not None else False
    factory = (lambda: backend) if isinstance(backend, Backend) else backend
    register_backend(name, factory, uses_triton=uses_triton)
    try:
        yield
    finally:
        _built.pop(name, None)
        if saved_entry is None:
            _TABLE.pop(name, None)
        else:
            _TABLE[name] = saved_entry
            if saved_built is not None:
                _built[name] = saved_built
