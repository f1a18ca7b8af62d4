"""The ort backend for `Model`: the shared `DecodeCore` over a KVPool that the model keeps between calls.

One call runs one prompt in slot 0 (reusing the prefix the slot already holds: the previous chat
turn) or a static batch in slots 0..n-1 (one padded prefill where the rows' LongRoPE regimes
allow, then one decode run per step over the rows still going; a row that fast-forwards a grammar's
forced tokens runs them alone, in one batch-1 run). The pool grows in steps of
`CAPACITY_STEP` tokens and is reallocated (forgetting its contents) when a call needs more rows
or tokens than it has.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from phi_onnx.runtime.core import DecodeCore
from phi_onnx.runtime.engine import round_capacity
from phi_onnx.runtime.folder import ModelFolder
from phi_onnx.runtime.kv_pool import KVPool
from phi_onnx.runtime.providers import DeviceChoice

log = logging.getLogger(__name__)


class OrtEngine:
    """model.onnx in one onnxruntime InferenceSession (`core`), with the model's own KV pool (`pool`)."""

    backend = "ort"
    max_batch: int | None = None

    def __init__(self, folder: ModelFolder, device: DeviceChoice, *, threads: int | None = None) -> None:
        self.folder = folder
        self.core = DecodeCore(folder, device, threads=threads)
        self.provider = self.core.provider
        self.pool: KVPool | None = None

    @property
    def session(self) -> Any:
        """The InferenceSession."""
        return self.core.session

    @property
    def keeps_logits(self) -> bool:
        """Whether the session computes logits only for the positions asked for."""
        return self.core.keeps_logits

    @property
    def recomputes(self) -> int:
        """How many times a LongRoPE switch forced a full recompute."""
        return self.core.recomputes

    def _pool(self, rows: int, capacity: int) -> KVPool:
        pool = self.pool
        if pool is None or pool.slots != rows or pool.capacity < capacity:
            limit = self.folder.context_length
            capacity = round_capacity(capacity, limit if capacity <= limit else None)
            if pool is not None:
                pool.close()
            pool = self.pool = self.core.pool(rows, capacity)
        return pool

    def start(self, prompts: Sequence[Sequence[int]], capacity: int, *,
              adapter: str | None = None) -> tuple[np.ndarray, int]:
        """Prefill each prompt in its slot, with switchable LoRA `adapter` (None: the base); (last logits
        [rows, vocab], cached prompt tokens)."""
        self.core.check_adapter(adapter)
        pool, core = self._pool(len(prompts), capacity), self.core
        if len(prompts) == 1:
            prompt = prompts[0]
            # A cache computed with another adapter holds other keys and values: nothing of it is reusable.
            cached = core.rope.reusable(pool.held[0], pool.long[0], prompt) if pool.adapter[0] == adapter else 0
            pool.adapter[0] = adapter
            if not cached and pool.filled(0) and core.rope.must_recompute(pool.long[0], len(prompt)):
                core.recomputes += 1  # the next turn crosses the switch: the whole conversation runs again
            pool.keep(0, cached)
            logits = core.prefill(pool, 0, prompt)
            assert logits is not None
            return logits[None], cached
        for slot in range(len(prompts)):
            pool.clear(slot)
            pool.adapter[slot] = adapter
        if core.batchable(prompts):
            return core.prefill_batch(pool, list(range(len(prompts))), prompts), 0
        log.debug("prefilling %d prompts one by one: their LongRoPE regimes differ", len(prompts))
        return np.stack([core.prefill(pool, slot, prompt) for slot, prompt in enumerate(prompts)]), 0

    def step(self, tokens: Mapping[int, Sequence[int]]) -> Mapping[int, np.ndarray]:
        """Rows with one new token: one decode run (per run key) over them all; a row with several (a
        grammar's forced tokens): one batch-1 run of its own (`DecodeCore.extend`)."""
        assert self.pool is not None
        try:
            out = {row: self.core.extend(self.pool, row, new) for row, new in tokens.items() if len(new) > 1}
            out.update(self.core.decode(self.pool, {row: new[0] for row, new in tokens.items() if len(new) == 1}))
            return out
        except BaseException:
            self.forget()  # an interrupted run may have written part of the cache
            raise

    def forget(self) -> None:
        """Drop what the pool holds (its memory stays allocated)."""
        if self.pool is not None:
            for slot in range(self.pool.slots):
                self.pool.clear(slot)

    def close(self) -> None:
        """Free the KV pool and the session."""
        if self.pool is not None:
            self.pool.close()
        self.pool = None
