"""Structured output on OpenAI-compatible servers that do not take every ``response_format``.

OpenAI takes ``{"type": "json_schema", ...}``; llama.cpp's servers (``llama-server``,
``python -m llama_cpp.server``) answer it with HTTP 4xx/5xx and take
``{"type": "json_object", "schema": {...}}`` instead; some servers take neither.
Repeating such a request cannot help, so the retry loop must not see it:
:class:`FormatFallback` sends, within one attempt, the request as asked, then
(after a 4xx/5xx that may mean "format not supported") the same with
``json_object`` plus the schema, then with no ``response_format`` and the schema
stated in the system message (the reply is validated after, as always). The
level that worked is remembered per endpoint (the client passes its base URL and
the model), so later requests start there; a ``json_object`` request is sent
without it once that endpoint refused ``json_object`` too.

Errors that say nothing about the format are raised as they are: 401, 403, 404,
408, 409, 429, 502, 503, 504, a context window overflow, transport failures.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Awaitable, Callable

from ..errors import APIError, BadRequestError, ContextWindowExceededError

__all__ = ["FormatFallback", "format_refused", "structured"]

log = logging.getLogger("tinyllm")
JSON_SCHEMA, JSON_OBJECT, PLAIN = 0, 1, 2
_NAMES = {JSON_SCHEMA: "json_schema", JSON_OBJECT: "json_object", PLAIN: "no response_format"}
_REFUSING_SERVER_STATUSES = (500, 501)  # what servers answer to a field they cannot handle


def format_refused(exc: BaseException) -> bool:
    """Whether an error to a structured-output request may mean "this response_format is not supported":
    a 4xx that is a bad request (400, 422, 415, ...; not a context overflow) or HTTP 500/501."""
    if isinstance(exc, ContextWindowExceededError):
        return False
    if isinstance(exc, BadRequestError) and exc.status_code is not None:
        return exc.status_code not in (401, 403, 404, 408, 409, 429)
    return isinstance(exc, APIError) and exc.status_code in _REFUSING_SERVER_STATUSES


def _level_of(fmt: Any) -> int | None:
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return JSON_SCHEMA
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return JSON_OBJECT
    return None


def structured(params: dict) -> bool:
    """Whether ``params`` ask for structured output (a json_schema or json_object ``response_format``),
    the only requests :class:`FormatFallback` may send differently."""
    return _level_of(params.get("response_format")) is not None


def _schema_of(fmt: dict) -> dict | None:
    spec = fmt.get("json_schema") if fmt.get("type") == "json_schema" else fmt
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


def _with_note(messages: list[dict], note: str) -> list[dict]:
    """``messages`` with ``note`` added to the leading system message (or one put first)."""
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def variant(messages: list[dict], params: dict, level: int) -> tuple[list[dict], dict]:
    """The request at ``level`` (JSON_SCHEMA 0: as given; JSON_OBJECT 1: ``{"type": "json_object",
    "schema": ...}``; PLAIN 2: no response_format, the schema in the system message). New lists and dicts."""
    fmt = params["response_format"]
    schema = _schema_of(fmt)
    params = dict(params)
    if level == JSON_OBJECT and _level_of(fmt) == JSON_SCHEMA:
        params["response_format"] = {"type": "json_object", **({"schema": schema} if schema is not None else {})}
    elif level == PLAIN:
        del params["response_format"]
        note = (
            "Reply with only a JSON value that matches this JSON schema, and nothing else:\n" + json.dumps(schema)
            if schema is not None
            else "Reply with only a JSON object, and nothing else."
        )
        messages = _with_note(messages, note)
    return list(messages), params


class FormatFallback:
    """Per-endpoint memory of the structured-output level a server takes, and the sending loop.

    Thread-safe. Keys are endpoint identities (e.g. the base URL); a client keeps one instance.
    """

    def __init__(self) -> None:
        self._levels: dict[str, int] = {}
        self._lock = threading.Lock()

    def level(self, endpoint: str) -> int:
        """The level requests to ``endpoint`` start at (0, json_schema, when nothing was learnt)."""
        with self._lock:
            return self._levels.get(endpoint, JSON_SCHEMA)

    def _plan(self, endpoint: str, params: dict) -> list[int]:
        """The levels to try, in order: a json_schema request walks down from the level known to work;
        a json_object request is sent plain only once json_object was seen refused (OpenAI, for one,
        refuses json_object when no message says "JSON": that is the prompt's fault, not the format's)."""
        asked, known = _level_of(params.get("response_format")), self.level(endpoint)
        if asked == JSON_SCHEMA:
            return list(range(known, PLAIN + 1))
        return [PLAIN] if asked == JSON_OBJECT and known == PLAIN else []

    def _learn(self, endpoint: str, level: int, error: BaseException) -> None:
        with self._lock:
            if self._levels.get(endpoint, JSON_SCHEMA) >= level:
                return
            self._levels[endpoint] = level
        log.warning(
            "%s refused a structured-output request (%s); sending %s from now on", endpoint, error, _NAMES[level]
        )

    def send(self, endpoint: str, messages: list[dict], params: dict, send: Callable[[list[dict], dict], Any]) -> Any:
        """``send(messages, params)``, falling back to lower levels on errors :func:`format_refused` accepts.

        Returns what ``send`` returns. Raises the last level's error, or any other
        error of ``send`` at once. Without a json_schema/json_object response_format
        it is ``send(messages, params)`` and nothing else.
        """
        levels = self._plan(endpoint, params)
        if not levels:
            return send(messages, params)
        first_error: BaseException | None = None
        for level in levels:
            try:
                result = send(*variant(messages, params, level))
            except APIError as exc:
                if level == PLAIN or not format_refused(exc):
                    raise
                first_error = first_error or exc
                continue
            if first_error is not None:
                self._learn(endpoint, level, first_error)
            return result
        raise AssertionError("unreachable")

    async def asend(
        self, endpoint: str, messages: list[dict], params: dict, send: Callable[[list[dict], dict], Awaitable[Any]]
    ) -> Any:
        """The asyncio twin of :meth:`send` (``send`` returns an awaitable)."""
        levels = self._plan(endpoint, params)
        if not levels:
            return await send(messages, params)
        first_error: BaseException | None = None
        for level in levels:
            try:
                result = await send(*variant(messages, params, level))
            except APIError as exc:
                if level == PLAIN or not format_refused(exc):
                    raise
                first_error = first_error or exc
                continue
            if first_error is not None:
                self._learn(endpoint, level, first_error)
            return result
        raise AssertionError("unreachable")
