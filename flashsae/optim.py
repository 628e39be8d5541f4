"""`SparseAdam`: Adam that touches only the rows a sparse gradient names."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch

from .checks import dtype_name, require_choice, require_dtype, require_real
from .kernels.registry import backend_names, get_backend

MOMENT_DTYPES = (torch.float32, torch.bfloat16)


class SparseAdam(torch.optim.Optimizer):
    """Lazy, row-sparse Adam for SAE parameters; takes sparse COO and dense gradients alike.

    Semantics, per parameter (rows = first dimension; a 1-D parameter has one-element rows):

    - A sparse COO gradient (from ``sparse_grad=True``; sparse over dim 0, coalesced or not) names
      the touched rows; a dense gradient touches every row.
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
    - ``moment_dtype`` (float32 | bfloat16) stores m and v; the math is always fp32.

    Moments are created at a parameter's first step (dense [rows, ...] buffers, like Adam's).
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
    ) -> None:
        require_real("lr", lr, low=0.0)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        require_real("betas[0]", betas[0], low=0.0, below=1.0)
        require_real("betas[1]", betas[1], low=0.0, below=1.0)
        require_real("eps", eps, low=0.0)
        require_dtype("moment_dtype", moment_dtype, MOMENT_DTYPES)
        require_choice("backend", backend, backend_names())
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, moment_dtype=moment_dtype, backend=backend)
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
                    state["step"] = torch.zeros(n_param_rows, dtype=torch.int64, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=group["moment_dtype"], memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=group["moment_dtype"], memory_format=torch.contiguous_format)
                grad, rows = _grad_rows(p)
                kernels = get_backend(group["backend"], p.device)
                if p.dtype not in kernels.float_dtypes:
                    raise TypeError(f"params include a {dtype_name(p.dtype)} tensor, which backend {kernels.name!r} "
                                    "does not take; float64 runs on backend='torch'")
                kernels.sparse_adam_step_(
                    p.view(n_param_rows, -1), grad, rows,
                    state["exp_avg"].view(n_param_rows, -1), state["exp_avg_sq"].view(n_param_rows, -1), state["step"],
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
            for key in ("exp_avg", "exp_avg_sq", "step"):
                self.state[p][key] = saved[key].to(device=p.device, copy=True)


def _grad_rows(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """p.grad as (rows of gradient [U, m] contiguous, rows [U] int64 unique) or (dense [n, m], None)."""
    grad = p.grad
    n_param_rows = p.shape[0] if p.dim() else 1
    if not grad.is_sparse:
        return grad.reshape(n_param_rows, -1).contiguous(), None
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"SparseAdam needs sparse gradients over dim 0 only (sparse_dim=1), got sparse_dim={grad.sparse_dim()}"
        )
    grad = grad.coalesce()
    rows = grad.indices()[0]
    return grad.values().reshape(rows.shape[0], -1).contiguous(), rows
