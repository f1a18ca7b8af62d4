"""What `Generation` needs from a backend: start a batch of prompts, then add each row's new tokens.

Two backends implement it: the ort backend (`ort_backend.OrtEngine`, over the shared `DecodeCore`
and a KVPool of the model's) and onnxruntime-genai (`genai_backend.GenaiEngine`, batch 1, its own
cache). Both keep their cache between calls, so a call whose prompt starts with what the cache
holds (the next chat turn) runs only the rest, under the LongRoPE rule (`longrope.LongRope`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

#: Buffers grow in steps of this many tokens, so a chat's next turn usually fits the same buffer.
CAPACITY_STEP = 256


def round_capacity(tokens: int, limit: int | None = None) -> int:
    """`tokens` rounded up to a CAPACITY_STEP multiple, but never past `limit` (unless tokens is)."""
    rounded = -(-tokens // CAPACITY_STEP) * CAPACITY_STEP
    return max(tokens, min(rounded, limit)) if limit else rounded


class Engine(Protocol):
    """A backend as `Generation` drives it. `max_batch` is None when any batch runs at once."""

    backend: str
    provider: str
    max_batch: int | None
    recomputes: int

    def start(self, prompts: Sequence[Sequence[int]], capacity: int, *,
              adapter: str | None = None) -> tuple[np.ndarray, int]:
        """Run the prompts (row b in slot b) with switchable LoRA `adapter` (None: the base), in a cache of
        at least `capacity` tokens per row; returns (last logits [rows, vocab], prompt tokens served from
        the cache)."""
        ...

    def step(self, tokens: Mapping[int, Sequence[int]]) -> Mapping[int, np.ndarray]:
        """Add each row's new tokens ({row: [token, ...]}: one sampled token, followed by those its grammar
        forces when it fast-forwards); returns {row: the last new token's logits [vocab]}."""
        ...

    def forget(self) -> None:
        """Drop what the cache holds (the next call computes its whole prompt)."""
        ...

    def close(self) -> None:
        """Release sessions and buffers."""
        ...
