"""Schedules over training steps: functions of the number of steps already taken."""
from __future__ import annotations

from collections.abc import Callable


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
