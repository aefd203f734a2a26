"""LLMCall: a prompt file plus variables in, the reply's content (typed) out."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable, Iterable

from . import usage
from .clients import Client
from .clients import client as get_client
from .errors import OutputParseError, ResponseError
from .output import normalize_output_type, parse_output, response_format_for
from .templates import Prompt, load_prompt

__all__ = ["LLMCall", "plan_output", "content_of", "send_for_output", "asend_for_output", "RETRY_PROMPT"]

RETRY_PROMPT = (
    "Your previous reply could not be used: {error}\n"
    "Answer again with only the requested output and nothing else."
)


def plan_output(prompt: Prompt | None, sender: Any, output_type: Any, output_retries: int | None,
                model_params: dict) -> tuple[Any, dict, int]:
    """(normalized output_type, request params, output retries) for a call of ``prompt`` through ``sender``.

    ``output_type`` and ``output_retries`` given in code win over the front
    matter's (``prompt`` None: no front matter); ``model_params`` win over the
    front matter's parameters. A ``response_format`` fitting the output_type is
    added unless one is given (a llama.cpp backend enforces JSON schemas by
    grammar, so ``list`` gets one too).
    """
    front_type = prompt.output_type if prompt is not None else None
    kind = normalize_output_type(output_type if output_type is not None else front_type)
    params = {**(prompt.params if prompt is not None else {}), **model_params}
    fmt = response_format_for(kind, json_grammar=getattr(sender, "api_type", None) == "llamacpp")
    if fmt is not None and "response_format" not in params:
        params["response_format"] = fmt
    front_retries = prompt.output_retries if prompt is not None else None
    retries = output_retries if output_retries is not None else (front_retries or 0)
    return kind, params, int(retries)


def content_of(message: dict) -> str:
    """The text of a reply's message dict.

    Raises:
        ResponseError: a refusal (``.raw`` holds the message), or no text content (tool calls only).
    """
    if message.get("refusal") and not message.get("content"):
        raise ResponseError(f"the model refused: {message['refusal']}", raw=message)
    if message.get("content") is None:
        raise ResponseError("the reply has no text content (tool calls only?)", raw=message)
    return message["content"]


def _output_turns(conversation: list[dict], output_type: Any, retries: int):
    """The output-retry policy as a generator, shared by the sync and async front ends.

    Yields each conversation to send and is sent the reply's message dict;
    returns ``(value, message)`` once a reply fits ``output_type``. After a
    reply that does not fit, the next conversation carries it and the parse
    error as a user message; after ``retries`` such repeats the last
    :class:`OutputParseError` is raised.
    """
    for attempt in range(retries + 1):
        message = yield conversation
        try:
            return parse_output(content_of(message), output_type), message
        except OutputParseError as exc:
            if attempt == retries:
                raise
            conversation = conversation + [message, {"role": "user", "content": RETRY_PROMPT.format(error=exc)}]
    raise AssertionError("unreachable")


def _fits(output_type: Any) -> Callable[[dict], bool]:
    """Whether a reply is usable as ``output_type``: the cache keeps only such replies."""

    def fits(message: dict) -> bool:
        try:
            parse_output(content_of(message), output_type)
        except (OutputParseError, ResponseError):
            return False
        return True

    return fits


def _accept(sender: Any, output_type: Any) -> dict:
    return {"accept": _fits(output_type)} if isinstance(sender, Client) else {}  # a plain registered client may not take it


def send_for_output(sender: Any, messages: list[dict], params: dict, output_type: Any, retries: int,
                    on_reply: Callable[[dict], None] = lambda message: None) -> tuple[Any, dict]:
    """Send ``messages`` through ``sender.send_message`` until a reply fits ``output_type``.

    ``on_reply`` is called with every reply's message dict as it arrives.

    Returns:
        (the coerced value, the last reply's message dict).

    Raises:
        OutputParseError: after ``retries`` repeats; ResponseError for a
        refusal or an empty reply; every error of ``send_message``.
    """
    turns = _output_turns(list(messages), output_type, retries)
    conversation = next(turns)
    accept = _accept(sender, output_type)
    while True:
        message = sender.send_message(conversation, **accept, **params)
        on_reply(message)
        try:
            conversation = turns.send(message)
        except StopIteration as done:
            return done.value


async def asend_for_output(sender: Any, messages: list[dict], params: dict, output_type: Any, retries: int,
                           on_reply: Callable[[dict], None] = lambda message: None) -> tuple[Any, dict]:
    """The asyncio twin of :func:`send_for_output` (``asend_message``, or ``send_message`` in a thread)."""
    turns = _output_turns(list(messages), output_type, retries)
    conversation = next(turns)
    accept = _accept(sender, output_type)
    while True:
        if hasattr(sender, "asend_message"):
            message = await sender.asend_message(conversation, **accept, **params)
        else:
            message = await asyncio.to_thread(sender.send_message, conversation, **params)
        on_reply(message)
        try:
            conversation = turns.send(message)
        except StopIteration as done:
            return done.value


class LLMCall:
    """A call to a model built from prompt templates.

    Args:
        system_template_name: e.g. ``"summarize.system.md"``, found on the
            template search path (``prompts_dir``, then ``PROMPTS_DIRS``, then
            ``./prompts``); ``NAME.system.EXT`` pairs with ``NAME.user.EXT``.
        user_template_name: the user template when it is not that sibling.
        output_type: how to coerce the reply (``str`` by default; ``bool``,
            ``int``, ``float``, ``dict``/``"json"``, ``list``, a list of labels,
            or a pydantic model). Overrides the front matter's ``output_type``.
        prompts_dir: a directory (or list of them) searched first.
        api_type: the client to use (``openai``, ``ollama``, ``azure``,
            ``llamacpp`` or a registered one); default: configured or detected.
        output_retries: how many times to repeat a call whose reply does not
            fit ``output_type``, feeding the parse error back (default: front
            matter's ``output_retries``, else 0).
        **model_params: API parameters (``model``, ``temperature``,
            ``max_tokens``, ...), above the front matter's and the config's.

    Raises:
        TemplateNotFoundError, TemplateError: at construction, when the
            templates cannot be found or parsed.
        OutputParseError: at construction, for an output_type tinyllm does not know.

    After a call, :attr:`messages` holds the rendered messages and
    :attr:`model_output` the message dict the client returned.
    """

    def __init__(
        self,
        system_template_name: str,
        user_template_name: str | None = None,
        *,
        output_type: Any = None,
        prompts_dir: Any = None,
        api_type: str | None = None,
        output_retries: int | None = None,
        **model_params: Any,
    ) -> None:
        self.system_template_name = system_template_name
        self.user_template_name = user_template_name
        self.prompts_dir = prompts_dir
        self.api_type = api_type
        self.output_type = output_type
        self.output_retries = output_retries
        self.model_params = model_params
        self.messages: list[dict] | None = None
        self.model_output: dict | None = None
        normalize_output_type(output_type)  # fail early on an unknown output_type
        self.prompt  # fail early on a missing or malformed template

    def __repr__(self) -> str:
        return f"LLMCall({self.system_template_name!r}, {self.user_template_name!r}, api_type={self.api_type!r}, model_params={self.model_params!r})"

    @property
    def prompt(self) -> Prompt:
        """The loaded :class:`~tinyllm.templates.Prompt` (reloaded when its files change)."""
        return load_prompt(self.system_template_name, self.user_template_name, prompts_dir=self.prompts_dir)

    def _plan(self, variables: dict) -> tuple[Any, list[dict], dict, Any, int]:
        prompt = self.prompt
        messages = prompt.render(variables)
        sender = get_client(self.api_type)
        output_type, params, retries = plan_output(prompt, sender, self.output_type, self.output_retries, self.model_params)
        return sender, messages, params, output_type, retries

    def render(self, **variables: Any) -> list[dict]:
        """The messages a call with ``variables`` would send, without sending anything."""
        return self.prompt.render(variables)

    def _on_reply(self, message: dict) -> None:
        self.model_output = message

    def call(self, **variables: Any) -> Any:
        """Render the templates with ``variables``, send them, return the reply's content.

        Returns:
            str, or the value coerced to ``output_type``.

        Raises:
            TemplateVariableError, TemplateSecurityError: rendering failed.
            OutputParseError: the reply does not fit ``output_type`` (after ``output_retries``).
            ResponseError: a refusal or an empty reply; and every error of
            :meth:`tinyllm.Client.send_message`.
        """
        sender, messages, params, output_type, retries = self._plan(variables)
        self.messages = messages
        return send_for_output(sender, messages, params, output_type, retries, self._on_reply)[0]

    async def acall(self, **variables: Any) -> Any:
        """The asyncio twin of :meth:`call`; uses the client's ``asend_message`` when it has one."""
        sender, messages, params, output_type, retries = self._plan(variables)
        self.messages = messages
        return (await asend_for_output(sender, messages, params, output_type, retries, self._on_reply))[0]

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
                on (e.g. Dask's ``client.get_executor()``; the LLMCall is then
                pickled); default: a thread pool of ``max_workers`` threads.

        Returns:
            list of results in input order.

        Raises:
            The first failure's error when ``return_exceptions`` is False
            (calls already running finish; the rest are cancelled).
            KeyboardInterrupt on Ctrl-C: calls not yet started are cancelled,
            running ones are not waited for.
        """
        from .runner import Runner

        cached_before = usage.usage_stats()["cached_calls"]
        runner = Runner(self._call_with, executor=executor, max_workers=max_workers, progress=progress,
                        desc=self.system_template_name, unit="call",
                        counters=lambda: {"cached": usage.usage_stats()["cached_calls"] - cached_before})
        return runner.map(inputs, return_exceptions=return_exceptions)
