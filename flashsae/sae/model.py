"""`TopKSAE`: the sparse autoencoder module built on `flashsae.ops`, in every `Architecture` variant.

A module may hold all features or, under feature parallelism, a contiguous slice of them
(`flashsae.sae.parallel.feature.FeatureParallelSAE` overrides the steps that then need the other
ranks: `_select`, `_decode_rows` and `_decode_levels`). Everything else — parameters, the forward,
decoder upkeep, AuxK (`flashsae.sae.losses`) — is written once, here, against those steps. The
variants (`flashsae.sae.architecture`: BatchTopK with its JumpReLU threshold, Matryoshka levels,
transcoders with an optional skip connection) are options of this one module.
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
from .architecture import Architecture
from .atomic import atomic_write

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "model.safetensors"


class SAEOutput(NamedTuple):
    """x_hat: [B, d_out] reconstruction (a transcoder's prediction of its target); vals: [B, k]
    activations (descending; BatchTopK and JumpReLU codes are [B, k_max], zero-padded); idx: [B, k]
    int64 features; levels: [G, B, d_out] the Matryoshka levels' reconstructions (the last is
    x_hat), or None for a model without levels."""

    x_hat: torch.Tensor
    vals: torch.Tensor
    idx: torch.Tensor
    levels: torch.Tensor | None = None


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

    ``arch`` (`flashsae.sae.architecture.Architecture`, default plain TopK) picks the variant: a
    transcoder has W_dec [F, d_out], b_dec [d_out] and, with a skip connection, W_skip [d_out, d];
    its encoder reads x itself (no ``- b_dec``). A BatchTopK model selects per batch in training
    mode (``model.train()``, the default) and by its ``threshold`` buffer in eval mode
    (``model.eval()``), like BatchNorm's batch and running statistics.
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
        arch: Architecture | None = None,
    ) -> None:
        super().__init__()
        require_int("d_model", d_model)
        require_int("n_features", n_features)
        require_k(k, n_features)
        require_choice("backend", backend, backend_names())
        arch = Architecture() if arch is None else arch
        if not isinstance(arch, Architecture):
            raise TypeError(f"arch must be an Architecture, got {type(arch).__name__}")
        arch.check(d_model, n_features)
        self.d_model, self.n_features, self.k, self.arch = d_model, n_features, k, arch
        self.d_out = arch.output_width(d_model)
        self.backend, self.sparse_grad = backend, sparse_grad
        self.metadata: dict[str, Any] = dict(metadata or {})
        factory = {"dtype": dtype, "device": device}
        rows = self.n_held
        self.W_enc = nn.Parameter(torch.empty(rows, d_model, **factory))
        self.b_enc = nn.Parameter(torch.zeros(rows, **factory))
        self.W_dec = nn.Parameter(torch.empty(rows, self.d_out, **factory))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **factory))
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_model, **factory)) if arch.skip_connection else None
        if arch.batch_topk:
            # The JumpReLU threshold, float64 whatever the dtype; -1 until a training batch has set it.
            self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float64, device=device))
        if arch.nested:
            self.register_buffer("level_widths", torch.tensor(arch.matryoshka_widths, device=device), persistent=False)
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

    @property
    def encoder_shift(self) -> torch.Tensor | None:
        """What the encoder subtracts from x: b_dec for an autoencoder, nothing for a transcoder."""
        return None if self.arch.transcoder else self.b_dec

    def extra_repr(self) -> str:
        out = "" if self.d_out == self.d_model else f", d_out={self.d_out}"
        return (f"d_model={self.d_model}{out}, n_features={self.n_features}, k={self.k}, "
                f"dtype={dtype_name(self.dtype)}, arch={self.arch.describe()}")

    # ------------------------------------------------------------------------------- initialization
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder (W_enc = W_dec^T as a map), zero biases.

        A transcoder's encoder rows are drawn independently (unit norm; its input is another space),
        and W_skip starts at zero.
        """
        # Drawn on the parameters' device: a host copy of a 2^20 x 4096 matrix would be 16 GiB.
        device = generator.device if generator is not None else self.W_dec.device
        W = torch.randn(self.n_held, self.d_out, generator=generator, dtype=torch.float32, device=device)
        self.set_decoder_(W.to(self.W_dec.device))
        if self.arch.transcoder:
            E = torch.randn(self.n_held, self.d_model, generator=generator, dtype=torch.float32, device=device)
            self.W_enc.copy_(E / E.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
        if self.W_skip is not None:
            self.W_skip.zero_()
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def set_decoder_(self, W_dec: torch.Tensor) -> None:
        """Set W_dec to the row-normalized ``W_dec`` [rows held, d_out] and tie the encoder to it (W_enc = W_dec;
        a transcoder's encoder, in another space, is left as it is)."""
        W = W_dec.to(torch.float32)
        W = W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        self.W_dec.copy_(W)
        if not self.arch.transcoder:
            self.W_enc.copy_(W)

    @torch.no_grad()
    def optimal_encoder_scale(self, x: torch.Tensor, target: torch.Tensor | None = None) -> float:
        """The factor s by which scaling W_enc and b_enc minimizes ``sum ||target - x_hat||^2`` over x [n, d]
        (target [n, d_out], default x).

        Scaling the encoder by s > 0 scales every pre-activation by s, so the selection is unchanged
        (a JumpReLU threshold scales with it) and the dictionary's part of ``x_hat`` scales by s: the
        optimum is ``s = <target - b_dec - skip, D> / <D, D>`` with D that part at s = 1, in float64;
        1.0 when nothing fires.
        """
        target = x if target is None else target
        out = self(x)
        rest = self.b_dec.double() + (self._skip(x).double() if self.W_skip is not None else 0.0)
        decoded = out.x_hat.double() - rest
        power = decoded.pow(2).sum()
        return float(((target.double() - rest) * decoded).sum() / power) if power > 0 else 1.0

    @torch.no_grad()
    def calibrate_encoder_scale_(self, x: torch.Tensor, target: torch.Tensor | None = None) -> float:
        """Scale W_enc and b_enc by `optimal_encoder_scale` of x [n, d] (when positive); returns the factor used."""
        scale = self.optimal_encoder_scale(x, target)
        if not scale > 0:
            return 1.0
        self.W_enc.mul_(scale)
        self.b_enc.mul_(scale)
        if self.arch.batch_topk and self.threshold >= 0:
            self.threshold.mul_(scale)
        return scale

    # --------------------------------------------------------------------------- the steps to split
    def _select(
        self,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_pre: torch.Tensor | None,
        k: int,
        mask: torch.Tensor | None = None,
        *,
        check_finite: bool = True,
    ) -> Selection:
        """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` over this module's features (b_pre None: x itself).

        W_enc [n, d], b_enc [n]: the rows this module holds. ``mask`` (bool [n]): choose only among
        the rows where it is True (the dead features, for AuxK); the others never fire.
        ``check_finite``: see `flashsae.ops.topk_encode`.
        """
        grouping = ops.SharedGrouping()
        vals, idx = ops.topk_encode(x, W_enc, b_enc, k, b_pre=b_pre, backend=self.backend,
                                    sparse_grad=self.sparse_grad, mask=mask, grouping=grouping,
                                    check_finite=check_finite)
        return Selection(vals, idx, grouping)

    def _select_with_aux(
        self,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_pre: torch.Tensor | None,
        k: int,
        aux_k: int,
        dead: torch.Tensor,
        *,
        batch: bool = False,
        check_finite: bool = True,
    ) -> tuple[Selection, Selection]:
        """`_select` (``batch``: `_select_batch`) and AuxK's top-``aux_k`` among the ``dead`` rows (bool [n])
        from one encoder pass (`flashsae.ops.topk_encode_with_aux`): (main, auxiliary) selections.

        The auxiliary values are differentiable w.r.t. W_enc and b_enc only (AuxK holds x and b_pre
        constant). 1 <= aux_k <= n.
        """
        grouping, aux_grouping = ops.SharedGrouping(), ops.SharedGrouping()
        vals, idx, aux_vals, aux_idx = ops.topk_encode_with_aux(
            x, W_enc, b_enc, k, aux_k, dead, b_pre=b_pre, batch_topk=batch, backend=self.backend,
            sparse_grad=self.sparse_grad, grouping=grouping, aux_grouping=aux_grouping, check_finite=check_finite,
        )
        return Selection(vals, idx, grouping), Selection(aux_vals, aux_idx, aux_grouping)

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
            idx, vals, grouping = *_local_slots(vals, idx, row_ids), None
        # An encoder's own idx, or local rows found above, need no host-side range check.
        trusted = grouping is not None or row_ids is not None
        return ops.sparse_decode(vals, idx, W_dec, b_dec, backend=self.backend, sparse_grad=self.sparse_grad,
                                 grouping=grouping, check_indices=not trusted)

    def _select_batch(
        self, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor | None, k: int,
        *, check_finite: bool = True,
    ) -> Selection:
        """BatchTopK: the B * k largest of ``relu((x - b_pre) @ W_enc.T + b_enc)`` over the whole batch
        x [B, d], as zero-padded rows [B, k_max] (`flashsae.ops.batch_topk_encode`)."""
        grouping = ops.SharedGrouping()
        vals, idx = ops.batch_topk_encode(x, W_enc, b_enc, k, b_pre=b_pre, backend=self.backend,
                                          sparse_grad=self.sparse_grad, grouping=grouping, check_finite=check_finite)
        return Selection(vals, idx, grouping)

    def _select_above(
        self, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor | None,
        threshold: torch.Tensor, *, check_finite: bool = True,
    ) -> Selection:
        """JumpReLU: every pre-activation above ``threshold`` (a 0-d tensor >= 0), as zero-padded rows
        [B, k_max] (`flashsae.ops.threshold_encode`)."""
        grouping = ops.SharedGrouping()
        vals, idx = ops.threshold_encode(x, W_enc, b_enc, threshold, b_pre=b_pre, backend=self.backend,
                                         sparse_grad=self.sparse_grad, grouping=grouping, check_finite=check_finite)
        return Selection(vals, idx, grouping)

    def _decode_levels(
        self,
        vals: torch.Tensor,
        idx: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        row_ids: torch.Tensor | None = None,
        grouping: ops.SharedGrouping | None = None,
    ) -> torch.Tensor:
        """The Matryoshka levels' reconstructions [G, B, d_out] (`flashsae.ops.sparse_decode_nested`), over
        the slots whose feature is among the rows, as `_decode_rows`."""
        level = ops.nested_levels(idx, self.level_widths)
        if row_ids is not None:
            idx, vals, grouping = *_local_slots(vals, idx, row_ids), None
        trusted = grouping is not None or row_ids is not None
        return ops.sparse_decode_nested(vals, idx, level, len(self.arch.matryoshka_widths), W_dec, b_dec,
                                        backend=self.backend, sparse_grad=self.sparse_grad, grouping=grouping,
                                        check_indices=not trusted)

    # ---------------------------------------------------------------------------------- the forward
    def encode(self, x: torch.Tensor, *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, d] -> (vals [B, k] descending, idx [B, k] int64); BatchTopK: [B, k_max] (see `codes`).

        ``check_finite`` (default True) raises a ValueError naming the first row of x with NaN or
        Inf (a host sync on a GPU); pass False when the caller checks later itself.
        """
        selection = self.codes(x, check_finite=check_finite)
        return selection.vals, selection.idx

    def codes(self, x: torch.Tensor, *, check_finite: bool = True) -> Selection:
        """The selection of x [B, d] this model makes: top-k per token; BatchTopK: the batch's B * k
        largest in training mode, every pre-activation above ``threshold`` in eval mode.
        ``check_finite``: see `encode`."""
        shift = self.encoder_shift
        if not self.arch.batch_topk:
            return self._select(x, self.W_enc, self.b_enc, shift, self.k, check_finite=check_finite)
        if self.training:
            return self._select_batch(x, self.W_enc, self.b_enc, shift, self.k, check_finite=check_finite)
        if self.threshold < 0:
            raise RuntimeError("this BatchTopK SAE has no JumpReLU threshold yet (no training batch has set it): "
                               "encode in training mode (model.train()) or train it first")
        return self._select_above(x, self.W_enc, self.b_enc, shift, self.threshold, check_finite=check_finite)

    def decode(self, vals: torch.Tensor, idx: torch.Tensor, grouping: ops.SharedGrouping | None = None) -> torch.Tensor:
        """(vals [B, k], idx [B, k] int64 in [0, F)) -> the dictionary's reconstruction [B, d_out], with b_dec
        (a skip transcoder's ``x W_skip^T`` is added by `forward`). ``grouping``: see `Selection`."""
        return self._decode_rows(vals, idx, self.W_dec, self.b_dec, self._held_ids(idx.device), grouping)

    def _held_ids(self, device: torch.device) -> torch.Tensor | None:
        """Global indices of the rows held (None when they are simply 0..F-1)."""
        return None

    def _skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip connection ``x W_skip^T``: [B, d] -> [B, d_out] in fp32 accumulation, the model's dtype."""
        return torch.mm(x.float(), self.W_skip.float().T).to(self.dtype)

    def forward(self, x: torch.Tensor, *, check_finite: bool = True) -> SAEOutput:
        """x: [..., d] (any leading shape, possibly empty) -> SAEOutput with x_hat [..., d_out], vals and
        idx [..., k] (BatchTopK: [..., k_max]), and a Matryoshka model's levels [G, ..., d_out].
        ``check_finite``: see `encode`."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        return self._reconstruct(x, self.codes(x, check_finite=check_finite), lead)

    def forward_with_aux(
        self, x: torch.Tensor, dead: torch.Tensor, aux_k: int, *, check_finite: bool = True
    ) -> tuple[SAEOutput, Selection]:
        """`forward` of x [B, d] and AuxK's selection from the same encoder pass (no second GEMM over W_enc
        on the backends that fold it, `flashsae.kernels.registry.Backend.folds_aux`).

        dead: bool [F] over all features (the same on every rank); aux_k >= 1 (at most F are taken).
        Returns the `SAEOutput` and the per-token top-aux_k among the dead features of
        ``relu((x - b_pre) @ W_enc.T + b_enc)`` as a `Selection` (vals [B, aux_k], global idx), which
        `flashsae.sae.losses.aux_k_loss_from_selection` turns into the AuxK loss. Training mode only
        for BatchTopK (RuntimeError otherwise: its eval-mode JumpReLU selection does not fold).
        """
        if self.arch.batch_topk and not self.training:
            raise RuntimeError("forward_with_aux runs a BatchTopK SAE's training-mode selection: call model.train() "
                               "first (the eval-mode JumpReLU selection does not fold AuxK)")
        require_dead_mask(dead, self.n_features)
        aux_k = min(require_int("aux_k", aux_k), self.n_features)
        held = dead[self.feature_offset : self.feature_offset + self.n_held]
        main, aux = self._select_with_aux(x, self.W_enc, self.b_enc, self.encoder_shift, self.k, aux_k, held,
                                          batch=self.arch.batch_topk, check_finite=check_finite)
        return self._reconstruct(x, main, x.shape[:-1]), aux

    def _reconstruct(self, x: torch.Tensor, selection: Selection, lead: torch.Size) -> SAEOutput:
        """The `SAEOutput` of x [B, d] from its ``selection``, reshaped to the leading shape ``lead``."""
        vals, idx, levels = selection.vals, selection.idx, None
        if self.arch.nested:
            levels = self._decode_levels(vals, idx, self.W_dec, self.b_dec, self._held_ids(idx.device),
                                         selection.grouping)
            if self.W_skip is not None:
                levels = levels + self._skip(x)
            x_hat = levels[-1]
            levels = levels.reshape(levels.shape[0], *lead, levels.shape[-1])
        else:
            x_hat = self.decode(vals, idx, selection.grouping)
            if self.W_skip is not None:
                x_hat = x_hat + self._skip(x)
        width = vals.shape[-1]  # k, or a BatchTopK batch's k_max
        return SAEOutput(x_hat.reshape(*lead, x_hat.shape[-1]), vals.reshape(*lead, width), idx.reshape(*lead, width),
                         levels)

    @torch.no_grad()
    def update_threshold_(self, vals: torch.Tensor) -> None:
        """BatchTopK: move the JumpReLU threshold toward this training batch's smallest selected activation
        (vals [B, k_max], zero-padded): ``t <- (1 - threshold_lr) t + threshold_lr * min``; the first
        batch sets it. A batch where nothing fired leaves it. On the device, no host sync."""
        if vals.numel() == 0:
            return
        positive = vals > 0
        smallest = torch.where(positive, vals, torch.inf).amin().to(torch.float64)
        rate = self.arch.threshold_lr
        moved = torch.where(self.threshold < 0, smallest, (1 - rate) * self.threshold + rate * smallest)
        self.threshold.copy_(torch.where(positive.any(), moved, self.threshold))

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
            "architecture": self.arch.to_dict(),
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``cfg.json`` + ``model.safetensors`` into directory ``path``, each file atomically.

        The weights file holds the parameters and the saved buffers (a BatchTopK model's float64 ``threshold``).
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
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
            metadata=cfg.get("metadata"), arch=saved_architecture(cfg), **kwargs,
        )
        sae.load_state_dict({name: t if name in BUFFERS else t.to(dtype) for name, t in state.items()})
        return sae


# Saved tensors that are not parameters: name -> dtype (kept whatever the model's dtype).
BUFFERS = {"threshold": torch.float64}


def saved_architecture(cfg: dict[str, Any]) -> Architecture:
    """The `Architecture` of a checked ``cfg.json`` (a plain TopK SAE when it names none)."""
    return Architecture.from_dict(cfg["architecture"]) if "architecture" in cfg else Architecture()


def _parameter_shapes(d_model: int, n_features: int, arch: Architecture) -> dict[str, tuple[int, ...]]:
    """The saved tensors' names and shapes."""
    d_out = arch.output_width(d_model)
    shapes = {"W_enc": (n_features, d_model), "b_enc": (n_features,), "W_dec": (n_features, d_out), "b_dec": (d_out,)}
    if arch.skip_connection:
        shapes["W_skip"] = (d_out, d_model)
    if arch.batch_topk:
        shapes["threshold"] = ()
    return shapes


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
        saved_architecture(cfg).check(cfg["d_model"], cfg["n_features"])
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
    expected = _parameter_shapes(cfg["d_model"], cfg["n_features"], saved_architecture(cfg))
    if set(state) != set(expected):
        raise InputError(f"{file} holds tensors {sorted(state)}; a flashsae SAE has {sorted(expected)}")
    config_file = file.parent / CONFIG_FILE
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise InputError(
                f"{file}: {name} has shape {list(state[name].shape)}, but {config_file} (d_model={cfg['d_model']}, "
                f"n_features={cfg['n_features']}) needs {list(shape)}"
            )
        wanted = dtype_name(BUFFERS[name]) if name in BUFFERS else cfg["dtype"]
        if dtype_name(state[name].dtype) != wanted:
            whose = "a flashsae SAE keeps it in" if name in BUFFERS else f"{config_file} says dtype"
            raise InputError(f"{file}: {name} is {dtype_name(state[name].dtype)}, but {whose} {wanted}")
    return state


def require_dead_mask(dead: object, n_features: int) -> None:
    """TypeError naming ``dead`` unless it is a bool tensor of shape [n_features]."""
    if not isinstance(dead, torch.Tensor) or dead.dtype != torch.bool or tuple(dead.shape) != (n_features,):
        raise TypeError(f"dead must be a bool tensor of shape ({n_features},), got "
                        f"{getattr(dead, 'dtype', type(dead).__name__)} {tuple(getattr(dead, 'shape', ()))}")


def _local_slots(vals: torch.Tensor, idx: torch.Tensor, row_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(local row of each slot, vals zeroed where the slot's feature is not among ``row_ids`` [n] ascending)."""
    local = torch.searchsorted(row_ids, idx).clamp_(max=max(row_ids.shape[0] - 1, 0))
    vals = vals * (row_ids[local] == idx) if row_ids.shape[0] else torch.zeros_like(vals)
    return local, vals


def _orthogonal(g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``g - <g, w> w`` per row, in fp32 (float64 for float64 rows; w unit rows): [n, d], [n, d] -> [n, d]."""
    math = torch.float64 if torch.float64 in (g.dtype, W.dtype) else torch.float32
    g, W = g.to(math), W.to(math)
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
