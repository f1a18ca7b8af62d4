"""What the serve tests share: the live server's key and model name, and the server runner."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

API_KEY = "test-key-123"
MODEL_NAME = "tiny"


class LiveServer:
    """`app` served in a thread as `phi-onnx serve` serves it (phi_onnx.serve.server); `url` is its base address."""

    def __init__(self, app: Any, limits: Any = None, grace: float = 5.0) -> None:
        from phi_onnx.serve.server import server

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = server(app, grace=grace, limits=limits, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()
