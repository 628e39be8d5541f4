"""Writing the commands' files: atomically (a crash leaves either the old file or the new one, never half
of one), with the permissions the user's umask gives, into output directories made up front."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

from ..errors import ConfigError

_FILE_MODE = 0o666  # what open() asks for; the process umask takes its bits away, as for any other file


def _create_temporary(target: Path) -> str:
    """A new empty file next to ``target`` with the permissions the user's umask gives (mkstemp's are 0600)."""
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))
            return str(tmp)
        except FileExistsError:
            continue


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``target``, fsync it, then rename it over ``target``."""
    tmp = _create_temporary(target)
    mode = os.stat(tmp).st_mode & 0o777  # 0o666 less the umask
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that made the file anew (safetensors: 0600)
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_output_dir(path: Path, option: str = "--out") -> Path:
    """Create directory ``path`` (and its parents) before any work; ConfigError naming ``option`` and the
    reason (a read-only file system, a file in the way, no permission) when that is impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    return path
