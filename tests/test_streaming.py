"""Streaming: text deltas as they arrive, from the loopback server's server-sent events and the
embedded model; retries before the first chunk, typed errors with .partial after it, closing
early, the cache, the queue, partial JSON, LLMChat, and the `tinyllm call` / `tinyllm chat` commands."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import question_prompts
from fakeserver import Message, Reply, Status, Stream

import tinyllm
from tinyllm import APIConnectionError, LLMCall, LLMChat, Response
from tinyllm.cache._store import MemoryCache
from tinyllm.clients.openai import OpenAIClient

KEY = "sk-stream-test-000000000001"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(
        tmp_path,
        ask="You answer briefly.\n",
        facts="---\noutput_type: json\n---\nAnswer in JSON.\n",
    )


@pytest.fixture
def mine(server):
    return OpenAIClient(base_url=server.base_url, api_key=KEY, waiting_time=0.001)


def test_deltas_add_up_to_the_reply_with_server_usage(server, mine, prompts):
    server.enqueue(Stream(Reply("the quick brown fox jumps"), delay=0.01))
    response = LLMCall("ask", prompts_dir=prompts, client=mine).stream(question="q")
    assert isinstance(response, Response) and not response.done
    deltas = list(response)
    assert len(deltas) == 5 and "".join(deltas) == "the quick brown fox jumps"
    assert response.done and response.value == response.text == "the quick brown fox jumps"
    assert response.finish_reason == "stop" and response.usage_counted_locally is False
    assert response.usage["completion_tokens"] > 0 and response.usage["prompt_tokens"] > 0
    assert 0 < response.time_to_first_token <= response.latency
    body = server.chat_requests()[0].json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_async_stream(server, mine, prompts):
    server.enqueue(Stream(Reply("one two three")))

    async def main():
        response = await LLMCall("ask", prompts_dir=prompts, client=mine).astream(question="q")
        return [d async for d in response], response

    deltas, response = asyncio.run(main())
    assert "".join(deltas) == "one two three" and response.value == "one two three"


def test_a_server_without_usage_is_counted_locally(server, mine, prompts):
    server.enqueue(Stream(Reply("four words right here"), usage=False))
    response = LLMCall("ask", prompts_dir=prompts, client=mine).stream(question="q")
    list(response)
    assert response.usage_counted_locally is True
    assert response.usage["completion_tokens"] == 4 and response.usage["prompt_tokens"] > 0


def test_retries_apply_until_the_first_chunk(server, mine, prompts, sleeps):
    server.enqueue(Status(503), Status(429, headers={"Retry-After": "0"}), Stream(Reply("finally")))
    response = LLMCall("ask", prompts_dir=prompts, client=mine).stream(question="q")
    assert "".join(response) == "finally" and response.retries == 2
    assert [r.headers.get("x-stainless-retry-count") for r in server.chat_requests()] == ["0", "1", "2"]


def test_a_connection_dropped_mid_stream_raises_with_the_partial_text(server, prompts):
    cached = OpenAIClient(base_url=server.base_url, api_key=KEY, cache=MemoryCache(), waiting_time=0.001)
    server.enqueue(Stream(Reply("alpha beta gamma delta"), drop_after=3))  # role chunk + 2 pieces
    response = LLMCall("ask", prompts_dir=prompts, client=cached).stream(question="q")
    seen = []
    with pytest.raises(APIConnectionError) as info:
        for delta in response:
            seen.append(delta)
    assert info.value.partial == "".join(seen) == "alpha beta "
    assert len(server.chat_requests()) == 1  # not retried after the first chunk: text was already shown
    assert not response.done and len(cached._cache) == 0  # an interrupted stream is never cached


def test_finish_reason_length_is_visible(server, mine, prompts):
    server.enqueue(Stream(Reply("cut sh", finish_reason="length")))
    response = LLMCall("ask", prompts_dir=prompts, client=mine).stream(question="q")
    list(response)
    assert response.finish_reason == "length" and response.text == "cut sh"


def test_closing_early_closes_the_connection_and_frees_the_slot(server, prompts):
    one = OpenAIClient(base_url=server.base_url, api_key=KEY, max_concurrent_requests=1, queue_timeout=5)
    server.enqueue(Stream(Reply(" ".join(f"w{i}" for i in range(200))), delay=0.05))
    call = LLMCall("ask", prompts_dir=prompts, client=one)
    with call.stream(question="long") as response:
        for delta in response:
            assert delta == "w0 "
            break
    assert one.queue.in_flight == 0  # the slot is back at once
    assert call.call(question="next") == "echo: next"  # and another request gets it
    deadline = time.monotonic() + 5
    while server.streams_cut == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.streams_cut == 1  # the server saw the client hang up
    assert not response.done


def test_async_close_frees_the_slot(server, prompts):
    one = OpenAIClient(base_url=server.base_url, api_key=KEY, max_concurrent_requests=1, queue_timeout=5)
    server.enqueue(Stream(Reply(" ".join(f"w{i}" for i in range(200))), delay=0.05))
    call = LLMCall("ask", prompts_dir=prompts, client=one)

    async def main():
        response = await call.astream(question="long")
        async for _ in response:
            break
        await response.aclose()
        assert one.queue.in_flight == 0
        return await call.acall(question="next")

    assert asyncio.run(main()) == "echo: next"


def test_a_complete_stream_is_cached_and_a_hit_streams_the_stored_text(server, prompts):
    cached = OpenAIClient(base_url=server.base_url, api_key=KEY, cache=MemoryCache())
    call = LLMCall("ask", prompts_dir=prompts, client=cached)
    server.enqueue(Stream(Reply("stored once")))
    first = call.stream(question="q")
    assert "".join(first) == "stored once" and first.cached is False
    second = call.stream(question="q")
    assert list(second) == ["stored once"] and second.cached is True
    assert call.respond(question="q").cached is True  # a streamed and a plain request share the entry
    assert len(server.chat_requests()) == 1


def test_tool_call_deltas_are_assembled(server, mine):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    server.enqueue(Stream(Message({"content": None, "tool_calls": [call]})))
    stream = mine.stream_request([{"role": "user", "content": "weather?"}])
    assert list(stream) == []
    assert stream.reply.message["tool_calls"] == [call] and stream.reply.finish_reason == "tool_calls"


def test_partial_json_grows_as_the_reply_streams(server, mine, prompts):
    server.enqueue(Stream(Reply('{"facts": ["one", "two", "three"], "n": 3}'), pieces=8))
    response = LLMCall("facts", prompts_dir=prompts, client=mine).stream(question="q")
    seen = []
    for _ in response:
        seen.append(response.partial)
    assert seen[-1] == {"facts": ["one", "two", "three"], "n": 3} == response.value
    grown = [p for p in seen if p]
    assert any(len(p.get("facts", [])) < 3 for p in grown)  # a partial value was seen before the end


def test_chat_stream_joins_the_history_only_when_complete(server, mine):
    chat = LLMChat(system="be brief", client=mine)
    server.enqueue(Stream(Reply("first answer")))
    assert "".join(chat.stream("one")) == "first answer"
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant"]
    server.enqueue(Stream(Reply("never finished at all"), drop_after=2))
    with pytest.raises(APIConnectionError):
        list(chat.stream("two"))
    assert len(chat.history) == 3  # the failed turn left no trace
    response = chat.stream("three")
    for _ in response:
        break
    response.close()
    assert len(chat.history) == 3


def test_a_client_that_cannot_stream_answers_in_one_piece(prompts):
    class Plain:
        def send_message(self, messages, **params):
            return {"role": "assistant", "content": "all at once"}

    response = LLMCall("ask", prompts_dir=prompts, client=Plain()).stream(question="q")
    assert list(response) == ["all at once"] and response.value == "all at once"


# -- the command -------------------------------------------------------------------


def _env(server):
    return {
        **os.environ,
        "OPENAI_API_KEY": KEY,
        "TINYLLM_BASE_URL": server.base_url,
        "TINYLLM_API_TYPE": "openai",
        "PYTHONPATH": ROOT,
    }


@pytest.mark.slow
def test_call_streams_with_stream_and_prints_the_record_with_json(server, prompts):
    server.reply_with("streamed to the shell")
    cmd = [sys.executable, "-m", "tinyllm", "--prompts-dir", str(prompts), "call", "ask", "--var", "question=q"]
    out = subprocess.run([*cmd, "--stream"], capture_output=True, text=True, env=_env(server), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "streamed to the shell\n" and server.chat_requests()[-1].json["stream"] is True
    out = subprocess.run([*cmd, "--stream", "--json"], capture_output=True, text=True, env=_env(server), timeout=60)
    record = json.loads(out.stdout.splitlines()[-1][len("streamed to the shell") :])
    assert record["content"] == "streamed to the shell" and record["time_to_first_token"] is not None
    out = subprocess.run([*cmd], capture_output=True, text=True, env=_env(server), timeout=60)  # not a terminal
    assert out.stdout == "streamed to the shell\n" and "stream" not in server.chat_requests()[-1].json


def _reap(pid: int, timeout: float = 10) -> int:
    """The wait status of child ``pid``; killed first if it has not ended within ``timeout`` seconds
    (a failed step leaves the chat waiting for input: the test then fails instead of hanging)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        threading.Event().wait(0.02)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _read_until(fd, marker: bytes, timeout: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


@pytest.mark.slow  # a subprocess in a pseudo-terminal
def test_chat_command_in_a_terminal(server):
    server.reply_with(lambda body: "you said " + body["messages"][-1]["content"])
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, its terminal the pty
        os.execve(sys.executable, [sys.executable, "-m", "tinyllm", "chat", "--system", "be brief"], _env(server))
    try:
        assert b"> " in _read_until(fd, b"> ")
        os.write(fd, b"hello\r")
        assert b"you said hello" in _read_until(fd, b"you said hello")
        os.write(fd, b"again\r")
        assert b"you said again" in _read_until(fd, b"you said again")
        history = server.chat_requests()[-1].json["messages"]
        assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]  # the conversation goes on
        os.write(fd, b"exit\r")
        _read_until(fd, b"\x00", timeout=5)
    finally:
        status = _reap(pid)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.slow
def test_chat_command_ctrl_c_stops_the_answer_not_the_conversation(server):
    server.enqueue(Stream(Reply(" ".join(f"w{i}" for i in range(400))), delay=0.05))
    server.reply_with("still here")
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "tinyllm", "chat"], _env(server))
    try:
        _read_until(fd, b"> ")
        os.write(fd, b"long one\r")
        assert b"w1 " in _read_until(fd, b"w1 ")
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT
        assert b"[stopped]" in _read_until(fd, b"[stopped]")
        os.write(fd, b"next\r")
        assert b"still here" in _read_until(fd, b"still here")
        history = server.chat_requests()[-1].json["messages"]
        assert [m["content"] for m in history] == ["next"]  # the stopped turn was dropped
        os.write(fd, b"\x04")  # Ctrl-D ends it
        _read_until(fd, b"\x00", timeout=5)
    finally:
        status = _reap(pid)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert server.streams_cut == 1


@pytest.mark.local
@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_the_embedded_model_streams(monkeypatch):
    from tinyllm.clients.llamacpp import LlamaCppClient

    local = LlamaCppClient(max_tokens=8)
    call = LLMCall("summarize", prompts_dir=os.path.join(ROOT, "prompts"), client=local)
    response = call.stream(text="The cat sat on the mat.")
    deltas = list(response)
    assert len(deltas) >= 2 and "".join(deltas) == response.value and response.usage_counted_locally
    assert response.usage["completion_tokens"] > 0 and response.time_to_first_token < response.latency


def test_tokens_per_minute_counts_a_streams_real_completion_tokens(server):
    limited = OpenAIClient(base_url=server.base_url, api_key=KEY, tokens_per_minute=100_000)
    server.enqueue(Stream(Reply(" ".join(["word"] * 50))))
    stream = limited.stream_request([{"role": "user", "content": "hi"}])  # no max_tokens: only the prompt reserved
    list(stream)
    from limits import RateLimitItemPerMinute

    sliding = limited.queue._rates[1]
    used = 100_000 - sliding.get_window_stats(RateLimitItemPerMinute(100_000)).remaining
    assert used >= stream.reply.usage["completion_tokens"] + stream.reply.prompt_tokens


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_a_stream_longer_than_timeout_runs_while_chunks_keep_coming(server, prompts, mode):
    """TIMEOUT bounds a streamed attempt up to its headers and each wait between chunks, not the whole
    stream: a long reply that keeps coming is read to the end (the SDK behaves the same)."""
    quick = OpenAIClient(base_url=server.base_url, api_key=KEY, timeout=0.3, max_attempts=1)
    words = " ".join(f"w{i}" for i in range(12))
    server.enqueue(Stream(Reply(words), delay=0.05))  # about 0.6 s in all, never 0.3 s quiet
    call = LLMCall("ask", prompts_dir=prompts, client=quick)
    if mode == "sync":
        text = "".join(call.stream(question="q"))
    else:

        async def read() -> str:
            return "".join([delta async for delta in await call.astream(question="q")])

        text = asyncio.run(read())
    assert text == words


def test_a_stream_quiet_for_longer_than_timeout_is_cut(server, prompts):
    quick = OpenAIClient(base_url=server.base_url, api_key=KEY, timeout=0.3, max_attempts=1)
    server.enqueue(Stream(Reply("one two"), delay=2))  # 2 s of silence before each chunk after the first
    started = time.monotonic()
    with pytest.raises(tinyllm.APITimeoutError) as info:
        "".join(LLMCall("ask", prompts_dir=prompts, client=quick).stream(question="q"))
    assert time.monotonic() - started < 1.8  # cut after about 0.3 s of silence, not at the end of the stream
    assert "two" not in info.value.partial
