"""One Model shared by threads: calls run one at a time, streams hold the model until they end."""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import random_ids

import phi_onnx
from phi_onnx.errors import OptionsError

BACKENDS = ["ort", "genai"]
THREADS, CALLS, NEW = 4, 3, 10
# Different lengths so that concurrent calls would reuse, grow and rewind one another's cache.
PROMPTS = [random_ids(6 + 3 * i, seed=100 + i)[0].tolist() for i in range(THREADS * CALLS)]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, make_export):
    loaded = phi_onnx.load(make_export("phi3-gqa"), device="cpu", backend=request.param)
    yield loaded
    loaded.close()


def greedy(model, prompt):
    return model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW).token_ids


def test_threads_sharing_a_model_get_the_single_threaded_tokens(model):
    expected = [greedy(model, p) for p in PROMPTS]
    assert len({tuple(e) for e in expected}) > 1  # prompts differ, so mixed-up caches would show

    def worker(t: int) -> list[tuple[int, list[int]]]:
        return [(i, greedy(model, PROMPTS[i])) for i in range(t, len(PROMPTS), THREADS)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [item for chunk in pool.map(worker, range(THREADS)) for item in chunk]
    assert len(results) == THREADS * CALLS
    assert all(tokens == expected[i] for i, tokens in results)
    # ... and the cache left behind is still right for the next single-threaded call
    assert greedy(model, PROMPTS[0]) == expected[0]
    assert greedy(model, PROMPTS[0][:-1]) == greedy(model, PROMPTS[0][:-1])


def test_a_stream_holds_the_model_while_another_thread_generates(model):
    streamed, other = PROMPTS[1], PROMPTS[2]
    expected_stream = model.generate(streamed, max_new_tokens=NEW, min_new_tokens=NEW)
    expected_other = greedy(model, other)
    done: dict[str, float] = {}
    opened = threading.Event()

    def consume() -> None:
        stream = model.stream(streamed, max_new_tokens=NEW, min_new_tokens=NEW)
        opened.set()
        for _ in stream:
            time.sleep(0.02)  # slow reader: the other thread must wait, not interleave
        done["stream"] = time.perf_counter()
        done["stream_ids"] = stream.result.token_ids  # type: ignore[assignment]

    def generate() -> None:
        opened.wait(10)
        done["other_ids"] = greedy(model, other)  # type: ignore[assignment]
        done["other"] = time.perf_counter()

    threads = [threading.Thread(target=consume), threading.Thread(target=generate)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert done["stream_ids"] == expected_stream.token_ids
    assert done["other_ids"] == expected_other
    assert done["other"] > done["stream"]  # it waited for the stream to end


def test_an_abandoned_stream_releases_the_model(model):
    stream = model.stream(PROMPTS[3], max_new_tokens=NEW, min_new_tokens=NEW)
    next(stream)
    del stream
    gc.collect()
    box: dict[str, list[int]] = {}
    thread = threading.Thread(target=lambda: box.setdefault("ids", greedy(model, PROMPTS[4])))
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the dropped stream still holds the model"
    assert box["ids"] == greedy(model, PROMPTS[4])


def test_the_thread_with_an_open_stream_is_told_to_finish_it(model):
    stream = model.stream(PROMPTS[5], max_new_tokens=NEW, min_new_tokens=NEW)
    next(stream)
    with pytest.raises(OptionsError, match="unfinished stream") as caught:
        model.generate(PROMPTS[6], max_new_tokens=2)
    assert "close()" in str(caught.value)
    stream.close()
    assert stream.result is not None and stream.result.finish_reason == "interrupted"
    assert greedy(model, PROMPTS[6]) == greedy(model, PROMPTS[6])


def test_chat_from_threads_equals_single_threaded(model):
    conversations = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(THREADS)]
    expected = [model.chat(c, max_new_tokens=NEW, min_new_tokens=NEW).token_ids for c in conversations]
    with ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(lambda c: model.chat(c, max_new_tokens=NEW, min_new_tokens=NEW).token_ids,
                            conversations * 2))
    assert got == expected * 2
