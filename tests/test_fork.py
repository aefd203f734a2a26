"""fork() safety: a forked child builds its own HTTP clients, request-queue state and cache file lock.

fork() is multiprocessing's default start method on Linux. The child inherits
the parent's memory: its SDK clients with their kept-alive sockets, its request
queue counters (slots held by parent threads that do not exist in the child),
and its cache's file lock. Here a parent and three forked children call the
loopback server at the same time; every reply must be the one asked for (the
server echoes each request's last user message).
"""

from __future__ import annotations

import multiprocessing
import threading
from types import SimpleNamespace

from helpers import wait_until

import tinyllm

CHILDREN = 3
CALLS = 15


def _calls(tag: str) -> list[tuple[str, str]]:
    """Send CALLS distinct messages; return (sent, replied) pairs."""
    out = []
    for i in range(CALLS):
        text = f"{tag}-{i}"
        out.append((text, tinyllm.get_client().send_message([{"role": "user", "content": text}])["content"]))
    return out


def _child(conn, tag: str) -> None:
    try:
        conn.send(("ok", _calls(tag)))
    except BaseException as exc:  # report, do not hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _run(server) -> list[tuple[str, str]]:
    """When the children are forked, parent threads hold every request slot (MAX_CONCURRENT_REQUESTS=2)
    and two idle keep-alive connections sit in the pool; then parent and children all call at once."""
    release = threading.Event()
    warm = threading.Barrier(4, timeout=20)

    def reply(request: dict) -> str:
        text = request["messages"][-1]["content"]
        if text.startswith("warm"):
            warm.wait()  # four requests at once: four connections, kept alive in the pool
        if text.startswith("hold"):
            release.wait(20)
        return "echo: " + text

    server.reply_with(reply)
    tinyllm.configure(
        api_type="openai",
        base_url=server.base_url,
        max_concurrent_requests=4,
        queue_timeout=8,
        max_attempts=1,
        timeout=10,
    )
    pool = [
        threading.Thread(target=tinyllm.get_client().send_message, args=([{"role": "user", "content": f"warm-{i}"}],))
        for i in range(4)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len({r.peer for r in server.chat_requests()}) == 4
    tinyllm.configure(max_concurrent_requests=2)
    holders = [
        threading.Thread(target=tinyllm.get_client().send_message, args=([{"role": "user", "content": f"hold-{i}"}],))
        for i in range(2)
    ]
    for t in holders:
        t.start()
    wait_until(lambda: server.in_flight == 2)  # both slots taken by parent threads

    ctx = multiprocessing.get_context("fork")
    procs = []
    for n in range(CHILDREN):
        mine, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(theirs, f"child{n}"))
        proc.start()
        theirs.close()
        procs.append((proc, mine))
    release.set()
    for t in holders:
        t.join()
    results = {"parent": _calls("parent")}
    for n, (proc, conn) in enumerate(procs):
        assert conn.poll(30), f"child {n} did not answer"
        status, value = conn.recv()
        proc.join(10)
        assert status == "ok", f"child {n}: {value}"
        results[f"child{n}"] = value
    pairs = [pair for value in results.values() for pair in value]
    for sent, got in pairs:
        assert got == "echo: " + sent, (sent, got)
    return pairs


def test_forked_children_get_their_own_replies(server):
    pairs = _run(server)
    assert len(pairs) == (CHILDREN + 1) * CALLS


def test_forked_children_get_their_own_replies_with_the_cache(server, tmp_path):
    path = tmp_path / "cache.pickle"
    tinyllm.force_api_cache(True, str(path))
    pairs = _run(server)
    # every reply is stored under its own request: asking again is answered from the file, correctly
    server.reply_with("WRONG")
    before = len(server.chat_requests())
    tinyllm.cache._store._shared.clear()  # read the file afresh, as a new process would
    for sent, got in pairs:
        assert tinyllm.get_client().send_message([{"role": "user", "content": sent}])["content"] == got
    assert len(server.chat_requests()) == before


def test_locks_held_at_fork_are_free_in_the_child():
    """A module-level lock that another thread holds at the moment of fork() (a configuration rebuild,
    usage counting, template loading, opening a cache file, registering a client or a tool) is a new,
    free lock in the child, whose first call would otherwise wait for ever."""
    import os

    from tinyllm import clients, config, tokens, tools
    from tinyllm.cache import _store as cache
    from tinyllm.prompts import _templates as templates
    from tinyllm.observe import _usage as usage
    from tinyllm.clients import llamacpp

    llamacpp._locks[("a-model.gguf", False)] = threading.Lock()  # a loaded model's lock, held while it generates
    named = [
        (config, "_lock"),
        (usage, "_lock"),
        (tokens, "_lock"),
        (templates, "_lock"),
        (templates, "_carried_lock"),
        (cache, "_shared_lock"),
        (clients.default_registry, "_lock"),
        (tools.registry, "_lock"),
        (llamacpp, "_load_lock"),
        (SimpleNamespace(lock=lambda: llamacpp._locks[("a-model.gguf", False)]), "lock"),
    ]
    locks = [_lock_of(owner, name) for owner, name in named]
    taken, done = threading.Event(), threading.Event()

    def holder() -> None:
        for lock in locks:
            lock.acquire()
        taken.set()
        done.wait(30)
        for lock in locks:
            lock.release()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert taken.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: each lock must be free now (the holder thread does not exist here)
            code = 1
            try:
                code = 0 if all(_lock_of(owner, name).acquire(timeout=2) for owner, name in named) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        done.set()
        thread.join()
        del llamacpp._locks[("a-model.gguf", False)]
    assert os.waitstatus_to_exitcode(status) == 0


def _lock_of(owner, name):
    """``owner.name``, or what it returns when it is a function (a lock kept in a dict)."""
    found = getattr(owner, name)
    return found() if callable(found) and not hasattr(found, "acquire") else found
