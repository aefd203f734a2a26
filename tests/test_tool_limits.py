"""Tool defects found under attack (issue 20): a reply asking for 400 calls starts a bounded number of
threads, a hanging tool is cut off by ``tool_timeout`` (the model gets an error result), a result JSON
cannot encode still goes back as JSON, and ``max_tool_rounds=-1`` is refused."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fakeserver import Message, Reply
from helpers import write

from tinyllm import ConfigError, LLMCall, LLMChat, ToolError, configure
from tinyllm.tools import DEFAULT_TOOL_CONCURRENCY, DEFAULT_TOOL_TIMEOUT, Toolbox


def call(name: str, arguments: dict, id: str) -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def asks(*calls: dict) -> Message:
    return Message({"content": None, "tool_calls": list(calls)})


@pytest.fixture
def wired(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-tool-limits-000000000001")
    configure(api_type="openai", base_url=server.base_url, max_attempts=1)
    write(tmp_path / "prompts" / "q.system.md", "Answer the question.")
    write(tmp_path / "prompts" / "q.user.md", "{{ question }}")
    return server


def tool_messages(server) -> list[dict]:
    return [m for m in server.chat_requests()[-1].messages if m["role"] == "tool"]


class Gauge:
    """Counts the tool calls running at once."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, n: int) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.002)
        with self.lock:
            self.now -= 1
        return n


def test_four_hundred_calls_run_on_a_bounded_number_of_threads(wired):
    gauge = Gauge()

    def count(n: int) -> int:
        """Count."""
        return gauge(n)

    wired.enqueue(asks(*(call("count", {"n": i}, f"call_{i}") for i in range(400))), Reply("done"))
    threads_before = threading.active_count()
    response = LLMCall("q.system.md", tools=[count]).respond(question="?")
    assert response.value == "done"
    assert 1 < gauge.most <= DEFAULT_TOOL_CONCURRENCY == 8
    assert threading.active_count() <= threads_before + 1
    sent = tool_messages(wired)
    assert [m["tool_call_id"] for m in sent] == [f"call_{i}" for i in range(400)]
    assert [m["content"] for m in sent] == [str(i) for i in range(400)]


def test_the_bound_is_a_setting_and_applies_to_async_calls(wired):
    gauge = Gauge()

    async def count(n: int) -> int:
        """Count."""
        gauge.now += 1
        gauge.most = max(gauge.most, gauge.now)
        await asyncio.sleep(0.002)
        gauge.now -= 1
        return n

    configure(tool_concurrency=3)
    wired.enqueue(asks(*(call("count", {"n": i}, f"call_{i}") for i in range(30))), Reply("done"))
    assert asyncio.run(LLMCall("q.system.md", tools=[count]).acall(question="?")) == "done"
    assert gauge.most == 3


def hang(seconds: float) -> str:
    """Wait."""
    threading.Event().wait(seconds)
    return "finished"


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_hanging_tool_is_cut_off_and_the_model_told(wired, asynchronous):
    wired.enqueue(
        asks(call("hang", {"seconds": 30}, "call_slow"), call("hang", {"seconds": 0}, "call_quick")), Reply("ok")
    )
    llm = LLMCall("q.system.md", tools=[hang], tool_timeout=0.2)
    started = time.monotonic()
    response = asyncio.run(llm.arespond(question="?")) if asynchronous else llm.respond(question="?")
    assert time.monotonic() - started < 5
    assert response.value == "ok"
    slow, quick = response.tool_calls
    assert slow.error and "tool_timeout=0.2 s" in slow.error and slow.result is None
    assert quick.error is None and quick.result == "finished"
    sent = {m["tool_call_id"]: m["content"] for m in tool_messages(wired)}
    assert sent["call_slow"].startswith("Error: hang did not finish within tool_timeout=0.2 s")
    assert sent["call_quick"] == "finished"


def test_an_async_tool_that_hangs_is_cut_off_too(wired):
    async def sleepy() -> str:
        """Sleep."""
        await asyncio.sleep(30)
        return "late"

    wired.enqueue(asks(call("sleepy", {}, "call_1")), Reply("ok"))
    configure(tool_timeout=0.1)
    response = asyncio.run(LLMCall("q.system.md", tools=[sleepy]).arespond(question="?"))
    assert "tool_timeout=0.1 s" in response.tool_calls[0].error


def test_a_timeout_with_raise_tool_errors_raises(wired):
    wired.enqueue(asks(call("hang", {"seconds": 30}, "call_1")))
    with pytest.raises(ToolError, match="tool_timeout=0.1 s"):
        LLMCall("q.system.md", tools=[hang], tool_timeout=0.1, raise_tool_errors=True).call(question="?")


def test_the_default_timeout_is_documented_and_zero_means_none():
    from tinyllm.config import Config

    assert DEFAULT_TOOL_TIMEOUT == Config().tool_timeout == 60.0 and Toolbox([hang]).timeout == 60.0
    assert DEFAULT_TOOL_CONCURRENCY == Config().tool_concurrency
    assert Toolbox([hang], timeout=0).timeout == 0.0


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), "5", True])
def test_a_bad_tool_timeout_is_refused(bad):
    with pytest.raises(ConfigError, match="tool_timeout"):
        Toolbox([hang], timeout=bad)


class Opaque:
    def __str__(self) -> str:
        return "an opaque thing"


def test_a_result_json_cannot_encode_goes_back_as_json(wired):
    def lookup() -> dict:
        """Look up."""
        return {"thing": Opaque(), "n": 1, "tags": {"a"}}

    def weird_keys() -> dict:
        """Weird keys."""
        return {(1, 2): "tuple key"}

    wired.enqueue(asks(call("lookup", {}, "call_1"), call("weird_keys", {}, "call_2")), Reply("ok"))
    response = LLMCall("q.system.md", tools=[lookup, weird_keys]).respond(question="?")
    first, second = (m["content"] for m in tool_messages(wired))
    assert json.loads(first) == {"thing": "an opaque thing", "n": 1, "tags": ["a"]}
    assert isinstance(json.loads(second), (dict, str))  # valid JSON either way
    assert response.tool_calls[0].content == first


@pytest.mark.parametrize("bad", [-1, -5, 1.5, "3"])
def test_max_tool_rounds_below_zero_is_refused(tmp_path, bad):
    write(tmp_path / "p" / "q.system.md", "Answer.")
    with pytest.raises(ConfigError, match="max_tool_rounds"):
        LLMCall("q.system.md", prompts_dir=tmp_path / "p", tools=[hang], max_tool_rounds=bad)
    with pytest.raises(ConfigError, match="max_tool_rounds"):
        LLMChat(system="be brief", tools=[hang], max_tool_rounds=bad)
    with pytest.raises(ConfigError, match="max_tool_rounds"):
        Toolbox([hang], max_rounds=bad)
