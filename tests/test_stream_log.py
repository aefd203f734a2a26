"""Streamed calls in the call log, and tool rounds in a call's row: the loopback server, real SQLite files.

A streamed call (``LLMCall.stream``/``astream``, ``LLMChat.stream``/``astream``) is one row when its
stream ends: complete (usage, cost, latency, time to first token), failed midway (the error and the
partial text), closed early (``StreamClosed``) or dropped unfinished (``StreamAbandoned``).
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakeserver import Message, Reply, Status, Stream
from helpers import question_prompts

import tinyllm
from tinyllm import LLMCall, LLMChat
from tinyllm.cli import cli
from tinyllm.observe import _calllog as calllog

KEY = "sk-streamlog-secret-key-0123456789"
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(tmp_path, ask="You answer briefly.\n")


@pytest.fixture
def db(tmp_path):
    return tmp_path / "log" / "calls.db"


@pytest.fixture
def wired(server, monkeypatch, db):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tinyllm.configure(
        api_type="openai",
        base_url=server.base_url,
        waiting_time=0.001,
        model="gpt-4o-mini",
        log_calls=True,
        log_db=db,
        max_concurrent_requests=1,
        queue_timeout=0.5,
    )
    return server


def rows(db: Path) -> list[dict]:
    assert calllog.flush_all(30)
    if not db.exists():
        return []
    conn = calllog.connect(str(db))
    try:
        return calllog.query(conn, limit=1000)
    finally:
        conn.close()


def in_flight() -> int:
    return tinyllm.clients.get_client().queue.in_flight


# -- complete, failed, closed, dropped (sync) ----------------------------------------------


def test_a_complete_stream_is_one_row_with_usage_cost_latency_and_ttft(wired, prompts, db):
    wired.enqueue(Stream(Reply("Paris is the capital.")))
    response = LLMCall("ask", prompts_dir=prompts).stream(question="Capital of France?")
    assert response._observer is not None
    assert "".join(response) == "Paris is the capital."
    (row,) = rows(db)
    assert row["response"] == "Paris is the capital." and row["reply"] == {"content": "Paris is the capital."}
    assert row["error"] is None and row["finish_reason"] == "stop"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0 and row["usage"] == response.usage
    assert row["cost"] == pytest.approx(response.cost) and row["cost"] > 0
    assert row["latency"] == pytest.approx(response.latency) and 0 < row["ttft"] <= row["latency"]
    assert row["template"] == "ask" and row["variables"] == {"question": "Capital of France?"}
    assert row["model"] == "gpt-4o-mini" and row["tool_rounds"] is None
    assert KEY not in db.read_bytes().decode("latin-1")


def test_a_stream_that_fails_midway_is_logged_with_the_error_and_the_partial_text(wired, prompts, db):
    wired.enqueue(Stream(Reply("one two three four five six"), drop_after=4))
    response = LLMCall("ask", prompts_dir=prompts).stream(question="q")
    seen: list[str] = []
    with pytest.raises(tinyllm.APIConnectionError) as info:
        seen.extend(response)
    response.close()  # after the failure: no second row
    (row,) = rows(db)
    assert row["error"]["type"] == "APIConnectionError"
    assert row["response"] == "".join(seen) == info.value.partial and row["response"].startswith("one ")
    assert row["reply"] is None and row["ttft"] is not None


def test_a_stream_refused_at_once_is_logged_as_failed(wired, prompts, db):
    wired.enqueue(Status(401))
    with pytest.raises(tinyllm.AuthenticationError):
        list(LLMCall("ask", prompts_dir=prompts).stream(question="q"))
    (row,) = rows(db)
    assert row["error"]["type"] == "AuthenticationError" and row["response"] is None and row["ttft"] is None


def test_a_stream_broken_out_of_and_dropped_is_logged_as_abandoned_and_its_slot_freed(wired, prompts, db):
    wired.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
    response = LLMCall("ask", prompts_dir=prompts).stream(question="q")
    gc.disable()  # reference counting alone frees it (and logs it)
    try:
        for first in response:
            break
        assert in_flight() == 1
        del response
        assert in_flight() == 0
    finally:
        gc.enable()
    (row,) = rows(db)
    assert row["error"]["type"] == "StreamAbandoned" and "dropped unfinished" in row["error"]["message"]
    assert row["response"] == first == "one " and row["ttft"] is not None and row["latency"] > 0


def test_a_stream_closed_early_is_logged_as_closed_once(wired, prompts, db):
    wired.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
    with LLMCall("ask", prompts_dir=prompts).stream(question="q") as response:
        deltas = [next(iter(response)), next(iter(response))]
    assert in_flight() == 0
    del response
    (row,) = rows(db)
    assert row["error"]["type"] == "StreamClosed" and row["response"] == "".join(deltas) == "one two "


def test_a_stream_never_read_sends_nothing_and_logs_nothing(wired, prompts, db):
    response = LLMCall("ask", prompts_dir=prompts).stream(question="q")
    response.close()
    del response
    assert rows(db) == [] and wired.requests == []


def test_a_cached_stream_is_logged_as_cached(wired, prompts, db):
    tinyllm.configure(cache_api_calls=True)
    call = LLMCall("ask", prompts_dir=prompts)
    wired.enqueue(Stream(Reply("stored once")))
    assert "".join(call.stream(question="q")) == "stored once"
    assert "".join(call.stream(question="q")) == "stored once"
    second, first = rows(db)
    assert (first["cached"], second["cached"]) == (False, True) and second["response"] == "stored once"


def test_nothing_is_logged_with_log_calls_off(server, monkeypatch, prompts, db):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini", log_calls=False, log_db=db)
    response = LLMCall("ask", prompts_dir=prompts).stream(question="q")
    assert response._observer is None  # nothing watches it
    assert "".join(response) == "echo: q"
    assert rows(db) == []


# -- async ------------------------------------------------------------------------------


def test_async_streams_complete_failed_and_dropped_are_logged(wired, prompts, db):
    call = LLMCall("ask", prompts_dir=prompts)

    async def main():
        wired.enqueue(Stream(Reply("all of it")))
        complete = await call.astream(question="a")
        text = "".join([d async for d in complete])
        wired.enqueue(Stream(Reply("one two three four five six"), drop_after=3))
        failed = await call.astream(question="b")
        with pytest.raises(tinyllm.APIConnectionError):
            async for _ in failed:
                pass
        wired.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
        dropped = await call.astream(question="c")
        async for _ in dropped:
            break
        del dropped
        freed = in_flight()
        await asyncio.sleep(0.05)
        return text, freed

    gc.disable()
    try:
        text, freed = asyncio.run(main())
    finally:
        gc.enable()
    assert text == "all of it" and freed == 0
    dropped, failed, complete = rows(db)
    assert complete["error"] is None and complete["response"] == "all of it" and complete["ttft"] is not None
    assert complete["completion_tokens"] > 0 and complete["variables"] == {"question": "a"}
    assert failed["error"]["type"] == "APIConnectionError" and failed["response"].startswith("one ")
    assert dropped["error"]["type"] == "StreamAbandoned" and dropped["response"] == "one "


def test_an_async_stream_cancelled_or_closed_is_logged_as_closed(wired, prompts, db):
    call = LLMCall("ask", prompts_dir=prompts)

    async def main():
        wired.enqueue(Stream(Reply("one two three four five six"), delay=0.05))
        response = await call.astream(question="q")

        async def read():
            async for _ in response:
                pass

        task = asyncio.create_task(read())
        while response.time_to_first_token is None:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await response.aclose()
        wired.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
        closed = await call.astream(question="r")
        async for _ in closed:
            break
        await closed.aclose()

    asyncio.run(main())
    closed, cancelled = rows(db)
    assert cancelled["error"]["type"] == "StreamClosed" and "cancelled" in cancelled["error"]["message"]
    assert closed["error"]["type"] == "StreamClosed" and closed["response"] == "one "


# -- chat and tool rounds ---------------------------------------------------------------


def test_a_chat_stream_is_logged_with_the_whole_conversation(wired, db):
    chat = LLMChat(system="be brief")
    assert "".join(chat.stream("hi")) == "echo: hi"
    assert "".join(chat.stream("again")) == "echo: again"
    second, first = rows(db)
    assert first["response"] == "echo: hi" and first["error"] is None
    assert [m["content"] for m in second["messages"]] == ["be brief", "hi", "echo: hi", "again"]


def test_a_tool_round_stream_is_one_row_with_its_tool_rounds(wired, prompts, db):
    wired.enqueue(Stream(Message({"content": None, "tool_calls": [CALL]})), Stream(Reply("It is sunny in Paris.")))
    response = LLMCall("ask", prompts_dir=prompts, tools=[get_weather]).stream(question="weather?")
    assert "".join(response) == "It is sunny in Paris."
    (row,) = rows(db)
    assert row["error"] is None and row["response"] == "It is sunny in Paris."
    assert row["usage"] == response.usage and row["completion_tokens"] == response.usage["completion_tokens"]
    (round_,) = row["tool_rounds"]
    (call,) = round_["calls"]
    assert call["name"] == "get_weather" and call["arguments"] == {"city": "Paris"}
    assert call["content"] == "sunny in Paris" and call["error"] is None and call["duration"] >= 0
    assert round_["index"] == 0 and round_["duration"] >= 0


def test_a_tool_round_stream_dropped_in_its_second_reply_keeps_the_round(wired, prompts, db):
    wired.enqueue(
        Stream(Message({"content": None, "tool_calls": [CALL]})),
        Stream(Reply("it is sunny in Paris today"), delay=0.02),
    )
    response = LLMCall("ask", prompts_dir=prompts, tools=[get_weather]).stream(question="weather?")
    gc.disable()
    try:
        next(iter(response))
        del response
        assert in_flight() == 0
    finally:
        gc.enable()
    (row,) = rows(db)
    assert row["error"]["type"] == "StreamAbandoned" and row["response"] == "it "
    assert row["tool_rounds"][0]["calls"][0]["name"] == "get_weather"


def test_a_failed_tool_call_is_in_the_row_of_a_plain_call(wired, prompts, db):
    def broken(city: str) -> str:
        """Always fails."""
        raise RuntimeError("no forecast for " + city)

    wired.enqueue(
        Message(
            {"content": None, "tool_calls": [dict(CALL, function={"name": "broken", "arguments": '{"city": "Oslo"}'})]}
        ),
        Reply("I could not get it."),
    )
    LLMCall("ask", prompts_dir=prompts, tools=[broken]).call(question="weather?")
    (row,) = rows(db)
    (call,) = row["tool_rounds"][0]["calls"]
    assert (
        call["name"] == "broken" and call["arguments"] == {"city": "Oslo"} and "no forecast for Oslo" in call["error"]
    )
    result = CliRunner().invoke(cli, ["logs", "--db", str(db), "show", row["id"]])
    assert result.exit_code == 0, result.output
    assert (
        "--- tool round 1 (" in result.output and "broken" in result.output and "no forecast for Oslo" in result.output
    )


def test_logs_show_prints_the_partial_text_of_a_failed_stream(wired, prompts, db):
    wired.enqueue(Stream(Reply("one two three four five six"), drop_after=4))
    with pytest.raises(tinyllm.APIConnectionError):
        list(LLMCall("ask", prompts_dir=prompts).stream(question="q"))
    rows(db)
    result = CliRunner().invoke(cli, ["logs", "--db", str(db), "show", "last"])
    assert result.exit_code == 0, result.output
    assert "--- partial reply" in result.output and "one two" in result.output


# -- the schema migration ----------------------------------------------------------------

# The first schema, as tinyllm wrote it before the tool_rounds column (user_version 1).
OLD_SCHEMA = """
CREATE TABLE calls (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, ts REAL NOT NULL,
    template TEXT, template_path TEXT, template_hash TEXT,
    variables TEXT, messages TEXT, response TEXT, reply TEXT,
    model_requested TEXT, model TEXT, api_type TEXT, endpoint TEXT, params TEXT,
    prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, usage TEXT,
    cost REAL, latency REAL, ttft REAL, cached INTEGER, retries INTEGER, output_retries INTEGER,
    finish_reason TEXT, error_type TEXT, error_message TEXT, batch_id TEXT, pid INTEGER
);
CREATE INDEX calls_ts ON calls(ts);
CREATE VIRTUAL TABLE calls_fts USING fts5(template, variables, messages, response, error_message, content='calls', content_rowid='seq');
CREATE TRIGGER calls_fts_insert AFTER INSERT ON calls BEGIN
    INSERT INTO calls_fts(rowid, template, variables, messages, response, error_message)
    VALUES (new.seq, new.template, new.variables, new.messages, new.response, new.error_message);
END;
INSERT INTO calls (id, ts, template, messages, response, reply, model, retries, output_retries) VALUES
    ('0000000000010000000000', 1.0, 'old.system.md', '[]', 'an old reply', '{"content": "an old reply"}', 'gpt-4o-mini', 0, 0);
PRAGMA user_version = 1;
"""


def test_a_log_of_the_old_schema_is_read_as_is_then_migrated_on_the_first_write(wired, prompts, db):
    db.parent.mkdir(parents=True)
    old = sqlite3.connect(db)
    old.executescript(OLD_SCHEMA)
    old.close()
    (before,) = rows(db)  # read without being written: no tool_rounds column yet
    assert before["response"] == "an old reply" and before["tool_rounds"] is None
    result = CliRunner().invoke(cli, ["logs", "--db", str(db), "show", before["id"]])
    assert result.exit_code == 0 and "an old reply" in result.output

    wired.enqueue(Message({"content": None, "tool_calls": [CALL]}), Reply("Sunny."))
    LLMCall("ask", prompts_dir=prompts, tools=[get_weather]).call(question="weather?")
    new, old_row = rows(db)
    assert old_row["response"] == "an old reply" and old_row["tool_rounds"] is None
    assert new["tool_rounds"][0]["calls"][0]["content"] == "sunny in Paris"
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == calllog.SCHEMA_VERSION == 2
        assert "tool_rounds" in [r[1] for r in conn.execute("PRAGMA table_info(calls)")]
        conn.execute("PRAGMA user_version = 1")  # as an older tinyllm writing to the file would leave it
        conn.commit()
    finally:
        conn.close()
    LLMCall("ask", prompts_dir=prompts).call(question="once more")  # the column is there: no second ALTER
    assert len(rows(db)) == 3
    conn = calllog.connect(str(db))
    try:
        assert [r["template"] for r in calllog.query(conn, text="old")] == [
            "old.system.md"
        ]  # full-text search still works
    finally:
        conn.close()


def test_tinyllm_call_stream_is_logged(wired, prompts, db):
    wired.enqueue(Stream(Reply("streamed from the command")))
    result = CliRunner().invoke(cli, ["call", "ask", "--prompts-dir", str(prompts), "--var", "question=q", "--stream"])
    assert result.exit_code == 0, result.output
    assert "streamed from the command" in result.output
    (row,) = rows(db)
    assert row["response"] == "streamed from the command" and row["ttft"] is not None and row["error"] is None


def test_a_key_a_tool_returns_is_masked_in_the_tool_rounds_column(wired, prompts, db):
    def leaky(city: str) -> str:
        """Returns the key (a tool that should not)."""
        return f"{city}: {KEY}"

    leak = dict(CALL, function={"name": "leaky", "arguments": '{"city": "Paris"}'})
    wired.enqueue(Stream(Message({"content": None, "tool_calls": [leak]})), Stream(Reply("done")))
    assert "".join(LLMCall("ask", prompts_dir=prompts, tools=[leaky]).stream(question="q")) == "done"
    (row,) = rows(db)
    assert row["tool_rounds"][0]["calls"][0]["content"] == "Paris: ****6789"  # masked as in every column
    assert KEY not in row["tool_rounds"][0]["calls"][0]["content"]
    assert KEY not in b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*")).decode("latin-1")
