"""OpenTelemetry spans after the GenAI semantic conventions, read back with the SDK's in-memory exporter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import question_prompts, wire
from fakeserver import Reply, Status

import tinyllm
from tinyllm import LLMCall
from tinyllm.observe import _otel as otel

trace = pytest.importorskip("opentelemetry.trace")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.util._once import Once  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-otel-test-000000000001"


def _reset_global_provider() -> None:
    # the SDK's own tests do this: the global provider may otherwise be set once per process
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_global_provider()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        _reset_global_provider()


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(tmp_path, ask="---\ntemperature: 0.5\nmax_tokens: 20\n---\nYou answer briefly.\n")


@pytest.fixture
def wired(server, monkeypatch):
    return wire(server, monkeypatch, KEY)


def by_name(exporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def test_a_call_span_with_one_child_span_per_http_attempt(spans, wired, prompts, sleeps, monkeypatch):
    monkeypatch.delenv(otel.CAPTURE_ENV, raising=False)
    wired.enqueue(Status(500), Reply("Paris.", usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}))
    response = LLMCall("ask.system.md", prompts_dir=prompts).respond(question="Capital of France?")
    found = by_name(spans)
    (call,) = found["chat gpt-4o-mini"]
    first, second = sorted(found["tinyllm.attempt"], key=lambda s: s.start_time)
    assert call.kind == trace.SpanKind.CLIENT
    a = dict(call.attributes)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == a["gen_ai.system"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini" and a["gen_ai.response.model"] == "gpt-4o-mini"
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.max_tokens"] == 20
    assert a["gen_ai.usage.input_tokens"] == 12 and a["gen_ai.usage.output_tokens"] == 3
    assert a["tinyllm.template"] == "ask.system.md" and a["tinyllm.retries"] == 1
    assert a["tinyllm.cost_usd"] == pytest.approx(response.cost)
    assert "error.type" not in a and "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
    for attempt in (first, second):
        assert attempt.parent.span_id == call.context.span_id and attempt.context.trace_id == call.context.trace_id
    assert first.attributes["error.type"] == "ServerError" and first.status.status_code == trace.StatusCode.ERROR
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1 and "error.type" not in second.attributes


def test_message_contents_only_when_the_user_opts_in(spans, wired, prompts, monkeypatch):
    monkeypatch.setenv(otel.CAPTURE_ENV, "true")
    wired.enqueue(Reply("Paris."))
    LLMCall("ask.system.md", prompts_dir=prompts).call(question="Capital of France?")
    (call,) = by_name(spans)["chat gpt-4o-mini"]
    sent = json.loads(call.attributes["gen_ai.input.messages"])
    assert sent[-1] == {"role": "user", "parts": [{"type": "text", "content": "Capital of France?"}]}
    got = json.loads(call.attributes["gen_ai.output.messages"])
    assert got == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Paris."}], "finish_reason": "stop"}
    ] or got == [{"role": "assistant", "parts": [{"type": "text", "content": "Paris."}]}]
    assert KEY not in json.dumps(dict(call.attributes))


def test_a_failed_call_sets_error_type(spans, wired, prompts):
    wired.enqueue(Status(401))
    with pytest.raises(tinyllm.AuthenticationError):
        LLMCall("ask.system.md", prompts_dir=prompts).call(question="q")
    (call,) = by_name(spans)["chat gpt-4o-mini"]
    assert call.attributes["error.type"] == "AuthenticationError" and call.status.status_code == trace.StatusCode.ERROR


def test_async_calls_nest_their_attempts_too(spans, wired, prompts):
    import asyncio

    asyncio.run(LLMCall("ask.system.md", prompts_dir=prompts).acall(question="q"))
    found = by_name(spans)
    (call,) = found["chat gpt-4o-mini"]
    (attempt,) = found["tinyllm.attempt"]
    assert attempt.parent.span_id == call.context.span_id


def test_tool_span(spans):
    with trace.get_tracer("test").start_as_current_span("outer") as outer:
        with otel.tool_span("lookup_weather", call_id="call_1"):
            pass
        with pytest.raises(ValueError):
            with otel.tool_span("broken"):
                raise ValueError("no")
    found = by_name(spans)
    (tool,) = found["execute_tool lookup_weather"]
    assert dict(tool.attributes) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "lookup_weather",
        "gen_ai.tool.call.id": "call_1",
    }
    assert tool.parent.span_id == outer.context.span_id
    assert found["execute_tool broken"][0].attributes["error.type"] == "ValueError"


def test_no_provider_no_spans_and_nothing_imported():
    """Without a provider set, a call neither imports opentelemetry nor records anything; importing
    tinyllm imports none of sqlite3, genai_prices, opentelemetry, platformdirs."""
    code = (
        "import sys, tinyllm\n"
        "heavy = ('sqlite3', 'genai_prices', 'opentelemetry', 'platformdirs')\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in heavy], sorted(sys.modules)\n"
        "class Stub:\n"
        "    def send_message(self, messages, **params):\n"
        "        return {'role': 'assistant', 'content': 'ok'}\n"
        "assert tinyllm.LLMChat(system='s', client=Stub()).say('hi') == 'ok'\n"
        "assert not tinyllm.observe._otel.enabled()\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in heavy], sorted(sys.modules)\n"
        "import opentelemetry.trace\n"
        "assert not tinyllm.observe._otel.enabled()  # imported, but no provider set\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
