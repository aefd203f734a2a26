"""Reply caches: the :class:`Cache` protocol, a persistent :class:`PickleCache`, a :class:`MemoryCache`, :func:`cache_key`.

File format of :class:`PickleCache` (append-only, one record per ``set``)::

    b"TINYLLM-CACHE 1\\n"                       magic header
    >I length  >I crc32(payload)  payload       repeated; payload = pickle of (key, value)

A write appends one record under ``filelock.FileLock(path + ".lock")``; the
whole cache is never re-pickled. A record cut short by a crash (or garbage after
the last good record) is skipped on load and cut off by the next writer before
it appends. Records are read with a restricted unpickler that admits only plain
data, so a tampered file cannot run code: it raises :class:`ConfigError`.
Writes are not fsynced: a killed process loses at most the record it was
writing; a power loss may lose the last few (the CRC detects the damage).
Hits are served from memory without touching the file, so another process's
``clear()`` is seen at this instance's next miss, write or ``len()``.
Written and tested for POSIX file semantics (pread, O_APPEND, replacing open files).
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import pickle
import struct
import tempfile
import threading
import zlib
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

from ._fork import reset_in_child
from .config import Config, get_config
from .errors import ConfigError

__all__ = ["Cache", "PickleCache", "MemoryCache", "cache_key", "force_api_cache", "active_cache", "DROPPED_PARAMS"]

log = logging.getLogger(__name__)

MAGIC = b"TINYLLM-CACHE 1\n"
_HEAD = struct.Struct(">II")  # payload length in bytes, crc32 of the payload
#: Keys removed from ``params`` (and ``endpoint``) before hashing: they do not change the reply.
DROPPED_PARAMS = frozenset({"timeout", "api_key", "extra_headers"})
_SCALARS = frozenset({str, int, float, bool, type(None), bytes, complex})


@runtime_checkable
class Cache(Protocol):
    """What the client pipeline needs from a cache. Keys are ``str``; values are plain data."""

    def get(self, key: str, default: Any = None) -> Any: ...
    def set(self, key: str, value: Any) -> None: ...
    def clear(self) -> None: ...
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


def _plain(value: Any) -> Any:
    """A deep copy of plain data (dict/list/tuple/set/frozenset of str/int/float/bool/None/bytes/complex).

    Raises:
        TypeError: anything else (it could not be loaded back safely).
    """
    if type(value) in _SCALARS:
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        base = next(t for t in (list, tuple, set, frozenset) if isinstance(value, t))
        return base(_plain(v) for v in value)
    raise TypeError(f"cache values must be plain data (dict, list, str, int, float, bool, None), got {type(value).__name__}")


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


def _record(key: str, value: Any) -> bytes:
    payload = pickle.dumps((key, value), protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


class _IndexedCache:
    """Shared logic: a dict index guarded by an RLock, hit/miss counters, copies in and out."""

    path: str | None = None

    def __init__(self) -> None:
        self._index: dict[str, Any] = {}
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def _refresh(self) -> None:  # pick up entries written elsewhere; nothing to do in memory
        pass

    def _store(self, items: list[tuple[str, Any]]) -> None:
        with self._lock:
            self._index.update(items)

    def _size(self) -> int:
        return 0

    def get(self, key: str, default: Any = None) -> Any:
        """Return a fresh copy of the value stored under ``key``, else ``default``; counts a hit or a miss.

        Raises:
            ConfigError: (PickleCache) new records in the file are tampered with.
        """
        with self._lock:
            if key not in self._index:
                self._refresh()
            if key in self._index:
                self.hits += 1
                return _plain(self._index[key])
            self.misses += 1
            return default

    def set(self, key: str, value: Any) -> None:
        """Store a copy of ``value`` (plain data) under ``key`` (str), replacing any previous value.

        Raises:
            TypeError: ``key`` is not a str, or ``value`` is not plain data.
            OSError: (PickleCache) the file cannot be written.
        """
        self.update({key: value})

    def update(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Store many entries at once (one lock, one write); return how many. Raises like :meth:`set`."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        for key, _ in pairs:
            if type(key) is not str:
                raise TypeError(f"cache keys must be str, got {type(key).__name__}")
        pairs = [(k, _plain(v)) for k, v in pairs]
        if pairs:
            self._store(pairs)
        return len(pairs)

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
            return {"entries": len(self), "size_bytes": self._size(), "hits": self.hits,
                    "misses": self.misses, "path": self.path}


class MemoryCache(_IndexedCache):
    """An in-process cache with the :class:`Cache` interface; thread-safe; gone when the process ends."""


class PickleCache(_IndexedCache):
    """A persistent cache in one append-only file, shared safely by threads and processes.

    ``PickleCache(path)`` creates the file (mode 0o600, and its ``path + ".lock"``)
    if needed and loads every record into memory, so a hit costs microseconds.
    A file in TinyTroupe's format (one pickled dict) is converted in place,
    atomically, keeping its entries. On a miss, records other processes appended
    since are read first (one ``os.stat`` when there are none).

    Raises:
        ConfigError: the file is tampered with, or is neither a tinyllm cache nor a dict pickle.
        OSError: the file or its directory cannot be created or read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        os.close(os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600))
        self._new_locks()
        reset_in_child(self._new_locks)
        self._fd = -1
        self._ident: tuple[int, int] | None = None
        self._flushed = (0, 0)  # (hits, misses) already added to PATH.counts
        self._offset = 0  # bytes of the file read into the index; always a record boundary
        with self._lock:
            with self._file_lock():
                self._open_locked()
            self._read_new(truncate=False)

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
        if head != MAGIC:
            if MAGIC.startswith(head):  # new, or a crash while writing the header
                os.ftruncate(fd, 0)
                os.write(fd, MAGIC)
            else:
                os.close(fd)
                with open(self.path, "rb") as f:
                    entries = self._load_dict_pickle(f.read(), self.path)
                self._write_new_file(entries)
                log.info("converted %s (%d entries) to the tinyllm cache format", self.path, len(entries))
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        self._index, self._offset = {}, len(MAGIC)

    @staticmethod
    def _load_dict_pickle(data: bytes, path: str) -> dict[str, Any]:
        obj = _safe_loads(data, path)
        if not isinstance(obj, dict) or not all(type(k) is str for k in obj):
            raise _damaged(path, "it is neither a tinyllm cache nor a pickled dict with str keys")
        return obj

    def _write_new_file(self, entries: dict[str, Any]) -> None:
        """Atomically replace the file with a new-format one holding ``entries`` (temp file, fsync, os.replace)."""
        folder = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp creates it with mode 0o600
                f.write(MAGIC)
                for key, value in entries.items():
                    f.write(_record(key, value))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _read_new(self, truncate: bool) -> None:
        """Load records appended after ``self._offset``; if ``truncate`` (file lock held), cut off a torn tail."""
        size = os.fstat(self._fd).st_size
        if size <= self._offset:
            return
        data = memoryview(os.pread(self._fd, size - self._offset, self._offset))
        pos, n = 0, len(data)
        pause_gc = n > 1_000_000 and gc.isenabled()  # a bulk load: cyclic GC passes would cost a third of it
        if pause_gc:
            gc.disable()
        try:
            while pos + _HEAD.size <= n:
                length, crc = _HEAD.unpack_from(data, pos)
                end = pos + _HEAD.size + length
                payload = data[pos + _HEAD.size:end]
                if length == 0 or end > n or zlib.crc32(payload) != crc:
                    break  # torn or garbage tail (or a record still being written by another process)
                record = _safe_loads(payload, self.path)
                if type(record) is not tuple or len(record) != 2 or type(record[0]) is not str:
                    raise _damaged(self.path, "a record is not a (key, value) pair")
                self._index[record[0]] = record[1]
                pos = end
        finally:
            self._offset += pos
            if pause_gc:
                gc.enable()
        if pos < n and truncate:
            log.warning("%s: dropping %d bytes after the last complete record (torn write)", self.path, n - pos)
            os.ftruncate(self._fd, self._offset)

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
        self._read_new(truncate=writing)

    def _refresh(self) -> None:
        self._sync(writing=False)

    def _store(self, items: list[tuple[str, Any]]) -> None:
        blob = b"".join(_record(k, v) for k, v in items)
        with self._lock, self._file_lock():
            self._sync(writing=True)
            view = memoryview(blob)
            while view:  # O_APPEND: lands at the end, which _sync just made a record boundary
                view = view[os.write(self._fd, view):]
            self._offset += len(blob)
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
            self._write_new_file({})
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
_shared: dict[str, PickleCache] = {}
_shared_lock = threading.Lock()


@atexit.register
def _flush_shared_counts() -> None:
    for cache in list(_shared.values()):
        try:
            cache.flush_counts()
        except OSError as exc:  # at exit there is nobody left to raise to
            log.warning("could not save the cache hit counts of %s: %s", cache.path, exc)


def force_api_cache(enabled: bool | None, file_name: str | None = None) -> None:
    """Turn API caching on (``True``) or off (``False``) for this process, over the config.

    ``file_name`` (a path, relative to the working directory) replaces
    CACHE_FILE_NAME while forced. ``force_api_cache(None)`` goes back to the config.
    """
    global _forced
    _forced = None if enabled is None else (bool(enabled), file_name)


def active_cache(cfg: Config | None = None) -> Cache | None:
    """The cache calls should use now, or ``None`` when caching is off.

    Uses :func:`force_api_cache` if set, else ``cfg.cache_api_calls`` and
    ``cfg.cache_file_name`` (``cfg`` defaults to :func:`get_config`). One
    :class:`PickleCache` per absolute path is created and shared by all threads.

    Raises:
        ConfigError, OSError: as :class:`PickleCache` when the file is first opened.
    """
    cfg = cfg if cfg is not None else get_config()
    forced = _forced
    enabled, name = (forced[0], forced[1] or cfg.cache_file_name) if forced else (cfg.cache_api_calls, cfg.cache_file_name)
    if not enabled:
        return None
    path = os.path.realpath(os.path.expanduser(name))
    with _shared_lock:
        if path not in _shared:
            _shared[path] = PickleCache(path)
        return _shared[path]
