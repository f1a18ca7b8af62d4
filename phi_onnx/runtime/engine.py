"""What both backends share: a KV cache that remembers which tokens it holds.

A backend runs forward passes (`_forward`); this base class decides how much of the cache a new
sequence can reuse, and enforces the LongRoPE rule transformers follows: entries computed while the
sequence fit the original context (short factors) are never mixed with entries computed after it
outgrew it (long factors). When the sequence crosses that point, the whole sequence is run again
from an empty cache, exactly once, as `Phi3ForCausalLM.prepare_inputs_for_generation` does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

#: Buffers grow in steps of this many tokens, so a chat's next turn usually fits the same buffer.
CAPACITY_STEP = 256


def round_capacity(tokens: int, limit: int | None = None) -> int:
    """`tokens` rounded up to a CAPACITY_STEP multiple, but never past `limit` (unless tokens is)."""
    rounded = -(-tokens // CAPACITY_STEP) * CAPACITY_STEP
    return max(tokens, min(rounded, limit)) if limit else rounded


class CachedEngine:
    """Base class of the backends: batch-1 prefix reuse and the LongRoPE recompute rule.

    Subclasses set `backend`, `provider`, `max_batch`, and implement `prepare`, `_forward` (one
    sequence: run `tokens` after the first `past` cached ones, return the last logits [vocab]) and,
    when `max_batch` > 1, `forward_rows`.
    """

    backend = ""
    provider = ""
    max_batch: int | None = None

    def __init__(self, long_context_threshold: int | None) -> None:
        self.long_threshold = long_context_threshold
        self.cached: list[int] = []  # tokens whose keys/values the cache holds (batch 1)
        self.cached_long = False  # whether those entries were computed with LongRoPE's long factors
        self.recomputes = 0  # how many times a LongRoPE switch forced a full recompute

    def prepare(self, batch: int, capacity: int) -> None:
        """Make room for `batch` sequences of up to `capacity` tokens (may forget the cache)."""
        raise NotImplementedError

    def _forward(self, tokens: Sequence[int], past: int) -> np.ndarray:
        raise NotImplementedError

    def forward_rows(self, rows: Sequence[Sequence[int]], pasts: Sequence[int]) -> np.ndarray:
        """Batched step: row b's `rows[b]` follow its first `pasts[b]` cached tokens; last logits [batch, vocab]."""
        raise NotImplementedError(f"the {self.backend} backend runs one sequence at a time")

    def is_long(self, length: int) -> bool:
        """Whether a sequence of `length` tokens runs with LongRoPE's long factors."""
        return self.long_threshold is not None and length > self.long_threshold

    def reusable(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` the cache can serve (at least one token is always run)."""
        limit = min(len(self.cached), len(tokens) - 1)
        if list(tokens[:limit]) == self.cached[:limit]:  # the usual decode step: compared in C, not a loop
            same = limit
        else:
            same = 0
            while same < limit and self.cached[same] == tokens[same]:
                same += 1
        if same and self.long_threshold is not None and self.cached_long != self.is_long(len(tokens)):
            return 0
        return same

    def extend(self, tokens: Sequence[int]) -> np.ndarray:
        """Run the sequence `tokens` (batch 1), reusing the cached prefix; returns the last logits [vocab]."""
        past = self.reusable(tokens)
        if not past and self.cached and self.is_long(len(tokens)) and not self.cached_long:
            self.recomputes += 1
            log.debug("LongRoPE: %d tokens pass the original context %s; recomputing the cache with the "
                      "long factors", len(tokens), self.long_threshold)
        try:
            logits = self._forward(tokens[past:], past)
        except BaseException:
            self.forget()  # an interrupted run may have written part of the cache
            raise
        self.cached = list(tokens)
        if not past:
            self.cached_long = self.is_long(len(tokens))
        return logits

    def forget(self) -> None:
        """Drop what the cache holds (its memory stays allocated)."""
        self.cached = []
        self.cached_long = False

    def close(self) -> None:
        """Release sessions and buffers."""
