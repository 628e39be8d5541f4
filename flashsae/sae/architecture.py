"""`Architecture`: which SAE variant a `flashsae.sae.model.TopKSAE` is, declared once and saved with it.

Three independent choices on the same three primitives (select, sparse decode, sparse gradients):

- ``activation``: how codes are selected. ``"topk"``: the k largest per token. ``"batchtopk"``
  (Bussmann et al. 2024): in training, the B * k largest of the whole batch of B tokens, so tokens
  get a variable number of features (k on average); the module also keeps one threshold for the
  whole model, an exponential moving average (rate ``threshold_lr``) of each training batch's
  smallest selected activation, and in eval mode it encodes as a JumpReLU with that threshold
  (every pre-activation above it fires). One threshold, not one per feature, because that is what
  the training selection itself is: one cut across every feature of the batch; per-feature
  estimates would rest on the few batches where rare features fire.
- ``matryoshka_widths``: nested dictionaries (Bussmann et al. 2025, Nabeshima 2024): the
  reconstructions from the first m_1 < m_2 < ... < F features each add their own loss; the
  whole SAE is the last level. Empty: a plain SAE.
- ``transcoder``: encode the activations at one site and reconstruct another (``d_out`` wide, the
  input width when None): the input is not centered by ``b_dec`` (which lives in the output space).
  ``skip_connection`` adds a learned linear map of the input, ``x W_skip^T`` (W_skip [d_out, d_in],
  zero at the start), as in skip transcoders (Paulo et al. 2025).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..checks import require_choice, require_int, require_number

ACTIVATIONS = ("topk", "batchtopk")
DEFAULT_THRESHOLD_LR = 0.01  # SAELens' topk_threshold_lr


@dataclass(frozen=True)
class Architecture:
    """The variant of a TopK SAE (see the module docstring); the default is a plain TopK autoencoder."""

    activation: str = "topk"
    matryoshka_widths: tuple[int, ...] = ()
    transcoder: bool = False
    d_out: int | None = None
    skip_connection: bool = False
    threshold_lr: float = DEFAULT_THRESHOLD_LR

    def __post_init__(self) -> None:
        object.__setattr__(self, "matryoshka_widths", tuple(self.matryoshka_widths))

    def check(self, d_model: int, n_features: int) -> None:
        """ValueError / TypeError naming the field unless this is a valid variant for d_model and n_features."""
        require_choice("activation", self.activation, ACTIVATIONS)
        widths = self.matryoshka_widths
        for i, width in enumerate(widths):
            require_int(f"matryoshka_widths[{i}]", width, 1, n_features)
        if widths and (list(widths) != sorted(set(widths)) or widths[-1] != n_features):
            raise ValueError(f"matryoshka_widths must rise strictly and end at n_features={n_features}, "
                             f"got {list(widths)}")
        for name in ("transcoder", "skip_connection"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.d_out is not None:
            require_int("d_out", self.d_out)
            if not self.transcoder and self.d_out != d_model:
                raise ValueError(f"d_out={self.d_out} differs from d_model={d_model}: only a transcoder "
                                 "reconstructs another width")
        if self.skip_connection and not self.transcoder:
            raise ValueError("skip_connection needs transcoder=True (a skip autoencoder would learn the identity)")
        require_number("threshold_lr", self.threshold_lr, 0.0, strict=True)
        if self.threshold_lr > 1:
            raise ValueError(f"threshold_lr must be in (0, 1], got {self.threshold_lr}")

    @property
    def batch_topk(self) -> bool:
        return self.activation == "batchtopk"

    @property
    def nested(self) -> bool:
        """Whether there are Matryoshka levels below the whole dictionary."""
        return len(self.matryoshka_widths) > 1

    def output_width(self, d_model: int) -> int:
        """The width of the reconstruction: ``d_out``, else the input width ``d_model``."""
        return self.d_out if self.d_out is not None else d_model

    def to_dict(self) -> dict[str, Any]:
        """The JSON form saved in ``cfg.json``."""
        out = dataclasses.asdict(self)
        out["matryoshka_widths"] = list(self.matryoshka_widths)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Architecture":
        """The inverse of `to_dict`; ValueError naming an unknown field, TypeError for a non-object."""
        if not isinstance(data, dict):
            raise TypeError(f"architecture must be a JSON object, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"architecture has unknown fields {unknown}; known: {sorted(known)}")
        widths = data.get("matryoshka_widths", ())
        if not isinstance(widths, (list, tuple)):
            raise TypeError(f"matryoshka_widths must be a list of integers, got {widths!r}")
        return cls(**{**data, "matryoshka_widths": tuple(widths)})

    def describe(self) -> str:
        """A few words for logs: 'batchtopk matryoshka transcoder', 'topk'."""
        words = [self.activation]
        if self.matryoshka_widths:
            words.append("matryoshka " + "/".join(map(str, self.matryoshka_widths)))
        if self.transcoder:
            words.append("skip transcoder" if self.skip_connection else "transcoder")
        return " ".join(words)
