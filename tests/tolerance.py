"""Error bounds derived from the dtype and the computation, element by element.

A value computed from inputs of one dtype with fp32 accumulation (all of flashsae's ops) differs
from the float64 computation on the same (already rounded) inputs by at most

    (roundings * u(dtype) + terms * u(fp32)) * magnitude

where ``magnitude`` is the same computation on the inputs' absolute values (every product and
sum taken with absolute values: the size of the terms, not of their possibly cancelling sum),
``roundings`` counts the times an intermediate or the result is rounded to the dtype on the way
(each a relative error of at most u, the unit roundoff) and ``terms`` bounds the length of the
fp32 sums. Products of bf16 or fp16 values are exact in fp32, so only the sums and the roundings
count. Such a bound is tight enough that a dropped term, a wrong sign or a missing shift fails
wherever its term is more than a few units of rounding of the element.
"""
from __future__ import annotations

import os

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FP32_UNIT = UNIT_ROUNDOFF[torch.float32]


def store_roundings(backend: str, dtype: torch.dtype) -> int:
    """How many roundings one fp32 -> ``dtype`` store inside a ``backend`` kernel counts for: Triton's
    interpreter converts fp32 to bf16 by truncation (an error of up to a whole unit, two roundings'
    worth); compiled kernels and torch round to nearest."""
    truncates = backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return 2 if truncates else 1


def rounding_bound(magnitude: torch.Tensor, dtype: torch.dtype, *, roundings: int, terms: int) -> torch.Tensor:
    """float64 bound on |computed - exact| per element (see the module docstring)."""
    return magnitude.double() * (roundings * UNIT_ROUNDOFF[dtype] + terms * FP32_UNIT)


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|got - ref| <= bound element by element (shapes equal, got finite); the message names the worst element."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite entries"
    if not got.numel():
        return
    err = (got.double() - ref.double()).abs()
    excess = err - bound.double()
    worst = int(excess.argmax())
    if excess.reshape(-1)[worst] > 0:
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got.shape))
        raise AssertionError(
            f"{what}: error {err.reshape(-1)[worst]:.3g} > bound {bound.reshape(-1)[worst].item():.3g} at {at} "
            f"(got {got.reshape(-1)[worst].item():.6g}, expected {ref.reshape(-1)[worst].item():.6g}); "
            f"{int((excess > 0).sum())} of {got.numel()} elements out of bounds"
        )


def assert_topk_selection(
    vals: torch.Tensor, idx: torch.Tensor, pre: torch.Tensor, error: torch.Tensor, k: int, min_clear: float = 0.5
) -> None:
    """A top-k choice against the float64 pre-activations ``pre`` [B, F] of the same rounded inputs, whose
    computed values may each be off by at most ``error`` [B, F] (fp32 accumulation).

    The chosen features' true values are the top k up to that error, every feature clearly above the
    k-th is chosen, and on every row whose top k + 1 values are separated by more than twice the error
    (where nothing within rounding decides) the indices equal the float64 ranking exactly, order and
    ties-to-the-lower-index included; at least ``min_clear`` of the rows must be such rows.
    """
    n_tokens = pre.shape[0]
    assert vals.shape == idx.shape == (n_tokens, k) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < pre.shape[1])).all(), "index out of range"
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "a feature was selected twice"
    order = torch.sort(pre, dim=1, descending=True, stable=True)
    top_vals, top_idx = order.values[:, : k + 1], order.indices[:, :k]
    slack = 2 * error.max(dim=1, keepdim=True).values
    chosen = pre.gather(1, idx)
    gap = (chosen.sort(dim=1, descending=True).values - top_vals[:, :k]).abs()
    assert (gap <= slack).all(), f"the selection misses a better feature by {gap.max():.3g}"
    clear_above = pre > top_vals[:, k - 1 : k] + slack
    picked = torch.zeros_like(clear_above).scatter_(1, idx, True)
    assert (picked | ~clear_above).all(), "a clearly larger feature was not selected"
    # Zeros (the ReLU's floor) are exact: ties among them always go to the lower index.
    separated = ((top_vals[:, :-1] - top_vals[:, 1:] > slack) | (top_vals[:, :-1] == 0)).all(dim=1)
    assert separated.float().mean() >= min_clear, f"only {int(separated.sum())} of {n_tokens} rows are clear of ties"
    mismatch = separated & (idx != top_idx).any(dim=1)
    assert not mismatch.any(), f"rows {mismatch.nonzero().flatten().tolist()} differ from the float64 ranking"
