"""`TopKSAE`: the sparse autoencoder module built on `flashsae.ops`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import ops
from .checkpoint import atomic_write

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32, and so on."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype for 'float32' | 'bfloat16' | 'float16'."""
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


class SAEOutput(NamedTuple):
    """x_hat: [B, d] reconstruction; vals: [B, k] activations (descending); idx: [B, k] int64 features."""

    x_hat: torch.Tensor
    vals: torch.Tensor
    idx: torch.Tensor


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
        for name, value in (("d_model", d_model), ("n_features", n_features), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if k > n_features:
            raise ValueError(f"k must be <= n_features, got k={k} > n_features={n_features}")
        if k > ops.MAX_K:
            raise ValueError(f"k must be <= {ops.MAX_K}, got k={k}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.d_model, self.n_features, self.k = d_model, n_features, k
        self.backend, self.sparse_grad = backend, sparse_grad
        self.metadata: dict[str, Any] = dict(metadata or {})
        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(n_features, d_model, **factory))
        self.b_enc = nn.Parameter(torch.zeros(n_features, **factory))
        self.W_dec = nn.Parameter(torch.empty(n_features, d_model, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder (W_enc = W_dec^T as a map), zero biases."""
        # Drawn on the parameters' device: a host copy of a 2^20 x 4096 matrix would be 16 GiB.
        device = generator.device if generator is not None else self.W_dec.device
        W = torch.randn(self.n_features, self.d_model, generator=generator, dtype=torch.float32, device=device)
        self.set_decoder_(W.to(self.W_dec.device))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def set_decoder_(self, W_dec: torch.Tensor) -> None:
        """Set W_dec to the row-normalized ``W_dec`` [F, d] and tie the encoder to it (W_enc = W_dec)."""
        W = W_dec.to(torch.float32)
        W = W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, d] -> (vals [B, k] descending, idx [B, k] int64)."""
        return ops.topk_encode(
            x, self.W_enc, self.b_enc, self.k, b_pre=self.b_dec, backend=self.backend, sparse_grad=self.sparse_grad
        )

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(vals [B, k], idx [B, k]) -> x_hat [B, d]."""
        return ops.sparse_decode(vals, idx, self.W_dec, self.b_dec, backend=self.backend, sparse_grad=self.sparse_grad)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """x: [..., d] -> SAEOutput with x_hat [..., d], vals [..., k], idx [..., k]."""
        lead = x.shape[:-1]
        vals, idx = self.encode(x.reshape(-1, x.shape[-1]))
        x_hat = self.decode(vals, idx)
        return SAEOutput(x_hat.reshape(*lead, -1), vals.reshape(*lead, -1), idx.reshape(*lead, -1))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (only rows with a sparse gradient, when there is one)."""
        rows = _grad_rows(self.W_dec)
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


def _grad_rows(param: torch.Tensor) -> torch.Tensor | None:
    """Row indices of a sparse gradient of ``param``, or None when its gradient is dense or absent."""
    grad = param.grad
    if grad is None or not grad.is_sparse:
        return None
    return grad.coalesce().indices()[0]

