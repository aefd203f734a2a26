"""`tinyllm map --batch-api`, `LLMCall.map(batch_api=True)` and `tinyllm batches`, against the loopback fake of
the Files and Batches endpoints running in its own process (tests/fake_batches.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import urllib.request
import pytest
from click.testing import CliRunner

from helpers import ROOT, child_env, question_prompts, wait_until, write

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def fake_process():
    """tests/fake_batches.py in a child process, for the whole session; yields its base URL (http://127.0.0.1:N)."""
    proc = subprocess.Popen([sys.executable, str(HERE / "fake_batches.py")], cwd=HERE, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Fake:
    """The test's handle on the fake: its controls, and what it received."""

    def __init__(self, url: str) -> None:
        self.url, self.base_url = url, url + "/v1"

    def _control(self, what: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/_fake/{what}", data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as answer:
            return json.loads(answer.read())

    def plan(self, **plan) -> None:
        self._control("plan", plan)

    def reply(self, content: str | None) -> None:
        self._control("reply", {"content": content})

    def advance(self, batch_id: str | None = None) -> None:
        self._control("advance", {"id": batch_id})

    def state(self) -> dict:
        return self._control("state")

    def batches(self) -> list[dict]:
        return sorted(self.state()["batches"].values(), key=lambda b: b["id"])

    def request_lines(self, batch: dict) -> list[dict]:
        text = self.state()["files"][batch["input_file_id"]]["bytes"]
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def fake(fake_process, monkeypatch):
    """The fake, reset to plain behaviour, with the default openai client pointed at it."""
    import tinyllm

    f = Fake(fake_process)
    f.plan()
    f.reply(None)
    before = {b["id"] for b in f.batches()}
    f.new = lambda: [b for b in f.batches() if b["id"] not in before]  # the batches this test created
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-batches")
    tinyllm.configure(api_type="openai", base_url=f.base_url, waiting_time=0.001, model="gpt-4o-mini",
                      batch_poll_interval=0.01)
    return f


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(tmp_path, ask="Answer briefly.")


def rows_csv(path: Path, n: int, start: int = 0) -> Path:
    return write(path, "id,question\n" + "".join(f"{i},question {i}\n" for i in range(start, start + n)))


def run_map(*args: str) -> object:
    from tinyllm.cli import cli

    return CliRunner().invoke(cli, ["map", *args], catch_exceptions=False)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# --------------------------------------------------------------------------- #


def test_map_batch_api_writes_what_a_live_map_writes(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 5)
    live = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "live.jsonl"), "--no-progress")
    assert live.exit_code == 0, live.output
    result = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "batch.jsonl"), "--batch-api", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "batch.jsonl").read_bytes() == (tmp_path / "live.jsonl").read_bytes()
    (batch,) = fake.new()
    assert batch["status"] == "completed" and batch["endpoint"] == "/v1/chat/completions"
    assert batch["completion_window"] == "24h"
    state = json.loads((tmp_path / "batch.jsonl.batches.json").read_text())
    assert [b["id"] for b in state["batches"]] == [batch["id"]] and state["batches"][0]["fetched"]
    assert "5 rows: 5 done now" in result.stderr and "batch price" in result.stderr
