"""Argument checks shared by the ops, the model and the training options: one message per kind of mistake.

Every check raises with the argument's name (as the caller spells it: ``"k"``, ``"--batch-size"``)
and the value it got; none of them touches a tensor's data, so they never synchronize a device.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

# The floating dtypes flashsae stores parameters and activations in, by the names configs use.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The floating dtypes the ops take: DTYPES, and float64 (on the torch backend).
OP_DTYPES: tuple[torch.dtype, ...] = (*DTYPES.values(), torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32, and so on."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, *, arg: str = "dtype") -> torch.dtype:
    """The torch dtype named ``name`` (a key of `DTYPES`); ValueError naming ``arg`` otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{arg} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def require_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [low, high]; TypeError (not an int) or ValueError
    (out of range) naming ``name`` otherwise."""
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer {bounds}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return value


def require_k(k: Any, n_features: int, *, name: str = "k", features_name: str = "n_features") -> int:
    """``k`` if it is an int in [1, n_features]; TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_features:
        raise ValueError(f"{name} must be in [1, {features_name}={n_features}], got {name}={k}")
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


def device_or_default(name: str, value: str | None) -> torch.device:
    """The torch device named ``value``, or (for None) cuda when it is available, else cpu; ValueError naming ``name``."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(name, value)


def require_real(name: str, value: Any, *, low: float | None = None, below: float | None = None) -> float:
    """``value`` if it is a real number (not a bool) with low <= value < below (either bound optional);
    ValueError naming ``name`` otherwise. NaN fails every bound."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (below is None or value < below)
    if not ok:
        bounds = [f">= {low}"] * (low is not None) + [f"< {below}"] * (below is not None)
        raise ValueError(f"{name} must be a real number {' and '.join(bounds)}".rstrip() + f", got {value!r}")
    return value


def require_dtype(name: str, dtype: Any, allowed: tuple[torch.dtype, ...] | list[torch.dtype]) -> torch.dtype:
    """``dtype`` if it is one of ``allowed``; TypeError naming ``name`` and the allowed dtypes otherwise."""
    if dtype not in allowed:
        names = [dtype_name(d) for d in allowed]
        choices = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise TypeError(f"{name} must be {choices}, got {dtype}")
    return dtype


def require_float_tensor(
    name: str, t: Any, dims: int, dtypes: tuple[torch.dtype, ...] | None = None
) -> torch.Tensor:
    """``t`` if it is a ``dims``-D tensor of one of ``dtypes`` (default: the `DTYPES` dtypes);
    TypeError / ValueError naming ``name`` otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    require_dtype(name, t.dtype, dtypes or tuple(DTYPES.values()))
    return t


def require_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> torch.Tensor:
    """``t`` if it has ``ref``'s device (and dtype, unless ``dtype=False``); TypeError / ValueError naming both otherwise."""
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")
    return t


def require_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    """``t`` if its shape is ``expected``; ValueError naming ``name`` otherwise."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
    return t
