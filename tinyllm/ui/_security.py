"""The workbench's guard: an ASGI middleware in front of every route.

Every request:

- its ``Host`` header must be one of the server's own addresses (``127.0.0.1:PORT``,
  ``localhost:PORT``, ``[::1]:PORT``, the ``--host`` given): a DNS-rebinding name pointing at
  127.0.0.1 is refused (403), so a page on another site cannot read the call log through it;
- with an access token (``--host``, or ``token=`` given): the token must come as ``?token=`` (the
  URL printed at start; answered with a redirect that stores it in an HttpOnly, SameSite=Strict
  cookie) or in that cookie; otherwise 403;
- gets a session cookie (random, HttpOnly, SameSite=Strict) if it has none; the page embeds the
  session's CSRF token, an HMAC-SHA256 of the session id under a key made at server start.

Every request that changes anything or spends money (any method but GET, HEAD, OPTIONS) must also
carry an ``Origin`` header equal to ``http://`` + its Host, and the session's CSRF token in the
``X-CSRF-Token`` header; otherwise 403. GET routes change nothing, except the stream of a run,
which is started by such a checked POST and read once by an unguessable id tied to the session.

Answers carry a Content-Security-Policy that allows only the server's own scripts (no inline
script), ``frame-ancestors 'none'``, ``Referrer-Policy: no-referrer`` and ``nosniff``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

__all__ = ["CSRF_HEADER", "SESSION_COOKIE", "TOKEN_COOKIE", "Guard", "allowed_hosts"]

SESSION_COOKIE = "tinyllm_session"
TOKEN_COOKIE = "tinyllm_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_WILDCARDS = ("0.0.0.0", "::", "")


def allowed_hosts(host: str, port: int) -> set[str]:
    """The ``Host`` header values (lowercase) that name this server when it listens on ``host``:``port``.

    Always the loopback names (``127.0.0.1``, ``localhost``, ``[::1]``) with the port; the ``host``
    itself (an IPv6 address in brackets); for a wildcard host (``0.0.0.0``, ``::``) also this
    machine's name and addresses (``socket.gethostname`` and what it resolves to).
    """
    import socket

    names = {"127.0.0.1", "localhost", "[::1]"}
    if host not in _WILDCARDS:
        names.add(f"[{host}]" if ":" in host else host)
    else:
        hostname = socket.gethostname()
        names |= {hostname, socket.getfqdn()}
        try:
            for *_, addr in socket.getaddrinfo(hostname, None):
                ip = str(addr[0])  # a str already: getaddrinfo gives AF_INET/AF_INET6 addresses here
                names.add(f"[{ip}]" if ":" in ip else ip)
        except OSError:
            pass
    return {f"{n.lower()}:{port}" for n in names} | ({n.lower() for n in names} if port == 80 else set())


def csrf_token(secret: bytes, session: str) -> str:
    """The CSRF token of ``session`` (hex HMAC-SHA256 under the server's ``secret``)."""
    return hmac.new(secret, session.encode(), hashlib.sha256).hexdigest()


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed cookie header counts as none
        return {}
    return {k: m.value for k, m in jar.items()}


def _cookie_header(name: str, value: str) -> tuple[bytes, bytes]:
    return b"set-cookie", f"{name}={value}; Path=/; HttpOnly; SameSite=Strict".encode()


class Guard:
    """ASGI middleware enforcing the rules in the module docstring.

    Args:
        app: the ASGI app behind it.
        hosts: allowed ``Host`` header values (see :func:`allowed_hosts`).
        token: the access token, or None (loopback only: no token needed).
        secret: the key of the CSRF tokens (random per server start).

    The session id and its CSRF token are put in ``scope["state"]`` as ``session`` and ``csrf``.
    """

    def __init__(self, app: Callable, *, hosts: set[str], token: str | None, secret: bytes) -> None:
        self.app, self.hosts, self.token, self.secret = app, hosts, token, secret

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "websocket":  # none served
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return await _refuse(send, 403, "Refused: this server does not answer for that Host name.")
        cookies = _cookies(headers)
        extra_headers: list[tuple[bytes, bytes]] = []
        if self.token is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            given = query.pop("token", None)
            if given is not None and secrets.compare_digest(given.encode(), self.token.encode()):
                rest = urlencode(query)
                path = scope.get("raw_path") or scope.get("path", "/").encode()
                location = path.decode("latin-1") + (f"?{rest}" if rest else "")
                return await _redirect(send, location, [_cookie_header(TOKEN_COOKIE, self.token)])
            if not secrets.compare_digest(cookies.get(TOKEN_COOKIE, "").encode(), self.token.encode()):
                return await _refuse(send, 403, "Refused: open the address with the token that `tinyllm ui` printed.")
        session = cookies.get(SESSION_COOKIE, "")
        if len(session) != 43 or not all(c.isalnum() or c in "-_" for c in session):
            session = secrets.token_urlsafe(32)
            extra_headers.append(_cookie_header(SESSION_COOKIE, session))
        csrf = csrf_token(self.secret, session)
        if scope["method"] not in SAFE_METHODS:
            if headers.get("origin") != f"http://{host}":
                return await _refuse(
                    send, 403, "Refused: a changing request must come from this server's own pages (Origin header)."
                )
            if not secrets.compare_digest(headers.get(CSRF_HEADER, "").encode(), csrf.encode()):
                return await _refuse(send, 403, "Refused: missing or wrong session token; reload the page.")
        scope.setdefault("state", {})
        scope["state"]["session"], scope["state"]["csrf"] = session, csrf

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra_headers, *_SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


async def _refuse(send: Callable, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *_SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Callable, location: str, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", location.encode("latin-1")),
                (b"content-length", b"0"),
                *headers,
                *_SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})
