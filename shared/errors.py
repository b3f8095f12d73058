"""User-facing errors: bad input is reported as one line, never as a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). Printed as one line by `cli_main`."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class TrainingError(UserError):
    """Training cannot continue (e.g. a non-finite loss). The last good checkpoint is kept."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none
    (a zero-byte checkpoint makes torch raise errors with an empty message)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when it was re-raised by a DataLoader worker.

    torch re-raises worker exceptions as ``type(exc)("Caught X in DataLoader worker ...\\n<traceback>")``;
    the original message is the last line of that text, after ``module.Class: ``.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        _, sep, msg = last.partition(": ")
        text = msg if sep else last
    return " ".join(text.split("\n")[:1]) if text else type(exc).__name__


def cli_main(fn):
    """Decorator for command-line entry points: UserError -> `error: <line>` on stderr, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper
