"""The chat page at / in headless Chromium, driven over the Chrome DevTools protocol."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import API_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
websockets_sync = pytest.importorskip("websockets.sync.client")
httpx = pytest.importorskip("httpx")


class Page:
    """A minimal DevTools client: evaluate JavaScript, type text, press Enter."""

    def __init__(self, url: str) -> None:
        self.socket = websockets_sync.connect(url, max_size=2**24, open_timeout=20)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=20))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def type_and_send(self, text: str) -> None:
        self.js("document.getElementById('input').focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def wait(self, expression: str, seconds: float = 30) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture()
def page(live_server: Any, tmp_path: Path) -> Any:
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"{live_server.url}/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or browser.poll() is not None:
                pytest.fail("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = []
        while not targets and time.monotonic() < deadline:
            targets = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                       if t["type"] == "page" and t["url"].startswith(live_server.url)]
            time.sleep(0.1)
        assert targets, "the chat page did not open"
        client = Page(targets[0]["webSocketDebuggerUrl"])
        client.wait("document.readyState === 'complete' && document.getElementById('form') !== null")
        yield client
        client.socket.close()
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()


def test_chat_page_streams_replies_multi_turn(page, tiny_model):
    page.js(f"document.getElementById('key').value = {json.dumps(API_KEY)}")
    history: list[dict[str, str]] = []
    for turn, question in enumerate(["What does os.path.join do?", "And os.sep?"], start=1):
        page.type_and_send(question)
        page.wait(f"document.querySelectorAll('.assistant').length === {turn} && "
                  "document.querySelectorAll('.assistant')[" + str(turn - 1) + "].dataset.done === 'true'")
        reply = page.js(f"document.querySelectorAll('.assistant')[{turn - 1}].textContent")
        history.append({"role": "user", "content": question})
        prompt = len(tiny_model.chat_prompt_ids(history))
        expected = tiny_model.chat(history, max_new_tokens=512 - prompt).text
        assert reply == expected and reply
        history.append({"role": "assistant", "content": reply})
    assert page.js("document.querySelectorAll('.user').length") == 2
    assert page.js("document.querySelectorAll('.error').length") == 0
    assert page.js("document.getElementById('stop').disabled") is True  # enabled only while streaming


def test_stop_button_ends_the_stream_and_frees_the_slot(page, live_server):
    page.js(f"document.getElementById('key').value = {json.dumps(API_KEY)}")
    # Make this page's requests long (the page itself sends no length options).
    page.js("""const original = window.fetch; window.fetch = (url, init) => {
        const body = JSON.parse(init.body); body.max_tokens = 450; body.ignore_eos = true;
        return original(url, {...init, body: JSON.stringify(body)}); }""")
    page.type_and_send("Tell me everything about os.path.")
    page.wait("document.querySelector('.assistant') && document.querySelector('.assistant').textContent.length > 0")
    assert page.js("document.getElementById('stop').disabled") is False
    page.js("document.getElementById('stop').click()")
    page.wait("document.querySelector('.assistant').dataset.done === 'true'")
    assert page.js("document.getElementById('send').disabled") is False
    deadline = time.monotonic() + 15
    while "phi_onnx_active_requests 0.0" not in httpx.get(f"{live_server.url}/metrics", timeout=10,
                                                        headers={"Authorization": f"Bearer {API_KEY}"}).text:
        assert time.monotonic() < deadline, "the stopped request still holds its slot"
        time.sleep(0.1)
    assert page.js("document.querySelectorAll('.error').length") == 0


def test_chat_page_shows_errors(page):
    page.js("document.getElementById('key').value = 'wrong'")
    page.type_and_send("Hi")
    message = page.wait("document.querySelector('.error') && document.querySelector('.error').textContent")
    assert "API key" in message
