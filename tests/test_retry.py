"""The retry policy's pure functions, table-driven (as openai-python tests its _should_retry)."""

from __future__ import annotations

import asyncio
import email.utils

import pytest

from tinyllm.clients import _retry as retry
from tinyllm.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    BadRequestError,
    OutputParseError,
    RateLimitError,
    ResponseError,
    ServerError,
)


def api_error(code, headers=None):
    return APIError("x", status_code=code, response_headers=headers or {})


@pytest.mark.parametrize(
    "exc,expected",
    [
        (api_error(408), True),
        (api_error(409), True),
        (api_error(429), True),
        (api_error(500), True),
        (api_error(502), True),
        (api_error(503), True),
        (api_error(504), True),
        (api_error(599), True),
        (api_error(400), False),
        (api_error(401), False),
        (api_error(403), False),
        (api_error(404), False),
        (api_error(422), False),
        (api_error(418), False),
        (api_error(400, {"x-should-retry": "true"}), True),
        (api_error(503, {"x-should-retry": "false"}), False),
        (api_error(503, {"X-Should-Retry": "false"}), False),
        (APIConnectionError("down"), True),
        (APITimeoutError("slow"), True),
        (ResponseError("bad json"), True),
        (OutputParseError("no"), False),
        (ValueError("bug"), False),
    ],
)
def test_should_retry(exc, expected):
    assert retry.should_retry(exc) is expected


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({}, None),
        ({"retry-after": "2"}, 2.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after-ms": "150"}, 0.15),
        ({"retry-after-ms": "150", "retry-after": "9"}, 0.15),
        ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
        ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "soon"}, None),
    ],
)
def test_server_wait(headers, expected):
    got = retry.server_wait(headers, now=NOW)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_backoff_wait_is_full_jitter_capped():
    policy = retry.RetryPolicy(max_attempts=10, waiting_time=1, backoff_factor=2, max_waiting_time=5)
    assert [retry.backoff_wait(n, policy, rand=lambda: 1.0) for n in range(5)] == [1, 2, 4, 5, 5]
    assert retry.backoff_wait(3, policy, rand=lambda: 0.5) == 2.5
    assert retry.backoff_wait(3, policy, rand=lambda: 0.0) == 0.0


def test_wait_for_prefers_server_wait():
    policy = retry.RetryPolicy(waiting_time=1, backoff_factor=2, max_waiting_time=60)
    assert retry.wait_for(api_error(429, {"retry-after": "7"}), 0, policy, rand=lambda: 1.0) == 7.0
    assert retry.wait_for(api_error(503), 2, policy, rand=lambda: 1.0) == 4.0


def run_script(failures, policy, monkeypatch):
    """Run retry.call over a scripted sequence of outcomes; record sleeps instead of sleeping."""
    sleeps = []
    monkeypatch.setattr("time.sleep", sleeps.append)
    attempts = []

    def attempt():
        attempts.append(1)
        outcome = failures[len(attempts) - 1] if len(attempts) <= len(failures) else "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    try:
        return retry.call(attempt, policy), len(attempts), sleeps
    except Exception as exc:
        return exc, len(attempts), sleeps


@pytest.mark.parametrize(
    "script,result_type,attempts",
    [
        ([], str, 1),
        ([ServerError("a", status_code=503)] * 2, str, 3),
        ([ServerError("a", status_code=503)] * 5, ServerError, 5),
        ([RateLimitError("r", status_code=429)] * 9, RateLimitError, 5),
        ([BadRequestError("b", status_code=400)], BadRequestError, 1),
        ([ResponseError("r")], str, 2),
        ([ResponseError("r"), ResponseError("r")], ResponseError, 2),
        ([APIConnectionError("c"), APITimeoutError("t")], str, 3),
    ],
)
def test_call_attempt_counts(script, result_type, attempts, monkeypatch):
    policy = retry.RetryPolicy(max_attempts=5, waiting_time=0.01, backoff_factor=2, max_waiting_time=1)
    result, n, sleeps = run_script(script, policy, monkeypatch)
    assert isinstance(result, result_type)
    assert n == attempts
    assert len(sleeps) == attempts - 1


def test_long_server_wait_is_not_retried(monkeypatch):
    policy = retry.RetryPolicy(max_attempts=5, max_waiting_time=10)
    err = RateLimitError("slow down", status_code=429, response_headers={"retry-after": "120"})
    result, n, sleeps = run_script([err], policy, monkeypatch)
    assert type(result) is RateLimitError and result.status_code == 429 and n == 1 and sleeps == []
    assert str(err) == "slow down (status 429)"  # the caught error is left as it was
    assert "120.0 s" in str(result) and "MAX_WAITING_TIME" in str(result)


def test_retries_logged_and_counted(monkeypatch, caplog):
    from tinyllm import reset_usage_stats, usage_stats

    reset_usage_stats()
    policy = retry.RetryPolicy(max_attempts=3, waiting_time=0.01)
    with caplog.at_level("INFO", logger="tinyllm"):
        run_script([ServerError("boom", status_code=502)], policy, monkeypatch)
    assert usage_stats()["retries"] == 1
    assert any("attempt 1 of 3" in r.getMessage() and "retrying in" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "exc,attempt,response_errors,expected",
    [
        (ServerError("s", status_code=503), 0, 0, 1.0),  # backoff: waiting_time * factor**0 (rand = 1)
        (ServerError("s", status_code=503), 2, 0, 4.0),
        (ServerError("s", status_code=503), 4, 0, None),  # the 5th attempt was the last
        (BadRequestError("b", status_code=400), 0, 0, None),
        (RateLimitError("r", status_code=429, response_headers={"retry-after": "3"}), 0, 0, 3.0),
        (RateLimitError("r", status_code=429, response_headers={"retry-after": "99"}), 0, 0, None),
        (ResponseError("r"), 0, 1, 1.0),
        (ResponseError("r"), 1, 2, None),
        (APITimeoutError("t"), 3, 0, 8.0),
    ],
)
def test_next_wait_table(exc, attempt, response_errors, expected):
    policy = retry.RetryPolicy(max_attempts=5, waiting_time=1, backoff_factor=2, max_waiting_time=10)
    wait, why = retry.next_wait(exc, attempt, response_errors, policy, rand=lambda: 1.0)
    assert wait == expected
    assert why  # every decision has a reason for the log


def test_attempt_numbers_and_give_up_logged(monkeypatch, caplog):
    monkeypatch.setattr("time.sleep", lambda s: None)
    seen = []

    def attempt(n):
        seen.append(n)
        raise ServerError("down", status_code=503)

    loop = retry.Retrying(retry.RetryPolicy(max_attempts=3, waiting_time=0.01))
    with caplog.at_level("DEBUG", logger="tinyllm"), pytest.raises(ServerError):
        loop.call(attempt)
    assert seen == [0, 1, 2]
    assert any("giving up" in r.getMessage() and "MAX_ATTEMPTS=3" in r.getMessage() for r in caplog.records)


def test_async_loop_passes_attempt_numbers():
    seen = []

    async def attempt(n):
        seen.append(n)
        if n < 2:
            raise APIConnectionError("reset")
        return "ok"

    loop = retry.Retrying(retry.RetryPolicy(max_attempts=5, waiting_time=0.001))
    assert asyncio.run(loop.acall(attempt)) == "ok"
    assert seen == [0, 1, 2]
