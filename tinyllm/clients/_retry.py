"""Retry policy: which failures are retried, how long to wait, and the one loop that does it.

The decisions are small pure functions (:func:`should_retry`, :func:`server_wait`,
:func:`backoff_wait`, :func:`next_wait`), tested with tables of cases; the loop
(:class:`Retrying`, built once per client) reads top to bottom, as openai-python's
``_base_client`` does. The SDK's own retries are switched off (``max_retries=0``)
so attempts never stack; the loop passes each attempt its number, which the
OpenAI-family clients send as the SDK's ``x-stainless-retry-count`` header.

Rules (the status rules follow openai-python's ``_should_retry``):

* retried: HTTP 408, 409, 429 and every 5xx, connection errors and timeouts;
  a reply that parses but is unusable (:class:`ResponseError`) at most once;
* never retried: 400, 401, 403, 404, 422 and any other 4xx;
* a server header ``x-should-retry: true|false`` overrides the status rule;
* wait: ``retry-after-ms``, else ``Retry-After`` (seconds or an HTTP date), when
  present and at most ``MAX_WAITING_TIME``; a longer server-directed wait is not
  retried. Otherwise ``WAITING_TIME * EXPONENTIAL_BACKOFF_FACTOR**n`` capped at
  ``MAX_WAITING_TIME``, with full jitter (``backoff.full_jitter``: a uniform draw
  in ``[0, that]``, as in the AWS Architecture Blog's "Exponential Backoff And Jitter").

Every decision is logged on the ``tinyllm`` logger: a retry at INFO, a give-up at DEBUG.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, TypeVar


from ..observe import _usage as usage
from ..errors import APIConnectionError, APIError, ResponseError, TinyLLMError

__all__ = [
    "RetryPolicy",
    "Retrying",
    "should_retry",
    "server_wait",
    "backoff_wait",
    "wait_for",
    "next_wait",
    "call",
    "acall",
]

log = logging.getLogger("tinyllm")
T = TypeVar("T")

RETRY_STATUS = frozenset({408, 409, 429})
RESPONSE_ERROR_RETRIES = 1  # an unusable reply is asked for again once: a second one is the server's habit


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
        """Build the policy from settings (a :class:`tinyllm.config.Config`)."""
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
        import email.utils  # imported here: a dated Retry-After is rare, and email costs 4 ms to import

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def should_retry(exc: BaseException) -> bool:
    """Whether a failure of this kind may succeed if sent again (status rule and x-should-retry)."""
    if isinstance(exc, APIConnectionError):  # no response at all (an APIError with no status)
        return True
    if isinstance(exc, APIError):
        override = _header(exc.response_headers, "x-should-retry")
        if override in ("true", "false"):
            return override == "true"
        code = exc.status_code
        return code is not None and (code in RETRY_STATUS or code >= 500)
    return isinstance(exc, (APIConnectionError, ResponseError))


def backoff_wait(retry_number: int, policy: RetryPolicy, rand: Callable[[], float] | None = None) -> float:
    """Full-jitter exponential wait in seconds before retry ``retry_number`` (0 for the first retry).

    ``rand`` (a draw in [0, 1)) replaces ``backoff.full_jitter``'s draw, for tests.
    """
    ceiling = min(policy.max_waiting_time, policy.waiting_time * policy.backoff_factor**retry_number)
    if rand is not None:
        return ceiling * rand()
    import backoff  # imported on the first retry: it imports asyncio, which `import tinyllm` does not

    return backoff.full_jitter(ceiling)


def wait_for(
    exc: BaseException, retry_number: int, policy: RetryPolicy, rand: Callable[[], float] | None = None
) -> float:
    """Seconds to wait before the next attempt: the server's wait if it gave one, else backoff."""
    asked = server_wait(getattr(exc, "response_headers", None))
    if asked is not None:
        return asked
    return backoff_wait(retry_number, policy, rand)


def next_wait(
    exc: BaseException, attempt: int, response_errors: int, policy: RetryPolicy, rand: Callable[[], float] | None = None
) -> tuple[float | None, str]:
    """Decide what follows the failure ``exc`` of attempt number ``attempt`` (0 for the first).

    ``response_errors`` counts the :class:`ResponseError` failures so far, this one included.

    Returns:
        ``(seconds to wait, why)`` to retry, or ``(None, why)`` to give up; ``why`` is
        a short reason for the log (and, for a server-directed wait that is too long,
        for the error message).
    """
    if not should_retry(exc):
        return None, "not retryable"
    if isinstance(exc, ResponseError) and response_errors > RESPONSE_ERROR_RETRIES:
        return None, f"{response_errors} unusable replies in a row"
    if attempt + 1 >= policy.max_attempts:
        return None, f"MAX_ATTEMPTS={policy.max_attempts} reached"
    asked = server_wait(getattr(exc, "response_headers", None))
    if asked is not None and asked > policy.max_waiting_time:
        return None, (
            f"the server asked to wait {asked:.1f} s, more than "
            f"MAX_WAITING_TIME={policy.max_waiting_time:g} s, so it was not retried"
        )
    wait = asked if asked is not None else backoff_wait(attempt, policy, rand)
    return wait, ("as the server asked" if asked is not None else "backoff")


def _explained(exc: TinyLLMError, why: str) -> TinyLLMError:
    """``exc`` itself, or for a server wait that was too long a copy whose message says so.

    The copy (same class, fields and ``__cause__``) leaves the caught exception untouched.
    """
    if not why.startswith("the server asked"):
        return exc
    import copy

    explained = copy.copy(exc)
    explained.args = (f"{exc.args[0] if exc.args else exc}; {why}", *exc.args[1:])
    return explained


class Retrying:
    """The retry loop, built once per client from its :class:`RetryPolicy`.

    ``call(attempt)`` runs ``attempt(n)`` (n = 0, 1, ...: the attempt number, for the
    ``x-stainless-retry-count`` header) until it returns, the failure is not
    retryable, or ``policy.max_attempts`` attempts have been made; ``acall`` is the
    asyncio twin (waits with ``asyncio.sleep``). Each retry is logged at INFO and
    counted in ``usage_stats()["retries"]``; each give-up is logged at DEBUG.

    Raises: the typed error of the last failure (for a server-directed wait longer
    than MAX_WAITING_TIME, a copy whose message says so).
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __repr__(self) -> str:
        return f"Retrying({self.policy!r})"

    def _after(self, exc: TinyLLMError, attempt: int, response_errors: int) -> float:
        """Seconds to wait before the next attempt; raises ``exc`` (explained) to give up."""
        wait, why = next_wait(exc, attempt, response_errors, self.policy)
        if wait is None:
            log.debug(
                "attempt %d of %d failed (%s: %s); giving up: %s",
                attempt + 1,
                self.policy.max_attempts,
                type(exc).__name__,
                exc,
                why,
            )
            final = _explained(exc, why)
            if final is exc:
                raise exc
            raise final from exc.__cause__
        usage.record(retries=1)
        log.info(
            "attempt %d of %d failed (%s); retrying in %.2f s (%s)",
            attempt + 1,
            self.policy.max_attempts,
            exc,
            wait,
            why,
        )
        return wait

    def call(self, attempt: Callable[[int], T]) -> T:
        """Run ``attempt(n)`` under the policy (see the class docstring); returns its result."""
        response_errors = 0
        for n in range(self.policy.max_attempts):
            try:
                return attempt(n)
            except TinyLLMError as exc:
                response_errors += isinstance(exc, ResponseError)
                time.sleep(self._after(exc, n, response_errors))
        raise AssertionError("unreachable: the last attempt raises")

    async def acall(self, attempt: Callable[[int], Awaitable[T]]) -> T:
        """The asyncio twin of :meth:`call`: ``attempt`` is an async function."""
        import asyncio  # here, not at the top: `import tinyllm` does not import asyncio

        response_errors = 0
        for n in range(self.policy.max_attempts):
            try:
                return await attempt(n)
            except TinyLLMError as exc:
                response_errors += isinstance(exc, ResponseError)
                await asyncio.sleep(self._after(exc, n, response_errors))
        raise AssertionError("unreachable: the last attempt raises")


def call(attempt: Callable[[], T], policy: RetryPolicy) -> T:
    """Run ``attempt()`` under ``policy`` (a one-off :class:`Retrying`); returns its result."""
    return Retrying(policy).call(lambda n: attempt())


async def acall(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy) -> T:
    """The asyncio twin of :func:`call`."""
    return await Retrying(policy).acall(lambda n: attempt())
