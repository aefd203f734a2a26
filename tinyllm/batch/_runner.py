"""The batch runner behind ``LLMCall.map`` and ``tinyllm map``.

:class:`Runner` calls a function once per item on a
:class:`concurrent.futures.Executor` (a local thread pool of
``MAX_CONCURRENT_REQUESTS`` threads unless one is given: a
``ProcessPoolExecutor``, Dask's ``client.get_executor()``, ...). At most
``window`` futures are pending at any time, so a million items never become a
million futures, and items are taken from the input only as room frees up.

- :meth:`Runner.map` returns the results in input order (a list).
- :meth:`Runner.to_jsonl` writes one JSON line per row to a file: each row is
  appended (and flushed to the OS) the moment it finishes, so neither Ctrl-C
  nor SIGKILL loses finished work; a rerun sends only the rows without a
  ``content`` line; when a run completes the file is rewritten in input order.
  Its bookkeeping (ids seen, where each row's line is) lives in a temporary
  on-disk SQLite database, so memory stays flat in the number of rows.
- Progress: a tqdm bar on a terminal (or in a notebook), plain lines otherwise.
- Ctrl-C: the first one stops sending, cancels the calls not yet started and
  keeps every finished row; a second one raises at once.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import hashlib
import json
import math
import os
import pickle
import queue
import signal
import stat
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator

from ..errors import BatchError, ConfigError

__all__ = ["Runner", "Outcome", "BatchSummary", "JsonlOutput", "row_key", "finite", "DISTRIBUTED_CHUNK_SIZE"]

_POLL = 0.1  # seconds between looks at the Ctrl-C flag while waiting for results
_PLAIN_EVERY = 30.0  # seconds: a plain progress line at least this often while rows finish


@dataclass(frozen=True)
class Outcome:
    """One item's result: ``tag`` as given with the item; ``value`` or ``error`` (never both)."""

    tag: Any
    value: Any = None
    error: BaseException | None = None


@dataclass
class BatchSummary:
    """What :meth:`Runner.to_jsonl` did.

    ``total`` input rows; ``done_before`` had a content line already;
    ``done_now`` got one in this run; ``failed`` ended in an error line in this run
    (``failed_kinds``: error type name -> count); ``dropped`` lines of ids not in
    the input were left out of the final file; ``interrupted``: stopped by Ctrl-C
    (the file then holds the finished rows in the order they finished);
    ``abandoned``: calls still running when it stopped (their rows are not in the file);
    ``stopped_by``: the ``stop_on`` error that stopped the sending (its row and the rows
    never sent have no line, so a rerun sends them), else None.
    """

    total: int = 0
    done_before: int = 0
    done_now: int = 0
    failed: int = 0
    failed_kinds: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    interrupted: bool = False
    abandoned: int = 0
    stopped_by: BaseException | None = None

    @property
    def in_file(self) -> int:
        """Rows of the input that have a line (content or error) in the file."""
        return self.done_before + self.done_now + self.failed


def _call_one(fn: Callable[[Any], Any], item: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(item), None
    except Exception as exc:  # the item's own failure, reported in its place
        return None, exc


def _call_chunk(
    fn: Callable[[Any], Any],
    items: list,
    threads: int = 1,
    remote: bool = False,
    context: contextvars.Context | None = None,
) -> list[tuple[Any, BaseException | None]]:
    """Run ``fn`` on each item of a chunk (in the executor, e.g. on a Dask worker): (value, None) or
    (None, exception) per item, in the chunk's order; on up to ``threads`` threads at once.
    ``remote``: the executor sends results back to another process, so each pair is made one that
    can travel (see :func:`_sendable`); local threads keep every value as it is. ``context``: the
    caller's context (its active budgets, call-log batch id, ...), each item run in a copy of it."""
    if context is not None:

        def one(item):
            return context.copy().run(_call_one, fn, item)
    else:
        one = (lambda item: _sendable(_call_one(fn, item))) if remote else (lambda item: _call_one(fn, item))
    threads = min(threads, len(items))
    if threads <= 1:
        return [one(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tinyllm-chunk") as pool:
        return list(pool.map(one, items))


def _sendable(pair: tuple[Any, BaseException | None]) -> tuple[Any, BaseException | None]:
    """``pair`` if it survives a pickle round trip (pickled with cloudpickle where it is loaded, as on a
    Dask worker), else ``(None, BatchError)`` naming what did not: Dask only logs a result it cannot
    send back or load, and the run would wait for it for ever."""
    dumps = getattr(sys.modules.get("cloudpickle"), "dumps", None) or pickle.dumps
    try:
        pickle.loads(dumps(pair))
        return pair
    except Exception as exc:  # noqa: BLE001 - whatever pickling raises, the row gets an error instead
        value, error = pair
        what = (
            f"the row's error ({type(error).__name__}: {error})"
            if error is not None
            else f"the row's value (a {type(value).__name__})"
        )
        return None, BatchError(f"{what} cannot be sent back from the executor's worker: {type(exc).__name__}: {exc}")


#: rows per task when the executor is not a local thread pool (Dask, processes): a million rows
#: become 1,000,000 / DISTRIBUTED_CHUNK_SIZE tasks, each run on up to ``max_workers`` threads
DISTRIBUTED_CHUNK_SIZE = 50


def _is_local_threads(executor: concurrent.futures.Executor | None) -> bool:
    return executor is None or isinstance(executor, concurrent.futures.ThreadPoolExecutor)


@contextmanager
def _first_sigint_sets(flag: threading.Event) -> Iterator[None]:
    """While inside: the first Ctrl-C sets ``flag`` (no exception); the next one raises KeyboardInterrupt.

    Only in the main thread, and only over Python's default handler (a program's own handler is left alone).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        flag.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# --------------------------------------------------------------------------- #
# Progress: a tqdm bar on a terminal or in a notebook, plain lines otherwise
# --------------------------------------------------------------------------- #


def _in_notebook() -> bool:
    if "ipykernel" not in sys.modules:
        return False
    from tqdm.auto import tqdm as auto

    return any(c.__module__.startswith("tqdm.notebook") for c in auto.__mro__)


class _Progress:
    """Counts finished items and shows them on ``file`` (stderr by default).

    ``mode``: "bar" (tqdm), "lines" (a plain line at every 1% of ``total`` and at
    least every 30 s while items finish, and a last one at the end) or "off".
    """

    def __init__(
        self,
        mode: str,
        total: int | None,
        initial: int,
        desc: str,
        unit: str,
        counters: Callable[[], dict] | None,
        file: Any,
    ) -> None:
        self.mode, self.total, self.n, self.desc, self.unit = mode, total, initial, desc, unit
        self.counters, self.file, self.failed, self.not_sent = counters, file, 0, 0
        self.started = self._last = time.monotonic()
        self._step = max(1, total // 100) if total is not None else sys.maxsize  # no total: by time only
        self._next = (initial // self._step + 1) * self._step
        self._bar = None
        self._printed, self._printed_not_sent = initial, 0
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file, dynamic_ncols=True)

    def _extra(self) -> dict:
        extra = {"failed": self.failed} if self.failed else {}
        if self.not_sent:
            extra["not sent"] = self.not_sent
        if self.counters is not None:
            extra.update(self.counters())
        return extra

    def update(self, failed: bool) -> None:
        self.n += 1
        self.failed += failed
        now = time.monotonic()
        if self._bar is not None:
            if now - self._last >= 0.1 or failed:
                self._last = now
                self._bar.set_postfix(self._extra(), refresh=False)
            self._bar.update(1)
        elif self.mode == "lines" and (self.n >= self._next or now - self._last >= _PLAIN_EVERY):
            self._line(now)

    def skip(self, count: int = 1) -> None:
        """Count ``count`` items that were not sent (refused before sending, e.g. by a budget): not done, not failed."""
        if count <= 0:
            return
        self.not_sent += count
        if self._bar is not None:
            self._bar.set_postfix(self._extra(), refresh=True)

    def _line(self, now: float) -> None:
        self._last, self._printed, self._printed_not_sent = now, self.n, self.not_sent
        self._next = (self.n // self._step + 1) * self._step
        extra = ", ".join(f"{k}={v}" for k, v in self._extra().items() if v)
        total = f"/{self.total}" if self.total is not None else ""
        print(
            f"{self.desc + ': ' if self.desc else ''}{self.n}{total} {self.unit}s done{f' ({extra})' if extra else ''}, "
            f"{now - self.started:.1f} s",
            file=self.file,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._extra(), refresh=False)
            self._bar.close()
        elif self.mode == "lines" and (self._printed != self.n or self.not_sent != self._printed_not_sent):
            self._line(time.monotonic())


def _count(progress: _Progress, outcome: "Outcome", not_sent: tuple[type[BaseException], ...]) -> None:
    """Show ``outcome`` in ``progress``: done, failed, or not sent (its error is one of ``not_sent``)."""
    if not_sent and isinstance(outcome.error, not_sent):
        progress.skip()
    else:
        progress.update(outcome.error is not None)


def _progress_mode(progress: bool, file: Any) -> str:
    if not progress or file is None:
        return "off"
    isatty = getattr(file, "isatty", None)
    return "bar" if (isatty is not None and isatty()) or _in_notebook() else "lines"


# --------------------------------------------------------------------------- #
# The runner
# --------------------------------------------------------------------------- #


class Runner:
    """Call ``fn(item)`` for many items concurrently, in a bounded window of futures.

    Args:
        fn: a one-argument callable; its exceptions (``Exception``) become the
            item's error. With a process or Dask executor it must be picklable.
        executor: any :class:`concurrent.futures.Executor`; the runner never
            shuts down one it is given. Default: a thread pool of
            ``max_workers`` threads made (and shut down) by each run.
        max_workers: threads of the default pool (default ``MAX_CONCURRENT_REQUESTS``);
            with a given executor, only sizes the default ``window``.
        window: futures pending at most (default ``2 * max_workers``, at least 2).
        chunk_size: items per submitted task. Default: 1 on a local thread pool
            (the default executor, or a given ``ThreadPoolExecutor``), else
            :data:`DISTRIBUTED_CHUNK_SIZE` (50), so a million rows on Dask are
            20,000 tasks, at most ``window`` of them pending. A chunk's rows are
            reported when the whole chunk is done.
        chunk_threads: threads a chunk's items run on in the executor (a Dask
            worker, a process); default: ``max_workers`` when chunks are
            larger than 1 and the executor is not a local thread pool, else 1
            (one after the other). The request queue and the rate limits of
            the worker (cluster-wide with REDIS_URL) still bound requests in flight.
        progress: show progress on stderr: a tqdm bar on a terminal or in a
            notebook, else a plain line at every 1% (and at least every 30 s).
        desc, unit: the progress label and unit name (``unit`` + "s" in plain lines).
        counters: returns extra ``{name: number}`` to show next to the progress.

    Raises:
        ConfigError: ``max_workers``, ``window``, ``chunk_size`` or ``chunk_threads`` not an int >= 1.

    After a run, :attr:`abandoned` is the number of calls that were still
    running when Ctrl-C stopped it (0 otherwise).
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        executor: concurrent.futures.Executor | None = None,
        max_workers: int | None = None,
        window: int | None = None,
        chunk_size: int | None = None,
        chunk_threads: int | None = None,
        progress: bool = False,
        desc: str = "",
        unit: str = "row",
        counters: Callable[[], dict] | None = None,
    ) -> None:
        for name, value in (
            ("max_workers", max_workers),
            ("window", window),
            ("chunk_size", chunk_size),
            ("chunk_threads", chunk_threads),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"Runner: {name} must be an int >= 1, got {value!r}")
        if max_workers is None:
            from ..config import get_config

            max_workers = get_config().max_concurrent_requests
        self.fn, self.executor, self.max_workers = fn, executor, max(1, int(max_workers))
        self.window = window or max(2, 2 * self.max_workers)
        local = _is_local_threads(executor)
        self.chunk_size = chunk_size or (1 if local else DISTRIBUTED_CHUNK_SIZE)
        self.chunk_threads = chunk_threads or (self.max_workers if self.chunk_size > 1 and not local else 1)
        self.progress, self.desc, self.unit, self.counters = progress, desc, unit, counters
        self.abandoned = 0
        self._halt = threading.Event()

    def halt(self) -> None:
        """Stop sending: no more items are started; those running finish and are yielded
        by :meth:`results`, which then ends (e.g. when a budget is reached)."""
        self._halt.set()

    # -- the engine -------------------------------------------------------------------

    def results(
        self,
        items: Iterable[tuple[Any, Any]],
        *,
        total: int | None = None,
        initial: int = 0,
        not_sent: tuple[type[BaseException], ...] = (),
    ) -> Generator[Outcome, None, None]:
        """Run ``fn`` on each ``(tag, item)`` pair; yield an :class:`Outcome` per item as it finishes.

        Items are read from ``items`` only as the window has room. ``total`` and
        ``initial`` (items done before) are for the progress display; an outcome whose error
        is one of ``not_sent`` (refused before sending) shows as ``not sent``, not ``failed``, and
        when the run is halted the items left show as not sent too. An item
        counts as done in the progress only once the caller has taken its
        outcome and asked for the next, so what the progress shows is what the
        caller has already handled (e.g. written).

        If the caller stops early (``close()``, an exception, ``break``), items
        not started are cancelled and running ones are waited for. On the first
        Ctrl-C (main thread), nothing more is sent, items not started are
        cancelled, the outcomes already finished are yielded, then
        KeyboardInterrupt is raised without waiting for the calls still running
        (their number: :attr:`abandoned`).
        """
        self.abandoned = 0
        self._halt.clear()
        owned = self.executor is None
        remote = not _is_local_threads(self.executor)  # results come back pickled from another process
        pool = self.executor or concurrent.futures.ThreadPoolExecutor(
            self.max_workers, thread_name_prefix="tinyllm-run"
        )
        # the caller's context goes with each item to local threads (a Budget activated around map() holds its calls)
        context = None if remote else contextvars.copy_context()
        finished: queue.Queue = queue.Queue()
        pending: dict[concurrent.futures.Future, list] = {}
        stop = threading.Event()
        source = iter(items)
        exhausted = interrupted = False
        progress = _Progress(
            _progress_mode(self.progress, sys.stderr), total, initial, self.desc, self.unit, self.counters, sys.stderr
        )
        try:
            with _first_sigint_sets(stop):
                while True:
                    while (
                        not exhausted and not stop.is_set() and not self._halt.is_set() and len(pending) < self.window
                    ):
                        chunk = [pair for _, pair in zip(range(self.chunk_size), source)]
                        if not chunk:
                            exhausted = True
                            break
                        future = pool.submit(
                            _call_chunk, self.fn, [item for _, item in chunk], self.chunk_threads, remote, context
                        )
                        pending[future] = [tag for tag, _ in chunk]
                        future.add_done_callback(finished.put)
                    if stop.is_set() or not pending:
                        break
                    try:
                        future = finished.get(timeout=_POLL)
                    except queue.Empty:
                        continue
                    for outcome in self._outcomes(pending.pop(future), future):
                        yield outcome
                        _count(progress, outcome, not_sent)
            if stop.is_set():
                interrupted = True
                for future in pending:
                    future.cancel()
                for future in list(pending):
                    if future.done() and not future.cancelled():
                        for outcome in self._outcomes(pending.pop(future), future):
                            yield outcome
                            _count(progress, outcome, not_sent)
                self.abandoned = sum(len(tags) for f, tags in pending.items() if not f.cancelled())
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            interrupted = interrupted or stop.is_set()
            if self._halt.is_set() and not interrupted and total is not None:
                progress.skip(total - progress.n - progress.not_sent)  # the rows never sent: as the summary counts them
            progress.close()
            for future in pending:
                future.cancel()
            if owned:
                pool.shutdown(wait=not interrupted, cancel_futures=True)
            elif not interrupted:
                concurrent.futures.wait(pending)

    @staticmethod
    def _outcomes(tags: list, future: concurrent.futures.Future) -> Iterator[Outcome]:
        try:
            results = future.result()
        except Exception as exc:  # the task itself failed (e.g. fn could not be pickled): every item of it
            results = [(None, exc)] * len(tags)
        for tag, (value, error) in zip(tags, results):
            yield Outcome(tag, value, error)

    # -- in memory, in input order ------------------------------------------------------

    def map(self, items: Iterable[Any], *, return_exceptions: bool = False) -> list[Any]:
        """``[fn(item) for item in items]``, computed concurrently; results in input order.

        Args:
            items: any iterable (read lazily, as the window has room).
            return_exceptions: put a failed item's exception in its place
                instead of raising the first failure.

        Raises:
            Exception: the first failure's exception when ``return_exceptions`` is False
                (running calls finish, the rest are cancelled).
            KeyboardInterrupt: after the first Ctrl-C (see :meth:`results`).
        """
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
        out: list[Any] = []
        run = self.results(enumerate(items), total=total)
        try:
            for outcome in run:
                if outcome.error is not None and not return_exceptions:
                    raise outcome.error
                if outcome.tag >= len(out):
                    out.extend([None] * (outcome.tag + 1 - len(out)))
                out[outcome.tag] = outcome.error if outcome.error is not None else outcome.value
        finally:
            run.close()
        return out

    # -- to a JSONL file, durable and resumable ---------------------------------------

    def to_jsonl(
        self,
        rows: Callable[[], Iterable[tuple[Any, Any]]],
        path: str | os.PathLike[str],
        *,
        line: Callable[[Any, Any, BaseException | None], str],
        fatal: tuple[type[BaseException], ...] = (),
        stop_on: tuple[type[BaseException], ...] = (),
    ) -> BatchSummary:
        """Run ``fn`` on each row and keep one JSON line per row in the file ``path``.

        Args:
            rows: returns a fresh iterable of ``(row_id, item)`` pairs in input
                order; called twice (a first pass checks every id before anything
                is sent; exceptions it raises, e.g. for a malformed input, pass through).
                A ``row_id`` is any JSON value; it names the row across runs.
            path: the JSONL output. An existing file is resumed: rows whose id has
                a line with ``content`` (and no ``error``) are not sent again.
            line: ``line(row_id, value, error) -> str`` the row's JSON line, without
                the newline; a line with ``"content"`` and no ``"error"`` marks the row done.
            fatal: error types that stop the whole run (raised after the rows
                already finished are written), e.g. a configuration error.
            stop_on: error types that stop the sending but not the run (e.g.
                BudgetExceededError): the calls in flight finish and are written,
                the row that raised it gets no line (a rerun sends it), and
                ``summary.stopped_by`` holds the first such error.

        Every finished row's line is appended and handed to the OS at once; the
        progress counts a row only after that. When all rows have a line, the
        file is rewritten (atomically) with one line per input row in input
        order, dropping lines of ids not in the input. A first Ctrl-C returns
        early with ``interrupted`` set (the file keeps the finished rows, in the
        order they finished).

        Raises:
            BatchError: another run holds the file (its lock ``.NAME.lock``), the
                file is unreadable or not UTF-8, two rows have the same id, an id
                is not JSON (NaN).
        """
        summary = BatchSummary()
        with JsonlOutput(path) as out:
            twice = out.expect(row_id for row_id, _ in rows())
            if twice is not None:
                row_id = next(r for i, (r, _) in enumerate(rows()) if i == twice[1])
                raise BatchError(
                    f"rows {twice[0]} and {twice[1]} (counted from 0) have the same id {row_id!r}; ids must be unique"
                )
            summary.total = out.expected
            summary.done_before = out.load()
            run = self.results(
                _pick(rows(), out.pending()), total=summary.total, initial=summary.done_before, not_sent=stop_on
            )
            try:
                for outcome in run:
                    if fatal and isinstance(outcome.error, fatal):
                        raise outcome.error
                    if stop_on and isinstance(outcome.error, stop_on):
                        summary.stopped_by = summary.stopped_by or outcome.error
                        self.halt()
                        continue
                    ok = outcome.error is None
                    out.append(outcome.tag, line(outcome.tag, outcome.value, outcome.error), ok)
                    if ok:
                        summary.done_now += 1
                    else:
                        summary.failed += 1
                        kind = type(outcome.error).__name__
                        summary.failed_kinds[kind] = summary.failed_kinds.get(kind, 0) + 1
            except KeyboardInterrupt:
                summary.interrupted, summary.abandoned = True, self.abandoned
                return summary
            finally:
                run.close()
            if summary.stopped_by is None:
                summary.dropped = out.finish()
        return summary


def _pick(rows: Iterable[tuple[Any, Any]], positions: Iterator[int]) -> Iterator[tuple[Any, Any]]:
    """The rows at ``positions`` (increasing), streamed."""
    want = next(positions, None)
    for i, row in enumerate(rows):
        if want is None:
            return
        if i == want:
            yield row
            want = next(positions, None)


# --------------------------------------------------------------------------- #
# The output file
# --------------------------------------------------------------------------- #


_JSON = json.JSONDecoder()
_KEY_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, allow_nan=False, default=str)


def row_key(row_id: Any) -> str:
    """The canonical text of a row id (JSON, keys sorted): ``1`` and ``"1"`` are different ids.

    Raises:
        BatchError: the id is NaN or infinite (not JSON).
    """
    if type(row_id) is str:  # the common cases, without the encoder
        return "s" + row_id
    if type(row_id) is int:
        return "i" + str(row_id)
    try:
        return "j" + _KEY_JSON.encode(row_id)
    except ValueError as exc:
        raise BatchError(f"the row id {row_id!r} is not a JSON value (NaN and infinity are not)") from exc


def _digest(row_id: Any) -> bytes:
    return hashlib.blake2b(row_key(row_id).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class JsonlOutput:
    """A batch's JSONL output file, held for one run (a context manager).

    Entering takes an exclusive lock (the file ``.NAME.lock`` next to it, left
    in place; released by the OS if the process dies) and opens a temporary
    on-disk SQLite database for the bookkeeping (memory stays flat in the
    number of rows); nothing else is touched until :meth:`load`.
    Use: :meth:`expect` the input's ids, :meth:`load` the existing file,
    :meth:`pending` to know what to run, :meth:`append` while running,
    :meth:`finish` at the end.

    Raises:
        BatchError: on entering, when another run holds the lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.expected = 0
        self._lock: Any = None
        self._db: Any = None  # sqlite3.Connection
        self._fd = -1
        self._end = 0
        self._appended: list[tuple[bytes, int, int, bool]] = []

    def __enter__(self) -> JsonlOutput:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path.with_name(f".{self.path.name}.lock")), timeout=0)
        try:
            lock.acquire()
        except Timeout as exc:
            raise BatchError(
                f"another run is writing {str(self.path)!r} (it holds {lock.lock_file!r}); "
                "wait for it to end, or write to another file"
            ) from exc
        self._lock = lock
        import sqlite3

        try:
            # inp: the input's row keys by position; lines: every line of the file, in file order;
            # done: the line that counts for each key (built from lines)
            self._db = sqlite3.connect("")  # a private temporary database on disk, deleted on close
            self._db.executescript(
                "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                "CREATE TABLE inp (i INTEGER PRIMARY KEY, k BLOB NOT NULL);"
                "CREATE TABLE lines (k BLOB NOT NULL, off INTEGER, n INTEGER, ok INTEGER);"
                "CREATE TABLE done (k BLOB PRIMARY KEY, off INTEGER, n INTEGER, ok INTEGER) WITHOUT ROWID;"
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def db(self) -> Any:
        assert self._db is not None, "JsonlOutput used outside its with block"
        return self._db

    def expect(self, row_ids: Iterable[Any]) -> tuple[int, int] | None:
        """Record the input's row ids, in input order (exceptions of ``row_ids`` pass through).

        Returns:
            None, or the 0-based positions ``(first, second)`` of the first two rows with the same id.

        Raises:
            BatchError: an id is NaN or infinite.
        """
        start = self.expected
        self.db.executemany("INSERT INTO inp (k) VALUES (?)", ((_digest(r),) for r in row_ids))
        ((self.expected,),) = self.db.execute("SELECT count(*) FROM inp")
        self.db.execute("CREATE INDEX IF NOT EXISTS inp_k ON inp (k)")
        if not self.db.execute("SELECT 1 FROM inp GROUP BY k HAVING count(*) > 1 LIMIT 1").fetchone():
            return None
        twice = self.db.execute(
            "SELECT a.i - 1, b.i - 1 FROM inp b JOIN inp a ON a.k = b.k AND a.i < b.i "
            "WHERE b.i > ? ORDER BY b.i LIMIT 1",
            (start,),
        ).fetchone()
        return None if twice is None else (twice[0], twice[1])

    def _index(self) -> None:
        # per key: its first content line, else its last error line
        self._flush_appended()
        self.db.execute("DELETE FROM done")
        self.db.execute(
            "INSERT INTO done SELECT k, off, n, ok FROM lines WHERE true ORDER BY k, ok, rowid "
            "ON CONFLICT (k) DO UPDATE SET off = excluded.off, n = excluded.n, ok = excluded.ok "
            "WHERE done.ok = 0"
        )

    def load(self) -> int:
        """Index the lines of the existing file (if any) and open it for appending.

        Lines that are not JSON objects with an ``id`` (e.g. half a line left by a
        killed run) are ignored. Returns the number of expected rows already done.

        Raises:
            BatchError: the file cannot be read or is not UTF-8 text.
        """

        def records(f: Any) -> Iterator[tuple[bytes, int, int, int]]:
            off = 0
            for raw in f:
                try:
                    rec = _JSON.decode(raw.decode("utf-8"))
                except ValueError as exc:  # a torn line (a killed run's last); or not UTF-8 at all
                    if isinstance(exc, UnicodeDecodeError) and raw.endswith(b"\n"):
                        raise BatchError(
                            f"the output file {str(self.path)!r} is not UTF-8 text (near byte "
                            f"{off + exc.start}); is it really an earlier output?"
                        ) from exc
                    rec = None
                if isinstance(rec, dict) and "id" in rec:
                    with suppress(BatchError):
                        yield _digest(rec["id"]), off, len(raw), int("content" in rec and "error" not in rec)
                off += len(raw)

        try:
            with open(self.path, "rb") as f:
                self.db.executemany("INSERT INTO lines VALUES (?, ?, ?, ?)", records(f))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BatchError(f"cannot read the output file {str(self.path)!r}: {exc.strerror or exc}") from exc
        self._index()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise BatchError(f"cannot write the output file {str(self.path)!r}: {exc.strerror or exc}") from exc
        self._fd, self._end = fd, os.fstat(fd).st_size
        if self._end:  # a run killed mid-write may leave half a line: start on a fresh one
            with open(self.path, "rb") as f:
                f.seek(self._end - 1)
                if f.read(1) != b"\n":
                    self._write(b"\n")
        ((done,),) = self.db.execute("SELECT count(*) FROM inp JOIN done USING (k) WHERE ok")
        return done

    def pending(self) -> Iterator[int]:
        """The 0-based positions of the expected rows without a content line, in increasing order."""
        if not self.db.execute("SELECT 1 FROM done WHERE ok LIMIT 1").fetchone():
            return iter(range(self.expected))
        cursor = self.db.execute(
            "SELECT i - 1 FROM inp WHERE NOT EXISTS (SELECT 1 FROM done WHERE done.k = inp.k AND done.ok) ORDER BY i"
        )
        return (i for (i,) in cursor)

    def _write(self, data: bytes) -> int:
        off = self._end
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._end += len(data)
        return off

    def append(self, row_id: Any, line: str, ok: bool) -> None:
        """Append the row's line and hand it to the OS at once (it survives the process being killed)."""
        data = line.encode("utf-8") + b"\n"
        self._appended.append((_digest(row_id), self._write(data), len(data), ok))
        if len(self._appended) >= 1000:  # the index is needed only at the end: fill it in batches
            self._flush_appended()

    def _flush_appended(self) -> None:
        self.db.executemany("INSERT INTO lines VALUES (?, ?, ?, ?)", self._appended)
        self._appended.clear()

    def finish(self) -> int:
        """Rewrite the file atomically in input order: each expected row's line (content, else its
        last error), nothing else. Returns the number of ids dropped (lines of ids not in the input)."""
        self._index()
        ((ids,),) = self.db.execute("SELECT count(*) FROM done")
        written = 0
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                fd = src.fileno()
                for off, n in self.db.execute(
                    "SELECT d.off, d.n FROM inp CROSS JOIN done d ON d.k = inp.k ORDER BY inp.i"
                ):
                    written += 1
                    data = os.pread(fd, n, off)
                    dst.write(data if data.endswith(b"\n") else data + b"\n")
                dst.flush()
                os.fsync(dst.fileno())
            with suppress(OSError):
                os.chmod(tmp, stat.S_IMODE(os.stat(self.path).st_mode))
            os.replace(tmp, self.path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        return ids - written


def finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats (at any depth in lists and dicts) turned into strings, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
