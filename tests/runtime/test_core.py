"""DecodeCore.decode over a pool where some slots in a run's range are not decoding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import random_ids

from phi_onnx.runtime.core import MAX_IDLE_GAP


def prompt(n: int, seed: int) -> list[int]:
    return random_ids(n, seed=seed).ravel().tolist()


def decode_alone(core: Any, prompt: list[int], token: int, capacity: int) -> tuple[np.ndarray, Any]:
    """`token`'s logits after `prompt` decoded in a pool of its own, and that pool."""
    alone = core.pool(1, capacity)
    core.prefill(alone, 0, prompt)
    return core.decode(alone, {0: token})[0], alone


# (prompt length, decoding?) per slot. phi4mini's original context is 64: its idle 70- and 90-token rows hold
# long-factor entries inside runs of short rows, which a parked row may (it attends to one entry).
SLOTS = {"phi3-mha": [(30, True), (50, False), (20, True), (0, False), (40, False), (10, True)],
         "phi3-window": [(30, True), (50, False), (20, True), (0, False), (40, False), (10, True)],
         "phi4mini": [(30, True), (70, False), (20, True), (90, False), (0, False), (10, True)]}


@pytest.mark.parametrize("name", list(SLOTS))
def test_idle_slots_in_a_run_keep_every_entry_and_change_no_logit(name: str, models: Any) -> None:
    core = models(name).core
    pool = core.pool(len(SLOTS[name]), 128)
    prompts = [prompt(n, seed) for seed, (n, _) in enumerate(SLOTS[name])]
    for slot, ids in enumerate(prompts):
        if ids:
            core.prefill(pool, slot, ids)
    held = [list(h) for h in pool.held]
    rows = [buffer.copy() for buffer in pool.buffers]
    tokens = {slot: 7 + slot for slot, (_, decoding) in enumerate(SLOTS[name]) if decoding}
    assert core._runs(pool, sorted(tokens)) == [sorted(tokens)]  # one run, idle slots inside it
    out = core.decode(pool, tokens)

    for slot, (_, decoding) in enumerate(SLOTS[name]):
        if not decoding:  # parked: its entry at position 0 was overwritten during the run and written back
            assert pool.held[slot] == held[slot]
            assert all(np.array_equal(before[slot], after[slot]) for before, after in zip(rows, pool.buffers,
                                                                                         strict=True))
    for slot, token in tokens.items():
        logits, alone = decode_alone(core, prompts[slot], token, 128)
        np.testing.assert_allclose(out[slot], logits, atol=1e-4, rtol=0)
        written = len(prompts[slot]) + 1
        assert all(np.allclose(a[0, :, :written], b[slot, :, :written], atol=1e-5)
                   for a, b in zip(alone.buffers, pool.buffers, strict=True))


def test_a_run_bridges_at_most_max_idle_gap_idle_slots_on_cpu(models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    core = models("phi3-gqa").core
    pool = core.pool(MAX_IDLE_GAP + 3, 64)
    for slot in range(pool.slots):
        core.prefill(pool, slot, prompt(12, slot))
    near, far = MAX_IDLE_GAP + 1, MAX_IDLE_GAP + 2
    assert core._runs(pool, [0, near]) == [[0, near]]
    assert core._runs(pool, [0, far]) == [[0], [far]]
    out = core.decode(pool, {0: 5, far: 6})  # two runs: both still decode, as each would alone
    for slot, token in ((0, 5), (far, 6)):
        np.testing.assert_allclose(out[slot], decode_alone(core, prompt(12, slot), token, 64)[0], atol=1e-4, rtol=0)
    # A pool that does not park (a GPU's) bridges any gap: there a row costs little beside a second pass.
    monkeypatch.setattr(type(pool), "parks", property(lambda self: False))
    pool.keep(0, 12)
    pool.keep(far, 12)
    assert core._runs(pool, [0, far]) == [[0, far]]


def test_a_run_that_fails_still_writes_the_parked_entries_back(models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    core = models("phi3-mha").core
    pool = core.pool(3, 64)
    for slot in range(3):
        core.prefill(pool, slot, prompt(20, slot))
    rows = [buffer[1].copy() for buffer in pool.buffers]
    run = core.run

    def run_then_fail(*args: Any, **kwargs: Any) -> Any:
        run(*args, **kwargs)  # the parked slot's position 0 is overwritten by now
        raise RuntimeError("interrupted")

    monkeypatch.setattr(core, "run", run_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        core.decode(pool, {0: 5, 2: 6})
    assert all(np.array_equal(before, buffer[1]) for before, buffer in zip(rows, pool.buffers, strict=True))
