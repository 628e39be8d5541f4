"""`TopKSAE`: the sparse autoencoder module built on `flashsae.ops`.

A module may hold all features or, under feature parallelism, a contiguous slice of them
(`flashsae.sae.parallel.feature.FeatureParallelSAE` overrides the two steps that then need the
other ranks: `_select` and `_decode_rows`). Everything else — parameters, the forward, decoder
upkeep, AuxK (`flashsae.sae.losses`) — is written once, here, against those two steps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import ops
from ..kernels.registry import backend_names
from ..checks import dtype_name, parse_dtype, require_choice, require_int, require_k
from .atomic import atomic_write

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "model.safetensors"


class SAEOutput(NamedTuple):
    """x_hat: [B, d] reconstruction; vals: [B, k] activations (descending); idx: [B, k] int64 features."""

    x_hat: torch.Tensor
    vals: torch.Tensor
    idx: torch.Tensor


class Selection(NamedTuple):
    """A top-k choice over some of the features.

    vals: [B, k] (differentiable w.r.t. the searched rows), idx: [B, k] int64 global feature indices;
    won: bool [n] over the searched rows of this process, True where the row won a slot with a
    positive value — None when every row this process selected locally won (a single process).
    """

    vals: torch.Tensor
    idx: torch.Tensor
    won: torch.Tensor | None


class TopKSAE(nn.Module):
    """TopK sparse autoencoder: ``z = topk(relu((x - b_dec) @ W_enc.T + b_enc))``, ``x_hat = z @ W_dec + b_dec``.

    Parameters: W_enc [F, d], b_enc [F], W_dec [F, d] (rows unit-norm), b_dec [d] (also the
    pre-encoder bias, as in Gao et al. 2024). ``sparse_grad=True`` makes the gradients of W_enc,
    W_dec and b_enc sparse COO tensors over the features that fired (pair with
    `flashsae.optim.SparseAdam`); the default dense-shaped gradients work with any optimizer.
    ``metadata`` is free-form JSON saved with the weights (site, layer, normalization scale, ...).
    """

    def __init__(
        self,
        d_model: int,
        n_features: int,
        k: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
        sparse_grad: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        require_int("d_model", d_model)
        require_int("n_features", n_features)
        require_k(k, n_features)
        require_choice("backend", backend, backend_names())
        self.d_model, self.n_features, self.k = d_model, n_features, k
        self.backend, self.sparse_grad = backend, sparse_grad
        self.metadata: dict[str, Any] = dict(metadata or {})
        factory = {"dtype": dtype, "device": device}
        rows = self.n_held
        self.W_enc = nn.Parameter(torch.empty(rows, d_model, **factory))
        self.b_enc = nn.Parameter(torch.zeros(rows, **factory))
        self.W_dec = nn.Parameter(torch.empty(rows, d_model, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **factory))
        self.reset_parameters()

    # ------------------------------------------------------------------ the features this module holds
    @property
    def feature_offset(self) -> int:
        """Global index of this module's first feature row (0 unless the features are split)."""
        return 0

    @property
    def n_held(self) -> int:
        """Feature rows this module holds (all ``n_features`` unless the features are split)."""
        return self.n_features

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_features={self.n_features}, k={self.k}, dtype={dtype_name(self.dtype)}"

    # ------------------------------------------------------------------------------- initialization
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder (W_enc = W_dec^T as a map), zero biases."""
        # Drawn on the parameters' device: a host copy of a 2^20 x 4096 matrix would be 16 GiB.
        device = generator.device if generator is not None else self.W_dec.device
        W = torch.randn(self.n_held, self.d_model, generator=generator, dtype=torch.float32, device=device)
        self.set_decoder_(W.to(self.W_dec.device))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def set_decoder_(self, W_dec: torch.Tensor) -> None:
        """Set W_dec to the row-normalized ``W_dec`` [rows held, d] and tie the encoder to it (W_enc = W_dec)."""
        W = W_dec.to(torch.float32)
        W = W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W)

    # ------------------------------------------------------------------------- the two steps to split
    def _select(
        self,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_pre: torch.Tensor,
        k: int,
        row_ids: torch.Tensor | None = None,
        *,
        check_finite: bool = True,
    ) -> Selection:
        """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` over the given rows.

        W_enc [n, d], b_enc [n]: rows of this module's features (all of them, or a subset such as the
        dead features); ``row_ids`` [n] int64 ascending: their global indices (None: rows 0..n-1).
        ``check_finite``: see `flashsae.ops.topk_encode`.
        """
        vals, local = ops.topk_encode(x, W_enc, b_enc, k, b_pre=b_pre, backend=self.backend,
                                      sparse_grad=self.sparse_grad, check_finite=check_finite)
        idx = local if row_ids is None else row_ids[local]
        return Selection(vals, idx, None)

    def _decode_rows(
        self,
        vals: torch.Tensor,
        idx: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        row_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sum_j vals[:, j] * W_dec[row of idx[:, j]] + b_dec`` over the slots whose feature is among the rows.

        W_dec [n, d] with global indices ``row_ids`` [n] ascending (None: rows 0..n-1); slots naming
        another feature contribute nothing. Returns [B, d] in W_dec's dtype.
        """
        if row_ids is not None:
            local = torch.searchsorted(row_ids, idx).clamp_(max=max(row_ids.shape[0] - 1, 0))
            vals = vals * (row_ids[local] == idx) if row_ids.shape[0] else torch.zeros_like(vals)
            idx = local
        return ops.sparse_decode(vals, idx, W_dec, b_dec, backend=self.backend, sparse_grad=self.sparse_grad)

    # ---------------------------------------------------------------------------------- the forward
    def encode(self, x: torch.Tensor, *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, d] -> (vals [B, k] descending, idx [B, k] int64).

        ``check_finite`` (default True) raises a ValueError naming the first row of x with NaN or
        Inf (a host sync on a GPU); pass False when the caller checks later itself.
        """
        selection = self._select(x, self.W_enc, self.b_enc, self.b_dec, self.k, check_finite=check_finite)
        return selection.vals, selection.idx

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(vals [B, k], idx [B, k]) -> x_hat [B, d]."""
        return self._decode_rows(vals, idx, self.W_dec, self.b_dec, self._held_ids(idx.device))

    def _held_ids(self, device: torch.device) -> torch.Tensor | None:
        """Global indices of the rows held (None when they are simply 0..F-1)."""
        return None

    def forward(self, x: torch.Tensor, *, check_finite: bool = True) -> SAEOutput:
        """x: [..., d] (any leading shape, possibly empty) -> SAEOutput with x_hat [..., d], vals [..., k],
        idx [..., k]. ``check_finite``: see `encode`."""
        lead = x.shape[:-1]
        vals, idx = self.encode(x.reshape(-1, x.shape[-1]), check_finite=check_finite)
        x_hat = self.decode(vals, idx)
        return SAEOutput(x_hat.reshape(*lead, self.d_model), vals.reshape(*lead, self.k), idx.reshape(*lead, self.k))

    # ------------------------------------------------------------------------------ decoder upkeep
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (only rows with a sparse gradient, when there is one)."""
        rows = _sparse_grad_rows(self.W_dec)
        W = self.W_dec.data if rows is None else self.W_dec.data[rows]
        W = W / W.float().norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).to(W.dtype)
        if rows is None:
            self.W_dec.data.copy_(W)
        else:
            self.W_dec.data[rows] = W

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop the component of each decoder row's gradient along the row (keeps rows on the sphere)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
            W = self.W_dec.data[rows].float()
            g = values.float()
            values.copy_((g - (g * W).sum(1, keepdim=True) * W).to(values.dtype))
            self.W_dec.grad = grad
        else:
            W, g = self.W_dec.data.float(), grad.float()
            grad.copy_((g - (g * W).sum(1, keepdim=True) * W).to(grad.dtype))

    # -------------------------------------------------------------------------------- save and load
    def config(self) -> dict[str, Any]:
        """The JSON config saved next to the weights."""
        return {
            "d_model": self.d_model,
            "n_features": self.n_features,
            "k": self.k,
            "dtype": dtype_name(self.dtype),
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``cfg.json`` + ``model.safetensors`` into directory ``path``, each file atomically."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
        atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(self.config(), indent=2)))
        return out

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: torch.device | str | None = None, **kwargs: Any
    ) -> "TopKSAE":
        """Read a directory written by `save`; ``kwargs`` (backend, sparse_grad, dtype) override the config."""
        folder = Path(path)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a flashsae checkpoint: {name} is missing")
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        dtype = kwargs.pop("dtype", parse_dtype(cfg["dtype"]))
        sae = cls(
            cfg["d_model"], cfg["n_features"], cfg["k"], dtype=dtype, device=device,
            metadata=cfg.get("metadata"), **kwargs,
        )
        state = load_file(str(folder / WEIGHTS_FILE), device=str(sae.W_dec.device))
        sae.load_state_dict({name: t.to(dtype) for name, t in state.items()})
        return sae


def _sparse_grad_rows(param: torch.Tensor) -> torch.Tensor | None:
    """Row indices of a sparse gradient of ``param``, or None when its gradient is dense or absent."""
    grad = param.grad
    if grad is None or not grad.is_sparse:
        return None
    return grad.coalesce().indices()[0]
