"""How every command reports user errors: one paragraph on stderr, exit code 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from phi_onnx.errors import PhiOnnxError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F | None = None, *, interrupted: str = "Interrupted; nothing was written.") -> Any:
    """Print PhiOnnxError as one paragraph (no traceback), exit 2; Ctrl-C prints `interrupted`, exit 130."""
    def decorate(inner: F) -> F:
        @wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return inner(*args, **kwargs)
            except PhiOnnxError as error:
                click.echo(f"Error: {error}", err=True)
                sys.exit(2)
            except KeyboardInterrupt:
                click.echo(interrupted, err=True)
                sys.exit(130)
        return wrapper  # type: ignore[return-value]
    return decorate(func) if func is not None else decorate
