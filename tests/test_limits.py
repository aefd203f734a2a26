"""Tests of tinyllm.limits: the request queue (threads and asyncio) and the rate limits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import pytest
from helpers import wait_until

import tinyllm.config as config
from tinyllm.limits import _queue as limits
from tinyllm.errors import BadRequestError, QueueFullError
from tinyllm.limits._queue import RequestQueue


@pytest.fixture(autouse=True)
def _reset_overrides():
    config.clear_overrides()
    yield
    config.clear_overrides()


def settings(**overrides):
    """configure() the queue settings, then return the Config snapshot a client would read."""
    base = dict(max_concurrent_requests=5, queue_size=100, queue_timeout=30, requests_per_minute=0, tokens_per_minute=0)
    base.update(overrides)
    config.configure(**base)
    return config.get_config()


async def await_until(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.002)


class Tracker:
    """Counts bodies running at once and remembers the peak."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.peak = self.done = 0

    @contextlib.contextmanager
    def running(self):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            yield
        finally:
            with self.lock:
                self.now -= 1
                self.done += 1


def start_thread(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


# -- concurrency limit ------------------------------------------------------


def test_200_threads_never_exceed_the_limit():
    cfg = settings(max_concurrent_requests=5, queue_size=300)
    queue, track = RequestQueue("t"), Tracker()

    def work():
        with queue.slot(cfg):
            with track.running():
                assert queue.in_flight <= 5
                time.sleep(0.002)

    threads = [start_thread(work) for _ in range(200)]
    for thread in threads:
        thread.join(10)
    assert track.done == 200
    assert track.peak == 5
    assert queue.in_flight == 0 and queue.waiting == 0


def test_200_tasks_never_exceed_the_limit():
    cfg = settings(max_concurrent_requests=5, queue_size=300)
    queue, track = RequestQueue("a"), Tracker()

    async def work():
        async with queue.aslot(cfg):
            with track.running():
                await asyncio.sleep(0.001)

    async def main():
        await asyncio.gather(*(work() for _ in range(200)))

    asyncio.run(main())
    assert track.done == 200
    assert track.peak == 5
    assert queue.in_flight == 0 and queue.waiting == 0


def test_threads_and_tasks_share_one_limit():
    cfg = settings(max_concurrent_requests=4, queue_size=300)
    queue, track = RequestQueue("mixed"), Tracker()

    def sync_work():
        with queue.slot(cfg):
            with track.running():
                time.sleep(0.002)

    async def async_work():
        async with queue.aslot(cfg):
            with track.running():
                await asyncio.sleep(0.002)

    async def main():
        threads = [start_thread(sync_work) for _ in range(100)]
        await asyncio.gather(*(async_work() for _ in range(100)))
        for thread in threads:
            await asyncio.to_thread(thread.join, 10)

    asyncio.run(main())
    assert track.done == 200
    assert track.peak <= 4
    assert queue.in_flight == 0 and queue.waiting == 0


def test_slots_are_granted_first_come_first_served_across_threads_and_tasks():
    cfg = settings(max_concurrent_requests=1)
    queue, order = RequestQueue(), []

    def sync_work(i):
        with queue.slot(cfg):
            order.append(i)

    async def async_work(i):
        async with queue.aslot(cfg):
            order.append(i)
            await asyncio.sleep(0)

    async def main():
        threads, tasks = [], []
        with queue.slot(cfg):  # hold the only slot while the line forms
            for i in range(10):
                if i % 2:
                    tasks.append(asyncio.create_task(async_work(i)))
                else:
                    threads.append(start_thread(sync_work, i))
                await await_until(lambda: queue.waiting == i + 1)
        await asyncio.gather(*tasks)
        for thread in threads:
            await asyncio.to_thread(thread.join, 10)

    asyncio.run(main())
    assert order == list(range(10))
    assert queue.in_flight == 0


def test_a_new_limit_applies_to_the_next_request():
    queue, go, seen = RequestQueue(), threading.Event(), {}

    def work(name, cfg):
        with queue.slot(cfg):
            seen[name] = queue.in_flight
            go.wait(10)

    one = settings(max_concurrent_requests=1)
    with queue.slot(one):
        threads = [start_thread(work, "t1", one), start_thread(work, "t2", one)]
        wait_until(lambda: queue.waiting == 2)
        three = settings(max_concurrent_requests=3)  # raised: the waiting ones get in
        threads.append(start_thread(work, "t3", three))
        wait_until(lambda: "t1" in seen and "t2" in seen and queue.waiting == 1)
        assert queue.in_flight == 3
        one = settings(max_concurrent_requests=1)  # lowered: no new grant above 1
        threads.append(start_thread(work, "t4", one))
        wait_until(lambda: queue.waiting == 2)
        go.set()
    for thread in threads:
        thread.join(10)
    assert seen["t3"] == 1 and seen["t4"] == 1
    assert queue.in_flight == 0 and queue.waiting == 0


# -- queue size and timeout -------------------------------------------------


def test_full_queue_raises_at_once_and_leaves_the_line_as_it_was():
    cfg = settings(max_concurrent_requests=1, queue_size=2)
    queue, ran = RequestQueue("q"), []

    def work(i):
        with queue.slot(cfg):
            ran.append(i)

    with queue.slot(cfg):
        threads = [start_thread(work, i) for i in range(2)]
        wait_until(lambda: queue.waiting == 2)
        with pytest.raises(QueueFullError, match="QUEUE_SIZE=2") as info:
            with queue.slot(cfg):
                ran.append("refused")
        assert "2 requests already waiting" in str(info.value)
        assert queue.waiting == 2
    for thread in threads:
        thread.join(10)
    assert sorted(ran) == [0, 1]
    assert queue.in_flight == 0 and queue.waiting == 0


def test_queue_timeout_raises_and_the_request_never_runs():
    cfg = settings(max_concurrent_requests=1, queue_timeout=0.3)
    queue, ran, errors = RequestQueue(), [], []

    def work():
        try:
            with queue.slot(cfg):
                ran.append("late")
        except QueueFullError as exc:
            errors.append((exc, time.monotonic() - start))

    with queue.slot(cfg):
        start = time.monotonic()
        thread = start_thread(work)
        thread.join(5)
        assert queue.waiting == 0
    time.sleep(0.05)
    ((exc, waited),) = errors
    assert waited >= 0.25
    assert "QUEUE_TIMEOUT=0.3" in str(exc)
    assert ran == []
    with queue.slot(cfg):  # the queue still works
        ran.append("next")
    assert ran == ["next"] and queue.in_flight == 0


def test_queue_timeout_in_asyncio():
    cfg = settings(max_concurrent_requests=1, queue_timeout=0.2)
    queue, ran = RequestQueue(), []

    async def main():
        async with queue.aslot(cfg):
            with pytest.raises(QueueFullError, match="QUEUE_TIMEOUT"):
                async with queue.aslot(cfg):
                    ran.append("late")
            assert queue.waiting == 0
        async with queue.aslot(cfg):
            ran.append("next")

    asyncio.run(main())
    assert ran == ["next"] and queue.in_flight == 0


# -- every path gives the slot back -----------------------------------------


def test_cancelling_a_waiting_task_takes_it_out_of_the_line():
    cfg = settings(max_concurrent_requests=1)
    queue, ran = RequestQueue(), []

    async def work(name):
        async with queue.aslot(cfg):
            ran.append(name)

    async def main():
        async with queue.aslot(cfg):
            task = asyncio.create_task(work("cancelled"))
            await await_until(lambda: queue.waiting == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert queue.waiting == 0
        assert queue.in_flight == 0
        await work("next")

    asyncio.run(main())
    assert ran == ["next"] and queue.in_flight == 0


def test_cancelled_right_after_the_slot_was_handed_over():
    # The slot goes to the waiter and the waiter is cancelled before it wakes up:
    # the slot must be passed on, not lost.
    cfg = settings(max_concurrent_requests=1, queue_timeout=0)
    queue, ran = RequestQueue(), []

    async def work(name):
        async with queue.aslot(cfg):
            ran.append(name)

    async def main():
        holder = queue.slot(cfg)
        holder.__enter__()
        task = asyncio.create_task(work("cancelled"))
        following = asyncio.create_task(work("following"))
        await await_until(lambda: queue.waiting == 2)
        holder.__exit__(None, None, None)  # hands the slot to `task`...
        task.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(following, 5)

    asyncio.run(main())
    assert ran == ["following"]
    assert queue.in_flight == 0 and queue.waiting == 0


def test_cancelling_a_task_that_holds_the_slot_releases_it():
    cfg = settings(max_concurrent_requests=1)
    queue, ran = RequestQueue(), []

    async def hold():
        async with queue.aslot(cfg):
            await asyncio.sleep(30)

    async def work():
        async with queue.aslot(cfg):
            ran.append("next")

    async def main():
        holder = asyncio.create_task(hold())
        await await_until(lambda: queue.in_flight == 1)
        waiter = asyncio.create_task(work())
        await await_until(lambda: queue.waiting == 1)
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        await asyncio.wait_for(waiter, 5)

    asyncio.run(main())
    assert ran == ["next"] and queue.in_flight == 0


def test_many_cancellations_leave_nothing_behind():
    cfg = settings(max_concurrent_requests=2, queue_size=300)
    queue, track = RequestQueue(), Tracker()

    async def work():
        async with queue.aslot(cfg):
            with track.running():
                await asyncio.sleep(0.002)

    async def main():
        tasks = [asyncio.create_task(work()) for _ in range(100)]
        for i, task in enumerate(tasks):
            if i % 3 == 0:
                task.cancel()
            if i % 10 == 0:
                await asyncio.sleep(0.003)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert track.peak <= 2 and track.done >= 60
    assert queue.in_flight == 0 and queue.waiting == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_exception_inside_the_slot_releases_it(mode):
    cfg = settings(max_concurrent_requests=1)
    queue = RequestQueue()

    if mode == "sync":
        with pytest.raises(ValueError):
            with queue.slot(cfg):
                raise ValueError("boom")
    else:

        async def main():
            async with queue.aslot(cfg):
                raise ValueError("boom")

        with pytest.raises(ValueError):
            asyncio.run(main())
    assert queue.in_flight == 0
    with queue.slot(cfg):
        assert queue.in_flight == 1


def test_keyboard_interrupt_while_waiting_in_a_thread(monkeypatch):
    cfg = settings(max_concurrent_requests=1)
    queue, caught = RequestQueue(), []

    class InterruptedEvent(threading.Event):
        def wait(self, timeout=None):
            raise KeyboardInterrupt

    class Waiter(limits._Waiter):
        def __init__(self, loop):
            super().__init__(loop)
            self.event = InterruptedEvent()

    monkeypatch.setattr(limits, "_Waiter", Waiter)

    def work():
        try:
            with queue.slot(cfg):
                pass
        except KeyboardInterrupt:
            caught.append(True)

    with queue.slot(cfg):
        start_thread(work).join(5)
        assert caught == [True] and queue.waiting == 0
    assert queue.in_flight == 0


# -- rate limits -------------------------------------------------------------


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_requests_per_minute_spreads_requests_out():
    cfg = settings(requests_per_minute=120)  # 2 per second
    queue, starts = RequestQueue(), []
    for _ in range(5):
        with queue.slot(cfg):
            starts.append(time.monotonic())
    assert starts[-1] - starts[0] >= 1.4
    assert queue.in_flight == 0


@pytest.mark.slow  # 2 s of real waiting; the sync twin stays in the quick run
def test_requests_per_minute_in_asyncio():
    cfg = settings(requests_per_minute=120)
    queue, starts = RequestQueue(), []

    async def work():
        async with queue.aslot(cfg):
            starts.append(time.monotonic())

    async def main():
        await asyncio.gather(*(work() for _ in range(5)))

    asyncio.run(main())
    assert len(starts) == 5
    assert max(starts) - min(starts) >= 1.4
    assert queue.in_flight == 0


def test_tokens_per_minute_is_enforced():
    cfg = settings(tokens_per_minute=1000, queue_timeout=5)
    queue, ran = RequestQueue("tpm"), []
    for tokens in (400, 400, 100):  # 900 of 1000: all fit
        with queue.slot(cfg, tokens=tokens):
            ran.append(tokens)
    start = time.monotonic()
    with pytest.raises(QueueFullError, match="TOKENS_PER_MINUTE=1000"):
        with queue.slot(cfg, tokens=400):  # would need most of a minute
            ran.append("over")
    assert time.monotonic() - start < 2.5  # refused without waiting out QUEUE_TIMEOUT
    assert ran == [400, 400, 100]
    with queue.slot(cfg, tokens=50):  # what still fits goes through
        ran.append(50)
    assert queue.in_flight == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_cost_above_tokens_per_minute_is_a_bad_request_error(mode):
    cfg = settings(tokens_per_minute=1000)
    queue = RequestQueue()
    # the request's fault, not the configuration's: not a ConfigError (which aborts a whole `tinyllm map`)
    with pytest.raises(BadRequestError, match="needs 1500 tokens.*TOKENS_PER_MINUTE is 1000"):
        if mode == "sync":
            with queue.slot(cfg, tokens=1500):
                pass
        else:

            async def main():
                async with queue.aslot(cfg, tokens=1500):
                    pass

            asyncio.run(main())
    assert queue.in_flight == 0 and queue.waiting == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rate_wait_longer_than_the_queue_timeout_fails_promptly(mode):
    cfg = settings(requests_per_minute=1, queue_timeout=3)
    queue, ran = RequestQueue(), []
    with queue.slot(cfg):
        ran.append(1)
    start = time.monotonic()
    with pytest.raises(QueueFullError, match="REQUESTS_PER_MINUTE=1"):
        if mode == "sync":
            with queue.slot(cfg):
                ran.append(2)
        else:

            async def main():
                async with queue.aslot(cfg):
                    ran.append(2)

            asyncio.run(main())
    assert time.monotonic() - start < 2.0
    assert ran == [1]
    assert queue.in_flight == 0 and queue.waiting == 0


# -- fork -------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_starts_with_an_empty_queue():
    cfg = settings(max_concurrent_requests=1, queue_timeout=2, requests_per_minute=600)
    queue = RequestQueue("t")
    with queue.slot(cfg):  # held by this process (and, in the child, by nobody)
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if it gets the slot at once
            code = 1
            try:
                with queue.slot(cfg):
                    code = 0 if (queue.in_flight, queue.waiting) == (1, 0) else 2
            except BaseException:
                code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert queue.in_flight == 1
    assert os.waitstatus_to_exitcode(status) == 0
    assert queue.in_flight == 0
