"""The LongRoPE rule, in one place: which rotary factors a run uses, and what that forbids.

A LongRoPE graph (Phi-3-mini-128k, Phi-4-mini) picks its rotary factors from the width of the
run's attention mask: short factors while it is at most `original_max_position_embeddings`,
long factors beyond. transformers does the same per forward, and when a sequence outgrows the
original context it runs the whole sequence again with the long factors
(`Phi3ForCausalLM.prepare_inputs_for_generation`). So, for exactness:

- a run's rows must all want the same factors (their *run key*; `key`), since the run's width
  decides for all of them;
- cached entries computed with one set of factors are never extended by a run with the other
  (`reusable`), and a sequence that crosses the switch is recomputed once from empty
  (`must_recompute`);
- from an empty cache, the first prompt chunk of a sequence past the switch already crosses it
  (`chunks`), so every entry is computed with the long factors, as one run would.

Models without LongRoPE have `threshold` None: every rule here is then a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LongRope:
    """The rule for one model. threshold: original_max_position_embeddings, or None (no LongRoPE)."""

    threshold: int | None

    def is_long(self, length: int) -> bool:
        """Whether a run whose mask is `length` wide uses the long factors."""
        return self.threshold is not None and length > self.threshold

    def key(self, width: int) -> bool:
        """The run key of a row that needs a mask `width` wide: rows share a run only with equal keys."""
        return self.is_long(width)

    def must_recompute(self, cached_long: bool, length: int) -> bool:
        """Whether a sequence whose cache holds short-factor entries must be run again from empty
        before it can reach `length` tokens."""
        return not cached_long and self.is_long(length)

    def reusable(self, held: Sequence[int], cached_long: bool, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` a cache holding `held` (computed with the long factors
        when `cached_long`) can serve; at least one token of `tokens` is always left to run."""
        limit = min(len(held), len(tokens) - 1)
        if limit <= 0:
            return 0
        same = common_prefix(held[:limit], tokens[:limit])
        if same and self.threshold is not None and cached_long != self.is_long(len(tokens)):
            return 0  # the entries were computed with the other factors
        return same

    def first_chunk_end(self, total: int, end: int) -> int:
        """Where a sequence of `total` tokens' first run from an empty cache must end, given that the caller
        wants it to end at `end`: past the switch when the sequence is."""
        return max(end, self.threshold + 1) if self.threshold is not None and self.is_long(total) else end

    def chunks(self, start: int, end: int, chunk: int) -> list[tuple[int, int]]:
        """Bounds of the runs that compute positions [start, end), each at most `chunk` long, except
        that from an empty cache a sequence ending past the switch gets a first run that crosses it."""
        bounds: list[tuple[int, int]] = []
        first = self.first_chunk_end(end, start + chunk) if start == 0 else start + chunk
        while start < end:
            stop = min(end, first if not bounds else start + chunk)
            bounds.append((start, stop))
            start = stop
        return bounds


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of token sequences `a` and `b`."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the common case, compared in C
        return n
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0])
