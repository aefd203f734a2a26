"""tinyllm.Response: one call's complete record, from LLMCall.respond / LLMChat.respond."""

from __future__ import annotations

import asyncio
import threading

import pytest
from helpers import question_prompts, wire
from fakeserver import Reply, Status

from tinyllm import LLMCall, LLMChat, Response
from tinyllm.cache._store import MemoryCache
from tinyllm.clients.openai import OpenAIClient

KEY = "sk-response-test-0000000001"


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(
        tmp_path,
        ask="You answer briefly.\n",
        num="---\noutput_type: int\noutput_retries: 1\n---\nAnswer with a number.\n",
    )


@pytest.fixture
def wired(server, monkeypatch):
    return wire(server, monkeypatch, KEY)


def test_respond_returns_the_whole_record(wired, prompts, sleeps):
    wired.enqueue(Status(503), Reply("forty-two"), Reply("42"))
    response = LLMCall("num.system.md", prompts_dir=prompts).respond(question="6 x 7?")
    assert isinstance(response, Response)
    assert response.value == 42 and response.text == "42" and response.message["role"] == "assistant"
    assert response.messages == [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "6 x 7?"},
    ]
    assert response.retries == 1 and response.output_retries == 1
    sent = wired.chat_requests()
    assert len(sent) == 3
    assert response.usage["total_tokens"] > 0 and response.usage["prompt_tokens"] > 0  # summed over both replies
    assert response.model == "gpt-4o-mini" and response.api_type == "openai" and response.cached is False
    assert response.latency > 0 and response.time_to_first_token is None
    assert response.template == "num.system.md" and response.variables == {"question": "6 x 7?"}
    record = response.as_dict()
    assert record["value"] == 42 and record["usage"] == response.usage and KEY not in repr(record)


def test_a_cache_hit_is_marked(server, prompts):
    mine = OpenAIClient(base_url=server.base_url, api_key=KEY, cache=MemoryCache())
    call = LLMCall("ask.system.md", prompts_dir=prompts, client=mine)
    first, second = call.respond(question="hi"), call.respond(question="hi")
    assert (first.cached, second.cached) == (False, True)
    assert second.text == first.text and second.usage == first.usage
    assert len(server.chat_requests()) == 1


def test_arespond_and_chat_respond(wired, prompts):
    wired.reply_with(lambda body: "echo " + body["messages"][-1]["content"])
    response = asyncio.run(LLMCall("ask.system.md", prompts_dir=prompts).arespond(question="async"))
    assert response.text == "echo async"
    chat = LLMChat(system="be brief")
    turn = chat.respond("one")
    assert turn.text == "echo one" and turn.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
    ]
    assert chat.history[-1]["content"] == "echo one"
    assert asyncio.run(chat.arespond("two")).messages[-1] == {"role": "user", "content": "two"}


def test_map_never_mixes_rows_in_the_shared_attributes(wired, prompts):
    wired.latency = 0.01
    wired.reply_with(lambda body: "echo " + body["messages"][-1]["content"])
    call = LLMCall("ask.system.md", prompts_dir=prompts)
    seen = []
    lock = threading.Lock()
    original = call.respond

    def checked(**variables):
        response = original(**variables)
        with lock:  # in this thread the pair is one call's: its messages with its own reply
            seen.append((call.messages[-1]["content"], call.model_output["content"]))
        return response

    call.respond = checked  # type: ignore[method-assign]
    results = call.map([{"question": f"q{i}"} for i in range(40)], max_workers=8, progress=False)
    assert results == [f"echo q{i}" for i in range(40)]
    assert all(reply == "echo " + asked for asked, reply in seen) and len(seen) == 40
