"""Dead-feature diagnostics: per-feature firing counters, the dead fraction, and a firing-density plot.

A feature is *dead* when it has not fired in the last ``window`` tokens (the paper's convention
counts 10M tokens; a run shorter than the window reports features that never fired). Counters,
the token count included, live on the SAE's device and are updated without a host sync (so a
CUDA graph can replay the update); only `dead_fraction`, `firing_density` and `state_dict` read
them back.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import torch


class FiringTracker:
    """Per-feature firing statistics over a run.

    ``last_fired[f]``: token count at the end of the last batch in which feature ``f`` fired
    (``-1``: never); ``fire_count[f]``: how many (token, slot) pairs chose ``f`` with a positive
    value. Both int64 [F] on ``device``; ``tokens``: int64 0-d on ``device``, the tokens seen.
    """

    def __init__(self, n_features: int, window: int, device: torch.device | str | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        self.n_features, self.window = n_features, window
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self._tokens_host = 0  # the same count, kept by the host as it records batches
        self.last_fired = torch.full((n_features,), -1, dtype=torch.int64, device=device)
        self.fire_count = torch.zeros(n_features, dtype=torch.int64, device=device)

    @property
    def tokens_seen(self) -> int:
        """Tokens recorded so far, as the host counted them (no sync)."""
        return self._tokens_host

    def count_tokens(self, n: int) -> None:
        """Advance the host's count by ``n`` tokens (`update` does it; a replayed CUDA graph of it does not)."""
        self._tokens_host += n

    @torch.no_grad()
    def update(self, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Record one batch: vals [B, k], idx [B, k] int64 (a slot fires when its value is > 0); no host sync."""
        self.tokens += idx.shape[0]
        self.count_tokens(idx.shape[0])
        flat, fired = idx.reshape(-1), (vals > 0).reshape(-1)
        self.fire_count.index_add_(0, flat, fired.to(torch.int64))
        self.last_fired.scatter_reduce_(0, flat, torch.where(fired, self.tokens, -1), reduce="amax")

    def dead_mask(self) -> torch.Tensor:
        """bool [F]: features that have not fired in the last ``window`` tokens."""
        never = self.last_fired < 0
        return never | (self.last_fired <= self.tokens - self.window)

    def dead_fraction(self) -> float:
        """Fraction of features that are dead now (one host sync)."""
        return float(self.dead_mask().float().mean())

    def firing_density(self) -> torch.Tensor:
        """fp64 [F]: the fraction of tokens on which each feature fired."""
        return self.fire_count.double() / self.tokens.clamp(min=1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "tokens_seen": int(self.tokens),
            "last_fired": self.last_fired.cpu(),
            "fire_count": self.fire_count.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["last_fired"].shape != self.last_fired.shape:
            raise ValueError(
                f"firing state has {state['last_fired'].shape[0]} features, the SAE has {self.n_features}"
            )
        self.window = int(state["window"])
        self._tokens_host = int(state["tokens_seen"])
        self.tokens.fill_(self._tokens_host)
        self.last_fired.copy_(state["last_fired"])
        self.fire_count.copy_(state["fire_count"])


@torch.no_grad()
def subspace_energy_sums(W_dec: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """float64 [2]: (sum over rows of ||W_dec[f] V||^2 / ||W_dec[f]||^2, number of rows) for W_dec [n, d]
    and an orthonormal V [d, r]; their ratio is the mean fraction of a decoder row's energy inside span(V)
    (r / d for rows drawn uniformly on the sphere, 1 for rows inside the subspace)."""
    W = W_dec.double()
    inside = (W @ V.to(W.device, torch.float64)).pow(2).sum(1)
    total = W.pow(2).sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.stack([(inside / total).sum(), torch.tensor(float(W.shape[0]), dtype=torch.float64, device=W.device)])


def plot_firing_density(density: torch.Tensor, path: str | Path, *, title: str = "") -> Path:
    """Histogram of log10 firing density [F] (features that never fired in a bar of their own) -> PNG.

    A long ``title`` is wrapped onto several lines rather than cut off at the figure's edge.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = density_figure(plt, density, title=title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


TITLE_WIDTH = 60  # characters per line of a plot title: what fits a 6.4-inch figure at matplotlib's title size


def density_figure(plt, density: torch.Tensor, *, title: str = ""):
    """The matplotlib figure `plot_firing_density` saves (``plt``: matplotlib.pyplot)."""
    density = density.detach().double().cpu()
    alive = density[density > 0]
    never = int((density == 0).sum())
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if alive.numel():
        ax.hist(alive.log10().numpy(), bins=60, color="tab:blue", label=f"fired ({alive.numel()})")
    floor = float(alive.log10().min()) - 0.5 if alive.numel() else -1.0
    ax.bar([floor], [never], width=0.25, color="tab:red", label=f"never fired ({never})")
    ax.set_xlabel("log10 firing density (fraction of tokens)")
    ax.set_ylabel("features")
    ax.set_title(textwrap.fill(title or f"Feature firing density, F = {density.numel()}", TITLE_WIDTH,
                               break_long_words=True))
    ax.legend()
    fig.tight_layout()
    return fig
