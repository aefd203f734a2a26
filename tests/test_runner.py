"""The batch runner (tinyllm.runner): order, bounded windows, any Executor, Ctrl-C, the durable JSONL file.

Real threads, real process pools, real files and real signals; LLMCall.map end to
end against the loopback server.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
from pathlib import Path

import pytest
from helpers import wait_until

from tinyllm import BatchError, ConfigError, LLMCall, Runner, configure
from tinyllm.batch._runner import JsonlOutput


def square(x: int) -> int:  # module level: picklable for a process pool
    if x == 13:
        raise ValueError("thirteen")
    return x * x


class CountingPool(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that records the most futures it had outstanding at once."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.outstanding = self.peak = self.submitted = 0
        self.count_lock = threading.Lock()

    def submit(self, fn, /, *args, **kwargs):
        with self.count_lock:
            self.outstanding += 1
            self.submitted += 1
            self.peak = max(self.peak, self.outstanding)
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, future) -> None:
        with self.count_lock:
            self.outstanding -= 1


# --------------------------------------------------------------------------- #
# in memory
# --------------------------------------------------------------------------- #


def test_map_keeps_input_order_when_items_finish_in_reverse():
    gates = [threading.Event() for _ in range(6)]

    def fn(i: int) -> int:
        assert gates[i].wait(30)
        if i:
            gates[i - 1].set()  # item i lets item i-1 finish: they finish 5, 4, ..., 0
        return i * 10

    gates[5].set()
    assert Runner(fn, max_workers=6).map(range(6)) == [0, 10, 20, 30, 40, 50]


def test_window_bounds_pending_futures_and_input_is_read_lazily():
    taken = []

    def items():
        for i in range(3000):
            taken.append(i)
            yield i

    with CountingPool(4) as pool:
        runner = Runner(lambda i: i + 1, executor=pool, window=10)
        seen = 0
        for outcome in runner.results(enumerate(items())):
            seen += 1
            assert len(taken) <= seen + 10  # never more than a window ahead of the results handed out
        assert seen == 3000 and pool.peak <= 10 and pool.submitted == 3000


def test_any_executor_a_process_pool_in_chunks():
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        results = Runner(square, executor=pool, window=3, chunk_size=4).map(range(30), return_exceptions=True)
        assert pool.submit(square, 3).result() == 9  # a given executor is left running
    assert [r for i, r in enumerate(results) if i != 13] == [i * i for i in range(30) if i != 13]
    assert isinstance(results[13], ValueError) and str(results[13]) == "thirteen"


def test_first_failure_is_raised_running_items_finish_the_rest_never_start():
    started, release = [], threading.Event()

    def fn(i: int) -> int:
        started.append(i)
        if i == 1:
            raise KeyError("boom")
        if i in (0, 2):
            assert release.wait(30)
        return i

    threading.Timer(0.2, release.set).start()
    with pytest.raises(KeyError):
        Runner(fn, max_workers=3, window=3).map(range(1000))
    assert set(started) <= set(range(6)) and release.is_set()


def test_first_ctrl_c_keeps_finished_items_cancels_unstarted_and_does_not_wait():
    assert threading.current_thread() is threading.main_thread()
    hold, started = threading.Event(), []

    def fn(i: int) -> int:
        started.append(i)
        if i == 0:
            assert hold.wait(30)
        return i

    runner = Runner(fn, max_workers=2, window=4)
    got = []
    try:
        with pytest.raises(KeyboardInterrupt):
            for outcome in runner.results(enumerate(range(100))):
                got.append(outcome.tag)
                if len(got) == 5:
                    signal.raise_signal(signal.SIGINT)  # as Ctrl-C: only sets a flag, nothing is raised here
                    wait_until(lambda: len(started) >= 8)  # let a few more finish meanwhile
        assert not hold.is_set()  # it returned while item 0 still runs
        assert 0 not in got and len(got) == len(set(got)) and set(got) <= set(started)
        assert len(got) >= 5 and runner.abandoned >= 1
        assert len(got) + runner.abandoned == len(started)  # each started item: handed out or abandoned
        assert len(started) < 100  # the rest never started
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        hold.set()


def test_llmcall_map_on_a_given_executor_with_plain_progress(server, tmp_path, capsys):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "item.system.md").write_text("item {{ n }}", encoding="utf-8")
    configure(api_type="openai", base_url=server.base_url, waiting_time=0)
    server.reply_with(lambda req: "re: " + req["messages"][-1]["content"])
    with CountingPool(3) as pool:
        results = LLMCall("item.system.md").map(({"n": i} for i in range(10)), executor=pool, progress=True)
        assert pool.submitted == 10 and pool.submit(int, "4").result() == 4
    assert results == [f"re: item {i}" for i in range(10)]
    err = capsys.readouterr().err
    assert "item.system.md: 10 calls done" in err and "\r" not in err  # no total: a generator has no len()


# --------------------------------------------------------------------------- #
# the JSONL file
# --------------------------------------------------------------------------- #


def line_of(row_id, value, error) -> str:
    return json.dumps({"id": row_id, "content": value} if error is None else {"id": row_id, "error": str(error)})


def test_to_jsonl_resumes_retries_errors_and_orders_the_file(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    calls: list[int] = []
    fail = {3, 5}

    def fn(x: int) -> int:
        calls.append(x)
        if x in fail:
            raise ValueError(f"no {x}")
        return -x

    rows = lambda: ((f"k{i}", i) for i in range(8))  # noqa: E731
    out.write_text('{"id": "k1", "content": -1}\n{"id": "gone", "content": 0}\n{"id": "k2", "cont', encoding="utf-8")
    s = Runner(fn, max_workers=3).to_jsonl(rows, out, line=line_of)
    assert (s.total, s.done_before, s.done_now, s.failed, s.dropped, s.failed_kinds) == (
        8,
        1,
        5,
        2,
        1,
        {"ValueError": 2},
    )
    assert sorted(calls) == [0, 2, 3, 4, 5, 6, 7]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"k{i}" for i in range(8)] and lines[3] == {"id": "k3", "error": "no 3"}

    fail.clear()
    calls.clear()
    s = Runner(fn).to_jsonl(rows, out, line=line_of)
    assert sorted(calls) == [3, 5] and (s.done_now, s.done_before, s.failed) == (2, 6, 0)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"id": f"k{i}", "content": -i} for i in range(8)
    ]


def test_to_jsonl_a_fatal_error_stops_the_run_keeping_finished_rows(tmp_path: Path):
    out = tmp_path / "out.jsonl"

    def fn(x: int) -> int:
        if x == 50:
            raise ConfigError("no backend")
        return x

    with pytest.raises(ConfigError):
        Runner(fn, max_workers=1).to_jsonl(
            lambda: ((i, i) for i in range(1000)), out, line=line_of, fatal=(ConfigError,)
        )
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == list(range(50))  # one worker: in order up to the fatal row, which is not written


def test_duplicate_and_nan_ids_are_refused_before_anything_runs(tmp_path: Path):
    ran = []
    runner = Runner(ran.append)
    with pytest.raises(BatchError, match=r"rows 1 and 3 \(counted from 0\) have the same id 'b'"):
        runner.to_jsonl(lambda: iter([("a", 1), ("b", 2), ("c", 3), ("b", 4)]), tmp_path / "o.jsonl", line=line_of)
    with pytest.raises(BatchError, match="NaN"):
        runner.to_jsonl(lambda: iter([(float("nan"), 1)]), tmp_path / "o.jsonl", line=line_of)
    assert ran == [] and not (tmp_path / "o.jsonl").exists()


def test_one_run_per_output_file(tmp_path: Path):
    with JsonlOutput(tmp_path / "o.jsonl"):
        with pytest.raises(BatchError, match="another run is writing"):
            with JsonlOutput(tmp_path / "o.jsonl"):
                pass
    with JsonlOutput(tmp_path / "o.jsonl"):  # released
        pass


def test_a_torn_last_line_may_end_inside_a_character_but_a_binary_file_is_refused(tmp_path: Path):
    out = tmp_path / "o.jsonl"
    out.write_bytes('{"id": 1, "content": "é"}\n{"id": 2, "content": "é'.encode()[:-1])
    s = Runner(lambda x: "é").to_jsonl(lambda: iter([(1, 0), (2, 0)]), out, line=line_of)
    assert (s.done_before, s.done_now) == (1, 1)
    out.write_bytes(b'{"id": 1, "content": "\xff"}\n')
    with pytest.raises(BatchError, match="not UTF-8"):
        Runner(lambda x: x).to_jsonl(lambda: iter([(1, 0)]), out, line=line_of)


def test_each_row_is_on_disk_before_it_is_counted(tmp_path: Path):
    """The caller of results() sees an outcome before the progress counts it; to_jsonl has written it by then."""
    out = tmp_path / "o.jsonl"
    sizes = []

    class Spy(Runner):
        def results(self, items, **kw):
            for outcome in super().results(items, **kw):
                yield outcome
                sizes.append(len(out.read_bytes().splitlines()))  # the row handed out is already in the file

    Spy(lambda x: x, max_workers=2).to_jsonl(lambda: ((i, i) for i in range(20)), out, line=line_of)
    assert sizes == list(range(1, 21))
    assert os.path.exists(tmp_path / ".o.jsonl.lock") and not list(tmp_path.glob(".o.jsonl.*.tmp"))


@pytest.mark.parametrize("bad", [{"max_workers": 0}, {"window": -1}, {"chunk_size": 1.5}, {"max_workers": True}])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        Runner(abs, **bad)


def _refuse_to_load() -> None:
    raise TypeError("cannot be rebuilt here")


class _LoadsBadly:
    """Pickles fine, but fails when loaded (as an error whose __init__ needs more than its args would)."""

    def __reduce__(self):
        return _refuse_to_load, ()


def test_values_that_cannot_travel_become_batch_errors_only_on_remote_executors():
    """On local threads a row's value is kept as it is, picklable or not; what goes back from another
    process must survive a pickle round trip, or the row gets a BatchError naming what did not."""
    import threading

    from tinyllm.errors import BatchError
    from tinyllm.batch._runner import _call_chunk

    lock_row = lambda row: threading.Lock() if row == 1 else row  # noqa: E731
    local = Runner(lock_row, progress=False).map([0, 1, 2], return_exceptions=True)
    assert local[0] == 0 and local[2] == 2 and not isinstance(local[1], Exception)
    assert _call_chunk(lock_row, [1])[0][1] is None  # local: not checked
    value, error = _call_chunk(lock_row, [0, 1], remote=True)[1]
    assert value is None and isinstance(error, BatchError) and "the row's value (a lock)" in str(error)
    value, error = _call_chunk(lambda row: _LoadsBadly(), [0], remote=True)[0]
    assert value is None and isinstance(error, BatchError) and "cannot be rebuilt here" in str(error)
    assert _call_chunk(lambda row: row * 2, [1, 2], 2, remote=True) == [(2, None), (4, None)]
