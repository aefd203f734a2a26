"""Benchmark: what tinyllm adds to one chat request, next to the raw openai SDK.

Run from a checkout: ``python bench/overhead.py`` (``--rounds 500`` for a quicker run).
Prints a Markdown table. Nothing here is asserted; numbers depend on the machine.

The same chat request (a system and a user message, model gpt-4o-mini) goes,
sequentially, to the loopback server of ``tests/fakeserver.py`` (no latency, a
fixed two-word answer) through

- ``openai`` raw: ``openai.OpenAI(base_url=..., api_key=..., max_retries=0).chat.completions.create``;
- ``get_client().send_message``: tinyllm's pipeline (config, parameters, token count,
  context-window check, queue slot, retry loop, usage), cache off. It sends the
  request through the same SDK client's ``post("/chat/completions", ...)``, which
  skips ``create``'s parameter transform and the pydantic reply model;
- ``LLMCall.call``: the above plus finding and rendering the prompt templates;
- ``LLMCall.call`` through httpx's own transport instead of tinyllm's (whose
  whole-attempt deadline and key scrubbing cost a few µs per request).

Each round runs the paths once, in a rotating order (so drift and noise hit all of
them alike), for ``--rounds`` rounds after ``--warmup`` rounds. The table shows
the median and the 10th/90th percentiles of one call in µs, and the median's
overhead over the raw SDK in % and µs. ``--server process`` runs the server in a
child process (default: in this process, as the tests do).

A second table shows tinyllm's own CPU time per call with the network taken out:
the SDK client's ``post`` is replaced by a function that returns a ready reply,
and each path runs ``--stub-calls`` times in a tight loop (best of 5). It is much
steadier than the first table on a busy machine, but lower: in the real run the
code runs with caches cooled by the SDK and the socket calls.

The second table has a row with the call log on (``LOG_CALLS=true``, a fresh SQLite
file): the calling thread only queues each finished call, a background thread writes
the rows. A third table gives the calling thread's own CPU time per call
(``time.thread_time``) with the log off and on, and their difference: what logging
costs the caller (target: under 50 µs). The writer thread's work is not in it (it runs
on the other core, or between the caller's steps), but it is in the wall-clock row.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("tinyllm") is None:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from throughput import start_server, write_prompt  # noqa: E402  (the loopback server helpers)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000, help="measured rounds (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="rounds before measuring (default 200)")
    parser.add_argument(
        "--server",
        choices=("inproc", "process"),
        default="inproc",
        help="run the fake server in this process (default) or in a child process",
    )
    parser.add_argument("--stub-calls", type=int, default=5000, help="calls per path in the no-network table (0: skip)")
    args = parser.parse_args()

    import openai

    import tinyllm
    from tinyllm import LLMCall, configure, force_api_cache, get_client

    server = start_server(args.server, latency=0.0, reply="ok then")
    workdir = tempfile.mkdtemp(prefix="tinyllm-bench-")
    os.chdir(workdir)  # no stray config.ini / .env
    write_prompt(os.path.join(workdir, "prompts"))
    force_api_cache(False)
    configure(api_type="openai", base_url=server.base_url)

    call = LLMCall("bench.system.md")
    messages = call.render(n=1)
    model = tinyllm.get_config().model
    raw = openai.OpenAI(base_url=server.base_url, api_key="no-key", max_retries=0)
    sender = get_client()

    def run_raw() -> str:
        return raw.chat.completions.create(model=model, messages=messages).choices[0].message.content

    def run_send() -> str:
        return sender.send_message(messages)["content"]

    def run_call() -> str:
        return call.call(n=1)

    variants = [
        ("openai SDK, raw", run_raw),
        ("tinyllm get_client().send_message", run_send),
        ("tinyllm LLMCall.call", run_call),
    ]
    plain = plain_transport_call(server.base_url)
    if plain is not None:
        variants.append(
            ("tinyllm LLMCall.call, httpx's own transport (no whole-attempt TIMEOUT)", lambda: plain.call(n=1))
        )
    for _, fn in variants:
        assert fn() == "ok then"
    samples: dict[str, list[float]] = {name: [] for name, _ in variants}
    clock = time.perf_counter_ns
    gc.collect()
    for r in range(args.warmup + args.rounds):
        k = r % len(variants)
        for name, fn in variants[k:] + variants[:k]:
            t = clock()
            fn()
            elapsed = clock() - t
            if r >= args.warmup:
                samples[name].append(elapsed / 1000)
    stub_rows = stub_costs(sender, call, messages, model, args.stub_calls) if args.stub_calls else []
    log_rows = log_costs(sender, call, workdir, args.stub_calls) if args.stub_calls else []
    server.stop()

    base = statistics.median(samples[variants[0][0]])
    print(f"### Overhead per call: {args.rounds} rounds (after {args.warmup} warm-up), server in {server.where}\n")
    print(
        f"Python {platform.python_version()}, openai {openai.__version__}, tinyllm {tinyllm.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.system()}\n"
    )
    print("| path | median (µs) | p10 (µs) | p90 (µs) | overhead vs raw SDK |")
    print("|---|---:|---:|---:|---:|")
    for name, _ in variants:
        values = samples[name]
        med = statistics.median(values)
        over = "—" if name == variants[0][0] else f"{(med / base - 1) * 100:+.1f}% ({med - base:+.0f} µs)"
        print(f"| {name} | {med:.0f} | {percentile(values, 0.1):.0f} | {percentile(values, 0.9):.0f} | {over} |")
    if stub_rows:
        print(f"\n#### tinyllm's own time per call, network taken out (best of 5 × {args.stub_calls} calls)\n")
        print("| path | µs per call |")
        print("|---|---:|")
        for name, us in stub_rows:
            print(f"| {name} | {us:.1f} |")
    if log_rows:
        print(f"\n#### The call log: the calling thread's CPU time per call (best of 5 × {args.stub_calls} calls)\n")
        print("| path | µs per call |")
        print("|---|---:|")
        for name, us in log_rows:
            print(f"| {name} | {us:.1f} |")


def plain_transport_call(base_url: str):
    """An LLMCall whose client sends through httpx's own transport instead of tinyllm's (which bounds
    each attempt by TIMEOUT and scrubs keys from error replies): what that transport costs per request.
    None with a tinyllm that has no such transport (an older checkout on PYTHONPATH)."""
    try:
        from tinyllm.clients.openai import OpenAIClient
        from tinyllm.http._transport import http_client  # noqa: F401  (present: the transport exists)
    except ImportError:
        return None
    import openai

    from tinyllm import LLMCall

    class PlainTransport(OpenAIClient):
        def _make_sdk(self, cfg, is_async):  # as OpenAIClient's, without http_client=
            cls = openai.AsyncOpenAI if is_async else openai.OpenAI
            return cls(api_key=self._api_key(cfg), base_url=self.base_url(cfg), max_retries=0, timeout=cfg.timeout)

    return LLMCall("bench.system.md", client=PlainTransport(base_url=base_url))


def stub_costs(sender, call, messages: list[dict], model: str, calls: int) -> list[tuple[str, float]]:
    """Per-call µs of each path with the SDK client's ``post`` returning a canned reply."""
    import timeit

    from tinyllm import get_config

    sdk = sender.sdk(get_config())
    canned = sdk.post("/chat/completions", cast_to=object, body={"model": model, "messages": messages})
    sdk.post = lambda path, **kwargs: canned
    try:
        paths = [
            ("tinyllm get_client().send_message", lambda: sender.send_message(messages)),
            ("tinyllm LLMCall.call", lambda: call.call(n=1)),
        ]
        out = [(name, min(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1e6) for name, fn in paths]
        with call_log_on():
            out.append(
                (
                    "tinyllm LLMCall.call, call log on (wall clock, writer thread included)",
                    min(timeit.repeat(lambda: call.call(n=1), number=calls, repeat=5)) / calls * 1e6,
                )
            )
        return out
    finally:
        del sdk.post  # back to the class's method


class call_log_on:
    """LOG_CALLS on, to a fresh file, while the block runs; every row written at its end."""

    def __enter__(self) -> None:
        from tinyllm import configure

        self.dir = tempfile.mkdtemp(prefix="tinyllm-bench-log-")
        configure(log_calls=True, log_db=os.path.join(self.dir, "calls.db"))

    def __exit__(self, *exc: object) -> None:
        from tinyllm import configure
        from tinyllm.observe import _calllog as calllog

        calllog.flush_all(120)
        configure(log_calls=None, log_db=None)


def log_costs(sender, call, workdir: str, calls: int) -> list[tuple[str, float]]:
    """The calling thread's CPU µs per ``LLMCall.call`` (network stubbed) with the call log off and on."""
    from tinyllm import get_config
    from tinyllm.observe import _calllog as calllog

    sdk = sender.sdk(get_config())
    canned = sdk.post(
        "/chat/completions", cast_to=object, body={"model": get_config().model, "messages": call.render(n=1)}
    )
    sdk.post = lambda path, **kwargs: canned

    def cpu_per_call(flush: bool) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.thread_time()
            for _ in range(calls):
                call.call(n=1)
            best = min(best, time.thread_time() - start)
            if flush:
                calllog.flush_all(120)  # the next round starts with an empty queue
        return best / calls * 1e6

    try:
        off = cpu_per_call(False)
        with call_log_on():
            on = cpu_per_call(True)
            written = sum(log.written for log in calllog._logs.values())
            dropped = sum(log.dropped for log in calllog._logs.values())
        return [
            ("LLMCall.call, log off", off),
            ("LLMCall.call, log on", on),
            (f"logging, per call (rows written {written}, dropped {dropped})", on - off),
        ]
    finally:
        del sdk.post


if __name__ == "__main__":
    main()
