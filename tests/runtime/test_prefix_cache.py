"""Prefix reuse in the scheduler: the same tokens as a cold run, whatever was reused, copied or restored."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import drive, random_ids

from phi_onnx.runtime.kv_pool import KVPool
from phi_onnx.runtime.prefix_cache import PrefixStore
from phi_onnx.runtime.scheduler import Scheduler


def cold(model: Any, prompt: list[int], new: int) -> list[int]:
    """Model.generate from an empty cache."""
    model.engine.forget()
    return model.generate(prompt, max_new_tokens=new, min_new_tokens=new).token_ids


def ids(n: int, seed: int, vocab: int = 1000) -> list[int]:
    return [int(t) % vocab for t in random_ids(n, seed=seed).ravel()]


def gqa_pool(models: Any, slots: int, capacity: int, *prompts: list[int]) -> tuple[Any, KVPool]:
    """phi3-gqa's decode core and a new pool of `slots` x `capacity` tokens whose first slots hold `prompts`."""
    core = models("phi3-gqa").core
    pool = core.pool(slots, capacity)
    for slot, prompt in enumerate(prompts):
        core.prefill(pool, slot, prompt)
    return core, pool


def assert_same_rows(pool: KVPool, a: int, b: int, n: int) -> None:
    """Slots `a` and `b` hold the same keys and values at their first `n` positions, in every buffer."""
    for buffer in pool.buffers:
        np.testing.assert_array_equal(buffer[a, :, :n], buffer[b, :, :n])


# phi4mini's original context is 64: its conversations cross the LongRoPE switch between turns.
@pytest.mark.parametrize("name, system, turn, reply", [("phi3-mha", 30, 9, 7), ("phi3-gqa", 30, 9, 7),
                                                       ("phi3-window", 30, 9, 7), ("phi4mini", 20, 9, 7)])
def test_multi_turn_conversations_equal_cold_runs(name, system, turn, reply, models):
    """Users x turns, a shared system prompt, each turn's prompt the whole conversation so far, staggered:
    every reply equals a cold solo run, and most prompt tokens are served from the caches."""
    model = models(name)
    scheduler = Scheduler(model, max_batch=2, max_queue=16, capacity=160, chunk=16)
    shared = ids(system, 1)
    users = 3  # more users than slots: conversations leave their slot and come back (the store restores them)
    histories = [shared + ids(turn, 100 + u) for u in range(users)]
    total_prompt = 0
    for t in range(3):
        handles, prompts = [], []
        for u in range(users):
            prompts.append(list(histories[u]))
            handles.append(scheduler.submit(histories[u], model.options(max_new_tokens=reply,
                                                                         min_new_tokens=reply)))
            scheduler.step()  # staggered: each joins at a different step
        drive(scheduler, handles)
        for u, (prompt, handle) in enumerate(zip(prompts, handles, strict=True)):
            assert handle.generated == cold(model, prompt, reply), (name, t, u)
            total_prompt += len(prompt)
            histories[u] = prompt + handle.generated + ids(turn, 1000 * t + u)
    cached = scheduler.reused_tokens + scheduler.copied_tokens
    assert cached + scheduler.computed_tokens == total_prompt  # every prompt token either reused or computed
    assert cached > total_prompt // 3
    assert scheduler.store is not None and scheduler.store.restored > 0  # 3 users over 2 slots
    if name == "phi4mini":
        assert max(len(h) for h in histories) > 64  # the conversations did cross the switch
    scheduler.close()


def test_a_burst_sharing_a_system_prompt_computes_it_once(models):
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=4, capacity=160, chunk=32)
    shared = ids(60, 7)
    prompts = [shared + ids(5, 50 + i) for i in range(4)]
    handles = [scheduler.submit(p, model.options(max_new_tokens=6, min_new_tokens=6)) for p in prompts]
    drive(scheduler, handles)
    for prompt, handle in zip(prompts, handles, strict=True):
        assert handle.generated == cold(model, prompt, 6)
    # The 60-token prefix was computed once; the others copied it (at least 59 of its tokens each).
    assert scheduler.computed_tokens <= 60 + 4 * 6
    assert [h.finish.cached_tokens for h in handles[1:]] == [60] * 3
    assert handles[0].finish.cached_tokens == 0
    scheduler.close()


def test_without_prefix_cache_every_prompt_is_computed(models):
    model = models("phi3-mha")
    scheduler = Scheduler(model, max_batch=2, capacity=120, prefix_cache=False)
    prompt = ids(40, 3)
    for _ in range(2):
        handle = scheduler.submit(prompt, model.options(max_new_tokens=4))
        drive(scheduler, [handle])
        assert handle.finish.cached_tokens == 0
    assert scheduler.computed_tokens == 80 and scheduler.reused_tokens == scheduler.copied_tokens == 0
    scheduler.close()


def test_a_request_cancelled_mid_prefill_leaves_only_whole_chunks(models):
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=1, capacity=160, chunk=16)
    prompt = ids(70, 9)
    first = scheduler.submit(prompt, model.options(max_new_tokens=5, min_new_tokens=5))
    scheduler.step()
    scheduler.step()  # two 16-token chunks computed
    first.cancel()
    scheduler.step()
    assert first.finish.reason == "cancelled" and scheduler.pool.held[0] == prompt[:32]
    again = scheduler.submit(prompt, model.options(max_new_tokens=5, min_new_tokens=5))
    drive(scheduler, [again])
    assert again.finish.cached_tokens == 32
    assert again.generated == cold(model, prompt, 5)
    scheduler.close()


def test_a_tiny_store_under_pressure_never_corrupts_a_request(models):
    """Many conversations over one slot and a store that holds about one of them: evictions all along."""
    model = models("phi3-mha")
    per_token = model.core.layout.token_bytes()
    scheduler = Scheduler(model, max_batch=1, capacity=128, chunk=16, prefix_cache_bytes=60 * per_token)
    rng = np.random.default_rng(0)
    conversations = [ids(40, 200 + i) for i in range(4)]
    for step in range(10):
        i = int(rng.integers(len(conversations)))
        prompt = conversations[i]
        handle = scheduler.submit(prompt, model.options(max_new_tokens=4, min_new_tokens=4))
        drive(scheduler, [handle])
        assert handle.generated == cold(model, prompt, 4), step
        conversations[i] = (prompt + handle.generated + ids(3, step))[-60:]  # keep them within the store
    assert scheduler.store is not None and scheduler.store.nbytes <= 60 * per_token
    assert scheduler.store.evicted > 0 or scheduler.store.restored > 0
    scheduler.close()


def test_store_save_match_restore_roundtrip(models):
    prompt = ids(40, 4)
    core, pool = gqa_pool(models, 2, 64, prompt)
    store = PrefixStore(10 * 2**20, core.rope)
    store.save(pool, 0)
    key, n = store.match([*prompt[:35], 5, 6])
    assert key is not None and n == 35
    store.restore(key, n, pool, 1)
    assert pool.held[1] == prompt[:35]
    assert_same_rows(pool, 1, 0, 35)
    assert store.match(ids(10, 99))[1] == 0
    pool.close()


def test_copy_rows_copies_the_prefix_and_its_tokens(models):
    model = models("phi3-mha")
    pool: KVPool = model.core.pool(3, 32)
    model.core.prefill(pool, 2, ids(20, 5))
    pool.copy_rows(2, 0, 12)
    assert pool.held[0] == pool.held[2][:12] and pool.long[0] == pool.long[2]
    assert_same_rows(pool, 0, 2, 12)
    assert not any(buffer[0, :, 12:].any() for buffer in pool.buffers)
    with pytest.raises(ValueError):
        pool.copy_rows(1, 0, 5)  # slot 1 holds nothing
    pool.close()


def test_store_shares_blocks_between_prefixes_and_copies_only_new_ones(models):
    """Two conversations on one 70-token system prompt: its two whole blocks are stored once; the second
    save copies only its own blocks; each conversation comes back whole, row for row."""
    system = ids(70, 11)
    first, second = system + ids(30, 12), system + ids(25, 13)
    core, pool = gqa_pool(models, 3, 128, first, second)
    store = PrefixStore(10 * 2**20, core.rope, block=32)
    store.save(pool, 0)
    assert store.blocks == 4 and store.tokens == 100  # 32 + 32 + 32 + 4
    per_block = core.layout.token_bytes() * 32  # a partial block takes a whole one's memory
    assert store.nbytes == 4 * per_block
    store.save(pool, 1)
    # The system prompt's first two blocks are shared; the second conversation adds one of 31 tokens.
    assert store.blocks == 5 and store.tokens == 131 and store.nbytes == 5 * per_block
    for slot, prompt in ((0, first), (1, second)):
        handle, n = store.match([*prompt, 7])
        assert n == len(prompt)
        store.restore(handle, n, pool, 2)
        assert pool.held[2] == prompt
        assert_same_rows(pool, 2, slot, n)
    # To the token, inside a block: the system prompt and 3 tokens of the first conversation's turn.
    assert store.match([*first[:73], 1, 2])[1] == 73
    assert store.match(system)[1] == 69  # one token is always left to run
    pool.close()


def test_store_evicts_least_recently_used_leaves_and_keeps_apart_adapters_and_regimes(models):
    core, pool = gqa_pool(models, 2, 128)
    conversations = [ids(64, 20 + i) for i in range(3)]
    per_block = core.layout.token_bytes() * 32
    store = PrefixStore(5 * per_block, core.rope, block=32)  # two conversations and a half
    for conversation in conversations:
        pool.clear(0)
        core.prefill(pool, 0, conversation)
        store.save(pool, 0)
        assert store.nbytes <= store.budget
        # The newest is always whole: a save never evicts its own prefix for its tail.
        assert store.match([*conversation, 1])[1] == 64
    # Least recently used leaves first: the first conversation's second block made room for the third's.
    assert [store.match([*c, 1])[1] for c in conversations] == [32, 64, 64] and store.evicted == 1
    # Rows computed with an adapter never serve the base model, nor the base's rows an adapter; its two
    # blocks evict the first conversation's last block (now a leaf) and the second's leaf.
    pool.adapter[0] = "style"
    store.save(pool, 0)
    assert store.match([*conversations[2], 1], adapter="style")[1] == 64
    assert store.match([*conversations[2], 1], adapter="other")[1] == 0
    assert [store.match([*c, 1])[1] for c in conversations] == [0, 32, 64] and store.evicted == 3
    pool.close()


def test_a_longer_save_replaces_the_shorter_partial_block_it_extends(models):
    conversation = ids(40, 30)
    core, pool = gqa_pool(models, 1, 128, conversation)
    store = PrefixStore(10 * 2**20, core.rope, block=32)
    store.save(pool, 0)
    assert store.blocks == 2 and store.tokens == 40
    longer = conversation + ids(30, 31)
    core.prefill(pool, 0, longer)
    store.save(pool, 0)
    assert store.blocks == 3 and store.tokens == 70  # the 8-token block is gone, served by the 32-token one
    assert store.match([*conversation, 5])[1] == 40


def test_a_save_copies_at_most_save_bytes_and_the_next_save_goes_on(models):
    """A long new prefix is stored over several saves (each a bounded stall), from its start."""
    conversation = ids(100, 40)
    core, pool = gqa_pool(models, 1, 128, conversation)
    per_block = core.layout.token_bytes() * 16
    store = PrefixStore(10 * 2**20, core.rope, block=16, min_tokens=16, save_bytes=3 * per_block)
    for saved in (48, 96, 100):
        store.save(pool, 0)
        assert store.tokens == saved and store.match([*conversation, 1])[1] == saved


def test_an_admission_saves_at_most_one_slot_so_slots_freed_together_do_not_stall_the_streams(models):
    """Slots freed together (a burst's first requests end at once) are each saved to the store when a new
    request takes them: one save per step, the other newcomers wait a step (a save is a bounded pause; several
    in one step reached 250 ms). Nothing is lost: every newcomer runs, and the tokens equal cold runs."""
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=3, max_queue=8, capacity=96, chunk=64)
    assert scheduler.store is not None
    drive(scheduler, [scheduler.submit(ids(40, 10 + i), model.options(max_new_tokens=2)) for i in range(3)])
    newcomers = [ids(40, 20 + i) for i in range(3)]
    handles = [scheduler.submit(p, model.options(max_new_tokens=3, min_new_tokens=3)) for p in newcomers]
    saved, placed = scheduler.store.saved, []
    for _ in range(3):
        scheduler._timed_admit()
        placed.append(sum(r is not None for r in scheduler.slots))
    assert scheduler.store.saved - saved == 3 and placed == [1, 2, 3]
    drive(scheduler, handles)
    assert [h.finish.reason for h in handles] == ["length"] * 3
    for prompt, handle in zip(newcomers, handles, strict=True):
        assert handle.generated == cold(model, prompt, 3)
    scheduler.close()


def test_an_admission_that_saves_nothing_admits_every_newcomer_at_once(models):
    """With a store of 0 bytes (`--prefix-cache-bytes 0`: the slots only) a save copies nothing and stalls
    nobody, so slots freed together go to the waiting requests in one admission."""
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=3, max_queue=8, capacity=96, chunk=64, prefix_cache_bytes=0)
    drive(scheduler, [scheduler.submit(ids(40, 10 + i), model.options(max_new_tokens=2)) for i in range(3)])
    handles = [scheduler.submit(ids(40, 20 + i), model.options(max_new_tokens=2)) for i in range(3)]
    scheduler._timed_admit()
    assert sum(r is not None for r in scheduler.slots) == 3
    drive(scheduler, handles)
    scheduler.close()
