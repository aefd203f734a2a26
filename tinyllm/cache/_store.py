"""Reply caches: the :class:`Cache` protocol, a persistent :class:`PickleCache`, a :class:`MemoryCache`, :func:`cache_key`.

File format of :class:`PickleCache` (version 2; append-only, one frame per ``set``)::

    b"TINYLLM-CACHE 2\\n"                                  magic header, 16 bytes
    b"\\xfeTR\\xff"  >I length  >I crc  payload            a frame, repeated
        payload = pickle of (key, value), ``length`` bytes
        crc     = crc32 of (>Q offset of the frame in the file, >I length, payload)

A write appends frames under ``filelock.FileLock(path + ".lock")``; the whole
cache is never re-pickled. Records are read with a restricted unpickler that
admits only plain data, so a tampered file cannot run code: it raises
:class:`ConfigError`.

Damage. A frame is valid when its marker is there, its length fits in the file
and its crc matches. The crc covers the frame's own offset, so a frame is valid
only where it was written: bytes inside a value that look like a frame never
pass for one. A reader that meets an invalid frame (a flipped bit, a zeroed
page) resyncs: it looks for the next marker that starts a valid frame and reads
on from there, so only the records that overlap the damage are lost. It logs
the damage once per process (one WARNING naming the stretches skipped); the
damaged bytes stay in the file (``clear()`` removes them). An invalid frame is
skipped only after a re-read under the file lock, so a record another process
is still writing is never taken for damage. Bytes after the last valid frame
that hold no valid frame (a write cut short by a crash, or garbage) are skipped
by readers and cut off by the next writer before it appends; nothing before the
last valid frame is ever cut.

Version 1 files (``TINYLLM-CACHE 1``: frames of ``>I length >I crc32(payload)
payload``, no marker) are read as they are, resyncing past damage on the pickle
opcode that starts every payload, and are rewritten in version 2 (atomically,
keeping every readable record) by the first write. Older tinyllm versions refuse
a version 2 file with ConfigError.

Values are plain data. Shared subtrees are copied once and stay shared, so a
value like ``x = [x, x]`` repeated 40 times is stored and returned in linear
time; a value that contains itself, or is nested deeper than :data:`MAX_DEPTH`
containers, raises :class:`CacheValueError` at ``set`` (pickle would run out of
stack). ``get`` unpickles the stored record: iterative, so no depth fails there.

Writes are not fsynced: a killed process loses at most the record it was
writing; a power loss may lose the last few (the crc detects the damage).
Hits are served from memory without touching the file, so another process's
``clear()`` is seen at this instance's next miss, write or ``len()``.
Each instance keeps one file descriptor open (it pins the file, so a replaced
file is always noticed); :func:`active_cache` keeps at most
:data:`MAX_SHARED_CACHES` instances. Written and tested for POSIX file
semantics (pread, O_APPEND, replacing open files).
"""

from __future__ import annotations

import atexit
import builtins
import collections
import contextlib
import gc
import hashlib
import io
import itertools
import json
import logging
import os
import pickle
import struct
import tempfile
import threading
import zlib
from typing import Any, Iterable, Iterator, Mapping, Protocol, runtime_checkable

from .._fork import fresh_locks_in_child, reset_in_child
from ..config import Config, get_config
from ..errors import CacheValueError, ConfigError

__all__ = [
    "Cache",
    "PickleCache",
    "MemoryCache",
    "cache_key",
    "force_api_cache",
    "active_cache",
    "cache_backend",
    "DROPPED_PARAMS",
    "MAX_DEPTH",
    "MAX_SHARED_CACHES",
]

log = logging.getLogger("tinyllm.cache")  # the logger name users filter on

MAGIC = b"TINYLLM-CACHE 2\n"
MAGIC_V1 = b"TINYLLM-CACHE 1\n"
MARK = b"\xfeTR\xff"  # 0xfe and 0xff never occur in UTF-8, so never inside a pickled str
_HEAD = struct.Struct(">4sII")  # marker, payload length in bytes, crc
_BIND = struct.Struct(">QI")  # what the crc covers before the payload: the frame's offset and the length
_HEAD_V1 = struct.Struct(">II")  # version 1: payload length, crc32 of the payload
#: Keys removed from ``params`` (and ``endpoint``) before hashing: they do not change the reply.
DROPPED_PARAMS = frozenset({"timeout", "api_key", "extra_headers"})
#: Deepest nesting of containers a value may have (``[[1]]`` has 2); deeper ones raise CacheValueError at ``set``.
MAX_DEPTH = 200  # pickle needs ~2 frames of the 1,000-frame recursion limit per level
#: How many :class:`PickleCache` instances (each with one open file) :func:`active_cache` keeps.
MAX_SHARED_CACHES = 8
_SCALARS = frozenset({str, int, float, bool, type(None), bytes, complex})
_CONTAINERS = (dict, list, tuple, set, frozenset)
_BUSY = object()  # memo mark of a container whose copy is being built
_reported: set[tuple[Any, ...]] = set()  # damage already logged in this process: (dev, inode, offset, length)


@runtime_checkable
class Cache(Protocol):
    """What the client pipeline needs from a cache. Keys are ``str``; values are plain data."""

    def get(self, key: str, default: Any = None) -> Any: ...
    def set(self, key: str, value: Any) -> None: ...
    def clear(self) -> object: ...  # some return the number of entries removed
    def len(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...
    def stats(self) -> dict[str, Any]: ...


def cache_key(endpoint: dict, model: str, messages: list[dict], params: dict) -> str:
    """Return the cache key of one request: sha256 hex (64 chars) of its canonical JSON.

    ``endpoint`` identifies the server (api type, base URL, deployment...), never
    the API key. Keys in :data:`DROPPED_PARAMS` (``timeout``, ``api_key``,
    ``extra_headers``) are removed from ``params`` and ``endpoint`` defensively,
    so they never split or leak into the cache. Dict key order does not matter;
    values JSON cannot encode are hashed as ``str(value)``.
    """
    doc = {
        "endpoint": {k: v for k, v in endpoint.items() if k not in DROPPED_PARAMS},
        "model": model,
        "messages": messages,
        "params": {k: v for k, v in params.items() if k not in DROPPED_PARAMS},
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _kind(value: Any) -> type:
    """The container type ``value`` is copied as (a subclass becomes its base). Raises CacheValueError."""
    kind = type(value)
    if kind in _CONTAINERS:
        return kind
    for base in _CONTAINERS:
        if isinstance(value, base):
            return base
    raise CacheValueError(
        "cache values must be plain data (dict, list, tuple, set, frozenset of str, int, float, "
        f"bool, None, bytes, complex), got {kind.__name__}"
    )


def _children(value: Any, kind: type) -> Iterator[Any]:
    return itertools.chain.from_iterable(value.items()) if kind is dict else iter(value)


def _build(kind: type, items: list) -> Any:
    if kind is list:
        return items
    if kind is dict:
        pairs = iter(items)
        return dict(zip(pairs, pairs))
    return kind(items)


def _plain(value: Any, limit: int | None = MAX_DEPTH) -> Any:
    """A deep copy of plain data; a container met twice (a shared subtree) is copied once and stays shared.

    Iterative, so any depth is copied without recursion; time and memory are linear
    in the number of distinct containers and items, not in the tree expansion.

    Args:
        value: dict/list/tuple/set/frozenset (or subclasses, copied as the base type)
            of str/int/float/bool/None/bytes/complex.
        limit: the deepest nesting of containers allowed, or ``None`` for no limit.

    Raises:
        CacheValueError: a value is not plain data, contains itself, or is nested deeper than ``limit``.
    """
    if type(value) in _SCALARS:
        return value
    memo: dict[int, Any] = {id(value): _BUSY}
    alive = []
    kind = _kind(value)
    stack: list[tuple[Any, Any, Any, list]] = [(value, kind, _children(value, kind), [])]
    while True:
        node, kind, children, items = stack[-1]
        for child in children:
            if type(child) in _SCALARS:
                items.append(child)
                continue
            copy = memo.get(id(child))
            if copy is None:
                if limit is not None and len(stack) >= limit:
                    raise CacheValueError(f"cache value is nested deeper than {limit} containers; it cannot be stored")
                child_kind = _kind(child)
                memo[id(child)] = _BUSY
                alive.append(child)  # a subclass may hand out temporaries: keep them, so no id is reused
                stack.append((child, child_kind, _children(child, child_kind), []))
                break
            if copy is _BUSY:
                raise CacheValueError("cache value contains itself (a cycle); only acyclic plain data can be stored")
            items.append(copy)
        else:
            stack.pop()
            copy = _build(kind, items)
            if not stack:
                return copy
            memo[id(node)] = copy
            stack[-1][3].append(copy)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every global except builtins set/frozenset/complex is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "complex"):
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")


def _safe_loads(data: bytes | memoryview, path: str) -> Any:
    try:
        return _SafeUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # refused globals, and anything a corrupt pickle raises
        raise _damaged(path, f"it holds data that cannot be loaded safely ({exc})") from exc


def _damaged(path: str, why: str) -> ConfigError:
    return ConfigError(
        f"cache file {path} is damaged or was tampered with: {why}. tinyllm never runs code from a cache file. "
        "Delete the file to start a fresh cache, or set CACHE_API_CALLS=false."
    )


def _payload(key: str, value: Any) -> bytes:
    """The pickle of ``(key, value)``; raises CacheValueError when pickle runs out of stack."""
    try:
        return pickle.dumps((key, value), protocol=pickle.HIGHEST_PROTOCOL)
    except RecursionError as exc:
        raise CacheValueError(f"cache value is nested too deeply to be pickled here ({exc})") from None


def _frame(offset: int, payload: bytes) -> bytes:
    """One version 2 frame for ``payload``, valid only at file offset ``offset``."""
    crc = zlib.crc32(payload, zlib.crc32(_BIND.pack(offset, len(payload))))
    return _HEAD.pack(MARK, len(payload), crc) + payload


def _frames(data: bytes, base: int, version: int = 2) -> Iterator[tuple[int, int, int]]:
    """Yield ``(start, payload start, end)`` of each valid frame in ``data`` (read from file offset ``base``), in order.

    After an invalid frame, resync: try each later candidate (a marker; in version 1,
    the pickle PROTO opcode that starts a payload) until one starts a valid frame.
    A frame is valid when its length is > 0 and fits in ``data``, the payload starts
    with PROTO and ends with STOP, and the crc matches. Bytes between the frames
    yielded are damage; bytes after the last one, a torn or damaged tail.
    """
    view, n = memoryview(data), len(data)
    size = _HEAD.size if version == 2 else _HEAD_V1.size

    def end_of(pos: int) -> int:  # end of the valid frame at pos, or -1
        if pos + size >= n:
            return -1
        if version == 2:
            mark, length, crc = _HEAD.unpack_from(data, pos)
            if mark != MARK:
                return -1
            seed = zlib.crc32(_BIND.pack(base + pos, length))
        else:
            (length, crc), seed = _HEAD_V1.unpack_from(data, pos), 0
        end = pos + size + length
        if length < 2 or end > n or data[pos + size] != 0x80 or data[end - 1] != 0x2E:  # PROTO ... STOP
            return -1
        return end if zlib.crc32(view[pos + size : end], seed) == crc else -1

    pos = 0
    while pos < n:
        end = end_of(pos)
        while end < 0:  # resync on the next candidate that starts a valid frame
            if version == 2:
                pos = data.find(MARK, pos + 1)
            else:
                pos = data.find(b"\x80", pos + 1 + size) - size
            if pos < 0:
                return
            end = end_of(pos)
        yield pos, pos + size, end
        pos = end


class _IndexedCache:
    """Shared logic: a dict index guarded by an RLock, hit/miss counters, copies in and out.

    The index maps each key to the pickle of ``(key, value)``: the payload of its record.
    Every payload in it is plain data (made by :meth:`update` from a :func:`_plain` copy,
    or admitted by the restricted unpickler when read from the file), so ``get`` loads it
    with the C unpickler: a fresh copy in about a microsecond, linear in the value's size
    even when subtrees are shared, and without recursion at any depth.
    """

    path: str | None = None

    def __init__(self) -> None:
        self._index: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def _refresh(self) -> None:  # pick up entries written elsewhere; nothing to do in memory
        pass

    def _store(self, items: list[tuple[str, bytes]]) -> None:
        with self._lock:
            self._index.update(items)

    def _size(self) -> int:
        return 0

    def get(self, key: str, default: Any = None) -> Any:
        """Return a fresh copy of the value stored under ``key``, else ``default``; counts a hit or a miss.

        A value with shared subtrees comes back with the same sharing, in time linear in its distinct parts.

        Raises:
            ConfigError: (PickleCache) new records in the file are tampered with.
        """
        with self._lock:
            payload = self._index.get(key)
            if payload is None:
                self._refresh()
                payload = self._index.get(key)
            if payload is None:
                self.misses += 1
                return default
            self.hits += 1
        return pickle.loads(payload)[1]  # plain data only (see the class docstring)

    def set(self, key: str, value: Any) -> None:
        """Store a copy of ``value`` (plain data) under ``key`` (str), replacing any previous value.

        Shared subtrees are stored once and stay shared (``x = [x, x]`` forty times is 41 lists, not 2**40).

        Raises:
            CacheValueError (a TypeError): ``key`` is not a str; ``value`` is not plain data,
                contains itself, or is nested deeper than :data:`MAX_DEPTH` containers.
            OSError: (PickleCache) the file cannot be written.
        """
        self.update({key: value})

    def update(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Store many entries at once (one lock, one write); return how many. Raises like :meth:`set`."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        for key, _ in pairs:
            if type(key) is not str:
                raise CacheValueError(f"cache keys must be str, got {type(key).__name__}")
        payloads = [(k, _payload(k, _plain(v))) for k, v in pairs]
        if payloads:
            self._store(payloads)
        return len(payloads)

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._index.clear()

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._index)

    def len(self) -> int:
        """Number of entries (``int``)."""
        return len(self)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            if key in self._index:
                return True
            self._refresh()
            return key in self._index

    def stats(self) -> dict[str, Any]:
        """``{"entries": int, "size_bytes": int (file size, 0 in memory), "hits": int, "misses": int, "path": str | None}``."""
        with self._lock:
            return {
                "entries": len(self),
                "size_bytes": self._size(),
                "hits": self.hits,
                "misses": self.misses,
                "path": self.path,
            }


class MemoryCache(_IndexedCache):
    """An in-process cache with the :class:`Cache` interface; thread-safe; gone when the process ends."""


class PickleCache(_IndexedCache):
    """A persistent cache in one append-only file, shared safely by threads and processes.

    ``PickleCache(path)`` creates the file (mode 0o600, and its ``path + ".lock"``)
    if needed and loads every record into memory, so a hit costs microseconds.
    A file in TinyTroupe's format (one pickled dict) is converted in place,
    atomically, keeping its entries; a version 1 file is read as it is and
    converted by the first write. On a miss, records other processes appended
    since are read first (one ``os.stat`` when there are none). Damaged records
    are skipped and logged (see the module docstring). The instance keeps one
    file descriptor open until :meth:`close` or garbage collection.

    Raises:
        ConfigError: the file is tampered with, or is neither a tinyllm cache nor a dict pickle.
        OSError: the file or its directory cannot be created or read.
    """

    path: str  # absolute, always set (a MemoryCache has none)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        os.close(os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600))
        self._new_locks()
        reset_in_child(self._new_locks)
        self._fd = -1
        self._ident: tuple[int, int] | None = None
        self._version = 2  # format of the open file: 1 until the first write converts it
        self._flushed = (0, 0)  # (hits, misses) already added to PATH.counts
        self._offset = 0  # bytes of the file read into the index; always the end of a valid frame (or the header)
        with self._lock:
            with self._file_lock():
                self._open_locked()
            self._read_new(locked=False, truncate=False)

    def _new_locks(self) -> None:
        """The thread lock and the inter-process file lock of this process: at start, and in a forked
        child (filelock refuses a lock inherited across fork; a parent thread may hold the thread lock)."""
        from filelock import FileLock  # imported on first use: it costs ~10 ms at import tinyllm

        self._lock = threading.RLock()
        self._flock = FileLock(self.path + ".lock", mode=0o600, thread_local=False)
        self._flushed = (self.hits, self.misses)  # the parent's counts are the parent's to save

    def _file_lock(self) -> Any:
        """Hold the inter-process lock (re-entrant); while another process has it, retry every 2 ms."""
        return self._flock.acquire(poll_interval=0.002)

    def _open_locked(self) -> None:
        """(Re)open the file under the file lock: create it, repair a torn header or convert a dict pickle."""
        self.close()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        head = os.pread(fd, len(MAGIC), 0)
        version = 1 if head == MAGIC_V1 else 2
        if head not in (MAGIC, MAGIC_V1):
            if MAGIC.startswith(head) or MAGIC_V1.startswith(head):  # new, or a crash while writing the header
                os.ftruncate(fd, 0)
                os.write(fd, MAGIC)
            else:
                os.close(fd)
                with open(self.path, "rb") as f:
                    entries = self._load_dict_pickle(f.read(), self.path)
                self._write_new_file([_payload(k, v) for k, v in entries.items()])
                log.info("converted %s (%d entries) to the tinyllm cache format", self.path, len(entries))
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        st = os.fstat(fd)
        self._fd, self._ident, self._version = fd, (st.st_dev, st.st_ino), version
        self._index, self._offset = {}, len(MAGIC)

    @staticmethod
    def _load_dict_pickle(data: bytes, path: str) -> dict[str, Any]:
        obj = _safe_loads(data, path)
        if not isinstance(obj, dict) or not all(type(k) is str for k in obj):
            raise _damaged(path, "it is neither a tinyllm cache nor a pickled dict with str keys")
        return obj

    def _write_new_file(self, payloads: Iterable[bytes]) -> None:
        """Atomically replace the file with a version 2 one holding ``payloads`` (temp file, fsync, os.replace)."""
        folder = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp creates it with mode 0o600
                f.write(MAGIC)
                offset = len(MAGIC)
                for payload in payloads:
                    frame = _frame(offset, payload)
                    f.write(frame)
                    offset += len(frame)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _read_new(self, locked: bool, truncate: bool) -> None:
        """Load the records appended after ``self._offset``. Caller holds ``self._lock``.

        ``locked``: the caller holds the file lock. Without it, damage (an invalid frame
        followed by a valid one) is re-read under the lock before it is skipped, since it
        may be a record another process is still writing. ``truncate`` (file lock held):
        cut off a tail that holds no valid frame.
        """
        size = os.fstat(self._fd).st_size
        if size <= self._offset:
            return
        base = self._offset
        data = os.pread(self._fd, size - base, base)
        view, done, skipped, confirm = memoryview(data), 0, [], False
        pause_gc = len(data) > 1_000_000 and gc.isenabled()  # a bulk load: cyclic GC passes would cost a third of it
        if pause_gc:
            gc.disable()
        try:
            for start, body, end in _frames(data, base, self._version):
                if start != done:  # damage before this frame
                    if not locked:
                        confirm = True
                        break
                    skipped.append((base + done, start - done))
                record = _safe_loads(view[body:end], self.path)
                if type(record) is not tuple or len(record) != 2 or type(record[0]) is not str:
                    raise _damaged(self.path, "a record is not a (key, value) pair")
                self._index[record[0]] = bytes(view[body:end])
                done = end
        finally:
            self._offset = base + done
            if pause_gc:
                gc.enable()
        if confirm:
            with self._file_lock():
                self._read_new(locked=True, truncate=False)
            return
        if skipped:
            self._report(skipped)
        if done < len(data) and truncate:
            log.warning(
                "%s: dropping %d bytes after the last complete record (torn write)", self.path, len(data) - done
            )
            os.ftruncate(self._fd, self._offset)

    def _report(self, skipped: list[tuple[int, int]]) -> None:
        """Log damaged stretches ``[(offset, length), ...]`` once per process."""
        new = [s for s in skipped if (*(self._ident or ()), *s) not in _reported]
        if not new:
            return
        _reported.update((*(self._ident or ()), *s) for s in new)
        where = ", ".join(f"{n} bytes at offset {o}" for o, n in new[:5]) + (", ..." if len(new) > 5 else "")
        log.warning(
            "%s is damaged: skipped %d bytes in %d place(s) (%s); the records there are lost, the others "
            "are read. clear() or deleting the file removes the damage.",
            self.path,
            sum(n for _, n in new),
            len(new),
            where,
        )

    def _sync(self, writing: bool) -> None:
        """Bring the index up to date with the file. Caller holds ``self._lock`` (and the file lock if writing)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self._ident or st.st_size < self._offset:
            if st is None and not writing:
                return  # deleted: keep serving what we have; the next write recreates it
            with self._file_lock():  # replaced (clear or conversion elsewhere), deleted or truncated: reload
                self._open_locked()
        elif st.st_size == self._offset:
            return
        self._read_new(locked=writing, truncate=writing)

    def _refresh(self) -> None:
        self._sync(writing=False)

    def _store(self, items: list[tuple[str, bytes]]) -> None:
        with self._lock, self._file_lock():
            self._sync(writing=True)
            if self._version == 1:  # convert before the first append: every frame of a file has one format
                self._write_new_file(self._index.values())
                log.info("converted %s (%d entries) from cache format 1 to 2", self.path, len(self._index))
                self._open_locked()
                self._read_new(locked=True, truncate=True)
            frames, offset = [], self._offset  # frames are bound to their offsets: O_APPEND lands them at the
            for _, payload in items:  # end of the file, which _sync just made self._offset
                frames.append(_frame(offset, payload))
                offset += len(frames[-1])
            view = memoryview(b"".join(frames))
            while view:
                view = view[os.write(self._fd, view) :]
            self._offset = offset
            self._index.update(items)

    def _size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def clear(self) -> None:
        """Remove every entry: the file is atomically replaced by one holding just the header.

        The hit and miss counts of every process are reset too."""
        with self._lock, self._file_lock():
            self._write_new_file([])
            self._open_locked()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + ".counts")
            self.hits = self.misses = 0
            self._flushed = (0, 0)

    def _saved_counts(self) -> tuple[int, int]:
        try:
            with open(self.path + ".counts", encoding="utf-8") as f:
                data = json.load(f)
            return int(data["hits"]), int(data["misses"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0, 0

    def flush_counts(self) -> None:
        """Add this process's hits and misses since the last flush to the file's totals (``PATH.counts``).

        Called at interpreter exit for the shared caches, so ``tinyllm cache stats`` can show
        the hits and misses of every process that used the file. Raises OSError on a failed write.
        """
        with self._lock:
            new = (self.hits - self._flushed[0], self.misses - self._flushed[1])
            if new == (0, 0):
                return
            with self._file_lock():
                saved = self._saved_counts()
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".counts-")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"hits": saved[0] + new[0], "misses": saved[1] + new[1]}, f)
                os.replace(tmp, self.path + ".counts")
            self._flushed = (self.hits, self.misses)

    def stats(self) -> dict[str, Any]:
        """As :meth:`Cache.stats`, with ``hits`` and ``misses`` summed over every process (see :meth:`flush_counts`)."""
        info = super().stats()
        saved = self._saved_counts()
        with self._lock:
            info["hits"] = saved[0] + self.hits - self._flushed[0]
            info["misses"] = saved[1] + self.misses - self._flushed[1]
        return info

    def import_dict_pickle(self, other_path: str | os.PathLike[str]) -> int:
        """Merge a TinyTroupe cache file (one pickled ``dict[str, value]``) into this cache; return the entry count.

        Raises:
            ConfigError: the file holds anything but a plain-data dict with str keys (nothing is run).
            OSError: it cannot be read.
        """
        other = os.fspath(other_path)
        with open(other, "rb") as f:
            return self.update(self._load_dict_pickle(f.read(), other))

    def close(self) -> None:
        """Close the file handle; the cache reopens it on its next miss or write."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd, self._ident = -1, None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


_forced: tuple[bool, str | None] | None = None
_shared: collections.OrderedDict[str, PickleCache] = collections.OrderedDict()  # most recently used last
_shared_lock = threading.Lock()
fresh_locks_in_child(globals(), "_shared_lock")


@atexit.register
def _flush_shared_counts() -> None:
    for cache in list(_shared.values()):
        _flush_counts(cache)


def _flush_counts(cache: PickleCache) -> None:
    try:
        cache.flush_counts()
    except OSError as exc:  # at exit, or while switching caches, there is nobody to raise to
        log.warning("could not save the cache hit counts of %s: %s", cache.path, exc)


def force_api_cache(enabled: bool | None, file_name: str | None = None) -> None:
    """Turn API caching on (``True``) or off (``False``) for this process, over the config.

    ``file_name`` (a path, relative to the working directory) replaces
    CACHE_FILE_NAME while forced. ``force_api_cache(None)`` goes back to the config.
    """
    global _forced
    _forced = None if enabled is None else (bool(enabled), file_name)


_memory = MemoryCache()  # CACHE_BACKEND=memory: one per process


def cache_backend(cfg: Config) -> str:
    """The cache backend ``cfg`` selects: ``"redis"``, ``"pickle"`` or ``"memory"``
    (``CACHE_BACKEND``; ``auto`` is ``redis`` when ``REDIS_URL`` is set, else ``pickle``)."""
    if cfg.cache_backend != "auto":
        return cfg.cache_backend
    return "redis" if cfg.redis_url else "pickle"


def active_cache(cfg: Config | None = None, *, forced: bool = True) -> Cache | None:
    """The cache calls should use now, or ``None`` when caching is off.

    Uses :func:`force_api_cache` if set (and ``forced``), else ``cfg.cache_api_calls`` and
    ``cfg.cache_file_name`` (``cfg`` defaults to :func:`get_config`). One
    :class:`PickleCache` per absolute path is created and shared by all threads;
    the :data:`MAX_SHARED_CACHES` most recently used are kept, so switching
    through many file names holds at most that many files open. A cache dropped
    from that set has its hit counts saved; it closes its file once the last
    call using it is done, and is loaded again if its name comes back.
    :func:`cache_backend` may choose a :class:`~tinyllm.cache.RedisCache`
    (one per URL, prefix and TTL) or this process's :class:`MemoryCache` instead.

    Raises:
        ConfigError, OSError: as :class:`PickleCache` when the file is first opened;
            ConfigError when Redis cannot be reached at its first use.
    """
    cfg = cfg if cfg is not None else get_config()
    force = _forced if forced else None
    enabled, name = (force[0], force[1] or cfg.cache_file_name) if force else (cfg.cache_api_calls, cfg.cache_file_name)
    if not enabled:
        return None
    # -- CACHE_BACKEND / REDIS_URL (a forced file name means that file) --
    backend = "pickle" if force and force[1] else cache_backend(cfg)
    if backend == "redis":
        from ._redis import shared_redis_cache

        return shared_redis_cache(cfg)
    if backend == "memory":
        return _memory
    path = os.path.realpath(os.path.expanduser(name))
    dropped = []
    with _shared_lock:
        cache = _shared.get(path)
        if cache is None:
            cache = _shared[path] = PickleCache(path)
            while len(_shared) > MAX_SHARED_CACHES:
                dropped.append(_shared.popitem(last=False)[1])
        else:
            _shared.move_to_end(path)
    for old in dropped:  # outside the lock: saving the counts takes the old file's lock
        _flush_counts(old)
    return cache
