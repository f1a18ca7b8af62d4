"""Reading a JSON file that must hold an object, with the caller's error type: one reader for every such file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi_onnx.errors import PhiOnnxError


def read_json_object(path: Path, error: type[PhiOnnxError], hint: str, object_hint: str | None = None
                     ) -> dict[str, Any]:
    """`path`'s JSON object; `error` (with `hint`) when it is unreadable, not JSON, or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem}).", hint=hint) from problem
    except (ValueError, RecursionError) as problem:  # a number over 4,300 digits; arrays nested thousands deep
        raise error(f"{path} is not JSON phi-onnx can read ({str(problem)[:200]}).", hint=hint) from problem
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object.", hint=object_hint or hint)
    return data
