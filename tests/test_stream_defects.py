"""Streaming defects found under attack (issue 20): a reply whose content is null throughout keeps
``content: None`` when streamed, and an abandoned stream (sync or async, dropped without closing)
gives its request slot back at once, without waiting for the cycle collector."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest
from fakeserver import Message, Reply, Stream
from helpers import question_prompts

from tinyllm import LLMCall, LLMChat
from tinyllm.clients.openai import OpenAIClient

KEY = "sk-stream-defects-0000000001"
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.fixture
def mine(server):
    return OpenAIClient(
        base_url=server.base_url,
        api_key=KEY,
        waiting_time=0.001,
        cache=False,
        max_concurrent_requests=1,
        queue_timeout=0.5,
    )


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(tmp_path, ask="You answer briefly.\n")


@pytest.mark.parametrize(
    "message",
    [
        {"content": None, "refusal": "I can't help with that request, sorry."},
        {"content": None, "tool_calls": [CALL]},
    ],
    ids=["refusal", "tool-calls-only"],
)
def test_null_content_stays_none_when_streamed(server, mine, message):
    server.enqueue(Message(dict(message)))
    plain = mine.request([{"role": "user", "content": "q"}])
    server.enqueue(Stream(Message(dict(message))))
    stream = mine.stream_request([{"role": "user", "content": "q"}])
    assert list(stream) == []
    assert plain.message["content"] is None
    assert stream.reply.message["content"] is None
    assert stream.reply.message.get("refusal") == message.get("refusal")


def test_a_streamed_empty_text_stays_a_string(server, mine):
    server.enqueue(Stream(Reply("")))
    stream = mine.stream_request([{"role": "user", "content": "q"}])
    assert list(stream) == [] and stream.reply.message["content"] == ""


# -- abandoned streams -----------------------------------------------------------------
# gc is disabled in these tests: the slot must come back through reference counting alone.


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_a_dropped_sync_stream_frees_its_slot_at_once(server, mine, prompts, no_gc):
    server.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
    response = LLMCall("ask", prompts_dir=prompts, client=mine).stream(question="q")
    for _ in response:
        break
    assert mine.queue.in_flight == 1
    del response
    assert mine.queue.in_flight == 0
    assert LLMCall("ask", prompts_dir=prompts, client=mine).call(question="next") == "echo: next"


def test_a_dropped_client_stream_frees_its_slot_at_once(server, mine, no_gc):
    server.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
    stream = mine.stream_request([{"role": "user", "content": "q"}])
    next(iter(stream))
    assert mine.queue.in_flight == 1
    del stream
    assert mine.queue.in_flight == 0


def test_a_dropped_chat_stream_frees_its_slot_at_once(server, mine, no_gc):
    server.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
    chat = LLMChat(system="be brief", client=mine)
    response = chat.stream("hi")
    next(iter(response))
    assert mine.queue.in_flight == 1
    del response
    assert mine.queue.in_flight == 0 and chat.history == []


def test_a_dropped_stream_with_tools_frees_its_slot_at_once(server, mine, prompts, no_gc):
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    server.enqueue(
        Stream(Message({"content": None, "tool_calls": [CALL]})),
        Stream(Reply("it is sunny in Paris today"), delay=0.02),
    )
    response = LLMCall("ask", prompts_dir=prompts, client=mine, tools=[get_weather]).stream(question="q")
    next(iter(response))
    assert mine.queue.in_flight == 1
    del response
    assert mine.queue.in_flight == 0


def test_a_dropped_async_stream_frees_its_slot_at_once(server, mine, prompts, no_gc, recwarn):
    call = LLMCall("ask", prompts_dir=prompts, client=mine)
    errors: list = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        server.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
        response = await call.astream(question="q")
        async for _ in response:
            break
        held = mine.queue.in_flight
        del response
        freed = mine.queue.in_flight
        # the next call does not wait for the abandoned one (QUEUE_TIMEOUT is 0.5 s)
        answer = await call.acall(question="next")
        await asyncio.sleep(0.05)  # the connection's closing, scheduled by the loop, has run
        return held, freed, answer

    held, freed, answer = asyncio.run(main())
    assert (held, freed) == (1, 0)
    assert answer == "echo: next"
    assert errors == [] and mine.queue.in_flight == 0


def test_a_dropped_async_stream_with_tools_frees_its_slot_at_once(server, mine, prompts, no_gc):
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    call = LLMCall("ask", prompts_dir=prompts, client=mine, tools=[get_weather])
    errors: list = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        server.enqueue(
            Stream(Message({"content": None, "tool_calls": [CALL]})),
            Stream(Reply("it is sunny in Paris today"), delay=0.02),
        )
        response = await call.astream(question="q")
        async for _ in response:
            break
        del response
        freed = mine.queue.in_flight
        await asyncio.sleep(0.05)
        return freed

    assert asyncio.run(main()) == 0 and errors == []


def test_a_dropped_async_client_stream_frees_its_slot_at_once(server, mine, no_gc):
    errors: list = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        for _ in range(3):  # as a web handler whose clients disconnect, again and again
            server.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
            stream = mine.astream_request([{"role": "user", "content": "q"}])
            async for _ in stream:
                break
            del stream
            assert mine.queue.in_flight == 0
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert errors == []


def test_closing_explicitly_still_works_and_a_complete_stream_is_cached(server, prompts):
    client = OpenAIClient(
        base_url=server.base_url, api_key=KEY, waiting_time=0.001, cache=True, max_concurrent_requests=1
    )
    call = LLMCall("ask", prompts_dir=prompts, client=client)
    server.enqueue(Stream(Reply("stored once")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "".join(call.stream(question="q")) == "stored once"
    assert client.queue.in_flight == 0
    second = call.stream(question="q")
    assert list(second) == ["stored once"] and second.cached is True


# -- the same through a FallbackChain (fallbacks=[...]): its stream wraps the client's ---------------------------


def _weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


@pytest.mark.parametrize("with_tools", [False, True])
def test_a_dropped_fallback_stream_frees_its_slot_at_once(server, mine, prompts, no_gc, with_tools):
    backup = OpenAIClient(base_url=server.base_url, api_key="sk-backup-0000", model="backup")
    if with_tools:
        server.enqueue(Stream(Message({"content": None, "tool_calls": [CALL]})))
    server.enqueue(Stream(Reply("one two three four five six"), delay=0.02))
    tools = [_weather] if with_tools else None
    response = LLMCall("ask", prompts_dir=prompts, client=mine, fallbacks=[backup], tools=tools).stream(question="q")
    next(iter(response))
    assert mine.queue.in_flight == 1
    del response
    assert mine.queue.in_flight == 0  # at once: the chain's stream keeps no cycle alive
    assert backup.queue.in_flight == 0


def test_a_dropped_async_fallback_stream_frees_its_slot_at_once(server, mine, prompts, no_gc):
    backup = OpenAIClient(base_url=server.base_url, api_key="sk-backup-0000", model="backup")
    call = LLMCall("ask", prompts_dir=prompts, client=mine, fallbacks=[backup], tools=[_weather])
    errors: list = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        server.enqueue(
            Stream(Message({"content": None, "tool_calls": [CALL]})),
            Stream(Reply("it is sunny in Paris today"), delay=0.02),
        )
        response = await call.astream(question="q")
        async for _ in response:
            break
        held = mine.queue.in_flight
        del response
        freed = mine.queue.in_flight
        await asyncio.sleep(0.05)
        return held, freed

    assert asyncio.run(main()) == (1, 0) and errors == []
