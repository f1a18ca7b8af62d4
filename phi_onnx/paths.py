"""Paths the user typed: `~` expanded without a traceback, and names shown on a terminal without its escapes."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from phi_onnx.errors import PhiOnnxError


class PathError(PhiOnnxError):
    """A path cannot be interpreted (a `~user` that does not exist, no home directory)."""


def expand_user(path: str | os.PathLike[str], *, what: str = "The path",
                error: type[PhiOnnxError] = PathError) -> Path:
    """`path` with a leading `~` or `~user` expanded.

    Raises:
        PhiOnnxError (`error`): `~user` names no user here, or `~` has no home directory to stand for
            (pathlib raises a bare RuntimeError for both); or the path is longer than the file system
            takes (every later exists()/is_dir() would raise OSError "File name too long").
    """
    try:
        expanded = Path(path).expanduser()
    except RuntimeError:
        text = os.fspath(path)
        user = text[1:].split("/", 1)[0].split(os.sep, 1)[0]
        why = f"there is no user {user!r} on this machine" if user else "this process has no home directory ($HOME)"
        raise error(f"{what} {text!r} starts with ~{user}, but {why}.",
                    hint="Give an absolute path (or ~/... for your own home folder).") from None
    text = os.fspath(expanded)
    longest = max((len(os.fsencode(part)) for part in expanded.parts), default=0)
    if len(os.fsencode(text)) >= _limit("PC_PATH_MAX", 4096) or longest > _limit("PC_NAME_MAX", 255):
        shown = text if len(text) <= 80 else f"{text[:40]}...{text[-20:]}"
        raise error(f"{what} {printable(shown)!r} is too long for the file system ({len(text)} characters; a "
                    f"name in it has {longest} bytes).", hint="Check the path: it cannot name a file here.")
    return expanded


def _limit(name: str, default: int) -> int:
    try:
        return os.pathconf("/", name)
    except (OSError, ValueError, AttributeError):
        return default


def printable(text: str) -> str:
    """`text` safe to print on a terminal: control and other non-printing characters escaped (`\\x1b`, `\\u202e`).

    A store entry's name is whatever path or name a user typed, so an escape sequence in a folder name
    would otherwise reach the terminal (recolouring or rewriting the lines around it).
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if unicodedata.category(char) == "Zs":  # a non-breaking or wide space reads as a space
        return char
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
