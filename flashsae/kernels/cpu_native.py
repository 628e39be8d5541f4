"""The torch backend's C++ CPU kernels (`cpu_kernels.cpp`): built on first use, loaded once per process.

The encoder's threshold select and SparseAdam's row step are, in torch ops, tens of passes over
memory per chunk or block; each is one loop in C++. `torch.utils.cpp_extension.load` compiles the
source with the machine's C++ compiler and ninja (about a minute, once: the build is cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, and reused while the source is
unchanged; a lock left behind by an interrupted build is removed once it is older than any build).
`kernels` returns the loaded module, or None when the kernels are switched off
(``FLASHSAE_CPU_KERNELS=0``) or cannot be built here (a warning says why, once); the torch backend
then runs its torch ops instead: the same selection and the same Adam step, up to the rounding of
sums (the kernels accumulate row norms in float64). `build` builds them ahead of time.
"""
from __future__ import annotations

import functools
import os
import time
import warnings
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# The extension's name: part of its cache folder, so a different flashsae never loads another's build.
EXTENSION_NAME = "flashsae_cpu_kernels_v1"
SWITCH = "FLASHSAE_CPU_KERNELS"
# torch's JIT build holds a lock, a file named "lock" in the build folder, and waits without a limit while
# that file exists; a build that was killed (Ctrl-C, OOM) leaves it behind, and every later load would hang
# silently. A lock older than this (a build takes about a minute) is stale and is removed, with a warning.
STALE_LOCK_SECONDS = 15 * 60
# -fno-math-errno: sqrt without errno, so the Adam loop vectorizes (nothing reads errno). -Wno-psabi: the
# 32-byte vector helpers are only ever inlined into the AVX2 build, so their ABI note does not apply.
CFLAGS = ["-O3", "-fno-math-errno", "-Wno-psabi"]


def enabled() -> bool:
    """Whether the C++ kernels may be used (``FLASHSAE_CPU_KERNELS`` is not "0")."""
    return os.environ.get(SWITCH, "1") != "0"


def kernels() -> ModuleType | None:
    """The loaded C++ kernels, or None (switched off, or they could not be built: warned once)."""
    return _load() if enabled() else None


@functools.cache
def _load() -> ModuleType | None:
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    try:
        _remove_stale_build_lock()
        return cpp_extension.load(name=EXTENSION_NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
    except Exception as err:  # no compiler or ninja, a read-only cache, ...: the torch ops still run
        warnings.warn(f"flashsae's C++ CPU kernels could not be built ({type(err).__name__}: {err}); the torch "
                      f"backend runs its torch ops on the CPU instead (the same selections and, up to rounding, the "
                      f"same Adam steps; slower)", RuntimeWarning,
                      stacklevel=3)
        return None


def _remove_stale_build_lock() -> None:
    """Remove the build folder's lock when it is older than STALE_LOCK_SECONDS (see there), with a warning."""
    from torch.utils import cpp_extension

    lock = Path(cpp_extension._get_build_directory(EXTENSION_NAME, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(f"removing the stale build lock {lock} ({age / 60:.0f} minutes old: an earlier build of "
                      f"flashsae's C++ CPU kernels was interrupted)", RuntimeWarning, stacklevel=4)
        lock.unlink(missing_ok=True)


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ninja package's binary sits in the environment's bin folder, which
    is not on PATH when the environment's python runs without being activated. Appended, so whatever PATH
    already finds keeps precedence."""
    try:
        import ninja
    except ImportError:  # ninja from the system, if any
        return
    folders = [folder for folder in os.environ.get("PATH", "").split(os.pathsep) if folder]
    if ninja.BIN_DIR not in folders:
        os.environ["PATH"] = os.pathsep.join([*folders, ninja.BIN_DIR])


def build() -> bool:
    """Build and load the kernels now (``make setup`` runs this, so no later process waits on the compiler);
    True when they are available."""
    return kernels() is not None
