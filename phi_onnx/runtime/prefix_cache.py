"""KV of prompt prefixes kept beyond the slots: many conversations and common system prompts survive
while their slots serve others.

When the scheduler gives a free slot to a request that shares less than the slot holds, the slot's
contents would be lost; the `PrefixStore` copies them out first, into host memory, within a byte budget.
A later request whose prompt starts with stored tokens gets those rows copied into its slot instead of
computing them.

The store is a tree of blocks of `BLOCK` tokens (the last one of a sequence may be shorter): a block is
keyed by its parent block and its own tokens, so conversations that share a system prompt share its
blocks, and saving a slot copies only the blocks not stored yet (a slot's 600-token shared prefix is
copied once, not once per conversation). Rows for positions < n depend only on tokens < n, so a block
serves any prompt sharing its first tokens: matches are to the token. Least recently used leaves are
evicted first; freed blocks' memory is reused (fresh pages would cost a page fault each).

The tree has one root per LongRoPE regime and LoRA adapter: rows computed with other factors or another
adapter's weights never serve a prompt.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from phi_onnx.runtime.kv_pool import KVPool
from phi_onnx.runtime.longrope import LongRope, common_prefix

log = logging.getLogger(__name__)

#: Tokens per block: the unit of saving, sharing and eviction.
BLOCK = 32
#: Most bytes one save copies (the first blocks missing; the rest of that slot is lost): a save runs
#: between steps, so like a prefill chunk it must not stall the running streams for long. A long new
#: prefix is stored over the saves of the slots that hold it, a conversation's new turns in one.
SAVE_BYTES = 64 * 2**20
#: Evicted blocks' memory kept for reuse (beyond it, memory goes back to the allocator).
FREE_KEPT = 4
#: Shortest prefix worth storing or copying (shorter ones cost more bookkeeping than their prefill).
MIN_TOKENS = 32


@dataclass(eq=False)
class _Block:
    id: int
    parent: _Block | None
    tokens: tuple[int, ...]
    start: int  # position of its first token
    rows: np.ndarray  # [pool buffers, kv_heads, BLOCK, head_dim]; the first len(tokens) columns are valid
    children: dict[tuple[int, ...], _Block] = field(default_factory=dict)
    key: tuple[bool, str | None] | None = None  # a root's (long factors, adapter)


class PrefixStore:
    """A byte-bounded store of prompt prefixes in shared blocks (CPU pools only); see the module docstring."""

    def __init__(self, budget_bytes: int, rope: LongRope, *, min_tokens: int = MIN_TOKENS, block: int = BLOCK,
                 save_bytes: int = SAVE_BYTES) -> None:
        self.budget = max(int(budget_bytes), 0)
        self.save_bytes = save_bytes
        self.rope = rope
        self.min_tokens = min_tokens
        self.block = block
        self.roots: dict[tuple[bool, str | None], _Block] = {}  # (long factors, adapter) -> tokenless root
        self.lru: OrderedDict[int, _Block] = OrderedDict()  # every block but the roots, least recent first
        self.nbytes = 0
        self.saved = self.restored = self.evicted = 0  # slots saved, prefixes restored, blocks evicted
        self._free: list[np.ndarray] = []  # evicted blocks' memory, for reuse
        self._ids = itertools.count()

    @property
    def blocks(self) -> int:
        """Blocks held."""
        return len(self.lru)

    @property
    def tokens(self) -> int:
        """Tokens whose keys and values the store holds (a block shared by many prefixes counts once)."""
        return sum(len(b.tokens) for b in self.lru.values())

    # -- lookups --------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], adapter: str | None = None) -> tuple[_Block | None, int]:
        """(handle, n): the stored rows serve the first n tokens of `tokens` (computed with `adapter` and the
        LongRoPE factors `tokens` needs, and leaving at least one token to run); (None, 0) if none."""
        root = self.roots.get((self.rope.is_long(len(tokens)), adapter))
        limit = len(tokens) - 1
        if root is None or limit < self.min_tokens:
            return None, 0
        node, length = root, 0
        while True:
            whole = tuple(tokens[length: length + self.block])
            child = node.children.get(whole) if len(whole) == self.block and length + self.block <= limit else None
            if child is None:
                break
            node, length = child, length + self.block
        # The last block: any stored child sharing the next tokens serves them (its first columns).
        best, extra = None, 0
        rest = tokens[length: limit]
        for child in node.children.values():
            same = common_prefix(child.tokens, rest)
            if same > extra:
                best, extra = child, same
        if best is not None:
            node, length = best, length + extra
        if length < self.min_tokens:
            return None, 0
        return node, length

    def restore(self, handle: _Block, n: int, pool: KVPool, slot: int) -> None:
        """Copy the first `n` tokens' rows of `handle`'s chain into `slot` (which then holds exactly those)."""
        chain = _chain(handle)
        tokens: list[int] = []
        for block in chain:
            take = min(len(block.tokens), n - block.start)
            if take <= 0:
                break
            for index, buffer in enumerate(pool.buffers):
                buffer[slot, :, block.start: block.start + take] = block.rows[index, :, :take]
            tokens.extend(block.tokens[:take])
            self.lru.move_to_end(block.id)
        pool.held[slot] = tokens
        root = chain[0].parent
        assert root is not None and root.key is not None
        pool.long[slot], pool.adapter[slot] = root.key
        self.restored += 1

    # -- saving ---------------------------------------------------------------------------------------
    def save(self, pool: KVPool, slot: int) -> int:
        """Copy what `slot` holds into the store: only the blocks not stored yet, at most `save_bytes` of them,
        as far as the budget allows (least recently used leaves make room; the prefix being saved is never
        evicted for its own tail). Returns the bytes copied."""
        held = pool.held[slot]
        if len(held) < self.min_tokens or not self.budget or pool.device != "cpu":
            return 0
        key = (pool.long[slot], pool.adapter[slot])
        node = self.roots.get(key)
        if node is None:
            node = self.roots[key] = _Block(-1, None, (), 0, np.empty(0), key=key)
        path: set[int] = set()
        copied = 0
        for start in range(0, len(held), self.block):
            tokens = tuple(held[start: start + self.block])
            child = node.children.get(tokens)
            if child is None:
                rows = self._allocate(pool, path) if copied < self.save_bytes else None
                if rows is None:
                    break
                for index, buffer in enumerate(pool.buffers):
                    rows[index, :, : len(tokens)] = buffer[slot, :, start: start + len(tokens)]
                copied += rows.nbytes
                child = _Block(next(self._ids), node, tokens, start, rows)
                node.children[tokens] = child
                self._drop_covered(node, child)
            self.lru[child.id] = child
            self.lru.move_to_end(child.id)
            path.add(child.id)
            node = child
        self.saved += 1
        return copied

    def _drop_covered(self, parent: _Block, block: _Block) -> None:
        """Drop the shorter leaf siblings whose tokens `block` starts with: it serves all they did."""
        for tokens, sibling in list(parent.children.items()):
            if sibling is not block and not sibling.children and len(tokens) < len(block.tokens) and \
                    block.tokens[: len(tokens)] == tokens:
                self._evict(sibling)

    def _allocate(self, pool: KVPool, keep: set[int]) -> np.ndarray | None:
        """A block's memory within the budget, evicting least recently used leaves outside `keep`; None if
        none can be made."""
        shape = (len(pool.buffers), pool.layout.kv_heads, self.block, pool.layout.head_size)
        nbytes = pool.layout.token_bytes() * self.block
        while self.nbytes + nbytes > self.budget:
            victim = next((b for b in self.lru.values() if not b.children and b.id not in keep), None)
            if victim is None:
                return None
            self._evict(victim)
            self.evicted += 1
        self.nbytes += nbytes
        while self._free:
            rows = self._free.pop()
            if rows.shape == shape and rows.dtype == pool.layout.dtype:
                return rows
        return np.empty(shape, dtype=pool.layout.dtype)

    def _evict(self, block: _Block) -> None:
        assert not block.children and block.parent is not None
        del block.parent.children[block.tokens]
        del self.lru[block.id]
        self.nbytes -= block.rows.nbytes
        if len(self._free) < FREE_KEPT:
            self._free.append(block.rows)

    def clear(self) -> None:
        """Drop every block."""
        self.roots.clear()
        self.lru.clear()
        self._free.clear()
        self.nbytes = 0


def _chain(block: _Block) -> list[_Block]:
    """The blocks from the root's first child down to `block`."""
    chain = []
    node: _Block | None = block
    while node is not None and node.id != -1:
        chain.append(node)
        node = node.parent
    return chain[::-1]

