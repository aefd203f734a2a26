"""Secrets in the call log and in the HTTP libraries' log lines (issue 20): header values under any
name and every query value are masked unless the name is known to be safe, in the database, in
`tinyllm logs --json` and `tinyllm logs show`; httpx's INFO line shows no password or query value."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakeserver import Reply
from helpers import question_prompts

import tinyllm
from tinyllm import LLMCall
from tinyllm.cli import cli
from tinyllm.observe import _calllog as calllog

KEY = "sk-log-secrets-key-0123456789"
PASSWORD = "hunter2-password-value"
CREDENTIAL = "credential-value-0042"
QUERY_SECRET = "sig-query-secret-77"


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


def db_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_header_and_query_values_are_masked_unless_known_safe(wired, tmp_path, db):
    prompts = question_prompts(tmp_path, ask="You answer briefly.\n")
    wired.enqueue(Reply("fine"))
    LLMCall(
        "ask.system.md",
        prompts_dir=prompts,
        extra_headers={
            "X-Password": PASSWORD,
            "X-Credential": CREDENTIAL,
            "Content-Type": "application/json",
            "User-Agent": "my-app/1.0",
            "OpenAI-Organization": "org-abc",
        },
        extra_query={"sig": QUERY_SECRET, "api-version": "2024-10-21"},
    ).call(question="q")
    assert calllog.flush_all(30)
    request = wired.chat_requests()[0]  # what was sent is unchanged
    assert request.headers["x-password"] == PASSWORD and request.query["sig"] == QUERY_SECRET
    conn = calllog.connect(str(db))
    try:
        (row,) = calllog.query(conn, limit=10)
    finally:
        conn.close()
    assert row["params"]["extra_headers"] == {
        "X-Password": "****",
        "X-Credential": "****",
        "Content-Type": "application/json",
        "User-Agent": "my-app/1.0",
        "OpenAI-Organization": "org-abc",
    }
    assert row["params"]["extra_query"] == {"sig": "****", "api-version": "2024-10-21"}
    raw = db_bytes(db)
    for secret in (PASSWORD, CREDENTIAL, QUERY_SECRET):
        assert secret.encode() not in raw
    runner = CliRunner()
    listed = runner.invoke(cli, ["logs", "--db", str(db), "--json"], catch_exceptions=False).output
    shown = runner.invoke(cli, ["logs", "--db", str(db), "show", row["id"]], catch_exceptions=False).output
    assert "****" in listed and "X-Password" in shown
    for secret in (PASSWORD, CREDENTIAL, QUERY_SECRET):
        assert secret not in listed and secret not in shown


def test_a_masked_value_echoed_elsewhere_is_masked_there_too(wired, tmp_path, db):
    prompts = question_prompts(tmp_path, ask="You answer briefly.\n")
    wired.enqueue(Reply(f"you sent {PASSWORD}"))
    LLMCall("ask.system.md", prompts_dir=prompts, extra_headers={"X-Password": PASSWORD, "X-Debug": "true"}).call(
        question="q"
    )
    assert calllog.flush_all(30)
    assert PASSWORD.encode() not in db_bytes(db)
    conn = calllog.connect(str(db))
    try:
        (row,) = calllog.query(conn, limit=10)
    finally:
        conn.close()
    assert row["response"] == "you sent ****" and row["params"]["extra_headers"]["X-Debug"] == "****"
    assert row["cached"] is False  # a short masked value ("true") does not mangle the rest of the row


def test_httpx_request_lines_show_no_password_or_query_value(server, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    base = server.base_url.replace("http://", f"http://admin:{PASSWORD}@")
    tinyllm.configure(api_type="openai", base_url=base, waiting_time=0.001, model="gpt-4o-mini")
    server.enqueue(Reply("fine"))
    with caplog.at_level(logging.DEBUG):
        tinyllm.get_client().send_message(
            [{"role": "user", "content": "q"}],
            extra_query={"key": QUERY_SECRET},
            extra_headers={"X-Credential": CREDENTIAL},
        )
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("httpx", "httpcore", "openai"))]
    request_lines = [line for line in lines if line.startswith("HTTP Request:")]
    assert request_lines and all("key=***" in line and "***@127.0.0.1" in line for line in request_lines)
    text = "\n".join(lines)
    assert PASSWORD not in text and QUERY_SECRET not in text and CREDENTIAL not in text
