"""The chat page at / in headless Chromium, driven over the Chrome DevTools protocol.

Replies come from the tiny model through the live server, or are scripted: the browser's Fetch domain
pauses the page's POST and answers it with a prepared event stream (or an error, or a refused
connection), which also shows the request body the page sent. Screenshots go to pytest's tmp folder.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import API_KEY, MODEL_NAME

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
websockets_sync = pytest.importorskip("websockets.sync.client")
httpx = pytest.importorskip("httpx")

CONVERSATIONS = "JSON.parse(localStorage.getItem('phi-onnx-conversations') || '[]')"
MARKDOWN = ("Here is **bold** text and `inline code`.\n\n"
            "```python\ndef add(a, b):\n    return a + b\n```\n\n"
            "| name | value |\n|------|-------|\n| x | 1 |\n| y | 2 |\n")


class Page:
    """A minimal DevTools client for one tab: evaluate JavaScript, type, press Enter, answer paused requests."""

    def __init__(self, url: str) -> None:
        self.socket = websockets_sync.connect(url, max_size=2**26, open_timeout=20)
        self.next_id = 0
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.context = ""  # the browser context the tab lives in

    def send(self, method: str, **params: Any) -> int:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return self.next_id

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = self.send(method, **params)
        while True:
            message = json.loads(self.socket.recv(timeout=20))
            if "method" in message and message["method"] in self.handlers:
                self.handlers[message["method"]](message["params"])
            if message.get("id") == ident:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str, *, await_promise: bool = False) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def type_into(self, element_id: str, text: str) -> None:
        """Focus an element and type `text` as a user would (fires input events)."""
        self.js(f"document.getElementById({json.dumps(element_id)}).focus()")
        self.call("Input.insertText", text=text)

    def type_and_send(self, text: str) -> None:
        self.type_into("input", text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def wait(self, expression: str, seconds: float = 30) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def wait_loaded(self) -> None:
        self.wait("document.readyState === 'complete' && window.marked !== undefined && "
                  "document.getElementById('form') !== null && !window.__before_reload")

    def reload(self) -> None:
        self.js("window.__before_reload = true")
        self.call("Page.reload", ignoreCache=True)
        self.wait_loaded()

    def viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=width < 600)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def script_replies(self, replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer the page's next chat requests from `replies` (each: status/body, or fail); returns the
        bodies the page sent, filled in as requests arrive."""
        sent: list[dict[str, Any]] = []

        def paused(params: dict[str, Any]) -> None:
            request = params["request"]
            data = request.get("postData")
            if data is None and request.get("postDataEntries"):
                data = b"".join(base64.b64decode(e.get("bytes", "")) for e in request["postDataEntries"]).decode()
            sent.append(json.loads(data))
            reply = replies.pop(0)
            if reply.get("fail"):
                self.send("Fetch.failRequest", requestId=params["requestId"], errorReason=reply["fail"])
                return
            kind = "text/event-stream" if reply.get("status", 200) == 200 else "application/json"
            self.send("Fetch.fulfillRequest", requestId=params["requestId"], responseCode=reply.get("status", 200),
                      responseHeaders=[{"name": "Content-Type", "value": kind}],
                      body=base64.b64encode(reply["body"].encode()).decode())

        self.handlers["Fetch.requestPaused"] = paused
        self.call("Fetch.enable", patterns=[{"urlPattern": "*/v1/chat/completions*", "requestStage": "Request"}])
        return sent


def sse(text: str, *, pieces: int = 12, finish: str = "stop", error: str | None = None) -> dict[str, Any]:
    """A scripted chat stream as the server sends it: role chunk, `text` in `pieces`, finish, usage, [DONE]."""
    size = max(1, -(-len(text) // pieces))
    parts = [text[i:i + size] for i in range(0, len(text), size)]
    head = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": MODEL_NAME}

    def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
        return f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': reason}]})}\n\n"

    lines = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in parts]
    if error is not None:
        lines.append(f"data: {json.dumps({'error': {'message': error, 'type': 'server_error'}})}\n\n")
    else:
        lines.append(chunk({}, finish))
        usage = {"prompt_tokens": 9, "completion_tokens": len(parts), "total_tokens": 9 + len(parts)}
        lines.append(f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n")
    lines.append("data: [DONE]\n\n")
    return {"body": "".join(lines)}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """One headless Chromium per module: (its DevTools address, a browser-level DevTools client)."""
    profile = tmp_path_factory.mktemp("chromium")
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text().split()[0]}"
        control = Page(httpx.get(f"http://{address}/json/version", timeout=10).json()["webSocketDebuggerUrl"])
        yield address, control
        control.socket.close()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture()
def page(browser: tuple[str, Any], live_server: Any) -> Iterator[Page]:
    """The chat page in a fresh browser context (its own, empty localStorage), 1280 x 800."""
    address, control = browser
    context = control.call("Target.createBrowserContext")["browserContextId"]
    target = control.call("Target.createTarget", url="about:blank", browserContextId=context)["targetId"]
    try:
        found = [t for t in httpx.get(f"http://{address}/json/list", timeout=10).json() if t["id"] == target]
        client = Page(found[0]["webSocketDebuggerUrl"])
        client.context = context
        client.viewport(1280, 800)
        client.call("Page.navigate", url=f"{live_server.url}/")
        client.wait_loaded()
        yield client
        client.socket.close()
    finally:
        control.call("Target.disposeBrowserContext", browserContextId=context)


def assistant_done(page: Page, count: int) -> None:
    page.wait(f"document.querySelectorAll('.assistant').length === {count} && "
              f"document.querySelectorAll('.assistant')[{count - 1}].dataset.done === 'true' && "
              "document.getElementById('send').disabled === false")


def test_chat_page_streams_replies_multi_turn(page, tiny_model):
    page.js(f"document.getElementById('key').value = {json.dumps(API_KEY)}")
    page.js("document.getElementById('max_tokens').value = '200'")  # the test server's slots hold 512 tokens
    history: list[dict[str, str]] = []
    for turn, question in enumerate(["What does os.path.join do?", "And os.sep?"], start=1):
        page.type_and_send(question)
        assistant_done(page, turn)
        stored = page.js(CONVERSATIONS)
        assert len(stored) == 1 and stored[0]["title"] == "What does os.path.join do?"
        reply = stored[0]["messages"][-1]
        history.append({"role": "user", "content": question})
        expected = tiny_model.chat(history, max_new_tokens=200)
        assert reply["role"] == "assistant" and reply["content"] == expected.text and expected.text
        assert reply["stats"]["tokens"] == expected.new_tokens
        history.append({"role": "assistant", "content": expected.text})
        stats = page.js(f"document.querySelectorAll('.assistant')[{turn - 1}].querySelector('.stats').textContent")
        assert re.match(rf"{expected.new_tokens} tokens? · (?:[\d.]+ tokens/s · )?first token \d+ ms", stats), stats
    assert page.js("document.querySelectorAll('.user').length") == 2
    assert page.js("document.querySelectorAll('.error').length") == 0
    assert page.js("document.getElementById('stop').disabled") is True  # enabled only while streaming
    assert page.js("document.querySelectorAll('.regenerate').length") == 1  # on the last reply only


def test_stop_button_ends_the_stream_and_frees_the_slot(page, live_server):
    page.js(f"document.getElementById('key').value = {json.dumps(API_KEY)}")
    page.js("document.getElementById('max_tokens').value = '450'")
    # Make this page's requests long (the tiny model stops early otherwise).
    page.js("""const original = window.fetch; window.fetch = (url, init) => {
        const body = JSON.parse(init.body); body.ignore_eos = true;
        return original(url, {...init, body: JSON.stringify(body)}); }""")
    page.type_and_send("Tell me everything about os.path.")
    page.wait("document.querySelector('.assistant .body') && "
              "document.querySelector('.assistant .body').textContent.length > 0")
    assert page.js("document.getElementById('stop').disabled") is False
    page.js("document.getElementById('stop').click()")
    page.wait("document.querySelector('.assistant').dataset.done === 'true'")
    assert page.js("document.getElementById('send').disabled") is False
    assert "stopped" in page.js("document.querySelector('.assistant .stats').textContent")
    deadline = time.monotonic() + 15
    while f'phi_onnx_active_requests{{model="{MODEL_NAME}"}} 0.0' not in httpx.get(
            f"{live_server.url}/metrics", timeout=10, headers={"Authorization": f"Bearer {API_KEY}"}).text:
        assert time.monotonic() < deadline, "the stopped request still holds its slot"
        time.sleep(0.1)
    assert page.js("document.querySelectorAll('.error').length") == 0
    assert page.js(CONVERSATIONS)[0]["messages"][-1]["stats"]["finish"] == "stopped"


def test_wrong_key_shows_the_servers_message_and_no_empty_bubble(page):
    page.js("document.getElementById('key').value = 'wrong'")
    page.type_and_send("Hi")
    message = page.wait("document.querySelector('.error') && document.querySelector('.error').textContent")
    assert message == "Incorrect or missing API key: send 'Authorization: Bearer KEY'."
    assert page.js("document.querySelectorAll('.assistant').length") == 0
    assert page.js("document.getElementById('input').value") == "Hi"  # back in the box to send again
    assert page.js(CONVERSATIONS) == []  # a question that got no answer is not kept


def test_markdown_renders_as_highlighted_elements_with_a_copy_button(page, browser, live_server):
    sent = page.script_replies([sse(MARKDOWN)])
    page.type_and_send("Show me some markdown")
    assistant_done(page, 1)
    body = "document.querySelector('.assistant .body')"
    assert page.js(f"{body}.querySelector('strong').textContent") == "bold"
    assert page.js(f"{body}.querySelector(':not(pre) > code').textContent") == "inline code"
    assert page.js(f"{body}.querySelector('pre > code').className").split() == ["language-python", "hljs"]
    assert page.js(f"{body}.querySelector('pre > code .hljs-keyword').textContent") == "def"
    assert page.js(f"[...{body}.querySelectorAll('table td')].map(td => td.textContent)") == ["x", "1", "y", "2"]
    assert page.js(f"[...{body}.querySelectorAll('table th')].map(th => th.textContent)") == ["name", "value"]
    stats = page.js("document.querySelector('.assistant .stats').textContent")
    assert re.match(r"12 tokens · (?:[\d.]+ tokens/s · )?first token \d+ ms$", stats), stats  # usage's count
    assert sent[0]["stream"] is True and sent[0]["messages"] == [{"role": "user", "content": "Show me some markdown"}]
    assert sent[0]["max_tokens"] == 512  # the default, so a model never writes up to its whole context
    # The copy button puts the code (not the button's own label) on the clipboard.
    _, control = browser
    control.call("Browser.grantPermissions", origin=live_server.url, browserContextId=page.context,
                 permissions=["clipboardReadWrite", "clipboardSanitizedWrite"])
    page.call("Emulation.setFocusEmulationEnabled", enabled=True)
    page.js(f"{body}.querySelector('.code-block .copy').click()")
    page.wait(f"{body}.querySelector('.code-block .copy').textContent === 'Copied'")
    assert page.js("navigator.clipboard.readText()", await_promise=True) == "def add(a, b):\n    return a + b\n"


def test_html_in_a_reply_never_executes(page, live_server):
    hostile = ('<img src=x onerror="window.__pwned = 1">\n\n<script>window.__pwned = 2</script>\n\n'
               '[click me](javascript:window.__pwned=3) <a href="javascript:window.__pwned=4">or me</a>\n\n'
               '<iframe src="javascript:parent.__pwned=5"></iframe><svg onload="window.__pwned=6"></svg>\n\n'
               '<b onmouseover="window.__pwned=7">hover</b> ![pixel](https://tracker.invalid/p.png)\n')
    page.js("window.__violations = []; document.addEventListener('securitypolicyviolation', "
            "e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI))")
    page.script_replies([sse(hostile, pieces=9)])
    page.type_and_send("Say something nasty")
    assistant_done(page, 1)
    for link in range(page.js("document.querySelectorAll('.assistant a').length")):
        page.js(f"document.querySelectorAll('.assistant a')[{link}].click()")
    page.js("document.querySelector('.assistant b') && document.querySelector('.assistant b')"
            ".dispatchEvent(new MouseEvent('mouseover'))")
    time.sleep(0.3)
    assert page.js("window.__pwned === undefined") is True
    found = page.js("[...document.querySelectorAll('.assistant .body *')].map(e => e.tagName.toLowerCase() + "
                    "[...e.attributes].map(a => ' ' + a.name + '=' + a.value).join(''))")
    bad = [e for e in found if e.startswith(("script", "iframe", "svg")) or " on" in e or "javascript:" in e]
    assert not bad and "img src=x" in found, found  # the <img> stays, without its handler
    # The page's CSP is a second wall: the tracking pixel is blocked, and even HTML that skipped the
    # sanitiser runs no inline handler.
    page.wait("window.__violations.some(v => v.includes('tracker.invalid'))")
    page.js("document.getElementById('log').insertAdjacentHTML('beforeend', '<img src=\"data:,x\" "
            "onerror=\"window.__pwned = 8\"><img src=\"/nowhere\" onerror=\"window.__pwned = 9\">')")
    page.wait("window.__violations.some(v => v.startsWith('script-src-attr'))")
    assert page.js("window.__pwned === undefined") is True
    policy = httpx.get(f"{live_server.url}/", timeout=10).headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy


def test_settings_persist_across_reload_and_reach_the_request(page):
    page.js("document.getElementById('settings-button').click()")
    assert page.js("document.getElementById('settings').open") is True
    page.type_into("system", "Answer in one sentence.")
    page.type_into("temperature", "0.3")
    page.type_into("top_p", "0.9")
    page.type_into("max_tokens", "64")
    page.type_into("key", "secret-key")
    page.js("document.getElementById('settings-close').click()")
    page.reload()
    values = page.js("['system', 'temperature', 'top_p', 'max_tokens', 'key']"
                     ".map(id => document.getElementById(id).value)")
    assert values == ["Answer in one sentence.", "0.3", "0.9", "64", "secret-key"]
    sent = page.script_replies([sse("Fine."), sse("Again.")])
    page.type_and_send("Hello")
    assistant_done(page, 1)
    assert sent[0]["messages"] == [{"role": "system", "content": "Answer in one sentence."},
                                   {"role": "user", "content": "Hello"}]
    assert (sent[0]["temperature"], sent[0]["top_p"], sent[0]["max_tokens"]) == (0.3, 0.9, 64)
    # Regenerate sends the same conversation again and replaces the reply.
    page.js("document.querySelector('.regenerate').click()")
    page.wait("document.querySelector('.assistant .body').textContent.trim() === 'Again.' && "
              "document.querySelector('.assistant').dataset.done === 'true'")
    assert sent[1]["messages"] == sent[0]["messages"]
    assert [m["content"] for m in page.js(CONVERSATIONS)[0]["messages"]] == ["Hello", "Again."]
    # Defaults: the server's own sampling, max_tokens 512.
    page.js("document.getElementById('settings-defaults').click()")
    page.reload()
    assert page.js("document.getElementById('max_tokens').value") == ""
    assert page.js("document.getElementById('key').value") == "secret-key"


def test_errors_show_the_message_and_leave_no_empty_bubble(page):
    error = {"error": {"message": "top_p must be between 0 and 1.", "type": "invalid_request_error",
                       "param": "top_p", "code": None}}
    page.script_replies([{"status": 400, "body": json.dumps(error)}, {"fail": "ConnectionRefused"},
                         sse("Partial answer", pieces=3, error="Generation failed: out of memory.")])
    page.type_and_send("First")
    page.wait("document.querySelector('.error') !== null")
    assert page.js("document.querySelector('.error').textContent") == "top_p must be between 0 and 1."
    assert page.js("document.querySelectorAll('.assistant').length") == 0
    assert page.js("document.querySelector('.user').classList.contains('failed')") is True
    page.js("document.getElementById('input').value = ''")
    page.type_and_send("Second")
    page.wait("document.querySelector('.error') && document.querySelector('.error').textContent.includes('reach')")
    assert page.js("document.querySelector('.error').textContent") == (
        "The server is not reachable. Is phi-onnx serve still running?")
    assert page.js("document.querySelectorAll('.assistant, .error').length") == 1  # the old error went away
    page.js("document.getElementById('input').value = ''")
    page.type_and_send("Third")
    page.wait("document.querySelector('.error') && document.querySelector('.error').textContent.includes('memory')")
    # What arrived before the error stays, with the error under it.
    assert page.js("document.querySelector('.assistant .body').textContent").strip() == "Partial answer"
    assert page.js("[...document.querySelectorAll('.assistant .body')].every(b => b.textContent.trim())") is True
    assert page.js("document.querySelector('.error').textContent") == "Generation failed: out of memory."
    assert [m["content"] for m in page.js(CONVERSATIONS)[0]["messages"]] == ["Third", "Partial answer"]


def test_conversations_are_kept_listed_switched_and_deleted(page):
    page.script_replies([sse("One."), sse("Two.")])
    page.type_and_send("First conversation")
    assistant_done(page, 1)
    page.js("document.getElementById('reset').click()")
    assert page.js("document.querySelectorAll('.msg').length") == 0
    page.type_and_send("Second conversation")
    assistant_done(page, 1)
    page.reload()
    titles = "[...document.querySelectorAll('#conversations .open')].map(b => b.textContent)"
    assert page.js(titles) == ["Second conversation", "First conversation"]
    assert page.js("document.querySelector('.assistant .body').textContent").strip() == "Two."  # the current one
    page.js("document.querySelectorAll('#conversations .open')[1].click()")
    assert page.js("document.querySelector('.assistant .body').textContent").strip() == "One."
    page.js("document.querySelectorAll('#conversations .delete')[1].click()")  # delete the one shown
    assert page.js(titles) == ["Second conversation"]
    assert page.js("document.querySelectorAll('.msg').length") == 0
    page.reload()
    assert page.js(titles) == ["Second conversation"]


def test_auto_scroll_follows_the_reply_unless_the_reader_scrolled_up(page):
    page.viewport(1000, 600)
    # A reply the test streams piece by piece: fetch answers with a stream the test pushes into.
    page.js("""window.fetch = async () => new Response(new ReadableStream({start(c) { window.__ctl = c; }}),
                                                     {status: 200, headers: {'Content-Type': 'text/event-stream'}});
        window.__push = (text) => window.__ctl.enqueue(new TextEncoder().encode('data: ' + JSON.stringify(
            {choices: [{index: 0, delta: {content: text}, finish_reason: null}]}) + '\\n\\n'));""")
    page.type_and_send("Count")
    page.wait("window.__ctl !== undefined")
    log = "document.getElementById('log')"
    at_bottom = f"({log}.scrollHeight - {log}.scrollTop - {log}.clientHeight < 40)"
    page.js("for (let i = 0; i < 60; i++) window.__push('line ' + i + '\\n\\n')")
    page.wait(f"{log}.scrollHeight > 2 * {log}.clientHeight && {at_bottom}")
    box = page.js(f"(() => {{ const r = {log}.getBoundingClientRect(); return [r.x + r.width / 2, r.y + 50]; }})()")
    page.call("Input.dispatchMouseEvent", type="mouseWheel", x=box[0], y=box[1], deltaX=0, deltaY=-600)
    page.wait(f"!{at_bottom}")
    top = page.js(f"{log}.scrollTop")
    page.js("for (let i = 60; i < 120; i++) window.__push('line ' + i + '\\n\\n')")
    page.wait("document.querySelector('.assistant .body').textContent.includes('line 119')")
    time.sleep(0.2)
    assert page.js(f"{log}.scrollTop") == top  # the reader's place is kept
    page.call("Input.dispatchMouseEvent", type="mouseWheel", x=box[0], y=box[1], deltaX=0, deltaY=100000)
    page.wait(at_bottom)
    page.js("for (let i = 120; i < 180; i++) window.__push('line ' + i + '\\n\\n')")
    page.wait("document.querySelector('.assistant .body').textContent.includes('line 179')")
    page.wait(at_bottom)  # back at the bottom: following again
    page.js("window.__ctl.close()")
    assistant_done(page, 1)
    # No usage chunk (the stream just ended): one token per content chunk; the rate over the whole reply.
    stats = page.js("document.querySelector('.assistant .stats').textContent")
    assert re.match(r"180 tokens · [\d.]+ tokens/s · first token \d+ ms$", stats), stats


def test_layout_at_1280_and_400_px_light_and_dark(page, tmp_path):
    wide = "```python\n" + "print('" + "a very long line of code " * 12 + "')\n```\n\n"
    table = "| " + " | ".join(f"column {i}" for i in range(14)) + " |\n|" + "---|" * 14 + "\n|" + " x |" * 14 + "\n"
    page.script_replies([sse("An earlier answer."), sse(MARKDOWN + "\n" + wide + table + "\nDone.")])
    page.type_and_send("An earlier question")
    assistant_done(page, 1)
    page.js("document.getElementById('reset').click()")
    page.type_and_send("Show markdown with a long code line and a wide table: " + "word " * 30)
    assistant_done(page, 1)
    shots = [page.screenshot(tmp_path / "page-1280.png")]
    page.viewport(400, 800)
    page.wait("window.innerWidth === 400")
    shots.append(page.screenshot(tmp_path / "page-400.png"))
    no_horizontal_scroll = ("document.documentElement.scrollWidth <= window.innerWidth && "
                            "document.body.scrollWidth <= window.innerWidth && "
                            "document.getElementById('log').scrollWidth <= document.getElementById('log').clientWidth")
    assert page.js(no_horizontal_scroll) is True
    title = "document.getElementById('title')"
    lines = page.js(f"(() => {{ const r = document.createRange(); r.selectNodeContents({title}); "
                    "return new Set([...r.getClientRects()].map(x => Math.round(x.top))).size; })()")
    assert lines == 1 and page.js(f"{title}.scrollWidth <= {title}.clientWidth") is True  # one line, not cut
    buttons = page.js("[...document.querySelectorAll('header button')].map(b => b.getBoundingClientRect().right)")
    assert max(buttons) <= 400
    assert page.js("getComputedStyle(document.getElementById('sidebar')).visibility") == "hidden"
    page.js("document.getElementById('menu').click()")
    page.wait("getComputedStyle(document.getElementById('sidebar')).visibility === 'visible'")
    assert page.js("document.querySelectorAll('#conversations li').length") == 2
    page.js("document.getElementById('menu').click()")
    page.call("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}])
    page.wait("getComputedStyle(document.body).backgroundColor === 'rgb(13, 17, 23)'")
    shots.append(page.screenshot(tmp_path / "page-400-dark.png"))
    assert page.js(no_horizontal_scroll) is True
    page.viewport(1280, 800)
    shots.append(page.screenshot(tmp_path / "page-1280-dark.png"))
    for shot in shots:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def test_page_assets_are_served_from_the_package(live_server):
    page = httpx.get(f"{live_server.url}/", timeout=10)
    assert page.status_code == 200 and "<script>" not in page.text and " style=" not in page.text
    for asset in re.findall(r'(?:src|href)="(assets/[^"]+)"', page.text):
        response = httpx.get(f"{live_server.url}/{asset}", timeout=10)
        assert response.status_code == 200 and len(response.content) > 500, asset
    vendor = Path(__file__).parents[2] / "phi_onnx" / "serve" / "static" / "assets" / "vendor"
    import hashlib

    for line in (vendor / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
