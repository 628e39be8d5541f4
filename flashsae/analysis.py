"""Effective rank of activation spectra, and plots of spectra and ranks.

Two views of "how many dimensions does this site use":
  - entropy effective rank (Roy & Vetterli 2007): p_i = s_i / sum_j s_j,
    erank = exp(-sum_i p_i log p_i), with 0 log 0 = 0;
  - explained-variance thresholds: the number of leading components whose variances
    s_i^2 add up to 90 / 95 / 99% of the total.
They disagree when a few outlier dimensions dominate the variance, so both are reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .checks import require_int

__all__ = ["EffectiveRank", "effective_rank", "explained_variance_curve", "plot_spectra",
           "plot_effective_rank", "THRESHOLDS"]

THRESHOLDS = (0.90, 0.95, 0.99)
# Relative slack when comparing a cumulative variance fraction with a threshold, so that a
# spectrum reaching exactly 90% at k components counts k despite rounding.
_REL_TOL = 1e-9


@dataclass(frozen=True)
class EffectiveRank:
    """Effective-rank summary of a spectrum S [..., k]; every field has shape [...].

    erank: entropy effective rank (float64). n90 / n95 / n99: components needed for
    90 / 95 / 99% of the variance (int64; -1 if not reached within the given components
    when ``total`` was passed). The *_frac fields divide by d. An all-zero spectrum gives
    erank 0 and counts 0.
    """

    erank: Tensor
    n90: Tensor
    n95: Tensor
    n99: Tensor
    d: int

    @property
    def erank_frac(self) -> Tensor:
        return self.erank / self.d

    @property
    def frac90(self) -> Tensor:
        return self.n90.double() / self.d

    @property
    def frac95(self) -> Tensor:
        return self.n95.double() / self.d

    @property
    def frac99(self) -> Tensor:
        return self.n99.double() / self.d

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers (1-D spectra only), e.g. for JSON reports."""
        if self.erank.ndim:
            raise ValueError(f"as_dict needs an unbatched result, got batch shape {tuple(self.erank.shape)}")
        return {"d": self.d, "erank": float(self.erank), "n90": int(self.n90), "n95": int(self.n95),
                "n99": int(self.n99), "erank_frac": float(self.erank_frac), "frac90": float(self.frac90),
                "frac95": float(self.frac95), "frac99": float(self.frac99)}


def _check_spectrum(S: Tensor) -> Tensor:
    if not isinstance(S, Tensor):
        raise TypeError(f"S must be a torch.Tensor, got {type(S).__name__}")
    if S.ndim < 1 or S.shape[-1] < 1:
        raise ValueError(f"S must have shape [..., k] with k >= 1, got {tuple(S.shape)}")
    if not S.is_floating_point():
        raise ValueError(f"S must have a floating dtype, got {S.dtype}")
    S = S.detach().double()
    if not torch.isfinite(S).all():
        raise ValueError("S contains NaN or Inf")
    if (S < 0).any():
        raise ValueError(f"S must be non-negative singular values, got min {S.min().item():.3g}")
    return S


def explained_variance_curve(S: Tensor, total: Optional[Union[Tensor, float]] = None) -> Tensor:
    """Cumulative explained-variance fraction [..., k] (float64) of S [..., k] sorted descending.

    total: the total variance (sum of all squared singular values, e.g. SVDResult.frob_sq)
    when S is truncated; default: sum of S**2. An all-zero spectrum gives zeros.
    """
    S = _check_spectrum(S).sort(dim=-1, descending=True).values
    var = S.square()
    if total is None:
        tot = var.sum(-1, keepdim=True)
    else:
        tot = torch.as_tensor(total).detach().to(device=S.device, dtype=torch.float64)
        tot = tot.unsqueeze(-1) if tot.ndim else tot
    cum = var.cumsum(-1)
    return torch.where(tot > 0, cum / torch.where(tot > 0, tot, 1.0), torch.zeros_like(cum))


def effective_rank(S: Tensor, d: Optional[int] = None,
                   total: Optional[Union[Tensor, float]] = None) -> EffectiveRank:
    """Entropy effective rank and 90/95/99% explained-variance counts of S [..., k].

    S: singular values (any order, >= 0; any float dtype). d: dimension the fractions refer
    to (default k). total: total variance if S is truncated (see explained_variance_curve).
    """
    S = _check_spectrum(S)
    k = S.shape[-1]
    if d is None:
        d = k
    require_int(f"d (at least len(S) = {k})", d, k)

    ssum = S.sum(-1, keepdim=True)
    p = S / torch.where(ssum > 0, ssum, 1.0)
    H = -torch.xlogy(p, p).sum(-1)
    erank = torch.where(ssum.squeeze(-1) > 0, H.exp(), torch.zeros_like(H))

    frac = explained_variance_curve(S, total)
    zero = frac[..., -1] <= 0 if total is None else (S.square().sum(-1) <= 0)
    counts = []
    for t in THRESHOLDS:
        below = (frac < t * (1 - _REL_TOL)).sum(-1)
        n = torch.where(below < k, below + 1, torch.full_like(below, -1))
        counts.append(torch.where(zero, torch.zeros_like(n), n))
    return EffectiveRank(erank, *counts, d=d)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_spectra(spectra: Mapping[str, Tensor], path: Union[str, Path], *,
                 title: str = "Cumulative explained variance", d: Optional[int] = None) -> Path:
    """One curve per label: cumulative explained-variance fraction vs component fraction.

    spectra: {label: S [k]} singular values. x = i / d (d defaults to each k). The 90/95/99%
    levels are dotted lines labelled on the right-hand axis. Writes a PNG.
    """
    plt = _plt()
    return _save(spectra_figure(plt, spectra, title=title, d=d), plt, path)


def spectra_figure(plt, spectra: Mapping[str, Tensor], *, title: str, d: Optional[int] = None):
    """The matplotlib figure `plot_spectra` saves (``plt``: matplotlib.pyplot)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for label, S in spectra.items():
        curve = explained_variance_curve(S).cpu()
        if curve.ndim != 1:
            raise ValueError(f"spectra[{label!r}] must be 1-D, got shape {tuple(S.shape)}")
        n = d if d is not None else curve.numel()
        x = torch.arange(1, curve.numel() + 1, dtype=torch.float64) / n
        ax.plot(torch.cat([torch.zeros(1, dtype=torch.float64), x]).numpy(),
                torch.cat([torch.zeros(1, dtype=torch.float64), curve]).numpy(), label=str(label))
    for t in THRESHOLDS:
        ax.axhline(t, color="grey", lw=0.6, ls=":")
    levels = ax.secondary_yaxis("right")
    levels.set_yticks(list(THRESHOLDS), labels=[f"{t:.0%}" for t in THRESHOLDS])
    levels.tick_params(labelsize="x-small", colors="grey", length=0)
    ax.set_xlabel("fraction of components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_effective_rank(ranks: Mapping[str, Mapping[Any, EffectiveRank]], path: Union[str, Path], *,
                        title: str = "Effective dimensionality per layer") -> Path:
    """Four panels (entropy erank, 90%, 95%, 99% counts, each / d) vs layer, one line per site.

    ranks: {site: {layer: EffectiveRank}} with unbatched EffectiveRank values. Writes a PNG.
    """
    plt = _plt()
    fields = (("erank_frac", "entropy effective rank / d"), ("frac90", "90% variance / d"),
              ("frac95", "95% variance / d"), ("frac99", "99% variance / d"))
    fig, axes = plt.subplots(1, len(fields), figsize=(4.0 * len(fields), 3.8), dpi=110, sharey=True)
    for site, per_layer in ranks.items():
        layers = list(per_layer)
        for ax, (field, _) in zip(axes, fields):
            ys = [float(getattr(per_layer[layer], field)) for layer in layers]
            ax.plot(range(len(layers)), ys, marker="o", label=str(site))
            ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    for ax, (_, name) in zip(axes, fields):
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of d")
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, plt, path)


def _save(fig, plt, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
