"""Tools: schemas from functions and models, the tool loop over the loopback server, front matter, the CLI."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Literal

import pytest
from helpers import write
from click.testing import CliRunner
from fakeserver import Message, Reply
from pydantic import BaseModel, Field

import tinyllm
from tinyllm import (
    Capabilities,
    ConfigError,
    LLMCall,
    LLMChat,
    ResponseError,
    TemplateError,
    ToolError,
    ToolRoundsExceededError,
    configure,
)
from tinyllm.tools import Tool, registry


def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
    """The current weather in a city.

    Args:
        city: the city's name, e.g. "Paris".
        unit: degrees Celsius or Fahrenheit.
    """
    return f"18 {unit} and sunny in {city}"


async def get_time(city: str) -> dict:
    """The local time in a city.

    Args:
        city: the city's name.
    """
    return {"city": city, "time": "14:05"}


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="full name")
    age: int


def call(name: str, arguments: dict | str, id: str | None = None) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": id or f"call_{name}", "type": "function", "function": {"name": name, "arguments": text}}


def asks(*calls: dict, usage: dict | None = None) -> Message:
    return Message({"content": None, "tool_calls": list(calls)}, usage=usage)


@pytest.fixture
def wired(server, tmp_path):
    configure(api_type="openai", base_url=server.base_url, max_attempts=1)
    write(tmp_path / "prompts" / "q.system.md", "Answer the question.")
    write(tmp_path / "prompts" / "q.user.md", "{{ question }}")
    return server


# --- schemas --------------------------------------------------------------------------------------------


def test_function_schema_from_signature_hints_and_docstring():
    t = Tool(get_weather)
    assert t.name == "get_weather" and t.description == "The current weather in a city."
    props = t.parameters["properties"]
    assert props["city"] == {"type": "string", "title": "City", "description": 'the city\'s name, e.g. "Paris".'}
    assert props["unit"]["enum"] == ["C", "F"] and props["unit"]["default"] == "C"
    assert t.parameters["required"] == ["city"] and t.parameters["additionalProperties"] is False
    assert t.spec()["type"] == "function" and t.spec()["function"]["name"] == "get_weather"
    assert t("Oslo") == "18 C and sunny in Oslo"  # still callable like the function
    assert Tool(get_time).is_async


def test_pydantic_model_tool_uses_the_openai_helper():
    t = Tool(Person)
    assert t.name == "Person" and t.description == "A person mentioned in the text."
    assert t.parameters["properties"]["name"]["description"] == "full name"
    assert t.parameters["required"] == ["name", "age"]
    assert t.run({"name": "Ada", "age": 36}) == Person(name="Ada", age=36)


@pytest.mark.parametrize("bad", [lambda *args: None, lambda **kw: None, 42, {"type": "function"}])
def test_what_cannot_be_a_tool_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        LLMCall("q.system.md", tools=[bad]) if isinstance(bad, dict) else Tool(bad)


def test_client_without_tools_capability_is_refused(wired):
    class NoTools:
        capabilities = Capabilities(tools=False)

        def send_message(self, messages, **params):
            return {"role": "assistant", "content": "x"}

    with pytest.raises(ConfigError, match="does not take tools"):
        LLMCall("q.system.md", client=NoTools(), tools=[get_weather]).call(question="?")


# --- the loop over the loopback server -------------------------------------------------------------------


def test_single_tool_call_runs_and_its_result_goes_back(wired):
    wired.enqueue(
        asks(
            call("get_weather", {"city": "Paris"}),
            usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        ),
        Reply("It is sunny.", usage={"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}),
    )
    response = LLMCall("q.system.md", tools=[get_weather]).respond(question="Weather in Paris?")
    assert response.value == "It is sunny."
    first, second = (r.json for r in wired.chat_requests())
    assert first["tools"][0]["function"]["name"] == "get_weather"
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_get_weather"
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_get_weather",
        "content": "18 C and sunny in Paris",
    }
    [record] = response.tool_calls
    assert (record.name, record.arguments, record.result, record.error, record.round) == (
        "get_weather",
        {"city": "Paris"},
        "18 C and sunny in Paris",
        None,
        0,
    )
    assert record.duration >= 0 and len(response.tool_rounds) == 1
    assert response.usage == {"prompt_tokens": 30, "completion_tokens": 8, "total_tokens": 38}
    assert response.output_retries == 0
    assert response.as_dict()["tool_rounds"][0]["calls"][0]["content"] == "18 C and sunny in Paris"


def test_parallel_sync_calls_run_concurrently_in_threads(wired):
    barrier = threading.Barrier(2, timeout=10)  # both calls must be running at once to pass it

    def meet(who: str) -> str:
        """Wait for the other call."""
        barrier.wait()
        return f"met {who}"

    wired.enqueue(asks(call("meet", {"who": "a"}, "c1"), call("meet", {"who": "b"}, "c2")), Reply("done"))
    response = LLMCall("q.system.md", tools=[meet]).respond(question="?")
    assert [c.content for c in response.tool_calls] == ["met a", "met b"]
    tool_messages = wired.chat_requests()[1].json["messages"][-2:]
    assert [(m["tool_call_id"], m["content"]) for m in tool_messages] == [("c1", "met a"), ("c2", "met b")]


def test_parallel_async_calls_run_as_concurrent_tasks(wired):
    seen: list[str] = []

    async def ping(who: str) -> str:
        """Wait until both calls started."""
        seen.append(who)
        while len(seen) < 2:  # a second task must start while this one waits
            await asyncio.sleep(0)
        return who

    wired.enqueue(
        asks(
            call("ping", {"who": "a"}, "c1"),
            call("ping", {"who": "b"}, "c2"),
            call("get_weather", {"city": "Rome"}, "c3"),
        ),
        Reply("done"),
    )
    response = asyncio.run(
        asyncio.wait_for(LLMCall("q.system.md", tools=[ping, get_weather]).arespond(question="?"), 10)
    )
    assert [c.content for c in response.tool_calls] == ["a", "b", "18 C and sunny in Rome"]


def test_async_tool_from_sync_call(wired):
    wired.enqueue(asks(call("get_time", {"city": "Tokyo"})), Reply("ok"))
    response = LLMCall("q.system.md", tools=[get_time]).respond(question="?")
    assert response.tool_calls[0].result == {"city": "Tokyo", "time": "14:05"}
    assert json.loads(response.tool_calls[0].content) == {"city": "Tokyo", "time": "14:05"}


@pytest.mark.parametrize(
    "arguments, expect",
    [
        ({"city": "Paris", "unit": "K"}, "invalid arguments for get_weather: unit: Input should be 'C' or 'F'"),
        ({"town": "Paris"}, "invalid arguments for get_weather: city: Field required"),
        ('{"city": "Par', "invalid arguments for get_weather: the arguments are not valid JSON"),
    ],
)
def test_invalid_arguments_go_back_to_the_model(wired, arguments, expect):
    ran = []
    wired.enqueue(asks(call("get_weather", arguments)), asks(call("get_weather", {"city": "Paris"})), Reply("fixed"))
    response = LLMCall("q.system.md", tools=[get_weather], on_tool_call=ran.append).respond(question="?")
    assert response.value == "fixed"
    first, second = response.tool_calls
    assert first.error.startswith(expect) and first.result is None and first.content == "Error: " + first.error
    assert wired.chat_requests()[1].json["messages"][-1]["content"].startswith("Error: " + expect)
    assert second.error is None and ran == [first, second]


def test_unknown_tool_and_a_tool_that_raises_go_back_to_the_model(wired):
    def explode(x: int) -> int:
        """Always fails."""
        raise RuntimeError(f"boom {x}")

    wired.enqueue(asks(call("nope", {}, "c1"), call("explode", {"x": 3}, "c2")), Reply("sorry"))
    response = LLMCall("q.system.md", tools=[explode]).respond(question="?")
    nope, boom = response.tool_calls
    assert nope.error == "there is no tool named 'nope'; the tools are: explode"
    assert boom.error == "explode raised RuntimeError: boom 3"
    assert [m["content"] for m in wired.chat_requests()[1].json["messages"][-2:]] == [
        "Error: there is no tool named 'nope'; the tools are: explode",
        "Error: explode raised RuntimeError: boom 3",
    ]


def test_raise_tool_errors(wired):
    def explode(x: int) -> int:
        """Always fails."""
        raise RuntimeError("boom")

    wired.enqueue(asks(call("explode", {"x": 1})))
    with pytest.raises(ToolError, match="boom") as info:
        LLMCall("q.system.md", tools=[explode], raise_tool_errors=True).call(question="?")
    assert isinstance(info.value.__cause__, RuntimeError) and info.value.call.name == "explode"
    wired.enqueue(asks(call("explode", {"x": "many"})))
    with pytest.raises(ToolError, match="invalid arguments"):
        LLMCall("q.system.md", tools=[explode], raise_tool_errors=True).call(question="?")
    assert len(wired.chat_requests()) == 2  # nothing sent after a failed call


def test_endless_tool_requests_stop_after_max_tool_rounds(wired):
    wired.enqueue(*[asks(call("get_weather", {"city": "Paris"}, f"c{i}")) for i in range(5)])
    with pytest.raises(ToolRoundsExceededError, match="after 2 tool rounds") as info:
        LLMCall("q.system.md", tools=[get_weather], max_tool_rounds=2).call(question="?")
    assert len(wired.chat_requests()) == 3
    roles = [m["role"] for m in info.value.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert info.value.rounds == 2 and len(info.value.response.tool_rounds) == 2


def test_max_tool_rounds_setting(wired):
    configure(max_tool_rounds=0)
    wired.enqueue(asks(call("get_weather", {"city": "Paris"})))
    with pytest.raises(ToolRoundsExceededError):
        LLMCall("q.system.md", tools=[get_weather]).call(question="?")


@pytest.mark.parametrize(
    "given, sent",
    [
        ("required", "required"),
        ("get_weather", {"type": "function", "function": {"name": "get_weather"}}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
)
def test_a_forced_tool_choice_passes_through_then_becomes_auto(wired, given, sent):
    wired.enqueue(asks(call("get_weather", {"city": "Paris"})), Reply("ok"))
    LLMCall("q.system.md", tools=[get_weather], tool_choice=given).call(question="?")
    first, second = (r.json for r in wired.chat_requests())
    assert first["tool_choice"] == sent and second["tool_choice"] == "auto"


def _unforced_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "no tool call" in r.getMessage()]


@pytest.mark.parametrize("given", ["required", "get_weather"])
def test_a_forced_tool_choice_answered_without_a_tool_call_warns_once(wired, caplog, given):
    """llama.cpp's server ignores tool_choice=required: the reply has text only. One WARNING per call, naming it."""
    wired.enqueue(Reply("not json"), Reply('{"a": 1}'))  # an output retry sends the forced choice again
    with caplog.at_level("WARNING", logger="tinyllm"):
        value = LLMCall("q.system.md", tools=[get_weather], tool_choice=given, output_type=dict, output_retries=1).call(
            question="?"
        )
    assert value == {"a": 1} and len(wired.chat_requests()) == 2
    warned = _unforced_warnings(caplog)
    assert len(warned) == 1 and "openai" in warned[0] and repr(given) in warned[0]


def test_a_forced_tool_choice_that_is_obeyed_or_not_forced_does_not_warn(wired, caplog):
    wired.enqueue(asks(call("get_weather", {"city": "Paris"})), Reply("ok"), Reply("ok"))
    with caplog.at_level("WARNING", logger="tinyllm"):
        LLMCall("q.system.md", tools=[get_weather], tool_choice="required").call(question="?")
        LLMCall("q.system.md", tools=[get_weather], tool_choice="auto").call(question="?")
    assert _unforced_warnings(caplog) == []


def test_a_forced_tool_choice_ignored_warns_async_and_streamed(wired, caplog):
    wired.enqueue(Reply("plain"), Reply("plain"))
    call_ = LLMCall("q.system.md", tools=[get_weather], tool_choice="required")
    with caplog.at_level("WARNING", logger="tinyllm"):
        assert asyncio.run(call_.acall(question="?")) == "plain"
        response = call_.stream(question="?")
        assert "".join(response) == "plain"
    assert len(_unforced_warnings(caplog)) == 2


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_auto_and_none_pass_through_unchanged(wired, choice):
    wired.enqueue(Reply("ok"))
    LLMCall("q.system.md", tools=[get_weather], tool_choice=choice).call(question="?")
    assert wired.chat_requests()[0].json["tool_choice"] == choice


def test_tool_choice_naming_an_unknown_tool(wired):
    with pytest.raises(ConfigError, match="not one of this call's tools"):
        LLMCall("q.system.md", tools=[get_weather], tool_choice="get_time").call(question="?")


def test_tool_calls_without_tools_stay_a_response_error(wired):
    wired.enqueue(asks(call("get_weather", {"city": "Paris"})))
    with pytest.raises(ResponseError, match="no text content"):
        LLMCall("q.system.md").call(question="?")


def test_tool_rounds_then_an_output_retry_keep_the_whole_conversation(wired):
    wired.enqueue(asks(call("get_weather", {"city": "Paris"})), Reply("not a number"), Reply("18"))
    response = LLMCall("q.system.md", tools=[get_weather], output_type=int, output_retries=1).respond(question="?")
    assert response.value == 18 and response.output_retries == 1 and len(response.tool_rounds) == 1
    roles = [m["role"] for m in wired.chat_requests()[2].json["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user"]


def test_pydantic_model_tool_result_is_the_instance(wired):
    wired.enqueue(asks(call("Person", {"name": "Ada", "age": 36})), Reply("noted"))
    response = LLMCall("q.system.md", tools=[Person]).respond(question="?")
    assert response.tool_calls[0].result == Person(name="Ada", age=36)
    assert json.loads(response.tool_calls[0].content) == {"name": "Ada", "age": 36}


def test_chat_keeps_tool_rounds_in_the_history(wired):
    wired.enqueue(asks(call("get_weather", {"city": "Paris"})), Reply("Sunny."))
    chat = LLMChat(system="Be brief.", tools=[get_weather])
    assert chat.say("Weather in Paris?") == "Sunny."
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant", "tool", "assistant"]
    chat.say("Thanks")
    assert [m["role"] for m in wired.chat_requests()[2].json["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]


# --- front matter and the registry ---------------------------------------------------------------------


@pytest.fixture
def registered():
    t = tinyllm.tool(get_weather)
    yield t
    registry.unregister("get_weather")


def test_front_matter_names_registered_tools(wired, tmp_path, registered):
    write(tmp_path / "prompts" / "w.system.md", "---\ntools: [get_weather]\ntool_choice: required\n---\nUse the tools.")
    wired.enqueue(asks(call("get_weather", {"city": "Oslo"})), Reply("ok"))
    response = LLMCall("w.system.md").respond()
    assert response.tool_calls[0].content == "18 C and sunny in Oslo"
    assert wired.chat_requests()[0].json["tool_choice"] == "required"
    assert registered("Rome") == "18 C and sunny in Rome"


def test_front_matter_unknown_tool_name_names_the_template(wired, tmp_path):
    write(tmp_path / "prompts" / "w.system.md", "---\ntools: [no_such_tool]\n---\nUse the tools.")
    with pytest.raises(TemplateError, match=r"w\.system\.md.*'no_such_tool'"):
        LLMCall("w.system.md").call()


def test_front_matter_tools_must_be_names(tmp_path):
    write(tmp_path / "prompts" / "w.system.md", "---\ntools: [{type: function}]\n---\nx")
    with pytest.raises(TemplateError, match="list of tool names"):
        LLMCall("w.system.md")


def test_decorator_with_a_name(registered):
    @tinyllm.tool(name="weather2", description="Same weather.")
    def other(city: str) -> str:
        return city

    try:
        assert registry.get("weather2").description == "Same weather." and other("x") == "x"
    finally:
        registry.unregister("weather2")


# --- streaming (a client that streams scripted chunks) -------------------------------------------------------


def test_streaming_runs_the_tools_and_streams_the_next_round(tmp_path):
    from tinyllm.clients._base import Client

    class Scripted(Client):
        api_type = "scripted"
        capabilities = Capabilities(tools=True, streaming=True)

        def __init__(self, script):
            super().__init__(cache=False)
            self.script, self.sent = list(script), []

        def endpoint(self, cfg, model):
            return {"api_type": "scripted"}

        def _chat_stream(self, messages, params, cfg):
            self.sent.append((messages, params))
            yield from self.script.pop(0)

    tool_chunks = [
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "c1", "function": {"name": "get_weather", "arguments": '{"ci'}}
                        ]
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]},
                    "finish_reason": "tool_calls",
                }
            ]
        },
    ]
    text_chunks = [
        {"choices": [{"index": 0, "delta": {"content": "Sun"}}]},
        {"choices": [{"index": 0, "delta": {"content": "ny."}, "finish_reason": "stop"}]},
    ]
    write(tmp_path / "prompts" / "q.system.md", "Answer.")
    sender = Scripted([tool_chunks, text_chunks])
    response = LLMCall("q.system.md", client=sender, tools=[get_weather], tool_choice="required").stream()
    assert list(response) == ["Sun", "ny."]
    assert response.value == "Sunny." and response.tool_calls[0].arguments == {"city": "Paris"}
    assert sender.sent[1][0][-1]["content"] == "18 C and sunny in Paris" and sender.sent[1][1]["tool_choice"] == "auto"

    sender = Scripted([tool_chunks, text_chunks])
    chat = LLMChat(system="x", client=sender, tools=[get_weather])

    async def run():
        r = await chat.astream("Weather?")
        return [d async for d in r], r

    deltas, response = asyncio.run(run())
    assert deltas == ["Sun", "ny."] and response.value == "Sunny."
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant", "tool", "assistant"]


# --- the command line ------------------------------------------------------------------------------------------


def test_cli_call_with_tools_prints_each_call_on_stderr(wired, tmp_path, monkeypatch):
    from tinyllm.cli import cli

    write(
        tmp_path / "weather_tools.py",
        "def get_weather(city: str) -> str:\n    '''Weather.'''\n    return f'rain in {city}'\n",
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    wired.enqueue(asks(call("get_weather", {"city": "Bergen"})), Reply("Bring an umbrella."))
    result = CliRunner().invoke(
        cli,
        [
            "call",
            "q",
            "--var",
            "question=Bergen?",
            "--tool",
            "weather_tools:get_weather",
            "--tool-choice",
            "required",
            "--no-stream",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "Bring an umbrella."
    assert 'tool get_weather({"city": "Bergen"}) -> rain in Bergen' in result.stderr
    assert wired.chat_requests()[0].json["tool_choice"] == "required"
    result = CliRunner().invoke(cli, ["call", "q", "--var", "question=?", "--tool", "weather_tools"])
    assert result.exit_code == 2 and "MODULE:FUNCTION" in result.output
