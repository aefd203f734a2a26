"""The workbench (``tinyllm.ui``) served by uvicorn on a thread, on a free loopback port, and a small
HTTP client that keeps the session cookie and sends the page's CSRF token (imported as ``uiserver``).

Used by tests/test_ui.py, tests/test_ui_browser.py, bench/ui.py and docs/images/screenshots.py.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from typing import Any
from urllib.parse import urlencode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UIServer:
    """``tinyllm.ui.create_app(**options)`` served on 127.0.0.1:<free port> until :meth:`stop`."""

    def __init__(self, **options: Any) -> None:
        import uvicorn

        from tinyllm.ui import create_app

        self.port = _free_port()
        self.app = create_app(port=self.port, **options)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="tinyllm-ui-test", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> UIServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the workbench server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> UIServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Page:
    """A browser-like client of one session: the session cookie kept, the CSRF token read from pages."""

    def __init__(self, port: int, host: str | None = None) -> None:
        self.port = port
        self.host = host or f"127.0.0.1:{port}"
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, Any] | list[tuple[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = {"Host": self.host}
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if method != "GET":
            h.update(
                {
                    "Origin": f"http://{self.host}",
                    "X-CSRF-Token": self.csrf,
                    "Content-Type": "application/x-www-form-urlencoded",
                }
            )
            body = urlencode(form or {})
        h.update(headers or {})
        h = {k: v for k, v in h.items() if v is not None}
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
            for key, value in resp.getheaders():
                if key.lower() == "set-cookie":
                    name, _, rest = value.partition("=")
                    self.cookies[name] = rest.split(";")[0]
            found = re.search(r'"X-CSRF-Token": "([0-9a-f]+)"', text)
            if found:
                self.csrf = found.group(1)
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], str]:
        return self.request("GET", path, **kw)

    def post(self, path: str, form: Any = None, **kw: Any) -> tuple[int, dict[str, str], str]:
        return self.request("POST", path, form, **kw)

    def events(self, path: str) -> list[tuple[str, str]]:
        """The (event, data) pairs of a server-sent event stream, read to its end."""
        status, _, text = self.get(path)
        if status != 200:
            raise AssertionError(f"GET {path}: {status} {text}")
        out, event, data = [], "message", []
        for line in text.replace("\r\n", "\n").split("\n"):
            if not line:
                if data:
                    out.append((event, "\n".join(data)))
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        return out
