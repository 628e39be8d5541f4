"""Errors the user fixes, as opposed to bugs: the command line prints these in one line, bugs with a traceback.

- `UserError`: the base; its message names the culprit (the option, the file, the input).
- `ConfigError`: an option's value, or a combination of options, that cannot work.
- `InputError`: a file, directory or data the command reads that is missing or unusable;
  `InputNotFoundError` where it does not exist.

Both subclasses are also ValueErrors (and `InputNotFoundError` a FileNotFoundError), so Python callers
that catch those keep working.
`reraise_as` turns a library call's documented errors into one of these where a command calls it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """An error the user fixes by changing an option, a file or the input; the message names which."""


class ConfigError(UserError, ValueError):
    """An option's value (or a combination of options) that cannot work; the message names the option."""


class InputError(UserError, ValueError):
    """A file, directory or data the command reads that is missing or unusable; the message names it."""


class InputNotFoundError(InputError, FileNotFoundError):
    """A file or directory the command reads that does not exist; the message names it."""


@contextmanager
def reraise_as(kind: type[UserError], *causes: type[Exception], culprit: str = "") -> Iterator[None]:
    """Within the block, an exception of one of ``causes`` becomes ``kind`` (message prefixed ``culprit: ``).

    For a command calling a library function whose errors of those types are the user's to fix (a
    missing checkpoint, a rejected file format); a UserError passes through unchanged.
    """
    try:
        yield
    except UserError:
        raise
    except causes as err:
        raise kind(f"{culprit}: {err}" if culprit else str(err)) from err
