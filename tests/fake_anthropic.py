"""A loopback fake of Anthropic's Messages API, for the real ``anthropic`` SDK to talk to.

Standard library only. It runs in this process (``FakeAnthropicServer``, a thread) or in a child
process of its own (``spawn()`` -> a :class:`RemoteFakeAnthropic` with the same methods, driven over
HTTP): ``python tests/fake_anthropic.py`` prints ``PORT <n>`` and serves until stdin closes.

Routes::

    POST /v1/messages                  JSON reply, or SSE events with "stream": true
    POST /v1/messages/count_tokens     {"input_tokens": n}
    POST /_fake/enqueue, GET /_fake/requests, POST /_fake/reset     (control, for the child process)

Message Batches (https://platform.claude.com/docs/en/build-with-claude/batch-processing)::

    POST /v1/messages/batches              create: {"requests": [{"custom_id", "params"}]}, checked as the
                                           API checks it (custom_id ^[a-zA-Z0-9_-]{1,64}$ and unique,
                                           params with max_tokens, at most max_requests / max_bytes)
    GET  /v1/messages/batches              list, newest first (limit, after_id)
    GET  /v1/messages/batches/{id}         retrieve: processing_status in_progress, then ended at the
                                           retrieve after ``polls`` retrieves (unless held)
    POST /v1/messages/batches/{id}/cancel  canceling, then ended (the requests not run: canceled)
    GET  /v1/messages/batches/{id}/results the results JSONL, in reverse request order (join by custom_id)

A batch's requests are answered when it ends, each as ``/v1/messages`` answers the same body with
an empty script (``echo: <the last user text>``), or with the plan's ``reply`` item. Controls::

    POST /_fake/batch_plan {"hold": bool, "polls": n (retrieves before it ends, default 1),
                            "end": "ended" | "expired", "run_before_end": n (expired or canceled:
                            requests answered before), "errored": {custom_id: error type},
                            "reply": an item (text(...), tool_use(...)),
                            "limits": {"max_requests": n, "max_bytes": n}}   for the batches created next
    POST /_fake/advance    {"id": batch id | null (all)}: release held batches
    GET  /_fake/batches    {id: {"batch": the batch object, "requests": its requests}}

Scripting: ``enqueue(*items)`` appends items (JSON-able dicts, built by the helpers below) to one
FIFO; each request to ``/v1/messages`` takes the first one, and an empty script means "answer
normally": the text ``echo: <the last user text>``. Items:

- ``text("hi")``, ``tool_use("name", {...})``: a reply (streamed as events when asked to stream);
- ``error(429, "rate_limit_error", headers={"retry-after": "0"})``: an error status and body;
- ``drop(after=3)``: a streamed reply whose connection is cut after 3 events (for a plain request:
  the connection closes before any answer);
- ``stream_error("overloaded_error", after=2)``: an SSE ``error`` event after 2 events.

Tokens are words: ``input_tokens`` is the number of whitespace-separated words in the system
blocks, message texts, tool results and tool schemas (JSON text), plus 3 per message;
``output_tokens`` the words of the reply. ``count_tokens`` answers the same number, so a test can
tell an exact count from tinyllm's estimate. Prompt caching: with ``cache_control`` on some
blocks, the tokens up to the last breakpoint (in the API's order: tools, system, messages) are
written to the cache the first time (``cache_creation_input_tokens``) and read from it when the
same prefix comes again (``cache_read_input_tokens``); ``input_tokens`` is the rest.

Every request is recorded (``requests``: dicts of ``method``, ``path``, ``headers`` with lower-case
names, ``body``).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from typing_extensions import Self

__all__ = [
    "FakeAnthropicServer",
    "RemoteFakeAnthropic",
    "drop",
    "error",
    "fake_tokens",
    "spawn",
    "stream_error",
    "text",
    "tool_use",
]


def text(content: str, *, stop_reason: str = "end_turn", model: str | None = None) -> dict:
    """A reply with one text block."""
    return {
        "kind": "message",
        "content": [{"type": "text", "text": content}],
        "stop_reason": stop_reason,
        "model": model,
    }


def tool_use(name: str, input: dict, *, id: str | None = None, text: str | None = None) -> dict:
    """A reply that calls tool ``name`` with ``input`` (after ``text``, if given)."""
    blocks = [{"type": "text", "text": text}] if text else []
    blocks.append({"type": "tool_use", "id": id or f"toolu_{name}", "name": name, "input": input})
    return {"kind": "message", "content": blocks, "stop_reason": "tool_use"}


def error(status: int, type_: str, message: str = "", *, headers: dict | None = None) -> dict:
    """An error reply: ``status`` with Anthropic's error body ``{"type": "error", "error": {type, message}}``."""
    return {"kind": "error", "status": status, "type": type_, "message": message or type_, "headers": headers or {}}


def drop(after: int = 0) -> dict:
    """Cut the connection after ``after`` stream events (plain request: before answering)."""
    return {"kind": "drop", "after": after}


def stream_error(type_: str, after: int = 1, message: str = "") -> dict:
    """An SSE ``error`` event of ``type_`` after ``after`` events of a normal streamed reply."""
    return {"kind": "stream_error", "type": type_, "after": after, "message": message or type_}


def _words(value: Any) -> int:
    return len(value.split()) if isinstance(value, str) else 0


def _block_words(block: Any) -> int:
    if isinstance(block, str):
        return _words(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "text":
        return _words(block.get("text"))
    if kind == "tool_result":
        content = block.get("content")
        return _words(content) if isinstance(content, str) else sum(_block_words(b) for b in content or [])
    if kind == "tool_use":
        return _words(json.dumps(block.get("input")))
    if kind == "image":
        return 100
    return 0


def _units(body: dict) -> list[tuple[int, bool]]:
    """(words, has a cache breakpoint) per cacheable unit, in the API's order: tools, system, messages."""
    out: list[tuple[int, bool]] = []
    for tool in body.get("tools") or []:
        out.append(
            (_words(json.dumps({k: v for k, v in tool.items() if k != "cache_control"})), "cache_control" in tool)
        )
    system = body.get("system")
    for block in [system] if isinstance(system, str) else system or []:
        out.append((_block_words(block), isinstance(block, dict) and "cache_control" in block))
    for message in body.get("messages") or []:
        content = message.get("content")
        blocks = [content] if isinstance(content, str) else content or []
        out.append((3, False))
        for block in blocks:
            out.append((_block_words(block), isinstance(block, dict) and "cache_control" in block))
    return out


def fake_tokens(body: dict) -> int:
    """The input tokens the fake counts for a request ``body`` (see the module docstring)."""
    return sum(n for n, _ in _units(body))


def _last_user_text(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]
        if texts:
            return texts[-1]
    return ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/_fake/requests":
            self._json(200, self.server.fake.requests)
        elif path == "/_fake/batches":
            self._json(200, self.server.fake.batch_state())
        elif path.startswith("/v1/messages/batches"):
            self.server.fake._batches_get(self, path, self.path.partition("?")[2])
        else:
            self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "no such route"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._json(
                400, {"type": "error", "error": {"type": "invalid_request_error", "message": "body is not JSON"}}
            )
            return
        self.server.fake._handle(self, self.path.split("?", 1)[0], body)

    def _json(self, status: int, value: Any, headers: dict | None = None, *, raw: bytes | None = None) -> None:
        data = json.dumps(value).encode() if raw is None else raw
        self.send_response(status)
        self.send_header("content-type", "application/json" if raw is None else "application/binary")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_{len(self.server.fake.requests)}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class _Batches:
    """The Message Batches routes of :class:`FakeAnthropicServer` (a mixin)."""

    batches: dict[str, dict]
    batch_plan: dict
    _lock: threading.Lock

    def plan_batches(self, **plan: Any) -> None:
        """Set the plan of the batches created next (see the module docstring)."""
        self.batch_plan = dict(plan)

    def batch_state(self) -> dict:
        """{id: {"batch", "requests"}} of every batch created."""
        with self._lock:
            return {bid: {"batch": b["batch"], "requests": b["requests"]} for bid, b in self.batches.items()}

    def advance(self, batch_id: str | None = None) -> None:
        """Release the held batch ``batch_id`` (None: all)."""
        with self._lock:
            for bid, b in self.batches.items():
                if batch_id in (None, bid):
                    b["plan"]["hold"] = False

    @staticmethod
    def _invalid(h: _Handler, message: str) -> None:
        h._json(400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}})

    def _batches_post(self, h: _Handler, path: str, body: Any, size: int) -> None:
        parts = path.rstrip("/").split("/")[4:]  # after /v1/messages/batches
        if not parts:
            self._create_batch(h, body, size)
            return
        with self._lock:
            b = self.batches.get(parts[0])
            if b is None or parts[1:] != ["cancel"]:
                h._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "no such batch"}})
                return
            if b["batch"]["processing_status"] == "in_progress":
                b["batch"].update(processing_status="canceling", cancel_initiated_at=_now())
            h._json(200, b["batch"])

    def _create_batch(self, h: _Handler, body: Any, size: int) -> None:
        plan = {
            "hold": False,
            "polls": 1,
            "end": "ended",
            "run_before_end": 0,
            "errored": {},
            "reply": None,
            "limits": {},
            **self.batch_plan,
        }
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            self._invalid(h, "requests: a non-empty list is required")
            return
        seen = set()
        for n, r in enumerate(requests):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not re.match(r"^[a-zA-Z0-9_-]{1,64}$", cid):
                self._invalid(h, f"requests.{n}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
                return
            if cid in seen:
                self._invalid(h, f"requests.{n}.custom_id: duplicate custom_id {cid!r}")
                return
            seen.add(cid)
            if not isinstance(r.get("params"), dict) or not isinstance(r["params"].get("max_tokens"), int):
                self._invalid(h, f"requests.{n}.params.max_tokens: Field required")
                return
        limits = plan["limits"]
        if len(requests) > limits.get("max_requests", 100_000) or size > limits.get("max_bytes", 256_000_000):
            h._json(
                413,
                {
                    "type": "error",
                    "error": {
                        "type": "request_too_large",
                        "message": f"{len(requests)} requests, {size} bytes: over the limit",
                    },
                },
            )
            return
        with self._lock:
            bid = f"msgbatch_{len(self.batches) + 1:04d}{time.time_ns() % 10**6:06d}"
            created = datetime.now(timezone.utc)
            batch = {
                "id": bid,
                "type": "message_batch",
                "processing_status": "in_progress",
                "request_counts": {
                    "processing": len(requests),
                    "succeeded": 0,
                    "errored": 0,
                    "canceled": 0,
                    "expired": 0,
                },
                "created_at": created.isoformat().replace("+00:00", "Z"),
                "expires_at": (created + timedelta(hours=24)).isoformat().replace("+00:00", "Z"),
                "ended_at": None,
                "archived_at": None,
                "cancel_initiated_at": None,
                "results_url": None,
            }
            self.batches[bid] = {"batch": batch, "requests": requests, "plan": plan, "polls": 0, "results": b""}
        h._json(200, batch)

    def _batches_get(self, h: _Handler, path: str, query: str) -> None:
        parts = path.rstrip("/").split("/")[4:]
        if not parts:
            with self._lock:
                data = sorted((b["batch"] for b in self.batches.values()), key=lambda b: b["created_at"], reverse=True)
            h._json(
                200,
                {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                },
            )
            return
        b = self.batches.get(parts[0])
        if b is None or parts[1:] not in ([], ["results"]):
            h._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "no such batch"}})
            return
        if parts[1:] == ["results"]:
            if b["batch"]["processing_status"] != "ended":
                self._invalid(h, "the batch is still processing")
                return
            h._json(200, None, raw=b["results"])
            return
        self._step(b, f"http://{h.headers.get('host')}")
        h._json(200, b["batch"])

    def _step(self, b: dict, base: str) -> None:
        """One retrieve's worth of progress: ended after ``polls`` retrieves (at once when canceling)."""
        batch, plan = b["batch"], b["plan"]
        if batch["processing_status"] == "ended":
            return
        canceling = batch["processing_status"] == "canceling"
        if not canceling:
            b["polls"] += 1
            if plan["hold"] or b["polls"] <= plan["polls"]:
                return
        stop = "canceled" if canceling else ("expired" if plan["end"] == "expired" else None)
        lines, counts = [], dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        for n, r in enumerate(b["requests"]):
            cid = r["custom_id"]
            if stop is not None and n >= plan["run_before_end"]:
                result = {"type": stop}
            elif cid in plan["errored"]:
                kind = plan["errored"][cid]
                result = {
                    "type": "errored",
                    "error": {
                        "type": "error",
                        "request_id": f"req_b{n}",
                        "error": {"type": kind, "message": f"{kind} in the batch"},
                    },
                }
            else:
                item = plan["reply"] or text(f"echo: {_last_user_text(r['params'])}")
                result = {"type": "succeeded", "message": self._reply(r["params"], item)}  # type: ignore[attr-defined]
            counts[result["type"]] += 1
            lines.append({"custom_id": cid, "result": result})
        b["results"] = "".join(json.dumps(x) + "\n" for x in reversed(lines)).encode()
        batch.update(
            processing_status="ended",
            request_counts=counts,
            ended_at=_now(),
            results_url=f"{base}/v1/messages/batches/{batch['id']}/results",
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeAnthropicServer


class FakeAnthropicServer(_Batches):
    """The fake, served by a thread of this process; ``with FakeAnthropicServer() as server: ...``.

    Attributes: ``base_url`` (``http://127.0.0.1:PORT``, what ``AnthropicClient(base_url=...)`` takes),
    ``requests`` (the recorded ``/v1/messages*`` requests).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: list[dict] = []
        self._cached: set[str] = set()
        self.requests: list[dict] = []
        self.batches: dict[str, dict] = {}  # id -> {"batch", "requests", "plan", "polls", "results"}
        self.batch_plan: dict = {}
        self._http = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._http.fake = self
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> FakeAnthropicServer:
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def enqueue(self, *items: dict) -> FakeAnthropicServer:
        with self._lock:
            self._script.extend(items)
        return self

    def reset(self) -> None:
        """Forget the script, the recorded requests and the prompt cache."""
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self._cached.clear()

    @property
    def pending(self) -> int:
        return len(self._script)

    # -- answering ---------------------------------------------------------------------
    def _handle(self, h: _Handler, path: str, body: Any) -> None:
        if path == "/_fake/enqueue":
            self.enqueue(*body)
            h._json(200, {"ok": True})
            return
        if path == "/_fake/reset":
            self.reset()
            h._json(200, {"ok": True})
            return
        if path == "/_fake/batch_plan":
            self.batch_plan = dict(body)
            h._json(200, {"ok": True})
            return
        if path == "/_fake/advance":
            self.advance(body.get("id"))
            h._json(200, {"ok": True})
            return
        with self._lock:
            self.requests.append(
                {"method": "POST", "path": path, "headers": {k.lower(): v for k, v in h.headers.items()}, "body": body}
            )
        if path == "/v1/messages/count_tokens":
            h._json(200, {"input_tokens": fake_tokens(body)})
            return
        if path.startswith("/v1/messages/batches"):
            self._batches_post(h, path, body, int(h.headers.get("content-length") or 0))
            return
        if path != "/v1/messages":
            h._json(404, {"type": "error", "error": {"type": "not_found_error", "message": f"no route {path}"}})
            return
        if not isinstance(body.get("max_tokens"), int):
            h._json(
                400,
                {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}},
            )
            return
        with self._lock:
            item = self._script.pop(0) if self._script else None
        if item is None:
            item = text(f"echo: {_last_user_text(body)}")
        kind = item["kind"]
        if kind == "error":
            h._json(
                item["status"],
                {"type": "error", "error": {"type": item["type"], "message": item["message"]}},
                item["headers"],
            )
            return
        if kind == "drop" and not body.get("stream"):
            h.close_connection = True
            h.connection.close()
            return
        reply = self._reply(body, item if kind == "message" else text(f"echo: {_last_user_text(body)}"))
        if body.get("stream"):
            self._stream(h, reply, item)
        else:
            h._json(200, reply)

    def _usage(self, body: dict, output_words: int) -> dict:
        units = _units(body)
        total = sum(n for n, _ in units)
        last = max((i for i, (_, marked) in enumerate(units) if marked), default=None)
        read = written = 0
        if last is not None:
            key = self._prefix_key(body, last)
            size = sum(n for n, _ in units[: last + 1])
            with self._lock:
                if key in self._cached:
                    read = size
                else:
                    self._cached.add(key)
                    written = size
        return {
            "input_tokens": total - read - written,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": written,
            "output_tokens": output_words,
        }

    @staticmethod
    def _prefix_key(body: dict, last: int) -> str:
        """A key of the request's content up to and including unit ``last`` (tools, system, messages in order)."""
        parts: list[Any] = list(body.get("tools") or [])
        system = body.get("system")
        parts.extend([system] if isinstance(system, str) else system or [])
        for message in body.get("messages") or []:
            content = message.get("content")
            parts.append(message.get("role"))
            parts.extend([content] if isinstance(content, str) else content or [])
        return hashlib.sha256(json.dumps(parts[: last + 1], sort_keys=True).encode()).hexdigest()

    def _reply(self, body: dict, item: dict) -> dict:
        words = sum(_block_words(b) for b in item["content"])
        return {
            "id": f"msg_{len(self.requests)}",
            "type": "message",
            "role": "assistant",
            "model": item.get("model") or body.get("model"),
            "content": item["content"],
            "stop_reason": item["stop_reason"],
            "stop_sequence": None,
            "usage": self._usage(body, words),
        }

    @staticmethod
    def _events(reply: dict) -> list[tuple[str, dict]]:
        usage = reply["usage"]
        start = {
            **reply,
            "content": [],
            "stop_reason": None,
            "usage": {**{k: v for k, v in usage.items() if k != "output_tokens"}, "output_tokens": 1},
        }
        events = [("message_start", {"type": "message_start", "message": start}), ("ping", {"type": "ping"})]
        for i, block in enumerate(reply["content"]):
            if block["type"] == "text":
                events.append(
                    (
                        "content_block_start",
                        {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
                    )
                )
                words = block["text"].split(" ")
                for j, word in enumerate(words):
                    piece = word if j == 0 else " " + word
                    events.append(
                        (
                            "content_block_delta",
                            {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": piece}},
                        )
                    )
            else:
                events.append(
                    (
                        "content_block_start",
                        {"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}},
                    )
                )
                arguments = json.dumps(block["input"])
                for j in range(0, len(arguments), 7):
                    events.append(
                        (
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": i,
                                "delta": {"type": "input_json_delta", "partial_json": arguments[j : j + 7]},
                            },
                        )
                    )
            events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reply["stop_reason"], "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _stream(self, h: _Handler, reply: dict, item: dict) -> None:
        events = self._events(reply)
        cut = item["after"] if item["kind"] in ("drop", "stream_error") else None
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("transfer-encoding", "chunked")
        h.send_header("request-id", f"req_{len(self.requests)}")
        h.end_headers()

        def send(name: str, data: dict) -> None:
            payload = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            h.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            h.wfile.flush()

        try:
            for n, (name, data) in enumerate(events):
                if cut is not None and n == cut:
                    if item["kind"] == "drop":
                        h.close_connection = True
                        h.connection.close()
                        return
                    send("error", {"type": "error", "error": {"type": item["type"], "message": item["message"]}})
                    break
                send(name, data)
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError:  # the client went away (closed the stream early)
            h.close_connection = True


class RemoteFakeAnthropic:
    """A :class:`FakeAnthropicServer` running in a child process (see :func:`spawn`), driven over HTTP."""

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port
        self.base_url = f"http://127.0.0.1:{port}"

    def _call(self, method: str, path: str, value: Any = None) -> Any:
        data = json.dumps(value).encode() if value is not None else None
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def enqueue(self, *items: dict) -> RemoteFakeAnthropic:
        self._call("POST", "/_fake/enqueue", list(items))
        return self

    def reset(self) -> None:
        self._call("POST", "/_fake/reset", {})

    def plan_batches(self, **plan: Any) -> None:
        """Set the plan of the batches created next (see the module docstring)."""
        self._call("POST", "/_fake/batch_plan", plan)

    def advance(self, batch_id: str | None = None) -> None:
        self._call("POST", "/_fake/advance", {"id": batch_id})

    def batch_state(self) -> dict:
        return self._call("GET", "/_fake/batches")

    @property
    def requests(self) -> list[dict]:
        return self._call("GET", "/_fake/requests")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn() -> RemoteFakeAnthropic:
    """Start the fake in a child process; returns once it listens. Stop it with ``.stop()`` (or ``with``)."""
    proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"the fake Anthropic server did not start: {line!r}")
    return RemoteFakeAnthropic(proc, int(line.split()[1]))


if __name__ == "__main__":
    server = FakeAnthropicServer().start()
    print(f"PORT {server.base_url.rsplit(':', 1)[1]}", flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin (or dies)
    server.stop()
