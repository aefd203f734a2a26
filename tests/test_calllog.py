"""The call log: real SQLite files, real subprocesses, the loopback server; `tinyllm logs`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import question_prompts
from fakeserver import Reply, Status

import tinyllm
from tinyllm import LLMCall
from tinyllm.observe import _calllog as calllog
from tinyllm.cli import cli

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-calllog-secret-key-0123456789"


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(
        tmp_path,
        ask="---\nmax_tokens: 30\n---\nYou answer briefly.\n",
        num="---\noutput_type: int\noutput_retries: 1\n---\nAnswer with a number.\n",
    )


@pytest.fixture
def db(tmp_path):
    return tmp_path / "log" / "calls.db"


@pytest.fixture
def wired(server, monkeypatch, db):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tinyllm.configure(
        api_type="openai", base_url=server.base_url, waiting_time=0.001, model="gpt-4o-mini", log_calls=True, log_db=db
    )
    return server


def rows(db: Path) -> list[dict]:
    assert calllog.flush_all(30)
    conn = calllog.connect(str(db))
    try:
        return calllog.query(conn, limit=100_000)
    finally:
        conn.close()


def db_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


class Stub:
    """A plain client (no HTTP): answers "42", reports usage."""

    def send_message(self, messages, **params):
        return {"role": "assistant", "content": "42"}


def test_a_call_and_a_failed_call_are_logged_whole_and_the_key_never(wired, prompts, db, sleeps):
    wired.enqueue(Reply("Paris."))
    response = LLMCall("ask.system.md", prompts_dir=prompts, temperature=0).respond(question="Capital of France?")
    wired.enqueue(Status(401))
    with pytest.raises(tinyllm.AuthenticationError):
        LLMCall("ask.system.md", prompts_dir=prompts).call(question="again?")
    failed, ok = rows(db)  # newest first
    assert ok["template"] == "ask.system.md" and ok["template_path"] == str(prompts / "ask.system.md")
    assert len(ok["template_hash"]) == 16
    assert ok["variables"] == {"question": "Capital of France?"}
    assert ok["messages"] == response.messages and ok["messages"][-1]["content"] == "Capital of France?"
    assert ok["response"] == "Paris." and ok["reply"] == {"content": "Paris."}
    assert ok["model"] == ok["model_requested"] == "gpt-4o-mini" and ok["api_type"] == "openai"
    assert ok["endpoint"] == {"api_type": "openai", "base_url": wired.base_url}
    assert ok["params"] == {"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 30}
    assert ok["usage"] == response.usage and ok["prompt_tokens"] == response.usage["prompt_tokens"]
    assert ok["cost"] == pytest.approx(response.cost) and ok["cost"] > 0
    assert ok["latency"] > 0 and ok["cached"] is False and ok["retries"] == 0 and ok["error"] is None
    assert ok["id"] < failed["id"] and ok["pid"] == os.getpid()
    assert failed["error"]["type"] == "AuthenticationError" and "401" in failed["error"]["message"]
    assert failed["response"] is None and failed["cost"] is None and failed["variables"] == {"question": "again?"}
    assert KEY.encode() not in db_bytes(db) and KEY[-8:].encode() not in db_bytes(db)
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_a_key_in_the_parameters_or_the_reply_is_masked(wired, prompts, db):
    wired.enqueue(Reply(f"your key is {KEY}"))
    LLMCall("ask.system.md", prompts_dir=prompts, extra_headers={"Authorization": f"Bearer {KEY}"}).call(
        question="key?"
    )
    (row,) = rows(db)
    assert row["params"]["extra_headers"] == {"Authorization": "****"}
    assert KEY not in row["response"] and row["response"].startswith("your key is ****")
    assert KEY.encode() not in db_bytes(db)


def test_retries_output_retries_usage_and_cost_are_summed(wired, prompts, db, sleeps):
    usage = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
    wired.enqueue(Status(500), Reply("forty-two", usage=usage), Reply("42", usage=usage))
    response = LLMCall("num.system.md", prompts_dir=prompts).respond(question="6 x 7?")
    (row,) = rows(db)
    assert response.value == 42 and row["response"] == "42"
    assert row["retries"] == 1 and row["output_retries"] == 1
    assert row["usage"] == {"prompt_tokens": 200, "completion_tokens": 20, "total_tokens": 220}
    from genai_prices import Usage, calc_price

    one = float(calc_price(Usage(input_tokens=100, output_tokens=10), "gpt-4o-mini", provider_id="openai").total_price)
    assert row["cost"] == pytest.approx(2 * one) and response.cost == pytest.approx(2 * one)


def test_the_library_does_not_log_unless_asked(server, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tinyllm.configure(api_type="openai", base_url=server.base_url)
    LLMCall("ask.system.md", prompts_dir=prompts).call(question="hi")
    calllog.flush_all(10)
    assert not Path(calllog.default_path()).exists()
    assert Path(calllog.default_path()).is_relative_to(tmp_path)  # conftest: XDG_DATA_HOME under tmp_path
    tinyllm.configure(log_calls=True)
    LLMCall("ask.system.md", prompts_dir=prompts).call(question="hi")
    assert len(rows(Path(calllog.default_path()))) == 1


def test_async_calls_and_chat_turns_are_logged(wired, prompts, db):
    import asyncio

    asyncio.run(LLMCall("ask.system.md", prompts_dir=prompts).acall(question="async?"))
    chat = tinyllm.LLMChat(system="Be brief.")
    chat.say("one")
    chat.say("two")
    found = rows(db)
    assert [r["messages"][-1]["content"] for r in found] == ["two", "one", "async?"]
    assert found[0]["template"] is None and len(found[0]["messages"]) == 4


WRITER = """
import sys
import tinyllm
from tinyllm import LLMCall
from tinyllm.observe import _calllog as calllog

class Stub:
    def send_message(self, messages, **params):
        return {"role": "assistant", "content": "ok"}

tinyllm.configure(log_calls=True, log_db=sys.argv[1])
llm = LLMCall("ask.system.md", prompts_dir=sys.argv[2], client=Stub())
start = float(sys.argv[3])
import time
while time.time() < start:
    time.sleep(0.005)
for i in range(int(sys.argv[4])):
    llm.call(question=f"q{i}")
"""


@pytest.mark.slow
def test_four_processes_log_500_calls_each_into_one_file_with_none_lost(prompts, db, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.time() + 2.0  # all four start writing at once
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(db), str(prompts), str(start), "500"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "WARNING" not in err and "cannot write" not in err, err
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT id), COUNT(DISTINCT pid) FROM calls").fetchone() == (
        2000,
        2000,
        4,
    )
    assert conn.execute("SELECT COUNT(DISTINCT variables) FROM calls").fetchone() == (500,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_forked_child_gets_its_own_writer(prompts, db):
    tinyllm.configure(log_calls=True, log_db=db)
    llm = LLMCall("ask.system.md", prompts_dir=prompts, client=Stub())
    llm.call(question="parent")  # the parent's writer thread is running
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            llm.call(question="child")
            code = 0 if calllog.flush_all(20) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    found = rows(db)
    assert sorted(r["variables"]["question"] for r in found) == ["child", "parent"]
    assert len({r["pid"] for r in found}) == 2


def test_a_full_queue_warns_once_and_the_calls_go_on(prompts, db, caplog, monkeypatch):
    monkeypatch.setattr(calllog, "QUEUE_SIZE", 2)
    monkeypatch.setattr(calllog, "_logs", {})
    tinyllm.configure(log_calls=True, log_db=db)
    llm = LLMCall("ask.system.md", prompts_dir=prompts, client=Stub())
    llm.call(question="first")
    assert calllog.flush_all(10)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the writer waits
    try:
        with caplog.at_level(logging.WARNING, logger="tinyllm"):
            assert [llm.call(question=f"q{i}") for i in range(20)] == ["42"] * 20
        full = [r for r in caplog.records if "queue is full" in r.getMessage()]
        assert len(full) == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    found = rows(db)
    log_ = calllog.call_log(str(db))
    assert 2 <= len(found) < 21 and log_.dropped == 21 - len(found)


def _make_read_only(path: Path) -> None:
    """Read-only for this process: mode 0444, and for root (who ignores modes) the immutable attribute."""
    os.chmod(path, 0o444)
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: no file is read-only for this process")


def test_a_read_only_log_file_warns_once_and_the_calls_go_on(prompts, tmp_path, caplog):
    ro_db = tmp_path / "ro" / "calls.db"
    ro_db.parent.mkdir()
    conn = sqlite3.connect(ro_db)
    conn.execute("CREATE TABLE calls (x)")
    conn.commit()
    conn.close()
    _make_read_only(ro_db)
    try:
        before = ro_db.read_bytes()
        tinyllm.configure(log_calls=True, log_db=ro_db)
        llm = LLMCall("ask.system.md", prompts_dir=prompts, client=Stub())
        with caplog.at_level(logging.WARNING, logger="tinyllm"):
            for _ in range(5):
                assert llm.call(question="q") == "42"
                assert calllog.flush_all(30)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "cannot write the call log" in warnings[0], warnings
        assert "readonly" in warnings[0]
        assert ro_db.read_bytes() == before
        assert calllog.call_log(str(ro_db)).dropped == 5
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro_db)], capture_output=True)
        os.chmod(ro_db, 0o644)


# --------------------------------------------------------------------------- #
# tinyllm logs
# --------------------------------------------------------------------------- #


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def filled(wired, prompts, db, sleeps):
    """Four calls: ask (gpt-4o-mini), ask (gpt-4o), num, and a failed ask; one batch."""
    wired.enqueue(Reply("Paris is the capital."), Reply("Berlin."), Reply("42"), Status(400))
    LLMCall("ask.system.md", prompts_dir=prompts).call(question="Capital of France?")
    LLMCall("ask.system.md", prompts_dir=prompts, model="gpt-4o").call(question="Capital of Germany?")
    with calllog.batch("batch-one"):
        LLMCall("num.system.md", prompts_dir=prompts).call(question="6 x 7?")
    with pytest.raises(tinyllm.BadRequestError):
        LLMCall("ask.system.md", prompts_dir=prompts).call(question="broken?")
    assert calllog.flush_all(10)
    return db


def json_lines(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_logs_lists_newest_first_with_filters(filled):
    db = str(filled)
    every = json_lines(run("logs", "--db", db, "--json"))
    assert [r["variables"]["question"] for r in every] == [
        "broken?",
        "6 x 7?",
        "Capital of Germany?",
        "Capital of France?",
    ]
    for r in every:
        assert {"id", "model", "response", "usage", "cost", "error"} <= set(r)
    assert every[2]["model"] == "gpt-4o" and every[2]["response"] == "Berlin."
    assert every[0]["error"]["type"] == "BadRequestError" and every[0]["response"] is None
    assert len(json_lines(run("logs", "--db", db, "--json", "-n", "2"))) == 2
    assert [r["template"] for r in json_lines(run("logs", "--db", db, "--json", "--template", "num"))] == [
        "num.system.md"
    ]
    assert len(json_lines(run("logs", "--db", db, "--json", "--template", "ask.system.md"))) == 3
    assert [r["model"] for r in json_lines(run("logs", "--db", db, "--json", "--model", "gpt-4o"))] == ["gpt-4o"]
    assert len(json_lines(run("logs", "--db", db, "--json", "--model", "gpt-4o*"))) == 4
    assert [r["error"]["type"] for r in json_lines(run("logs", "--db", db, "--json", "--errors"))] == [
        "BadRequestError"
    ]
    assert [r["response"] for r in json_lines(run("logs", "--db", db, "--json", "--batch", "batch-one"))] == ["42"]
    assert [r["response"] for r in json_lines(run("logs", "--db", db, "--json", "-q", "Germany"))] == ["Berlin."]
    assert [r["response"] for r in json_lines(run("logs", "--db", db, "--json", "-q", "capital AND paris"))] == [
        "Paris is the capital."
    ]
    assert len(json_lines(run("logs", "--db", db, "--json", "--since", "1h"))) == 4
    assert json_lines(run("logs", "--db", db, "--json", "--since", "2999-01-01")) == []
    table = run("logs", "--db", db)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "TIME", "TEMPLATE", "MODEL"] and len(lines) == 5
    assert "BadRequest" in lines[1] and "Berlin." in lines[3] and "$0.0000" in lines[4]


def test_logs_show_prints_one_call_whole(filled):
    db = str(filled)
    newest_ok = json_lines(run("logs", "--db", db, "--json", "--template", "num"))[0]
    shown = run("logs", "show", newest_ok["id"][:-3], "--db", db)
    assert shown.exit_code == 0, shown.output
    text = shown.stdout
    assert f"id:        {newest_ok['id']}" in text and "num.system.md" in text and "sha256 " in text
    assert "--- system ---\nAnswer with a number." in text and "--- user ---\n6 x 7?" in text
    assert "--- reply ---\n42" in text and "batch:     batch-one" in text and "cost:      $" in text
    whole = json.loads(run("logs", "show", newest_ok["id"], "--db", db, "--json").stdout)
    assert whole == newest_ok
    assert json.loads(run("logs", "--db", db, "show", newest_ok["id"], "--json").stdout) == newest_ok
    failed = run("logs", "show", "last", "--db", db).stdout
    assert "error:     BadRequestError: " in failed
    missing = run("logs", "show", "ffff", "--db", db)
    assert missing.exit_code == 1 and "no call with id 'ffff'" in missing.stderr


def test_logs_stats_sums_by_model_template_and_day(filled):
    sums = json.loads(run("logs", "stats", "--db", str(filled), "--json").stdout)
    by_model = {r["model"]: r for r in sums["by_model"]}
    assert by_model["gpt-4o-mini"]["calls"] == 3 and by_model["gpt-4o"]["calls"] == 1
    assert by_model["gpt-4o-mini"]["errors"] == 1 and by_model["gpt-4o"]["cost"] > by_model["gpt-4o-mini"]["cost"] / 10
    by_template = {r["template"]: r for r in sums["by_template"]}
    assert by_template["ask.system.md"]["calls"] == 3 and by_template["num.system.md"]["calls"] == 1
    assert len(sums["by_day"]) == 1 and sums["by_day"][0]["calls"] == 4
    total = sums["total"][0]
    assert total["calls"] == 4 and total["errors"] == 1
    assert total["cost"] == pytest.approx(
        sum(r["cost"] or 0 for r in json_lines(run("logs", "--db", str(filled), "--json")))
    )
    text = run("logs", "stats", "--db", str(filled)).stdout
    assert "MODEL" in text and "TEMPLATE" in text and "DAY" in text and "total: 4 calls" in text and "1 errors" in text


def test_logs_without_a_log_says_so(tmp_path):
    result = run("logs", "--db", str(tmp_path / "none.db"))
    assert result.exit_code == 1 and "no call log at" in result.stderr
    bad = run("logs", "--since", "yesterday-ish", "--db", str(tmp_path / "none.db"))
    assert bad.exit_code == 2 and "--since" in bad.stderr


def test_tinyllm_call_logs_by_default_and_no_log_turns_it_off(server, prompts, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("TINYLLM_BASE_URL", server.base_url)
    monkeypatch.setenv("TINYLLM_API_TYPE", "openai")
    assert run("call", "ask", "--prompts-dir", str(prompts), "--var", "question=one").exit_code == 0
    default = Path(calllog.default_path())
    assert [r["variables"]["question"] for r in rows(default)] == ["one"]
    assert run("call", "ask", "--prompts-dir", str(prompts), "--var", "question=two", "--no-log").exit_code == 0
    monkeypatch.setenv("TINYLLM_LOG_CALLS", "false")
    tinyllm.configure(log_calls=None)
    assert run("call", "ask", "--prompts-dir", str(prompts), "--var", "question=three").exit_code == 0
    assert [r["variables"]["question"] for r in rows(default)] == ["one"]
    listed = run("logs", "--json")  # the default file
    assert [r["variables"]["question"] for r in json_lines(listed)] == ["one"]
    assert KEY.encode() not in db_bytes(default)
