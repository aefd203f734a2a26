"""The HTTP layer under the openai SDK: one deadline per attempt, and error replies without credentials.

:func:`http_client` builds the httpx client handed to the SDK (``http_client=``).
Its transport wraps httpx's own and adds two things:

* **A deadline for the whole attempt.** httpx only has per-phase timeouts (connect,
  write, each read), so a server that sends a byte now and then keeps a request
  alive for ever. Here the request's timeout (the SDK passes TIMEOUT, or the call's
  ``timeout``) bounds everything from the start of the request to the last body
  byte: every socket connect, write and read waits at most the time left, and no
  read starts after the deadline. A reply's body is read whole before the
  transport returns (the SDK reads it at once anyway), so the deadline is set
  only once per request. A streamed reply (``text/event-stream``) is bounded so
  up to its headers; its events then come for as long as the server sends them,
  each read waiting at most TIMEOUT, as in the SDK. Running out raises httpx's
  ``ReadTimeout`` (or ``ConnectTimeout`` / ``WriteTimeout``), which the SDK turns
  into its ``APITimeoutError``. Sync and asyncio alike; the deadline travels in a
  ``contextvars.ContextVar`` set only while this transport works.
* **Error replies scrubbed of the credentials they echo.** For a status >= 400,
  the key the request carried (``Authorization: Bearer ...``, ``api-key``) and
  anything shaped like a key are replaced by ``****`` in the reply's headers and
  body before the SDK sees them, so its exception (message, ``body``,
  ``response``), its logs and everything chained to tinyllm's error are clean.

The socket-level bound needs httpcore's network-backend hook, which httpx does not
expose; it is installed on the transport's connection pool when that has the
usual ``_network_backend``. Without it the deadline still caps each phase's
timeout, and the body is read lazily with the deadline checked between chunks. A proxy from the environment
(``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``, read as httpx reads
them) gets the same transport around httpx's proxy transport.

The openai SDK is built on httpx (``httpx2`` in its newer releases); the module
is taken from the SDK's ``DefaultHttpxClient`` so both agree.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import sys
import time
from typing import Any

from ..config import redact_url
from ..errors import ConfigError
from ._scrub import redact, redact_body

__all__ = ["http_client", "scrub_credentials"]

log = logging.getLogger("tinyllm")
_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("tinyllm_http_deadline", default=None)
_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "api-key", "x-api-key")


def _package(cls: type) -> Any:
    return sys.modules[cls.__module__.partition(".")[0]]


def _time_left(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` capped by the time left before the current deadline; raises ``error`` once it has passed."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("TIMEOUT reached: the whole attempt may take no longer")
    return left if timeout is None or timeout > left else timeout


def _streamed(response: Any) -> bool:
    """A streamed reply (``text/event-stream``): its body runs as long as the server keeps sending,
    each read waiting at most the read timeout (TIMEOUT), as in the SDK; not under the deadline."""
    return response.headers.get("content-type", "").startswith("text/event-stream")


def _budget(request: Any) -> float | None:
    """Seconds the whole attempt may take: the largest of the request's phase timeouts (None: no bound)."""
    timeouts = request.extensions.get("timeout") or {}
    values = [v for v in timeouts.values() if v is not None]
    return max(values) if values else None


def _secrets(request: Any) -> list[str]:
    found = []
    for name in _CREDENTIAL_HEADERS:
        value = request.headers.get(name)
        if value:
            found.append(value.split(" ", 1)[1] if name.endswith("authorization") and " " in value else value)
    return found


def scrub_credentials(request: Any) -> None:
    """Replace the credential headers of an httpx ``request`` that has been sent (and failed) by ``****``.

    For the request objects the SDK's exceptions keep (``exc.request``); httpx's
    repr hides ``Authorization`` but not Azure's ``api-key``.
    """
    for name in _CREDENTIAL_HEADERS:
        if name in request.headers:
            request.headers[name] = "****"


def _sdk(name: str) -> Any:
    """The SDK package ``name`` (``openai`` or ``anthropic``), imported on first use."""
    import importlib

    return importlib.import_module(name)


@functools.lru_cache(maxsize=None)
def _classes(sdk: str = "openai") -> tuple[Any, Any, Any]:
    """(httpx module, sync transport class, async transport class) for the SDK ``sdk``, built once on first use."""
    default = _sdk(sdk).DefaultHttpxClient
    httpx = _package(next(c for c in default.__mro__ if not c.__module__.startswith(sdk)))

    def install(transport: Any, wrap: Any) -> bool:
        """Bound every socket operation of ``transport``'s pool by the deadline; False when it has no such hook."""
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            core = _package(type(pool))
            pool._network_backend = wrap(pool._network_backend, core)
            return True
        return False

    def scrubbed(response: Any, request: Any, raw: bytes) -> Any:
        """A copy of an error reply, read in full, without the request's credentials in headers or body."""
        secrets = _secrets(request)
        decoded = httpx.Response(response.status_code, headers=response.headers, content=raw)
        headers = [
            (k, redact(v, secrets))
            for k, v in response.headers.multi_items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        try:  # a JSON body stays JSON: redact its strings (a "Bearer ..." match must not eat quotes)
            text = json.dumps(redact_body(json.loads(decoded.text), tuple(secrets)))
        except ValueError:
            text = redact(decoded.text, secrets)
        body = text.encode(decoded.encoding or "utf-8", "replace")
        return httpx.Response(
            response.status_code, headers=headers, content=body, request=request, extensions=response.extensions
        )

    class SyncStream:
        def __init__(self, stream: Any, core: Any) -> None:
            self._stream, self._core = stream, core
            self.get_extra_info, self.close = stream.get_extra_info, stream.close  # as they are: no wrapper frame

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self._stream.read(max_bytes, _time_left(timeout, self._core.ReadTimeout))

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            if buffer:  # h11 ends each request with an empty write
                self._stream.write(buffer, _time_left(timeout, self._core.WriteTimeout))

        def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
            timeout = _time_left(timeout, self._core.ConnectTimeout)
            return SyncStream(self._stream.start_tls(ssl_context, server_hostname, timeout), self._core)

    class SyncBackend:
        def __init__(self, backend: Any, core: Any) -> None:
            self._backend, self._core = backend, core

        def connect_tcp(self, host: str, port: int, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
            timeout = _time_left(timeout, self._core.ConnectTimeout)
            return SyncStream(self._backend.connect_tcp(host, port, timeout, *args, **kwargs), self._core)

        def connect_unix_socket(self, path: str, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
            timeout = _time_left(timeout, self._core.ConnectTimeout)
            return SyncStream(self._backend.connect_unix_socket(path, timeout, *args, **kwargs), self._core)

        def sleep(self, seconds: float) -> None:
            self._backend.sleep(seconds)

    class AsyncStream:
        def __init__(self, stream: Any, core: Any) -> None:
            self._stream, self._core = stream, core
            self.get_extra_info, self.aclose = stream.get_extra_info, stream.aclose  # as they are: no wrapper frame

        async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return await self._stream.read(max_bytes, _time_left(timeout, self._core.ReadTimeout))

        async def write(self, buffer: bytes, timeout: float | None = None) -> None:
            if buffer:  # h11 ends each request with an empty write
                await self._stream.write(buffer, _time_left(timeout, self._core.WriteTimeout))

        async def start_tls(
            self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
        ) -> Any:
            timeout = _time_left(timeout, self._core.ConnectTimeout)
            return AsyncStream(await self._stream.start_tls(ssl_context, server_hostname, timeout), self._core)

    class AsyncBackend:
        def __init__(self, backend: Any, core: Any) -> None:
            self._backend, self._core = backend, core

        async def connect_tcp(
            self, host: str, port: int, timeout: float | None = None, *args: Any, **kwargs: Any
        ) -> Any:
            timeout = _time_left(timeout, self._core.ConnectTimeout)
            return AsyncStream(await self._backend.connect_tcp(host, port, timeout, *args, **kwargs), self._core)

        async def connect_unix_socket(self, path: str, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
            timeout = _time_left(timeout, self._core.ConnectTimeout)
            return AsyncStream(await self._backend.connect_unix_socket(path, timeout, *args, **kwargs), self._core)

        async def sleep(self, seconds: float) -> None:
            await self._backend.sleep(seconds)

    def expired(deadline: float | None, request: Any) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise httpx.ReadTimeout("TIMEOUT reached: the whole attempt may take no longer", request=request)

    class Body(httpx.SyncByteStream):  # type: ignore[name-defined]  # httpx (or httpx2) is the SDK's, found at run time
        """The response body, read under the request's deadline."""

        def __init__(self, stream: Any, deadline: float | None, request: Any) -> None:
            self._stream, self._deadline, self._request = stream, deadline, request

        def __iter__(self) -> Any:
            chunks = iter(self._stream)
            while True:
                expired(self._deadline, self._request)
                token = _deadline.set(self._deadline)
                try:
                    chunk = next(chunks, None)
                finally:
                    _deadline.reset(token)
                if chunk is None:
                    return
                yield chunk

        def close(self) -> None:
            self._stream.close()

    class AsyncBody(httpx.AsyncByteStream):  # type: ignore[name-defined]  # httpx (or httpx2) is the SDK's, found at run time
        """The response body, read under the request's deadline."""

        def __init__(self, stream: Any, deadline: float | None, request: Any) -> None:
            self._stream, self._deadline, self._request = stream, deadline, request

        async def __aiter__(self) -> Any:
            chunks = self._stream.__aiter__()
            while True:
                expired(self._deadline, self._request)
                token = _deadline.set(self._deadline)
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    _deadline.reset(token)
                yield chunk

        async def aclose(self) -> None:
            await self._stream.aclose()

    class Transport(httpx.BaseTransport):  # type: ignore[name-defined]  # httpx (or httpx2) is the SDK's, found at run time
        def __init__(self, inner: Any) -> None:
            self._inner = inner
            self._hooked = install(inner, SyncBackend)

        def handle_request(self, request: Any) -> Any:
            budget = _budget(request)
            deadline = None if budget is None else time.monotonic() + budget
            token = _deadline.set(deadline)
            try:
                response = self._inner.handle_request(request)
                if response.status_code >= 400:
                    body = Body(response.stream, deadline, request)
                    try:
                        return scrubbed(response, request, b"".join(body))
                    finally:
                        body.close()
                if _streamed(response):
                    return response  # its events come while the server sends them, each read within TIMEOUT
                if self._hooked:
                    response.read()  # the whole body now, every socket read within the time left
                    return response
            finally:
                _deadline.reset(token)
            response.stream = Body(response.stream, deadline, request)  # no socket hook: checked between chunks
            return response

        def close(self) -> None:
            self._inner.close()

    class AsyncTransport(httpx.AsyncBaseTransport):  # type: ignore[name-defined]  # httpx (or httpx2) is the SDK's, found at run time
        def __init__(self, inner: Any) -> None:
            self._inner = inner
            self._hooked = install(inner, AsyncBackend)

        async def handle_async_request(self, request: Any) -> Any:
            budget = _budget(request)
            deadline = None if budget is None else time.monotonic() + budget
            token = _deadline.set(deadline)
            try:
                response = await self._inner.handle_async_request(request)
                if response.status_code >= 400:
                    body = AsyncBody(response.stream, deadline, request)
                    try:
                        return scrubbed(response, request, b"".join([chunk async for chunk in body]))
                    finally:
                        await body.aclose()
                if _streamed(response):
                    return response
                if self._hooked:
                    await response.aread()
                    return response
            finally:
                _deadline.reset(token)
            response.stream = AsyncBody(response.stream, deadline, request)
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

    return httpx, Transport, AsyncTransport


def _environment_proxies(httpx: Any) -> dict[str, str | None]:
    """httpx's reading of ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY``: URL pattern ->
    proxy URL, or None for "no proxy". httpx skips the environment when it is given a transport, so
    the mounts are built here from its own helper (the SDK's default client honours these variables)."""
    utils = sys.modules.get(f"{httpx.__name__}._utils")
    read = getattr(utils, "get_environment_proxies", None)
    if read is None:  # a future httpx without the helper: say so rather than send around the proxy unnoticed
        if any(os.environ.get(name) for name in _PROXY_VARIABLES):
            log.warning(
                "%s has no get_environment_proxies(): the proxy set in the environment is not used", httpx.__name__
            )
        return {}
    return read()


def http_client(is_async: bool = False, sdk: str = "openai") -> Any:
    """A new ``DefaultHttpxClient`` of the SDK ``sdk`` (``openai``, or ``anthropic``: each
    SDK checks that it gets its own httpx's client), or its async twin, on the
    deadline-and-scrub transport.

    Connection limits are the SDK's defaults (1000 connections, 100 kept alive);
    tinyllm's request queue bounds what is in flight. A proxy from the environment
    (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, minus ``NO_PROXY``) is used as the SDK
    would use it, with the same transport around it: the deadline and the scrubbing apply
    to requests through a proxy too.
    """
    module = _sdk(sdk)
    from ._logfilter import install

    install()  # httpx's INFO line would print a password in BASE_URL and keys in the query
    httpx, transport, async_transport = _classes(sdk)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    wrap, inner = (async_transport, httpx.AsyncHTTPTransport) if is_async else (transport, httpx.HTTPTransport)
    mounts: dict[str, Any] = {}
    for pattern, proxy in _environment_proxies(httpx).items():
        try:
            mounts[pattern] = None if proxy is None else wrap(inner(limits=limits, proxy=proxy))
        except Exception as exc:  # an unknown scheme, SOCKS without socksio, ...
            raise ConfigError(
                f"the proxy {redact_url(proxy)} set in the environment for {pattern} ({', '.join(_PROXY_VARIABLES)}) "
                f"cannot be used: {exc}"
            ) from exc
    cls = module.DefaultAsyncHttpxClient if is_async else module.DefaultHttpxClient
    return cls(transport=wrap(inner(limits=limits)), mounts=mounts)
