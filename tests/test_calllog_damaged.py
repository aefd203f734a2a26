"""The call log after its file is damaged (issue 20): the damaged file is moved aside, a new log starts
in its place, and one warning names both files; `tinyllm logs` on a damaged file says what to do."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner
from fakeserver import Reply
from helpers import question_prompts

import tinyllm
from tinyllm import LLMCall
from tinyllm.cli import cli
from tinyllm.observe import _calllog as calllog

KEY = "sk-calllog-damaged-0123456789"


@pytest.fixture
def db(tmp_path):
    return tmp_path / "log" / "calls.db"


@pytest.fixture
def llm(server, monkeypatch, db, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tinyllm.configure(
        api_type="openai", base_url=server.base_url, waiting_time=0.001, model="gpt-4o-mini", log_calls=True, log_db=db
    )
    return LLMCall("ask.system.md", prompts_dir=question_prompts(tmp_path, ask="Be brief.\n"))


def logged(db) -> list[dict]:
    conn = calllog.connect(str(db))
    try:
        return calllog.query(conn, limit=100)
    finally:
        conn.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_log_is_moved_aside_and_a_new_one_started(llm, server, db, caplog, damage):
    server.enqueue(Reply("one"))
    llm.call(question="1")
    assert calllog.flush_all(30) and [r["response"] for r in logged(db)] == ["one"]
    data = db.read_bytes()
    for extra in db.parent.glob("calls.db-*"):
        extra.unlink()
    broken = b"this is not an SQLite file at all" * 200 if damage == "garbage" else data[:100] + b"\0" * 3000
    db.write_bytes(broken)
    server.enqueue(Reply("two"), Reply("three"))
    with caplog.at_level(logging.WARNING, logger="tinyllm"):
        llm.call(question="2")
        assert calllog.flush_all(30)
        llm.call(question="3")
        assert calllog.flush_all(30)
    (aside,) = db.parent.glob("calls.db.damaged-*[0-9TZ]")
    assert [r["response"] for r in logged(db)] == ["three", "two"]  # no row lost after the damage
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(db) in warnings[0] and str(aside) in warnings[0]
    assert aside.read_bytes() == broken  # kept as it was, for whoever wants to look


def test_logs_on_a_damaged_file_says_how_to_move_it_aside(tmp_path):
    db = tmp_path / "calls.db"
    db.write_bytes(b"garbage" * 1000)
    result = CliRunner().invoke(cli, ["logs", "--db", str(db)])
    assert result.exit_code != 0
    assert f"mv {db} {db}.damaged" in result.output + (result.stderr if result.stderr_bytes is not None else "")
