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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import ops
from ..checks import dtype_name, parse_dtype, require_choice, require_int, require_k, require_number
from ..errors import InputError, InputNotFoundError
from ..kernels.registry import backend_names
from ..rowgrad import RowGrad, write_rows_
from .atomic import atomic_write

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "model.safetensors"


class SAEOutput(NamedTuple):
    """x_hat: [B, d] reconstruction; vals: [B, k] activations (descending); idx: [B, k] int64 features."""

    x_hat: torch.Tensor
    vals: torch.Tensor
    idx: torch.Tensor


class Selection(NamedTuple):
    """A top-k choice over the features.

    vals: [B, k] (differentiable w.r.t. the searched rows), idx: [B, k] int64 global feature indices;
    grouping: the `flashsae.ops.SharedGrouping` of (vals, idx) for their decode when they are the
    encoder's own outputs (a single process), else None.
    """

    vals: torch.Tensor
    idx: torch.Tensor
    grouping: ops.SharedGrouping | None = None


class TopKSAE(nn.Module):
    """TopK sparse autoencoder: ``z = topk(relu((x - b_dec) @ W_enc.T + b_enc))``, ``x_hat = z @ W_dec + b_dec``.

    Parameters: W_enc [F, d], b_enc [F], W_dec [F, d] (rows unit-norm), b_dec [d] (also the
    pre-encoder bias, as in Gao et al. 2024). ``sparse_grad=True`` makes the gradients of W_enc,
    W_dec and b_enc float32 `flashsae.rowgrad.RowGrad`s over the features that fired (pair with
    `flashsae.optim.SparseAdam`); the default dense gradients work with any optimizer.

    Precision: the parameters, the input and the encoder's GEMM operands are in ``dtype``; every
    product accumulates in fp32, and the loss, the compact gradients and the optimizer's math are
    fp32. With ``dtype=torch.bfloat16`` and `SparseAdam` (whose default keeps exact fp32 master
    weights for bf16 parameters) this is mixed precision: tensor-core GEMMs, half the bytes per
    gathered row, and no update lost to bf16 rounding.
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

    @torch.no_grad()
    def optimal_encoder_scale(self, x: torch.Tensor) -> float:
        """The factor s by which scaling W_enc and b_enc minimizes ``sum ||x - x_hat||^2`` over x [n, d].

        Scaling the encoder by s > 0 scales every pre-activation by s, so the selection is unchanged and
        ``x_hat - b_dec`` scales by s: the optimum is ``s = <x - b_dec, D> / <D, D>`` with D the decode
        (without b_dec) at s = 1, in float64; 1.0 when nothing fires.
        """
        vals, idx = self.encode(x)
        decoded = self.decode(vals, idx).double() - self.b_dec.double()
        power = decoded.pow(2).sum()
        return float(((x.double() - self.b_dec.double()) * decoded).sum() / power) if power > 0 else 1.0

    @torch.no_grad()
    def calibrate_encoder_scale_(self, x: torch.Tensor) -> float:
        """Scale W_enc and b_enc by `optimal_encoder_scale` of x [n, d] (when positive); returns the factor used."""
        scale = self.optimal_encoder_scale(x)
        if not scale > 0:
            return 1.0
        self.W_enc.mul_(scale)
        self.b_enc.mul_(scale)
        return scale

    # ------------------------------------------------------------------------- the two steps to split
    def _select(
        self,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_pre: torch.Tensor,
        k: int,
        mask: torch.Tensor | None = None,
        *,
        check_finite: bool = True,
    ) -> Selection:
        """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` over this module's features.

        W_enc [n, d], b_enc [n]: the rows this module holds. ``mask`` (bool [n]): choose only among
        the rows where it is True (the dead features, for AuxK); the others never fire.
        ``check_finite``: see `flashsae.ops.topk_encode`.
        """
        grouping = ops.SharedGrouping()
        vals, idx = ops.topk_encode(x, W_enc, b_enc, k, b_pre=b_pre, backend=self.backend,
                                    sparse_grad=self.sparse_grad, mask=mask, grouping=grouping,
                                    check_finite=check_finite)
        return Selection(vals, idx, grouping)

    def _decode_rows(
        self,
        vals: torch.Tensor,
        idx: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        row_ids: torch.Tensor | None = None,
        grouping: ops.SharedGrouping | None = None,
    ) -> torch.Tensor:
        """``sum_j vals[:, j] * W_dec[row of idx[:, j]] + b_dec`` over the slots whose feature is among the rows.

        W_dec [n, d] with global indices ``row_ids`` [n] ascending (None: rows 0..n-1); slots naming
        another feature contribute nothing. ``grouping``: the selection's `Selection.grouping`
        (row_ids None only). Returns [B, d] in W_dec's dtype.
        """
        if row_ids is not None:
            local = torch.searchsorted(row_ids, idx).clamp_(max=max(row_ids.shape[0] - 1, 0))
            vals = vals * (row_ids[local] == idx) if row_ids.shape[0] else torch.zeros_like(vals)
            idx, grouping = local, None
        # An encoder's own idx, or local rows found above, need no host-side range check.
        trusted = grouping is not None or row_ids is not None
        return ops.sparse_decode(vals, idx, W_dec, b_dec, backend=self.backend, sparse_grad=self.sparse_grad,
                                 grouping=grouping, check_indices=not trusted)

    # ---------------------------------------------------------------------------------- the forward
    def encode(self, x: torch.Tensor, *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, d] -> (vals [B, k] descending, idx [B, k] int64).

        ``check_finite`` (default True) raises a ValueError naming the first row of x with NaN or
        Inf (a host sync on a GPU); pass False when the caller checks later itself.
        """
        selection = self._select(x, self.W_enc, self.b_enc, self.b_dec, self.k, check_finite=check_finite)
        return selection.vals, selection.idx

    def decode(self, vals: torch.Tensor, idx: torch.Tensor, grouping: ops.SharedGrouping | None = None) -> torch.Tensor:
        """(vals [B, k], idx [B, k] int64 in [0, F)) -> x_hat [B, d]. ``grouping``: see `Selection`."""
        return self._decode_rows(vals, idx, self.W_dec, self.b_dec, self._held_ids(idx.device), grouping)

    def _held_ids(self, device: torch.device) -> torch.Tensor | None:
        """Global indices of the rows held (None when they are simply 0..F-1)."""
        return None

    def forward(self, x: torch.Tensor, *, check_finite: bool = True) -> SAEOutput:
        """x: [..., d] (any leading shape, possibly empty) -> SAEOutput with x_hat [..., d], vals [..., k],
        idx [..., k]. ``check_finite``: see `encode`."""
        lead = x.shape[:-1]
        selection = self._select(x.reshape(-1, x.shape[-1]), self.W_enc, self.b_enc, self.b_dec, self.k,
                                 check_finite=check_finite)
        vals, idx = selection.vals, selection.idx
        x_hat = self.decode(vals, idx, selection.grouping)
        return SAEOutput(x_hat.reshape(*lead, self.d_model), vals.reshape(*lead, self.k), idx.reshape(*lead, self.k))

    # ------------------------------------------------------------------------------ decoder upkeep
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (only the rows a `RowGrad` or sparse gradient names, when there is one)."""
        touched = _grad_rows(self.W_dec)
        if touched is None:
            W = self.W_dec.data
            W.copy_(W / W.float().norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).to(W.dtype))
            return
        rows, valid = touched
        W = self.W_dec.data.index_select(0, rows)
        W = W / W.float().norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).to(W.dtype)
        write_rows_(self.W_dec.data, rows, W, valid)

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop the component of each decoder row's gradient along the row (keeps rows on the sphere)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        if isinstance(grad, RowGrad):
            self.W_dec.grad = grad.map_values(lambda rows, g: _orthogonal(g, self.W_dec.data.index_select(0, rows)))
        elif grad.is_sparse:
            grad = grad.coalesce()
            values = grad.values()
            values.copy_(_orthogonal(values, self.W_dec.data[grad.indices()[0]]).to(values.dtype))
            self.W_dec.grad = grad
        else:
            grad.copy_(_orthogonal(grad, self.W_dec.data).to(grad.dtype))

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
        """Read a directory written by `save`; ``kwargs`` (backend, sparse_grad, dtype) override the config.

        ``cfg.json`` is checked against the weights before anything is built: InputError names the
        file and what disagrees (a missing or invalid field, a tensor's shape or dtype, a file that is
        not valid JSON or safetensors); InputNotFoundError names a missing file.
        """
        folder = Path(path)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise InputNotFoundError(f"{folder} is not a flashsae checkpoint: {name} is missing")
        cfg = read_saved_config(folder / CONFIG_FILE)
        state = _read_saved_weights(folder / WEIGHTS_FILE, cfg, device)
        dtype = kwargs.pop("dtype", parse_dtype(cfg["dtype"]))
        sae = cls(
            cfg["d_model"], cfg["n_features"], cfg["k"], dtype=dtype, device=device,
            metadata=cfg.get("metadata"), **kwargs,
        )
        sae.load_state_dict({name: t.to(dtype) for name, t in state.items()})
        return sae


def _parameter_shapes(d_model: int, n_features: int) -> dict[str, tuple[int, ...]]:
    """The saved parameters' names and shapes."""
    return {"W_enc": (n_features, d_model), "b_enc": (n_features,), "W_dec": (n_features, d_model), "b_dec": (d_model,)}


def read_saved_config(file: Path) -> dict[str, Any]:
    """A saved ``cfg.json``, checked: d_model, n_features and k positive integers, k selectable, a known dtype,
    metadata an object whose ``norm_scale`` (if any) is a positive number; InputError naming ``file`` otherwise."""
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{file} must hold a JSON object, got {type(cfg).__name__}")
    for key in ("d_model", "n_features", "k", "dtype"):
        if key not in cfg:
            raise InputError(f"{file} lacks {key!r}")
    try:
        require_int("d_model", cfg["d_model"])
        require_int("n_features", cfg["n_features"])
        require_k(cfg["k"], cfg["n_features"])
        parse_dtype(cfg["dtype"])
    except (TypeError, ValueError) as err:
        raise InputError(f"{file}: {err}") from None
    metadata = cfg.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InputError(f"{file}: metadata must be a JSON object, got {metadata!r}")
    scale = (metadata or {}).get("norm_scale")
    if scale is not None:
        try:
            require_number("metadata norm_scale", scale, 0.0, strict=True)
        except ValueError as err:
            raise InputError(f"{file}: {err}") from None
    return cfg


def _read_saved_weights(file: Path, cfg: dict[str, Any], device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` on ``device``, after checking their names, shapes and dtype
    against ``cfg`` (the checked cfg.json); InputError naming the file and what disagrees otherwise."""
    try:
        state = load_file(str(file), device=str(torch.device(device) if device is not None else "cpu"))
    except SafetensorError as err:
        raise InputError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    expected = _parameter_shapes(cfg["d_model"], cfg["n_features"])
    if set(state) != set(expected):
        raise InputError(f"{file} holds tensors {sorted(state)}; a flashsae SAE has {sorted(expected)}")
    config_file = file.parent / CONFIG_FILE
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise InputError(
                f"{file}: {name} has shape {list(state[name].shape)}, but {config_file} (d_model={cfg['d_model']}, "
                f"n_features={cfg['n_features']}) needs {list(shape)}"
            )
        if dtype_name(state[name].dtype) != cfg["dtype"]:
            raise InputError(
                f"{file}: {name} is {dtype_name(state[name].dtype)}, but {config_file} says dtype {cfg['dtype']}"
            )
    return state


def _orthogonal(g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``g - <g, w> w`` per row, in fp32 (w unit rows): [n, d], [n, d] -> [n, d] fp32."""
    g, W = g.float(), W.float()
    return g - (g * W).sum(1, keepdim=True) * W


def _grad_rows(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(rows, valid or None) that ``param``'s `RowGrad` or sparse gradient names; None when it is dense or absent."""
    grad = param.grad
    if isinstance(grad, RowGrad):
        rows, _, valid = grad.rows_values_valid()
        return rows, valid
    if grad is None or not grad.is_sparse:
        return None
    return grad.coalesce().indices()[0], None
