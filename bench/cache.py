"""Benchmark: tinyllm's append-only PickleCache next to TinyTroupe's re-pickle-everything cache.

Run from a checkout: ``python bench/cache.py`` (``--sizes 1000,10000`` for a quicker run).
Prints a Markdown table. Nothing here is asserted; numbers depend on the machine.

For each size N it measures, with values shaped like a chat reply (a message dict of about 500 bytes):

- write all: N ``set`` calls one by one into an empty file (tinyllm: one appended record each,
  under the inter-process file lock; baseline: ``cache[key] = value`` then ``pickle.dump`` of the
  whole dict to the file, as TinyTroupe does);
- per write, last 100: mean cost of the last 100 of those writes, when the cache already holds N-100 entries;
- load: opening the file again in a fresh cache (median of 3);
- hit: median latency of ``get`` on a present key over 20,000 calls (includes ~0.05 µs of timer overhead).

The baseline's full write series is quadratic, so above 1,000 entries only its last 100 writes are run
(on a dict pre-filled in memory) and "write all" is estimated as N x (last-100 cost) / 2, marked "≈".
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("tinyllm") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyllm.cache._store import PickleCache, cache_key  # noqa: E402

WORDS = "the model replied with a short and polite answer about caching files on disk safely".split()


def entries(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        content = " ".join(rnd.choice(WORDS) for _ in range(70))[:400]
        messages = [{"role": "user", "content": f"question {i}"}]
        key = cache_key({"api_type": "openai"}, "gpt-4o-mini", messages, {"temperature": 0})
        out.append(
            (
                key,
                {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                    "audio": None,
                    "function_call": None,
                    "tool_calls": None,
                },
            )
        )
    return out


def median_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hit_median_us(get, keys: list[str], calls: int = 20_000) -> float:
    rnd = random.Random(1)
    sample = [rnd.choice(keys) for _ in range(calls)]
    clock = time.perf_counter_ns
    samples = []
    for key in sample:
        t = clock()
        get(key)
        samples.append(clock() - t)
    return statistics.median(samples) / 1000


def bench_tinyllm(folder: str, data: list[tuple[str, dict]]) -> dict:
    path = os.path.join(folder, f"tinyllm-{len(data)}.pickle")
    cache = PickleCache(path)
    head, tail = data[:-100], data[-100:]
    t = time.perf_counter()
    for key, value in head:
        cache.set(key, value)
    t_tail = time.perf_counter()
    for key, value in tail:
        cache.set(key, value)
    end = time.perf_counter()
    cache.close()
    load = median_of(lambda: PickleCache(path).close())
    fresh = PickleCache(path)
    assert len(fresh) == len(data)
    return {
        "write_all": f"{end - t:.2f}",
        "per_write": (end - t_tail) / len(tail) * 1e6,
        "load": load * 1e3,
        "hit": hit_median_us(fresh.get, [k for k, _ in data]),
        "mb": os.path.getsize(path) / 1e6,
    }


def bench_baseline(folder: str, data: list[tuple[str, dict]]) -> dict:
    path = os.path.join(folder, f"baseline-{len(data)}.pickle")

    def write(cache: dict, key: str, value: dict) -> None:  # TinyTroupe: re-pickle the whole dict each time
        cache[key] = value
        with open(path, "wb") as f:
            pickle.dump(cache, f)

    cache: dict = {}
    head, tail = data[:-100], data[-100:]
    full = len(data) <= 1000
    t = time.perf_counter()
    for key, value in head:
        if full:
            write(cache, key, value)
        else:
            cache[key] = value  # pre-filled in memory, not timed as writes
    t_tail = time.perf_counter()
    for key, value in tail:
        write(cache, key, value)
    end = time.perf_counter()
    per_write = (end - t_tail) / len(tail)
    write_all = f"{end - t:.2f}" if full else f"≈ {len(data) * per_write / 2:.0f}"

    def load() -> dict:
        with open(path, "rb") as f:
            return pickle.load(f)

    load_s = median_of(load)
    loaded = load()
    return {
        "write_all": write_all,
        "per_write": per_write * 1e6,
        "load": load_s * 1e3,
        "hit": hit_median_us(loaded.get, list(loaded)),
        "mb": os.path.getsize(path) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated entry counts")
    sizes = [int(s) for s in parser.parse_args().sizes.split(",")]
    print(f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| entries | cache | write all (s) | per write, last 100 (µs) | load (ms) | hit, median (µs) | file (MB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for n in sizes:
            data = entries(n)
            for name, bench in (
                ("tinyllm PickleCache", bench_tinyllm),
                ("re-pickle whole dict (TinyTroupe)", bench_baseline),
            ):
                r = bench(folder, data)
                print(
                    f"| {n:,} | {name} | {r['write_all']} | {r['per_write']:,.0f} | {r['load']:,.1f} | "
                    f"{r['hit']:.2f} | {r['mb']:.1f} |",
                    flush=True,
                )
    print(
        "\n≈: estimated from the last 100 writes (the baseline's full run is quadratic); "
        "tinyllm's hit returns a fresh copy of the value, the baseline's returns the stored dict itself."
    )


if __name__ == "__main__":
    main()
