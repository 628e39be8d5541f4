"""`SparseAdam`: Adam that touches only the rows a sparse gradient names, with exact fp32 master weights for bf16."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch

from .checks import dtype_name, require_choice, require_dtype, require_real
from .kernels.reference import join_master
from .kernels.registry import backend_names, get_backend
from .rowgrad import RowGrad

MOMENT_DTYPES = (torch.float32, torch.bfloat16)


class SparseAdam(torch.optim.Optimizer):
    """Lazy, row-sparse Adam for SAE parameters; takes `RowGrad`, sparse COO and dense gradients alike.

    Semantics, per parameter (rows = first dimension; a 1-D parameter has one-element rows):

    - A `flashsae.rowgrad.RowGrad` (from ``sparse_grad=True``: float32 rows, read as they are, never
      rounded to the parameter's dtype first, and without a host sync) or a sparse COO gradient
      (sparse over dim 0, coalesced or not) names the touched rows; a dense gradient touches every row.
    - Each row has its own step count ``t`` (``state["step"]``, int64 [rows]). A touched row does
      exactly the torch.optim.Adam update with ``t`` in place of the global step:
      ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
      ``w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, then ``t += 1``.
    - Rows not touched are not read or written at all: their parameters, moments and step
      counts stay bit-identical (no stale momentum moves a dead feature). So when every row is
      touched at every step this is torch.optim.Adam (no weight decay, no amsgrad).
    - ``unit_norm`` parameters (2-D): before the update each touched gradient row loses its
      component along the parameter row, ``g -= <g, w> / <w, w> * w``, and after it the updated
      row is rescaled to unit norm. Rows not touched are not renormalized.
    - ``moment_dtype`` (float32 | bfloat16) stores m and v; the math is fp32 (float64 for a float64
      parameter, on the torch backend; the Triton backend rejects float64 parameters).
    - ``master_weights`` (default True): a bfloat16 parameter is the rounding of fp32 master
      weights, whose other 16 bits live in ``state["master_low"]`` (int16): each step reads the
      exact fp32 master, updates it in fp32 and writes both halves back, so no update is lost to
      bf16 rounding (a bf16 parameter steps exactly as an fp32 one would) for 2 bytes per element
      and only the touched rows' traffic. `master` returns the fp32 weights. A bf16 value changed
      outside the optimizer keeps the old low bits (the master then differs from it by less than
      half a bf16 unit). float16 parameters, and all of them with ``master_weights=False``, are
      updated in place with round-to-nearest.

    Memory per parameter element: the parameter, plus m and v (4 + 4 bytes, or 2 + 2 in bf16),
    plus 2 bytes of master low bits for a bf16 parameter; plus an int64 step count per row.
    Moments and low bits are created at a parameter's first step (dense [rows, ...] buffers, like Adam's).
    ``backend`` (a name of `flashsae.kernels.registry.backend_names`): "auto" = Triton kernel for
    CUDA tensors, torch elsewhere; "triton" on CPU needs TRITON_INTERPRET=1; "torch" anywhere.
    State round-trips through ``state_dict``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        moment_dtype: torch.dtype = torch.float32,
        unit_norm: Iterable[torch.Tensor] = (),
        backend: str = "auto",
        master_weights: bool = True,
    ) -> None:
        require_real("lr", lr, low=0.0)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        require_real("betas[0]", betas[0], low=0.0, below=1.0)
        require_real("betas[1]", betas[1], low=0.0, below=1.0)
        require_real("eps", eps, low=0.0)
        require_dtype("moment_dtype", moment_dtype, MOMENT_DTYPES)
        require_choice("backend", backend, backend_names())
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be a bool, got {master_weights!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, moment_dtype=moment_dtype, backend=backend,
                        master_weights=master_weights)
        super().__init__(params, defaults)
        known = {id(p) for group in self.param_groups for p in group["params"]}
        self._unit_norm: set[int] = set()
        for p in unit_norm:
            if id(p) not in known:
                raise ValueError("unit_norm lists a tensor that is not among the optimized params")
            if p.dim() != 2:
                raise ValueError(f"unit_norm params must be 2-D, got shape {tuple(p.shape)}")
            self._unit_norm.add(id(p))
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_contiguous():
                    raise ValueError(f"SparseAdam needs contiguous params, got strides {p.stride()}")

    def master(self, param: torch.Tensor) -> torch.Tensor:
        """``param``'s fp32 weights: the exact master when it keeps master low bits, else param in fp32."""
        low = self.state.get(param, {}).get("master_low")
        return join_master(param.detach(), low) if low is not None else param.detach().to(torch.float32)

    def normalizes(self, param: torch.Tensor) -> bool:
        """True when ``param`` is one of the ``unit_norm`` parameters (its touched rows are kept at unit norm)."""
        return id(param) in self._unit_norm

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One optimizer step over every param with a gradient; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                n_param_rows = p.shape[0] if p.dim() else 1
                state = self.state[p]
                if not state:
                    _init_state(state, p, group)
                grad, rows, valid = _grad_rows(p)
                low = state.get("master_low")
                kernels = get_backend(group["backend"], p.device)
                if p.dtype not in kernels.float_dtypes:
                    raise TypeError(f"params include a {dtype_name(p.dtype)} tensor, which backend {kernels.name!r} "
                                    "does not take; float64 runs on backend='torch'")
                kernels.sparse_adam_step_(
                    p.view(n_param_rows, -1), grad, rows, valid,
                    state["exp_avg"].view(n_param_rows, -1), state["exp_avg_sq"].view(n_param_rows, -1), state["step"],
                    low=None if low is None else low.view(n_param_rows, -1),
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], unit_norm=self.normalizes(p),
                )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch.optim.Optimizer, but keep the saved moment dtype (torch casts to the param's)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key in ("exp_avg", "exp_avg_sq", "step", "master_low"):
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, copy=True)


def _init_state(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
    """A parameter's optimizer state at its first step: step counts, moments, master low bits (bf16)."""
    n_param_rows = p.shape[0] if p.dim() else 1
    state["step"] = torch.zeros(n_param_rows, dtype=torch.int64, device=p.device)
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = torch.zeros_like(p, dtype=group["moment_dtype"], memory_format=torch.contiguous_format)
    if group.get("master_weights", True) and p.dtype == torch.bfloat16:
        state["master_low"] = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.contiguous_format)


def _grad_rows(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """p.grad as (gradient rows [U, m] contiguous, rows [U] int64, valid [U] bool or None) or (dense [n, m], None, None)."""
    grad = p.grad
    n_param_rows = p.shape[0] if p.dim() else 1
    if isinstance(grad, RowGrad):
        rows, values, valid = grad.rows_values_valid()
        return values.reshape(rows.shape[0], -1).contiguous(), rows, valid
    if not grad.is_sparse:
        return grad.reshape(n_param_rows, -1).contiguous(), None, None
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"SparseAdam needs sparse gradients over dim 0 only (sparse_dim=1), got sparse_dim={grad.sparse_dim()}"
        )
    grad = grad.coalesce()
    rows = grad.indices()[0]
    return grad.values().reshape(rows.shape[0], -1).contiguous(), rows, None
