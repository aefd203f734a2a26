"""Throughput (issue 4): request queue, rate limits, acall, map, usage stats, lazy imports.

Everything runs against the real loopback server (``fakeserver``): the queue is
judged by what the server saw (``max_in_flight``, the requests it recorded),
never by tinyllm's own counters.  Time bounds are lower bounds only (the
machine may be slow, never faster than the limits allow).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fakeserver import Status
from helpers import wait_until

import tinyllm
from tinyllm import (
    AuthenticationError,
    BadRequestError,
    LLMCall,
    QueueFullError,
    get_client,
    configure,
    force_api_cache,
    reset_usage_stats,
    usage_stats,
)
from tinyllm.observe import _usage as usage_mod

LIMIT = 5
N = 200


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _last_user(req: dict) -> str:
    return next(m["content"] for m in reversed(req["messages"]) if m["role"] == "user")


def echo(req: dict) -> str:
    """The server's reply: the last user message, marked, after a short random pause.

    The pause (in the server's handler thread) makes calls finish out of order,
    so a result in the right place proves the ordering, not luck.
    """
    time.sleep(random.random() * 0.005)
    return "re: " + _last_user(req)


class Gate:
    """A reply function that holds every request in the server until ``open()``."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, req: dict) -> str:
        self.event.wait(30)
        return "re: " + _last_user(req)

    def open(self) -> None:
        self.event.set()


def _server_prompt_tokens(messages: list[dict]) -> int:
    # fakeserver's rule for usage.prompt_tokens (see fakeserver._chat)
    return sum(len(m.get("content") or "") for m in messages) // 4 + 1


def _server_completion_tokens(content: str) -> int:
    return len(content) // 4 + 1  # fakeserver._tokens


@pytest.fixture
def setup(server, tmp_path: Path):
    """The loopback server, configured as the openai backend, with an ``item`` prompt in ./prompts."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "item.system.md").write_text("You repeat the item.\n", encoding="utf-8")
    (prompts / "item.user.md").write_text("item {{ n }}\n", encoding="utf-8")
    configure(
        api_type="openai",
        base_url=server.base_url,
        max_concurrent_requests=LIMIT,
        queue_size=1000,
        queue_timeout=120,
        waiting_time=0.01,
        max_waiting_time=0.05,
    )
    server.reply_with(echo)
    reset_usage_stats()
    return server


def item_call() -> LLMCall:
    return LLMCall("item.system.md")


def user_of(record) -> str:
    return next(m["content"] for m in reversed(record.messages) if m["role"] == "user")


# --------------------------------------------------------------------------- #
# the request queue: concurrency
# --------------------------------------------------------------------------- #


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_map_with_200_threads_never_exceeds_the_limit(setup):
    setup.latency = 0.02
    results = item_call().map([{"n": i} for i in range(N)], max_workers=N, progress=False)
    assert results == [f"re: item {i}" for i in range(N)]
    assert len(setup.chat_requests()) == N
    assert setup.max_in_flight <= LIMIT
    assert setup.max_in_flight >= 2  # it did run concurrently
    assert setup.errors == []


@pytest.mark.slow  # the same rule as a quicker test in test_limits.py / test_throughput.py
def test_200_threads_over_send_message_never_exceed_the_limit(setup):
    setup.latency = 0.02
    sender = get_client()

    def one(i: int) -> str:
        return sender.send_message([{"role": "user", "content": f"q{i}"}])["content"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=N) as pool:
        results = list(pool.map(one, range(N)))
    assert results == [f"re: q{i}" for i in range(N)]
    assert len(setup.chat_requests()) == N
    assert 2 <= setup.max_in_flight <= LIMIT
    assert sender.queue.in_flight == 0 and sender.queue.waiting == 0


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_200_acall_tasks_never_exceed_the_limit(setup):
    setup.latency = 0.02
    call = item_call()

    async def main():
        return await asyncio.gather(*(call.acall(n=i) for i in range(N)))

    results = asyncio.run(main())
    assert results == [f"re: item {i}" for i in range(N)]
    assert len(setup.chat_requests()) == N
    assert 2 <= setup.max_in_flight <= LIMIT


@pytest.mark.slow  # the same rule as a quicker test in test_limits.py / test_throughput.py
def test_threads_and_tasks_share_one_limit(setup):
    setup.latency = 0.02
    call = item_call()
    from_threads: list = []
    worker = threading.Thread(
        target=lambda: from_threads.extend(call.map([{"n": i} for i in range(100)], max_workers=100, progress=False))
    )

    async def main():
        return await asyncio.gather(*(call.acall(n=i) for i in range(100, 200)))

    worker.start()
    try:
        from_tasks = asyncio.run(main())
    finally:
        worker.join(60)
    assert from_threads == [f"re: item {i}" for i in range(100)]
    assert from_tasks == [f"re: item {i}" for i in range(100, 200)]
    assert len(setup.chat_requests()) == 200
    assert 2 <= setup.max_in_flight <= LIMIT


def test_acall_works_in_successive_event_loops(setup):
    call = item_call()
    for round_ in range(3):  # each asyncio.run has its own loop; the SDK's pool must not leak across

        async def main():
            return await asyncio.gather(*(call.acall(n=i) for i in range(10)))

        assert asyncio.run(main()) == [f"re: item {i}" for i in range(10)], round_
    assert len(setup.chat_requests()) == 30


# --------------------------------------------------------------------------- #
# the request queue: capacity and timeout
# --------------------------------------------------------------------------- #


def test_queue_size_zero_refuses_at_once_and_sends_nothing(setup):
    configure(max_concurrent_requests=1, queue_size=0)
    gate = Gate()
    setup.reply_with(gate)
    sender = get_client()
    first = concurrent.futures.ThreadPoolExecutor(1)
    try:
        running = first.submit(sender.send_message, [{"role": "user", "content": "first"}])
        wait_until(lambda: setup.in_flight == 1)
        started = time.monotonic()
        with pytest.raises(QueueFullError, match="full"):
            sender.send_message([{"role": "user", "content": "second"}])
        assert time.monotonic() - started < 2  # refused at once, not after a wait
    finally:
        gate.open()
        first.shutdown(wait=True)
    assert running.result()["content"] == "re: first"
    assert [user_of(r) for r in setup.chat_requests()] == ["first"]
    assert sender.queue.in_flight == 0 and sender.queue.waiting == 0


def test_a_small_queue_refuses_the_request_that_does_not_fit(setup):
    configure(max_concurrent_requests=1, queue_size=2)
    gate = Gate()
    setup.reply_with(gate)
    sender = get_client()
    pool = concurrent.futures.ThreadPoolExecutor(3)
    try:
        running = [pool.submit(sender.send_message, [{"role": "user", "content": "first"}])]
        wait_until(lambda: setup.in_flight == 1)
        for waiting, name in enumerate(("second", "third"), 1):  # one at a time, so their order in line is known
            running.append(pool.submit(sender.send_message, [{"role": "user", "content": name}]))
            wait_until(lambda: sender.queue.waiting == waiting)
        with pytest.raises(QueueFullError):
            sender.send_message([{"role": "user", "content": "fourth"}])
        assert len(setup.requests) == 1  # the waiting ones are still waiting
    finally:
        gate.open()
        pool.shutdown(wait=True)
    assert [f.result()["content"] for f in running] == ["re: first", "re: second", "re: third"]
    assert [user_of(r) for r in setup.chat_requests()] == ["first", "second", "third"]  # FIFO; never "fourth"


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_queue_timeout_raises_and_the_request_is_never_sent(setup):
    configure(max_concurrent_requests=1, queue_timeout=0.3)
    gate = Gate()
    setup.reply_with(gate)
    sender = get_client()
    first = concurrent.futures.ThreadPoolExecutor(1)
    try:
        running = first.submit(sender.send_message, [{"role": "user", "content": "first"}])
        wait_until(lambda: setup.in_flight == 1)
        started = time.monotonic()
        with pytest.raises(QueueFullError, match="QUEUE_TIMEOUT"):
            sender.send_message([{"role": "user", "content": "late"}])
        assert time.monotonic() - started >= 0.25
    finally:
        gate.open()
        first.shutdown(wait=True)
    running.result()
    time.sleep(0.1)
    assert [user_of(r) for r in setup.chat_requests()] == ["first"]
    assert sender.queue.in_flight == 0 and sender.queue.waiting == 0


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_queue_full_and_timeout_in_asyncio(setup):
    configure(max_concurrent_requests=1, queue_size=1, queue_timeout=1.0)
    gate = Gate()
    setup.reply_with(gate)
    call = item_call()

    async def main():
        first = asyncio.create_task(call.acall(n=1))
        while setup.in_flight < 1:
            await asyncio.sleep(0.002)
        second = asyncio.create_task(call.acall(n=2))  # waits in line, then times out
        while get_client().queue.waiting < 1:
            await asyncio.sleep(0.002)
        with pytest.raises(QueueFullError, match="full"):
            await call.acall(n=3)  # the line (QUEUE_SIZE=1) is full
        with pytest.raises(QueueFullError, match="QUEUE_TIMEOUT"):
            await second
        gate.open()
        return await first

    try:
        result = asyncio.run(main())
    finally:
        gate.open()
    assert result == "re: item 1"
    assert [user_of(r) for r in setup.chat_requests()] == ["item 1"]


def test_queue_full_inside_map_comes_back_in_place(setup):
    configure(max_concurrent_requests=1, queue_size=0)
    gate = Gate()
    setup.reply_with(gate)
    blocker = concurrent.futures.ThreadPoolExecutor(1)
    try:
        running = blocker.submit(get_client().send_message, [{"role": "user", "content": "first"}])
        wait_until(lambda: setup.in_flight == 1)
        results = item_call().map([{"n": i} for i in range(4)], max_workers=4, progress=False, return_exceptions=True)
    finally:
        gate.open()
        blocker.shutdown(wait=True)
    running.result()
    assert all(isinstance(r, QueueFullError) for r in results), results
    assert [user_of(r) for r in setup.chat_requests()] == ["first"]


# --------------------------------------------------------------------------- #
# rate limits
# --------------------------------------------------------------------------- #


@pytest.mark.slow  # the same rule as a quicker test in test_limits.py / test_throughput.py
def test_requests_per_minute_spreads_requests_over_time(setup):
    configure(requests_per_minute=120)  # 120/min, and so at most 2 per second
    sender = get_client()
    started = time.monotonic()
    for i in range(5):
        sender.send_message([{"role": "user", "content": f"r{i}"}])
    elapsed = time.monotonic() - started
    assert elapsed >= 1.5
    times = [r.time for r in setup.chat_requests()]
    assert len(times) == 5
    # any 3 consecutive requests span about a second (slack for network jitter)
    assert all(times[i + 2] - times[i] >= 0.8 for i in range(3)), times


@pytest.mark.slow  # the same rule as a quicker test in test_limits.py / test_throughput.py
def test_requests_per_minute_holds_under_concurrency(setup):
    configure(requests_per_minute=120)
    started = time.monotonic()
    results = item_call().map([{"n": i} for i in range(5)], max_workers=5, progress=False)
    assert time.monotonic() - started >= 1.5
    assert results == [f"re: item {i}" for i in range(5)]


@pytest.mark.slow  # the same rule as a quicker test in test_limits.py / test_throughput.py
def test_requests_per_minute_in_asyncio(setup):
    configure(requests_per_minute=120)
    call = item_call()

    async def main():
        return await asyncio.gather(*(call.acall(n=i) for i in range(5)))

    started = time.monotonic()
    assert asyncio.run(main()) == [f"re: item {i}" for i in range(5)]
    assert time.monotonic() - started >= 1.5


def test_tokens_per_minute_refuses_what_cannot_be_sent_in_time(setup):
    # each request costs its prompt tokens + max_tokens=400: two fit into 1000/min,
    # a third would wait many seconds, more than QUEUE_TIMEOUT, so it is refused unsent.
    configure(tokens_per_minute=1000, max_tokens=400, queue_timeout=1)
    sender = get_client()
    for i in range(2):
        sender.send_message([{"role": "user", "content": f"t{i}"}])
    started = time.monotonic()
    with pytest.raises(QueueFullError, match="TOKENS_PER_MINUTE"):
        sender.send_message([{"role": "user", "content": "t2"}])
    assert time.monotonic() - started < 5  # told at once, not after the whole wait
    assert [user_of(r) for r in setup.chat_requests()] == ["t0", "t1"]


# --------------------------------------------------------------------------- #
# acall: same retry, cache and error behaviour as call
# --------------------------------------------------------------------------- #


def test_acall_retries_like_call(setup):
    setup.enqueue(Status(503, headers={"retry-after-ms": "0"}), Status(429, headers={"retry-after-ms": "0"}))
    assert asyncio.run(item_call().acall(n=7)) == "re: item 7"
    assert len(setup.chat_requests()) == 3
    assert usage_stats()["retries"] == 2
    assert usage_stats()["calls"] == 1


def test_acall_raises_the_typed_errors_of_call(setup):
    call = item_call()
    setup.enqueue(Status(400))
    with pytest.raises(BadRequestError) as info:
        asyncio.run(call.acall(n=1))
    assert info.value.status_code == 400
    setup.enqueue(Status(401))
    with pytest.raises(AuthenticationError):
        asyncio.run(call.acall(n=1))
    assert len(setup.chat_requests()) == 2  # 4xx are not retried
    setup.enqueue(Status(400))
    with pytest.raises(BadRequestError):
        call.call(n=1)


def test_acall_and_call_share_the_cache(setup):
    force_api_cache(True, "cache.pickle")
    call = item_call()
    assert asyncio.run(call.acall(n=1)) == "re: item 1"
    assert asyncio.run(call.acall(n=1)) == "re: item 1"
    assert call.call(n=1) == "re: item 1"
    assert len(setup.chat_requests()) == 1
    stats = usage_stats()
    assert stats["calls"] == 3 and stats["cached_calls"] == 2


# --------------------------------------------------------------------------- #
# map
# --------------------------------------------------------------------------- #


def test_map_keeps_input_order(setup):
    inputs = [{"n": i} for i in range(60)]
    results = item_call().map(inputs, max_workers=20, progress=False)
    assert results == [f"re: item {i}" for i in range(60)]


def test_map_with_no_inputs(setup):
    assert item_call().map([], progress=False) == []
    assert setup.requests == []


def test_map_reports_failures_in_place(setup):
    setup.enqueue(*[Status(400) for _ in range(5)])
    results = item_call().map([{"n": i} for i in range(30)], max_workers=10, progress=False, return_exceptions=True)
    failed_inputs = {user_of(r) for r in setup.chat_requests() if isinstance(r.item, Status)}
    assert len(failed_inputs) == 5
    for i, result in enumerate(results):
        if f"item {i}" in failed_inputs:
            assert isinstance(result, BadRequestError) and result.status_code == 400, (i, result)
        else:
            assert result == f"re: item {i}", (i, result)
    assert len(setup.chat_requests()) == 30  # the rest all completed


def test_map_raises_the_failure_without_return_exceptions(setup):
    setup.enqueue(Status(400))
    with pytest.raises(BadRequestError):
        item_call().map([{"n": i} for i in range(10)], max_workers=3, progress=False)


def test_map_resumes_from_the_cache(setup, monkeypatch):
    force_api_cache(True, "cache.pickle")
    call = item_call()
    inputs = [{"n": i} for i in range(20)]
    setup.enqueue(*[Status(400) for _ in range(4)])
    first = call.map(inputs, max_workers=8, progress=False, return_exceptions=True)
    failed = [i for i, r in enumerate(first) if isinstance(r, Exception)]
    assert len(failed) == 4
    assert [r for r in first if not isinstance(r, Exception)] == [f"re: item {i}" for i in range(20) if i not in failed]

    setup.reset()
    reset_usage_stats()
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    second = call.map(inputs, max_workers=8, progress=True, return_exceptions=True)
    assert second == [f"re: item {i}" for i in range(20)]
    assert sorted(user_of(r) for r in setup.chat_requests()) == sorted(f"item {i}" for i in failed)
    assert usage_stats()["cached_calls"] == 16
    out = tty.getvalue()
    assert "20/20" in out and "cached=16" in out, out[-500:]


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_map_progress_on_a_non_terminal_stderr(setup, capsys):
    assert not sys.stderr.isatty()
    results = item_call().map([{"n": i} for i in range(10)], max_workers=4, progress=True)
    assert results == [f"re: item {i}" for i in range(10)]
    capsys.readouterr()  # whatever it wrote, it did not fail


def test_map_progress_bar_on_a_terminal(setup, monkeypatch):
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    results = item_call().map([{"n": i} for i in range(10)], max_workers=4, progress=True)
    assert results == [f"re: item {i}" for i in range(10)]
    out = tty.getvalue()
    assert "10/10" in out and "call" in out and "cached=0" in out, out[-500:]


# --------------------------------------------------------------------------- #
# usage statistics
# --------------------------------------------------------------------------- #


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_usage_stats_sum_exactly_under_concurrency(setup):
    setup.latency = 0.005
    retried = 7
    setup.enqueue(*[Status(503, headers={"retry-after-ms": "0"}) for _ in range(retried)])
    call = item_call()
    inputs = [{"n": "x" * (i % 23) + str(i)} for i in range(150)]
    from_threads = call.map(inputs[:100], max_workers=50, progress=False)

    async def main():
        return await asyncio.gather(*(call.acall(**v) for v in inputs[100:]))

    from_tasks = asyncio.run(main())
    results = from_threads + from_tasks
    answered = [r for r in setup.chat_requests() if r.item is None]
    assert len(answered) == 150 and len(setup.chat_requests()) == 150 + retried
    prompt = sum(_server_prompt_tokens(r.messages) for r in answered)
    completion = sum(_server_completion_tokens(text) for text in results)
    stats = usage_stats()
    cost = stats.pop("cost")
    assert stats == {
        "calls": 150,
        "cached_calls": 0,
        "retries": retried,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "unpriced_calls": 0,
    }
    from genai_prices import Usage, calc_price  # gpt-4o-mini's price is linear: the sum of the parts

    expected = calc_price(Usage(input_tokens=prompt, output_tokens=completion), "gpt-4o-mini", provider_id="openai")
    assert cost == pytest.approx(float(expected.total_price))
    reset_usage_stats()
    assert set(usage_stats().values()) == {0}


def test_usage_record_is_thread_safe():
    reset_usage_stats()

    def work():
        for _ in range(5000):
            usage_mod.record(calls=1, prompt_tokens=3, completion_tokens=2, total_tokens=5)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in range(200):
        usage_stats()  # reading meanwhile is safe too
    for t in threads:
        t.join()
    stats = usage_stats()
    assert (stats["calls"], stats["prompt_tokens"], stats["completion_tokens"], stats["total_tokens"]) == (
        40000,
        120000,
        80000,
        200000,
    )


# --------------------------------------------------------------------------- #
# lazy imports
# --------------------------------------------------------------------------- #


def test_import_tinyllm_loads_no_sdk_tokenizer_or_local_model():
    root = str(Path(tinyllm.__file__).resolve().parents[1])
    code = "import tinyllm, sys; bad=[m for m in ('openai','tiktoken','llama_cpp') if m in sys.modules]; assert not bad, bad"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_import_tinyllm_leaves_the_optional_helpers_unloaded():
    # each is loaded where it is used: tqdm by map(progress=True), limits when a rate limit
    # is set, filelock by the persistent cache, yaml by the first front matter
    root = str(Path(tinyllm.__file__).resolve().parents[1])
    code = (
        "import tinyllm, sys; bad=[m for m in ('tqdm','limits','filelock','yaml') if m in sys.modules]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
