"""Reading a chat completion's JSON: the helpers every OpenAI-shaped client shares.

The OpenAI-family clients (the SDK's decoded JSON) and the llama.cpp client
(llama-cpp-python's dict, the same shape) read their replies here.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ResponseError

__all__ = ["extract_message", "extract_reply"]

_USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _malformed(what: str, response: Any) -> ResponseError:
    return ResponseError(f"malformed reply: {what}", raw=response)


def _message(raw: dict, response: Any) -> dict:
    """The message dict of one choice's ``message`` object, its fields' types checked."""
    role, content = raw.get("role") or "assistant", raw.get("content")
    if not isinstance(role, str):
        raise _malformed(f"message role is {type(role).__name__}, not a string", response)
    if content is not None and not isinstance(content, str):
        raise _malformed(f"message content is {type(content).__name__}, not a string or null", response)
    message: dict[str, Any] = {"role": role, "content": content}
    for key, kind in (("refusal", str), ("tool_calls", list), ("function_call", dict)):
        value = raw.get(key)
        if value:
            if not isinstance(value, kind) or (kind is list and not all(isinstance(v, dict) for v in value)):
                raise _malformed(f"message {key} is {type(value).__name__}, not {kind.__name__}", response)
            message[key] = value
    return message


def _logprobs(choice: dict) -> list | None:
    """A choice's ``logprobs.content`` (the tokens with their log probabilities), or None when not sent."""
    found = choice.get("logprobs")
    content = found.get("content") if isinstance(found, dict) else None
    return content if isinstance(content, list) else None


def extract_message(response: Any) -> tuple[dict, dict]:
    """``(message_dict, usage_dict)`` from a chat completion: its parsed JSON, or its text.

    ``response`` is what the SDK's ``post(..., cast_to=object)`` returns: the decoded
    JSON body, or the body's text when the server did not label it JSON (the
    llamacpp client passes llama.cpp's dict).

    The shape is checked once, here, with plain type checks: ``choices[0].message``
    is an object whose ``content`` is a string or null, ``role`` and ``refusal``
    strings when present, ``tool_calls`` a list of objects, ``function_call`` an
    object; ``usage``, when present, an object whose ``prompt_tokens``,
    ``completion_tokens`` and ``total_tokens`` are whole numbers >= 0 (returned as int).

    Raises:
        ResponseError: not a JSON object, no choices, no message, neither content
            nor tool calls (unless the finish reason is ``length`` or ``content_filter``,
            which the call layer reports as such), or a field of the wrong type.
    """
    if isinstance(response, str):  # served without a JSON Content-Type
        try:
            response = json.loads(response)
        except (ValueError, RecursionError):
            raise ResponseError(f"reply is not JSON: {response[:200]!r}", raw=response) from None
    if not isinstance(response, dict):
        raise ResponseError(f"reply is not a JSON object: {str(response)[:200]!r}", raw=response)
    choices = response.get("choices") or []
    if (
        not isinstance(choices, list)
        or not choices
        or not isinstance(choices[0], dict)
        or not isinstance(choices[0].get("message"), dict)
    ):
        raise ResponseError("reply has no choices", raw=response)
    message = _message(choices[0]["message"], response)
    stopped = choices[0].get("finish_reason") in ("length", "content_filter")  # no content yet: the call layer says why
    if message["content"] is None and len(message) == 2 and not stopped:
        raise ResponseError("reply message has no content", raw=response)
    usage = response.get("usage")
    if usage is None:
        return message, {}
    if not isinstance(usage, dict):
        raise _malformed(f"usage is {type(usage).__name__}, not an object", response)
    usage = dict(usage)
    for key in _USAGE_COUNTS:
        count = usage.get(key)
        if count is None:
            continue
        if type(count) is float and count.is_integer():
            count = usage[key] = int(count)
        if type(count) is not int or count < 0:
            raise _malformed(f"usage.{key} is {count!r:.40}, not a whole number >= 0", response)
    return message, usage


def extract_reply(response: Any) -> tuple[dict, dict, dict]:
    """``(message_dict, usage_dict, info)`` where ``info`` is ``{"model": the model that answered,
    "finish_reason": ..., "logprobs": ..., "choices": ...}`` (None when the reply does not say).

    ``logprobs`` is the first choice's ``logprobs.content`` (a list of ``{"token", "logprob",
    "bytes", "top_logprobs"}`` dicts, as the API sends them) when asked for with
    ``logprobs=True``; ``choices`` is, when the reply has more than one choice (``n``), every
    choice as ``{"index", "message", "finish_reason", "logprobs"}`` in index order (None for one).
    Errors as :func:`extract_message`; a later choice of the wrong shape is a ResponseError too."""
    if isinstance(response, str):
        try:
            response = json.loads(response)
        except (ValueError, RecursionError):
            raise ResponseError(f"reply is not JSON: {response[:200]!r}", raw=response) from None
    message, usage = extract_message(response)
    choice = response["choices"][0]
    model, finish = response.get("model"), choice.get("finish_reason")
    info = {
        "model": model if isinstance(model, str) and model else None,
        "finish_reason": finish if isinstance(finish, str) else None,
        "logprobs": _logprobs(choice),
        "choices": None,
    }
    if len(response["choices"]) > 1:
        info["choices"] = _choices(response)
    return message, usage, info


def _choices(response: dict) -> list[dict]:
    """Every choice of a reply with several (``n``), as plain dicts in index order."""
    out = []
    for i, choice in enumerate(response["choices"]):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise _malformed(f"choices[{i}] has no message", response)
        index, finish = choice.get("index", i), choice.get("finish_reason")
        out.append(
            {
                "index": index if isinstance(index, int) else i,
                "message": _message(choice["message"], response),
                "finish_reason": finish if isinstance(finish, str) else None,
                "logprobs": _logprobs(choice),
            }
        )
    return sorted(out, key=lambda c: c["index"])
