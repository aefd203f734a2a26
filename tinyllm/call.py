"""LLMCall: a prompt file plus variables in, the reply's content (typed) out."""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .observe import _usage as usage
from .observe._calllog import aobserved, observed, watch_stream  # the call log and the call's span (observe/)
from .clients import Client, as_client
from .clients._chain import Fallbacks, check_fallbacks
from ._mcp import FrontServers, tool_sources
from .clients import get_client
from .errors import (
    ConfigError,
    ContentFilterFinishReasonError,
    LengthFinishReasonError,
    OutputParseError,
    RefusalError,
    ResponseError,
)
from .output import grammar_for, normalize_output_type, parse_output, response_format_for
from .response import Response
from .prompts._templates import Prompt, load_prompt
from .tools import Tool, ToolCall, Toolbox, as_tool, check_max_tool_rounds, check_tool_timeout, plan_tools

if TYPE_CHECKING:
    import concurrent.futures
    import os

__all__ = ["LLMCall", "plan_output", "content_of", "respond_with", "arespond_with", "RETRY_PROMPT"]

RETRY_PROMPT = (
    "Your previous reply could not be used: {error}\nAnswer again with only the requested output and nothing else."
)


def plan_output(
    prompt: Prompt | None, sender: Any, output_type: Any, output_retries: int | None, model_params: dict
) -> tuple[Any, dict, int]:
    """(normalized output_type, request params, output retries) for a call of ``prompt`` through ``sender``.

    ``output_type`` and ``output_retries`` given in code win over the front
    matter's (``output_schema:``, then ``output_type:``; ``prompt`` None: no front
    matter); ``model_params`` win over the front matter's parameters. A type given
    as ``response_format`` (``response_format=Model``, the openai SDK's habit) is
    taken as the output_type. A ``response_format`` fitting the output_type is
    added unless one is given, as ``sender.capabilities`` allows (a client that
    enforces JSON schemas by grammar, such as llama.cpp, gets one for ``list``
    too); a client that takes GBNF grammars gets a ``grammar`` for labels, numbers
    and booleans unless ``grammar`` or ``response_format`` is given.

    Raises:
        OutputParseError: an unknown output_type, or ``response_format=`` and
            ``output_type=`` naming different types.
    """
    params = {**(prompt.params if prompt is not None else {}), **model_params}
    as_format = params.get("response_format")
    if as_format is not None and not isinstance(as_format, (dict, str)):  # a type, e.g. a pydantic model
        if output_type is not None and output_type != as_format:
            raise OutputParseError(
                f"response_format={as_format!r} and output_type={output_type!r} disagree; give one of them",
                output_type=output_type,
            )
        output_type = as_format
        del params["response_format"]
    front_type = None
    if prompt is not None:
        front_type = prompt.output_schema or prompt.output_type
    kind = normalize_output_type(output_type if output_type is not None else front_type)
    if kind is not None:  # plain text (None) asks nothing of the backend
        caps = sender.capabilities
        fmt = response_format_for(kind, json_schema=caps.json_schema, json_grammar=caps.json_grammar)
        if fmt is not None and "response_format" not in params:
            params["response_format"] = fmt
        grammar = grammar_for(kind) if getattr(caps, "grammar", False) else None
        if grammar is not None and "grammar" not in params and "response_format" not in params:
            params["grammar"] = grammar
    front_retries = prompt.output_retries if prompt is not None else None
    retries = output_retries if output_retries is not None else (front_retries or 0)
    return kind, params, int(retries)


def content_of(message: dict, finish_reason: str | None = None, output_type: Any = None, response: Any = None) -> str:
    """The text of a reply's message dict, after its finish reason is checked (openai-python's rules).

    Args:
        message: the reply's message dict.
        finish_reason: the reply's (or choice's) finish reason, when known.
        output_type: the call's normalized output type (None: plain text).
        response: the call's :class:`~tinyllm.Response`, carried by the errors.

    Raises:
        LengthFinishReasonError: ``finish_reason`` is ``"length"`` and ``output_type`` is not
            plain text (a typed reply cut at max_tokens), or no text came at all (a reasoning
            model may spend every token on reasoning).
        ContentFilterFinishReasonError: ``finish_reason`` is ``"content_filter"``.
        RefusalError: the message is a refusal (``refusal`` set, no content).
        ResponseError: no text content (tool calls only).
    """
    if finish_reason == "length" and (output_type is not None or message.get("content") is None):
        usage = getattr(response, "usage", None) or {}
        raise LengthFinishReasonError(
            f"the reply was cut at max_tokens (finish_reason 'length', {usage.get('completion_tokens', '?')} completion "
            "tokens) before the typed output was complete; raise max_tokens",
            response=response,
            raw=message,
        )
    if finish_reason == "content_filter":
        raise ContentFilterFinishReasonError(
            "the server's content filter stopped the reply (finish_reason 'content_filter')",
            response=response,
            raw=message,
        )
    if message.get("refusal") and not message.get("content"):
        raise RefusalError(
            f"the model refused: {message['refusal']}", refusal=message["refusal"], response=response, raw=message
        )
    if message.get("content") is None:
        raise ResponseError("the reply has no text content (tool calls only?)", raw=message)
    return message["content"]


def _value(response: Response, output_type: Any, many: bool) -> Any:
    """The value of ``response``'s last reply: its first choice's content coerced to ``output_type``,
    or with ``many`` (the parameter ``n`` given) the list of every choice's value. Each
    :class:`~tinyllm.response.Choice` gets its ``value``.

    Raises:
        OutputParseError: a choice does not fit; the finish-reason errors of :func:`content_of`.
    """
    choices = response.choices if many else response.choices[:1]
    for choice in choices:
        choice.value = parse_output(
            content_of(choice.message, choice.finish_reason, output_type, response), output_type
        )
    return [c.value for c in choices] if many else choices[0].value


def _output_turns(conversation: list[dict], output_type: Any, retries: int, response: Response, many: bool = False):
    """The output-retry policy as a generator, shared by the sync and async front ends.

    Yields each conversation to send and is sent ``(the conversation sent, the reply's
    message dict)`` (the conversation sent may have grown by tool rounds), once the reply is
    folded into ``response``; returns ``(value, message)`` once a reply fits ``output_type``
    (with ``many``, every choice must fit). After a reply that does not fit, the next
    conversation carries it and the parse error as a user message; after ``retries`` such
    repeats the last :class:`OutputParseError` is raised. A refusal, a reply cut at max_tokens
    or stopped by the content filter raises at once (see :func:`content_of`).
    """
    for attempt in range(retries + 1):
        conversation, message = yield conversation
        try:
            return _value(response, output_type, many), message
        except OutputParseError as exc:
            if attempt == retries:
                raise
            conversation = conversation + [message, {"role": "user", "content": RETRY_PROMPT.format(error=exc)}]
    raise AssertionError("unreachable")


def _fits(output_type: Any, tools: Toolbox | None = None) -> Callable[[dict], bool]:
    """Whether a reply is usable as ``output_type`` (or, with tools, asks for tools): the cache keeps only such replies."""

    def fits(message: dict) -> bool:
        if tools and Toolbox.asks(message):
            return True
        try:
            parse_output(content_of(message), output_type)
        except (OutputParseError, ResponseError):
            return False
        return True

    return fits


# -- tool rounds (tinyllm/tools.py): a reply that asks for tools is one more turn of the conversation,
# before and apart from the output turns: the tools run, their results go back, the next reply is asked for.
def _tool_round(
    tools: Toolbox, response: Response, conversation: list[dict], message: dict, params: dict
) -> tuple[list[dict], dict]:
    """Run the tools ``message`` asks for; (the next conversation, the next params). Raises
    ToolRoundsExceededError past ``max_tool_rounds``, ToolError with ``raise_tool_errors``."""
    tools.check(len(response.tool_rounds), conversation, message, response)
    record = tools.run_round(len(response.tool_rounds), message)
    response.tool_rounds.append(record)
    return conversation + record.messages, tools.next_params(params)


async def _atool_round(
    tools: Toolbox, response: Response, conversation: list[dict], message: dict, params: dict
) -> tuple[list[dict], dict]:
    """The asyncio twin of :func:`_tool_round` (the calls run as tasks)."""
    tools.check(len(response.tool_rounds), conversation, message, response)
    record = await tools.arun_round(len(response.tool_rounds), message)
    response.tool_rounds.append(record)
    return conversation + record.messages, tools.next_params(params)


# -- end of tool rounds


@observed  # calllog: a span per call and a log row, failed calls too
def respond_with(
    sender: Client,
    response: Response,
    params: dict,
    output_type: Any,
    retries: int,
    on_reply: Callable[[dict], None] = lambda message: None,
    tools: Toolbox | None = None,
) -> Response:
    """Send ``response.messages`` through ``sender.request`` until a reply fits ``output_type``.

    Every reply is folded into ``response`` (usage summed, retries counted) and
    passed to ``on_reply`` (its message dict) as it arrives. With ``tools``, a
    reply that asks for tools is answered by running them (a tool round, recorded
    in ``response.tool_rounds``) and the conversation goes on.

    Returns:
        ``response``, complete: ``value`` coerced (with the parameter ``n`` given, the list
        of every choice's value), ``message`` the reply that fit.

    Raises:
        OutputParseError: after ``retries`` repeats (with ``n``, when any choice does not fit);
        RefusalError for a refusal; LengthFinishReasonError for a typed reply cut at
        max_tokens; ContentFilterFinishReasonError; ResponseError for an empty reply (a reply
        asking for tools when the call has none);
        ToolRoundsExceededError, ToolError (see :class:`~tinyllm.tools.Toolbox`);
        every error of ``Client.request``.
    """
    response._output_type = output_type
    turns = _output_turns(list(response.messages), output_type, retries, response, params.get("n") is not None)
    conversation = next(turns)
    accept = _fits(output_type, tools)
    while True:
        reply = sender.request(conversation, accept=accept, **params)
        response.add_reply(reply)
        on_reply(reply.message)
        if tools and tools.asks(reply.message):
            conversation, params = _tool_round(tools, response, conversation, reply.message, params)
            continue
        if tools:
            tools.check_forced(params, reply.message, sender.api_type)
        try:
            conversation = turns.send((conversation, reply.message))
        except StopIteration as done:
            return response.finish(done.value[0])


@aobserved  # calllog: a span per call and a log row, failed calls too
async def arespond_with(
    sender: Client,
    response: Response,
    params: dict,
    output_type: Any,
    retries: int,
    on_reply: Callable[[dict], None] = lambda message: None,
    tools: Toolbox | None = None,
) -> Response:
    """The asyncio twin of :func:`respond_with`, through ``sender.arequest``."""
    response._output_type = output_type
    turns = _output_turns(list(response.messages), output_type, retries, response, params.get("n") is not None)
    conversation = next(turns)
    accept = _fits(output_type, tools)
    while True:
        reply = await sender.arequest(conversation, accept=accept, **params)
        response.add_reply(reply)
        on_reply(reply.message)
        if tools and tools.asks(reply.message):
            conversation, params = await _atool_round(tools, response, conversation, reply.message, params)
            continue
        if tools:
            tools.check_forced(params, reply.message, sender.api_type)
        try:
            conversation = turns.send((conversation, reply.message))
        except StopIteration as done:
            return response.finish(done.value[0])


@contextlib.contextmanager
def _closing(tools: Toolbox | None) -> Iterator[None]:
    """Close the call's toolbox when the block ends (its MCP servers stop with their last user)."""
    try:
        yield
    finally:
        if tools is not None:
            tools.close()


class _RoundsState:
    """What a :class:`_ToolRoundsStream` shares with its generator: the last reply, and the round's stream
    (to give its slot back when the whole stream is dropped unfinished). The generator refers to the
    Response only weakly: nothing here keeps an abandoned Response, and its request slot, alive."""

    __slots__ = ("reply", "current", "__weakref__")

    def __init__(self) -> None:
        self.reply: Any = None
        self.current: Any = None

    def abandon(self) -> None:
        current = self.current
        if current is not None:
            current._abandon()


class _ToolRoundsStream:
    """Streams round after round: when a streamed reply asks for tools, they run and the next reply
    streams on (its text deltas follow). ``reply`` is the last reply once the iteration ends."""

    def __init__(
        self,
        sender: Client,
        response: Response,
        params: dict,
        accept: Callable[[dict], bool],
        tools: Toolbox,
        on_reply: Callable[[dict], None],
    ) -> None:
        self._args = (sender, weakref.ref(response), params, accept, tools, on_reply)
        self._state = _RoundsState()
        self._iter: Any = None
        self.tools = tools
        weakref.finalize(self, tools.close)  # a stream dropped unread still stops its MCP servers

    @property
    def reply(self) -> Any:
        return self._state.reply

    def __iter__(self) -> Any:
        if self._iter is None:
            self._iter = _stream_rounds(*self._args, self._state)
            weakref.finalize(self._iter, self._state.abandon)
        return self._iter

    def __aiter__(self) -> Any:
        if self._iter is None:
            self._iter = _astream_rounds(*self._args, self._state)
            weakref.finalize(self._iter, self._state.abandon)
        return self._iter

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()
        self.tools.close()  # also for a stream never read

    async def aclose(self) -> None:
        if self._iter is not None:
            await self._iter.aclose()
        self.tools.close()

    def _abandon(self) -> None:
        self._state.abandon()


def _stream_rounds(
    sender: Client,
    ref: Any,
    params: dict,
    accept: Callable[[dict], bool],
    tools: Toolbox,
    on_reply: Callable[[dict], None],
    state: _RoundsState,
) -> Any:
    """The generator behind :class:`_ToolRoundsStream`; ``ref`` is a weak reference to the Response
    (no strong one is kept across a ``yield``)."""
    conversation = list(ref().messages)
    try:
        while True:
            state.current = stream = sender.stream_request(conversation, accept=accept, **params)
            yield from stream
            done = stream.reply
            assert done is not None  # a stream that ended has its reply
            if not tools.asks(done.message):
                tools.check_forced(params, done.message, sender.api_type)
                state.reply = done
                return
            response = ref()
            if response is None:  # dropped meanwhile: nobody reads on
                return
            response.add_reply(done)
            on_reply(done.message)
            conversation, params = _tool_round(tools, response, conversation, done.message, params)
            del response
    finally:
        tools.close()  # its MCP servers: the call ends with its stream


async def _astream_rounds(
    sender: Client,
    ref: Any,
    params: dict,
    accept: Callable[[dict], bool],
    tools: Toolbox,
    on_reply: Callable[[dict], None],
    state: _RoundsState,
) -> Any:
    """The asyncio twin of :func:`_stream_rounds`."""
    conversation = list(ref().messages)
    try:
        while True:
            state.current = stream = sender.astream_request(conversation, accept=accept, **params)
            try:
                async for delta in stream:
                    yield delta
            finally:
                await stream.aclose()
            done = stream.reply
            assert done is not None  # a stream that ended has its reply
            if not tools.asks(done.message):
                tools.check_forced(params, done.message, sender.api_type)
                state.reply = done
                return
            response = ref()
            if response is None:
                return
            response.add_reply(done)
            on_reply(done.message)
            conversation, params = await _atool_round(tools, response, conversation, done.message, params)
            del response
    finally:
        tools.close()


def _open_stream(
    sender: Client,
    response: Response,
    params: dict,
    output_type: Any,
    tools: Toolbox | None,
    on_reply: Callable[[dict], None],
    asynchronous: bool,
) -> Any:
    """The stream of a streamed call: one request, or with tools round after round; the call log
    watches it when LOG_CALLS is on (one row when it ends, fails, is closed or dropped)."""
    watch_stream(sender, response, params)
    accept = _fits(output_type, tools)
    if tools:
        return _ToolRoundsStream(sender, response, params, accept, tools, on_reply)
    opener = sender.astream_request if asynchronous else sender.stream_request
    try:
        return opener(response.messages, accept=accept, **params)
    except BaseException as exc:  # refused before sending (context window, parameters): logged as a failed call
        response._ended(exc)
        raise


def _streaming(
    response: Response,
    stream: Any,
    output_type: Any,
    on_reply: Callable[[dict], None] = lambda m: None,
    on_done: Callable[[Response], None] = lambda r: None,
    many: bool = False,
) -> Response:
    """``response`` set to read ``stream``. When it ends: ``on_reply(message)``, the value is
    parsed (OutputParseError if it does not fit; with ``many``, the list of every choice's
    value), ``on_done(response)``, then it is complete."""
    response._output_type = output_type

    def done(r: Response) -> None:
        on_reply(r.message)  # type: ignore[arg-type]
        value = _value(r, output_type, many)
        on_done(r)
        r.finish(value)

    response._stream, response._on_done = stream, done
    return response


def check_model_params(model_params: dict) -> None:
    """Refuse, at construction, an ``api_key`` among the API parameters (a client setting: it would
    be kept in the call's repr and is never sent in a body) and a name that looks like a typo of a
    known parameter (``temprature=0``; OpenAI-compatible servers drop unknown ones silently).

    Raises:
        ConfigError: naming the parameter, the fix, and never the key's value.
    """
    from .prompts._templates import misspelled

    if "api_key" in model_params:
        raise ConfigError(
            "api_key is a client setting, not an API parameter: pass client=OpenAIClient(api_key=...) "
            "or set OPENAI_API_KEY"
        )
    for key in model_params:
        close = misspelled(key) if isinstance(key, str) else None
        if close:
            raise ConfigError(
                f"{key!r} is not a parameter tinyllm knows; did you mean {close!r}? "
                "(A server-specific parameter goes in extra_body={...}.)"
            )


class _LastCall(threading.local):
    """``(messages, model_output)`` of the last call completed in this thread, set as one pair
    (so a thread never sees one call's messages with another's reply)."""

    pair: tuple[list[dict] | None, dict | None] = (None, None)

    def get(self) -> tuple[list[dict] | None, dict | None]:
        return self.pair

    def set(self, messages: list[dict] | None, message: dict | None) -> None:
        self.pair = (messages, message)


class LLMCall:
    """A call to a model built from prompt templates.

    Args:
        system_template_name: e.g. ``"summarize.system.md"``, found on the
            template search path (``prompts_dir``, then ``PROMPTS_DIRS``, then
            ``./prompts``); ``NAME.system.EXT`` pairs with ``NAME.user.EXT``.
            Or a :class:`~tinyllm.prompts.Prompt` (from ``load_prompt``, or
            ``Prompt.with_texts`` for unsaved edits), used as is: never reloaded.
        user_template_name: the user template when it is not that sibling.
        output_type: how to coerce the reply (``str`` by default; ``bool``,
            ``int``, ``float``, ``dict``/``"json"``, ``list``, a list of labels,
            or a pydantic model). Overrides the front matter's ``output_type``.
        prompts_dir: a directory (or list of them) searched first.
        api_type: the registered client to use (``openai``, ``ollama``, ``azure``,
            ``llamacpp`` or a registered one); default: configured or detected.
        client: a client object to use instead (``OpenAIClient(base_url=...,
            api_key=...)``, any :class:`~tinyllm.Client`, or an object with
            ``send_message``); it carries its own settings. Not with ``api_type``.
        output_retries: how many times to repeat a call whose reply does not
            fit ``output_type``, feeding the parse error back (default: front
            matter's ``output_retries``, else 0).
        tools: functions (sync or async), pydantic models, :class:`~tinyllm.tools.Tool`
            objects or registered tool names the model may call (default: the front
            matter's ``tools:``); a reply that asks for them is answered by running
            them (see :mod:`tinyllm.tools`). ``tool_choice`` (``"auto"``, ``"required"``,
            ``"none"``, or a tool's name) passes through as a model parameter.
        max_tool_rounds: tool rounds allowed per call (default: ``MAX_TOOL_ROUNDS``, 10); an int >= 0.
        tool_timeout: seconds one tool call may run (default: ``TOOL_TIMEOUT``, 60; 0: no limit);
            a call still running then is abandoned and the model gets an error result.
        raise_tool_errors: raise :class:`~tinyllm.ToolError` when a tool call fails
            instead of sending the error text back to the model.
        on_tool_call: called with each :class:`~tinyllm.tools.ToolCall` once it ran.
        fallbacks: clients to try in turn when the client fails, after its own retries, with an
            error another client could serve (rate limit, 5xx, timeout, connection error, context
            window exceeded): :class:`~tinyllm.Client` objects, registered api_types (``"ollama"``),
            ``"API_TYPE:MODEL"``, or model names (the same client, that model). A client that keeps
            failing is skipped for a cooldown (see :class:`~tinyllm.FallbackChain`; pass one as
            ``client=`` to set the cooldown). ``Response.client`` / ``.model`` say who answered.
        **model_params: API parameters (``model``, ``temperature``,
            ``max_tokens``, ``tool_choice``, ...), above the front matter's and the config's.

    Raises:
        TemplateNotFoundError, TemplateError: at construction, when the
            templates cannot be found or parsed.
        OutputParseError: at construction, for an output_type tinyllm does not know.
        ConfigError: at construction, a tool that cannot be described; ``max_tool_rounds`` not an
            int >= 0 or ``tool_timeout`` not a number >= 0.

    :meth:`call` returns the typed value; :meth:`respond` returns the whole
    :class:`~tinyllm.Response` (usage, model, latency, retries, ...). After a
    call, :attr:`messages` and :attr:`model_output` hold the rendered messages and
    the latest reply's message dict (also of a call that then failed to parse) of
    the last call *in this thread*
    (kept for TinyTroupe code; never mixed across the threads of
    :meth:`map`): prefer the Response.
    """

    def __init__(
        self,
        system_template_name: str | Prompt,
        user_template_name: str | None = None,
        *,
        output_type: Any = None,
        prompts_dir: Any = None,
        api_type: str | None = None,
        client: Any = None,
        output_retries: int | None = None,
        tools: Iterable[Any] | None = None,
        max_tool_rounds: int | None = None,
        tool_timeout: float | None = None,
        raise_tool_errors: bool = False,
        on_tool_call: Callable[[ToolCall], None] | None = None,
        fallbacks: Iterable[Any] | None = None,
        **model_params: Any,
    ) -> None:
        if client is not None and api_type is not None:
            raise ConfigError("give either api_type= or client=, not both")
        check_model_params(model_params)
        self.client = as_client(client) if client is not None else None
        checked = check_fallbacks(fallbacks)
        self.fallbacks = Fallbacks(checked) if checked else None
        self._servers = FrontServers()
        self.tools: list[Tool] | None = [as_tool(t) for t in tools] if tools is not None else None
        self.max_tool_rounds = max_tool_rounds if max_tool_rounds is None else check_max_tool_rounds(max_tool_rounds)
        self.tool_timeout = tool_timeout if tool_timeout is None else check_tool_timeout(tool_timeout)
        self.raise_tool_errors = raise_tool_errors
        self.on_tool_call = on_tool_call
        if isinstance(system_template_name, Prompt):  # a loaded (or edited, see Prompt.with_texts) prompt, used as is
            self._carried, system_template_name = system_template_name, system_template_name.name
        self.system_template_name = system_template_name
        self.user_template_name = user_template_name
        self.prompts_dir = prompts_dir
        self.api_type = api_type
        self.output_type = output_type
        self.output_retries = output_retries
        self.model_params = model_params
        self._last = _LastCall()
        normalize_output_type(output_type)  # fail early on an unknown output_type
        self.prompt  # fail early on a missing or malformed template

    def __repr__(self) -> str:
        return f"LLMCall({self.system_template_name!r}, {self.user_template_name!r}, api_type={self.api_type!r}, model_params={self.model_params!r})"

    _carried: Prompt | None = None  # the prompt an unpickled LLMCall brought with it

    def __getstate__(self) -> dict:
        """What a pickle carries to another process or machine (a Dask worker): the prompt's
        sources and front matter as loaded now (see :meth:`Prompt.__reduce__`), the parameters,
        output type, tools, ``api_type`` and an explicit client without its API key (see
        :meth:`Client.__getstate__ <tinyllm.Client.__getstate__>`). Settings that are not the
        call's (REDIS_URL, BASE_URL, the keys, ...) come from the unpickling process's own
        configuration (environment, .env, config.ini). The per-thread last messages are not carried.

        Raises:
            TemplateNotFoundError, TemplateError: the templates cannot be loaded now.
            ConfigError: the client holds a cache object (see ``Client.__getstate__``).
        """
        state = {k: v for k, v in self.__dict__.items() if k != "_last"}
        state["_carried"] = self.prompt
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._last = _LastCall()

    @property
    def prompt(self) -> Prompt:
        """The loaded :class:`~tinyllm.prompts.Prompt` (reloaded when its files change); in an
        unpickled LLMCall, the prompt it carried (no file is read)."""
        if self._carried is not None:
            return self._carried
        return load_prompt(self.system_template_name, self.user_template_name, prompts_dir=self.prompts_dir)

    @property
    def messages(self) -> list[dict] | None:
        """The rendered messages of the last call completed in this thread (None before one)."""
        return self._last.get()[0]

    @property
    def model_output(self) -> dict | None:
        """The reply's message dict of the last call completed in this thread (None before one)."""
        return self._last.get()[1]

    def _plan(self, variables: dict) -> tuple[Any, Response, dict, Any, int, Toolbox | None]:
        prompt = self.prompt
        messages = prompt.render(variables)
        sender = self._sender()
        output_type, params, retries = plan_output(
            prompt, sender, self.output_type, self.output_retries, self.model_params
        )
        servers = self._servers.of(prompt)
        tools = (
            None
            if self.tools is None and not prompt.tools and not servers
            else plan_tools(
                self.tools,
                prompt.tools,
                self.system_template_name,
                sender,
                params,
                max_rounds=self.max_tool_rounds,
                raise_errors=self.raise_tool_errors,
                on_call=self.on_tool_call,
                front_sources=servers,
                timeout=self.tool_timeout,
            )
        )
        response = Response(messages, template=self.system_template_name, variables=dict(variables), prompt=prompt)
        return sender, response, params, output_type, retries, tools

    def _sender(self) -> Client:
        """The client of the next call: ``client``, else the registry's; with ``fallbacks``, their chain."""
        primary = self.client or get_client(self.api_type)
        return self.fallbacks.sender(primary) if self.fallbacks is not None else primary

    def render(self, **variables: Any) -> list[dict]:
        """The messages a call with ``variables`` would send, without sending anything."""
        return self.prompt.render(variables)

    def call(self, **variables: Any) -> Any:
        """Render the templates with ``variables``, send them, return the reply's content.

        Returns:
            str, or the value coerced to ``output_type``; with the API parameter ``n`` given
            (``LLMCall(..., n=3)`` or ``n: 3`` in the front matter), a list of ``n`` such values,
            one per choice (see :attr:`Response.choices <tinyllm.Response.choices>`).

        Raises:
            TemplateVariableError, TemplateSecurityError: rendering failed.
            OutputParseError: the reply does not fit ``output_type`` (after ``output_retries``).
            RefusalError: the model refused (``.refusal``, ``.response``).
            LengthFinishReasonError: a typed reply (``output_type`` not str) was cut at ``max_tokens``.
            ContentFilterFinishReasonError: the server's content filter stopped the reply.
            ResponseError: an empty reply; and every error of
            :meth:`tinyllm.Client.send_message`.
            ToolRoundsExceededError: the model still asked for tools after ``max_tool_rounds`` rounds.
            ToolError: a tool call failed, with ``raise_tool_errors``.
            TemplateError: the front matter names a tool not registered.
        """
        return self.respond(**variables).value

    async def acall(self, **variables: Any) -> Any:
        """The asyncio twin of :meth:`call`, through the client's ``arequest``."""
        return (await self.arespond(**variables)).value

    def respond(self, **variables: Any) -> Response:
        """Like :meth:`call`, but return the complete :class:`~tinyllm.Response`.

        Returns:
            Response: ``value`` (typed), ``text``, ``message``, ``messages``,
            ``usage`` (summed over retries and output retries), ``model``,
            ``finish_reason``, ``cached``, ``latency`` (seconds), ``retries``,
            ``output_retries``, ``tool_rounds`` / ``tool_calls`` (what each tool round ran).

        Raises:
            The errors of :meth:`call`.
        """
        sender, response, params, output_type, retries, tools = self._plan(variables)
        with _closing(tools):
            return respond_with(
                sender, response, params, output_type, retries, lambda m: self._last.set(response.messages, m), tools
            )

    async def arespond(self, **variables: Any) -> Response:
        """The asyncio twin of :meth:`respond`."""
        sender, response, params, output_type, retries, tools = self._plan(variables)
        with _closing(tools):
            return await arespond_with(
                sender, response, params, output_type, retries, lambda m: self._last.set(response.messages, m), tools
            )

    def stream(self, **variables: Any) -> Response:
        """Render and send as a streamed request; iterate the Response for text deltas (``str``).

        Nothing is sent until the iteration starts. The Response is complete when
        the iteration ends (``value`` parsed then; :attr:`~tinyllm.Response.partial`
        gives the JSON parsed so far meanwhile). With tools, a streamed reply that asks
        for tools runs them and the next reply streams on. Output retries do not apply: a reply
        that does not fit ``output_type`` raises OutputParseError at the end. A
        client that cannot stream answers in one piece (one delta).

        With ``LOG_CALLS`` on, the call is logged when the stream ends: complete, failed (the error
        and the partial text), closed early (``StreamClosed``) or dropped unfinished
        (``StreamAbandoned``); see docs/logging.md.

        Raises (while iterating): the errors of :meth:`call`; an error after the
        first delta carries ``.partial``, the text received so far.
        """
        sender, response, params, output_type, _, tools = self._plan(variables)
        on_reply = self._recorder(response.messages)
        if not sender.capabilities.streaming:
            with _closing(tools):
                return respond_with(sender, response, params, output_type, 0, on_reply, tools)
        return _streaming(
            response,
            _open_stream(sender, response, params, output_type, tools, on_reply, False),
            output_type,
            on_reply,
            many=params.get("n") is not None,
        )

    async def astream(self, **variables: Any) -> Response:
        """The asyncio twin of :meth:`stream`: ``async for delta in await call.astream(...)``."""
        sender, response, params, output_type, _, tools = self._plan(variables)
        on_reply = self._recorder(response.messages)
        if not sender.capabilities.streaming:
            with _closing(tools):
                return await arespond_with(sender, response, params, output_type, 0, on_reply, tools)
        return _streaming(
            response,
            _open_stream(sender, response, params, output_type, tools, on_reply, True),
            output_type,
            on_reply,
            many=params.get("n") is not None,
        )

    def _recorder(self, messages: list[dict]) -> Callable[[dict], None]:
        """``on_reply`` of a streamed call: records the last exchange. It holds the messages, not the
        Response (a Response -> on_done -> Response cycle would keep an abandoned stream's slot)."""
        return lambda m: self._last.set(messages, m)

    def _call_with(self, variables: dict) -> Any:
        return self.call(**variables)

    def map(
        self,
        inputs: Iterable[dict],
        *,
        max_workers: int | None = None,
        progress: bool = True,
        return_exceptions: bool = False,
        executor: concurrent.futures.Executor | None = None,
        chunk_size: int | None = None,
        batch_api: bool = False,
        batch_output: str | os.PathLike[str] | None = None,
    ) -> list[Any]:
        """Run :meth:`call` once per dict of variables in ``inputs``, concurrently (a :class:`tinyllm.Runner`).

        Args:
            inputs: an iterable of variable dicts, read lazily: at most
                ``2 * max_workers`` calls are pending at a time.
            max_workers: threads to use (default ``MAX_CONCURRENT_REQUESTS``);
                the client's request queue still bounds requests in flight.
            progress: show progress on stderr (done/total, rate, cache hits): a
                tqdm bar on a terminal or in a notebook, plain lines otherwise.
            return_exceptions: put a failed call's exception in its place
                instead of raising the first failure.
            executor: any :class:`concurrent.futures.Executor` to run the calls
                on (e.g. Dask's ``distributed.Client(...).get_executor()``: the
                LLMCall is then pickled with its templates, see :meth:`__getstate__`);
                default: a thread pool of ``max_workers`` threads. Another
                executor gets the inputs in chunks of ``chunk_size`` rows, each
                chunk run on ``max_workers`` threads where it lands.
            chunk_size: rows per task on an executor that is not a local thread
                pool (default 50: :data:`tinyllm.batch._runner.DISTRIBUTED_CHUNK_SIZE`).
            batch_api: send the rows through the OpenAI / Azure OpenAI Batch API at the batch
                price (a :class:`tinyllm.BatchAPIRunner`) and wait for them (polling every
                ``BATCH_POLL_INTERVAL`` seconds); ``max_workers``, ``executor`` and ``chunk_size``
                do not apply. The batches are recorded beside ``batch_output`` (a JSONL file of the
                results, one line per row, ids = positions; default: a file in the user's cache
                folder named for the template and the rows), so calling it again with the same rows
                picks up the batches already submitted instead of sending them again.
            batch_output: with ``batch_api``, the JSONL output (see above).

        Returns:
            list of results in input order.

        Raises:
            TinyLLMError: the first failure's error when ``return_exceptions`` is False
                (calls already running finish; the rest are cancelled).
            KeyboardInterrupt: on Ctrl-C: calls not yet started are cancelled,
                running ones are not waited for.
        """
        if batch_api:
            from .batch._batch_api import BatchAPIRunner

            return BatchAPIRunner(self, progress=progress).map(
                inputs, path=batch_output, return_exceptions=return_exceptions
            )
        cached_before = usage.usage_stats()["cached_calls"]
        with contextlib.ExitStack() as held:  # the MCP servers of the call stay open for the whole batch
            for source in self._tool_sources():
                held.enter_context(source)
            return self._map(inputs, max_workers, progress, return_exceptions, executor, chunk_size, cached_before)

    def _tool_sources(self) -> list:
        """The MCP servers this call's tools come from (given in code, else the front matter's)."""
        prompt = self.prompt
        return tool_sources(self.tools) if self.tools is not None else self._servers.of(prompt)

    def _map(
        self,
        inputs: Iterable[dict],
        max_workers: int | None,
        progress: bool,
        return_exceptions: bool,
        executor: Any,
        chunk_size: int | None,
        cached_before: int,
    ) -> list[Any]:
        from .batch._runner import Runner

        runner = Runner(
            self._call_with,
            executor=executor,
            max_workers=max_workers,
            chunk_size=chunk_size,
            progress=progress,
            desc=self.system_template_name,
            unit="call",
            counters=lambda: {"cached": usage.usage_stats()["cached_calls"] - cached_before},
        )
        return runner.map(inputs, return_exceptions=return_exceptions)
