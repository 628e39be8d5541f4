"""Argument checks shared by the ops, the model and the training options: one message per kind of mistake.

Every check raises with the argument's name (as the caller spells it: ``"k"``, ``"--batch-size"``)
and the value it got; none of them touches a tensor's data, so they never synchronize a device.
"""
from __future__ import annotations

import math
from typing import Any

import torch

# The floating dtypes flashsae stores parameters and activations in, by the names configs use.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest k the kernels select per row.
MAX_K = 512


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32, and so on."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, *, arg: str = "dtype") -> torch.dtype:
    """The torch dtype named ``name`` (a key of `DTYPES`); ValueError naming ``arg`` otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{arg} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def require_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [low, high]; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return value


def require_k(k: Any, n_features: int, *, name: str = "k", features_name: str = "n_features") -> int:
    """``k`` if it is an int in [1, min(n_features, MAX_K)]; TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= min(n_features, MAX_K):
        raise ValueError(f"{name} must be in [1, min({features_name}={n_features}, {MAX_K})], got {name}={k}")
    return k


def require_choice(name: str, value: Any, allowed: tuple[Any, ...] | list[Any]) -> Any:
    """``value`` if it is one of ``allowed``; ValueError naming ``name`` and the choices otherwise."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def require_number(name: str, value: Any, low: float = 0.0, *, strict: bool = False) -> float:
    """``value`` if it is a finite real number (not a bool) >= low (> low when ``strict``); ValueError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return value


def require_count_or_fraction(name: str, value: Any) -> float:
    """``value`` if it is a count (a whole number >= 1) or a fraction in (0, 1); ValueError naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (value >= 1 and value != int(value)):
        raise ValueError(f"{name} must be a count (a whole number >= 1) or a fraction in (0, 1), got {value!r}")
    return value


def parse_device(name: str, value: Any) -> torch.device:
    """The torch device named ``value`` ('cpu', 'cuda', 'cuda:1', ...); ValueError naming ``name`` otherwise."""
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:  # torch's message lists every device type it knows
            pass
    raise ValueError(f"{name} must be a torch device such as cpu, cuda or cuda:1, got {value!r}")
