"""Retry policy: which failures are retried and how long to wait, as small pure functions.

The loop itself is the ``backoff`` package's (:func:`backoff.on_exception`), fed
with a wait generator that asks :func:`wait_for` for every wait. The SDK's own
retries are switched off (``max_retries=0``) so attempts never stack.

Rules (the status rules follow openai-python's ``_should_retry``):

* retried: HTTP 408, 409, 429 and every 5xx, connection errors and timeouts;
  a reply that parses but is unusable (:class:`ResponseError`) at most once;
* never retried: 400, 401, 403, 404, 422 and any other 4xx;
* a server header ``x-should-retry: true|false`` overrides the status rule;
* wait: ``retry-after-ms``, else ``Retry-After`` (seconds or an HTTP date), when
  present and at most ``MAX_WAITING_TIME``; a longer server-directed wait is not
  retried. Otherwise ``WAITING_TIME * EXPONENTIAL_BACKOFF_FACTOR**n`` capped at
  ``MAX_WAITING_TIME``, with full jitter (a uniform draw in ``[0, that]``, as in
  the AWS Architecture Blog's "Exponential Backoff And Jitter").
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import backoff

from . import usage
from .errors import APIConnectionError, APIError, ResponseError, TinyLLMError

__all__ = ["RetryPolicy", "should_retry", "server_wait", "backoff_wait", "wait_for", "call", "acall"]

log = logging.getLogger("tinyllm")
T = TypeVar("T")

RETRY_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry.

    Attributes:
        max_attempts: HTTP requests in all, the first included (``MAX_ATTEMPTS``, default 5).
        waiting_time: first backoff wait in seconds (``WAITING_TIME``, default 1).
        backoff_factor: growth per retry (``EXPONENTIAL_BACKOFF_FACTOR``, default 2).
        max_waiting_time: cap on any one wait, seconds (``MAX_WAITING_TIME``, default 60);
            a server asking for longer is not retried.
    """

    max_attempts: int = 5
    waiting_time: float = 1.0
    backoff_factor: float = 2.0
    max_waiting_time: float = 60.0

    @classmethod
    def from_config(cls, cfg: Any) -> "RetryPolicy":
        """Build the policy from a :class:`tinyllm.config.Config`."""
        return cls(cfg.max_attempts, cfg.waiting_time, cfg.exponential_backoff_factor, cfg.max_waiting_time)


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def server_wait(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be a number of seconds or an HTTP date (RFC 9110 §10.2.3);
    ``now`` (epoch seconds) is used for the date form. Returns None when neither
    header is present or parses; never a negative number.
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = _header(headers, "retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def should_retry(exc: BaseException) -> bool:
    """Whether a failure of this kind may succeed if sent again (status rule and x-should-retry)."""
    if isinstance(exc, APIError):
        override = _header(exc.response_headers, "x-should-retry")
        if override in ("true", "false"):
            return override == "true"
        code = exc.status_code
        return code is not None and (code in RETRY_STATUS or code >= 500)
    return isinstance(exc, (APIConnectionError, ResponseError))


def backoff_wait(retry_number: int, policy: RetryPolicy, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential wait in seconds before retry ``retry_number`` (0 for the first retry)."""
    ceiling = min(policy.max_waiting_time, policy.waiting_time * policy.backoff_factor**retry_number)
    return ceiling * rand()


def wait_for(exc: BaseException, retry_number: int, policy: RetryPolicy, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before the next attempt: the server's wait if it gave one, else backoff."""
    asked = server_wait(getattr(exc, "response_headers", None))
    if asked is not None:
        return asked
    return backoff_wait(retry_number, policy, rand)


def _give_up(policy: RetryPolicy, state: dict[str, int]) -> Callable[[BaseException], bool]:
    def give_up(exc: BaseException) -> bool:
        if not should_retry(exc):
            return True
        if isinstance(exc, ResponseError):
            state["response_errors"] += 1
            return state["response_errors"] > 1
        asked = server_wait(getattr(exc, "response_headers", None))
        if asked is not None and asked > policy.max_waiting_time:
            exc.args = (
                f"{exc.args[0] if exc.args else exc}; the server asked to wait {asked:.1f} s, "
                f"more than MAX_WAITING_TIME={policy.max_waiting_time:g} s, so it was not retried",
            )
            return True
        return False

    return give_up


def _waits(policy: RetryPolicy):  # a backoff wait generator that is sent each exception
    exc = yield
    n = 0
    while True:
        exc = yield wait_for(exc, n, policy)
        n += 1


def _on_backoff(policy: RetryPolicy) -> Callable[[dict], None]:
    def on_backoff(details: dict) -> None:
        usage.record(retries=1)
        log.info(
            "attempt %d of %d failed (%s); retrying in %.2f s",
            details["tries"],
            policy.max_attempts,
            details.get("exception"),
            details["wait"],
        )

    return on_backoff


def _decorate(fn: Callable, policy: RetryPolicy) -> Callable:
    return backoff.on_exception(
        lambda: _waits(policy),
        TinyLLMError,
        max_tries=policy.max_attempts,
        giveup=_give_up(policy, {"response_errors": 0}),
        jitter=None,
        on_backoff=_on_backoff(policy),
        logger=None,
    )(fn)


def call(attempt: Callable[[], T], policy: RetryPolicy) -> T:
    """Run ``attempt()`` (one HTTP request that raises tinyllm errors) under ``policy``.

    Returns what the first successful attempt returns. Raises the typed error of
    the last failure after ``policy.max_attempts`` attempts, or at once for a
    failure that is not retried. Each retry is logged at INFO on the
    ``tinyllm`` logger and counted in ``usage_stats()["retries"]``.
    """
    try:
        return attempt()  # the common case, without building the retry machinery
    except TinyLLMError as exc:
        failed = [exc]

    def again() -> T:  # the backoff loop, with the first attempt's failure replayed into it
        if failed:
            raise failed.pop()
        return attempt()

    return _decorate(again, policy)()


async def acall(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy) -> T:
    """The asyncio twin of :func:`call`: ``attempt`` is an async function; waits use asyncio.sleep."""
    try:
        return await attempt()
    except TinyLLMError as exc:
        failed = [exc]

    async def again() -> T:
        if failed:
            raise failed.pop()
        return await attempt()

    return await _decorate(again, policy)()
