"""`phi-onnx chat / generate / bench` driven through click, and bad folders as clean errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

import phi_onnx
from phi_onnx.cli import main
from phi_onnx.runtime.generation import TextStream

STATS = re.compile(r"^\[(\d+) tokens.*prompt (\d+)(?:, (\d+) cached)?, (\w+) / (\w+), (\w+)\]$", re.M)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_generate_json_fields(make_export):
    folder = make_export("phi3-gqa")
    result = run("generate", str(folder), "def join(a, b):", "--max-new-tokens", "7", "--min-new-tokens", "7",
                 "--json", "--backend", "ort")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"text", "token_ids", "provider", "backend", "prompt_tokens", "new_tokens", "seconds"} <= set(data)
    assert data["provider"] == "CPUExecutionProvider" and data["backend"] == "ort"
    assert data["new_tokens"] == len(data["token_ids"]) == 7
    model = phi_onnx.load(folder, device="cpu", backend="genai")
    same = model.generate("def join(a, b):", max_new_tokens=7, min_new_tokens=7)
    assert data["token_ids"] == same.token_ids and data["text"] == same.text
    assert data["prompt_tokens"] == len(model.encode("def join(a, b):"))


def test_generate_streams_text_and_a_stats_line(make_export):
    result = run("generate", str(make_export("phi3-gqa")), "import os", "--max-new-tokens", "5",
                 "--temperature", "0.8", "--seed", "1", "--stop", "never!")
    assert result.exit_code == 0, result.output
    assert STATS.search(result.stderr)
    assert result.stdout.endswith("\n")


def test_generate_bad_option_is_a_clean_error(make_export):
    result = run("generate", str(make_export("phi3-gqa")), "x", "--top-p", "1.5")
    assert result.exit_code == 2
    assert "top_p" in result.stderr and "Traceback" not in result.output


def test_interactive_chat_two_turns_reset_exit(make_export):
    folder = make_export("phi4mini")
    result = run("chat", str(folder), "--max-new-tokens", "4", "--min-new-tokens", "4", "--backend", "ort",
                 input="Hello there\nSecond turn\n/reset\nSecond turn\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert "CPUExecutionProvider" in result.stderr and "/reset" in result.stderr  # banner
    stats = STATS.findall(result.stderr)
    assert len(stats) == 3  # /exit ended the session before "never read"
    prompts = [int(s[1]) for s in stats]
    model = phi_onnx.load(folder, device="cpu", backend="ort")
    alone = len(model.chat_prompt_ids([{"role": "user", "content": "Second turn"}]))
    assert prompts[1] > prompts[0] + alone - 2  # the second turn carried the history
    assert prompts[2] == alone  # /reset forgot it
    assert "(conversation cleared)" in result.stderr
    assert all(s[3] == "CPUExecutionProvider" and s[4] == "ort" for s in stats)


def test_chat_system_command_and_eof(make_export):
    result = run("chat", str(make_export("phi4mini")), "--max-new-tokens", "3", "--backend", "genai",
                 input="/system Be brief.\nHi\n/nonsense\n")  # ends at EOF
    assert result.exit_code == 0, result.output
    assert "(system prompt set)" in result.stderr and "unknown command /nonsense" in result.stderr
    model = phi_onnx.load(make_export("phi4mini"), device="cpu", backend="ort")
    expected = len(model.chat_prompt_ids([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}]))
    assert int(STATS.findall(result.stderr)[0][1]) == expected


def test_ctrl_c_stops_the_reply_not_the_session(make_export, monkeypatch):
    original = TextStream.__next__
    calls = {"n": 0}

    def interrupted_once(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(TextStream, "__next__", interrupted_once)
    result = run("chat", str(make_export("phi4mini")), "--max-new-tokens", "8", "--min-new-tokens", "8",
                 "--backend", "ort", input="first\nsecond\n")
    assert result.exit_code == 0, result.output
    assert "[stopped]" in result.stdout
    stats = STATS.findall(result.stderr)
    assert [s[5] for s in stats] == ["interrupted", "length"]


def test_chat_once_from_stdin(make_export):
    result = run("chat", str(make_export("phi4mini")), "--once", "--json", "--max-new-tokens", "5",
                 "--system", "Sys.", input="2+2?\n")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["new_tokens"] <= 5 and data["provider"] == "CPUExecutionProvider"
    plain = run("chat", str(make_export("phi4mini")), "--once", "--max-new-tokens", "5", input="2+2?\n")
    assert plain.exit_code == 0 and STATS.search(plain.stderr)


def test_bench_json(make_export):
    result = run("bench", str(make_export("phi3-gqa")), "--prompt-tokens", "32", "--new-tokens", "8",
                 "--repeat", "2", "--warmup", "1", "--json", "--backend", "ort")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("prompt_tokens_per_second", "first_token_seconds", "decode_tokens_per_second",
                "wall_tokens_per_second", "peak_rss_bytes", "decode_ceiling_tokens_per_second", "load_seconds"):
        assert data[key] > 0, key
    assert data["provider"] == "CPUExecutionProvider" and len(data["runs"]) == 2
    assert data["weight_bytes"] >= (make_export("phi3-gqa") / "model.onnx.data").stat().st_size
    embedding = 1040 * 128 * 4  # the fp32 table the graph only gathers one row from per token
    assert data["bytes_read_per_token"] == data["weight_bytes"] - embedding


def test_bench_too_long_is_an_error(make_export):
    result = run("bench", str(make_export("phi4mini")), "--prompt-tokens", "500", "--new-tokens", "100")
    assert result.exit_code == 2 and "512" in result.stderr and "Traceback" not in result.output


# -- bad folders -----------------------------------------------------------------------------------

@pytest.fixture()
def broken(make_export, tmp_path):
    def make(change):
        folder = tmp_path / "broken"
        shutil.copytree(make_export("phi3-gqa"), folder)
        change(folder)
        return folder
    return make


@pytest.mark.parametrize("change, fragment", [
    (lambda f: (f / "genai_config.json").unlink(), "not a phi-onnx export"),
    (lambda f: (f / "model.onnx").unlink(), "model.onnx"),
    (lambda f: (f / "model.onnx").write_bytes(b"\x08\x07garbage" * 50), "not a valid ONNX model"),
    (lambda f: (f / "model.onnx.data").unlink(), "model.onnx.data"),
    (lambda f: (f / "model.onnx.data").write_bytes(b"\0" * 100), "could not load"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json"),
    (lambda f: (f / "tokenizer.json").write_text("{not json"), "tokenizer"),
    (lambda f: (f / "genai_config.json").write_text("{}"), "genai_config.json"),
])
@pytest.mark.parametrize("backend", ["ort", "genai"])
def test_bad_folders_are_clear_errors(broken, change, fragment, backend):
    folder = broken(change)
    with pytest.raises(phi_onnx.PhiOnnxError, match=fragment) as info:
        phi_onnx.load(folder, device="cpu", backend=backend)
    assert info.value.hint
    result = run("generate", str(folder), "hi", "--backend", backend)
    assert result.exit_code == 2 and "Traceback" not in result.output and fragment in result.stderr


def test_not_a_folder(tmp_path):
    result = run("chat", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "not a folder" in result.stderr


def test_chat_without_template_is_a_clear_error(broken):
    def drop_template(folder):
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))

    folder = broken(drop_template)
    result = run("chat", str(folder), "--once", input="hi\n")
    assert result.exit_code == 2 and "no chat template" in result.stderr
