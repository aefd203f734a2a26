"""Fallbacks between clients: two loopback OpenAI-compatible servers, the first one failing."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
from fakeserver import FakeOpenAIServer, Message, Reply, Status, Stream
from helpers import question_prompts

import tinyllm
from tinyllm import FallbackChain, LLMCall, LLMChat, OpenAIClient


@pytest.fixture
def backup():
    with FakeOpenAIServer() as srv:
        yield srv


def _client(srv, model="gpt-4o-mini", **kw):
    return OpenAIClient(
        base_url=srv.base_url, api_key="sk-test-fallbacks", model=model, max_attempts=1, cache=False, **kw
    )


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(tmp_path, ask="Answer briefly.")


def test_a_rate_limit_moves_the_call_to_the_fallback(server, backup, prompts):
    primary, second = _client(server), _client(backup, model="gpt-4o")
    server.enqueue(Status(429))
    backup.reply_with("from the backup")
    response = LLMCall("ask.system.md", prompts_dir=prompts, client=primary, fallbacks=[second]).respond(question="hi")
    assert response.value == "from the backup"
    assert response.client is second and response.model == "gpt-4o" and response.api_type == "openai"
    assert len(server.chat_requests()) == 1 and len(backup.chat_requests()) == 1
    assert backup.chat_requests()[0].model == "gpt-4o"  # the fallback's own model, not the primary's
    [attempt] = response.attempts
    assert (
        attempt.client is primary
        and isinstance(attempt.error, tinyllm.RateLimitError)
        and attempt.model == "gpt-4o-mini"
    )
    assert response.as_dict()["attempts"][0]["error"]["type"] == "RateLimitError"


@pytest.mark.parametrize("status, error", [(400, tinyllm.BadRequestError), (401, tinyllm.AuthenticationError)])
def test_errors_that_would_fail_anywhere_do_not_fall_through(server, backup, prompts, status, error):
    server.enqueue(Status(status))
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=_client(server), fallbacks=[_client(backup)])
    with pytest.raises(error) as caught:
        call.call(question="hi")
    assert backup.chat_requests() == [] and len(caught.value.attempts) == 1


def test_a_budget_stop_does_not_fall_through(server, backup, prompts):
    call = LLMCall(
        "ask.system.md", prompts_dir=prompts, client=_client(server), fallbacks=[_client(backup)], max_tokens=100
    )
    with tinyllm.limits.Budget(0.0000001).activate(), pytest.raises(tinyllm.BudgetExceededError):
        call.call(question="hi")
    assert server.chat_requests() == [] and backup.chat_requests() == []


def test_every_client_failing_raises_the_last_error_with_every_attempt(server, backup, prompts):
    server.enqueue(Status(503))
    backup.enqueue(Status(429))
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=_client(server), fallbacks=[_client(backup)])
    with pytest.raises(tinyllm.RateLimitError) as caught:
        call.call(question="hi")
    assert [type(a.error).__name__ for a in caught.value.attempts] == ["ServerError", "RateLimitError"]


def test_a_context_window_error_moves_on_and_a_model_name_is_the_same_client(server, prompts):
    server.enqueue(
        Status(
            400,
            body={"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}},
        )
    )
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=_client(server), fallbacks=["gpt-4o"])
    response = call.respond(question="hi")
    assert [r.model for r in server.chat_requests()] == ["gpt-4o-mini", "gpt-4o"]
    assert response.model == "gpt-4o" and isinstance(response.attempts[0].error, tinyllm.ContextWindowExceededError)


def test_a_failing_client_cools_down_and_is_skipped(server, backup, prompts):
    chain = FallbackChain(_client(server), _client(backup), allowed_fails=0, cooldown=60)
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=chain)
    server.enqueue(Status(500))
    assert call.respond(question="one").client is chain.clients[1]
    assert chain.cooling_down() == [chain.clients[0]]
    second = call.respond(question="two")
    assert len(server.chat_requests()) == 1 and len(backup.chat_requests()) == 2  # the primary was not asked again
    assert second.attempts[0].skipped and second.attempts[0].error is None
    chain.reset()
    assert call.respond(question="three").client is chain.clients[0]


def test_allowed_fails_counts_failures_before_a_cooldown(server, backup, prompts):
    chain = FallbackChain(_client(server), _client(backup), allowed_fails=1, cooldown=60)
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=chain)
    server.enqueue(Status(500))
    call.call(question="one")
    assert chain.cooling_down() == []  # one failure is allowed
    server.enqueue(Status(500))
    call.call(question="two")
    assert chain.cooling_down() == [chain.clients[0]]


def test_the_call_log_records_every_attempt(server, backup, prompts, tmp_path):
    tinyllm.configure(log_calls=True, log_db=str(tmp_path / "calls.db"))
    server.enqueue(Status(429))
    LLMCall(
        "ask.system.md", prompts_dir=prompts, client=_client(server), fallbacks=[_client(backup, model="gpt-4o")]
    ).call(question="logged?")
    from tinyllm.observe._calllog import flush_all

    assert flush_all(10)
    rows = (
        sqlite3.connect(tmp_path / "calls.db")
        .execute("SELECT model, error_type, endpoint, template, params FROM calls ORDER BY seq")
        .fetchall()
    )
    assert [(r[0], r[1]) for r in rows] == [("gpt-4o-mini", "RateLimitError"), ("gpt-4o", None)]
    assert server.base_url.rstrip("/") in rows[0][2] and backup.base_url.rstrip("/") in rows[1][2]
    assert rows[0][3] == rows[1][3] == "ask.system.md" and json.loads(rows[1][4])["model"] == "gpt-4o"
    assert all("sk-test-fallbacks" not in str(r) for r in rows)


def test_streaming_falls_back_before_the_first_delta(server, backup, prompts):
    server.enqueue(Status(503))
    backup.enqueue(Stream(Reply("streamed from the backup")))
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=_client(server), fallbacks=[_client(backup)])
    response = call.stream(question="hi")
    assert "".join(response) == "streamed from the backup"
    assert response.client is call.fallbacks.sender(call.client).clients[1] and len(response.attempts) == 1


def test_a_stream_cut_after_its_first_delta_is_not_sent_again(server, backup, prompts):
    server.enqueue(Stream(Reply("one two three four"), drop_after=2))
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=_client(server), fallbacks=[_client(backup)])
    response = call.stream(question="hi")
    with pytest.raises(tinyllm.APIConnectionError) as caught:
        list(response)
    assert caught.value.partial and backup.chat_requests() == []


def test_async_calls_and_chats_fall_back(server, backup, prompts):
    server.enqueue(Status(502), Status(502))
    backup.reply_with("async backup")
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=_client(server), fallbacks=[_client(backup)])
    assert asyncio.run(call.acall(question="hi")) == "async backup"
    chat = LLMChat(system="Be brief.", client=_client(server), fallbacks=[_client(backup)])
    assert chat.say("hello") == "async backup" and chat.history[-1]["content"] == "async backup"


def test_the_tool_loop_keeps_its_rounds_when_a_request_moves_on(server, backup, prompts):
    runs = []

    def lookup(city: str) -> str:
        """Look a city up."""
        runs.append(city)
        return "18 C"

    server.enqueue(
        Message(
            {
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}
                ],
            }
        ),
        Status(500),
    )
    backup.reply_with("It is 18 C.")
    response = LLMCall(
        "ask.system.md", prompts_dir=prompts, client=_client(server), fallbacks=[_client(backup)], tools=[lookup]
    ).respond(question="weather?")
    assert response.value == "It is 18 C." and runs == ["Paris"]  # the tool ran once
    assert backup.chat_requests()[0].messages[-1] == {"role": "tool", "tool_call_id": "c1", "content": "18 C"}


def test_map_falls_back_row_by_row_and_the_cooldown_spares_the_primary(server, backup, prompts):
    for _ in range(20):
        server.enqueue(Status(429))
    backup.reply_with(lambda body: "ok")
    chain = FallbackChain(_client(server), _client(backup), allowed_fails=0, cooldown=60)
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=chain)
    results = call.map([{"question": str(i)} for i in range(12)], max_workers=2, progress=False)
    assert results == ["ok"] * 12 and len(server.chat_requests()) <= 2


def test_bad_fallbacks_are_refused_at_construction(prompts):
    with pytest.raises(tinyllm.ConfigError):
        LLMCall("ask.system.md", prompts_dir=prompts, fallbacks=[object()])
    with pytest.raises(tinyllm.ConfigError):
        LLMCall("ask.system.md", prompts_dir=prompts, fallbacks=[""])


def test_the_chain_plans_for_what_every_client_can_do(server):
    class NoTools:
        capabilities = tinyllm.Capabilities(json_schema=True, tools=False)

        def send_message(self, messages, **params):
            return {"role": "assistant", "content": "x"}

    chain = FallbackChain(_client(server), NoTools())
    assert chain.capabilities.tools is False and chain.capabilities.json_schema is True


def test_the_command_line_takes_fallbacks(server, backup, prompts, monkeypatch):
    from click.testing import CliRunner

    from tinyllm.cli import cli

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fallbacks")
    tinyllm.configure(base_url=server.base_url, model="gpt-4o-mini", max_attempts=1)
    tinyllm.register_client("backup", _client(backup, model="gpt-4o"))
    server.enqueue(Status(429))
    backup.reply_with("cli backup")
    result = CliRunner().invoke(
        cli,
        [
            "call",
            "ask",
            "--prompts-dir",
            str(prompts),
            "--var",
            "question=hi",
            "--fallback",
            "backup",
            "--json",
            "--no-log",
            "--api-type",
            "openai",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert (
        record["content"] == "cli backup"
        and record["model"] == "gpt-4o"
        and record["attempts"][0]["api_type"] == "openai"
    )
