"""Hostile or careless input to the runtime: each is the project's own error naming the problem and the fix."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import resource
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import phi_onnx
from phi_onnx.cli import main
from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.export import ExportOptions
from phi_onnx.runtime.chat import ChatTemplate, check_messages
from phi_onnx.runtime.errors import ModelFolderError, NonFiniteLogitsError
from phi_onnx.runtime.providers import check_threads, max_threads
from phi_onnx.runtime.sampling import GenerationOptions, Sampler

TINY_TEMPLATE = (Path(phi_onnx.__file__).parent / "tiny" / "tiny-phi3" / "chat_template.jinja").read_text()
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def folder(make_export) -> Path:
    return make_export("phi3-gqa")


@pytest.fixture(scope="module")
def model(folder):
    loaded = phi_onnx.load(folder, device="cpu", backend="ort")
    yield loaded
    loaded.close()


def edited_copy(src: Path, dst: Path, **edits) -> Path:
    """`src` linked file by file into `dst`, with the named JSON files rewritten by their edit functions."""
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).symlink_to(item)
    for name, edit in edits.items():
        path = dst / f"{name}.json"
        data = json.loads((src / path.name).read_text()) if (src / path.name).is_file() else {}
        path.unlink(missing_ok=True)
        path.write_text(json.dumps(edit(data)))
    return dst


def with_model_field(key, value):
    def edit(data):
        data["model"][key] = value
        return data
    return edit


def threads_value(value):
    def edit(data):
        data["model"]["decoder"]["session_options"]["intra_op_num_threads"] = value
        return data
    return edit


# -- runtime folders ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("edits", "words"), [
    ({"genai_config": with_model_field("context_length", 0)}, ["context_length is 0", "positive"]),
    ({"genai_config": with_model_field("context_length", -5)}, ["context_length is -5", "positive"]),
    ({"genai_config": threads_value("four")}, ["intra_op_num_threads is 'four'", "whole number"]),
    ({"genai_config": threads_value(-1)}, ["intra_op_num_threads is -1"]),
    ({"genai_config": with_model_field("vocab_size", 500)}, ["vocab_size is 500", "model.onnx has 1040"]),
    ({"phi_onnx": lambda data: {**data, "options": "cpu"}}, ['"options" is str, not an object']),
    ({"phi_onnx": lambda data: [data]}, ["phi_onnx.json does not hold a JSON object"]),
    ({"genai_config": lambda data: {**data, "search": []}}, ["genai_config.json: search is []", "object"]),
    ({"genai_config": lambda data: {**data, "model": {**data["model"], "eos_token_id": [5000]}}},
     ["model.eos_token_id is [5000]", "0 to 1039"]),
    ({"generation_config": lambda data: {**data, "eos_token_id": [2, 1040]}},
     ["generation_config.json: eos_token_id is [2, 1040]"]),
    ({"genai_config": threads_value(10**6)}, ["intra_op_num_threads is 1000000", "CPU core"]),
])
def test_bad_folder_settings_are_named(folder, tmp_path, edits, words):
    bad = edited_copy(folder, tmp_path / "bad", **edits)
    with pytest.raises(ModelFolderError) as caught:
        phi_onnx.load(bad, device="cpu", backend="ort")
    message = str(caught.value)
    assert all(word in message for word in words), message
    assert caught.value.hint  # every refusal says what to do


@pytest.mark.parametrize(("name", "content", "words"), [
    ("chat_template.jinja", b"\xff\xfe{{ messages }}", "chat_template.jinja cannot be read as UTF-8 text"),
    ("tokenizer_config.json", b'{"model_max_length": ' + b"9" * 5000 + b"}", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", b"[" * 100_000 + b"]" * 100_000, "tokenizer_config.json is not valid JSON"),
    ("generation_config.json", b'{"eos_token_id": ' + b"7" * 5000 + b"}", "generation_config.json is not JSON"),
    ("phi_onnx.json", b"\xff", "phi_onnx.json is not valid JSON"),
])
def test_unreadable_side_files_are_folder_errors(folder, tmp_path, name, content, words):
    bad = edited_copy(folder, tmp_path / "bad")
    (bad / name).unlink(missing_ok=True)
    (bad / name).write_bytes(content)
    with pytest.raises(ModelFolderError) as caught, phi_onnx.load(bad, device="cpu", backend="ort") as loaded:
        loaded.chat(USER, max_new_tokens=2)
    assert words in str(caught.value) and caught.value.hint, str(caught.value)


def test_bad_context_length_exits_2_from_the_cli(folder, tmp_path):
    bad = edited_copy(folder, tmp_path / "bad", genai_config=with_model_field("context_length", -1))
    result = CliRunner().invoke(main, ["generate", str(bad), "hello", "--backend", "ort"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "at most -" not in result.output
    assert "context_length is -1" in result.output


# -- folder paths -------------------------------------------------------------------------------------
def symlink_loop(tmp: Path) -> str:
    (tmp / "loop").symlink_to(tmp / "loop")
    return str(tmp / "loop")


def a_file(tmp: Path) -> str:
    (tmp / "notes.txt").write_text("hi")
    return str(tmp / "notes.txt")


@pytest.mark.parametrize(("make", "words"), [
    (lambda tmp: "/tmp/" + "a" * 5000, "is too long for this system"),
    (lambda tmp: str(tmp / ("b" * 300) / "model"), "its longest name 300"),
    (symlink_loop, "its symbolic links form a loop"),
    (a_file, "notes.txt is not a folder"),
    (lambda tmp: a_file(tmp) + "/model", "a part of that path is a file"),
    (lambda tmp: str(tmp / "missing"), "is not a folder: nothing is there"),
    (lambda tmp: str(tmp / "nul\0byte"), "is not a usable path"),
    (lambda tmp: "~no-such-user-phi-onnx/model", "names no home folder"),
    (lambda tmp: str(tmp / "\x1b[31mred"), "\\x1b[31mred"),  # escaped, not sent to the terminal
    (lambda tmp: str(tmp / "\udcffbad"), "\\udcffbad"),
])
def test_bad_paths_are_folder_errors(tmp_path, make, words):
    with pytest.raises(ModelFolderError) as caught:
        phi_onnx.load(make(tmp_path), device="cpu", backend="ort")
    message = str(caught.value)
    assert words in message and caught.value.hint, message
    assert message.replace("\n", " ").isprintable()  # one message line, one hint line, nothing raw
    assert len(message) < 700  # a 5,000-character path is shortened


def test_a_folder_without_permission_is_a_folder_error(folder, monkeypatch):
    """Tests run as root here, which reads anything; the refusal is simulated where the kernel gives it."""
    real = Path.stat

    def stat(self, *args, **kwargs):
        if self == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(ModelFolderError, match="Permission denied reading") as caught:
        phi_onnx.load(folder, device="cpu", backend="ort")
    assert "read access" in str(caught.value)


def test_bad_paths_exit_2_from_the_cli(tmp_path):
    for command in (["generate", symlink_loop(tmp_path), "hi"], ["chat", a_file(tmp_path), "--once"]):
        result = CliRunner().invoke(main, command, input="hi\n")
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "Error:" in result.output
        assert "symbolic links form a loop" in result.output or "is not a folder" in result.output


# -- threads -------------------------------------------------------------------------------------------
def test_threads_are_bounded_by_the_cores(folder, monkeypatch):
    started = time.monotonic()
    with pytest.raises(OptionsError) as caught:
        phi_onnx.load(folder, device="cpu", backend="ort", threads=10**6)
    assert time.monotonic() - started < 5  # refused, not a million threads started
    cores = os.cpu_count()
    assert "threads is 1000000" in str(caught.value) and f"{cores} CPU core" in str(caught.value)
    assert f"at most {4 * cores}" in str(caught.value)
    with phi_onnx.load(folder, device="cpu", backend="ort", threads=max_threads()) as most:
        assert most.generate([5, 6, 7], max_new_tokens=2, min_new_tokens=2).token_ids
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert check_threads(12) == 12 and check_threads(0) == 0 and check_threads(None) is None
    with pytest.raises(OptionsError, match="it has 3 CPU cores, so at most 12"):
        check_threads(13)
    for bad in (-1, 2.0, True, "2"):
        with pytest.raises(OptionsError, match="must be a whole number"):
            check_threads(bad)


@pytest.mark.parametrize("command", [["generate", "FOLDER", "hi"], ["chat", "FOLDER", "--once"], ["bench", "FOLDER"],
                                     ["serve", "FOLDER"]])
def test_every_threads_option_is_bounded_by_the_cores(folder, command):
    args = [str(folder) if part == "FOLDER" else part for part in command]
    started = time.monotonic()
    for value, words in (("1000000", f"{os.cpu_count()} CPU core"), ("0", "not a thread count"),
                         ("many", "not a valid integer")):
        result = CliRunner().invoke(main, [*args, "--threads", value], input="hi\n")
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "--threads" in result.output and words in result.output, result.output
    assert time.monotonic() - started < 10  # a usage error, before any model loads


# -- text and token ids --------------------------------------------------------------------------------
@pytest.mark.parametrize(("call", "words"), [
    (lambda m: m.generate("ab\ud800", max_new_tokens=2), "The prompt contains a lone surrogate ('\\ud800', U+D800) "
                                                          "at character 2"),
    (lambda m: list(m.stream("\udfff", max_new_tokens=2)), "The prompt contains a lone surrogate"),
    (lambda m: m.generate(["fine", "x\ud83d"], max_new_tokens=2), "Prompt 1 contains"),
    (lambda m: m.encode("\ud800"), "The text contains"),
    (lambda m: m.chat([{"role": "user", "content": "hi\ud800"}]), "Message 0's content contains"),
    (lambda m: m.chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "us\ud800er", "content": "c"}]), "Message 2's role contains"),
    (lambda m: m.chat([{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]),
     "Message 0's content[0].text contains"),
    (lambda m: m.chat([{"role": "user", "content": "hi", "name": {"\udc00": "x"}}]), "A key in Message 0's name"),
    (lambda m: m.chat_stream([{"role": "user", "content": "\ud800"}]), "Message 0's content"),
    (lambda m: m.render_chat([{"role": "user", "content": "\ud800"}]), "Message 0's content"),
    (lambda m: m.start_chat(system="be \ud800 brief").send("hi"), "Message 0's content"),
    (lambda m: m.start_chat().send("\ud800"), "Message 0's content"),
])
def test_lone_surrogates_are_refused_naming_where(model, call, words):
    with pytest.raises(OptionsError) as caught:
        call(model)
    assert words in str(caught.value) and "UTF-8" in str(caught.value), str(caught.value)
    assert str(caught.value).encode("utf-8")  # the message itself prints anywhere
    # nothing is left holding the model: the next call runs
    assert model.generate("héllo 😀", max_new_tokens=2, min_new_tokens=2).token_ids


def test_deep_or_cyclic_message_content_is_walked_without_recursion(model):
    deep: list = []
    node = deep
    for _ in range(100_000):
        node.append([])
        node = node[0]
    node.append({"type": "text", "text": "\ud800"})
    with pytest.raises(OptionsError, match="lone surrogate"):
        check_messages([{"role": "user", "content": [{"type": "text", "parts": deep}]}])
    cyclic: dict = {"type": "text", "text": "fine"}
    cyclic["self"] = cyclic
    assert check_messages([{"role": "user", "content": [cyclic]}])[0]["content"][0] is cyclic


def test_decode_checks_ids_as_generate_does(model):
    vocab = model.folder.vocab_size
    for bad in ([-1], [vocab], [10**9], [2**64], [5, np.int64(-5)], np.array([vocab + 3])):
        with pytest.raises(OptionsError) as decoded:
            model.decode(bad)
        with pytest.raises(OptionsError) as generated:
            model.generate(bad, max_new_tokens=1)
        assert str(decoded.value) == str(generated.value), (decoded.value, generated.value)
        assert "outside the vocabulary (0.." + str(vocab - 1) in str(decoded.value)
    ids = model.generate([5, 6, 7], max_new_tokens=3, min_new_tokens=3).token_ids
    assert model.decode(ids) == model.decode(np.array(ids)) and model.decode([]) == ""
    assert isinstance(model.decode([0, vocab - 1]), str)  # the ends of the vocabulary decode


# -- sampling -----------------------------------------------------------------------------------------
def test_a_tiny_temperature_is_greedy(model):
    prompt = [5, 17, 99, 300]
    greedy = model.generate(prompt, max_new_tokens=8, min_new_tokens=8).token_ids
    for temperature in (1e-300, 1e-45, 5e-324):
        assert model.generate(prompt, max_new_tokens=8, min_new_tokens=8, temperature=temperature,
                              seed=0).token_ids == greedy


def test_normal_temperatures_draw_as_before():
    """The overflow guard leaves ordinary sampling bit-identical to the plain formula."""
    logits = np.random.default_rng(0).normal(size=(1, 1040)).astype(np.float32)
    for temperature in (0.3, 0.7, 1.5):
        sampler = Sampler(GenerationOptions(temperature=temperature, seed=11), [3], [1], 1040)
        rng = np.random.default_rng(11)
        got, want = [], []
        for step in range(20):
            got.append(sampler(logits[0], [], step).token)
            scores = logits[0] / np.float32(temperature)
            probs = np.exp((scores - scores.max()).astype(np.float64))
            cumulative = np.cumsum(probs)
            want.append(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")))
        assert got == want and len(set(got)) > 1


@pytest.mark.parametrize(("position", "bad"), [(5, np.nan), (5, np.inf), (slice(None), -np.inf)])
def test_non_finite_logits_stop_the_sampler(position, bad):
    logits = np.zeros(16, dtype=np.float32)
    logits[position] = bad
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
        Sampler(GenerationOptions(), [3], [1], 16)(logits, [], 0)


def test_a_masked_logit_is_not_an_error():
    logits = np.zeros((1, 16), dtype=np.float32)
    logits[0, :8] = -np.inf  # e.g. unused ids masked by the graph
    logits[0, 9] = 1.0
    assert Sampler(GenerationOptions(), [3], [1], 16)(logits[0], [], 0).token == 9


@pytest.mark.parametrize("backend", ["ort", "genai"])
def test_a_nan_weight_model_stops_with_an_error(folder, tmp_path, backend):
    broken = tmp_path / "nan"
    broken.mkdir()
    for item in folder.iterdir():
        if item.name == "model.onnx.data":
            # fp32 weights all 0xFFFFFFFF: every weight is NaN, as in a corrupted file
            (broken / item.name).write_bytes(b"\xff" * item.stat().st_size)
        else:
            (broken / item.name).symlink_to(item)
    with phi_onnx.load(broken, device="cpu", backend=backend) as nan_model:
        with pytest.raises(NonFiniteLogitsError) as caught:
            nan_model.generate("hello", max_new_tokens=4)
        assert "corrupt" in str(caught.value) and "phi-onnx verify" in str(caught.value)
        stream = nan_model.stream("hello", max_new_tokens=4)
        with pytest.raises(NonFiniteLogitsError):
            list(stream)
        assert stream.result is not None  # the stream ended (and released the model)
        with pytest.raises(NonFiniteLogitsError):  # not a deadlock, not "unfinished stream"
            nan_model.generate([5, 6], max_new_tokens=2)
    result = CliRunner().invoke(main, ["generate", str(broken), "hello", "--backend", backend])
    assert result.exit_code == 2 and "non-finite logits" in result.output and "Traceback" not in result.output


option_values = st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | st.text(max_size=4) \
    | st.lists(st.text(max_size=3) | st.integers(), max_size=3) | st.binary(max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p",
                                        "repetition_penalty", "seed", "stop", "bogus"]), option_values))
def test_any_generation_options_validate_or_are_refused(kwargs):
    try:
        options = GenerationOptions.from_kwargs(None, **kwargs)
    except OptionsError as error:
        assert str(error)
    else:
        assert options.max_new_tokens >= 1 and all(isinstance(stop, str) for stop in options.stop)


# -- library API types --------------------------------------------------------------------------------
@pytest.mark.parametrize(("call", "words"), [
    (lambda m: phi_onnx.load(None), "not NoneType"),
    (lambda m: phi_onnx.load(123), "not int"),
    (lambda m: phi_onnx.load(b"/tmp"), "not bytes"),
    (lambda m: phi_onnx.load(m.path, backend=None), "strings"),
    (lambda m: phi_onnx.load(m.path, threads="2"), "threads must be"),
    (lambda m: m.generate(None), "Cannot use NoneType as a prompt"),
    (lambda m: m.generate(42), "Cannot use int as a prompt"),
    (lambda m: m.generate(b"hello"), "bytes are not token ids"),
    (lambda m: m.generate(bytearray(b"hi")), "bytes are not token ids"),
    (lambda m: m.generate([b"hi", "x"]), "bytes are not token ids"),
    (lambda m: m.generate([1.5, 2.0]), "Cannot use float as a prompt"),
    (lambda m: m.generate([[1, "a"]]), "token ids must be integers"),
    (lambda m: m.generate("hi", stop=5), "stop must be a string or a list of strings"),
    (lambda m: m.generate("hi", stop=[5]), "stop strings must be non-empty strings"),
    (lambda m: m.generate("hi", max_new_tokens="3"), "max_new_tokens must be a whole number"),
    (lambda m: m.generate("hi", max_new_tokens=True), "max_new_tokens must be a whole number"),
    (lambda m: m.generate("hi", seed=1.5), "seed must be"),
    (lambda m: m.generate("hi", temperature="hot"), "temperature must be"),
    (lambda m: m.stream(None), "Cannot use NoneType"),
    (lambda m: m.chat("hi"), "list of messages, not str"),
    (lambda m: m.chat(None), "list of messages, not NoneType"),
    (lambda m: m.chat({"role": "user", "content": "hi"}), "list of messages, not dict"),
    (lambda m: m.chat(["hi"]), "Message 0 is str"),
    (lambda m: m.chat([{"role": 1, "content": "hi"}]), "Message 0 has no role"),
    (lambda m: m.chat([{"role": "user"}]), "has no content"),
    (lambda m: m.chat([{"role": "user", "content": 7}]), "content of type int"),
    (lambda m: m.chat_stream("hi"), "list of messages"),
    (lambda m: m.start_chat().send(123), "not int"),
    (lambda m: m.start_chat(system=["Be brief"]), "system prompt is text, not list"),
    (lambda m: m.start_chat().set_system(5), "system prompt is text, not int"),
    (lambda m: m.encode(None), "encode() takes a string"),
    (lambda m: m.encode(b"hi"), "encode() takes a string"),
    (lambda m: m.decode("hi"), "Cannot use str as token ids"),
    (lambda m: m.decode([1, "a"]), "decode() takes a list of token ids"),
    (lambda m: m.render_chat("hi"), "list of messages, not str"),
    (lambda m: ExportOptions(block_size="32"), "block_size must be a whole number"),
    (lambda m: ExportOptions(symmetric="yes"), "symmetric must be True or False"),
    (lambda m: ExportOptions(precision=4), "precision must be a string"),
])
def test_wrong_types_are_options_errors(model, call, words):
    with pytest.raises(OptionsError) as caught:
        call(model)
    assert words in str(caught.value)


def test_token_id_lists_and_arrays_still_work(model):
    ids = [5, 17, 99, 300]
    first = model.generate(ids, max_new_tokens=4, min_new_tokens=4).token_ids
    assert model.generate(np.array(ids), max_new_tokens=4, min_new_tokens=4).token_ids == first
    assert model.generate(tuple(np.int64(t) for t in ids), max_new_tokens=4, min_new_tokens=4).token_ids == first
    both = model.generate([ids, "hello"], max_new_tokens=4, min_new_tokens=4)
    assert both[0].token_ids == first
    assert model.decode(np.array(first)) == model.decode(first) == model.decode(tuple(first))


# -- chat messages: one validation, fuzzed --------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4),
                           max_leaves=12)
message_like = st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls", 1]),
                               json_values | st.sampled_from(["user", "assistant", "system"]), max_size=4)
conversations = (st.lists(message_like, max_size=4) | json_values | st.binary(max_size=8)
                 | st.tuples(message_like))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations)
def test_any_conversation_renders_or_is_refused(messages):
    template = ChatTemplate(TINY_TEMPLATE, {"eos_token": "<|endoftext|>"})
    try:
        text = template.render(messages)
    except PhiOnnxError as error:
        assert str(error)
    else:
        assert isinstance(text, str) and text.endswith("<|assistant|>\n")
        assert check_messages(messages) == list(messages)


# -- chat templates: bounded, and the right hint ---------------------------------------------------------
@pytest.mark.parametrize(("source", "words"), [
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
     "characters of output|more than 2 s"),  # whichever limit a busy machine reaches first
    ("{{ 'a' * 10**10 }}", "repeated 10000000000 times"),
    ("{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}", "more than 2 s"),
    ("{{ 'a'|center(10**10) }}", "size argument"),
    ("{{ '{:>999999999}'.format(1) }}", "format width"),
    ("{{ ('a' * 1000000)|replace('a', 'bbbbbbbbbb') }}", "replace"),
    ("{% set a = 'x' * 3000000 %}{% set b = a ~ a %}{% set c = b ~ b %}{{ c }}", "concatenation"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "concatenation"),
    ("{{ lipsum(10**6) }}", "size argument"),
])
def test_runaway_templates_are_stopped(source, words):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(ModelFolderError) as caught:
        ChatTemplate(source).render(USER)
    assert time.monotonic() - started < 15  # stopped, not hung (the watchdog is at 2 s)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300 * 1024  # KiB: no GBs allocated
    assert re.search(words, str(caught.value)) and "chat_template" in str(caught.value)
    assert "Check the roles" not in str(caught.value)


def test_the_roles_hint_only_when_the_template_refuses_the_roles():
    refusing = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}x"
    with pytest.raises(OptionsError, match="System role not supported") as caught:
        ChatTemplate(refusing).render([{"role": "system", "content": "Be brief."}])
    assert "Check the roles" in str(caught.value)
    broken = "{{ messages[0].content + 1 }}"
    with pytest.raises(OptionsError, match="failed on these messages") as caught:
        ChatTemplate(broken).render(USER)
    assert "Check the roles" not in str(caught.value) and "TypeError" in str(caught.value)


def test_a_normal_template_is_unchanged_and_no_late_watchdog_fires():
    text = ChatTemplate(TINY_TEMPLATE).render(USER)
    assert text == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    time.sleep(0.1)
    assert sum(range(10**6)) > 0  # work after the render is not interrupted


def test_chat_does_not_import_model():
    """runtime/model.py imports chat.py; the reverse would be an import loop."""
    tree = ast.parse((Path(phi_onnx.__file__).parent / "runtime" / "chat.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "phi_onnx.runtime.model" not in imported and "phi_onnx" not in imported
