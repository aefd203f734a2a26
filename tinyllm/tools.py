"""Tools: Python functions (and pydantic models) a model may call during a call.

>>> @tinyllm.tool
... def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
...     '''The current weather in a city.
...
...     Args:
...         city: the city's name, e.g. "Paris".
...         unit: degrees Celsius or Fahrenheit.
...     '''
...     return f"18 {unit}, sunny"
>>> LLMCall("travel.system.md", tools=[get_weather]).call(question="Paris today?")

A :class:`Tool` has a ``name``, a ``description`` and a JSON schema of its
``parameters``, built by pydantic from the function's signature and type hints
(each parameter's description from the docstring's ``Args:`` section, read by
docstring-parser); a pydantic model is a tool too (its schema from the openai
SDK's ``pydantic_function_tool``; calling it builds the model). The arguments a
model sends are validated with the same pydantic model before the function runs.

:class:`Toolbox` holds the tools of one call and runs one *round*: every tool
call of one reply, concurrently when there are several (threads for sync
functions, asyncio tasks for async ones). A tool that raises, arguments that do
not validate and an unknown tool name are answered to the model with the error
text (so it can correct itself) and recorded, unless ``raise_tool_errors`` is
set: then :class:`~tinyllm.ToolError` is raised. Every call is recorded as a
:class:`ToolCall` (arguments, result, error, duration), every round as a
:class:`ToolRound`.

Names in a prompt's front matter (``tools: [get_weather]``) are looked up in
:data:`registry`, which ``@tinyllm.tool`` fills.

A :class:`ToolSource` (such as :class:`tinyllm.MCPServer`) stands for tools that are known
only once it is open: the Toolbox of a call opens it, offers its tools, and closes it when
the call ends (:meth:`Toolbox.close`).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ._fork import reset_in_child
from .errors import ConfigError, ToolError, ToolRoundsExceededError

if TYPE_CHECKING:
    from pydantic import BaseModel

log = logging.getLogger("tinyllm")

__all__ = [
    "Tool",
    "ToolCall",
    "ToolRound",
    "Toolbox",
    "ToolRegistry",
    "ToolSource",
    "registry",
    "tool",
    "as_tool",
    "plan_tools",
    "DEFAULT_TOOL_TIMEOUT",
    "DEFAULT_TOOL_CONCURRENCY",
]


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and hasattr(obj, "model_json_schema") and hasattr(obj, "model_validate")


def _docstring(obj: Any) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from ``obj``'s docstring (Google, reST or numpydoc style).

    A class's own docstring only (``__doc__`` of the class itself, as the openai SDK reads it),
    never one inherited from a base class such as pydantic's ``BaseModel``."""
    import docstring_parser

    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else inspect.getdoc(obj)
    text = inspect.cleandoc(own) if isinstance(own, str) else ""
    if not text:
        return "", {}
    doc = docstring_parser.parse(text)
    description = "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
    return description.strip(), {p.arg_name: p.description for p in doc.params if p.description}


class Tool:
    """A function (sync or async) or a pydantic model the model may call.

    Args:
        target: a function, or a pydantic model class (calling it validates the
            arguments into an instance, which is the result).
        name: the name the model sees (default: the function's ``__name__`` or the class name).
        description: what it does (default: a function's docstring's description, without its
            ``Args:`` section; a model's own docstring as written, as ``openai.pydantic_function_tool``
            sends it; never a docstring inherited from a base class).
        strict: send ``"strict": true`` with a strict-compatible schema (every property required,
            ``additionalProperties: false``, refs inlined where needed: the openai SDK's
            ``to_strict_json_schema``), so the API holds the arguments to the schema. Default: True
            for a pydantic model (what ``openai.pydantic_function_tool`` sends), False for a function
            (strict mode would make parameters with defaults required).

    Attributes:
        name (str): the tool's name.
        description (str): what it does.
        parameters (dict): the arguments' JSON schema.
        strict (bool): sent with ``strict: true`` (its schema made strict-compatible).
        is_async (bool): the function is a coroutine function.
        target: the function or model.

    Raises:
        ConfigError: ``target`` is neither a function nor a pydantic model; it takes
            ``*args``/``**kwargs`` or positional-only parameters; pydantic cannot
            describe a parameter's type as JSON; ``name`` is not 1-64 of ``[A-Za-z0-9_-]``.

    A Tool is callable like its target (``@tinyllm.tool`` leaves the function usable).
    """

    def __init__(
        self, target: Any, *, name: str | None = None, description: str | None = None, strict: bool | None = None
    ) -> None:
        self.target = target
        self.is_model = _is_model(target)
        if not self.is_model and not callable(target):
            raise ConfigError(f"a tool must be a function or a pydantic model, not {type(target).__name__}")
        self.name = name or getattr(target, "__name__", None) or type(target).__name__
        if not (
            isinstance(self.name, str)
            and 0 < len(self.name) <= 64
            and all(c.isalnum() or c in "_-" for c in self.name)
            and self.name.isascii()
        ):
            raise ConfigError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        doc, params_doc = _docstring(target)
        if self.is_model and description is None:  # the SDK's description: the model's own docstring as written
            own = target.__dict__.get("__doc__")
            doc = own if isinstance(own, str) else ""
        self.description = description if description is not None else doc
        self.strict = self.is_model if strict is None else bool(strict)
        self.is_async = not self.is_model and (
            inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None))
        )
        if self.is_model:
            self._args_model = target
            self.parameters = self._model_schema(target)
        else:
            self._args_model = self._arguments_model(target, params_doc)
            if self.strict:  # the SDK's public helper makes the schema strict (its to_strict_json_schema)
                import openai

                self.parameters = dict(openai.pydantic_function_tool(self._args_model)["function"]["parameters"])
            else:
                self.parameters = self._args_model.model_json_schema()
            self.parameters.pop("title", None)
        functools.update_wrapper(self, target, updated=())  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"<Tool {self.name!r} ({'model' if self.is_model else 'async function' if self.is_async else 'function'})>"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)

    def _model_schema(self, model: type[BaseModel]) -> dict:
        import openai

        if not self.strict:
            return model.model_json_schema()
        spec = openai.pydantic_function_tool(model, name=self.name, description=self.description or None)
        return dict(spec["function"]["parameters"])

    def _arguments_model(self, fn: Callable, params_doc: dict[str, str]) -> type:
        """A pydantic model of ``fn``'s parameters (types from the hints, defaults kept, descriptions from the docstring)."""
        from pydantic import ConfigDict, Field, PydanticUserError, create_model

        try:
            signature = inspect.signature(fn)
            hints = _type_hints(fn)
        except (TypeError, ValueError, NameError) as exc:
            raise ConfigError(f"tool {self.name!r}: cannot read the signature of {fn!r}: {exc}") from exc
        fields: dict[str, Any] = {}
        for pname, param in signature.parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
                raise ConfigError(
                    f"tool {self.name!r}: parameter {pname!r} is {param.kind.description}; "
                    "a tool's parameters must be passable by name"
                )
            annotation = hints.get(pname, Any)
            default = ... if param.default is param.empty else param.default
            fields[pname] = (annotation, Field(default, description=params_doc.get(pname)))
        try:
            model = create_model(
                f"{self.name}_arguments", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=False), **fields
            )
            model.model_json_schema()
        except (PydanticUserError, TypeError, ValueError, NameError) as exc:
            raise ConfigError(f"tool {self.name!r}: pydantic cannot describe its parameters as JSON: {exc}") from exc
        return model

    def spec(self) -> dict:
        """The ``tools`` entry of a chat request: ``{"type": "function", "function": {name, description, parameters}}``,
        with ``"strict": true`` for a strict tool (for a pydantic model, what ``openai.pydantic_function_tool`` gives)."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.strict:
            function["strict"] = True
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}

    def validate(self, arguments: Any) -> Any:
        """The validated arguments: a dict of keyword arguments for a function, the model instance for a model.

        Args:
            arguments: the decoded JSON arguments (a dict), or the JSON text.

        Raises:
            ValueError: the text is not JSON, or not an object; pydantic's ValidationError
                (a ValueError) when the arguments do not fit the schema.
        """
        if isinstance(arguments, str):
            arguments = json.loads(arguments or "{}")
        if not isinstance(arguments, dict):
            raise ValueError(f"the arguments must be a JSON object, not {type(arguments).__name__}")
        instance = self._args_model.model_validate(arguments)
        if self.is_model:
            return instance
        return {name: getattr(instance, name) for name in type(instance).model_fields}

    def run(self, arguments: Any) -> Any:
        """Validate ``arguments`` and run the tool in this thread (an async function in its own event loop).

        Returns what the function returns (a model tool: the instance). Raises what
        :meth:`validate` or the function raises.
        """
        return self.invoke(self.validate(arguments))

    async def arun(self, arguments: Any) -> Any:
        """The asyncio twin of :meth:`run`: an async function is awaited, a sync one runs in a worker thread."""
        return await self.ainvoke(self.validate(arguments))

    def invoke(self, validated: Any) -> Any:
        """Run the tool on arguments :meth:`validate` returned (an async function in its own event loop)."""
        if self.is_model:
            return validated
        if self.is_async:
            import asyncio  # `import tinyllm` does not import asyncio

            return asyncio.run(self.target(**validated))
        return self.target(**validated)

    async def ainvoke(self, validated: Any) -> Any:
        """The asyncio twin of :meth:`invoke`."""
        if self.is_model:
            return validated
        if self.is_async:
            return await self.target(**validated)
        import asyncio

        return await asyncio.to_thread(self.target, **validated)


def _type_hints(fn: Callable) -> dict[str, Any]:
    import typing

    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
    return typing.get_type_hints(target, include_extras=True)


class ToolSource:
    """Tools known once the source is open (an MCP server): a call opens it, takes its tools, closes it.

    Subclasses implement :meth:`open` (returns self; nests: each open is matched by a close),
    :meth:`close` and :meth:`tools` (the open source's :class:`Tool` objects).
    """

    def open(self) -> "ToolSource":
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def tools(self) -> list[Tool]:
        raise NotImplementedError


def as_tool(obj: Any, names: "ToolRegistry | None" = None) -> Any:
    """``obj`` as a :class:`Tool`: a Tool as is, a function or pydantic model wrapped, a str looked up in ``names``;
    a :class:`ToolSource` (an MCP server) is returned as is (its tools are known once it is open).

    Raises:
        ConfigError: an unknown name, or anything else (e.g. a raw ``{"type": "function", ...}`` dict).
    """
    if isinstance(obj, (Tool, ToolSource)):
        return obj
    if isinstance(obj, str):
        return (names or registry).get(obj)
    if isinstance(obj, dict):
        raise ConfigError(
            "tools must be functions, pydantic models, Tool objects or registered tool names; "
            "a raw tool dict has nothing to run (send it with Client.request(tools=[...]) instead)"
        )
    return Tool(obj)


class ToolRegistry:
    """Tools by name, for prompt front matter (``tools: [get_weather]``). Thread-safe."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._new_lock()
        reset_in_child(self._new_lock)  # a lock held at fork() is released in the child

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def register(
        self, obj: Any, *, name: str | None = None, description: str | None = None, strict: bool | None = None
    ) -> Tool:
        """Register ``obj`` (a function, a pydantic model or a Tool) and return its Tool; a name given again is replaced."""
        found = (
            obj
            if isinstance(obj, Tool) and name is None and description is None and strict is None
            else Tool(obj.target if isinstance(obj, Tool) else obj, name=name, description=description, strict=strict)
        )
        with self._lock:
            self._tools[found.name] = found
        return found

    def get(self, name: str) -> Tool:
        """The tool registered as ``name`` (in :data:`registry`, a name not found loads the installed
        plugins once per process and is looked up again).

        Raises:
            ConfigError: no tool has that name (the message lists the registered names).
        """
        with self._lock:
            found = self._tools.get(name)
            known = sorted(self._tools)
        if found is None and self is registry:  # a plugin may add it: load them (once per process) and look again
            from .clients._plugins import load_plugins, loaded

            if not loaded():
                load_plugins()
                return self.get(name)
        if found is None:
            raise ConfigError(
                f"no tool named {name!r} is registered (with @tinyllm.tool); registered: {', '.join(known) or 'none'}"
            )
        return found

    def unregister(self, name: str) -> None:
        """Forget ``name`` (no-op when unknown)."""
        with self._lock:
            self._tools.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        with self._lock:
            return sorted(self._tools)


#: the registry ``@tinyllm.tool`` fills and front matter names are looked up in
registry = ToolRegistry()


def tool(
    target: Any = None, *, name: str | None = None, description: str | None = None, strict: bool | None = None
) -> Any:
    """Decorator: make a function (or pydantic model) a :class:`Tool` and register it by name.

    ``@tool`` or ``@tool(name="weather", description="...", strict=True)`` (see :class:`Tool`).
    Returns the Tool, which stays callable like the function. Raises ConfigError as :class:`Tool`.
    """
    if target is None:
        return lambda t: registry.register(t, name=name, description=description, strict=strict)
    return registry.register(target, name=name, description=description, strict=strict)


# -- records -----------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One tool call the model asked for, and what running it gave.

    Attributes:
        id (str): the call's id (sent back with the result).
        name (str): the tool's name as the model wrote it.
        arguments (dict | None): the arguments as the model sent them, decoded (None: not valid JSON).
        raw_arguments (str): the arguments' JSON text as sent.
        result (object): what the tool returned (None after an error).
        content (str): what went back to the model (the result as text, or the error text).
        error (str | None): the error text when the call failed (unknown tool, invalid arguments, the tool raised).
        duration (float): seconds the call took (validation included).
        round (int): the tool round (0 first).
    """

    id: str
    name: str
    arguments: dict | None
    raw_arguments: str
    result: Any = None
    content: str = ""
    error: str | None = None
    duration: float = 0.0
    round: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (the result as its text, ``content``)."""
        return {
            "id": self.id,
            "name": self.name,
            "arguments": self.arguments,
            "raw_arguments": self.raw_arguments,
            "content": self.content,
            "error": self.error,
            "duration": self.duration,
            "round": self.round,
        }


@dataclass
class ToolRound:
    """One tool round: a reply that asked for tools, and the calls run for it.

    Attributes:
        index (int): 0 for the first round.
        message (dict): the assistant message that asked (as sent back to the model).
        calls (list[ToolCall]): in the order the model asked for them.
        duration (float): seconds the whole round took (the calls ran concurrently).
    """

    index: int
    message: dict
    calls: list[ToolCall] = field(default_factory=list)
    duration: float = 0.0

    @property
    def messages(self) -> list[dict]:
        """The messages this round adds to the conversation: the assistant message, then one ``tool`` message per call."""
        return [self.message, *({"role": "tool", "tool_call_id": c.id, "content": c.content} for c in self.calls)]

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "duration": self.duration, "calls": [c.as_dict() for c in self.calls]}


def _result_text(value: Any) -> str:
    """A tool's return value as the text sent back: a str as is, anything else as JSON.

    JSON by pydantic's encoder (models, dataclasses, dates, sets, bytes, ...); a value inside it
    that JSON has no form for (an arbitrary object) is written as its ``str()``, a JSON string;
    a value the encoder cannot walk at all (keys that are not str, nesting too deep) is sent as
    one JSON string of its ``str()``. The text sent is always valid JSON (or the str returned).
    """
    if isinstance(value, str):
        return value
    from pydantic_core import PydanticSerializationError, to_json

    try:
        return to_json(value, serialize_unknown=True).decode("utf-8")
    except (PydanticSerializationError, TypeError, ValueError, RecursionError):
        try:
            text = str(value)
        except Exception:  # noqa: BLE001 - a __str__ that fails: say what it was
            text = f"<{type(value).__name__} object>"
        return json.dumps(text)


def _validation_text(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(
                f"{'.'.join(map(str, e.get('loc', ()))) or '(arguments)'}: {e.get('msg')}" for e in errors()
            )
        except (TypeError, AttributeError):  # a ValidationError raised by hand
            pass
    return str(exc)


#: seconds one tool call may run by default (the ``TOOL_TIMEOUT`` setting's default)
DEFAULT_TOOL_TIMEOUT = 60.0
#: tool calls of one reply that run at once by default (the ``TOOL_CONCURRENCY`` setting's default)
DEFAULT_TOOL_CONCURRENCY = 8


# -- one round -----------------------------------------------------------------------------------------


class Toolbox:
    """The tools of one call, its round limit and its error policy.

    Args:
        tools: :class:`Tool` objects (or what :func:`as_tool` takes).
        max_rounds (int): tool rounds allowed; a reply that asks for tools after that many
            raises :class:`~tinyllm.ToolRoundsExceededError`.
        raise_errors (bool): raise :class:`~tinyllm.ToolError` instead of telling the model.
        on_call: called with each finished :class:`ToolCall` (the CLI prints them).
        timeout (float): seconds one tool call may run (0: no limit; default
            :data:`DEFAULT_TOOL_TIMEOUT`, the ``TOOL_TIMEOUT`` setting's default). A call still
            running then is abandoned (Python cannot stop a thread; it runs on in a daemon
            thread) and the model gets an error result saying it timed out.
        concurrency (int): tool calls of one reply that run at once (default
            :data:`DEFAULT_TOOL_CONCURRENCY`); the rest wait their turn. A reply asking for 400
            calls starts at most this many threads (plus any abandoned after a timeout).

    Raises:
        ConfigError: two tools with one name; ``max_rounds`` not an int >= 0, ``timeout`` not
            a number >= 0, ``concurrency`` not an int >= 1; what :func:`as_tool` raises.
    """

    def __init__(
        self,
        tools: Iterable[Any],
        *,
        max_rounds: int = 10,
        raise_errors: bool = False,
        on_call: Callable[[ToolCall], None] | None = None,
        timeout: float = DEFAULT_TOOL_TIMEOUT,
        concurrency: int = DEFAULT_TOOL_CONCURRENCY,
    ) -> None:
        self.tools: dict[str, Tool] = {}
        self.max_rounds = check_max_tool_rounds(max_rounds)
        self.timeout = check_tool_timeout(timeout)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"tool_concurrency must be an int >= 1, got {concurrency!r}")
        self.concurrency = concurrency
        self.sources: list[ToolSource] = []  # opened here, closed by close()
        try:
            for t in tools:
                found = as_tool(t)
                if isinstance(found, ToolSource):
                    self.sources.append(found.open())
                    self._add(found.tools())
                else:
                    self._add([found])
        except BaseException:
            self.close()
            raise
        self.raise_errors = raise_errors
        self.on_call = on_call
        self._warned_unforced = False

    def _add(self, tools: Iterable[Tool]) -> None:
        for found in tools:
            if found.name in self.tools and self.tools[found.name] is not found:
                raise ConfigError(f"two tools are named {found.name!r}")
            self.tools[found.name] = found

    def close(self) -> None:
        """Close the tool sources this toolbox opened (an MCP server's process stops with its last user)."""
        sources, self.sources = self.sources, []
        for source in reversed(sources):
            source.close()

    def __bool__(self) -> bool:
        return bool(self.tools)

    def specs(self) -> list[dict]:
        """The request's ``tools`` parameter."""
        return [t.spec() for t in self.tools.values()]

    @staticmethod
    def asks(message: dict) -> bool:
        """Whether a reply's message asks for tool calls."""
        return bool(message.get("tool_calls"))

    @staticmethod
    def next_params(params: dict) -> dict:
        """The parameters of the request after a tool round: a forced ``tool_choice`` (``required`` or a
        named tool) applies to the first round only and becomes ``auto`` (as the OpenAI Agents SDK's
        ``reset_tool_choice``), so a forced call cannot repeat forever."""
        choice = params.get("tool_choice")
        if choice is None or choice in ("auto", "none"):
            return params
        return {**params, "tool_choice": "auto"}

    def check_forced(self, params: dict, message: dict, api_type: str = "") -> None:
        """Log a WARNING (once per call) when a forced ``tool_choice`` (``required`` or a named tool)
        came back with no tool call: the server ignored it. llama.cpp's server (``llama_cpp.server``)
        does so, and so may other OpenAI-compatible servers; the reply is used as it is."""
        choice = params.get("tool_choice")
        if self._warned_unforced or choice is None or choice in ("auto", "none") or self.asks(message):
            return
        self._warned_unforced = True
        shown = choice if isinstance(choice, str) else (choice.get("function") or {}).get("name", choice)
        log.warning(
            "tool_choice=%r was sent but the %s reply has no tool call: the server ignores a forced tool "
            "choice (llama.cpp's server does); the reply is used as it is",
            shown,
            api_type or "client's",
        )

    def check(self, rounds: int, conversation: list[dict], message: dict, response: Any = None) -> None:
        """Raise ToolRoundsExceededError when ``rounds`` rounds ran already and ``message`` asks for more."""
        if rounds >= self.max_rounds:
            raise ToolRoundsExceededError(
                f"the model still asked for tools after {rounds} tool rounds (max_tool_rounds={self.max_rounds}); "
                f"it asked for: {', '.join(_call_name(c) for c in message.get('tool_calls') or [])}",
                messages=[*conversation, message],
                rounds=rounds,
                response=response,
            )

    def _prepare(
        self, index: int, message: dict
    ) -> tuple[ToolRound, list[tuple[ToolCall, Tool | None, Exception | None]]]:
        calls = message.get("tool_calls") or []
        sent_back: dict[str, Any] = {"role": "assistant", "content": message.get("content"), "tool_calls": []}
        work = []
        for i, raw in enumerate(calls):
            function = raw.get("function") if isinstance(raw, dict) else None
            function = function if isinstance(function, dict) else {}
            name = str(function.get("name") or "")
            text = function.get("arguments")
            text = text if isinstance(text, str) else json.dumps(text if text is not None else {})
            call_id = (raw.get("id") if isinstance(raw, dict) else None) or f"call_{index}_{i}"
            sent_back["tool_calls"].append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}
            )
            record = ToolCall(id=call_id, name=name, arguments=None, raw_arguments=text, round=index)
            problem: Exception | None = None
            try:
                decoded = json.loads(text or "{}")
                record.arguments = decoded if isinstance(decoded, dict) else None
            except ValueError as exc:
                problem = ValueError(f"the arguments are not valid JSON ({exc})")
            found = self.tools.get(name)
            if found is None:
                problem = LookupError(f"there is no tool named {name!r}; the tools are: {', '.join(self.tools)}")
            work.append((record, found, problem))
        return ToolRound(index=index, message=sent_back), work

    def _done(
        self, record: ToolCall, duration: float, value: Any = None, exc: BaseException | None = None, text: str = ""
    ) -> ToolCall:
        record.duration = duration
        if exc is None:
            record.result, record.content = value, _result_text(value)
        else:
            record.error, record.content = text, f"Error: {text}"
        if self.on_call is not None:
            self.on_call(record)
        if exc is not None and self.raise_errors:
            raise ToolError(
                f"tool call {record.name}({record.raw_arguments[:200]}) failed: {record.error}", call=record
            ) from exc
        return record

    def _validate(
        self, record: ToolCall, found: Tool | None, problem: Exception | None
    ) -> tuple[Any, Exception | None, str]:
        """(validated arguments, the exception, its text for the model) before running."""
        if problem is not None:
            return (
                None,
                problem,
                (
                    str(problem)
                    if isinstance(problem, LookupError)
                    else f"invalid arguments for {record.name}: {problem}"
                ),
            )
        try:
            return found.validate(record.raw_arguments), None, ""  # type: ignore[union-attr]
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            return None, exc, f"invalid arguments for {record.name}: {_validation_text(exc)}"

    def _execute(self, record: ToolCall, found: Tool | None, problem: Exception | None) -> tuple:
        """Validate and run one call (in a worker thread, which never changes ``record``):
        (value, exception, its text for the model, seconds taken)."""
        started = time.perf_counter()
        validated, exc, text = self._validate(record, found, problem)
        if exc is not None:
            return None, exc, text, time.perf_counter() - started
        try:
            return found.invoke(validated), None, "", time.perf_counter() - started  # type: ignore[union-attr]
        except Exception as exc:  # the tool's own failure goes back to the model
            return None, exc, f"{record.name} raised {type(exc).__name__}: {exc}", time.perf_counter() - started

    async def _aexecute(self, record: ToolCall, found: Tool | None, problem: Exception | None) -> tuple:
        """The asyncio twin of :meth:`_execute`: an async tool is awaited, a sync one runs in a daemon thread."""
        import asyncio
        import contextvars

        started = time.perf_counter()
        validated, exc, text = self._validate(record, found, problem)
        if exc is not None:
            return None, exc, text, time.perf_counter() - started
        try:
            if found.is_async or found.is_model:  # type: ignore[union-attr]
                value = await found.ainvoke(validated)  # type: ignore[union-attr]
            else:  # not asyncio's default executor: a hung tool would hold up asyncio.run's exit
                context = contextvars.copy_context()
                value = await asyncio.wrap_future(_in_daemon_thread(context.run, found.invoke, validated))  # type: ignore[union-attr]
            return value, None, "", time.perf_counter() - started
        except Exception as exc:
            return None, exc, f"{record.name} raised {type(exc).__name__}: {exc}", time.perf_counter() - started

    def _timed_out(self, record: ToolCall) -> tuple:
        exc = TimeoutError(f"{record.name} did not finish within tool_timeout={self.timeout:g} s")
        return None, exc, f"{exc}; it was abandoned, no result", self.timeout

    def run_round(self, index: int, message: dict) -> ToolRound:
        """Run every tool call of ``message``: in daemon threads, at most :attr:`concurrency` at once,
        each for at most :attr:`timeout` seconds; the round's record (calls in the order asked).

        Raises:
            ToolError: a call failed (or timed out) and ``raise_errors`` is set.
        """
        import concurrent.futures
        import contextvars

        started = time.perf_counter()
        record, work = self._prepare(index, message)
        outcomes: list[Any] = [None] * len(work)
        waiting = list(range(len(work)))[::-1]  # popped from the end: in order
        running: dict[concurrent.futures.Future, tuple[int, float | None]] = {}
        while waiting or running:
            while waiting and len(running) < self.concurrency:
                i = waiting.pop()
                context = contextvars.copy_context()  # the caller's budgets and settings go along
                future = _in_daemon_thread(context.run, self._execute, *work[i])
                running[future] = (i, time.monotonic() + self.timeout if self.timeout else None)
            deadlines = [d for _, d in running.values() if d is not None]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            concurrent.futures.wait(list(running), timeout=wait, return_when=concurrent.futures.FIRST_COMPLETED)
            now = time.monotonic()
            for future, (i, deadline) in list(running.items()):
                if future.done():
                    outcomes[i] = future.result()
                elif deadline is not None and now >= deadline:
                    outcomes[i] = self._timed_out(work[i][0])  # the thread is left to finish on its own
                else:
                    continue
                del running[future]
        record.calls = [self._finish(work[i][0], *outcomes[i]) for i in range(len(work))]
        record.duration = time.perf_counter() - started
        return record

    async def arun_round(self, index: int, message: dict) -> ToolRound:
        """The asyncio twin of :meth:`run_round`: the calls run as concurrent tasks (sync tools in
        daemon threads), at most :attr:`concurrency` at once, each for at most :attr:`timeout` seconds."""
        import asyncio

        started = time.perf_counter()
        record, work = self._prepare(index, message)
        turns = asyncio.Semaphore(self.concurrency)

        async def one(w: tuple[ToolCall, Tool | None, Exception | None]) -> tuple:
            async with turns:
                try:
                    return await asyncio.wait_for(self._aexecute(*w), self.timeout or None)
                except asyncio.TimeoutError:
                    return self._timed_out(w[0])

        outcomes = await asyncio.gather(*(one(w) for w in work))
        record.calls = [self._finish(w[0], *o) for w, o in zip(work, outcomes)]
        record.duration = time.perf_counter() - started
        return record

    def _finish(self, record: ToolCall, value: Any, exc: Exception | None, text: str, duration: float) -> ToolCall:
        """:meth:`_done` for an outcome of :meth:`_execute` (in the calling thread: ``on_call`` runs there)."""
        return self._done(record, duration, value) if exc is None else self._done(record, duration, exc=exc, text=text)


def check_max_tool_rounds(value: Any) -> int:
    """``value`` if it is an int >= 0 (tool rounds allowed); else ConfigError (``-1`` is not "no limit")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"max_tool_rounds must be an int >= 0 (0: no tool round), got {value!r}")
    return value


def check_tool_timeout(value: Any) -> float:
    """``value`` as float seconds if it is a number >= 0 (0: no limit); else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ConfigError(f"tool_timeout must be a number of seconds >= 0 (0: no limit), got {value!r}")
    return float(value)


def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a new daemon thread; its ``concurrent.futures.Future``. A daemon thread, not a
    pool's: a tool abandoned after its timeout must not hold up the interpreter's exit."""
    import concurrent.futures

    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(exc)

    threading.Thread(target=run, name="tinyllm-tool", daemon=True).start()
    return future


def plan_tools(
    given: Iterable[Any] | None,
    front_names: list[str] | None,
    template: str | None,
    sender: Any,
    params: dict,
    *,
    max_rounds: int | None = None,
    raise_errors: bool = False,
    on_call: Callable[[ToolCall], None] | None = None,
    front_sources: list | None = None,
    timeout: float | None = None,
) -> Toolbox | None:
    """The :class:`Toolbox` of one call, and its ``tools`` / ``tool_choice`` request parameters set in ``params``.

    Args:
        given: tools given in code (win over the front matter's); None: the front matter's.
        front_names: the prompt's front matter ``tools:`` (names looked up in :data:`registry`).
        front_sources: the prompt's front matter ``mcp_servers:`` as :class:`ToolSource` objects
            (used, like ``front_names``, only when ``given`` is None).
        template: the prompt's name, for error messages.
        sender: the client (its ``capabilities.tools`` must be True).
        params: the request parameters (changed in place: ``tools`` set; a ``tool_choice``
            that is a bare tool name becomes ``{"type": "function", "function": {"name": ...}}``).
        max_rounds: tool rounds allowed (default: the client's ``MAX_TOOL_ROUNDS`` setting).
        timeout: seconds one tool call may run (default: the client's ``TOOL_TIMEOUT`` setting, 60; 0: no limit).

    Returns:
        None when the call has no tools. A Toolbox that opened tool sources must be closed
        (:meth:`Toolbox.close`) when the call ends.

    Raises:
        TemplateError: a front-matter name no tool is registered as (the message names the template).
        ConfigError: the client does not take tools; a tool that cannot be described;
            a ``tool_choice`` naming no tool of the call.
    """
    if given is None and not front_names and not front_sources:
        return None
    if given is not None:
        chosen = list(given)
    else:
        chosen = list(front_sources or ())
        for name in front_names or ():
            try:
                chosen.append(registry.get(name))
            except ConfigError as exc:
                from .errors import TemplateError

                raise TemplateError(f"{template}: front matter 'tools' names {name!r}, but {exc}") from None
    if not chosen:
        return None
    if not getattr(sender.capabilities, "tools", False):
        raise ConfigError(f"the {sender.api_type!r} client does not take tools (its capabilities say tools=False)")
    cfg = sender.settings()
    if max_rounds is None:
        max_rounds = cfg.max_tool_rounds
    box = Toolbox(
        chosen,
        max_rounds=max_rounds,
        raise_errors=raise_errors,
        on_call=on_call,
        timeout=cfg.tool_timeout if timeout is None else timeout,
        concurrency=cfg.tool_concurrency,
    )
    if not box:  # sources with no tools: nothing to offer
        box.close()
        return None
    try:
        _set_tool_params(box, params)
    except BaseException:
        box.close()
        raise
    return box


def _set_tool_params(box: Toolbox, params: dict) -> None:
    params["tools"] = box.specs()
    choice = params.get("tool_choice")
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        choice = params["tool_choice"] = {"type": "function", "function": {"name": choice}}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if name not in box.tools:
            raise ConfigError(
                f"tool_choice names {name!r}, which is not one of this call's tools: {', '.join(box.tools)}"
            )


def _call_name(call: Any) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    return str(function.get("name")) if isinstance(function, dict) else "?"
