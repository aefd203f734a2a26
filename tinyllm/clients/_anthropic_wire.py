"""Anthropic's Messages API <-> the OpenAI chat shapes tinyllm speaks inside: pure functions, no I/O.

:func:`request_body` turns OpenAI-style ``messages`` and parameters into a Messages API body;
:func:`read_message` turns a Messages API reply into ``(message, usage, info)`` as every client's
``_chat`` returns it; :class:`StreamTranslator` turns the SSE events of a streamed reply into
OpenAI ``chat.completion.chunk`` dicts (:mod:`tinyllm._streaming`). The mapping, both ways:

- ``system`` / ``developer`` messages -> the ``system`` parameter (a list of text blocks, in order);
- ``user`` / ``assistant`` content -> content blocks; OpenAI ``image_url`` parts -> ``image`` blocks
  (a ``data:`` URL -> a ``base64`` source, an http(s) URL -> a ``url`` source);
- assistant ``tool_calls`` -> ``tool_use`` blocks; ``tool`` messages -> ``tool_result`` blocks in
  the next user turn (consecutive turns of one role are merged, tool results first);
- ``tools`` (``{"type": "function", "function": {name, description, parameters}}``) ->
  ``{name, description, input_schema}``; ``tool_choice`` ``auto``/``required``/``none``/a named
  function -> ``{"type": "auto"|"any"|"none"|"tool"}``, ``parallel_tool_calls=False`` ->
  ``disable_parallel_tool_use``;
- ``response_format`` ``json_schema`` -> a forced call of an output tool whose ``input_schema`` is
  the schema (Anthropic's documented way to get JSON of a given shape, "Tool use: JSON mode",
  https://platform.claude.com/docs/en/agents-and-tools/tool-use/overview); its ``input`` comes
  back as the reply's text content. With tools of the call's own, the output tool is one more
  tool and ``tool_choice`` is ``any`` (call a tool or answer through the output tool).
  ``json_object`` has no Anthropic counterpart: nothing is sent, the prompt asks for JSON and
  the reply is parsed tolerantly;
- ``max_tokens`` / ``max_completion_tokens`` -> ``max_tokens``; ``stop`` -> ``stop_sequences``;
  ``user`` -> ``metadata.user_id``;
- ``cache`` (tinyllm's prompt-caching parameter, e.g. front matter ``cache: system``) ->
  ``cache_control: {"type": "ephemeral"}`` breakpoints on the last system block (``system``),
  the last tool (``tools``) and the last content block of the conversation (``messages``);
  ``true`` or ``all`` means all three; a list names several; ``{"system": "1h"}`` sets a TTL.
- OpenAI parameters with no Anthropic meaning (``temperature``, ``top_p``, ``top_k``, penalties,
  ``seed``, ``n``, ``logprobs``, ...) are not sent: API version 2026-10-21, which the anthropic
  SDK 2.x sends, refuses ``temperature``/``top_p``/``top_k`` with a 400 even at their defaults.
  Any other parameter (``thinking``, ``output_config``, ``service_tier``, ``metadata``, ...) is
  sent as given; ``extra_body`` is merged last.

Replies: text blocks -> ``content``; ``tool_use`` -> ``tool_calls`` (``arguments`` as JSON text);
``stop_reason`` -> ``finish_reason`` (``end_turn``/``stop_sequence``/``pause_turn`` -> ``stop``,
``max_tokens``/``model_context_window_exceeded`` -> ``length``, ``tool_use`` -> ``tool_calls``,
``refusal`` -> ``content_filter``); usage -> ``prompt_tokens`` (all input: uncached, read from
the cache and written to it), ``completion_tokens``, ``total_tokens`` and
``prompt_tokens_details: {cached_tokens, cache_creation_tokens}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..errors import BadRequestError, ResponseError

__all__ = [
    "DROPPED_PARAMS",
    "FINISH_REASONS",
    "OPTION_PARAMS",
    "StreamTranslator",
    "output_tool",
    "read_message",
    "request_body",
    "usage_of",
]

log = logging.getLogger("tinyllm")

#: Anthropic stop_reason -> OpenAI finish_reason
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
#: OpenAI chat parameters that mean nothing to the Messages API (or that it refuses): never sent
DROPPED_PARAMS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "frequency_penalty",
        "presence_penalty",
        "seed",
        "n",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "store",
        "modalities",
        "audio",
        "prediction",
        "stream_options",
        "reasoning_effort",
        "verbosity",
        "response_format",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "safety_identifier",
        "web_search_options",
        "max_completion_tokens",
        "stop",
        "user",
        "cache",
        "tools",
        "tool_choice",
        "messages",
        "stream",
    }
)
#: request options, not body fields
OPTION_PARAMS = frozenset({"timeout", "extra_headers", "extra_query", "extra_body"})
_CACHE_PARTS = ("system", "tools", "messages")


def _bad(message: str) -> BadRequestError:
    return BadRequestError(f"cannot send this request to the Messages API: {message}")


def output_tool(params: dict) -> dict | None:
    """The output tool a ``response_format`` of type ``json_schema`` becomes, or None.

    Returns ``{"name", "description", "input_schema"}``; the name is the schema's ``name``
    (default ``output``).

    Raises:
        BadRequestError: a json_schema response_format without a schema object.
    """
    fmt = params.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise _bad("response_format json_schema has no 'schema' object")
    if schema.get("type") != "object":  # input_schema must be an object: wrap anything else
        schema = {"type": "object", "properties": {"value": schema}, "required": ["value"]}
        name = str(spec.get("name") or "output")
        return {
            "name": name,
            "description": "Give the answer as this tool's input, under 'value'.",
            "input_schema": schema,
            "wrapped": True,
        }
    return {
        "name": str(spec.get("name") or "output"),
        "description": spec.get("description") or "Give the answer as this tool's input.",
        "input_schema": schema,
    }


def _image(part: dict) -> dict:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise _bad("an image_url part has no url")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        media_type = head[5:].split(";", 1)[0]
        if ";base64" not in head or not media_type or not data:
            raise _bad("an image data URL must be data:<media type>;base64,<data>")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad(f"an image URL must be a data: URL or http(s), not {url[:40]!r}")


def _blocks(content: Any, where: str) -> list[dict]:
    """Content blocks of an OpenAI ``content`` (a str or a list of parts); empty text is left out."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _bad(f"{where} content must be a str or a list of parts, not {type(content).__name__}")
    out = []
    for part in content:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise _bad(f"{where} has a content part that is not a dict: {part!r:.80}")
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                out.append({"type": "text", "text": str(part["text"])})
        elif kind == "image_url":
            out.append(_image(part))
        elif kind in ("image", "document", "tool_result", "tool_use", "thinking", "redacted_thinking"):
            out.append(part)  # already a Messages API block
        else:
            raise _bad(f"{where} has a content part of type {kind!r} (text and image_url are mapped)")
    return out


def _tool_use(call: Any, index: int) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not function.get("name"):
        raise _bad(f"an assistant tool call has no function name: {call!r:.120}")
    arguments = function.get("arguments")
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else (arguments or {})
    except ValueError:
        value = {"_raw_arguments": arguments}  # the model's own malformed JSON, sent back as it was
    if not isinstance(value, dict):
        value = {"value": value}
    return {"type": "tool_use", "id": call.get("id") or f"toolu_{index}", "name": function["name"], "input": value}


def _tool_result(message: dict) -> dict:
    call_id = message.get("tool_call_id")
    if not call_id:
        raise _bad("a tool message has no tool_call_id")
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    if isinstance(content, str):
        block["content"] = content
    else:
        block["content"] = _blocks(content, "a tool message")
    return block


def _conversation(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(system blocks, Messages API turns) of OpenAI ``messages``."""
    system: list[dict] = []
    turns: list[dict] = []

    def add(role: str, blocks: list[dict]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            if role == "user":  # tool results must come first in a user turn
                results = [b for b in blocks if b.get("type") == "tool_result"]
                rest = [b for b in blocks if b.get("type") != "tool_result"]
                previous = turns[-1]["content"]
                first = [b for b in previous if b.get("type") == "tool_result"]
                turns[-1]["content"] = first + results + [b for b in previous if b.get("type") != "tool_result"] + rest
            else:
                turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": list(blocks)})

    for i, m in enumerate(messages):
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend(_blocks(m.get("content"), f"messages[{i}] ({role})"))
        elif role == "user":
            add("user", _blocks(m.get("content"), f"messages[{i}] (user)"))
        elif role == "assistant":
            blocks = _blocks(m.get("content"), f"messages[{i}] (assistant)")
            blocks += [_tool_use(c, j) for j, c in enumerate(m.get("tool_calls") or [])]
            add("assistant", blocks)
        elif role == "tool":
            add("user", [_tool_result(m)])
        else:
            raise _bad(f"messages[{i}] has role {role!r} (system, developer, user, assistant and tool are mapped)")
    if not turns:
        raise _bad("there is no user or assistant message (the Messages API needs at least one)")
    return system, turns


def _cache_parts(value: Any) -> dict[str, dict]:
    """``cache`` parameter -> {part: cache_control}."""
    if value is None or value is False:
        return {}
    if value is True or value == "all":
        value = list(_CACHE_PARTS)
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(v, None) for v in value]
    else:
        raise _bad(f"cache must be system, tools, messages, all, a list of them or {{part: ttl}}, not {value!r}")
    out = {}
    for part, ttl in items:
        if part == "all":
            for p in _CACHE_PARTS:
                out[p] = _control(ttl)
            continue
        if part not in _CACHE_PARTS:
            raise _bad(f"cache names {part!r}; the parts are system, tools, messages (or all)")
        out[part] = _control(ttl)
    return out


def _control(ttl: Any) -> dict:
    if ttl in (None, True, "5m"):
        return {"type": "ephemeral"}
    if ttl == "1h":
        return {"type": "ephemeral", "ttl": "1h"}
    raise _bad(f"a cache TTL is 5m or 1h, not {ttl!r}")


def _mark_last(blocks: list[dict], control: dict) -> None:
    if blocks:
        blocks[-1] = {**blocks[-1], "cache_control": control}


def _tool_choice(choice: Any, parallel: Any) -> dict | None:
    out: dict[str, Any] | None
    if choice is None:
        out = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if not name:
            raise _bad(f"tool_choice names no function: {choice!r}")
        out = {"type": "tool", "name": name}
    elif isinstance(choice, dict) and choice.get("type") in ("auto", "any", "none", "tool"):
        out = dict(choice)  # already Anthropic's
    else:
        raise _bad(
            f"tool_choice must be auto, required, none or {{'type': 'function', 'function': {{'name': ...}}}}, "
            f"not {choice!r}"
        )
    if parallel is False and out is not None and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    elif parallel is False:
        out = {"type": "auto", "disable_parallel_tool_use": True}
    return out


def _tools(tools: Any) -> list[dict]:
    out = []
    for t in tools or []:
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict):
            f = t["function"]
            spec = {"name": f.get("name"), "input_schema": f.get("parameters") or {"type": "object", "properties": {}}}
            if f.get("description"):
                spec["description"] = f["description"]
            out.append(spec)
        elif isinstance(t, dict) and t.get("name"):
            out.append(t)  # already an Anthropic tool (a server tool, or input_schema given)
        else:
            raise _bad(f"a tool must be {{'type': 'function', 'function': {{...}}}}, not {t!r:.120}")
    return out


def request_body(messages: list[dict], params: dict, max_tokens: int) -> tuple[dict, dict | None]:
    """The Messages API body for OpenAI-style ``messages`` and ``params``, and the output tool (or None).

    Args:
        messages: OpenAI chat messages (validated by the client's pipeline).
        params: resolved request parameters (``model`` set); see the module docstring for the mapping.
        max_tokens: the ``max_tokens`` to send when ``params`` has none (the client's default).

    Raises:
        BadRequestError: a message, part, tool or parameter that cannot be mapped (nothing is sent).
    """
    system, turns = _conversation(messages)
    body: dict[str, Any] = {"model": params["model"]}
    given = params.get("max_tokens", params.get("max_completion_tokens"))
    body["max_tokens"] = int(given) if given is not None else max_tokens
    tools = _tools(params.get("tools"))
    choice = _tool_choice(params.get("tool_choice"), params.get("parallel_tool_calls"))
    out_tool = output_tool(params)
    if out_tool is not None:
        tools.append({k: v for k, v in out_tool.items() if k != "wrapped"})
        if len(tools) == 1 or choice is None or choice.get("type") == "auto":
            choice = {"type": "tool", "name": out_tool["name"]} if len(tools) == 1 else {"type": "any"}
    stop = params.get("stop")
    if stop is not None:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if params.get("user"):
        body["metadata"] = {**(params.get("metadata") or {}), "user_id": str(params["user"])}
    for key, value in params.items():
        if key not in DROPPED_PARAMS and key not in OPTION_PARAMS and key not in body:
            body[key] = value
    dropped = sorted(
        k for k in params if k in ("temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty", "seed")
    )
    if dropped:
        log.debug("not sent to the Messages API (it refuses or ignores them): %s", ", ".join(dropped))
    cache = _cache_parts(params.get("cache"))
    if "system" in cache:
        _mark_last(system, cache["system"])
    if "tools" in cache and tools:
        tools[-1] = {**tools[-1], "cache_control": cache["tools"]}
    if "messages" in cache:
        _mark_last(turns[-1]["content"], cache["messages"])
    if system:
        body["system"] = system
    body["messages"] = turns
    if tools:
        body["tools"] = tools
    if choice is not None:
        body["tool_choice"] = choice
    extra = params.get("extra_body")
    if extra:
        body.update(extra)
    return body, out_tool


def usage_of(raw: Any) -> dict:
    """An OpenAI-shaped usage dict of a Messages API ``usage`` (see the module docstring)."""
    raw = raw if isinstance(raw, dict) else {}
    fresh = int(raw.get("input_tokens") or 0)
    read = int(raw.get("cache_read_input_tokens") or 0)
    written = int(raw.get("cache_creation_input_tokens") or 0)
    completion = int(raw.get("output_tokens") or 0)
    prompt = fresh + read + written
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read, "cache_creation_tokens": written},
    }


def _unwrap(value: Any, tool: dict) -> str:
    if tool.get("wrapped") and isinstance(value, dict) and "value" in value:
        value = value["value"]
    return json.dumps(value, ensure_ascii=False)


def read_message(reply: Any, out_tool: dict | None = None) -> tuple[dict, dict, dict]:
    """``(message, usage, info)`` of a Messages API reply (a JSON object).

    The output tool's call (typed output) becomes the text content; other ``tool_use``
    blocks become ``tool_calls``. ``info`` is ``{"model", "finish_reason"}``.

    Raises:
        ResponseError: the reply is not a message object (``.raw`` holds it).
    """
    if not isinstance(reply, dict) or not isinstance(reply.get("content"), list):
        raise ResponseError(f"the Messages API reply is not a message: {str(reply)[:200]!r}", raw=reply)
    texts: list[str] = []
    calls: list[dict] = []
    output: str | None = None
    for block in reply["content"]:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            if out_tool is not None and block.get("name") == out_tool["name"]:
                output = _unwrap(block.get("input"), out_tool)
            else:
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {
                            "name": block.get("name"),
                            "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
                        },
                    }
                )
    stop: Any = reply.get("stop_reason")
    finish = FINISH_REASONS.get(stop, stop)
    message: dict[str, Any] = {"role": "assistant"}
    if calls:
        message["content"] = "".join(texts) or None
        message["tool_calls"] = calls
    elif output is not None:
        message["content"] = output
        finish = "stop" if finish == "tool_calls" else finish
    else:
        message["content"] = "".join(texts)
    if stop == "refusal" and not message["content"]:
        message["refusal"] = "the model declined to answer (stop_reason: refusal)"
    return message, usage_of(reply.get("usage")), {"model": reply.get("model"), "finish_reason": finish}


class StreamTranslator:
    """Turns a streamed reply's events (dicts) into OpenAI chunk dicts; ``chunks(event)`` returns a list.

    ``message_start`` gives the role and model (and the input usage), ``content_block_start`` of a
    ``tool_use`` opens a tool call, ``text_delta`` / ``input_json_delta`` carry text and tool
    arguments (the output tool's arguments are the reply's text, so a typed reply streams as
    JSON text), ``message_delta`` carries ``stop_reason`` and the final usage.
    """

    def __init__(self, out_tool: dict | None = None) -> None:
        self.out_tool = out_tool
        self.model: str | None = None
        self._usage: dict = {}
        self._kinds: dict[int, str] = {}  # content block index -> "text" | "tool" | "output" | "other"
        self._calls: dict[int, int] = {}  # content block index -> tool call index
        self._saw_output = False

    def _chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
        return {"model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": usage}

    def chunks(self, event: Any) -> list[dict]:
        """The chunks of one event (often one, none for ``ping``, ``content_block_stop``, ``message_stop``).

        Raises:
            ResponseError: an event that is not a JSON object.
        """
        if not isinstance(event, dict):
            raise ResponseError(f"stream event is not a JSON object: {str(event)[:200]!r}", raw=event)
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.model = message.get("model") or self.model
            self._usage.update({k: v for k, v in (message.get("usage") or {}).items() if isinstance(v, int)})
            return [self._chunk({"role": "assistant"})]
        if kind == "content_block_start":
            index, block = event.get("index", 0), event.get("content_block") or {}
            if block.get("type") == "text":
                self._kinds[index] = "text"
                return [self._chunk({"content": block["text"]})] if block.get("text") else []
            if block.get("type") == "tool_use":
                if self.out_tool is not None and block.get("name") == self.out_tool["name"]:
                    self._kinds[index] = "output"
                    self._saw_output = True
                    return []
                self._kinds[index] = "tool"
                n = self._calls[index] = len(self._calls)
                return [
                    self._chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": n,
                                    "id": block.get("id"),
                                    "type": "function",
                                    "function": {"name": block.get("name"), "arguments": ""},
                                }
                            ]
                        }
                    )
                ]
            self._kinds[index] = "other"  # thinking and server tool blocks: not part of the message
            return []
        if kind == "content_block_delta":
            index, delta = event.get("index", 0), event.get("delta") or {}
            what = self._kinds.get(index)
            if delta.get("type") == "text_delta" and what == "text":
                return [self._chunk({"content": delta.get("text") or ""})]
            if delta.get("type") == "input_json_delta":
                piece = delta.get("partial_json") or ""
                if what == "output":
                    return [self._chunk({"content": piece})] if piece else []
                if what == "tool":
                    return [
                        self._chunk({"tool_calls": [{"index": self._calls[index], "function": {"arguments": piece}}]})
                    ]
            return []
        if kind == "message_delta":
            self._usage.update({k: v for k, v in (event.get("usage") or {}).items() if isinstance(v, int)})
            stop = (event.get("delta") or {}).get("stop_reason")
            finish = FINISH_REASONS.get(stop, stop) if stop else None
            if finish == "tool_calls" and self._saw_output and not self._calls:
                finish = "stop"
            return [self._chunk({}, finish, usage_of(self._usage))]
        return []  # ping, content_block_stop, message_stop, unknown new events
