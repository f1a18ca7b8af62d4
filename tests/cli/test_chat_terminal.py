"""`phi-onnx chat` on a pseudo-terminal (pexpect): the line editor takes a bracketed paste of several
lines as one message, recalls history, and Ctrl-C / Ctrl-D do what they did with input()."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pexpect = pytest.importorskip("pexpect")
pytest.importorskip("prompt_toolkit")

ROOT = Path(__file__).parents[2]
STATS = re.compile(rb"\[(\d+) tokens[^\]]*prompt (\d+)[^\]]*, (\w+)\]")
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
PROMPT = b">>>"  # prompt_toolkit draws the space after it as a cursor move


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from phi_onnx.export import export

    folder = tmp_path_factory.mktemp("tiny") / "tiny-phi3"
    export("tiny-phi3", folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tiny_export: Path) -> Any:
    import phi_onnx

    return phi_onnx.load(tiny_export, device="cpu", backend="ort")


def spawn(folder: Path, *options: str, sigint: Any = signal.SIG_DFL) -> Any:
    """`phi-onnx chat` on a terminal; `sigint`: the SIGINT disposition it inherits."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TERM": "xterm",
           "PROMPT_TOOLKIT_NO_CPR": "1"}  # pexpect does not answer the cursor position query a terminal would
    child = pexpect.spawn(sys.executable, ["-m", "phi_onnx", "chat", str(folder), "--backend", "ort", *options],
                          env=env, timeout=30, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    child.expect(rb"Alt\+Enter starts a new line")  # the banner names what the line editor adds
    child.expect_exact(PROMPT)
    return child


def turn(child: Any) -> tuple[int, int, str, bytes]:
    """Wait for the end of a reply: (tokens, prompt tokens, finish reason) from its stats line, and what
    the terminal showed before it."""
    child.expect(STATS)
    shown = child.before
    tokens, prompt, reason = child.match.groups()
    child.expect_exact(PROMPT)
    return int(tokens), int(prompt), reason.decode(), shown


def test_a_pasted_block_of_two_lines_is_one_message(tiny_export, tiny_model):
    child = spawn(tiny_export, "--max-new-tokens", "3", "--min-new-tokens", "3")
    try:
        child.send(f"{PASTE_START}What does this do?\r\nimport os{PASTE_END}")
        child.send("\r")
        tokens, prompt, reason, _ = turn(child)
        both = tiny_model.chat_prompt_ids([{"role": "user", "content": "What does this do?\nimport os"}])
        assert (tokens, prompt, reason) == (3, len(both), "length")
        assert STATS.search(child.before) is None  # one turn: no second reply before the prompt came back
        # Alt+Enter types a new line into the message; Enter sends the two lines together.
        child.send("first\x1b\rsecond\r")
        tokens, prompt, _, _ = turn(child)
        history = [{"role": "user", "content": "What does this do?\nimport os"},
                   {"role": "assistant", "content": tiny_model.chat(
                       [{"role": "user", "content": "What does this do?\nimport os"}],
                       max_new_tokens=3, min_new_tokens=3).text},
                   {"role": "user", "content": "first\nsecond"}]
        assert prompt == len(tiny_model.chat_prompt_ids(history))
        # Up recalls the last message; /reset, then sending it again starts from an empty conversation.
        child.send("/reset\r")
        child.expect_exact(b"(conversation cleared)")
        child.expect_exact(PROMPT)
        child.send("\x1b[A\x1b[A\r")  # Up twice: past /reset to "first\nsecond"
        _, prompt, _, _ = turn(child)
        assert prompt == len(tiny_model.chat_prompt_ids([{"role": "user", "content": "first\nsecond"}]))
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.terminate(force=True)


# SIG_IGN: a parent that ignores SIGINT (as a test worker did in CI) passes that on; the chat must still stop.
@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "inherited-ignored"])
def test_ctrl_c_stops_a_reply_or_clears_the_prompt_and_ctrl_d_quits(tiny_export, sigint):
    child = spawn(tiny_export, "--max-new-tokens", "3000", "--min-new-tokens", "3000", sigint=sigint)
    try:
        child.sendintr()  # at the prompt: a hint, and the session goes on
        child.expect_exact(b"(Ctrl-C stops a reply; /exit or Ctrl-D quits.)")
        child.expect_exact(PROMPT)
        child.send("Tell me everything\r")
        # Interrupt only once the reply streams: Ctrl-C is a signal only after the line editor has given the
        # terminal back (before, it is a key in raw mode), which a fixed sleep raced under load (the reply then
        # ran to its end). 1 KB is well past the editor's last redraw; 3000 tokens are several times that.
        child.expect_exact(b"Tell me everything")
        streamed = b""
        deadline = time.monotonic() + 30
        while len(streamed) < 1024 and time.monotonic() < deadline:
            with contextlib.suppress(pexpect.TIMEOUT):
                streamed += child.read_nonblocking(size=256, timeout=1)
        assert len(streamed) >= 1024, streamed
        child.sendintr()  # mid-reply: the reply stops, the session goes on
        tokens, _, reason, shown = turn(child)
        assert reason == "interrupted" and 0 < tokens < 3000
        assert b" [stopped]" in shown
        child.sendeof()  # Ctrl-D on an empty line quits
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert b"Traceback" not in child.before
    finally:
        child.terminate(force=True)
