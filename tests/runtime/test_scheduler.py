"""Continuous batching: every request gets the tokens `Model.generate` gives it alone."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
from typing import Any

import pytest
from helpers import drive, random_ids

from phi_onnx.errors import OptionsError
from phi_onnx.runtime.errors import PromptTooLongError
from phi_onnx.runtime.scheduler import FinishEvent, QueueFullError, Request, Scheduler, SchedulerClosedError, TokenEvent


def solo(model: Any, prompt: list[int], new: int, **options: Any) -> list[int]:
    return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **options).token_ids


# (prompt length, new tokens): different lengths, some longer than a prefill chunk of 16.
PLAIN = [(5, 12), (23, 8), (9, 20), (40, 6), (14, 15), (3, 10), (31, 12), (18, 9), (7, 14)]
# phi4mini's original context is 64: rows stay short (< 64), start long (> 64), or cross it mid-decode.
LONGROPE = [(20, 12), (70, 8), (50, 25), (10, 20), (90, 6), (58, 10), (30, 14), (66, 9), (8, 30)]


@pytest.mark.parametrize("name, shapes", [("phi3-mha", PLAIN), ("phi3-gqa", PLAIN), ("phi3-window", PLAIN),
                                          ("phi4mini", LONGROPE)])
def test_staggered_requests_equal_solo_generate(name, shapes, models):
    model = models(name)
    prompts = [random_ids(n, seed=i).ravel().tolist() for i, (n, _) in enumerate(shapes)]
    expected = [solo(model, p, new) for p, (_, new) in zip(prompts, shapes, strict=True)]
    scheduler = Scheduler(model, max_batch=4, max_queue=16, chunk=16)
    handles = []
    # Requests join at different steps (and wait for a slot once four run), so rows sit at
    # different positions, mid-prefill rows share runs with decoding ones, and finished rows leave.
    for i, (prompt, (_, new)) in enumerate(zip(prompts, shapes, strict=True)):
        handles.append(scheduler.submit(prompt, model.options(max_new_tokens=new, min_new_tokens=new)))
        for _ in range(i % 3):
            scheduler.step()
    for _ in range(500):
        if all(h.finish for h in handles):
            break
        scheduler.step()
    assert [h.generated for h in handles] == expected
    assert all(h.finish.reason == "length" for h in handles)
    assert scheduler.active == scheduler.queued == 0
    if name == "phi4mini":
        assert scheduler.recomputes >= 2  # (50, 25) and (58, 10) cross the original context mid-decode
    scheduler.close()


def test_threaded_scheduler_streams_text_and_seeded_sampling_is_independent_of_the_batch(models):
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=3, max_queue=8)
    scheduler.start()
    try:
        sampled = model.options(max_new_tokens=12, min_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
        alone = scheduler.submit(random_ids(11).ravel().tolist(), sampled).result()[0]
        others = [scheduler.submit(random_ids(n, seed=n).ravel().tolist(), model.options(max_new_tokens=20))
                  for n in (4, 17)]
        crowded = scheduler.submit(random_ids(11).ravel().tolist(), sampled)
        events = list(crowded)
        assert [e.token_id for e in events if isinstance(e, TokenEvent)] == alone
        finish = events[-1]
        assert isinstance(finish, FinishEvent) and finish.completion_tokens == 12
        assert finish.text == "".join(e.text for e in events if isinstance(e, TokenEvent))
        assert finish.text == model.decode(alone)
        for handle in others:
            handle.result()
    finally:
        scheduler.close()


def test_cancel_frees_the_slot_and_queue_is_bounded(models):
    model = models("phi3-mha")
    scheduler = Scheduler(model, max_batch=1, max_queue=1)
    long = model.options(max_new_tokens=200, min_new_tokens=200)
    first = scheduler.submit([5, 6, 7], long)
    scheduler.step()
    assert scheduler.active == 1
    second = scheduler.submit([8, 9], long)  # waits
    with pytest.raises(QueueFullError):
        scheduler.submit([10], long)
    first.cancel()
    scheduler.step()
    assert first.finish is not None and first.finish.reason == "cancelled"
    assert scheduler.slots[0] is second
    scheduler.close()
    assert second.finish is not None and second.finish.reason == "cancelled"


def test_a_request_cancelled_while_queued_leaves_the_queue_at_the_next_step(models):
    model = models("phi3-mha")
    scheduler = Scheduler(model, max_batch=1, max_queue=1)
    long = model.options(max_new_tokens=200, min_new_tokens=200)
    first = scheduler.submit([5, 6, 7], long)
    scheduler.step()
    queued = scheduler.submit([8, 9], long)
    queued.cancel()
    scheduler.step()
    assert queued.finish is not None and queued.finish.reason == "cancelled"
    assert scheduler.queued == 0 and scheduler.slots[0] is first and first.finish is None
    third = scheduler.submit([10], long)  # its place in the queue is free again
    assert scheduler.queued == 1
    scheduler.close()
    assert third.finish is not None and third.finish.reason == "cancelled"


def test_logprobs_and_bad_requests(models):
    model = models("phi3-mha")
    others = set(threading.enumerate())  # e.g. tests/serve's session-wide live server's scheduler
    scheduler = Scheduler(model, max_batch=2, capacity=64)
    handle = scheduler.submit([5, 6, 7], model.options(max_new_tokens=3), logprobs=2)
    while handle.finish is None:
        scheduler.step()
    events = [e for e in handle if isinstance(e, TokenEvent)]
    for event in events:
        assert event.top_logprobs[0][0] == event.token_id  # greedy takes the most likely token
        assert event.logprob == pytest.approx(event.top_logprobs[0][1])
        assert event.top_logprobs[0][1] >= event.top_logprobs[1][1]
    with pytest.raises(PromptTooLongError, match="64 tokens"):
        scheduler.submit(list(range(10, 80)))
    with pytest.raises(OptionsError, match="outside the vocabulary"):
        scheduler.submit([10**6])
    with pytest.raises(OptionsError, match="empty"):
        scheduler.submit([])
    scheduler.close()
    assert not any(t.name == "phi-onnx-scheduler" for t in set(threading.enumerate()) - others)


class _Boom(BaseException):
    """Escapes the step's `except Exception`, as a bug in the loop itself would."""


def test_a_dead_scheduler_thread_fails_waiting_requests_instead_of_hanging(models, monkeypatch):
    model = models("phi3-mha")
    scheduler = Scheduler(model, max_batch=1, max_queue=4, capacity=64)

    def boom() -> None:
        raise _Boom("loop broke")

    monkeypatch.setattr(scheduler, "_step", boom)
    handles = [scheduler.submit([5, 6, 7], model.options(max_new_tokens=3)) for _ in range(3)]
    scheduler.start()
    assert scheduler._thread is not None
    scheduler._thread.join(10)
    assert not scheduler._thread.is_alive()
    assert [h.result()[1].reason for h in handles] == ["error"] * 3  # an answer, not a hang
    assert not scheduler.alive and "loop broke" in (scheduler.failure or "")
    with pytest.raises(SchedulerClosedError, match="failed"):
        scheduler.submit([5])
    scheduler.close()


def test_a_sink_that_raises_cancels_only_its_own_request(models):
    model = models("phi3-mha")
    scheduler = Scheduler(model, max_batch=2, capacity=64)
    options = model.options(max_new_tokens=6, min_new_tokens=6)

    def broken(event: Any) -> None:
        raise ValueError("client bug")

    bad = scheduler.submit([5, 6, 7], options, sink=broken)
    good = scheduler.submit([8, 9], options)
    for _ in range(20):
        if bad.finish and good.finish:
            break
        scheduler.step()
    assert bad.finish is not None and bad.finish.reason == "cancelled"
    assert good.result()[0] == solo(model, [8, 9], 6)
    scheduler.close()


def test_the_kv_pool_is_resident_from_the_start(models):
    """The pool is written at start (not calloc's lazy pages): its memory is held before any request."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE

    def resident_fraction(buffer: Any) -> float:
        # mincore(2) on the buffer's whole pages: which of them are in memory now.
        start = -(-buffer.ctypes.data // page) * page
        pages = (buffer.ctypes.data + buffer.nbytes - start) // page
        flags = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), flags) == 0
        return sum(f & 1 for f in flags) / pages

    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=16, capacity=model.folder.context_length)
    assert scheduler.pool_bytes >= 32 * 2**20  # large enough that lazily mapped pages would show
    assert min(resident_fraction(buffer) for buffer in scheduler.pool.buffers) > 0.99
    assert all(not buffer.any() for buffer in scheduler.pool.buffers)
    scheduler.close()


def test_close_during_a_step_longer_than_its_timeout_leaves_the_cancelling_to_that_step(models, monkeypatch):
    model = models("phi3-mha")
    scheduler = Scheduler(model, max_batch=2, capacity=64)
    in_run, release = threading.Event(), threading.Event()
    run = scheduler.core.run

    def slow_run(*args: Any) -> Any:
        in_run.set()
        assert release.wait(10)
        return run(*args)

    monkeypatch.setattr(scheduler.core, "run", slow_run)
    events: list[Any] = []
    request = scheduler.submit([5, 6, 7], model.options(max_new_tokens=20), sink=events.append)
    scheduler.start()
    assert in_run.wait(10)
    scheduler.close(timeout=0.05)  # the step is still running: close must not finish requests under it
    assert request.finish is None
    release.set()
    thread = scheduler._thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    assert request.finish is not None and request.finish.reason == "cancelled"
    assert isinstance(events[-1], FinishEvent) and sum(isinstance(e, FinishEvent) for e in events) == 1


def test_pool_bytes_is_what_the_scheduler_allocates(models):
    from phi_onnx.runtime.scheduler import pool_bytes

    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=3, capacity=40)
    assert pool_bytes(model.folder, 3, 40) == (40, scheduler.pool_bytes)
    assert scheduler.pool_bytes == sum(buffer.nbytes for buffer in scheduler.pool.buffers)
    scheduler.close()


def test_available_memory_is_the_containers_limit_when_that_is_lower(tmp_path, monkeypatch):
    """In a container /proc/meminfo shows the host: the cgroup limit (less its working set) is what fits."""
    import phi_onnx.runtime.kv_pool as scheduler

    (tmp_path / "meminfo").write_text("MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n")  # 32 GiB
    (tmp_path / "max").write_text(f"{4 * 2**30}\n")
    (tmp_path / "current").write_text(f"{3 * 2**30}\n")  # of which 1 GiB is reclaimable page cache
    (tmp_path / "stat").write_text(f"anon 123\ninactive_file {2**30}\n")
    cgroup = (str(tmp_path / "max"), str(tmp_path / "current"), str(tmp_path / "stat"), "inactive_file")
    monkeypatch.setattr(scheduler, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(scheduler, "CGROUPS", (cgroup,))
    assert scheduler.available_memory() == 2 * 2**30
    (tmp_path / "max").write_text("max\n")  # no limit: the machine's
    assert scheduler.available_memory() == 32 * 2**30
    monkeypatch.setattr(scheduler, "MEMINFO", str(tmp_path / "absent"))
    assert scheduler.available_memory() is None


def test_a_request_cancelled_during_admission_is_finished_or_kept_never_lost(models):
    """Clients cancel from other threads, without the lock: `cancelled` may turn True between two reads."""
    model = models("phi3-mha")
    scheduler = Scheduler(model, max_batch=1, max_queue=2)
    long = model.options(max_new_tokens=50, min_new_tokens=50)
    scheduler.submit([5, 6, 7], long)
    scheduler.step()
    queued = scheduler.submit([8, 9], long)
    reads = iter([True, False])  # then True: cancelled by its client while the scheduler looks at the queue

    class Racing(Request):
        @property  # type: ignore[override]
        def cancelled(self) -> bool:
            return next(reads, True)

        @cancelled.setter
        def cancelled(self, value: bool) -> None:
            pass

    queued.__class__ = Racing
    scheduler.step()
    assert queued.finish is not None or queued in scheduler.waiting
    scheduler.step()
    assert queued.finish is not None and queued.finish.reason == "cancelled"
    scheduler.close()


def test_bad_arguments_are_refused_with_a_message(models):
    """Issue 18: wrong types to Scheduler(...)/submit(...) are OptionsErrors, not raw Type/Value/AttributeErrors."""
    model = models("phi3-mha")
    for kwargs in ({"max_batch": "8"}, {"max_batch": 0}, {"max_queue": -1}, {"capacity": 1.5}, {"chunk": True},
                   {"stall_factor": float("nan")}, {"prefix_cache_bytes": -5}, {"cohort_tokens": -1},
                   {"cohort_tokens": 2.5}):
        with pytest.raises(OptionsError):
            Scheduler(model, **kwargs)
    with pytest.raises(OptionsError, match="loaded Model"):
        Scheduler("not a model")  # type: ignore[arg-type]
    scheduler = Scheduler(model, max_batch=1, capacity=64)
    with pytest.raises(OptionsError, match="integers"):
        scheduler.submit([1.7, 2.2])  # was silently [1, 2]
    with pytest.raises(OptionsError, match="list of token ids"):
        scheduler.submit("hello")  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="GenerationOptions"):
        scheduler.submit([1, 2], {"max_new_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="frequency_penalty"):
        scheduler.submit([1, 2], frequency_penalty=float("nan"))
    with pytest.raises(OptionsError, match="sink"):
        scheduler.submit([1, 2], sink=42)  # type: ignore[arg-type]
    assert scheduler.queued == 0
    scheduler.close()


def test_one_requests_failure_in_sampling_never_touches_another(models):
    """A request whose logits processor raises (or whose numbers break its sampling) ends alone with "error"."""
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=2, capacity=64)

    def broken(tokens: list[int], scores: Any) -> Any:
        if len(tokens) > 6:
            raise ValueError("processor bug")
        return scores

    bad = scheduler.submit([5, 6, 7], model.options(max_new_tokens=20, min_new_tokens=20, logits_processors=[broken]))
    good = scheduler.submit([8, 9], model.options(max_new_tokens=20, min_new_tokens=20))
    for _ in range(100):
        if bad.finish and good.finish:
            break
        scheduler.step()
    assert bad.finish is not None and bad.finish.reason == "error" and "processor bug" in (bad.finish.error or "")
    assert good.finish is not None and good.finish.reason == "length"
    assert good.generated == solo(model, [8, 9], 20)
    scheduler.close()


def test_step_is_refused_while_the_thread_runs_and_result_can_be_read_twice(models):
    model = models("phi3-mha")
    scheduler = Scheduler(model, max_batch=1, capacity=64)
    scheduler.start()
    try:
        with pytest.raises(OptionsError, match="thread"):
            scheduler.step()  # used to crash the process (two threads in one KV pool)
        handle = scheduler.submit([5, 6, 7], model.options(max_new_tokens=4, min_new_tokens=4))
        first = handle.result()
        assert handle.result() == first  # used to block forever
        assert list(handle) == []  # the events were read: iterating again ends at once
    finally:
        scheduler.close()


def test_pieces_are_even_and_leave_no_remnant_run() -> None:
    from phi_onnx.runtime.scheduler import piece

    assert piece(30, 26) == 30  # within 1.25x the budget: whole
    assert [piece(61, 16)] == [16] and piece(45, 16) == 15 and piece(40, 20) == 20  # 4, 3 and 2 even runs
    rest, runs = 61, []
    while rest:
        runs.append(piece(rest, 20))
        rest -= runs[-1]
    assert runs == [21, 20, 20]  # not 20 + 20 + 20 + 1
    assert piece(0, 16) == 0 and piece(10, 0) == 0


def running() -> Any:
    """A slot's request whose stream runs (first token out, not done), as the budget sees it."""
    return types.SimpleNamespace(seq=types.SimpleNamespace(generated=[1], done=False))


def test_prefill_budget_follows_the_decode_step_at_the_pools_occupancy(models: Any) -> None:
    """The stall budget: stall_factor decode steps at the occupancy (measured, else estimated from the
    row counts measured), less one pass over the weights and the step's admission time, in prompt tokens."""
    scheduler = Scheduler(models("phi3-mha"), max_batch=8, chunk=256, stall_factor=3.0)
    assert scheduler._prefill_budget() == 256  # nothing measured yet
    scheduler._token_seconds = 0.01
    scheduler._decode_seconds = {1: 0.05}
    assert scheduler._decode_step_seconds(8) == pytest.approx(0.05 + 7 * 0.01)  # one row's work per row
    scheduler._decode_seconds = {1: 0.05, 4: 0.11}
    assert scheduler._decode_step_seconds(2) == pytest.approx(0.07)  # between two measured counts
    assert scheduler._decode_step_seconds(8) == pytest.approx(0.15)  # beyond them: a token's share per row at most
    scheduler._decode_seconds = {1: 0.05, 4: 0.08, 8: 0.11}
    assert scheduler._decode_step_seconds(6) == pytest.approx(0.095)  # between two: along them
    scheduler._decode_seconds = {1: 0.05, 4: 0.11}
    scheduler.slots = [running()] * 4 + [None] * 4  # type: ignore[list-item]
    assert scheduler._prefill_budget() in (27, 28)  # (3 x 0.11 - 0.05) / 0.01: D(4), not D(1) or D(8)
    scheduler._admit_seconds = 0.1
    assert scheduler._prefill_budget() in (17, 18)  # less the admission's 0.1 s
    scheduler._admit_seconds = 0.135
    assert scheduler._prefill_budget() == 14  # just under half the stall: what is left
    scheduler._admit_seconds = 0.15
    assert scheduler._prefill_budget() == 0  # the admission took over half of it: the prompts wait a step
    scheduler.slots = [None] * 8
    scheduler.close()


def test_the_runtime_imports_nothing_of_serve_and_serve_defaults_are_the_schedulers() -> None:
    # Folders follow the data: the runtime sits under serve, so its defaults are its own and serve reads them.
    code = ("import json, sys, phi_onnx.runtime.scheduler as s, phi_onnx.runtime.model; "
            "served = sorted(m for m in sys.modules if m.startswith('phi_onnx.serve')); "
            "from phi_onnx.serve.config import DEFAULTS as d; "
            "print(json.dumps([served, [d.max_batch, d.max_queue, d.stall_factor, d.cohort_tokens], "
            "[s.MAX_BATCH, s.MAX_QUEUE, s.STALL_FACTOR, s.COHORT_TOKENS]]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    served, config, runtime = json.loads(done.stdout)
    assert served == []
    assert config == runtime


@pytest.mark.parametrize("token,one_row,step,admit", [
    (0.0072, 0.024, 0.055, 0.0),  # fast int8 dot products: a 4-row step costs less than 8 prompt tokens
    (0.0072, 0.024, 0.055, 0.02),
    (0.0067, 0.06, 0.12, 0.0),  # a decode step worth 18 prompt tokens
    (0.0067, 0.06, 0.12, 0.04),
    (0.002, 0.03, 0.04, 0.0),
])
def test_a_piece_of_the_budget_keeps_the_step_within_the_stall_bound(models: Any, token: float, one_row: float,
                                                                      step: float, admit: float) -> None:
    """Whatever the machine's ratio of prompt-token to decode-step cost, a piece cut from the budget (up to
    SLACK times it) with its run's own pass and the admission stays within SLACK x stall_factor decode steps:
    the floor that keeps small pieces efficient (MIN_PREFILL) gives way where it alone would break that."""
    from phi_onnx.runtime.scheduler import MIN_PREFILL, SLACK, piece

    scheduler = Scheduler(models("phi3-mha"), max_batch=4, chunk=256)
    scheduler._token_seconds, scheduler._decode_seconds, scheduler._admit_seconds = token, {1: one_row, 4: step}, admit
    scheduler.slots = [running()] * 4  # type: ignore[list-item]
    budget = scheduler._prefill_budget()
    assert budget >= 1
    worst = max(one_row + admit + piece(remaining, budget) * token for remaining in range(1, 300))
    assert worst <= SLACK * scheduler.stall_factor * step + 1e-9
    if (SLACK * scheduler.stall_factor * step - one_row - admit) / (SLACK * token) >= MIN_PREFILL:
        assert budget >= MIN_PREFILL  # where it fits, pieces stay at least MIN_PREFILL tokens
    scheduler.slots = [None] * 4
    scheduler.close()


def test_fewer_streams_running_than_the_pool_holds_leave_the_pieces_more_room(models: Any) -> None:
    """Streams that start together (all at once): while one of four runs, its step is short, so a piece may
    take what the other rows' decoding would have (the whole step keeps to the bound, counting the row of a
    prompt that completes in the step)."""
    from phi_onnx.runtime.scheduler import SLACK, piece

    scheduler = Scheduler(models("phi3-mha"), max_batch=4, chunk=256)
    scheduler._token_seconds, scheduler._decode_seconds = 0.0072, {1: 0.024, 4: 0.055}
    budgets = []
    for started in (4, 2, 1):
        scheduler.slots = [running()] * started + [types.SimpleNamespace(seq=None)] * (4 - started)  # type: ignore
        budgets.append(scheduler._prefill_budget())
        now = scheduler._decode_step_seconds(min(started + 1, 4))  # a stream starting in the step decodes too
        assert now is not None
        worst = max(now + 0.024 + piece(remaining, budgets[-1]) * 0.0072 for remaining in range(1, 300))
        assert worst <= (1 + SLACK * scheduler.stall_factor) * 0.055 + 1e-9
    assert budgets[0] < budgets[1] < budgets[2]
    scheduler.slots = [None] * 4
    scheduler.close()


def _ids(n: int, seed: int) -> list[int]:
    return [int(t) % 1000 for t in random_ids(n, seed=seed).ravel()]


def test_prompts_arriving_together_prefill_back_to_back_then_start_together(models: Any) -> None:
    """A cohort (prompts that arrived together while nothing streamed, the all-at-once load): each first
    token goes out as its prompt completes, no stream decodes before the last prompt is in, then all decode
    in that same step; the tokens are each request's own."""
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=4, capacity=96, chunk=32)
    prompts = [_ids(40, 60 + i) for i in range(3)]
    handles = [scheduler.submit(p, model.options(max_new_tokens=5, min_new_tokens=5)) for p in prompts]
    seen = []
    while not all(h.generated for h in handles):
        scheduler.step()
        seen.append([len(h.generated) for h in handles])
    # 120 prompt tokens at 32 a step: four steps; the first token of the first prompt came two steps before
    # the last prompt's, and nobody took a second token until then
    assert seen[:-1] == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert seen[-1] == [2, 2, 2]  # the cohort starts: every stream decodes in the step its last prompt came in
    drive(scheduler, handles)
    for prompt, handle in zip(prompts, handles, strict=True):
        assert handle.generated == solo(model, prompt, 5)
    scheduler.close()


def test_a_request_that_arrived_before_the_first_token_joins_even_if_admitted_after_it(models: Any) -> None:
    """All at once over HTTP: the first request is admitted and prefilled alone while the others arrive. The
    first stream holds its second token while a request that arrived before its first token still waits for
    admission; one that arrives after it does not join, and the cohort's streams decode while it prefills."""
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=4, capacity=96, chunk=64)
    options = model.options(max_new_tokens=6, min_new_tokens=6)
    first = scheduler.submit(_ids(30, 70), options)
    scheduler._timed_admit()
    second = scheduler.submit(_ids(30, 71), options)  # arrives during the first one's prefill
    scheduler._step()
    assert (len(first.generated), len(second.generated)) == (1, 0)  # held for the request still queued
    late = scheduler.submit(_ids(50, 72), options)  # after the first token: not of the cohort
    scheduler.step()
    assert (len(first.generated), len(second.generated), len(late.generated)) == (2, 2, 0)
    drive(scheduler, [first, second, late])
    for handle, seed, n in ((first, 70, 30), (second, 71, 30), (late, 72, 50)):
        assert handle.generated == solo(model, _ids(n, seed), 6)
    scheduler.close()


def test_a_cohort_takes_cold_prompts_up_to_cohort_tokens(models: Any) -> None:
    """Who starts together: prompts computed mostly from scratch, up to `cohort_tokens` to compute. A prompt
    that shares most of itself with a member (a system prompt, a returning conversation) starts under the
    stall bound after the cohort, and so does one past the bound; tokens equal solo runs either way."""
    model = models("phi3-gqa")
    options = model.options(max_new_tokens=4, min_new_tokens=4)
    shared = _ids(40, 80)
    cases = [([_ids(40, 90 + i) for i in range(3)], 2048, [2, 2, 2]),  # cold: all three start together
             ([shared + _ids(5, 81 + i) for i in range(3)], 2048, [2, 0, 0]),  # 5 of 45 tokens to compute
             ([_ids(40, 90 + i) for i in range(3)], 60, [2, 0, 0])]  # 40 + 40 tokens > 60
    for prompts, limit, after_one_step in cases:
        scheduler = Scheduler(model, max_batch=4, capacity=96, chunk=128, cohort_tokens=limit)
        handles = [scheduler.submit(p, options) for p in prompts]
        scheduler.step()
        assert [len(h.generated) for h in handles] == after_one_step
        assert scheduler._cohort is None
        drive(scheduler, handles)
        for prompt, handle in zip(prompts, handles, strict=True):
            assert handle.generated == solo(model, prompt, 4)
        scheduler.close()
    # cohort_tokens=0 (`--cohort-tokens 0`): a stream decodes from the step after its prompt is in
    for limit, after_two_steps in ((2048, [1, 0, 0]), (0, [2, 0, 0])):
        scheduler = Scheduler(model, max_batch=4, capacity=96, chunk=32, cohort_tokens=limit)
        handles = [scheduler.submit(_ids(40, 90 + i), options) for i in range(3)]
        scheduler.step()
        scheduler.step()
        assert [len(h.generated) for h in handles] == after_two_steps
        drive(scheduler, handles)
        scheduler.close()


def test_a_cohort_member_cancelled_mid_prefill_lets_the_others_start(models: Any) -> None:
    """A member of a cohort that is cancelled before its prompt is in leaves it: the streams whose prompts are
    in start at the next step instead of waiting for it."""
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=4, capacity=160, chunk=32)
    options = model.options(max_new_tokens=4, min_new_tokens=4)
    first, slow = scheduler.submit(_ids(20, 100), options), scheduler.submit(_ids(120, 101), options)
    scheduler.step()
    scheduler.step()
    assert (len(first.generated), len(slow.generated)) == (1, 0)  # held: the long prompt is not in yet
    slow.cancel()
    scheduler.step()
    assert slow.finish is not None and slow.finish.reason == "cancelled"
    assert len(first.generated) == 2 and scheduler._cohort is None
    drive(scheduler, [first])
    assert first.generated == solo(model, _ids(20, 100), 4)
    scheduler.close()


def test_a_request_arriving_after_a_first_token_never_joins_even_once_that_member_is_gone(models: Any) -> None:
    """The cutoff is the cohort's first token, kept after the member that took it finished at it (max_tokens 1):
    a later request is not held for, and does not hold the others."""
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=4, capacity=96, chunk=32)
    five = model.options(max_new_tokens=5, min_new_tokens=5)
    first = scheduler.submit(_ids(20, 1), model.options(max_new_tokens=1, min_new_tokens=1))
    long = scheduler.submit(_ids(60, 2), five)
    scheduler.step()  # 20 + 12 tokens: the first's only token
    assert first.finish is not None and first.finish.reason == "length" and not long.generated
    late = scheduler.submit(_ids(30, 3), five)
    scheduler.step()
    assert scheduler._cohort is not None and late.id not in scheduler._cohort
    drive(scheduler, [long, late])
    assert late.generated == solo(model, _ids(30, 3), 5)
    scheduler.close()


def test_a_returning_conversation_in_the_store_is_not_cold(models: Any) -> None:
    """A conversation whose prefix waits in the prefix store computes a few tokens: it starts under the stall
    bound, not in lockstep with a cold prompt that arrived with it."""
    model = models("phi3-gqa")
    scheduler = Scheduler(model, max_batch=2, capacity=128, chunk=128, prefix_cache_bytes=1 << 26)
    two = model.options(max_new_tokens=2, min_new_tokens=2)
    history = _ids(64, 10)
    drive(scheduler, [scheduler.submit(history, two)])
    # two others take both slots: the conversation's rows go to the store
    drive(scheduler, [scheduler.submit(_ids(40, 11), two), scheduler.submit(_ids(40, 12), two)])
    assert scheduler.store is not None and scheduler.store.match([*history, 5], None)[1] >= 32
    cold_one = scheduler.submit(_ids(40, 13), two)
    returning = scheduler.submit(history + _ids(8, 14), two)
    scheduler.step()
    assert scheduler._cohort is None and len(cold_one.generated) == 2  # not held for the returning one
    drive(scheduler, [cold_one, returning])
    assert returning.finish is not None and returning.finish.cached_tokens >= 32
    assert returning.generated == solo(model, history + _ids(8, 14), 2)
    scheduler.close()


def test_forced_tails_of_a_cohort_wait_for_it_to_start(tiny: Any) -> None:
    """A member whose grammar forces tokens takes them once the cohort starts, not while the others' prompts
    are still being prefilled (that would be decoding during the hold, and spend the cohort's chunk)."""
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    scheduler = Scheduler(tiny, max_batch=2, chunk=16)
    forced = scheduler.submit(tiny.encode("x"), tiny.options(json_schema=person, max_new_tokens=60))
    long = scheduler.submit(_ids(200, 5), tiny.options(max_new_tokens=3, min_new_tokens=3))
    seen = []
    while not long.generated and scheduler.steps < 40:
        scheduler.step()
        seen.append(len(forced.generated))
    assert long.generated and seen[0] >= 1 and set(seen[:-1]) == {seen[0]}
    drive(scheduler, [forced, long])
    scheduler.close()
