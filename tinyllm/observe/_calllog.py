"""The call log: one SQLite row per call (``LOG_CALLS=true``; the ``tinyllm`` command logs by default).

Each row holds what was sent and what came back: an id sortable by time, the time,
the template's name, path and content hash, the variables, the messages sent (each inline image, audio or file as its sha256 and size, never its bytes), the
reply (text; content, tool calls, refusal), the model asked for and the model that
answered, the api_type and endpoint (URLs redacted), the parameters, usage, cost
(USD), latency, time to first token, cached or not, retries, output retries, the
error type and message of a failed call, the tool rounds (each call's tool, arguments, result or
error, duration), and the batch id of a ``map`` run. A streamed call is one row too, written when
its stream ends, fails, is closed (``StreamClosed``) or dropped unfinished (``StreamAbandoned``),
with the text received so far (:func:`watch_stream`). With
fallbacks, each client's failed try is a row of its own (its api_type, model and
error) before the call's row, which names the client that answered. API keys
never: besides never being put in, every known key is masked out of each field.

The file is ``LOG_DB``, else ``calls.db`` in the user's data directory (platformdirs),
created mode 0600. Writing never slows or fails a call: the calling thread only puts
the finished :class:`~tinyllm.Response` on a bounded queue; a background thread per
file (started on demand, ended after a few idle seconds, and anew in a forked child)
turns them into rows and writes them in batches; the queue is flushed at exit. A full
queue, or a locked, unwritable or broken file, is logged once at WARNING and the rows
are dropped; the calls go on. Many processes can log to one file at once (WAL mode,
a busy timeout, one ``BEGIN IMMEDIATE`` transaction per batch).

Reading (``tinyllm logs``): :func:`connect`, :func:`query`, :func:`get`, :func:`stats`.
``-q`` searches the template, variables, messages, reply and error with SQLite FTS5.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
import weakref
from typing import Any, Callable, Iterator

from . import _otel as otel

__all__ = [
    "CallLog",
    "call_log",
    "log_path",
    "default_path",
    "observed",
    "aobserved",
    "watch_stream",
    "StreamObserver",
    "StreamClosed",
    "StreamAbandoned",
    "batch",
    "flush_all",
    "damaged",
    "new_id",
    "connect",
    "query",
    "get",
    "stats",
    "values",
]

log = logging.getLogger("tinyllm")
QUEUE_SIZE = 10_000  # rows waiting to be written; beyond this they are dropped (one WARNING)
BATCH_SIZE = 500  # rows per transaction at most
IDLE_SECONDS = 5.0  # a writer thread with nothing to do for this long ends (a new one starts on demand)
BUSY_TIMEOUT = 30.0  # seconds a write waits for another process's lock before the batch is dropped
SCHEMA_VERSION = 2  # 1: the first schema; 2: the tool_rounds column (added to a version 1 file by _setup)

_COLUMNS = (
    "id",
    "ts",
    "template",
    "template_path",
    "template_hash",
    "variables",
    "messages",
    "response",
    "reply",
    "model_requested",
    "model",
    "api_type",
    "endpoint",
    "params",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "usage",
    "cost",
    "latency",
    "ttft",
    "cached",
    "retries",
    "output_retries",
    "finish_reason",
    "error_type",
    "error_message",
    "batch_id",
    "pid",
    "tool_rounds",
)
_TEXT_COLUMNS = (
    "template",
    "template_path",
    "variables",
    "messages",
    "response",
    "reply",
    "model_requested",
    "model",
    "endpoint",
    "params",
    "usage",
    "error_message",
    "tool_rounds",
)
_FTS_COLUMNS = ("template", "variables", "messages", "response", "error_message")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    ts REAL NOT NULL,
    template TEXT, template_path TEXT, template_hash TEXT,
    variables TEXT, messages TEXT, response TEXT, reply TEXT,
    model_requested TEXT, model TEXT, api_type TEXT, endpoint TEXT, params TEXT,
    prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, usage TEXT,
    cost REAL, latency REAL, ttft REAL, cached INTEGER, retries INTEGER, output_retries INTEGER,
    finish_reason TEXT, error_type TEXT, error_message TEXT, batch_id TEXT, pid INTEGER,
    tool_rounds TEXT
);
CREATE INDEX IF NOT EXISTS calls_ts ON calls(ts);
CREATE INDEX IF NOT EXISTS calls_batch ON calls(batch_id);
CREATE INDEX IF NOT EXISTS calls_model ON calls(model);
CREATE INDEX IF NOT EXISTS calls_template ON calls(template);
"""
_FTS_SCHEMA = f"""
CREATE VIRTUAL TABLE IF NOT EXISTS calls_fts USING fts5({", ".join(_FTS_COLUMNS)}, content='calls', content_rowid='seq');
CREATE TRIGGER IF NOT EXISTS calls_fts_insert AFTER INSERT ON calls BEGIN
    INSERT INTO calls_fts(rowid, {", ".join(_FTS_COLUMNS)}) VALUES (new.seq, {", ".join("new." + c for c in _FTS_COLUMNS)});
END;
CREATE TRIGGER IF NOT EXISTS calls_fts_delete AFTER DELETE ON calls BEGIN
    INSERT INTO calls_fts(calls_fts, rowid, {", ".join(_FTS_COLUMNS)})
        VALUES ('delete', old.seq, {", ".join("old." + c for c in _FTS_COLUMNS)});
END;
"""
#: columns added after the first schema, as (name, SQL type): a file made by an older tinyllm gets them
#: (ALTER TABLE ... ADD COLUMN; its rows read them as NULL), and an older tinyllm writing a newer file
#: names its own columns, so it leaves them NULL
_ADDED_COLUMNS = (("tool_rounds", "TEXT"),)
_INSERT = f"INSERT OR IGNORE INTO calls ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"

_batch: contextvars.ContextVar[str | None] = contextvars.ContextVar("tinyllm_batch", default=None)


def new_id() -> str:
    """A call id: 12 hex digits of Unix milliseconds, then 10 random ones; sorts by time (str)."""
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(40):010x}"


@contextlib.contextmanager
def batch(batch_id: str | None = None) -> Iterator[str]:
    """Tag the calls of this block (this thread or task, and threads started with a copy of its
    context) with one batch id (default: a new :func:`new_id`); yields the id."""
    batch_id = batch_id or new_id()
    token = _batch.set(batch_id)
    try:
        yield batch_id
    finally:
        _batch.reset(token)


# --------------------------------------------------------------------------- #
# Where
# --------------------------------------------------------------------------- #

_default_path: tuple[Any, str] | None = None  # (the environment it was computed in, the path)


def default_path() -> str:
    """``calls.db`` in the user's data directory (``platformdirs.user_data_dir("tinyllm")``;
    on Linux ``$XDG_DATA_HOME/tinyllm``, by default ``~/.local/share/tinyllm``)."""
    global _default_path
    key = (os.environ.get("XDG_DATA_HOME"), os.environ.get("HOME"), os.environ.get("LOCALAPPDATA"))
    memo = _default_path
    if memo is None or memo[0] != key:
        import platformdirs

        memo = _default_path = (key, os.path.join(platformdirs.user_data_dir("tinyllm", appauthor=False), "calls.db"))
    return memo[1]


def log_path(cfg: Any) -> str:
    """The call log's file for settings ``cfg``: ``LOG_DB`` (``~`` expanded), else :func:`default_path`."""
    return os.path.abspath(os.path.expanduser(cfg.log_db)) if cfg.log_db else default_path()


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #

_STOP = object()


class CallLog:
    """The writer of one log file: a bounded queue and a background thread that drains it.

    Args:
        path: the SQLite file (created, with its directory, when missing; mode 0600).
        queue_size: rows that may wait (default :data:`QUEUE_SIZE`); a row that finds the queue full is dropped.

    :meth:`record` is what the calling thread pays (a put on a queue); everything
    else happens on the writer thread. Use :func:`call_log` to get the one object of a path.
    """

    def __init__(self, path: str, queue_size: int | None = None) -> None:
        # Imported here, in the calling thread, never first on the writer thread: a fork() while
        # that thread imports would leave the module's import lock held forever in the child.
        import sqlite3  # noqa: F401
        import urllib.parse  # noqa: F401

        self.path = path
        self.queue_size = QUEUE_SIZE if queue_size is None else queue_size
        self._reset()

    def _reset(self) -> None:
        self._queue: queue.Queue = queue.Queue(self.queue_size)
        self._lock = threading.Lock()
        self._db_lock = threading.Lock()  # held while a connection is open; fork() waits for it
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()
        self.written = 0
        self.dropped = 0

    def __repr__(self) -> str:
        return f"CallLog({self.path!r}, written={self.written}, dropped={self.dropped})"

    def record(self, item: tuple) -> None:
        """Queue one finished call (the tuple :func:`observed` builds) for writing; never blocks, never raises."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            self._warn(
                "full",
                f"the call log queue is full ({self.queue_size} rows waiting for {self.path}); rows are being dropped",
            )
            return
        self._start()

    def _start(self) -> None:
        # under the lock: a writer that found the queue empty has cleared _thread before we look
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="tinyllm-calllog", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # interpreter shutting down
                    return
                self._thread = thread

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued row is written (or dropped); False if ``timeout`` seconds passed first."""
        q = self._queue
        deadline = time.monotonic() + timeout
        with q.all_tasks_done:
            while q.unfinished_tasks:
                if self._thread is None:  # e.g. rows queued while a thread could not start
                    self._start()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                q.all_tasks_done.wait(min(left, 0.5))
        return True

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s (calls are not affected; this is shown once)", message)

    # -- the writer thread ------------------------------------------------------------
    def _run(self) -> None:
        q = self._queue
        try:
            while True:
                try:
                    first = q.get(timeout=IDLE_SECONDS)
                except queue.Empty:
                    with self._lock:
                        if q.empty():
                            self._thread = None
                            return
                    continue
                items = [first]
                while len(items) < BATCH_SIZE:
                    try:
                        items.append(q.get_nowait())
                    except queue.Empty:
                        break
                try:
                    rows = []
                    for item in items:
                        try:
                            rows.append(_row(item))
                        except Exception as exc:  # noqa: BLE001 - one odd call must not stop the log
                            self._warn("row", f"a call could not be turned into a log row: {type(exc).__name__}: {exc}")
                    if rows:
                        self._write(rows)
                finally:
                    for _ in items:
                        q.task_done()
        finally:
            with self._lock:
                if self._thread is threading.current_thread():  # also after an unexpected error: restartable
                    self._thread = None

    def _write(self, rows: list[tuple]) -> None:
        """Write ``rows`` in one transaction, on a connection opened for it (none stays open between
        batches: a fork() then never copies an open SQLite connection into the child).

        A damaged file (not a database, or a malformed one) is moved aside, to
        ``<path>.damaged-<UTC time>`` with its ``-wal`` and ``-shm`` files, a new log is started at
        ``path`` and the rows go there; one WARNING names both files. Other failures (disk full,
        permissions) drop the rows, with one WARNING naming the file."""
        import sqlite3

        with self._db_lock:
            for attempt in range(3):
                try:
                    self._insert(rows)
                    return
                except sqlite3.DatabaseError as exc:
                    if not damaged(exc) or attempt == 2:
                        return self._drop(rows, exc)
                    if attempt == 0:
                        continue  # another process may have moved it aside already: look again first
                    try:
                        aside = _move_aside(self.path)
                    except OSError as move_error:
                        return self._drop(
                            rows,
                            exc,
                            f"; it could not be moved aside ({move_error}): move it away "
                            f"by hand (mv {self.path} {self.path}.damaged) and a new one starts",
                        )
                    log.warning(
                        "the call log %s was damaged (%s); it was moved aside to %s and a new log started in its place",
                        self.path,
                        exc,
                        aside,
                    )
                except OSError as exc:
                    return self._drop(rows, exc)

    def _insert(self, rows: list[tuple]) -> None:
        import sqlite3

        conn = _open_for_writing(self.path)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            self.written += len(rows)
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _drop(self, rows: list[tuple], exc: BaseException, hint: str = "") -> None:
        self.dropped += len(rows)
        self._warn("write", f"cannot write the call log {self.path}: {exc}{hint}")


def damaged(exc: BaseException) -> bool:
    """Whether an sqlite3 error says the file itself is damaged (SQLITE_CORRUPT, SQLITE_NOTADB), not busy or full."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc).lower()
    return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text


def _move_aside(path: str) -> str:
    """Rename the damaged log ``path`` (and its ``-wal``, ``-shm`` files) to ``<path>.damaged-<UTC time>``;
    returns that name. Raises OSError."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 1
    while os.path.exists(aside):
        n += 1
        aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{n}"
    os.rename(path, aside)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(path + suffix, aside + suffix)
    return aside


def _open_for_writing(path: str) -> Any:
    import sqlite3

    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if not os.path.exists(path):
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # private: prompts and replies
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        _setup(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _setup(conn: Any) -> None:
    """WAL mode and the schema (idempotent; several processes may do it at once)."""
    import sqlite3

    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(_SCHEMA):
                    conn.execute(statement)
                _add_columns(conn)
                if _has_fts5(conn):
                    for statement in _statements(_FTS_SCHEMA):
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _add_columns(conn: Any) -> None:
    """Add the columns of :data:`_ADDED_COLUMNS` that the ``calls`` table lacks (a file of an older schema)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
    for name, kind in _ADDED_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE calls ADD COLUMN {name} {kind}")


def _statements(script: str) -> list[str]:
    """The statements of a schema script (triggers kept whole)."""
    import sqlite3

    out, current = [], ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


def _has_fts5(conn: Any) -> bool:
    import sqlite3

    try:
        conn.execute("CREATE VIRTUAL TABLE temp.tinyllm_fts5_probe USING fts5(x)")
        conn.execute("DROP TABLE temp.tinyllm_fts5_probe")
        return True
    except sqlite3.OperationalError:
        return False


# -- turning a finished call into a row (on the writer thread) ------------------------

_prompt_info: "weakref.WeakKeyDictionary[Any, tuple[str | None, str | None]]" = weakref.WeakKeyDictionary()


def _template_info(prompt: Any) -> tuple[str | None, str | None]:
    """(system template path, sha256 of the system and user files' bytes, 16 hex digits) of a Prompt, memoized."""
    if prompt is None:
        return None, None
    try:
        return _prompt_info[prompt]
    except (KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    try:
        for path in (prompt.system_path, prompt.user_path):
            if path is not None:
                with open(path, "rb") as f:
                    digest.update(f.read())
                digest.update(b"\0")
        info: tuple[str | None, str | None] = (str(prompt.system_path), digest.hexdigest()[:16])
    except (OSError, AttributeError):
        info = (str(getattr(prompt, "system_path", "")) or None, None)
    with contextlib.suppress(TypeError):
        _prompt_info[prompt] = info
    return info


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, default=_plain)


def _without_media(messages: Any) -> Any:
    """The messages with each inline image, audio or file as its sha256 and size (:func:`tinyllm.media.redacted`)."""
    from ..media import redacted

    return redacted(messages)


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return value.__name__
    return str(value)


#: header names whose values are logged as sent (lower case); every other header's value is masked
SAFE_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "content-type",
        "user-agent",
        "openai-organization",
        "openai-project",
        "openai-beta",
        "x-stainless-retry-count",
        "x-request-id",
        "x-client-request-id",
        "idempotency-key",
        "helicone-cache-enabled",
    }
)
#: query parameter names whose values are logged as sent (lower case); every other one's value is masked
SAFE_QUERY = frozenset({"api-version", "api_version", "model", "format", "stream"})
MASKED = "****"


def _public_params(params: dict) -> dict:
    """Parameters as logged: the values of ``extra_headers`` and ``extra_query`` masked (``****``)
    unless the header or query name is known to be safe (:data:`SAFE_HEADERS`, :data:`SAFE_QUERY`):
    a credential can travel under any name (``X-Password``, ``?sig=``)."""
    out = dict(params)
    for name, safe in (("extra_headers", SAFE_HEADERS), ("extra_query", SAFE_QUERY)):
        given = out.get(name)
        if isinstance(given, dict):
            out[name] = {k: (v if str(k).lower() in safe else MASKED) for k, v in given.items()}
        elif given is not None:
            out[name] = MASKED
    return out


def _masked_values(params: dict) -> list[str]:
    """The header and query values :func:`_public_params` masks, to scrub them from every other column too
    (an error message that echoes them); only those of 8 characters or more, which cannot be JSON syntax
    or a common word (a header ``X-Debug: true`` must not turn every ``true`` of the row into ``****``)."""
    values: list[str] = []
    for name, safe in (("extra_headers", SAFE_HEADERS), ("extra_query", SAFE_QUERY)):
        given = params.get(name)
        if isinstance(given, dict):
            values += [
                str(v) for k, v in given.items() if str(k).lower() not in safe and v is not None and len(str(v)) >= 8
            ]
    return values


def _secrets(sender: Any, cfg: Any, params: dict | None = None) -> list[str]:
    from ..config import API_KEY_NAMES

    values = [cfg.secrets.get(name) for name in API_KEY_NAMES]
    values += list(getattr(sender, "_secrets", {}).values())
    values += _masked_values(params or {})
    return sorted({v for v in values if isinstance(v, str) and len(v) >= 4}, key=len, reverse=True)


def _row(item: tuple) -> tuple:
    from ..config import mask, redact_url

    call_id, ts, response, sender, params, exc, batch_id, latency, pid = item
    cfg = sender.settings()
    try:
        resolved = sender.resolve_params(params, cfg)
    except Exception:  # noqa: BLE001 - a call that failed on its parameters: log them as given
        resolved = dict(params)
    model_requested = resolved.get("model")
    try:
        endpoint = sender.endpoint(cfg, model_requested) if model_requested else None
    except Exception:  # noqa: BLE001 - e.g. no endpoint configured (that call failed too)
        endpoint = None
    if isinstance(endpoint, dict):
        endpoint = {k: redact_url(v) if isinstance(v, str) and "://" in v else v for k, v in endpoint.items()}
    template_path, template_hash = _template_info(getattr(response, "prompt", None))
    message = response.message or {}
    reply = (
        {k: message[k] for k in ("content", "tool_calls", "refusal") if message.get(k) is not None} if message else None
    )
    usage = response.usage or {}
    parts = getattr(response, "_parts", None)
    if exc is not None and parts:  # a stream that failed, was closed or dropped: the text received so far
        text: str | None = "".join(parts)
    else:
        text = response.text if response.message is not None else None
    rounds = [r.as_dict() for r in response.tool_rounds] if getattr(response, "tool_rounds", None) else None
    row: dict[str, Any] = {
        "id": call_id,
        "ts": ts,
        "template": response.template,
        "template_path": template_path,
        "template_hash": template_hash,
        "variables": _json(response.variables),
        "messages": _json(_without_media(response.messages)),
        "response": text,
        "reply": _json(reply),
        "model_requested": model_requested,
        "model": response.model or model_requested,
        "api_type": response.api_type or getattr(sender, "api_type", None),
        "endpoint": _json(endpoint),
        "params": _json(_public_params(resolved)),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
        "usage": _json(usage),
        "cost": response.cost,
        "latency": latency,
        "ttft": response.time_to_first_token,
        "cached": int(bool(response.cached)),
        "retries": response.retries,
        "output_retries": response.output_retries,
        "finish_reason": response.finish_reason,
        "error_type": type(exc).__name__ if exc is not None else None,
        "error_message": str(exc) if exc is not None else None,
        "batch_id": batch_id,
        "pid": pid,
        "tool_rounds": _json(rounds),
    }
    secrets = _secrets(sender, cfg, resolved)
    if secrets:
        hidden = set(_masked_values(resolved))  # header and query values: nothing of them is shown
        for column in _TEXT_COLUMNS:
            text = row[column]
            if isinstance(text, str):
                for secret in secrets:
                    if secret in text:
                        text = text.replace(secret, MASKED if secret in hidden else mask(secret))
                row[column] = text
    return tuple(row[c] for c in _COLUMNS)


# -- the registry of writers, fork and exit --------------------------------------------

_logs: dict[str, CallLog] = {}
_logs_lock = threading.Lock()


def call_log(path: str) -> CallLog:
    """The :class:`CallLog` writing ``path`` (one per path and process, created on first use)."""
    found = _logs.get(path)
    if found is None:
        with _logs_lock:
            found = _logs.get(path)
            if found is None:
                found = _logs[path] = CallLog(path)
    return found


def flush_all(timeout: float = 10.0) -> bool:
    """Write every queued row of every log of this process; False if ``timeout`` seconds passed first."""
    deadline = time.monotonic() + timeout
    ok = True
    for entry in list(_logs.values()):
        ok = entry.flush(max(0.0, deadline - time.monotonic())) and ok
    return ok


_held_at_fork: list[CallLog] = []


def _before_fork() -> None:
    for entry in list(_logs.values()):  # no write under way at the fork (bounded: a stuck write is not waited for)
        if entry._db_lock.acquire(timeout=5.0):
            _held_at_fork.append(entry)


def _after_fork_in_parent() -> None:
    while _held_at_fork:
        _held_at_fork.pop()._db_lock.release()


def _after_fork_in_child() -> None:
    global _logs_lock
    _held_at_fork.clear()
    _logs_lock = threading.Lock()
    for entry in _logs.values():
        entry._reset()  # the parent's queued rows are the parent's to write; the child gets its own thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
atexit.register(flush_all, 5.0)


# --------------------------------------------------------------------------- #
# The hook around a call
# --------------------------------------------------------------------------- #


def _record(cfg: Any, sender: Any, response: Any, params: dict, exc: BaseException | None) -> None:
    try:
        latency = response.latency if response.latency is not None else time.perf_counter() - response._started
        writer = call_log(log_path(cfg))
        batch_id, pid = _batch.get(), os.getpid()
        # with fallbacks: a row per failed try of a client (its api_type, model, error), then the call's own
        attempts = [
            *getattr(response, "attempts", ()),
            *(a for a in getattr(exc, "attempts", ()) if a.error is not exc),
        ]
        for attempt in attempts:
            if attempt.error is None:  # skipped (cooling down): nothing was sent
                continue
            stub = type(response)(
                response.messages,
                model=attempt.model,
                api_type=attempt.api_type,
                template=response.template,
                variables=response.variables,
                prompt=response.prompt,
            )
            writer.record(
                (
                    new_id(),
                    attempt.time,
                    stub,
                    attempt.client,
                    attempt.params,
                    attempt.error,
                    batch_id,
                    attempt.latency,
                    pid,
                )
            )
        answered = getattr(response, "client", None)
        params_for = getattr(sender, "params_for", None)
        if answered is not None and params_for is not None:  # the row names the client that answered
            sender, params = answered, params_for(answered, params)
        writer.record((new_id(), time.time(), response, sender, params, exc, batch_id, latency, pid))
    except Exception as err:  # noqa: BLE001 - logging never fails a call
        log.debug("call log: %s", err)


class StreamClosed(Exception):
    """The error type a streamed call's row gets (never raised) when the stream was closed before it
    ended: ``close()`` / ``aclose()`` / a ``with`` block left early, or its asyncio task cancelled."""


class StreamAbandoned(Exception):
    """The error type a streamed call's row gets (never raised) when the stream was dropped unfinished
    (its Response freed, e.g. after a ``break``, without ``close()``)."""


_DETACHED = ("_stream", "_on_done", "_observer")


class StreamObserver:
    """The call log's watch on one streamed call (``LLMCall.stream``/``astream``, ``LLMChat.stream``/``astream``):
    one row, written once, by whichever comes first: the stream's end (complete, or failed with the
    error and the partial text), :meth:`closed`, or the Response dropped unfinished (a weakref finalizer
    on it, which holds the Response's fields, never the Response: see :func:`watch_stream`).

    Made only when ``LOG_CALLS`` is on; a stream closed or dropped before its first text delta read
    nothing and is not logged (nothing was sent, or nothing was received)."""

    __slots__ = ("__weakref__", "cfg", "params", "sender", "written")

    def __init__(self, cfg: Any, sender: Any, params: dict) -> None:
        self.cfg, self.sender, self.params, self.written = cfg, sender, params, False

    def ended(self, response: Any, exc: BaseException | None) -> None:
        """The stream ended: complete (``exc`` None) or failed with ``exc`` (an asyncio cancellation is logged
        as :class:`StreamClosed`). Never raises."""
        if self.written:
            return
        self.written = True
        if exc is not None and type(exc).__name__ == "CancelledError":
            exc = StreamClosed(f"the stream was cancelled after {_chars(response._parts)} characters, before it ended")
        _record(self.cfg, self.sender, response, self.params, exc)

    def closed(self, response: Any) -> None:
        """The stream was closed before it ended (a no-op once it ended or when nothing was read)."""
        if self.written or response.time_to_first_token is None:
            return
        self.ended(
            response, StreamClosed(f"the stream was closed after {_chars(response._parts)} characters, before it ended")
        )

    def abandoned(self, fields: dict) -> None:
        """The Response with these fields (its ``__dict__``) was freed unfinished: log a copy of it."""
        if self.written or fields.get("time_to_first_token") is None:
            return
        self.written = True
        try:
            from ..response import Response

            copy = Response(
                **{
                    f.name: fields[f.name]
                    for f in dataclasses.fields(Response)
                    if f.init and f.name not in _DETACHED and f.name in fields
                }
            )
        except Exception as err:  # noqa: BLE001 - logging never fails a call
            log.debug("call log: %s", err)
            return
        _record(
            self.cfg,
            self.sender,
            copy,
            self.params,
            StreamAbandoned(f"the stream was dropped unfinished after {_chars(copy._parts)} characters"),
        )


def _chars(parts: list) -> int:
    return sum(len(p) for p in parts)


def watch_stream(sender: Any, response: Any, params: dict) -> None:
    """Log the streamed call ``response`` (a :class:`~tinyllm.Response` set to read a stream) when
    ``LOG_CALLS`` is on: one row when it ends, fails, is closed or is dropped (see :class:`StreamObserver`).
    With LOG_CALLS off it only reads the setting.

    The finalizer holds the Response's ``__dict__``, which refers to the observer, never the other
    way: no reference cycle, so a dropped stream is still freed (and its request slot given back) at once.
    """
    cfg = sender.settings()
    if not cfg.log_calls:
        return
    observer = StreamObserver(cfg, sender, params)
    response._observer = observer
    weakref.finalize(response, observer.abandoned, response.__dict__)


def _resolved(sender: Any, params: dict, cfg: Any) -> dict:
    try:
        return sender.resolve_params(params, cfg)
    except Exception:  # noqa: BLE001 - the call itself will report it
        return params


def observed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``respond_with(sender, response, params, ...)``: a span around the call (when a
    tracer provider is set) and a log row for it, also when it fails (the error is re-raised)."""

    @functools.wraps(fn)
    def wrapper(sender: Any, response: Any, params: dict, *args: Any, **kwargs: Any) -> Any:
        cfg = sender.settings()
        logging_on, tracing = cfg.log_calls, otel.enabled()
        if not logging_on and not tracing:
            return fn(sender, response, params, *args, **kwargs)
        span = (
            otel.call_span(sender.api_type, _resolved(sender, params, cfg), response)
            if tracing
            else contextlib.nullcontext()
        )
        try:
            with span:
                result = fn(sender, response, params, *args, **kwargs)
        except BaseException as exc:
            if logging_on:
                _record(cfg, sender, response, params, exc)
            raise
        if logging_on:
            _record(cfg, sender, response, params, None)
        return result

    return wrapper


def aobserved(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The asyncio twin of :func:`observed`, for ``arespond_with``."""

    @functools.wraps(fn)
    async def wrapper(sender: Any, response: Any, params: dict, *args: Any, **kwargs: Any) -> Any:
        cfg = sender.settings()
        logging_on, tracing = cfg.log_calls, otel.enabled()
        if not logging_on and not tracing:
            return await fn(sender, response, params, *args, **kwargs)
        span = (
            otel.call_span(sender.api_type, _resolved(sender, params, cfg), response)
            if tracing
            else contextlib.nullcontext()
        )
        try:
            with span:
                result = await fn(sender, response, params, *args, **kwargs)
        except BaseException as exc:
            if logging_on:
                _record(cfg, sender, response, params, exc)
            raise
        if logging_on:
            _record(cfg, sender, response, params, None)
        return result

    return wrapper


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #

_JSON_COLUMNS = ("variables", "messages", "reply", "endpoint", "params", "usage", "tool_rounds")


def connect(path: str) -> Any:
    """A read connection to the log at ``path`` (``sqlite3.Connection``, rows as ``sqlite3.Row``).

    Raises:
        FileNotFoundError: no log file at ``path``.
        sqlite3.Error: the file is not a readable SQLite database.
    """
    import sqlite3

    if not os.path.exists(path):
        raise FileNotFoundError(path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
    conn.row_factory = sqlite3.Row
    conn.execute("SELECT 1 FROM calls LIMIT 1")  # sqlite3.Error now for a file that is no call log
    return conn


def record_of(row: Any) -> dict[str, Any]:
    """A row as plain data: JSON columns decoded, ``cached`` a bool, ``error`` ``{"type", "message"}`` or None,
    ``tool_rounds`` the call's tool rounds (``[{"index", "duration", "calls": [{"id", "name", "arguments",
    "raw_arguments", "content", "error", "duration", "round"}]}]``, seconds) or None (none ran, or a row
    written before the call log kept them)."""
    out = dict(row)
    out.pop("seq", None)
    out.setdefault("tool_rounds", None)  # a file of the first schema, read without being written
    for column in _JSON_COLUMNS:
        if out.get(column) is not None:
            with contextlib.suppress(ValueError):
                out[column] = json.loads(out[column])
    if "cached" in out:
        out["cached"] = bool(out["cached"])
    out["error"] = (
        {"type": out.pop("error_type"), "message": out.pop("error_message")} if out.get("error_type") else None
    )
    out.pop("error_type", None)
    out.pop("error_message", None)
    return out


def _filters(
    template: str | None,
    model: str | None,
    since: float | None,
    errors: bool,
    batch_id: str | None,
    text: str | None,
    has_fts: bool,
) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if template:
        where.append("(template = ? OR template LIKE ? ESCAPE '\\')")
        args += [template, template.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ".system.%"]
    if model:
        op = "GLOB" if any(ch in model for ch in "*?[") else "="
        where.append(f"(model {op} ? OR model_requested {op} ?)")
        args += [model, model]
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if errors:
        where.append("error_type IS NOT NULL")
    if batch_id:
        where.append("batch_id LIKE ?")
        args.append(batch_id.replace("%", "") + "%")
    if text:
        if has_fts:
            where.append("seq IN (SELECT rowid FROM calls_fts WHERE calls_fts MATCH ?)")
            args.append(text)
        else:
            where.append("(" + " OR ".join(f"{c} LIKE ?" for c in _FTS_COLUMNS) + ")")
            args += [f"%{text}%"] * len(_FTS_COLUMNS)
    return (" WHERE " + " AND ".join(where)) if where else "", args


def _fts(conn: Any) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'calls_fts'").fetchone() is not None


def query(
    conn: Any,
    *,
    limit: int = 20,
    template: str | None = None,
    model: str | None = None,
    since: float | None = None,
    errors: bool = False,
    batch_id: str | None = None,
    text: str | None = None,
    until: float | None = None,
    before: str | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` calls matching every filter given, newest first, as :func:`record_of` dicts.

    Filters: ``template`` (a name as given to LLMCall, or its short form ``NAME`` for
    ``NAME.system.*``), ``model`` (asked or answered; ``*`` globs), ``since`` and ``until``
    (Unix time, ``since <= ts < until``), ``errors`` (failed calls only), ``batch_id`` (or a
    prefix), ``text`` (an FTS5 query over the template, variables, messages, reply and error).

    ``before``: a call id; only calls listed after it (older) are returned, so the next page
    is ``query(..., before=page[-1]["id"])``: keyset pagination, as fast on page 1,000 as on
    page 1 (an unknown id gives no rows).

    Raises:
        sqlite3.OperationalError: a malformed FTS5 query.
    """
    where, args = _filters(template, model, since, errors, batch_id, text, _fts(conn))
    more = []
    if until is not None:
        more.append("ts < ?")
        args.append(until)
    if before is not None:
        row = conn.execute("SELECT ts FROM calls WHERE id = ?", [before]).fetchone()
        if row is None:
            return []
        more.append("ts <= ? AND (ts < ? OR id < ?)")
        args += [row[0], row[0], before]
    if more:
        where = (where + " AND " if where else " WHERE ") + " AND ".join(more)
    rows = conn.execute(f"SELECT * FROM calls{where} ORDER BY ts DESC, id DESC LIMIT ?", [*args, limit]).fetchall()
    return [record_of(r) for r in rows]


def get(conn: Any, call_id: str) -> dict[str, Any] | None:
    """The call with id ``call_id`` (or the only one whose id starts with it; ``last``: the newest), or None.

    Raises:
        LookupError: the prefix matches several calls.
    """
    if call_id == "last":
        rows = conn.execute("SELECT * FROM calls ORDER BY ts DESC, id DESC LIMIT 1").fetchall()
    else:  # ids are lowercase hex: a prefix is an index range (LIKE, case-insensitive, would scan the table)
        prefix = call_id.lower()
        rows = conn.execute(
            "SELECT * FROM calls WHERE id >= ? AND id < ? ORDER BY ts DESC LIMIT 2", [prefix, prefix + "\U0010ffff"]
        ).fetchall()
        if len(rows) > 1:
            raise LookupError(f"{call_id!r} is the start of more than one call id; give more of it")
    return record_of(rows[0]) if rows else None


def stats(
    conn: Any,
    *,
    since: float | None = None,
    template: str | None = None,
    model: str | None = None,
    batch_id: str | None = None,
    groups: tuple[str, ...] = ("by_model", "by_template", "by_day", "total"),
    until: float | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Calls, tokens, cost (USD; None when no call of a group was priced), unpriced calls, errors,
    cache hits and latency summed by ``model``, ``template`` and ``day`` (local date), plus ``total``.

    Each group is one pass over the matching rows: ``groups`` names the ones wanted (default all
    four); ``until`` (Unix time) ends the range ``since`` starts.

    Returns:
        ``{"by_model": [...], "by_template": [...], "by_day": [...], "total": [{...}]}`` (the groups
        asked for), each group's dicts holding its key and ``calls``, ``prompt_tokens``,
        ``completion_tokens``, ``cost``, ``unpriced``, ``errors``, ``cached``, ``mean_latency`` and
        ``max_latency`` (seconds; None when no call of the group has one).
    """
    where, args = _filters(template, model, since, False, batch_id, None, False)
    if until is not None:
        where = (where + " AND " if where else " WHERE ") + "ts < ?"
        args.append(until)
    sums = (
        "COUNT(*) AS calls, COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, "
        "COALESCE(SUM(completion_tokens), 0) AS completion_tokens, SUM(cost) AS cost, "
        "SUM(cost IS NULL AND error_type IS NULL AND cached = 0) AS unpriced, "
        "SUM(error_type IS NOT NULL) AS errors, SUM(cached) AS cached, "
        "AVG(latency) AS mean_latency, MAX(latency) AS max_latency"
    )
    keys = {
        "by_model": "COALESCE(model, model_requested, '?')",
        "by_template": "COALESCE(template, '(none)')",
        "by_day": "date(ts, 'unixepoch', 'localtime')",
    }
    out: dict[str, list[dict[str, Any]]] = {}
    for name, key in keys.items():
        if name not in groups:
            continue
        label = name[3:]
        order = f"{label} DESC" if label == "day" else "calls DESC"
        rows = conn.execute(
            f"SELECT {key} AS {label}, {sums} FROM calls{where} GROUP BY 1 ORDER BY {order}", args
        ).fetchall()
        out[name] = [dict(r) for r in rows]
    if "total" in groups:
        out["total"] = [dict(r) for r in conn.execute(f"SELECT {sums} FROM calls{where}", args).fetchall()]
    return out


def values(conn: Any, column: str) -> list[str]:
    """The distinct values (sorted, None left out) of ``column``, ``"template"`` or ``"model"``,
    read from its index (milliseconds on a large log).

    Raises:
        ValueError: another column.
    """
    if column not in ("template", "model"):
        raise ValueError(f"values() reads the template or model column, not {column!r}")
    return [r[0] for r in conn.execute(f"SELECT DISTINCT {column} FROM calls WHERE {column} IS NOT NULL ORDER BY 1")]
