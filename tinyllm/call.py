"""LLMCall: a prompt file plus variables in, the reply's content (typed) out."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from typing import Any, Callable, Iterable

from . import usage
from .clients import Client, as_client
from .clients import client as get_client
from .config import get_config
from .errors import ConfigError, OutputParseError, ResponseError
from .output import grammar_for, normalize_output_type, parse_output, response_format_for
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
            raise OutputParseError(f"response_format={as_format!r} and output_type={output_type!r} disagree; give one of them",
                                   output_type=output_type)
        output_type = as_format
        del params["response_format"]
    front_type = None
    if prompt is not None:
        front_type = prompt.output_schema or prompt.output_type
    kind = normalize_output_type(output_type if output_type is not None else front_type)
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


def send_for_output(sender: Client, messages: list[dict], params: dict, output_type: Any, retries: int,
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
    accept = _fits(output_type)
    while True:
        message = sender.send_message(conversation, accept=accept, **params)
        on_reply(message)
        try:
            conversation = turns.send(message)
        except StopIteration as done:
            return done.value


async def asend_for_output(sender: Client, messages: list[dict], params: dict, output_type: Any, retries: int,
                           on_reply: Callable[[dict], None] = lambda message: None) -> tuple[Any, dict]:
    """The asyncio twin of :func:`send_for_output`, through ``sender.asend_message``."""
    turns = _output_turns(list(messages), output_type, retries)
    conversation = next(turns)
    accept = _fits(output_type)
    while True:
        message = await sender.asend_message(conversation, accept=accept, **params)
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
        api_type: the registered client to use (``openai``, ``ollama``, ``azure``,
            ``llamacpp`` or a registered one); default: configured or detected.
        client: a client object to use instead (``OpenAIClient(base_url=...,
            api_key=...)``, any :class:`~tinyllm.Client`, or an object with
            ``send_message``); it carries its own settings. Not with ``api_type``.
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
        client: Any = None,
        output_retries: int | None = None,
        **model_params: Any,
    ) -> None:
        if client is not None and api_type is not None:
            raise ConfigError("give either api_type= or client=, not both")
        self.client = as_client(client) if client is not None else None
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
        sender = self.client or get_client(self.api_type)
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

    def map(
        self,
        inputs: Iterable[dict],
        *,
        max_workers: int | None = None,
        progress: bool = True,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run :meth:`call` once per dict of variables in ``inputs``, concurrently.

        Args:
            inputs: an iterable of variable dicts.
            max_workers: threads to use (default ``MAX_CONCURRENT_REQUESTS``);
                the client's request queue still bounds requests in flight.
            progress: show a tqdm progress bar (done/total, rate, cache hits) on stderr.
            return_exceptions: put a failed call's exception in its place
                instead of raising the first failure.

        Returns:
            list of results in input order.

        Raises:
            The first failure's error when ``return_exceptions`` is False
            (calls already running finish; the rest are cancelled).
        """
        items = list(inputs)
        results: list[Any] = [None] * len(items)
        workers = max_workers or get_config().max_concurrent_requests
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=self.system_template_name, unit="call", file=sys.stderr, disable=None)
        cached_before = usage.usage_stats()["cached_calls"]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(items) or 1))) as pool:
            futures = {pool.submit(self.call, **item): i for i, item in enumerate(items)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    exc = future.exception()
                    if exc is not None and not return_exceptions:
                        raise exc
                    results[i] = exc if exc is not None else future.result()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(cached=usage.usage_stats()["cached_calls"] - cached_before, refresh=False)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            finally:
                if bar is not None:
                    bar.close()
        return results
