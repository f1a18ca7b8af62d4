"""KV of prompt prefixes kept beyond the slots: many conversations and common system prompts survive
while their slots serve others.

When the scheduler gives a free slot to a request that shares nothing with what the slot holds, the
slot's contents would be lost; the `PrefixStore` copies them out first (at least `min_tokens`), into
host memory, within a byte budget, least recently used out first. A later request whose prompt starts
with a stored prefix gets those rows copied into its slot instead of computing them. Rows for
positions < n depend only on tokens < n, so a stored prefix serves any prompt sharing its first m
tokens (m at most its length): the granularity is one token.

Entries carry the LongRoPE regime they were computed in, and are matched under `LongRope.reusable`.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from phi_onnx.runtime.kv_pool import KVPool
from phi_onnx.runtime.longrope import LongRope

log = logging.getLogger(__name__)

#: Shortest prefix worth storing (shorter ones cost more bookkeeping than their prefill).
MIN_TOKENS = 32


@dataclass
class _Entry:
    tokens: list[int]
    long: bool
    adapter: str | None  # the switchable LoRA adapter the rows were computed with (None: the base)
    rows: list[np.ndarray]  # per pool buffer: [kv_heads, n, head_dim]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)


class PrefixStore:
    """A byte-bounded LRU store of slot prefixes (CPU pools only)."""

    def __init__(self, budget_bytes: int, rope: LongRope, *, min_tokens: int = MIN_TOKENS) -> None:
        self.budget = max(int(budget_bytes), 0)
        self.rope = rope
        self.min_tokens = min_tokens
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.nbytes = 0
        self.saved = self.restored = self.evicted = 0
        self._ids = itertools.count()

    def match(self, tokens: Sequence[int], adapter: str | None = None) -> tuple[int | None, int]:
        """(entry id, tokens of `tokens` it can serve) for the best entry computed with `adapter`, or (None, 0)."""
        best, length = None, 0
        for key, entry in self.entries.items():
            if entry.adapter != adapter:
                continue
            n = self.rope.reusable(entry.tokens, entry.long, tokens)
            if n > length:
                best, length = key, n
        return best, length

    def save(self, pool: KVPool, slot: int) -> None:
        """Copy what `slot` holds into the store (unless too short, already stored, or over the budget)."""
        held, adapter = pool.held[slot], pool.adapter[slot]
        n = len(held)
        if n < self.min_tokens or not self.budget or pool.device != "cpu":
            return
        # Already stored whole (this conversation was restored and not extended): keep the entry, refresh it.
        for key, entry in self.entries.items():
            if len(entry.tokens) >= n and (entry.long, entry.adapter) == (pool.long[slot], adapter) and \
                    entry.tokens[:n] == held:
                self.entries.move_to_end(key)
                return
        rows = [np.array(buffer[slot, :, :n]) for buffer in pool.buffers]
        entry = _Entry(list(held), pool.long[slot], adapter, rows)
        if entry.nbytes > self.budget:
            return
        # An entry this one extends is now redundant.
        for key in [k for k, e in self.entries.items()
                    if len(e.tokens) <= n and (e.long, e.adapter) == (entry.long, adapter)
                    and held[: len(e.tokens)] == e.tokens]:
            self._drop(key)
        while self.nbytes + entry.nbytes > self.budget and self.entries:
            self._drop(next(iter(self.entries)))
            self.evicted += 1
        self.entries[next(self._ids)] = entry
        self.nbytes += entry.nbytes
        self.saved += 1

    def restore(self, key: int, n: int, pool: KVPool, slot: int) -> None:
        """Copy the entry's first `n` tokens' rows into `slot` (which then holds exactly those tokens)."""
        entry = self.entries[key]
        for buffer, rows in zip(pool.buffers, entry.rows, strict=True):
            buffer[slot, :, :n] = rows[:, :n]
        pool.held[slot], pool.long[slot], pool.adapter[slot] = list(entry.tokens[:n]), entry.long, entry.adapter
        self.entries.move_to_end(key)
        self.restored += 1

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes

    def clear(self) -> None:
        """Drop every entry."""
        self.entries.clear()
        self.nbytes = 0
