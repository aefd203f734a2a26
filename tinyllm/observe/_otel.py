"""OpenTelemetry spans (the optional extra ``tinyllm[otel]``), after the GenAI semantic conventions.

One span per call (``chat {model}``, kind CLIENT) with ``gen_ai.operation.name``,
``gen_ai.provider.name`` (and the older ``gen_ai.system``), ``gen_ai.request.model``,
``gen_ai.request.temperature`` / ``max_tokens`` / ``top_p``, ``gen_ai.response.model``,
``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens`` / ``output_tokens``,
``error.type`` on failure, and tinyllm's own ``tinyllm.template``, ``tinyllm.cost_usd``,
``tinyllm.cached``, ``tinyllm.retries``, ``tinyllm.output_retries``. Under it one span per HTTP
attempt (``tinyllm.attempt``, with ``http.request.resend_count`` from the second on), so retries
show, and one per tool run (:func:`tool_span`, ``execute_tool {name}``).

Message contents are recorded (``gen_ai.input.messages``, ``gen_ai.output.messages``, JSON)
only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` is ``true`` (the conventions'
switch).

Spans go to the global tracer provider. When opentelemetry is not imported by anyone, or no
provider was set, every function here is a check of a dict and returns: nothing is imported,
nothing recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Callable, Iterator

__all__ = ["enabled", "attempt", "attempt_span", "call_span", "tool_span", "capture_content"]

CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
#: api_type -> gen_ai.provider.name
PROVIDER_NAMES = {"openai": "openai", "azure": "azure.ai.openai", "ollama": "ollama", "llamacpp": "llama_cpp"}
_REQUEST_ATTRS = {
    "temperature": "gen_ai.request.temperature",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}
_tracer_memo: list[Any] = [None, None]  # [provider, its tracer]


def _trace() -> Any:
    """The ``opentelemetry.trace`` module when a real tracer provider is set globally, else None."""
    trace = sys.modules.get("opentelemetry.trace")  # never imported here: whoever sets a provider did
    if (
        trace is None
        or getattr(getattr(trace, "__spec__", None), "_initializing", False)
        or not hasattr(trace, "get_tracer_provider")
    ):
        return None  # not imported, or being imported by another thread right now (no provider set through it yet)
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return trace


def enabled() -> bool:
    """Whether spans are recorded: opentelemetry is loaded and a global tracer provider is set."""
    return _trace() is not None


def capture_content() -> bool:
    """Whether message contents go on spans (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``)."""
    return os.environ.get(CAPTURE_ENV, "").strip().lower() in ("true", "1", "yes", "span_only", "span_and_event")


def _tracer(trace: Any) -> Any:
    provider = trace.get_tracer_provider()
    memo = _tracer_memo
    if memo[0] is not provider:
        from .. import __version__

        memo[1] = trace.get_tracer("tinyllm", __version__, tracer_provider=provider)
        memo[0] = provider
    return memo[1]


def _fail(span: Any, trace: Any, exc: BaseException) -> None:
    span.set_attribute("error.type", type(exc).__qualname__)
    span.record_exception(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))


@contextlib.contextmanager
def attempt_span(model: str, n: int) -> Iterator[None]:
    """A span around HTTP attempt ``n`` (0 first) of a request to ``model``; nothing without a provider."""
    trace = _trace()
    if trace is None:
        yield
        return
    attrs: dict[str, Any] = {"gen_ai.request.model": model, "tinyllm.attempt": n + 1}
    if n:
        attrs["http.request.resend_count"] = n
    with _tracer(trace).start_as_current_span(
        "tinyllm.attempt", attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield
        except BaseException as exc:
            _fail(span, trace, exc)
            raise


def attempt(model: str, n: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` inside :func:`attempt_span` (a plain call without a provider)."""
    if _trace() is None:
        return fn(*args)
    with attempt_span(model, n):
        return fn(*args)


@contextlib.contextmanager
def tool_span(name: str, call_id: str | None = None) -> Iterator[Any]:
    """A span ``execute_tool {name}`` around one tool run; yields the span (or None without a provider)."""
    trace = _trace()
    if trace is None:
        yield None
        return
    attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name}
    if call_id:
        attrs["gen_ai.tool.call.id"] = call_id
    with _tracer(trace).start_as_current_span(
        f"execute_tool {name}", attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except BaseException as exc:
            _fail(span, trace, exc)
            raise


def _parts(message: dict) -> list[dict]:
    parts: list[dict] = []
    content = message.get("content")
    if isinstance(content, str):
        parts.append({"type": "text", "content": content})
    elif isinstance(content, list):
        parts.extend(
            {"type": "text", "content": p.get("text")}
            if isinstance(p, dict) and "text" in p
            else {"type": "unknown", "content": str(p)}
            for p in content
        )
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        parts.append(
            {"type": "tool_call", "id": call.get("id"), "name": fn.get("name"), "arguments": fn.get("arguments")}
        )
    if message.get("refusal"):
        parts.append({"type": "refusal", "content": message["refusal"]})
    return parts


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


@contextlib.contextmanager
def call_span(api_type: str, params: dict, response: Any) -> Iterator[None]:
    """The span of one call: opened current (attempt and tool spans nest under it), closed with
    the :class:`~tinyllm.Response`'s model, usage, cost and finish reason, or the error raised.
    ``params``: the request's resolved parameters (``model``, ``temperature``, ...)."""
    trace = _trace()
    if trace is None:
        yield
        return
    model = str(params.get("model") or "")
    provider = PROVIDER_NAMES.get(api_type, api_type or "unknown")
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "gen_ai.request.model": model,
    }
    for key, name in _REQUEST_ATTRS.items():
        value = params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attrs[name] = value
    if response.template:
        attrs["tinyllm.template"] = response.template
    capture = capture_content()
    if capture:
        attrs["gen_ai.input.messages"] = _dumps(
            [{"role": m.get("role"), "parts": _parts(m)} for m in response.messages]
        )
    kind = trace.SpanKind.CLIENT
    with _tracer(trace).start_as_current_span(
        f"chat {model}".strip(), kind=kind, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield
        except BaseException as exc:
            _fail(span, trace, exc)
            raise
        finally:
            _finish(span, response, capture)


def _finish(span: Any, response: Any, capture: bool) -> None:
    if response.model:
        span.set_attribute("gen_ai.response.model", response.model)
    if response.finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [response.finish_reason])
    if response._replies:
        span.set_attribute("gen_ai.usage.input_tokens", int(response.usage.get("prompt_tokens") or 0))
        span.set_attribute("gen_ai.usage.output_tokens", int(response.usage.get("completion_tokens") or 0))
    if response.cost is not None:
        span.set_attribute("tinyllm.cost_usd", float(response.cost))
    span.set_attribute("tinyllm.cached", bool(response.cached))
    span.set_attribute("tinyllm.retries", int(response.retries))
    span.set_attribute("tinyllm.output_retries", int(response.output_retries))
    if response.time_to_first_token is not None:
        span.set_attribute("gen_ai.response.time_to_first_chunk", float(response.time_to_first_token))
    if capture and response.message is not None:
        out = {"role": response.message.get("role", "assistant"), "parts": _parts(response.message)}
        if response.finish_reason:
            out["finish_reason"] = response.finish_reason
        span.set_attribute("gen_ai.output.messages", _dumps([out]))
