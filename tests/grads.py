"""Reading a sparse_grad=True gradient (a `flashsae.rowgrad.RowGrad`) in tests."""
from __future__ import annotations

import torch

from flashsae.rowgrad import RowGrad


def touched_rows(grad: torch.Tensor) -> torch.Tensor:
    """The rows a `RowGrad` names, ascending (a host-synchronizing read: tests only)."""
    assert isinstance(grad, RowGrad), type(grad)
    rows, _, valid = grad.rows_values_valid()
    return rows[valid]


def row_values(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, float32 values) of a `RowGrad`'s touched rows, ascending by row."""
    rows, values, valid = grad.rows_values_valid()
    assert values.dtype == torch.float32
    return rows[valid], values[valid]
