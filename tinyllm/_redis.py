"""One Redis connection pool per URL per process, and Redis failures as tinyllm errors.

Used by :mod:`tinyllm.cache._redis` and :mod:`tinyllm.limits._redis` when ``REDIS_URL``
is set; imported only then (``import tinyllm`` never imports redis). Needs the
``redis`` extra: ``pip install 'tinyllm[redis]'``.

Errors name the URL with its password masked (:func:`tinyllm.config.redact_url`):

- the first use in this process cannot reach Redis (refused, unknown host, bad
  password, not a Redis URL): :class:`~tinyllm.errors.ConfigError`;
- Redis fails after it has answered once (it went down mid-run):
  :class:`~tinyllm.errors.APIConnectionError`, from :func:`failure`.
"""

from __future__ import annotations

import threading
from typing import Any

from ._fork import fresh_locks_in_child
from .config import redact_url
from .errors import APIConnectionError, ConfigError

__all__ = ["connect", "failure", "redis_errors", "scan_match"]

#: seconds to open a connection, and to wait for any answer (blocking waits ask for less)
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 10.0

_clients: dict[str, Any] = {}
_lock = threading.Lock()
fresh_locks_in_child(globals(), "_lock")


def _redis_module() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise ConfigError(
            "REDIS_URL is set but the redis package is not installed: pip install 'tinyllm[redis]' (or unset REDIS_URL)"
        ) from exc
    return redis


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exception classes a Redis command raises when Redis fails (``redis.RedisError``, OSError)."""
    return (_redis_module().RedisError, OSError)


def connect(url: str) -> Any:
    """The process's ``redis.Redis`` client for ``url`` (str), created and PINGed on first use.

    Connections are opened lazily by redis-py's pool and re-opened after a fork
    (the pool checks the process id). A command that fails on a dropped
    connection is tried once more on a fresh one, without waiting.

    Raises:
        ConfigError: the redis package is missing, ``url`` is not a Redis URL, or
            Redis does not answer PING (the message names the masked URL).
    """
    client = _clients.get(url)
    if client is not None:
        return client
    redis = _redis_module()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    shown = redact_url(url)
    with _lock:
        client = _clients.get(url)
        if client is not None:
            return client
        try:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 1),
                health_check_interval=30,
            )
        except ValueError:  # the message of a bad URL may quote the URL: not chained
            raise ConfigError(f"REDIS_URL {shown!r} is not a Redis URL (redis://[:password@]host:port/db)") from None
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            client.close()
            raise ConfigError(
                f"cannot use Redis at {shown} (REDIS_URL): {_reason(exc)}; "
                "start Redis there, fix REDIS_URL, or unset it"
            ) from exc
        _clients[url] = client
        return client


def failure(url: str, exc: BaseException, doing: str) -> APIConnectionError:
    """An :class:`APIConnectionError` for Redis failing at ``url`` while ``doing`` (str), e.g. "checking the rate limits"."""
    return APIConnectionError(f"Redis at {redact_url(url)} (REDIS_URL) failed while {doing}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def scan_match(prefix: str) -> str:
    """A SCAN MATCH pattern for every key that starts with ``prefix`` (glob characters escaped)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + "*"
