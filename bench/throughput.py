"""Benchmark: how close tinyllm's request queue gets to ideal throughput.

Run from a checkout: ``python bench/throughput.py`` (``--calls 200`` for a quicker run).
Prints a Markdown table. Nothing here is asserted; numbers depend on the machine.

``--calls`` chat calls (default 1,000) go to the loopback server of ``tests/fakeserver.py``,
which answers every request after ``--latency`` seconds (default 0.1). For each
MAX_CONCURRENT_REQUESTS in ``--concurrency`` (default 5, 20, 50) the calls are made

- through ``LLMCall.map(inputs, max_workers=concurrency)`` (threads), and
- through ``asyncio.gather`` of ``LLMCall.acall`` (one event loop; QUEUE_SIZE is raised to
  ``calls`` so that every call can wait in line),

and the table shows the wall time next to the ideal ``calls * latency / concurrency``,
the % over ideal, and the peak of requests in flight as the server counted them
(it must never exceed the limit). For reference, the same calls also go through
the raw openai SDK with no tinyllm at all (a ``ThreadPoolExecutor`` of
``concurrency`` threads; ``AsyncOpenAI`` under an ``asyncio.Semaphore(concurrency)``),
which shows how close to ideal one Python process can get on this machine
(``--no-baseline`` skips them).

The fake server is a ``ThreadingHTTPServer`` written in Python. In the same process it
competes with the client for the GIL, so by default it runs in a child process
(``--server process``, started with multiprocessing) and the client process measures
only tinyllm; ``--server inproc`` keeps it in the benchmark's own process.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = str(ROOT / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
if importlib.util.find_spec("tinyllm") is None:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- #
# the loopback server, in this process or in a child process (same interface)
# --------------------------------------------------------------------------- #


def new_fake_server():
    """A started FakeOpenAIServer (TCP_NODELAY and a listen backlog of 128, as a real server has)."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    import fakeserver

    return fakeserver.FakeOpenAIServer().start()


def _serve(conn, latency: float, reply: str | None) -> None:
    """Child process: run a FakeOpenAIServer and answer commands sent over ``conn``."""
    server = new_fake_server()
    server.latency = latency
    server.reply_with(reply)
    conn.send(server.base_url)
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "latency":
                server.latency = arg
                conn.send(None)
            elif cmd == "reset":
                server.reset()
                conn.send(None)
            elif cmd == "stats":
                conn.send(_stats(server))
    finally:
        server.stop()
        conn.close()


def _stats(server) -> dict:
    requests = server.requests
    return {"requests": len(requests), "max_in_flight": server.max_in_flight, "errors": len(server.errors)}


class LocalServer:
    """The fake server in this process."""

    where = "this process"

    def __init__(self, latency: float = 0.0, reply: str | None = "ok") -> None:
        self._server = new_fake_server()
        self._server.latency = latency
        self._server.reply_with(reply)
        self.base_url = self._server.base_url

    def set_latency(self, seconds: float) -> None:
        self._server.latency = seconds

    def reset(self) -> None:
        self._server.reset()

    def stats(self) -> dict:
        return _stats(self._server)

    def stop(self) -> None:
        self._server.stop()


class ProcessServer:
    """The fake server in a child process (multiprocessing, spawn), driven over a pipe."""

    where = "a child process"

    def __init__(self, latency: float = 0.0, reply: str | None = "ok") -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, latency, reply), daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self.base_url = self._conn.recv()

    def _ask(self, cmd: str, arg=None):
        with self._lock:
            self._conn.send((cmd, arg))
            return self._conn.recv()

    def set_latency(self, seconds: float) -> None:
        self._ask("latency", seconds)

    def reset(self) -> None:
        self._ask("reset")

    def stats(self) -> dict:
        return self._ask("stats")

    def stop(self) -> None:
        with self._lock:
            self._conn.send(("stop", None))
        self._proc.join(10)


def start_server(kind: str, latency: float = 0.0, reply: str | None = "ok"):
    return ProcessServer(latency, reply) if kind == "process" else LocalServer(latency, reply)


def write_prompt(folder: str) -> None:
    """A ``bench`` prompt pair in ``folder``: a short system line and a one-line user template."""
    os.makedirs(folder, exist_ok=True)
    Path(folder, "bench.system.md").write_text("You are a terse assistant. Answer in one word.\n", encoding="utf-8")
    Path(folder, "bench.user.md").write_text("Item {{ n }}: say ok.\n", encoding="utf-8")


# --------------------------------------------------------------------------- #
# the benchmark
# --------------------------------------------------------------------------- #


def run_map(call, calls: int, concurrency: int) -> tuple[float, int]:
    inputs = [{"n": i} for i in range(calls)]
    started = time.perf_counter()
    results = call.map(inputs, max_workers=concurrency, progress=False, return_exceptions=True)
    wall = time.perf_counter() - started
    return wall, sum(isinstance(r, Exception) for r in results)


def run_gather(call, calls: int, concurrency: int) -> tuple[float, int]:
    async def main():
        return await asyncio.gather(*(call.acall(n=i) for i in range(calls)), return_exceptions=True)

    started = time.perf_counter()
    results = asyncio.run(main())
    wall = time.perf_counter() - started
    return wall, sum(isinstance(r, BaseException) for r in results)


def run_raw_threads(sdk, calls: int, concurrency: int) -> tuple[float, int]:
    import concurrent.futures

    def one(i: int):
        return sdk.chat.completions.create(model="gpt-4o-mini", messages=_raw_messages(i))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, i) for i in range(calls)]
        failures = sum(f.exception() is not None for f in futures)
    return time.perf_counter() - started, failures


def run_raw_async(base_url: str, calls: int, concurrency: int) -> tuple[float, int]:
    import openai

    async def main():
        sdk = openai.AsyncOpenAI(base_url=base_url, api_key="no-key", max_retries=0)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int):
            async with gate:
                return await sdk.chat.completions.create(model="gpt-4o-mini", messages=_raw_messages(i))

        try:
            return await asyncio.gather(*(one(i) for i in range(calls)), return_exceptions=True)
        finally:
            await sdk.close()

    started = time.perf_counter()
    results = asyncio.run(main())
    return time.perf_counter() - started, sum(isinstance(r, BaseException) for r in results)


def _raw_messages(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "You are a terse assistant. Answer in one word."},
        {"role": "user", "content": f"Item {i}: say ok."},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per row (default 1000)")
    parser.add_argument("--latency", type=float, default=0.1, help="server latency per request, seconds (default 0.1)")
    parser.add_argument("--concurrency", default="5,20,50", help="MAX_CONCURRENT_REQUESTS values (default 5,20,50)")
    parser.add_argument(
        "--server",
        choices=("process", "inproc"),
        default="process",
        help="run the fake server in a child process (default) or in this process",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the raw openai SDK rows")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    import tinyllm
    from tinyllm import LLMCall, configure, force_api_cache

    server = start_server(args.server, latency=args.latency)
    workdir = tempfile.mkdtemp(prefix="tinyllm-bench-")
    os.chdir(workdir)  # no stray config.ini / .env
    write_prompt(os.path.join(workdir, "prompts"))
    force_api_cache(False)
    configure(
        api_type="openai", base_url=server.base_url, queue_size=max(args.calls, 100), queue_timeout=0, max_attempts=1
    )
    call = LLMCall("bench.system.md")
    # warm-up: token encoding, templates, both SDK clients
    call.call(n=-1)
    asyncio.run(call.acall(n=-1))

    import openai

    raw = openai.OpenAI(base_url=server.base_url, api_key="no-key", max_retries=0)
    runners = [
        ("tinyllm `map` (threads)", lambda n, c: run_map(call, n, c)),
        ("tinyllm `acall` + gather", lambda n, c: run_gather(call, n, c)),
    ]
    if not args.no_baseline:
        runners += [
            ("raw SDK, thread pool", lambda n, c: run_raw_threads(raw, n, c)),
            ("raw SDK, AsyncOpenAI + semaphore", lambda n, c: run_raw_async(server.base_url, n, c)),
        ]
    rows = []
    for concurrency in levels:
        configure(max_concurrent_requests=concurrency)
        for label, runner in runners:
            server.reset()
            wall, failures = runner(args.calls, concurrency)
            stats = server.stats()
            ideal = args.calls * args.latency / concurrency
            rows.append((concurrency, label, wall, ideal, stats["max_in_flight"], stats["requests"], failures))
    server.stop()

    print(f"### Throughput: {args.calls} calls, server latency {args.latency:g} s, server in {server.where}\n")
    print(
        f"Python {platform.python_version()}, tinyllm {tinyllm.__version__}, {os.cpu_count()} CPUs, {platform.system()}\n"
    )
    print(
        "| MAX_CONCURRENT_REQUESTS | path | wall (s) | ideal (s) | over ideal | server max in flight | requests | failures |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for concurrency, label, wall, ideal, peak, requests, failures in rows:
        flag = "" if peak <= concurrency else " **over the limit**"
        print(
            f"| {concurrency} | {label} | {wall:.2f} | {ideal:.2f} | {(wall / ideal - 1) * 100:+.1f}% | {peak}{flag} | {requests} | {failures} |"
        )


if __name__ == "__main__":
    main()
