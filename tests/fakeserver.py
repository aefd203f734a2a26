"""A real loopback HTTP server that speaks (a small part of) the OpenAI API.

Tests point the real ``openai`` SDK (or tinyllm's clients) at it, so the whole
network path is exercised: headers, status codes, keep-alive, timeouts,
dropped connections, malformed bodies.  Standard library only.

Routes::

    POST /v1/chat/completions
    POST /v1/embeddings
    GET  /v1/models
    POST /openai/deployments/{deployment}/chat/completions?api-version=...   (Azure)
    POST /openai/deployments/{deployment}/embeddings?api-version=...         (Azure)

Anything else gets a 404 with an OpenAI-style error body (and consumes no
scripted item).

Usage::

    with FakeOpenAIServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        server.enqueue(Status(429, headers={"Retry-After": "2"}), Reply("hi"))
        ...
        assert server.requests[0].headers["authorization"] == "Bearer sk-test"

Scripting: ``enqueue(*items)`` appends items to ONE FIFO shared by all routes;
each request to a known route takes the first pending item (one item per
request) and the script being empty means "answer normally".  Pass
``path_contains="embeddings"`` (or any substring of the request path) to make
the enqueued items apply only to matching requests: a request then takes the
first pending item whose filter matches it (items without a filter match every
request).

Chat replies echo: with no script item and no ``reply_with``, the content is
``"echo: " + <the last user message>``, so a reply that reached the wrong
caller is visible.

Slow and hostile answers: ``Drip`` sends an answer one byte at a time (the body,
or the headers too); ``EchoKey`` quotes the request's API key back in the error
body and in headers.

Waiting (``Hang``, ``Delay``, ``Drip``, ``latency``) uses a ``threading.Event`` that
``stop()`` sets, never ``time.sleep``, so tests may monkeypatch ``time.sleep``
and ``stop()`` returns promptly while a handler hangs.

Counters: ``in_flight`` counts requests being handled (from the moment the
body is read until just before the answer is written; a ``Hang`` whose client
already timed out stays counted until it ends or the server stops) and
``max_in_flight`` its peak.  Every request gets a ``x-request-id: req_<n>``
header (n counts requests from 1); ``Recorded.request_id`` holds it.

Several choices, logprobs, stops: ``Choices(Reply(...), Message(...), ...)`` answers with one choice
per item (a request's ``n`` with no script item gives ``n`` echo choices, numbered ``#1``...);
``Reply(..., finish_reason="length" | "content_filter")`` and ``Message({"content": None,
"refusal": ...})`` give the other stops. A request with ``logprobs: true`` gets each choice's
``logprobs.content``: one token per word (with its leading space), each with the logprob
``Reply.logprob`` (default -0.1) and ``top_logprobs`` alternatives (the token itself first,
then ``alt1``, ``alt2``... at -3, -4, ...); streamed, one chunk per token.

Content parts: a message whose ``content`` is a list is checked as the API would check it:
``text``, ``image_url`` (an http(s) URL, or a base64 data URL of PNG, JPEG, GIF or WebP whose
bytes are that type; ``detail`` auto/low/high), ``input_audio`` (base64 ``data`` of ``format``
wav or mp3) and ``file`` (``filename`` and a base64 PDF data URL) parts; anything else is a 400
naming the part.

Embeddings: the openai SDK asks for ``encoding_format="base64"`` unless told
otherwise; both "float" and "base64" are served, and ``fake_embedding(text)``
gives the expected vector (exact float32 values, so both encodings agree).

Import this module as ``fakeserver`` (conftest puts tests/ on sys.path), never
as ``tests.fakeserver``: two copies would have distinct item classes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "FakeOpenAIServer",
    "Recorded",
    "Status",
    "Drop",
    "Hang",
    "Delay",
    "Malformed",
    "EmptyChoices",
    "Reply",
    "Message",
    "Choices",
    "Shuffled",
    "Stream",
    "Drip",
    "EchoKey",
    "fake_embedding",
    "DEFAULT_MODELS",
]

DEFAULT_MODELS = ["gpt-4o-mini", "gpt-4o", "o3-mini", "text-embedding-3-small"]

# --------------------------------------------------------------------------- #
# Script items
# --------------------------------------------------------------------------- #


@dataclass
class Status:
    """Answer with this HTTP status.

    ``body``: a dict/list (sent as JSON), a str/bytes (sent as-is, text/plain
    unless ``headers`` sets Content-Type), or None for an OpenAI-style error
    ``{"error": {"message", "type", "param", "code"}}`` fitting the status.
    ``headers`` are added to (and may override) the response headers, e.g.
    ``{"Retry-After": "2"}`` or ``{"retry-after-ms": "150"}``.
    """

    code: int
    body: Any = None
    headers: dict[str, str] | None = None


@dataclass
class Drop:
    """Close the connection without sending any response."""


@dataclass
class Hang:
    """Wait ``seconds`` (or until the server stops), then close without answering."""

    seconds: float = 30.0


@dataclass
class Delay:
    """Wait ``seconds``, then answer normally, or as the item ``then`` says."""

    seconds: float
    then: Any = None


@dataclass
class Malformed:
    """200, ``Content-Type: application/json``, and a body that is not JSON."""

    body: bytes = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{'


@dataclass
class EmptyChoices:
    """200 with a valid chat.completion whose ``choices`` is ``[]``."""


@dataclass
class Reply:
    """200 with a chat completion whose content is ``content``.

    ``usage`` (a dict) replaces the computed usage; ``finish_reason`` defaults
    to "stop" (use "length" to simulate truncation).
    """

    content: str | None
    usage: dict[str, Any] | None = None
    finish_reason: str = "stop"
    logprob: float = -0.1


@dataclass
class Message:
    """200 with a chat completion whose ``choices[0].message`` is this dict.

    ``role`` defaults to "assistant".  ``finish_reason`` defaults to
    "tool_calls" when the message has ``tool_calls``, else "stop".
    Example: ``Message({"content": None, "refusal": "I can't help with that."})``.
    """

    message: dict[str, Any]
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None


class Choices:
    """200 with a chat completion of one choice per item (each a ``Reply`` or a ``Message``), in order."""

    def __init__(self, *items: Any) -> None:
        if not items or not all(isinstance(i, (Reply, Message)) for i in items):
            raise ValueError("Choices() takes Reply and Message items")
        self.items = items

    def __repr__(self) -> str:
        return f"Choices{self.items!r}"


@dataclass
class Stream:
    """How to answer a ``stream: true`` request (server-sent events, one chunk per piece).

    ``then``: the reply to stream (a ``Reply`` or ``Message`` item; None: the normal answer).
    ``pieces``: how many pieces the content is cut into (default: one per word).
    ``delay``: seconds between chunks. ``drop_after``: close the connection after that many
    chunks, without ``[DONE]``. ``usage``: send the usage chunk when the request asks for it
    (``stream_options.include_usage``); False: never (as llama.cpp's server).
    A ``stream: true`` request without a Stream item is streamed with the defaults.
    """

    then: Any = None
    pieces: int | None = None
    delay: float = 0.0
    drop_after: int | None = None
    usage: bool = True


@dataclass
class _SSE:
    events: list
    delay: float
    drop_after: int | None


@dataclass
class Shuffled:
    """Embeddings only: return the vectors in a shuffled order (``index`` fields stay correct)."""

    seed: int = 1234


@dataclass
class Drip:
    """Answer normally (or as the item ``then`` says), but slowly: one byte every ``interval`` seconds.

    ``headers=False``: the status line and headers go out at once, then the body drips.
    ``headers=True``: the status line and headers drip too. A connection never goes
    quiet for longer than ``interval``, so only a bound on the whole attempt stops it.
    The dripping ends when the client hangs up or the server stops.
    """

    interval: float = 0.1
    then: Any = None
    headers: bool = False


@dataclass
class EchoKey:
    """Answer ``code`` with an error that echoes the credential the request carried.

    The key (from ``Authorization: Bearer ...`` or Azure's ``api-key``) is quoted in
    the error message and sent back in the ``x-echoed-key`` and ``www-authenticate``
    headers, as careless proxies and servers do.
    """

    code: int = 401


_ITEM_TYPES = (
    Status,
    Drop,
    Hang,
    Delay,
    Malformed,
    EmptyChoices,
    Reply,
    Message,
    Choices,
    Shuffled,
    Drip,
    EchoKey,
    Stream,
)

# --------------------------------------------------------------------------- #
# Records
# --------------------------------------------------------------------------- #


@dataclass
class Recorded:
    """One request as the server received it."""

    method: str
    path: str  # without the query string
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    json: Any  # parsed body, or None when empty / not JSON
    body: bytes
    deployment: str | None  # Azure routes only
    time: float  # time.monotonic() when received
    route: str | None = None  # "chat", "embeddings", "models" or None (404)
    request_id: str = ""  # the x-request-id header sent back ("req_<n>")
    peer: tuple[str, int] | None = None  # client address: same port = same (kept-alive) connection
    item: Any = None  # the script item applied to it, None for a normal answer

    @property
    def messages(self) -> list[dict[str, Any]] | None:
        return self.json.get("messages") if isinstance(self.json, dict) else None

    @property
    def model(self) -> str | None:
        return self.json.get("model") if isinstance(self.json, dict) else None


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def fake_embedding(text: str, dimensions: int = 8) -> list[float]:
    """The deterministic vector the server returns for ``text``.

    Values lie in [-1, 1) and are exactly representable as float32, so the
    JSON ("float") and base64 encodings decode to identical numbers.
    """
    out: list[float] = []
    counter = 0
    while len(out) < dimensions:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        for i in range(0, len(digest), 4):
            if len(out) == dimensions:
                break
            (n,) = struct.unpack(">I", digest[i : i + 4])
            value = n / 2**32 * 2 - 1
            out.append(struct.unpack("<f", struct.pack("<f", value))[0])
        counter += 1
    return out


def _text_of(content: Any) -> str:
    """Text of a message's content (str, or a list of content parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


_ERROR_KINDS = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to perform this request."),
    404: ("invalid_request_error", "not_found", "Not found."),
    408: ("timeout", None, "Request timed out."),
    409: ("conflict", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded."),
    504: ("server_error", None, "Gateway timeout."),
}


def _error_body(code: int, message: str | None = None, type_: str | None = None, err_code: Any = None) -> dict:
    kind = _ERROR_KINDS.get(code, ("server_error" if code >= 500 else "invalid_request_error", None, f"HTTP {code}"))
    return {
        "error": {
            "message": message if message is not None else kind[2],
            "type": type_ if type_ is not None else kind[0],
            "param": None,
            "code": err_code if err_code is not None else kind[1],
        }
    }


def _sse_events(answer: dict, how: "Stream", include_usage: bool) -> list[dict]:
    """The chunks that stream ``answer`` (a chat completion): per choice, role, content pieces (one per
    logprobs token when logprobs were asked for, with them), tool-call pieces, refusal, the finish_reason;
    then the usage chunk when asked for."""
    base = {
        "id": answer["id"],
        "object": "chat.completion.chunk",
        "created": answer["created"],
        "model": answer["model"],
    }

    def chunk(delta: dict, finish: str | None = None, index: int = 0, logprobs: Any = None) -> dict:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    events = []
    for choice in answer["choices"] or [{"index": 0, "message": {}, "finish_reason": "stop"}]:
        index, message = choice.get("index", 0), choice["message"]
        # as OpenAI streams them: content "" first when the reply has text, null throughout when it has none
        # (a refusal, tool calls only); a refusal comes in pieces of its own
        events.append(
            chunk(
                {"role": "assistant", "content": "" if isinstance(message.get("content"), str) else None}, index=index
            )
        )
        refusal = message.get("refusal")
        if isinstance(refusal, str):
            events += [chunk({"refusal": refusal[i : i + 8]}, index=index) for i in range(0, len(refusal), 8)]
        content = message.get("content") or ""
        tokens = (choice.get("logprobs") or {}).get("content")
        if tokens:
            events += [
                chunk({"content": t["token"]}, index=index, logprobs={"content": [t], "refusal": None}) for t in tokens
            ]
        elif content:
            words = content.split(" ")
            n = max(1, min(how.pieces or len(words), len(content)))
            if how.pieces:
                size = -(-len(content) // n)
                parts = [content[i : i + size] for i in range(0, len(content), size)]
            else:
                parts = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
            events += [chunk({"content": part}, index=index) for part in parts if part]
        for i, call in enumerate(message.get("tool_calls") or []):
            args = call.get("function", {}).get("arguments", "")
            half = len(args) // 2
            events.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": call.get("id"),
                                "type": "function",
                                "function": {"name": call.get("function", {}).get("name"), "arguments": args[:half]},
                            }
                        ]
                    },
                    index=index,
                )
            )
            events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": args[half:]}}]}, index=index))
        events.append(chunk({}, choice.get("finish_reason") or "stop", index=index))
    if include_usage:
        events.append({**base, "choices": [], "usage": answer["usage"]})
    return events


def _fake_logprobs(content: str | None, top: int, logprob: float) -> list[dict]:
    """``logprobs.content`` for ``content``: one token per word with its leading space."""
    out = []
    for token in re.findall(r"\s*\S+|\s+", content or ""):
        alts = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
        alts += [{"token": f"alt{j}", "logprob": -3.0 - j, "bytes": list(f"alt{j}".encode())} for j in range(1, top)]
        out.append({"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": alts[:top]})
    return out


_DATA_URL = re.compile(r"data:([\w/+.-]+);base64,(.*)", re.S)
_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
    "application/pdf": (b"%PDF-",),
    "wav": (b"RIFF",),
    "mp3": (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"),
}


def _decode(data: Any, kinds: tuple[str, ...], where: str) -> str:
    """The media type of base64 ``data`` (a data URL when ``kinds`` are media types), checked against
    the bytes' magic number; ValueError naming ``where`` otherwise."""
    media = None
    if kinds[0].count("/"):
        m = _DATA_URL.fullmatch(data) if isinstance(data, str) else None
        if m is None:
            raise ValueError(f"{where}: not a base64 data URL")
        media, data = m.group(1), m.group(2)
        if media not in kinds:
            raise ValueError(f"{where}: media type {media!r} is not one of {list(kinds)}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: invalid base64 ({exc})") from None
    kind = media or kinds[0]
    if not raw.startswith(_MAGIC[kind]):
        raise ValueError(f"{where}: the bytes are not {kind}")
    return kind


def _check_parts(messages: list) -> None:
    """ValueError naming the first content part the API would refuse."""
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image_url" and isinstance(part.get("image_url"), dict):
                url, detail = part["image_url"].get("url"), part["image_url"].get("detail", "auto")
                if detail not in ("auto", "low", "high"):
                    raise ValueError(f"{where}: detail {detail!r} is not auto, low or high")
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    continue
                _decode(url, ("image/png", "image/jpeg", "image/gif", "image/webp"), where)
                continue
            if kind == "input_audio" and isinstance(part.get("input_audio"), dict):
                fmt = part["input_audio"].get("format")
                if fmt not in ("wav", "mp3"):
                    raise ValueError(f"{where}: audio format {fmt!r} is not wav or mp3")
                _decode(part["input_audio"].get("data"), (fmt,), where)
                continue
            if kind == "file" and isinstance(part.get("file"), dict) and isinstance(part["file"].get("filename"), str):
                _decode(part["file"].get("file_data"), ("application/pdf",), where)
                continue
            raise ValueError(f"{where}: invalid content part {json.dumps(part)[:200]}")


class _Abort(Exception):
    """Close the connection without answering."""


# --------------------------------------------------------------------------- #
# HTTP plumbing
# --------------------------------------------------------------------------- #


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's default backlog of 5 resets bursts of concurrent connections
    allow_reuse_address = True
    fake: FakeOpenAIServer  # set right after construction


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.fake._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except OSError:  # reset by the client, or its socket shut down by stop()
            self.close_connection = True

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    # -- low-level I/O used by FakeOpenAIServer --------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        lower = {k.lower() for k in headers}
        if "content-type" not in lower:
            self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            if name.lower() != "content-length":
                self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()


# --------------------------------------------------------------------------- #
# The server
# --------------------------------------------------------------------------- #


class FakeOpenAIServer:
    """Loopback OpenAI/Azure OpenAI server with scripted faults.  See module docstring."""

    #: streams whose client hung up before the last event (counted when a write fails)
    streams_cut = 0

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._requests: list[Recorded] = []
        self._script: list[tuple[Any, str | None]] = []
        self._reply: str | Callable[[dict], str] | None = None  # None: echo
        self._counter = 0
        self._in_flight = 0
        self._max_in_flight = 0
        #: Seconds every answered request waits before its answer (not Drop/Hang).
        self.latency: float = 0.0
        #: Ids listed by GET /v1/models.
        self.models: list[str] = list(DEFAULT_MODELS)
        #: Problems inside the server itself (misused items, handler bugs); tests may assert it is empty.
        self.errors: list[str] = []

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        if self._httpd is not None:
            return self
        self._stop_event.clear()
        httpd = _HTTPServer((self._host, 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="FakeOpenAIServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; returns promptly even while handlers hang or wait."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stop_event.set()  # wakes Hang / Delay / latency waits
        httpd.shutdown()
        with self._lock:
            conns = list(self._connections)
            self._connections.clear()
        for conn in conns:  # wake handler threads blocked on idle keep-alive reads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()  # daemon_threads: does not join handler threads
        if self._thread is not None:
            self._thread.join(timeout=1)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer is not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def azure_endpoint(self) -> str:
        return self.url

    # -- scripting ---------------------------------------------------------------

    def enqueue(self, *items: Any, path_contains: str | None = None) -> FakeOpenAIServer:
        """Script the answers to the next requests, one item per request, FIFO."""
        for item in items:
            if not isinstance(item, _ITEM_TYPES):
                raise TypeError(f"not a fakeserver item: {item!r}")
        with self._lock:
            self._script.extend((item, path_contains) for item in items)
        return self

    def reply_with(self, reply: str | Callable[[dict], str] | None) -> FakeOpenAIServer:
        """Set the default chat content: a str, a callable(request_json) -> str, or None (echo)."""
        self._reply = reply
        return self

    @property
    def pending(self) -> int:
        """Number of scripted items not used yet."""
        with self._lock:
            return len(self._script)

    def reset(self) -> None:
        """Forget records, pending script, errors and the concurrency peak.

        Settings (``reply_with``, ``latency``, ``models``) are kept.
        """
        with self._lock:
            self._requests.clear()
            self._script.clear()
            self.errors.clear()
            self._max_in_flight = self._in_flight

    # -- records -----------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        """A snapshot of every request received, in arrival order."""
        with self._lock:
            return list(self._requests)

    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.route == "chat"]

    def embedding_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.route == "embeddings"]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    # -- internals ---------------------------------------------------------------

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _wait(self, seconds: float) -> None:
        if seconds and seconds > 0:
            self._stop_event.wait(seconds)

    def _next_item(self, path: str) -> Any:
        with self._lock:
            for i, (item, path_contains) in enumerate(self._script):
                if path_contains is None or path_contains in path:
                    del self._script[i]
                    return item
        return None

    @staticmethod
    def _route(method: str, path: str) -> tuple[str | None, str | None]:
        """(route, deployment) for a request; route None means 404."""
        path = path.rstrip("/")
        if method == "POST" and path == "/v1/chat/completions":
            return "chat", None
        if method == "POST" and path == "/v1/embeddings":
            return "embeddings", None
        if method == "GET" and path == "/v1/models":
            return "models", None
        parts = path.split("/")
        # ['', 'openai', 'deployments', NAME, 'chat', 'completions'] / [..., NAME, 'embeddings']
        if method == "POST" and len(parts) >= 5 and parts[1:3] == ["openai", "deployments"] and parts[3]:
            rest = parts[4:]
            if rest == ["chat", "completions"]:
                return "chat", parts[3]
            if rest == ["embeddings"]:
                return "embeddings", parts[3]
        return None, None

    def _handle(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        body = h._read_body()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        route, deployment = self._route(h.command, split.path)
        with self._lock:
            self._counter += 1
            request_id = f"req_{self._counter}"
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        record = Recorded(
            method=h.command,
            path=split.path,
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in h.headers.items()},
            json=parsed,
            body=body,
            deployment=deployment,
            time=time.monotonic(),
            route=route,
            request_id=request_id,
            peer=tuple(h.client_address[:2]),
        )
        with self._lock:
            self._requests.append(record)
        counted = [True]

        def done() -> None:
            with self._lock:
                if counted[0]:
                    counted[0] = False
                    self._in_flight -= 1

        try:
            item = self._next_item(split.path) if route is not None else None
            record.item = item
            drip = item if isinstance(item, Drip) else None
            try:
                code, payload, headers = self._answer(route, record, drip.then if drip else item)
            except _Abort:
                h.close_connection = True
                return
            except Exception:  # a bug in the fake server or a misused item: say so loudly
                tb = traceback.format_exc()
                self.errors.append(tb)
                code, payload, headers = 500, _error_body(500, f"fakeserver internal error:\n{tb}"), {}
            self._wait(self.latency)
            headers = {"x-request-id": request_id, **headers}
            if isinstance(payload, _SSE):
                data = b""
            elif isinstance(payload, (dict, list)):
                data = json.dumps(payload).encode()
            elif isinstance(payload, str):
                data = payload.encode()
                headers.setdefault("Content-Type", "text/plain; charset=utf-8")
            else:
                data = payload
            # Leave in_flight BEFORE answering, so a client that has its answer
            # never sees itself counted (tests may assert in_flight == 0 right after).
            done()
            try:
                if isinstance(payload, _SSE):
                    self._send_events(h, headers, payload)
                elif drip is not None:
                    self._drip(h, code, data, headers, drip)
                else:
                    h._send(code, data, headers)
            except OSError:  # the client went away (e.g. it timed out)
                h.close_connection = True
        finally:
            done()

    def _send_events(self, h: _Handler, headers: dict[str, str], sse: _SSE) -> None:
        """Server-sent events, one ``data:`` line per chunk, then ``data: [DONE]``; no Content-Length,
        the connection closes at the end (or early, after ``drop_after`` chunks)."""
        h.close_connection = True
        h.send_response(200)
        for name, value in headers.items():
            h.send_header(name, str(value))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.flush()
        try:
            for i, event in enumerate(sse.events):
                if sse.drop_after is not None and i >= sse.drop_after:
                    return
                if i and sse.delay and self._stop_event.wait(sse.delay):
                    return
                h.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                h.wfile.flush()
            if sse.drop_after is None:
                h.wfile.write(b"data: [DONE]\n\n")
                h.wfile.flush()
        except OSError:  # the client closed the stream early
            with self._lock:
                self.streams_cut += 1
            raise

    def _drip(self, h: _Handler, code: int, body: bytes, headers: dict[str, str], drip: Drip) -> None:
        """Write the whole answer by hand, one byte per ``drip.interval`` (the body only, or everything)."""
        lines = [f"HTTP/1.1 {code} {h.responses.get(code, ('',))[0]}".rstrip()]
        if not any(k.lower() == "content-type" for k in headers):
            lines.append("Content-Type: application/json")
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "content-length"]
        lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        head = "\r\n".join(lines).encode("latin-1")
        h.close_connection = True
        if drip.headers:
            body = head + body
        else:
            h.wfile.write(head)
            h.wfile.flush()
        for i in range(len(body)):
            if self._stop_event.wait(drip.interval):
                return
            h.wfile.write(body[i : i + 1])
            h.wfile.flush()

    def _answer(self, route: str | None, rec: Recorded, item: Any) -> tuple[int, Any, dict[str, str]]:
        if route is None:
            return 404, _error_body(404, f"Invalid URL ({rec.method} {rec.path})", err_code="unknown_url"), {}
        if isinstance(item, EchoKey):
            auth = rec.headers.get("authorization", "")
            key = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else rec.headers.get("api-key", "")
            body = _error_body(
                item.code,
                f"Incorrect API key provided: {key}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
            )
            return item.code, body, {"x-echoed-key": key, "WWW-Authenticate": f'Bearer realm="fake", key="{key}"'}
        if isinstance(item, Delay):
            self._wait(item.seconds)
            item = item.then
        if isinstance(item, (Drop, Hang)):
            if isinstance(item, Hang):
                self._wait(item.seconds)
            raise _Abort
        if isinstance(item, Status):
            headers = dict(item.headers or {})
            body = item.body if item.body is not None else _error_body(item.code)
            if isinstance(body, bytes):
                headers.setdefault("Content-Type", "application/octet-stream")
            return item.code, body, headers
        if isinstance(item, Malformed):
            return 200, item.body, {"Content-Type": "application/json"}
        if route == "models":
            if item is not None:
                raise ValueError(f"{item!r} does not apply to GET /v1/models")
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fakeserver"} for m in self.models]
            return 200, {"object": "list", "data": data}, {}
        if route == "embeddings":
            if item is not None and not isinstance(item, Shuffled):
                raise ValueError(f"{item!r} does not apply to embeddings")
            return self._embeddings(rec, item)
        if isinstance(item, Shuffled):
            raise ValueError("Shuffled() applies to embeddings only")
        return self._chat(rec, item)

    def _chat(self, rec: Recorded, item: Any) -> tuple[int, Any, dict[str, str]]:
        req = rec.json
        if not isinstance(req, dict):
            return 400, _error_body(400, "We could not parse the JSON body of your request."), {}
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _error_body(400, "'messages' is a required property and must be a non-empty array."), {}
        streaming = None
        if req.get("stream"):
            streaming = item if isinstance(item, Stream) else Stream()
            item = streaming.then if isinstance(item, Stream) else item
        elif isinstance(item, Stream):
            raise ValueError("Stream() applies to stream=true requests only")
        try:
            _check_parts(messages)
        except ValueError as exc:
            return 400, _error_body(400, f"Invalid content part: {exc}", err_code="invalid_content_part"), {}
        model = req.get("model") or rec.deployment or "unknown"
        prompt_tokens = sum(len(_text_of(m.get("content"))) for m in messages if isinstance(m, dict)) // 4 + 1
        usage = None
        finish_reason = "stop"
        finishes: list[str] | None = None
        logprob = [-0.1]
        if isinstance(item, EmptyChoices):
            choices_messages: list[dict[str, Any]] = []
        elif isinstance(item, Reply):
            choices_messages = [{"role": "assistant", "content": item.content, "refusal": None}]
            usage, finish_reason, logprob = item.usage, item.finish_reason, [item.logprob]
        elif isinstance(item, Message):
            msg = {"role": "assistant", **item.message}
            choices_messages = [msg]
            usage = item.usage
            finish_reason = item.finish_reason or ("tool_calls" if msg.get("tool_calls") else "stop")
        elif isinstance(item, Choices):
            choices_messages, finishes, logprob = [], [], []
            for one in item.items:
                if isinstance(one, Reply):
                    choices_messages.append({"role": "assistant", "content": one.content, "refusal": None})
                    finishes.append(one.finish_reason)
                    logprob.append(one.logprob)
                else:
                    choices_messages.append({"role": "assistant", **one.message})
                    finishes.append(one.finish_reason or ("tool_calls" if one.message.get("tool_calls") else "stop"))
                    logprob.append(-0.1)
        elif item is None:
            if self._reply is None:
                last_user = next(
                    (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None
                )
                content = "echo: " + (_text_of(last_user.get("content")) if last_user else "")
            elif callable(self._reply):
                content = self._reply(req)
            else:
                content = self._reply
            n = req.get("n") or 1
            choices_messages = [
                {"role": "assistant", "content": content if n == 1 else f"{content} #{i + 1}", "refusal": None}
                for i in range(n)
            ]
        else:
            raise ValueError(f"{item!r} does not apply to chat completions")

        top = req.get("top_logprobs") or 1
        choices = [
            {
                "index": i,
                "message": m,
                "logprobs": {
                    "content": _fake_logprobs(m.get("content"), top, logprob[min(i, len(logprob) - 1)]),
                    "refusal": None,
                }
                if req.get("logprobs")
                else None,
                "finish_reason": finishes[i] if finishes is not None else finish_reason,
            }
            for i, m in enumerate(choices_messages)
        ]
        if usage is None:
            completion_tokens = sum(_tokens(_text_of(m.get("content"))) for m in choices_messages)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        answer = {
            "id": "chatcmpl-fake" + rec.request_id.removeprefix("req_"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": "fp_fakeserver",
        }
        if streaming is not None:
            include = bool((req.get("stream_options") or {}).get("include_usage")) and streaming.usage
            return (
                200,
                _SSE(_sse_events(answer, streaming, include), streaming.delay, streaming.drop_after),
                {"Content-Type": "text/event-stream"},
            )
        return 200, answer, {}

    def _embeddings(self, rec: Recorded, item: Any) -> tuple[int, Any, dict[str, str]]:
        req = rec.json
        if not isinstance(req, dict) or "input" not in req:
            return 400, _error_body(400, "'input' is a required property."), {}
        raw = req["input"]
        # str | list[str] | list[int] (one tokenized input) | list[list[int]]
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            inputs = [json.dumps(raw)]
        elif isinstance(raw, list) and raw:
            inputs = [x if isinstance(x, str) else json.dumps(x) for x in raw]
        else:
            return 400, _error_body(400, "'input' must be a non-empty string or array."), {}
        if any(x == "" for x in inputs):
            return 400, _error_body(400, "'input' cannot contain empty strings."), {}
        dimensions = int(req.get("dimensions") or 8)
        as_base64 = req.get("encoding_format") == "base64"  # the openai SDK asks for base64 by default
        data = []
        for i, text in enumerate(inputs):
            vector = fake_embedding(text, dimensions)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        if isinstance(item, Shuffled):
            rng = random.Random(item.seed)
            if len(data) > 1:
                original = list(data)
                while data == original:
                    rng.shuffle(data)
        tokens = sum(_tokens(t) for t in inputs)
        answer = {
            "object": "list",
            "data": data,
            "model": req.get("model") or rec.deployment or "unknown",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return 200, answer, {}
