"""Schedules over training steps: functions of the number of steps already taken.

A schedule depends on nothing but that number, so a resumed run (which restores the step count)
continues it exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from ..checks import require_choice, require_int, require_number

# How the learning rate decays over the last steps of a run (`lr_factor`).
LR_DECAYS = ("none", "linear", "cosine")


def linear_k(k_start: int, k_end: int, steps: int) -> Callable[[int], int]:
    """k falling linearly from ``k_start`` (before step 1) to ``k_end`` (after ``steps`` steps), then constant.

    Rounded to the nearest integer, never below ``k_end``; ``steps = 0`` is ``k_end`` throughout.
    """
    if steps <= 0 or k_start == k_end:
        return lambda step: k_end

    def k_at(step: int) -> int:
        frac = min(max(step, 0), steps) / steps
        return max(k_end, round(k_start + (k_end - k_start) * frac))

    return k_at


def lr_factor(
    total_steps: int,
    *,
    warmup_steps: int = 0,
    decay: str = "none",
    decay_steps: int | None = None,
    final_fraction: float = 0.1,
) -> Callable[[int], float]:
    """The learning-rate multiplier of the step taken after ``step`` steps (SAELens' shape).

    - Warm-up: step s < ``warmup_steps`` runs at ``(s + 1) / warmup_steps`` (a linear ramp whose
      last warm-up step is at the full rate).
    - Then constant, until the last ``decay_steps`` steps of ``total_steps`` (None: every step after
      the warm-up), over which ``decay`` ("linear" or "cosine") brings it from 1 to ``final_fraction``,
      reached at the last step: with ``p = (s - start + 1) / decay_steps``, linear is
      ``1 - (1 - f) p`` and cosine ``f + (1 - f) (1 + cos(pi p)) / 2``. "none" never decays.
    - Where the warm-up and the decay overlap, the smaller factor applies. Steps past
      ``total_steps`` keep the final factor.
    """
    require_int("total_steps", total_steps, 1)
    require_int("warmup_steps", warmup_steps, 0)
    require_choice("decay", decay, LR_DECAYS)
    require_number("final_fraction", final_fraction, 0.0)
    if final_fraction > 1:
        raise ValueError(f"final_fraction must be at most 1, got {final_fraction}")
    if decay_steps is None:
        decay_steps = max(total_steps - warmup_steps, 0)
    require_int("decay_steps", decay_steps, 0)
    decay_start = total_steps - decay_steps

    def warm(step: int) -> float:
        return (step + 1) / warmup_steps if step < warmup_steps else 1.0

    def decayed(step: int) -> float:
        if decay == "none" or decay_steps == 0 or step < decay_start:
            return 1.0
        p = min(step - decay_start + 1, decay_steps) / decay_steps
        if decay == "linear":
            return 1.0 - (1.0 - final_fraction) * p
        return final_fraction + (1.0 - final_fraction) * (1.0 + math.cos(math.pi * p)) / 2

    return lambda step: min(warm(max(step, 0)), decayed(max(step, 0)))
