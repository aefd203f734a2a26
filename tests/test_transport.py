"""The reliable transport, end to end against the loopback fake server.

Every test goes through tinyllm's real client (openai SDK, httpx, sockets) to
``fakeserver.FakeOpenAIServer`` and checks what the server saw: how many
requests, how far apart, what the caller got (error type, status_code,
request_id, chained cause), what was counted, logged and cached.

Waits that are not themselves under test are made instant by patching
``time.sleep`` (the backoff loop sleeps with it; the fake server never does).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import openai
import pytest
from fakeserver import Drip, Drop, EchoKey, EmptyChoices, Hang, Malformed, Reply, Status

import tinyllm
from tinyllm import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ContextWindowExceededError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseError,
    ServerError,
)

REPO = Path(tinyllm.__file__).resolve().parent.parent
SECRET = "sk-test-secret-XYZ123456789"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}]


pytestmark = pytest.mark.usefixtures("no_server_errors")


@pytest.fixture
def api(server):
    """tinyllm pointed at the fake server, tiny backoff waits, 5 attempts (the default)."""
    tinyllm.configure(api_type="openai", base_url=server.base_url, waiting_time=0.001, max_attempts=5)
    return server


def send(**params):
    return tinyllm.get_client().send_message(MESSAGES, **params)


def chat_count(server) -> int:
    return len(server.chat_requests())


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_seconds_is_honoured_with_a_real_wait(api):
    tinyllm.configure(waiting_time=0)  # a backoff wait would be 0 s: only Retry-After can make it wait
    api.enqueue(Status(429, headers={"Retry-After": "0.2"}), Reply("done"))
    started = time.monotonic()
    reply = send()
    elapsed = time.monotonic() - started
    assert reply["content"] == "done"
    first, second = api.chat_requests()
    assert len(api.chat_requests()) == 2
    assert elapsed >= 0.2
    assert second.time - first.time >= 0.2
    assert tinyllm.usage_stats()["retries"] == 1


def test_retry_after_ms_is_honoured_with_a_real_wait(api):
    tinyllm.configure(waiting_time=0)
    api.enqueue(Status(429, headers={"retry-after-ms": "150"}), Reply("done"))
    started = time.monotonic()
    assert send()["content"] == "done"
    elapsed = time.monotonic() - started
    first, second = api.chat_requests()
    assert elapsed >= 0.15
    assert second.time - first.time >= 0.15


def test_retry_after_ms_wins_over_retry_after(api, sleeps):
    api.enqueue(Status(429, headers={"retry-after-ms": "250", "Retry-After": "30"}), Reply("done"))
    assert send()["content"] == "done"
    assert sleeps == [pytest.approx(0.25)]
    assert chat_count(api) == 2


def test_retry_after_http_date(api, sleeps):
    target = time.time() + 30
    api.enqueue(Status(429, headers={"Retry-After": email.utils.formatdate(target, usegmt=True)}), Reply("done"))
    assert send()["content"] == "done"
    assert chat_count(api) == 2
    # the date has whole seconds: the wait is the time left until it, not a backoff wait (<= 0.001 s)
    assert len(sleeps) == 1
    assert 27 <= sleeps[0] <= 30


def test_retry_after_longer_than_max_waiting_time_is_not_retried(api, sleeps):
    tinyllm.configure(max_waiting_time=5)
    api.enqueue(Status(429, headers={"Retry-After": "30"}), Reply("never sent"))
    with pytest.raises(RateLimitError) as info:
        send()
    exc = info.value
    assert chat_count(api) == 1
    assert sleeps == []
    assert exc.status_code == 429
    assert exc.request_id == api.chat_requests()[0].request_id
    assert "30.0 s" in str(exc) and "MAX_WAITING_TIME" in str(exc)
    assert isinstance(exc.__cause__, openai.RateLimitError)
    assert tinyllm.usage_stats()["retries"] == 0


def test_429_without_retry_after_uses_backoff(api, sleeps):
    tinyllm.configure(waiting_time=0.5, exponential_backoff_factor=2, max_waiting_time=60)
    api.enqueue(Status(429), Status(429), Reply("done"))
    assert send()["content"] == "done"
    assert chat_count(api) == 3
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0  # full jitter under WAITING_TIME * 2**n


# --------------------------------------------------------------------------- 5xx


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_server_error_then_success(api, sleeps, code):
    api.enqueue(Status(code), Reply("recovered"))
    assert send()["content"] == "recovered"
    assert chat_count(api) == 2
    assert len(sleeps) == 1
    assert tinyllm.usage_stats()["retries"] == 1


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_server_error_every_time_gives_up_after_max_attempts(api, sleeps, code):
    tinyllm.configure(max_attempts=3)
    api.enqueue(*[Status(code)] * 3, Reply("too late"))
    with pytest.raises(ServerError) as info:
        send()
    exc = info.value
    requests = api.chat_requests()
    assert len(requests) == 3  # exactly MAX_ATTEMPTS: the SDK's own retries are off
    assert api.pending == 1
    assert len(sleeps) == 2
    assert exc.status_code == code
    assert exc.request_id == requests[-1].request_id
    assert exc.request_id in str(exc)
    assert isinstance(exc.__cause__, openai.APIStatusError)
    assert exc.__cause__.status_code == code
    assert tinyllm.usage_stats()["retries"] == 2
    assert tinyllm.usage_stats()["calls"] == 0


def test_sdk_retries_are_off(api):
    sdk = tinyllm.get_client().sdk(tinyllm.get_config())
    assert sdk.max_retries == 0
    tinyllm.configure(max_attempts=1)
    api.enqueue(Status(503), Reply("never sent"))
    with pytest.raises(ServerError):
        send()
    assert chat_count(api) == 1
    assert api.chat_requests()[0].headers.get("x-stainless-retry-count") == "0"


# --------------------------------------------------------------------------- x-should-retry


def test_x_should_retry_false_on_503_is_not_retried(api, sleeps):
    api.enqueue(Status(503, headers={"x-should-retry": "false"}), Reply("never sent"))
    with pytest.raises(ServerError) as info:
        send()
    assert chat_count(api) == 1
    assert sleeps == []
    assert info.value.status_code == 503
    assert info.value.request_id == "req_1"


def test_x_should_retry_true_on_400_is_retried(api, sleeps):
    api.enqueue(Status(400, headers={"x-should-retry": "true"}), Reply("ok after 400"))
    assert send()["content"] == "ok after 400"
    assert chat_count(api) == 2
    assert len(sleeps) == 1


# --------------------------------------------------------------------------- connection failures


def test_dropped_connection_is_retried(api, sleeps):
    api.enqueue(Drop(), Reply("after drop"))
    assert send()["content"] == "after drop"
    assert chat_count(api) == 2
    assert tinyllm.usage_stats()["retries"] == 1


def test_every_connection_dropped_raises_api_connection_error(api, sleeps):
    tinyllm.configure(max_attempts=3)
    api.enqueue(Drop(), Drop(), Drop(), Reply("too late"))
    with pytest.raises(APIConnectionError) as info:
        send()
    assert not isinstance(info.value, APITimeoutError)
    assert chat_count(api) == 3
    assert len(sleeps) == 2
    assert isinstance(info.value.__cause__, openai.APIConnectionError)
    assert api.base_url in str(info.value)


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_hang_longer_than_timeout_raises_api_timeout_error(api):
    tinyllm.configure(timeout=0.3, max_attempts=2, waiting_time=0)
    api.enqueue(Hang(5), Hang(5), Reply("too late"))
    started = time.monotonic()
    with pytest.raises(APITimeoutError) as info:
        send()
    elapsed = time.monotonic() - started
    assert chat_count(api) == 2
    assert elapsed >= 0.6  # each of the two attempts waited TIMEOUT
    assert "0.3" in str(info.value)
    assert isinstance(info.value.__cause__, openai.APITimeoutError)


# --------------------------------------------------------------------------- unusable replies


@pytest.mark.parametrize("bad", [Malformed, EmptyChoices])
def test_unusable_reply_twice_is_retried_only_once(api, sleeps, bad):
    api.enqueue(bad(), bad(), Reply("never sent"))
    with pytest.raises(ResponseError):
        send()
    assert chat_count(api) == 2
    assert api.pending == 1


@pytest.mark.parametrize("bad", [Malformed, EmptyChoices])
def test_unusable_reply_then_good_one(api, sleeps, bad):
    api.enqueue(bad(), Reply("fine"))
    assert send()["content"] == "fine"
    assert chat_count(api) == 2


def test_response_error_budget_is_per_call(api, sleeps):
    api.enqueue(Malformed(), Reply("first"))
    assert send()["content"] == "first"
    api.enqueue(Malformed(), Reply("second"))
    assert send(temperature=0.5)["content"] == "second"
    assert chat_count(api) == 4


def test_malformed_then_server_error_then_malformed_gives_up(api, sleeps):
    api.enqueue(Malformed(), Status(503), Malformed(), Reply("never sent"))
    with pytest.raises(ResponseError):
        send()
    assert chat_count(api) == 3


# --------------------------------------------------------------------------- client errors


@pytest.mark.parametrize(
    "code,error",
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (422, tinyllm.UnprocessableEntityError),  # a BadRequestError too
    ],
)
def test_client_errors_are_not_retried(api, sleeps, code, error):
    api.enqueue(Status(code), Reply("never sent"))
    with pytest.raises(BadRequestError if code in (400, 422) else error) as info:
        send()
    exc = info.value
    assert type(exc) is error
    assert chat_count(api) == 1
    assert sleeps == []
    assert exc.status_code == code
    assert exc.request_id == "req_1"
    assert isinstance(exc.__cause__, openai.APIStatusError)
    assert exc.__cause__.status_code == code
    assert tinyllm.usage_stats()["retries"] == 0


def test_context_length_exceeded_from_server(api, sleeps):
    body = {
        "error": {
            "message": "This model's maximum context length is 8192 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    api.enqueue(Status(400, body=body), Reply("never sent"))
    with pytest.raises(ContextWindowExceededError) as info:
        send()
    assert chat_count(api) == 1
    assert info.value.status_code == 400
    assert info.value.request_id == "req_1"
    assert "maximum context length" in str(info.value)


def test_prompt_too_large_is_refused_before_sending(api):
    text = "hello " * 40_000
    with pytest.raises(ContextWindowExceededError) as info:
        tinyllm.get_client().send_message([{"role": "user", "content": text}], model="gpt-4")
    exc = info.value
    assert api.requests == []
    assert exc.context_window == 8192
    assert exc.prompt_tokens > 8192
    assert exc.status_code is None


def test_prompt_plus_max_tokens_too_large_is_refused(api):
    text = "hello " * 7_000  # fits alone, not with 2000 more for the reply
    tinyllm.get_client().send_message([{"role": "user", "content": text}], model="gpt-4", max_tokens=100)
    assert chat_count(api) == 1
    with pytest.raises(ContextWindowExceededError) as info:
        tinyllm.get_client().send_message([{"role": "user", "content": text}], model="gpt-4", max_tokens=2000)
    assert chat_count(api) == 1
    assert info.value.max_tokens == 2000


# --------------------------------------------------------------------------- logging, counting, parameters


def test_retries_are_logged_counted_and_tokens_summed(api, sleeps, caplog):
    caplog.set_level(logging.INFO, logger="tinyllm")
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    api.enqueue(Status(503, headers={"retry-after-ms": "250"}), Reply("a", usage=usage))
    api.enqueue(Drop(), Reply("b", usage=usage))
    assert send()["content"] == "a"
    assert send(temperature=1)["content"] == "b"
    stats = tinyllm.usage_stats()
    assert stats["retries"] == 2
    assert stats["calls"] == 2
    assert (stats["prompt_tokens"], stats["completion_tokens"], stats["total_tokens"]) == (14, 6, 20)
    retry_logs = [r for r in caplog.records if r.name == "tinyllm" and "retrying" in r.getMessage()]
    assert [r.levelno for r in retry_logs] == [logging.INFO, logging.INFO]
    first = retry_logs[0].getMessage()
    assert "attempt 1 of 5" in first
    assert "503" in first and "overloaded" in first  # the reason
    assert "0.25 s" in first  # the wait
    assert "attempt 1 of 5" in retry_logs[1].getMessage()
    assert "could not reach" in retry_logs[1].getMessage()


def test_params_are_the_same_on_every_attempt(api, sleeps):
    params = {"temperature": 0.3, "max_tokens": 20, "top_k": 5, "seed": 7}
    original = dict(params)
    messages = [dict(m) for m in MESSAGES]
    api.enqueue(Status(500), Drop(), Status(502), Reply("finally"))
    assert tinyllm.get_client().send_message(messages, **params)["content"] == "finally"
    bodies = [r.json for r in api.chat_requests()]
    assert len(bodies) == 4
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0]["top_k"] == 5 and bodies[0]["seed"] == 7 and bodies[0]["temperature"] == 0.3
    assert params == original
    assert messages == MESSAGES


# --------------------------------------------------------------------------- cache


@pytest.fixture
def cached_api(api, tmp_path):
    path = tmp_path / "c.pickle"
    tinyllm.configure(cache_api_calls=True, cache_file_name=str(path))
    return api, path


def test_repeated_call_is_served_from_cache(cached_api):
    api, _ = cached_api
    first = send(temperature=0)
    second = send(temperature=0)
    assert first == second == {"role": "assistant", "content": "echo: hello"}
    assert chat_count(api) == 1
    stats = tinyllm.usage_stats()
    assert stats["cached_calls"] == 1
    assert stats["calls"] == 2
    second["content"] = "changed by the caller"
    assert send(temperature=0)["content"] == "echo: hello"  # the cache hands out copies
    assert chat_count(api) == 1


def test_failed_call_is_not_cached(cached_api, sleeps):
    api, path = cached_api
    tinyllm.configure(max_attempts=2)
    api.enqueue(Status(400))
    with pytest.raises(BadRequestError):
        send()
    api.enqueue(Status(503), Status(503))
    with pytest.raises(ServerError):
        send()
    api.enqueue(Malformed(), Malformed())
    with pytest.raises(ResponseError):
        send()
    assert chat_count(api) == 5
    assert tinyllm.cache.active_cache().len() == 0
    assert send()["content"] == "echo: hello"  # sent again, and now stored
    assert chat_count(api) == 6
    assert send()["content"] == "echo: hello"
    assert chat_count(api) == 6
    assert tinyllm.usage_stats()["cached_calls"] == 1


def test_cache_key_depends_on_what_changes_the_reply(cached_api):
    api, _ = cached_api
    send(temperature=0)
    send(temperature=0.5)
    assert chat_count(api) == 2  # a different temperature misses
    send(temperature=0, model="gpt-4o")
    assert chat_count(api) == 3  # a different model misses
    tinyllm.get_client().send_message(MESSAGES + [{"role": "user", "content": "more"}], temperature=0)
    assert chat_count(api) == 4  # different messages miss
    tinyllm.configure(timeout=12.5)
    send(temperature=0)
    assert chat_count(api) == 4  # a different TIMEOUT still hits
    send(temperature=0, timeout=3)
    assert chat_count(api) == 4  # so does a timeout given as a parameter
    assert tinyllm.usage_stats()["cached_calls"] == 2


def test_api_key_never_written_to_cache_file(cached_api, monkeypatch):
    api, path = cached_api
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    send()
    assert api.chat_requests()[0].headers["authorization"] == f"Bearer {SECRET}"
    data = path.read_bytes()
    assert len(data) > 16
    assert SECRET.encode() not in data
    assert b"XYZ123456789" not in data


def test_cache_survives_a_new_process(cached_api):
    api, path = cached_api
    send(temperature=0)
    assert chat_count(api) == 1
    code = f"""
import tinyllm
tinyllm.configure(api_type="openai", base_url={api.base_url!r}, cache_api_calls=True, cache_file_name={str(path)!r})
reply = tinyllm.get_client().send_message({MESSAGES!r}, temperature=0)
assert reply == {{"role": "assistant", "content": "echo: hello"}}, reply
assert tinyllm.usage_stats()["cached_calls"] == 1, tinyllm.usage_stats()
print("CHILD-OK")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYLLM_", "OPENAI_", "AZURE_OPENAI"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=path.parent, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "CHILD-OK" in done.stdout
    assert chat_count(api) == 1


# --------------------------------------------------------------------------- secrets


def test_api_key_never_in_errors_reprs_or_logs(api, sleeps, caplog, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # the root logger: tinyllm, openai, httpx, httpcore
    echo = {
        "error": {
            "message": f"Incorrect API key provided: {SECRET}",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    overloaded = {
        "error": {
            "message": f"overloaded for key {SECRET} (Bearer {SECRET})",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    api.enqueue(Status(503, body=overloaded), Status(401, body=echo))
    with pytest.raises(AuthenticationError) as info:
        send()
    exc = info.value
    assert chat_count(api) == 2
    assert api.chat_requests()[0].headers["authorization"] == f"Bearer {SECRET}"  # the key was really used
    assert exc.status_code == 401
    assert "Incorrect API key provided" in str(exc)
    for text in (str(exc), repr(exc), repr(exc.body), repr(exc.args), repr(exc.response_headers)):
        assert SECRET not in text
        assert "XYZ123456789" not in text
    for text in (repr(tinyllm.get_client()), repr(tinyllm.get_config()), str(tinyllm.get_config().as_dict())):
        assert SECRET not in text
    assert any(r.name == "tinyllm" and r.levelno == logging.INFO for r in caplog.records)  # the retry was logged
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # DEBUG records were captured too
    for record in caplog.records:
        assert SECRET not in record.getMessage(), (record.name, record.getMessage())
    assert SECRET not in caplog.text


def test_key_shaped_strings_are_redacted_from_errors(api, sleeps, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    other = "sk-proj-someoneelse0123456789"
    body = {
        "error": {
            "message": f"key {other} is not valid here; got header Bearer {other}",
            "type": "x",
            "param": None,
            "code": None,
        }
    }
    api.enqueue(Status(403, body=body))
    with pytest.raises(PermissionDeniedError) as info:
        send()
    for text in (str(info.value), repr(info.value), repr(info.value.body)):
        assert other not in text
    assert "is not valid here" in str(info.value)


def test_key_in_an_unusable_reply_is_redacted(api, sleeps, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    text = f"proxy error: Authorization: Bearer {SECRET}"
    api.enqueue(*[Status(200, body=text, headers={"Content-Type": "text/plain"})] * 2)
    with pytest.raises(tinyllm.ResponseError) as info:
        send()
    assert "proxy error" in str(info.value)
    for shown in (str(info.value), repr(info.value), repr(info.value.raw)):
        assert SECRET not in shown


def test_api_key_not_in_connection_error(api, sleeps, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    tinyllm.configure(max_attempts=1)
    api.enqueue(Drop())
    with pytest.raises(APIConnectionError) as info:
        send()
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


# --------------------------------------------------------------------------- async


def test_async_send_message_retries_like_sync(api):
    tinyllm.configure(waiting_time=0.001)
    api.enqueue(Status(503), Reply("async ok"))
    reply = asyncio.run(tinyllm.get_client().asend_message(MESSAGES))
    assert reply["content"] == "async ok"
    assert chat_count(api) == 2
    assert tinyllm.usage_stats()["retries"] == 1
    assert api.chat_requests()[0].headers["x-stainless-async"].startswith("async")
    # a second event loop gets a working client too
    assert asyncio.run(tinyllm.get_client().asend_message(MESSAGES, temperature=1))["content"] == "echo: hello"
    assert chat_count(api) == 3


def test_async_bad_request_is_sent_once(api):
    api.enqueue(Status(400), Reply("never sent"))
    with pytest.raises(BadRequestError) as info:
        asyncio.run(tinyllm.get_client().asend_message(MESSAGES))
    assert chat_count(api) == 1
    assert info.value.status_code == 400
    assert info.value.request_id == "req_1"
    assert isinstance(info.value.__cause__, openai.BadRequestError)


def test_async_retry_after_is_a_real_wait(api):
    tinyllm.configure(waiting_time=0)
    api.enqueue(Status(429, headers={"Retry-After": "0.2"}), Reply("later"))
    assert asyncio.run(tinyllm.get_client().asend_message(MESSAGES))["content"] == "later"
    first, second = api.chat_requests()
    assert second.time - first.time >= 0.2


def test_async_gives_up_after_max_attempts(api):
    tinyllm.configure(max_attempts=3, waiting_time=0.001)
    api.enqueue(Status(502), Status(502), Status(502), Reply("too late"))
    with pytest.raises(ServerError) as info:
        asyncio.run(tinyllm.get_client().asend_message(MESSAGES))
    assert chat_count(api) == 3
    assert info.value.request_id == "req_3"


def test_async_uses_the_cache(cached_api):
    api, _ = cached_api
    assert asyncio.run(tinyllm.get_client().asend_message(MESSAGES))["content"] == "echo: hello"
    assert asyncio.run(tinyllm.get_client().asend_message(MESSAGES))["content"] == "echo: hello"
    assert send()["content"] == "echo: hello"
    assert chat_count(api) == 1
    assert tinyllm.usage_stats()["cached_calls"] == 2


# -- regressions from review ----------------------------------------------------------------


def test_unparseable_reply_is_not_cached_so_a_rerun_asks_again(api, tmp_path):
    tinyllm.configure(cache_api_calls=True, cache_file_name=str(tmp_path / "c.pickle"))
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "label.system.md").write_text(
        "---\noutput_type: [positive, negative]\n---\nLabel: {{ text }}"
    )
    call = tinyllm.LLMCall("label.system.md")
    api.enqueue(Reply("I am not sure"))
    with pytest.raises(tinyllm.OutputParseError):
        call.call(text="x")
    api.enqueue(Reply("Positive."))
    assert call.call(text="x") == "positive"  # sent again, not the bad reply from the cache
    assert chat_count(api) == 2
    assert call.call(text="x") == "positive"  # the good one was cached
    assert chat_count(api) == 2


def test_cache_file_that_cannot_be_opened_is_a_config_error(api, tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    tinyllm.configure(cache_api_calls=True, cache_file_name=str(tmp_path / "afile" / "c.pickle"))
    with pytest.raises(tinyllm.ConfigError, match="cache file"):
        send()
    assert chat_count(api) == 0


def test_failed_cache_write_still_returns_the_paid_reply(api, tmp_path, monkeypatch, caplog):
    from tinyllm.cache._store import PickleCache

    tinyllm.configure(cache_api_calls=True, cache_file_name=str(tmp_path / "c.pickle"))

    def disk_full(self, key, value):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PickleCache, "set", disk_full)
    with caplog.at_level(logging.WARNING, logger="tinyllm"):
        message = send()
    assert message["content"].startswith("echo:")
    assert chat_count(api) == 1
    assert any("No space left" in r.getMessage() for r in caplog.records)


def test_timeout_given_per_call_wins_over_config(api):
    from fakeserver import Delay

    tinyllm.configure(max_attempts=1, timeout=60)
    api.enqueue(Delay(3))
    started = time.monotonic()
    with pytest.raises(APITimeoutError, match="0.3 s"):
        send(timeout=0.3)
    assert time.monotonic() - started < 2.5


def test_request_that_cannot_be_encoded_is_a_bad_request_and_never_sent(api):
    with pytest.raises(BadRequestError, match="cannot send"):
        send(temperature=object())
    assert chat_count(api) == 0 and tinyllm.usage_stats()["retries"] == 0


def test_model_must_be_a_string(api):
    with pytest.raises(BadRequestError, match="model"):
        send(model=123)
    assert chat_count(api) == 0


def test_endpoints_are_not_redacted_from_errors(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    tinyllm.configure(api_type="openai", max_attempts=1)
    with pytest.raises(APIConnectionError) as err:
        send()
    assert "http://127.0.0.1:9/v1" in str(err.value)


def test_embeddings_accept_any_iterable(api):
    vectors = tinyllm.get_client().get_embeddings(t for t in ["a", "b"])
    assert len(vectors) == 2 and vectors[0] != vectors[1]
    with pytest.raises(BadRequestError):
        tinyllm.get_client().get_embeddings(None)


def test_credentials_in_the_base_url_stay_out_of_errors(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://bob:hunter2@127.0.0.1:9/v1?key=qsecret")
    tinyllm.configure(api_type="openai", max_attempts=1)
    with pytest.raises(APIConnectionError) as err:
        send()
    assert "hunter2" not in str(err.value) and "qsecret" not in str(err.value)
    assert "127.0.0.1:9/v1" in str(err.value)


# --------------------------------------------------------------------------- keys echoed by the server


def _everything_shown(exc: BaseException) -> str:
    """What a traceback, a log record and the reprs of the whole exception chain show."""
    shown = ["".join(traceback.format_exception(exc))]
    cause = exc
    while cause is not None:
        shown += [
            repr(cause),
            str(cause),
            repr(getattr(cause, "body", None)),
            repr(getattr(cause, "response_headers", None)),
        ]
        for name in ("response", "request"):
            obj = getattr(cause, name, None)
            if obj is not None:
                shown += [repr(obj), repr(obj.headers), str(dict(obj.headers))]
                if name == "response":
                    shown.append(obj.text)
        cause = cause.__cause__ or cause.__context__
    return "\n".join(shown)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_key_the_server_echoes_is_nowhere_in_the_exception_chain(api, mode, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    api.enqueue(EchoKey(401))
    with pytest.raises(AuthenticationError) as info:
        if mode == "sync":
            send()
        else:
            asyncio.run(tinyllm.get_client().asend_message(MESSAGES))
    exc = info.value
    assert api.chat_requests()[0].headers["authorization"] == f"Bearer {SECRET}"
    assert isinstance(exc.__cause__, openai.AuthenticationError)  # still chained to the SDK's exception
    assert "x-echoed-key" in exc.response_headers  # the header is kept, its value scrubbed
    shown = _everything_shown(exc)
    assert "Incorrect API key provided" in shown and "AuthenticationError" in shown
    assert SECRET not in shown and "XYZ123456789" not in shown
    caplog.set_level(logging.DEBUG)
    try:
        raise exc
    except AuthenticationError:
        logging.getLogger("an.app").exception("the call failed")
    assert "Traceback" in caplog.text and "Incorrect API key provided" in caplog.text
    assert SECRET not in caplog.text


def test_azure_key_the_server_echoes_is_nowhere_in_the_exception_chain(server, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.azure_endpoint)
    monkeypatch.setenv("AZURE_OPENAI_KEY", SECRET)
    tinyllm.configure(api_type="azure", max_attempts=1)
    server.enqueue(EchoKey(403))
    with pytest.raises(tinyllm.PermissionDeniedError) as info:
        send()
    assert server.chat_requests()[0].headers["api-key"] == SECRET
    assert SECRET not in _everything_shown(info.value)


def test_a_key_in_a_timed_out_request_is_nowhere_in_the_exception_chain(api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    tinyllm.configure(timeout=0.2, max_attempts=1)
    api.enqueue(Hang(5))
    with pytest.raises(APITimeoutError) as info:
        send()
    assert SECRET not in _everything_shown(info.value)


def test_debug_output_of_the_command_shows_no_echoed_key(api, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from tinyllm.cli import cli

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "hi.system.md").write_text("Say hi to {{ name }}.\n", encoding="utf-8")
    api.enqueue(EchoKey(401))
    result = CliRunner().invoke(cli, ["--debug", "call", "hi", "--var", "name=Ada"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "Incorrect API key provided" in result.stderr
    assert SECRET not in result.output and SECRET not in result.stderr


@pytest.mark.parametrize("where", ["param", "extra_body"])
def test_api_key_as_a_call_parameter_is_refused_and_never_sent(api, where):
    params = {"api_key": SECRET} if where == "param" else {"extra_body": {"api_key": SECRET}}
    with pytest.raises(BadRequestError) as info:
        send(**params)
    assert "client setting" in str(info.value) and "OPENAI_API_KEY" in str(info.value)
    assert SECRET not in _everything_shown(info.value)
    assert chat_count(api) == 0


def test_api_key_given_to_llmcall_is_refused_before_sending(api, tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "hi.system.md").write_text("Say hi.\n", encoding="utf-8")
    with pytest.raises(tinyllm.ConfigError, match="client setting") as info:  # at construction, before any call
        tinyllm.LLMCall("hi.system.md", api_key=SECRET)
    assert SECRET not in str(info.value)
    assert chat_count(api) == 0


# --------------------------------------------------------------------------- stream=True is not a parameter (stream_request / LLMCall.stream)


@pytest.mark.parametrize("params", [{"stream": True}, {"extra_body": {"stream": True}}])
def test_stream_true_is_refused_before_sending(api, params):
    with pytest.raises(BadRequestError, match="stream"):
        send(**params)
    with pytest.raises(BadRequestError, match="stream"):
        asyncio.run(tinyllm.get_client().asend_message(MESSAGES, **params))
    assert chat_count(api) == 0
    assert send(stream=False)["content"] == "echo: hello"  # False is harmless


# --------------------------------------------------------------------------- TIMEOUT bounds the whole attempt


@pytest.mark.parametrize(
    "mode,headers",
    [
        ("sync", False),
        ("async", True),
        pytest.param("async", False, marks=pytest.mark.slow),
        pytest.param("sync", True, marks=pytest.mark.slow),
    ],
    ids=["sync-body-drip", "async-header-drip", "async-body-drip", "sync-header-drip"],
)
def test_timeout_bounds_the_whole_attempt_against_a_drip(api, mode, headers):
    # one byte every 100 ms: no single read ever waits TIMEOUT, yet the whole reply would take ~30 s
    tinyllm.configure(timeout=1, max_attempts=1)
    api.enqueue(Drip(0.1, headers=headers))
    started = time.monotonic()
    with pytest.raises(APITimeoutError) as info:
        if mode == "sync":
            send()
        else:
            asyncio.run(tinyllm.get_client().asend_message(MESSAGES))
    assert time.monotonic() - started < 5  # a behaviour bound (about 1 s), not a benchmark
    assert isinstance(info.value.__cause__, openai.APITimeoutError)
    assert chat_count(api) == 1


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_each_attempt_gets_its_own_timeout(api, sleeps):
    tinyllm.configure(timeout=0.5, max_attempts=3)
    api.enqueue(Drip(0.05), Drip(0.05, headers=True), Reply("third time"))
    assert send()["content"] == "third time"
    assert chat_count(api) == 3
    assert tinyllm.usage_stats()["retries"] == 2


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_a_slow_reply_within_timeout_is_read_whole(api):
    tinyllm.configure(timeout=10, max_attempts=1)
    api.enqueue(Drip(0.001, then=Reply("slow but in time")))
    assert send()["content"] == "slow but in time"


@pytest.mark.parametrize(
    "code,cls",
    [
        (408, "APIStatusError"),
        (409, "ConflictError"),
        (422, "UnprocessableEntityError"),
        (418, "BadRequestError"),
        (503, "ServerError"),
    ],
)
def test_status_codes_map_to_openai_python_names(api, sleeps, code, cls):
    tinyllm.configure(max_attempts=1)
    api.enqueue(Status(code))
    with pytest.raises(tinyllm.APIStatusError) as info:
        send()
    assert type(info.value).__name__ == cls and info.value.status_code == code
    assert not isinstance(info.value, tinyllm.ServerError) or code >= 500  # 408/409 are not server errors


# --------------------------------------------------------------------------- a proxy from the environment


def _proxy_env(monkeypatch, proxy: str, no_proxy: str | None = None) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    if no_proxy is not None:
        monkeypatch.setenv("NO_PROXY", no_proxy)


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_a_proxy_from_the_environment_is_used_with_the_deadline_and_the_scrubbing(server, monkeypatch, mode):
    """HTTP_PROXY is honoured as the SDK honours it (httpx ignores the environment once it is given a
    transport), and requests through the proxy still get the whole-attempt TIMEOUT and key scrubbing.
    The fake server is the proxy: it answers the absolute-form requests a proxy gets."""
    _proxy_env(monkeypatch, server.base_url.rsplit("/v1", 1)[0])
    upstream = tinyllm.OpenAIClient(base_url="http://upstream.invalid/v1", api_key=SECRET, max_attempts=1, timeout=0.5)

    def ask() -> dict:
        if mode == "sync":
            return upstream.send_message(MESSAGES)
        return asyncio.run(upstream.asend_message(MESSAGES))

    assert ask()["content"] == "echo: hello"  # upstream.invalid does not resolve: only the proxy can answer
    server.enqueue(EchoKey(401))
    with pytest.raises(AuthenticationError) as info:
        ask()
    assert SECRET not in _everything_shown(info.value)
    server.enqueue(Drip(0.1))
    started = time.monotonic()
    with pytest.raises(APITimeoutError):
        ask()
    assert time.monotonic() - started < 5  # a behaviour bound (about 0.5 s), not a benchmark
    assert len(server.chat_requests()) == 3


def test_no_proxy_sends_directly(server, monkeypatch):
    _proxy_env(monkeypatch, "http://127.0.0.1:9", no_proxy="127.0.0.1")  # nothing listens on port 9
    direct = tinyllm.OpenAIClient(base_url=server.base_url, max_attempts=1, timeout=5)
    assert direct.send_message(MESSAGES)["content"] == "echo: hello"


def test_a_proxy_that_cannot_be_used_is_a_config_error_naming_it(server, monkeypatch):
    _proxy_env(monkeypatch, "gopher://user:hunter2@127.0.0.1:70")  # a scheme httpx has no transport for
    client = tinyllm.OpenAIClient(base_url=server.base_url, max_attempts=3, timeout=5)
    with pytest.raises(tinyllm.ConfigError, match="proxy") as info:
        client.send_message(MESSAGES)
    assert "gopher://" in str(info.value) and "hunter2" not in str(info.value)
    assert chat_count(server) == 0
