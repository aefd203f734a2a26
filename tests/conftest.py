"""Shared pytest fixtures.

- ``server``: a started :class:`fakeserver.FakeOpenAIServer` per test.
- ``_isolate_env`` (autouse): no TINYLLM_/OPENAI_/AZURE_OPENAI*/ANTHROPIC_ variables but TINYLLM_LOCAL_THREADS=1, the
  test runs inside its own ``tmp_path`` (so no developer ./config.ini or ./.env
  leaks in), XDG_DATA_HOME is under ``tmp_path`` (the call log's default place), and ``tinyllm.config`` overrides (``configure()``) are cleared
  before and after each test.
- ``embedded_model`` (session): the embedded llama.cpp model loaded once per run (the client module
  keeps it, keyed by path, for every in-process test); tests marked ``local`` warm it first.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

# Tests import the fake server as `fakeserver` (this directory is on sys.path),
# never as `tests.fakeserver`: two copies of the module would have distinct item classes.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from fakeserver import FakeOpenAIServer  # noqa: E402

_ENV_PREFIXES = ("TINYLLM_", "OPENAI_", "AZURE_OPENAI", "ANTHROPIC_")

# A run started with SIGINT ignored (`pytest &` in a non-interactive script) would pass that on to every
# child process, and the Ctrl-C tests (in-process and subprocess) would fail or hang: restore the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _clear_config_overrides() -> None:
    # Only a tinyllm.config that some test already imported can hold overrides;
    # one never imported starts empty.  Looking in sys.modules (instead of
    # importing) keeps these fixtures from importing the whole package, so a
    # broken or half-written tinyllm fails only the tests that use it, loudly.
    config = sys.modules.get("tinyllm.config")
    if config is not None:
        config.clear_overrides()
    clients = sys.modules.get("tinyllm.clients")
    if clients is not None:  # forced api_type and registered clients (each client owns a request queue)
        clients.default_registry.reset()
    cache = sys.modules.get("tinyllm.cache._store")
    if cache is not None and hasattr(cache, "force_api_cache"):
        cache.force_api_cache(None)
    usage = sys.modules.get("tinyllm.observe._usage")
    if usage is not None:
        usage.reset_usage_stats()


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))  # the call log of `tinyllm call`/`map` goes here
    # llama.cpp on one thread, in this process and in the child processes tests start: its threads
    # spin while they wait for each other, so on a busy 2-core machine two threads ran ~10x slower
    # than one (3 x 24 tokens: 17.6 s against 1.8 s at load 10; see .ci/run's timing note)
    monkeypatch.setenv("TINYLLM_LOCAL_THREADS", "1")
    _clear_config_overrides()
    yield
    _clear_config_overrides()


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture
def no_server_errors(request):
    """A misused script item or a fake-server bug fails the test that caused it."""
    srv = request.getfixturevalue("server") if "server" in request.fixturenames else None
    yield
    if srv is not None:
        assert srv.errors == []


@pytest.fixture
def sleeps(monkeypatch):
    """Make time.sleep instant; the list records every wait asked for (seconds)."""
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", lambda seconds: waits.append(seconds))
    return waits


@pytest.fixture(scope="session")
def embedded_model() -> Path | None:
    """Path of the bundled GGUF model, loaded once per test run; None without the local extra.

    tinyllm.clients.llamacpp keeps loaded models by path for the process, so every in-process test
    that uses the embedded model shares this one load; no test should clear that cache.
    """
    from tinyllm.clients import llamacpp

    if not llamacpp.local_available():
        return None
    path = llamacpp.default_model_path()
    llamacpp._load(path, False, threads=1)  # one thread: see _isolate_env
    return path


@pytest.fixture(autouse=True)
def _warm_embedded_model(request):
    """Tests marked ``local`` start with the model loaded (its load is paid once, in the session fixture)."""
    if request.node.get_closest_marker("local") is not None:
        request.getfixturevalue("embedded_model")
