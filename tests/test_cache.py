"""Tests of tinyllm.cache: real files in tmp_path, real subprocesses and threads."""

from __future__ import annotations

import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

import tinyllm.cache._store as cache_module
from tinyllm.cache._store import (
    MAGIC,
    Cache,
    MemoryCache,
    PickleCache,
    active_cache,
    cache_key,
    force_api_cache,
)
from tinyllm.config import configure, get_config
from tinyllm.errors import CacheValueError, ConfigError, TinyLLMError

REPO = Path(cache_module.__file__).parent.parent  # the directory holding the tinyllm package, for children
HEAD = struct.Struct(">4sII")  # the version 2 frame header, written out here independently of the module
MARK = b"\xfeTR\xff"


def message(i: int, size: int = 200) -> dict:
    return {"role": "assistant", "content": f"reply {i} " + "x" * size, "refusal": None, "tool_calls": [i, [i]]}


def frame(offset: int, payload: bytes) -> bytes:
    """A version 2 frame: marker, length, crc32 of (offset, length, payload), payload."""
    crc = zlib.crc32(struct.pack(">QI", offset, len(payload)) + payload)
    return HEAD.pack(MARK, len(payload), crc) + payload


def frame_offsets(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each valid frame from the header on, stopping at the first invalid one."""
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    pos, out = len(MAGIC), []
    while pos + HEAD.size <= len(data):
        mark, length, crc = HEAD.unpack_from(data, pos)
        payload = data[pos + HEAD.size : pos + HEAD.size + length]
        if (
            mark != MARK
            or length == 0
            or len(payload) < length
            or frame(pos, payload) != data[pos : pos + HEAD.size + length]
        ):
            break
        out.append((pos, pos + HEAD.size + length))
        pos += HEAD.size + length
    return out


def raw_records(path: Path) -> tuple[list[tuple[str, object]], int]:
    """Parse the file independently of the module: (complete records in order, bytes left after them)."""
    data = path.read_bytes()
    frames = frame_offsets(path)
    out = [pickle.loads(data[start + HEAD.size : end]) for start, end in frames]
    return out, len(data) - (frames[-1][1] if frames else len(MAGIC))


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def spawn(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], env=child_env(), stdout=subprocess.PIPE, text=True
    )


class Evil:
    """Pickles to a call of os.system: loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(params=["pickle", "memory"])
def cache(request, tmp_path):
    c = PickleCache(tmp_path / "c.pickle") if request.param == "pickle" else MemoryCache()
    yield c
    if isinstance(c, PickleCache):
        c.close()


# --- behaviour common to both caches ---------------------------------------------------------


def test_round_trip_len_contains_and_stats(cache):
    assert isinstance(cache, Cache)
    assert cache.get("k") is None and cache.get("k", "dflt") == "dflt"
    cache.set("k", message(1))
    cache.set("n", None)
    assert cache.get("k") == message(1)
    assert cache.get("n", "dflt") is None
    assert "k" in cache and "n" in cache and "zz" not in cache
    assert len(cache) == cache.len() == 2
    cache.set("k", {"v": 2})  # overwrite
    assert cache.get("k") == {"v": 2} and len(cache) == 2
    st = cache.stats()
    assert (st["entries"], st["hits"], st["misses"]) == (2, 3, 2)
    if isinstance(cache, PickleCache):
        assert st["path"] == str(cache.path) and st["size_bytes"] == os.path.getsize(cache.path)
    else:
        assert st["path"] is None


def test_values_are_copied_in_and_out(cache):
    value = {"role": "assistant", "content": "hi", "list": [1, 2]}
    cache.set("k", value)
    value["list"].append(3)
    got = cache.get("k")
    assert got == {"role": "assistant", "content": "hi", "list": [1, 2]}
    got["content"] = "changed"
    assert cache.get("k")["content"] == "hi"


def test_plain_data_kinds_round_trip(cache, tmp_path):
    value = {
        "s": "é",
        "i": 3,
        "f": 1.5,
        "b": True,
        "n": None,
        "l": [1, (2, 3)],
        "set": {1, 2},
        "fs": frozenset({"a"}),
        "c": 1 + 2j,
        "bytes": b"\x00",
    }
    cache.set("k", value)
    assert cache.get("k") == value
    if isinstance(cache, PickleCache):
        assert PickleCache(cache.path).get("k") == value


def test_rejects_non_plain_values_and_keys(cache):
    class Thing:
        pass

    with pytest.raises(CacheValueError, match="plain data.*got Thing"):
        cache.set("k", {"obj": Thing()})
    with pytest.raises(CacheValueError, match="keys must be str"):
        cache.set(1, "v")  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # CacheValueError is a TypeError, as these errors were before
        cache.set("k", [1, Thing()])
    assert len(cache) == 0


@pytest.mark.timeout(60)  # before the fix, set() walked all 2**40 paths and never returned
def test_shared_subtrees_are_stored_and_returned_with_their_sharing(cache):
    x: list = []
    for _ in range(40):
        x = [x, x]
    cache.set("k", {"tree": x})
    copies = [cache.get("k")["tree"]]
    if isinstance(cache, PickleCache):
        copies.append(PickleCache(cache.path).get("k")["tree"])
    for got in copies:
        assert got is not x
        for _ in range(40):
            assert type(got) is list and len(got) == 2 and got[0] is got[1]
            got = got[0]
        assert got == []


def test_deep_nesting_is_refused_with_a_clear_error(cache):
    ok: list = []
    for _ in range(cache_module.MAX_DEPTH - 1):
        ok = [ok]
    cache.set("ok", ok)  # MAX_DEPTH containers, counting the outer one
    got = cache.get("ok")
    for _ in range(cache_module.MAX_DEPTH - 1):
        got = got[0]
    assert got == []
    for depth in (cache_module.MAX_DEPTH + 1, 100_000):
        deep: list = []
        for _ in range(depth - 1):
            deep = [deep]
        with pytest.raises(CacheValueError, match=f"deeper than {cache_module.MAX_DEPTH}") as info:
            cache.set("deep", {"x": deep})
        assert isinstance(info.value, TinyLLMError) and isinstance(info.value, TypeError)
    cyclic: list = []
    cyclic.append({"again": cyclic})
    with pytest.raises(CacheValueError, match="contains itself"):
        cache.set("cyclic", cyclic)
    assert "deep" not in cache and "cyclic" not in cache and len(cache) == 1


def test_deep_value_written_by_someone_else_is_returned_without_recursion(tmp_path):
    # what the restricted unpickler admits, built opcode by opcode: ("deep", [[[...]]]) 20,000 lists deep
    n = 20_000
    payload = b"\x80\x05\x8c\x04deep" + b"]" * n + b"a" * (n - 1) + b"\x86."
    path = tmp_path / "c.pickle"
    PickleCache(path).close()
    with open(path, "ab") as f:
        f.write(frame(len(MAGIC), payload))
    got = PickleCache(path).get("deep")
    for _ in range(n - 1):
        got = got[0]
    assert got == []


def test_clear(cache):
    for i in range(5):
        cache.set(f"k{i}", i)
    cache.clear()
    assert len(cache) == 0 and cache.get("k1") is None
    cache.set("after", 1)
    assert cache.get("after") == 1 and len(cache) == 1


# --- persistence ------------------------------------------------------------------------------


def test_persists_across_instances_and_clear_is_persistent(tmp_path):
    path = tmp_path / "sub" / "c.pickle"  # the directory is created
    a = PickleCache(path)
    for i in range(10):
        a.set(f"k{i}", message(i))
    b = PickleCache(path)
    assert len(b) == 10 and b.get("k7") == message(7)
    a.set("late", 1)
    assert b.get("late") == 1  # a miss reads records appended since
    b.clear()
    assert path.read_bytes() == MAGIC
    assert len(a) == 0 and a.get("k1") is None  # a sees the clear at its next len()/miss
    a.set("new", 2)
    assert len(PickleCache(path)) == 1 and b.get("new") == 2


def test_file_and_lock_are_owner_only(tmp_path):
    path = tmp_path / "c.pickle"
    PickleCache(path).set("k", 1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(str(path) + ".lock").st_mode) == 0o600
    PickleCache(path).clear()  # a replaced file keeps the mode
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_writes_append_one_record(tmp_path):
    path = tmp_path / "c.pickle"
    c = PickleCache(path)
    c.set("a", message(1))
    size = path.stat().st_size
    before = path.read_bytes()
    c.set("b", message(2))
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > size  # appended, not rewritten
    assert raw_records(path) == ([("a", message(1)), ("b", message(2))], 0)


@pytest.mark.slow
def test_100k_entries_load_and_hit(tmp_path):
    path = tmp_path / "big.pickle"
    entries = {f"{i:064x}": message(i, 100) for i in range(100_000)}
    assert PickleCache(path).update(entries) == 100_000
    c = PickleCache(path)
    assert len(c) == 100_000
    assert c.get(f"{12345:064x}") == message(12345, 100)
    assert c.get(f"{99999:064x}") == message(99999, 100)


# --- cache_key --------------------------------------------------------------------------------

ENDPOINT = {"api_type": "openai", "base_url": "https://api.example/v1"}
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
PARAMS = {"temperature": 0, "max_tokens": 10}


def test_cache_key_is_sha256_hex_and_stable_across_key_order():
    key = cache_key(ENDPOINT, "gpt-4o-mini", MESSAGES, PARAMS)
    assert len(key) == 64 and int(key, 16) >= 0
    reordered = cache_key(
        dict(reversed(ENDPOINT.items())),
        "gpt-4o-mini",
        [dict(reversed(m.items())) for m in MESSAGES],
        dict(reversed(PARAMS.items())),
    )
    assert reordered == key


@pytest.mark.parametrize(
    "change",
    [
        lambda e, m, ms, p: ({**e, "base_url": "http://localhost:8000/v1"}, m, ms, p),
        lambda e, m, ms, p: (e, "gpt-4o", ms, p),
        lambda e, m, ms, p: (e, m, ms + [{"role": "user", "content": "more"}], p),
        lambda e, m, ms, p: (e, m, [{**ms[0], "content": "be long"}] + ms[1:], p),
        lambda e, m, ms, p: (e, m, ms, {**p, "temperature": 0.5}),
        lambda e, m, ms, p: (e, m, ms, {**p, "seed": 1}),
    ],
)
def test_cache_key_differs_by_each_input(change):
    assert cache_key(*change(ENDPOINT, "gpt-4o-mini", MESSAGES, PARAMS)) != cache_key(
        ENDPOINT, "gpt-4o-mini", MESSAGES, PARAMS
    )


def test_cache_key_ignores_timeout_api_key_and_extra_headers():
    base = cache_key(ENDPOINT, "m", MESSAGES, PARAMS)
    noisy = {**PARAMS, "timeout": 30, "api_key": "sk-secret", "extra_headers": {"X-Trace": "1"}}
    assert cache_key(ENDPOINT, "m", MESSAGES, noisy) == base
    assert cache_key({**ENDPOINT, "api_key": "sk-other"}, "m", MESSAGES, PARAMS) == base


# --- concurrency ------------------------------------------------------------------------------

WRITER = """
import os, sys, time
from tinyllm.cache._store import PickleCache
path, prefix, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = PickleCache(path)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
start = time.time()
for i in range(n):
    c.set(f"{prefix}-{i}", {"role": "assistant", "content": f"{prefix} {i} " + "x" * 300, "i": i})
print(start, time.time(), flush=True)
"""


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_processes_writing_at_once_lose_nothing(tmp_path):
    path, go = tmp_path / "c.pickle", tmp_path / "go"
    procs = [spawn(WRITER, path, f"p{j}", 500, go) for j in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    windows = []
    for p in procs:
        with p.stdout:  # the pipe is closed, not left to the garbage collector (an unclosed-file warning)
            windows.append(tuple(map(float, p.stdout.readline().split())))
        assert p.wait(timeout=120) == 0
    windows.sort()
    assert any(b[0] < a[1] for a, b in zip(windows, windows[1:]))  # some writers did run at the same time
    records, leftover = raw_records(path)
    assert leftover == 0 and len(records) == 2000  # every record complete, none torn or lost
    c = PickleCache(path)
    assert len(c) == 2000
    for j in range(4):
        for i in range(500):
            assert c.get(f"p{j}-{i}") == {"role": "assistant", "content": f"p{j} {i} " + "x" * 300, "i": i}


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_threads_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "c.pickle"
    shared = PickleCache(path)
    barrier = threading.Barrier(8)
    errors = []

    def work(t: int) -> None:
        try:
            c = shared if t < 4 else PickleCache(path)  # shared instance and one instance per thread
            barrier.wait()
            for i in range(300):
                c.set(f"t{t}-{i}", message(i))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert raw_records(path)[1] == 0
    assert len(shared) == 2400  # sees the other instances' records too
    fresh = PickleCache(path)
    assert len(fresh) == 2400 and fresh.get("t7-299") == message(299)


KILLED = """
import sys
from tinyllm.cache._store import PickleCache
c = PickleCache(sys.argv[1])
i = int(sys.argv[2])
print("ready", flush=True)
while True:
    c.set(f"k{i:08d}", {"i": i, "pad": "y" * ((i * 7919) % 65_536)})
    i += 1
"""


@pytest.mark.slow
def test_sigkill_mid_write_loses_at_most_the_record_being_written(tmp_path):
    path = tmp_path / "c.pickle"
    start = 0
    for delay in (0.3, 0.45, 0.6):
        proc = spawn(KILLED, path, start, 0)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        records, leftover = raw_records(path)
        # what is left after the complete records is less than one record: only the one being written was lost
        if leftover:
            data = path.read_bytes()[-leftover:]
            assert leftover < HEAD.size or leftover < HEAD.size + HEAD.unpack_from(data)[1]
        c = PickleCache(path)
        n = len(c)
        assert n > start  # the child did write
        assert all(f"k{i:08d}" in c for i in range(n))  # contiguous: nothing lost in the middle
        assert c.get(f"k{n - 1:08d}") == {"i": n - 1, "pad": "y" * (((n - 1) * 7919) % 65_536)}
        c.close()
        start = n  # the next child appends after the (possibly torn) tail
    c = PickleCache(path)
    c.set("final", 1)
    assert raw_records(path)[1] == 0
    assert len(PickleCache(path)) == start + 1


def test_truncated_last_record_is_skipped_then_cut_off(tmp_path):
    path = tmp_path / "c.pickle"
    c = PickleCache(path)
    for i in range(9):
        c.set(f"k{i}", message(i))
    good = path.stat().st_size
    c.set("k9", message(9))
    full = path.stat().st_size
    c.close()
    os.truncate(path, good + (full - good) // 2)  # cut the last record in half
    reader = PickleCache(path)
    assert len(reader) == 9 and reader.get("k9") is None and reader.get("k8") == message(8)
    writer = PickleCache(path)
    writer.set("new", 1)
    assert raw_records(path)[1] == 0
    assert path.stat().st_size < full + 100  # the half record was cut off, not kept before the new one
    again = PickleCache(path)
    assert len(again) == 10 and again.get("new") == 1 and again.get("k8") == message(8)
    assert reader.get("new") == 1  # an instance that saw the torn tail reads on correctly


@pytest.mark.parametrize(
    "garbage", [b"\x00" * 64, os.urandom(1000), b"\xff\xff\xff\xff\x00\x00"], ids=["zeros", "random", "huge-length"]
)
def test_garbage_after_last_record_is_skipped_then_cut_off(tmp_path, garbage):
    path = tmp_path / "c.pickle"
    c = PickleCache(path)
    for i in range(5):
        c.set(f"k{i}", i)
    c.close()
    with open(path, "ab") as f:
        f.write(garbage)
    assert len(PickleCache(path)) == 5
    PickleCache(path).set("k5", 5)
    records, leftover = raw_records(path)
    assert leftover == 0 and records == [(f"k{i}", i) for i in range(6)]


# --- damage in the middle of the file ---------------------------------------------------------


def thousand(path: Path) -> dict:
    """Write 1,000 records (one append) and return them as a dict."""
    entries = {f"k{i:04d}": message(i, 50) for i in range(1000)}
    c = PickleCache(path)
    c.update(entries)
    c.close()
    return entries


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tinyllm.cache" and r.levelname == "WARNING"]


@pytest.mark.parametrize("where", ["marker", "length-high-bit", "length-low-bit", "crc", "key", "payload-end"])
def test_one_flipped_bit_loses_only_that_record(tmp_path, caplog, where):
    path = tmp_path / "c.pickle"
    entries = thousand(path)
    start, end = frame_offsets(path)[500]
    data = bytearray(path.read_bytes())
    at, bit = {
        "marker": (start + 1, 0x01),
        "length-high-bit": (start + 4, 0x80),  # the length now runs far past the end of the file
        "length-low-bit": (start + 7, 0x01),
        "crc": (start + 9, 0x10),
        "key": (data.index(b"k0500", start), 0x02),
        "payload-end": (end - 2, 0x04),
    }[where]
    data[at] ^= bit
    path.write_bytes(bytes(data))
    caplog.set_level("WARNING", logger="tinyllm.cache")

    reader = PickleCache(path)
    assert len(reader) == 999 and "k0500" not in reader
    assert all(reader.get(k) == v for k, v in entries.items() if k != "k0500")
    assert len(warnings_of(caplog)) == 1 and "damaged" in warnings_of(caplog)[0]

    PickleCache(path).set("new", 1)  # a write keeps every record, and the damaged bytes, before it
    assert path.read_bytes().startswith(bytes(data))
    again = PickleCache(path)
    assert len(again) == 1000 and again.get("new") == 1 and again.get("k0999") == entries["k0999"]
    assert reader.get("new") == 1 and len(reader) == 1000  # the first instance reads on after the damage
    assert len(warnings_of(caplog)) == 1  # logged once per process, however many instances read it


def test_zeroed_page_loses_only_the_records_it_overlaps(tmp_path, caplog):
    path = tmp_path / "c.pickle"
    entries = thousand(path)
    frames = frame_offsets(path)
    page = (path.stat().st_size // 2) // 4096 * 4096
    with open(path, "r+b") as f:
        f.seek(page)
        f.write(b"\x00" * 4096)
    hit = {f"k{i:04d}" for i, (start, end) in enumerate(frames) if start < page + 4096 and end > page}
    assert 20 < len(hit) < 30  # 4096 bytes / ~175 per record, plus the two cut at the edges
    caplog.set_level("WARNING", logger="tinyllm.cache")
    c = PickleCache(path)
    assert set(entries) - set(k for k in entries if k in c) == hit
    assert len(c) == 1000 - len(hit) and c.get("k0999") == entries["k0999"]
    assert len(warnings_of(caplog)) == 1
    c.set("new", 1)
    assert len(PickleCache(path)) == 1001 - len(hit)


def test_damage_then_torn_tail_keeps_the_records_between(tmp_path):
    path = tmp_path / "c.pickle"
    entries = thousand(path)
    frames = frame_offsets(path)
    data = bytearray(path.read_bytes())
    data[frames[100][0] + 20] ^= 0x40  # damage record 100
    data = data[: frames[999][0] + 30]  # and tear the last record
    path.write_bytes(bytes(data))
    c = PickleCache(path)
    assert len(c) == 998 and "k0100" not in c and "k0999" not in c and c.get("k0998") == entries["k0998"]
    c.set("new", 1)  # cuts the torn tail, and only it, then appends
    assert path.read_bytes().startswith(bytes(data[: frames[999][0]]))
    assert path.stat().st_size == frames[999][0] + len(frame(0, pickle.dumps(("new", 1), protocol=5)))
    assert len(PickleCache(path)) == 999


def test_damage_seen_without_the_lock_is_checked_again_under_it(tmp_path, caplog):
    # a record whose bytes are not all visible yet (a write in progress, NFS) looks like damage:
    # the reader confirms under the file lock, by which time the writer is done, and skips nothing
    path = tmp_path / "c.pickle"
    reader = PickleCache(path)
    reader.set("first", 1)
    end = path.stat().st_size
    a = frame(end, pickle.dumps(("a", "x" * 500), protocol=5))
    b = frame(end + len(a), pickle.dumps(("b", 2), protocol=5))
    with open(path, "ab") as f:
        f.write(a[:100] + b"\x00" * 300 + a[400:] + b)  # a's middle still zeros, b complete after it
    lock = reader._file_lock

    def lock_after_the_write_lands():
        with open(path, "r+b") as f:
            f.seek(end + 100)
            f.write(a[100:400])
        return lock()

    reader._file_lock = lock_after_the_write_lands
    caplog.set_level("WARNING", logger="tinyllm.cache")
    assert reader.get("b") == 2 and reader.get("a") == "x" * 500
    assert warnings_of(caplog) == []


def test_frame_bytes_inside_a_value_are_never_taken_for_records(tmp_path):
    inner = tmp_path / "inner.pickle"
    PickleCache(inner).update({f"inner{i}": i for i in range(5)})  # valid frames, at their own offsets
    path = tmp_path / "c.pickle"
    c = PickleCache(path)
    c.set("before", 1)
    c.set("blob", inner.read_bytes())  # a value that holds a whole cache file
    c.set("after", 2)
    c.close()
    start, _ = frame_offsets(path)[1]
    with open(path, "r+b") as f:  # damage the blob's header: the reader resyncs through the blob's bytes
        f.seek(start + 5)
        f.write(b"\xff")
    again = PickleCache(path)
    assert sorted(k for k in ["before", "blob", "after"] + [f"inner{i}" for i in range(5)] if k in again) == [
        "after",
        "before",
    ]


def test_version_1_file_is_read_then_converted_by_the_first_write(tmp_path, caplog):
    path = tmp_path / "c.pickle"
    v1 = struct.Struct(">II")
    records = []
    for i in range(50):
        payload = pickle.dumps((f"k{i}", message(i)), protocol=5)
        records.append(v1.pack(len(payload), zlib.crc32(payload)) + payload)
    records[20] = records[20][:30] + b"\x00" + records[20][31:]  # one damaged record
    torn = records[-1][:40]
    path.write_bytes(cache_module.MAGIC_V1 + b"".join(records[:-1]) + torn)
    content = path.read_bytes()
    caplog.set_level("WARNING", logger="tinyllm.cache")
    c = PickleCache(path)
    assert len(c) == 48 and "k20" not in c and c.get("k48") == message(48)
    assert path.read_bytes() == content  # reading does not change it
    assert len(warnings_of(caplog)) == 1
    c.set("new", 1)
    assert path.read_bytes().startswith(MAGIC)
    records_now, leftover = raw_records(path)
    assert leftover == 0 and len(records_now) == 49
    assert dict(records_now) == {**{f"k{i}": message(i) for i in range(49) if i != 20}, "new": 1}
    assert len(PickleCache(path)) == 49


def test_torn_header_is_repaired(tmp_path):
    path = tmp_path / "c.pickle"
    path.write_bytes(MAGIC[:5])
    c = PickleCache(path)
    c.set("k", 1)
    assert PickleCache(path).get("k") == 1


# --- tampered files ---------------------------------------------------------------------------


def evil_record(marker: Path, offset: int = 0) -> bytes:
    return frame(offset, pickle.dumps(("evil", Evil(marker))))


def test_evil_pickle_would_run_with_plain_pickle(tmp_path):
    # control: proves the payload used below really executes code when loaded without restriction
    marker = tmp_path / "control"
    pickle.loads(evil_record(marker)[HEAD.size :])
    assert marker.exists()


def test_tampered_record_raises_config_error_and_runs_nothing(tmp_path):
    path, marker = tmp_path / "c.pickle", tmp_path / "pwned"
    c = PickleCache(path)
    c.set("good", 1)
    with open(path, "ab") as f:
        f.write(evil_record(marker, path.stat().st_size))
    content = path.read_bytes()
    with pytest.raises(ConfigError, match="CACHE_API_CALLS=false") as info:
        PickleCache(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError):  # an open instance reading the new tail on a miss
        c.get("missing")
    with pytest.raises(ConfigError):  # and a writer refuses to append after it
        c.set("other", 2)
    assert not marker.exists()
    assert path.read_bytes() == content  # never deleted or rewritten


def test_tampered_dict_pickle_raises_config_error_and_runs_nothing(tmp_path):
    path, marker = tmp_path / "tt.pickle", tmp_path / "pwned"
    with open(path, "wb") as f:
        pickle.dump({"k": {"role": "assistant"}, "bad": Evil(marker)}, f)
    content = path.read_bytes()
    with pytest.raises(ConfigError, match="(?i)delete the file"):
        PickleCache(path)
    target = PickleCache(tmp_path / "other.pickle")
    with pytest.raises(ConfigError):
        target.import_dict_pickle(path)
    assert not marker.exists() and path.read_bytes() == content and len(target) == 0


def test_unrelated_file_raises_config_error_and_is_kept(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a cache\n")
    with pytest.raises(ConfigError):
        PickleCache(path)
    assert path.read_text() == "not a cache\n"


# --- TinyTroupe whole-dict pickles ------------------------------------------------------------


def tinytroupe_entries() -> dict:
    return {str(("gpt-4o", i, "msgs")): {**message(i), "annotations": [], "score": i / 3, "s": {i}} for i in range(300)}


def test_tinytroupe_file_is_converted_in_place(tmp_path):
    path = tmp_path / "openai_api_cache.pickle"
    entries = tinytroupe_entries()
    with open(path, "wb") as f:
        pickle.dump(entries, f)
    c = PickleCache(path)
    assert len(c) == 300 and all(c.get(k) == v for k, v in entries.items())
    assert path.read_bytes().startswith(MAGIC)
    records, leftover = raw_records(path)
    assert leftover == 0 and dict(records) == entries
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".lock"]  # no temp file left
    c.set("new", 1)
    assert len(PickleCache(path)) == 301


def test_import_dict_pickle_merges(tmp_path):
    old = tmp_path / "old.pickle"
    entries = tinytroupe_entries()
    with open(old, "wb") as f:
        pickle.dump(entries, f, protocol=2)
    c = PickleCache(tmp_path / "c.pickle")
    c.set("mine", 1)
    assert c.import_dict_pickle(old) == 300
    fresh = PickleCache(tmp_path / "c.pickle")
    assert len(fresh) == 301 and fresh.get("mine") == 1
    assert all(fresh.get(k) == v for k, v in entries.items())
    with open(old, "rb") as f:
        assert pickle.load(f) == entries  # the source is left as it was


# --- process-wide active cache ----------------------------------------------------------------

SWITCHER = """
import gc, os, resource, sys
from tinyllm.cache._store import MAX_SHARED_CACHES, PickleCache, active_cache, force_api_cache
folder = sys.argv[1]
gc.disable()  # open files must be released without waiting for a garbage collection
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
before = len(os.listdir("/proc/self/fd"))
for i in range(300):
    force_api_cache(True, os.path.join(folder, f"c{i}.pickle"))
    c = active_cache()
    c.set("k", i)
    assert c.get("k") == i and len(c) == 1
print(len(os.listdir("/proc/self/fd")) - before, MAX_SHARED_CACHES)
force_api_cache(True, os.path.join(folder, "c0.pickle"))  # an early one again: loaded anew
c = active_cache()
assert c.get("k") == 0 and c.get("missing") is None
print(PickleCache(os.path.join(folder, "c5.pickle")).stats()["hits"])  # saved when it was dropped
"""


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_switching_through_many_cache_files_keeps_few_files_open(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SWITCHER, str(tmp_path)], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    opened, limit = map(int, lines[0].split())
    assert opened <= limit
    assert int(lines[1]) == 1


def test_active_cache_follows_config_and_force(tmp_path):
    target = tmp_path / "c.pickle"
    try:
        assert active_cache(get_config()) is None  # default: CACHE_API_CALLS false
        configure(cache_api_calls=True, cache_file_name=str(target))
        c = active_cache(get_config())
        assert isinstance(c, PickleCache) and Path(c.path) == target
        assert active_cache(get_config()) is c  # memoized per path

        found = []
        threads = [threading.Thread(target=lambda: found.append(active_cache(get_config()))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(x is c for x in found) and len(found) == 8

        force_api_cache(False)
        assert active_cache(get_config()) is None
        force_api_cache(True, str(tmp_path / "forced.pickle"))
        assert Path(active_cache(get_config()).path) == tmp_path / "forced.pickle"
        force_api_cache(None)
        assert active_cache(get_config()) is c

        configure(cache_api_calls=False)
        assert active_cache(get_config()) is None
        force_api_cache(True)  # forced on, file name from the config
        assert active_cache(get_config()) is c
        force_api_cache(None)

        configure(cache_api_calls=True, cache_file_name="relative.pickle")  # relative to the working directory
        assert Path(active_cache(get_config()).path) == Path.cwd().resolve() / "relative.pickle"
    finally:
        force_api_cache(None)
        configure(cache_api_calls=None, cache_file_name=None)
