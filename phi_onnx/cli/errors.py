"""How every command reports user errors: one paragraph on stderr, exit code 2, no traceback."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from phi_onnx.errors import PhiOnnxError

F = TypeVar("F", bound=Callable[..., Any])

# Library messages name both spellings, "Pass --overwrite (overwrite=True)"; on the command line only the
# option is meaningful.
_API_SPELLING = re.compile(r" \(\w+=(?:True|False|None|\d+|'[^']*'|\"[^\"]*\")\)")


# ... and "device='cuda' cannot be used" reads "--device cuda cannot be used" here.
_API_KEYWORD = re.compile(r"\b(device|backend)=(?:'([^']*)'|([\w:]+)\b)")


def cli_wording(message: str) -> str:
    """`message` in the command line's words: no Python spelling of an option (`overwrite=True`, `device='cuda'`)."""
    message = _API_SPELLING.sub("", message)
    return _API_KEYWORD.sub(lambda m: f"--{m.group(1)} {m.group(2) or m.group(3)}", message)


def user_errors(func: F | None = None, *, interrupted: str = "Interrupted; nothing was written.") -> Any:
    """Print PhiOnnxError as one paragraph (no traceback), exit 2; Ctrl-C prints `interrupted`, exit 130."""
    def decorate(inner: F) -> F:
        @wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return inner(*args, **kwargs)
            except PhiOnnxError as error:
                click.echo(f"Error: {cli_wording(str(error))}", err=True)
                sys.exit(2)
            except KeyboardInterrupt:
                click.echo(interrupted, err=True)
                sys.exit(130)
        return wrapper  # type: ignore[return-value]
    return decorate(func) if func is not None else decorate
