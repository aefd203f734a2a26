"""AnthropicClient against a loopback fake of the Messages API, with the real anthropic SDK in between.

The quick tests use the fake served by a thread of this process (one per session, reset per test);
the slow test at the end runs the project's prompt files through the fake in a child process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("anthropic")

import fake_anthropic as fa
from helpers import ROOT, write

import tinyllm
from tinyllm import AnthropicClient
from tinyllm.clients import _anthropic_wire as wire

PROMPTS = ROOT / "prompts"
KEY = "sk-ant-api03-SECRETSECRETSECRET"


@pytest.fixture(scope="session")
def _fake():
    with fa.FakeAnthropicServer() as server:
        yield server


@pytest.fixture
def fake(_fake):
    _fake.reset()
    yield _fake
    _fake.reset()


@pytest.fixture
def claude(fake):
    tinyllm.configure(waiting_time=0.001)
    return AnthropicClient(base_url=fake.base_url, api_key=KEY, cache=False, model="claude-sonnet-4-5")


def bodies(fake) -> list[dict]:
    return [r["body"] for r in fake.requests if r["path"] == "/v1/messages"]


# -- the prompt files of prompts/ answer through it -------------------------------------------------


def test_summarize_prompt_file(fake, claude):
    fake.enqueue(fa.text("A short summary."))
    response = tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS, client=claude).respond(
        text="Some long text."
    )
    assert response.value == "A short summary."
    assert (
        response.finish_reason == "stop" and response.api_type == "anthropic" and response.model == "claude-sonnet-4-5"
    )
    (body,) = bodies(fake)
    assert body["max_tokens"] == 256  # the front matter's
    assert "temperature" not in body  # API version 2026-10-21 refuses it
    assert body["system"][0]["type"] == "text" and body["system"][0]["text"].startswith("You write short summaries.")
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Summarize this text:\n\nSome long text."}]}
    ]
    headers = fake.requests[0]["headers"]
    assert headers["authorization"] == f"Bearer {KEY}" or headers.get("x-api-key") == KEY


def test_classify_prompt_file_few_shot_turns(fake, claude):
    fake.enqueue(fa.text("Positive."))
    value = tinyllm.LLMCall("classify.system.md", prompts_dir=PROMPTS, client=claude).call(text="What a lovely day")
    assert value == "positive"
    roles = [m["role"] for m in bodies(fake)[0]["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]


def test_extract_facts_prompt_file_json(fake, claude):
    fake.enqueue(fa.text('Here: {"facts": ["Paris is in France."]}'))
    value = tinyllm.LLMCall("extract_facts.system.md", prompts_dir=PROMPTS, client=claude).call(
        text="Paris is in France."
    )
    assert value == {"facts": ["Paris is in France."]}
    body = bodies(fake)[0]
    assert "tools" not in body and "response_format" not in body  # json_object has no Anthropic counterpart


def test_llmchat_keeps_the_conversation(fake, claude):
    fake.enqueue(fa.text("Hello Ada."), fa.text("Your name is Ada."))
    chat = tinyllm.LLMChat(system="You are terse.", client=claude, max_tokens=50)
    assert chat.say("I am Ada.") == "Hello Ada."
    assert chat.say("What is my name?") == "Your name is Ada."
    second = bodies(fake)[1]
    assert second["system"] == [{"type": "text", "text": "You are terse."}]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == [{"type": "text", "text": "Hello Ada."}]


def test_api_type_anthropic_from_the_environment(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    monkeypatch.setenv("TINYLLM_API_TYPE", "anthropic")
    assert isinstance(tinyllm.get_client(), AnthropicClient)
    assert (
        tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS).call(text="hi")
        == "echo: Summarize this text:\n\nhi"
    )
    assert bodies(fake)[0]["model"] == "claude-sonnet-5-5"  # ANTHROPIC_MODEL while MODEL is at its default
    monkeypatch.delenv("TINYLLM_API_TYPE")
    from tinyllm.clients import detect_api_type

    assert detect_api_type(tinyllm.get_config()) == "anthropic"  # the key alone picks it


# -- max_tokens -----------------------------------------------------------------------------------------


def test_max_tokens_defaults_to_the_models_documented_maximum(fake, claude):
    claude.send_message([{"role": "user", "content": "hi"}])
    claude.send_message([{"role": "user", "content": "hi"}], model="claude-opus-5-5-20260901")
    claude.send_message([{"role": "user", "content": "hi"}], max_tokens=7)
    assert [b["max_tokens"] for b in bodies(fake)] == [64_000, 128_000, 7]


def test_unknown_model_without_max_tokens_is_refused_before_sending(fake, claude):
    with pytest.raises(tinyllm.BadRequestError, match="requires max_tokens"):
        claude.send_message([{"role": "user", "content": "hi"}], model="claude-future-9")
    assert fake.requests == []
    claude.send_message([{"role": "user", "content": "hi"}], model="claude-future-9", max_tokens=10)
    tinyllm.configure(max_tokens=33)
    claude.send_message([{"role": "user", "content": "hi"}], model="claude-future-9")
    assert [b["max_tokens"] for b in bodies(fake)] == [10, 33]


# -- tools --------------------------------------------------------------------------------------------------


def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: the city's name.
    """
    return f"sunny in {city}"


def test_tool_loop_runs_unchanged(fake, claude):
    fake.enqueue(
        fa.tool_use("get_weather", {"city": "Paris"}, id="toolu_1", text="Let me look."), fa.text("It is sunny.")
    )
    response = tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS, client=claude, tools=[get_weather]).respond(
        text="x"
    )
    assert response.value == "It is sunny."
    assert [c.name for c in response.tool_calls] == ["get_weather"] and response.tool_calls[
        0
    ].content == "sunny in Paris"
    first, second = bodies(fake)
    (spec,) = first["tools"]
    assert spec["name"] == "get_weather" and spec["description"].startswith("The weather in a city")
    assert spec["input_schema"]["properties"]["city"]["type"] == "string"
    assert "tool_choice" not in first
    assistant, results = second["messages"][1], second["messages"][2]
    assert assistant == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    }
    assert results == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny in Paris"}],
    }
    assert response.usage["prompt_tokens"] == sum(fa.fake_tokens(b) for b in (first, second))


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("required", {"type": "any"}),
        ("get_weather", {"type": "tool", "name": "get_weather"}),
        ("auto", {"type": "auto"}),
    ],
)
def test_tool_choice_mapping(fake, claude, given, sent):
    fake.enqueue(fa.tool_use("get_weather", {"city": "Oslo"}), fa.text("done"))
    tinyllm.LLMCall(
        "summarize.system.md", prompts_dir=PROMPTS, client=claude, tools=[get_weather], tool_choice=given
    ).call(text="x")
    first, second = bodies(fake)
    assert first["tool_choice"] == sent
    if given != "auto":
        assert second["tool_choice"] == {"type": "auto"}  # a forced choice applies to the first round only


def test_parallel_tool_calls_false_disables_parallel_use():
    body, _ = wire.request_body(
        [{"role": "user", "content": "x"}],
        {
            "model": "m",
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        },
        10,
    )
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


# -- typed output through a forced tool call ------------------------------------------------------------------


def test_typed_output_through_a_forced_tool_call(fake, claude):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    fake.enqueue(fa.tool_use("City", {"name": "Paris", "population": 2100000}))
    response = tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS, client=claude, output_type=City).respond(
        text="x"
    )
    assert response.value == City(name="Paris", population=2100000)
    assert response.finish_reason == "stop" and json.loads(response.text) == {"name": "Paris", "population": 2100000}
    (body,) = bodies(fake)
    (tool,) = body["tools"]
    assert tool["name"] == "City" and tool["input_schema"]["properties"]["population"]["type"] == "integer"
    assert body["tool_choice"] == {"type": "tool", "name": "City"}


def test_typed_output_with_tools_offers_both(fake, claude):
    from pydantic import BaseModel

    class Weather(BaseModel):
        summary: str

    fake.enqueue(fa.tool_use("get_weather", {"city": "Rome"}), fa.tool_use("Weather", {"summary": "sunny"}))
    value = tinyllm.LLMCall(
        "summarize.system.md", prompts_dir=PROMPTS, client=claude, output_type=Weather, tools=[get_weather]
    ).call(text="x")
    assert value == Weather(summary="sunny")
    first, second = bodies(fake)
    assert [t["name"] for t in first["tools"]] == ["get_weather", "Weather"]
    assert first["tool_choice"] == second["tool_choice"] == {"type": "any"}


def test_typed_output_streams_as_json_text(fake, claude):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    fake.enqueue(fa.tool_use("City", {"name": "Lyon", "population": 520000}))
    response = tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS, client=claude, output_type=City).stream(
        text="x"
    )
    partials = []
    for _ in response:
        partials.append(response.partial)
    assert response.value == City(name="Lyon", population=520000)
    assert {"name": "Lyon"} in partials  # the JSON grew piece by piece


# -- streaming ---------------------------------------------------------------------------------------------


def test_streaming_text_deltas_and_usage(fake, claude):
    fake.enqueue(fa.text("one two three four"))
    response = tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS, client=claude).stream(text="x")
    assert list(response) == ["one", " two", " three", " four"]
    assert response.value == "one two three four" and response.finish_reason == "stop"
    assert response.usage["completion_tokens"] == 4
    assert response.usage["prompt_tokens"] == fa.fake_tokens(bodies(fake)[0])
    assert bodies(fake)[0]["stream"] is True


def test_streaming_tool_rounds(fake, claude):
    fake.enqueue(fa.tool_use("get_weather", {"city": "Bern"}), fa.text("sunny there"))
    response = tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS, client=claude, tools=[get_weather]).stream(
        text="x"
    )
    assert "".join(response) == "sunny there"
    assert response.tool_calls[0].arguments == {"city": "Bern"}
    assert bodies(fake)[1]["messages"][2]["content"][0]["content"] == "sunny in Bern"


def test_a_stream_dropped_before_the_first_chunk_is_retried(fake, claude, sleeps):
    fake.enqueue(fa.drop(after=0), fa.stream_error("overloaded_error", after=0), fa.text("fine now"))
    stream = claude.stream_request([{"role": "user", "content": "hi"}])
    assert "".join(stream) == "fine now" and stream.reply.retries == 2


def test_a_stream_dropped_midway_raises_with_the_partial_text(fake, claude):
    fake.enqueue(fa.drop(after=5))  # message_start, ping, block start, "echo:", " alpha", then cut
    stream = claude.stream_request([{"role": "user", "content": "alpha beta gamma"}])
    with pytest.raises(tinyllm.APIConnectionError) as info:
        for _ in stream:
            pass
    assert info.value.partial == "echo: alpha" and len(fake.requests) == 1


def test_an_error_event_midway_is_typed(fake, claude):
    fake.enqueue(fa.stream_error("overloaded_error", after=4))
    stream = claude.stream_request([{"role": "user", "content": "one two"}])
    with pytest.raises(tinyllm.ServerError) as info:
        list(stream)
    assert info.value.status_code == 529 and "overloaded_error" in str(info.value) and info.value.partial == "echo:"


def test_closing_a_stream_early_frees_the_slot(fake):
    one = AnthropicClient(
        base_url=fake.base_url,
        api_key=KEY,
        cache=False,
        model="claude-haiku-4-5",
        max_concurrent_requests=1,
        queue_timeout=2,
    )
    fake.enqueue(fa.text(" ".join(f"w{i}" for i in range(50))))
    with one.stream_request([{"role": "user", "content": "hi"}]) as stream:
        assert next(iter(stream)) == "w0"
    assert stream.reply is None  # not complete: not cached, no reply
    assert one.send_message([{"role": "user", "content": "again"}])["content"] == "echo: again"  # the one slot is free


# -- errors and retries -------------------------------------------------------------------------------------------


def test_429_and_529_are_retried_honouring_retry_after(fake, claude, sleeps):
    fake.enqueue(
        fa.error(429, "rate_limit_error", headers={"retry-after": "3"}),
        fa.error(529, "overloaded_error", headers={"retry-after": "2"}),
        fa.text("ok"),
    )
    reply = claude.request([{"role": "user", "content": "hi"}])
    assert reply.message["content"] == "ok" and reply.retries == 2
    assert sleeps == [3.0, 2.0]
    assert [r["headers"].get("x-stainless-retry-count") for r in fake.requests] == ["0", "1", "2"]


def test_sdk_retries_are_off_and_400_is_not_retried(fake, claude, sleeps):
    fake.enqueue(fa.error(400, "invalid_request_error", "messages: roles must alternate"))
    with pytest.raises(tinyllm.BadRequestError, match="roles must alternate") as info:
        claude.send_message([{"role": "user", "content": "hi"}])
    assert info.value.status_code == 400 and len(fake.requests) == 1 and sleeps == []


@pytest.mark.parametrize(
    ("status", "kind", "error"),
    [
        (401, "authentication_error", tinyllm.AuthenticationError),
        (403, "permission_error", tinyllm.PermissionDeniedError),
        (404, "not_found_error", tinyllm.NotFoundError),
        (400, "invalid_request_error", tinyllm.ContextWindowExceededError),
    ],
)
def test_error_statuses_map_to_the_tree(fake, claude, status, kind, error):
    message = (
        "prompt is too long: 250000 tokens > 200000 maximum" if error is tinyllm.ContextWindowExceededError else kind
    )
    fake.enqueue(fa.error(status, kind, message))
    with pytest.raises(error):
        claude.send_message([{"role": "user", "content": "hi"}])
    assert len(fake.requests) == 1


def test_no_key_in_errors_or_reprs(fake, claude, sleeps):
    fake.enqueue(fa.error(401, "authentication_error", f"invalid x-api-key {KEY}"))
    with pytest.raises(tinyllm.AuthenticationError) as info:
        claude.send_message([{"role": "user", "content": "hi"}])
    seen = f"{info.value} {info.value.body!r} {info.value.response_headers!r} {claude!r} {info.value.__cause__!r}"
    assert KEY not in seen and "****" in str(info.value)
    cause = info.value.__cause__
    assert KEY not in repr(dict(cause.request.headers)) and KEY not in str(cause)


def test_missing_key_is_a_config_error():
    with pytest.raises(tinyllm.ConfigError, match="ANTHROPIC_API_KEY"):
        AnthropicClient(cache=False).send_message([{"role": "user", "content": "hi"}], max_tokens=5)


# -- usage, prompt caching and cost ---------------------------------------------------------------------------------


def test_prompt_caching_from_front_matter_shows_in_usage_and_cost(fake, claude, tmp_path):
    system = "---\ncache: system\nmax_tokens: 20\n---\n" + " ".join(f"rule{i}" for i in range(200))
    folder = tmp_path / "prompts"
    write(folder / "long.system.md", system)
    write(folder / "long.user.md", "{{ question }}")
    call = tinyllm.LLMCall("long.system.md", prompts_dir=folder, client=claude)
    first, second = call.respond(question="one"), call.respond(question="two")
    body = bodies(fake)[0]
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"} and "cache" not in body
    assert first.usage["prompt_tokens"] == second.usage["prompt_tokens"] == 200 + 4  # the system; 3 + the question
    assert first.usage["prompt_tokens_details"] == {"cached_tokens": 0, "cache_creation_tokens": 200}
    assert second.usage["prompt_tokens_details"] == {"cached_tokens": 200, "cache_creation_tokens": 0}
    # claude-sonnet-4-5 per million tokens (genai-prices): input $3, cache write $3.75, cache read $0.30, output $15;
    # each reply ("echo: one") is 2 output tokens
    assert first.cost == pytest.approx((4 * 3 + 200 * 3.75 + 2 * 15) / 1e6)
    assert second.cost == pytest.approx((4 * 3 + 200 * 0.30 + 2 * 15) / 1e6)


def test_usage_details_of_a_cached_reply(fake, claude):
    messages = [{"role": "system", "content": "word " * 50}, {"role": "user", "content": "hi"}]
    claude.request(messages, cache="system")
    reply = claude.request(messages, cache=["system", "messages"])
    usage = reply.usage
    assert usage["prompt_tokens_details"]["cache_creation_tokens"] + usage["prompt_tokens_details"]["cached_tokens"] > 0
    body = bodies(fake)[1]
    assert body["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}


def test_cache_ttl_and_bad_cache_values():
    body, _ = wire.request_body(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        {"model": "m", "cache": {"system": "1h"}},
        5,
    )
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    with pytest.raises(tinyllm.BadRequestError, match="cache names 'everything'"):
        wire.request_body([{"role": "user", "content": "u"}], {"model": "m", "cache": "everything"}, 5)


def test_openai_clients_do_not_send_the_cache_parameter(server):
    client = tinyllm.OpenAIClient(base_url=server.base_url, api_key="sk-test-openai", cache=False)
    client.send_message([{"role": "user", "content": "hi"}], cache="system")
    assert "cache" not in server.chat_requests()[0].json and server.chat_requests()[0].json["messages"]


# -- token counting ------------------------------------------------------------------------------------------------


def test_token_count_exact_from_the_endpoint_else_estimated(fake, claude):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count these five words please"}]
    exact = claude.token_count(messages)
    assert exact == type(exact)(tokens=2 + 3 + 5, estimated=False, model="claude-sonnet-4-5")
    assert fake.requests[-1]["path"] == "/v1/messages/count_tokens" and "max_tokens" not in fake.requests[-1]["body"]
    estimate = claude.token_count(messages, exact=False)
    assert estimate.estimated is True and estimate.tokens == tinyllm.count_tokens(messages, "claude-sonnet-4-5")
    assert len(fake.requests) == 1  # the estimate sent nothing
    assert claude.token_count(messages, model="claude-future-9").tokens == 10  # no max_tokens needed to count


# -- content blocks ----------------------------------------------------------------------------------------------


def test_images_become_image_blocks(fake, claude):
    data = base64.b64encode(b"\x89PNG fake").decode()
    claude.send_message(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            }
        ],
        max_tokens=5,
    )
    blocks = bodies(fake)[0]["messages"][0]["content"]
    assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    assert blocks[2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}


def test_unmappable_content_is_refused_before_sending(fake, claude):
    with pytest.raises(tinyllm.MediaError, match="takes no audio"):  # its capabilities: images only
        claude.send_message([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], max_tokens=5)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("stop_sequence", "stop"),
        ("refusal", "content_filter"),
    ],
)
def test_stop_reason_to_finish_reason(stop, finish):
    message, _, info = wire.read_message({"content": [{"type": "text", "text": "x"}], "stop_reason": stop, "usage": {}})
    assert info["finish_reason"] == finish and message["content"] == "x"


# -- asyncio -----------------------------------------------------------------------------------------------------


def test_async_call_and_stream(fake, claude):
    fake.enqueue(fa.text("async hello"), fa.text("streamed async"))
    call = tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS, client=claude)

    async def main() -> tuple[str, list[str]]:
        value = await call.acall(text="x")
        response = await call.astream(text="y")
        return value, [d async for d in response]

    value, deltas = asyncio.run(main())
    assert value == "async hello" and "".join(deltas) == "streamed async"


def test_dropped_sampling_parameters_are_logged_not_sent(fake, claude, caplog):
    with caplog.at_level(logging.DEBUG, logger="tinyllm"):
        claude.send_message([{"role": "user", "content": "hi"}], temperature=0.2, top_p=0.9, max_tokens=5)
    body = bodies(fake)[0]
    assert "temperature" not in body and "top_p" not in body
    assert "temperature" in caplog.text


# -- the same prompt files through a fake in a process of its own ---------------------------------------------------


@pytest.mark.slow
def test_prompt_files_through_a_fake_in_its_own_process():
    from pydantic import BaseModel

    class Facts(BaseModel):
        facts: list[str]

    with fa.spawn() as remote:
        client = AnthropicClient(
            base_url=remote.base_url, api_key=KEY, cache=False, model="claude-haiku-4-5", waiting_time=0.001
        )
        remote.enqueue(
            fa.text("Brief."),
            fa.text("negative"),
            fa.error(529, "overloaded_error", headers={"retry-after": "0"}),
            fa.tool_use("Facts", {"facts": ["a", "b"]}),
            fa.text("streamed reply here"),
        )
        assert tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS, client=client).call(text="t") == "Brief."
        assert tinyllm.LLMCall("classify.system.md", prompts_dir=PROMPTS, client=client).call(text="bad") == "negative"
        response = tinyllm.LLMCall(
            "extract_facts.system.md", prompts_dir=PROMPTS, client=client, output_type=Facts
        ).respond(text="t")
        assert response.value == Facts(facts=["a", "b"]) and response.retries == 1 and response.cost > 0
        streamed = tinyllm.LLMCall("summarize.system.md", prompts_dir=PROMPTS, client=client).stream(text="t")
        assert "".join(streamed) == "streamed reply here"
        assert [r["path"] for r in remote.requests] == ["/v1/messages"] * 5
        assert Path(fa.__file__).exists()


# -- the examples of docs/anthropic.md run as written -------------------------------------------------------------


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_docs_examples_run(capsys):
    import re

    page = (ROOT / "docs" / "anthropic.md").read_text(encoding="utf-8")
    blocks = [code for skip, code in re.findall(r"(<!-- skip -->\n)?```python\n(.*?)```", page, re.DOTALL) if not skip]
    assert len(blocks) >= 5
    for code in blocks:
        exec(compile(code, "docs/anthropic.md", "exec"), {"__name__": "docs_example"})  # noqa: S102
    printed = capsys.readouterr().out
    assert "It is sunny in Paris." in printed and "name='Lyon' population=520000" in printed
    assert "{'cached_tokens': 2000, 'cache_creation_tokens': 0}" in printed


def test_cli_tokens_exact_asks_the_endpoint(fake, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from tinyllm.cli import cli

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    monkeypatch.setenv("TINYLLM_API_TYPE", "anthropic")
    write(tmp_path / "t.txt", "one two three four")
    result = CliRunner().invoke(cli, ["tokens", "--exact", str(tmp_path / "t.txt")], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.strip() == "7"  # 3 per message + 4 words, the fake's count
    assert fake.requests[-1]["path"] == "/v1/messages/count_tokens"
    monkeypatch.setenv("TINYLLM_API_TYPE", "openai")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai")
    result = CliRunner().invoke(cli, ["tokens", "--exact", str(tmp_path / "t.txt")])
    assert result.exit_code != 0 and "token-counting endpoint" in result.output


def test_prices_setting_prices_cache_writes_and_reads(fake, claude):
    tinyllm.configure(
        prices={
            "claude-sonnet-4-5": {
                "input_per_mtok": 1,
                "output_per_mtok": 10,
                "cached_input_per_mtok": 0.1,
                "cache_write_per_mtok": 2,
            }
        }
    )
    messages = [{"role": "system", "content": "word " * 100}, {"role": "user", "content": "hi"}]
    first = claude.request(messages, cache="system", max_tokens=5)
    second = claude.request(messages, cache="system", max_tokens=5)
    # 100 system tokens written then read; 3 + 1 user tokens uncached; "echo: hi" is 2 output tokens
    assert first.cost == pytest.approx((4 * 1 + 100 * 2 + 2 * 10) / 1e6)
    assert second.cost == pytest.approx((4 * 1 + 100 * 0.1 + 2 * 10) / 1e6)


def test_tool_results_come_first_in_a_merged_user_turn():
    body, _ = wire.request_body(
        [
            {"role": "developer", "content": "d"},
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "b", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "ra"},
            {"role": "tool", "tool_call_id": "b", "content": "rb"},
            {"role": "user", "content": "Your previous reply could not be used"},
        ],
        {"model": "m"},
        5,
    )
    assert body["system"] == [{"type": "text", "text": "d"}]
    last = body["messages"][-1]
    assert [b["type"] for b in last["content"]] == ["tool_result", "tool_result", "text"]
    assert body["messages"][1]["content"][1]["input"] == {"x": 1}
