"""Redis cache defects found under attack (issue 20): an entry that is valid JSON of the wrong shape
(or JSON nested too deep to read) is a logged miss, never a crash, and the call is sent again."""

from __future__ import annotations

import json
import logging

import pytest
import redis
from fakeserver import Reply
from helpers import start_redis, wire

import tinyllm

PREFIX = "tinyllm-shapes"
KEY = "sk-redis-shapes-0123456789ab"


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory):
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    yield port
    proc.kill()
    proc.wait(5)


@pytest.fixture
def raw(redis_port):
    r = redis.Redis(port=redis_port)
    for name in r.scan_iter(match=PREFIX + ":*"):
        r.unlink(name)
    yield r
    r.close()


@pytest.fixture
def wired(server, monkeypatch, redis_port, raw):
    wire(server, monkeypatch, KEY)
    tinyllm.configure(
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        redis_prefix=PREFIX,
        cache_api_calls=True,
        cache_backend="redis",
        limits_backend="local",
    )
    return server


def entries(raw) -> list[bytes]:
    return [k for k in raw.scan_iter(match=f"{PREFIX}:cache:v1:e:*")]


MESSAGES = [{"role": "user", "content": "capital of France?"}]


@pytest.mark.parametrize(
    "bad",
    [
        json.dumps({"message": 5}),
        json.dumps([1, 2, 3]),
        json.dumps("just text"),
        json.dumps({"message": {"role": "assistant", "content": "cached"}, "usage": "zzz"}),
        json.dumps({"message": {"role": "assistant", "content": "cached"}, "usage": {"prompt_tokens": "many"}}),
        json.dumps({"message": {"role": "assistant", "content": {"an": "object"}}}),
        json.dumps({"message": {"role": "assistant", "content": "x", "tool_calls": "nope"}}),
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=[
        "message-5",
        "a-list",
        "a-string",
        "usage-zzz",
        "usage-count-text",
        "content-object",
        "tool-calls-text",
        "deep-nesting",
    ],
)
@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_an_entry_of_the_wrong_shape_is_a_logged_miss(wired, raw, caplog, bad):
    client = tinyllm.get_client()
    wired.enqueue(Reply("Paris."))
    assert client.send_message(MESSAGES)["content"] == "Paris."
    (key,) = entries(raw)
    raw.set(key, bad)
    wired.enqueue(Reply("Paris, again."))
    with caplog.at_level(logging.WARNING, logger="tinyllm"):
        reply = client.request(MESSAGES)
    assert reply.message["content"] == "Paris, again." and reply.cached is False
    assert len(wired.chat_requests()) == 2
    assert "treated as a miss" in caplog.text
    assert json.loads(raw.get(key))["message"]["content"] == "Paris, again."  # stored anew
    assert client.request(MESSAGES).cached is True


def test_a_streamed_call_treats_a_bad_entry_as_a_miss_too(wired, raw):
    client = tinyllm.get_client()
    wired.enqueue(Reply("Paris."))
    client.send_message(MESSAGES)
    (key,) = entries(raw)
    raw.set(key, json.dumps({"message": {"role": "assistant", "content": {"an": "object"}}}))
    stream = client.stream_request(MESSAGES)
    assert "".join(stream) == "echo: capital of France?" and stream.reply.cached is False


def test_an_embedding_entry_of_the_wrong_shape_is_a_logged_miss(wired, raw, caplog):
    client = tinyllm.get_client()
    first = client.get_embedding("hello")
    (key,) = entries(raw)
    raw.set(key, json.dumps({"vector": "nope"}))
    with caplog.at_level(logging.WARNING, logger="tinyllm"):
        assert client.get_embedding("hello") == first
    assert "not a stored embedding" in caplog.text and len(wired.embedding_requests()) == 2
