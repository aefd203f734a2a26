"""LLMChat: a conversation with a model; each turn sends the whole history.

>>> chat = LLMChat(system="You are a terse assistant.", temperature=0)
>>> chat.say("Name a prime number.")          # -> str, the reply's content
>>> chat.say("And the next one?")             # the model sees both turns
>>> chat.history                              # [system, user, assistant, user, assistant]

Or from prompt files, like :class:`~tinyllm.LLMCall`:

>>> chat = LLMChat("translate.system.md")     # pairs with translate.user.md
>>> chat.say(text="Good morning", target_language="French")
>>> chat.say(text="Good night")               # variables given before are remembered

The system message and the front matter's ``messages:`` (few-shot examples)
are rendered once, by the first turn (or the first after :meth:`LLMChat.reset`,
i.e. whenever :attr:`LLMChat.history` is empty); later turns render only the
user template. A turn changes :attr:`LLMChat.history` only when it succeeds.
"""

from __future__ import annotations

from typing import Any, Iterable

from .call import _closing, _open_stream, _streaming, arespond_with, check_model_params, plan_output, respond_with
from .clients import Client, as_client
from .clients._chain import Fallbacks, check_fallbacks
from .clients import get_client
from .errors import ConfigError
from .output import normalize_output_type
from .response import Response
from .prompts._templates import Prompt, load_prompt
from ._mcp import FrontServers, tool_sources
from .tools import as_tool, check_max_tool_rounds, check_tool_timeout, plan_tools

__all__ = ["LLMChat"]


class LLMChat:
    """A multi-turn conversation: the history grows by a user and an assistant message per turn.

    Args:
        system_template_name: a system template (``"NAME.system.md"``), found
            on the template search path as for :class:`~tinyllm.LLMCall`; its
            sibling ``NAME.user.md`` (or ``user_template_name``) renders each
            user turn. None: no template (see ``system``).
        user_template_name: the user template when it is not that sibling.
        system: a plain system message (used as is, not rendered), instead of a
            template. Neither given: the conversation has no system message.
        output_type: how to coerce each reply, as for LLMCall (``str`` by
            default; ``bool``, ``int``, ``float``, ``dict``/``"json"``,
            ``list``, a list of labels, a pydantic model); default: the front
            matter's ``output_type``.
        prompts_dir: a directory (or list of them) searched first for templates.
        api_type: the registered client to use; default: forced, configured or detected.
        client: a client object to use instead (see :class:`~tinyllm.LLMCall`).
        output_retries: how many times to repeat a turn whose reply does not
            fit ``output_type``, feeding the parse error back (the failed
            exchange is not kept in the history); default: front matter's, else 0.
        tools, max_tool_rounds, tool_timeout, raise_tool_errors, on_tool_call: tools the model may
            call, as for :class:`~tinyllm.LLMCall`; a turn's tool rounds (the assistant's
            tool requests and the ``tool`` results) are kept in the history.
        fallbacks: clients to try in turn when the client fails, as for :class:`~tinyllm.LLMCall`.
        **model_params: API parameters (``model``, ``temperature``,
            ``max_tokens``, ...), above the front matter's and the config's.

    Attributes:
        history (list[dict]): the messages so far (``{"role", "content"}``
            dicts; assistant messages as the client returned them). Assign a
            saved list to resume a conversation.
        variables (dict): template variables remembered from earlier turns.
        model_output (dict | None): the last reply's message dict.

    Raises:
        TypeError: both ``system_template_name`` and ``system`` given.
        TemplateNotFoundError, TemplateError: the templates cannot be found or parsed.
        OutputParseError: an output_type tinyllm does not know.

    Not thread-safe: one conversation is driven by one thread or task at a time.
    """

    def __init__(
        self,
        system_template_name: str | None = None,
        user_template_name: str | None = None,
        *,
        system: str | None = None,
        output_type: Any = None,
        prompts_dir: Any = None,
        api_type: str | None = None,
        client: Any = None,
        output_retries: int | None = None,
        tools: Any = None,
        max_tool_rounds: int | None = None,
        tool_timeout: float | None = None,
        raise_tool_errors: bool = False,
        on_tool_call: Any = None,
        fallbacks: Iterable[Any] | None = None,
        **model_params: Any,
    ) -> None:
        if client is not None and api_type is not None:
            raise ConfigError("give either api_type= or client=, not both")
        check_model_params(model_params)
        if system_template_name is not None and system is not None:
            raise TypeError("give either system_template_name or system=, not both")
        if system_template_name is None and user_template_name is not None:
            raise TypeError("user_template_name needs a system_template_name")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a str, not {type(system).__name__}")
        self.system_template_name = system_template_name
        self.user_template_name = user_template_name
        self.system = system
        self.output_type = output_type
        self.prompts_dir = prompts_dir
        self.api_type = api_type
        self.client = as_client(client) if client is not None else None
        checked = check_fallbacks(fallbacks)
        self.fallbacks = Fallbacks(checked) if checked else None
        self._servers = FrontServers()
        self._held: list = []  # MCP servers this chat keeps open between turns (see close())
        self.output_retries = output_retries
        self.tools = [as_tool(t) for t in tools] if tools is not None else None
        self.max_tool_rounds = max_tool_rounds if max_tool_rounds is None else check_max_tool_rounds(max_tool_rounds)
        self.tool_timeout = tool_timeout if tool_timeout is None else check_tool_timeout(tool_timeout)
        self.raise_tool_errors = raise_tool_errors
        self.on_tool_call = on_tool_call
        self.model_params = model_params
        self.history: list[dict] = []
        self.variables: dict[str, Any] = {}
        self.model_output: dict | None = None
        normalize_output_type(output_type)  # fail early on an unknown output_type
        self.prompt  # fail early on a missing or malformed template

    def __repr__(self) -> str:
        source = repr(self.system_template_name) if self.system_template_name else f"system={self.system!r:.40}"
        return (
            f"LLMChat({source}, turns={sum(m.get('role') == 'user' for m in self.history)}, api_type={self.api_type!r})"
        )

    @property
    def prompt(self) -> Prompt | None:
        """The loaded :class:`~tinyllm.prompts.Prompt`, or None for a chat without templates."""
        if self.system_template_name is None:
            return None
        return load_prompt(self.system_template_name, self.user_template_name, prompts_dir=self.prompts_dir)

    # -- building a turn -----------------------------------------------------------
    def _seed(self, prompt: Prompt | None, variables: dict) -> list[dict]:
        """The messages that open the conversation: system and few-shot messages."""
        if prompt is None:
            return [{"role": "system", "content": self.system}] if self.system is not None else []
        # Without the user body (a turn may give text instead of its variables); the
        # few-shot messages of either file's front matter are kept.
        return prompt.render(variables, include_user=False)

    def _user(self, prompt: Prompt | None, text: str | None, variables: dict) -> dict:
        if text is not None:
            if not isinstance(text, str):
                raise TypeError(f"text must be a str or None, not {type(text).__name__}")
            return {"role": "user", "content": text}
        if prompt is None or prompt.user_path is None:
            raise TypeError("say() needs the user's text: this chat has no user template to render")
        user = load_prompt(str(prompt.user_path), prompts_dir=self.prompts_dir)  # the user file on its own
        return {"role": "user", "content": user.render(variables)[0]["content"]}

    def _plan(
        self, text: str | None, variables: dict
    ) -> tuple[Any, Response, list[dict], dict, dict, Any, int, dict, Any]:
        merged = {**self.variables, **variables}
        prompt = self.prompt
        opening = self._seed(prompt, merged) if not self.history else []
        user = self._user(prompt, text, merged)
        sender = self._sender()
        output_type, params, retries = plan_output(
            prompt, sender, self.output_type, self.output_retries, self.model_params
        )
        servers = self._servers.of(prompt)
        self._hold(tool_sources(self.tools) if self.tools is not None else servers)
        tools = plan_tools(
            self.tools,
            prompt.tools if prompt is not None else None,
            self.system_template_name,
            sender,
            params,
            max_rounds=self.max_tool_rounds,
            raise_errors=self.raise_tool_errors,
            on_call=self.on_tool_call,
            front_sources=servers,
            timeout=self.tool_timeout,
        )
        response = Response(
            [*self.history, *opening, user], template=self.system_template_name, variables=merged, prompt=prompt
        )
        return sender, response, opening, user, params, output_type, retries, merged, tools

    def _commit(self, opening: list[dict], user: dict, response: Response, merged: dict) -> None:
        message = response.message
        # a new list: one assigned by the caller is not changed; the turn's tool rounds are kept
        self.history = [*self.history, *opening, user, *response.tool_messages, dict(message)]  # type: ignore[arg-type]
        self.variables = merged
        self.model_output = message

    # -- turns -----------------------------------------------------------------------
    def say(self, text: str | None = None, /, **variables: Any) -> Any:
        """One turn: add a user message, send the whole history, return the reply.

        Args:
            text: the user's message as is; None: render the user template with
                ``variables`` (plus those remembered from earlier turns).
            **variables: template variables; on the first turn they also render
                the system template and the front matter's messages.

        Returns:
            str, or the reply coerced to ``output_type``.

        Raises:
            TypeError: no text and no user template.
            TemplateVariableError, TemplateSecurityError: rendering failed.
            ContextWindowExceededError: the history no longer fits the model's
                context window (nothing was sent; start over with :meth:`reset`
                or trim :attr:`history`).
            OutputParseError: the reply does not fit ``output_type`` (after ``output_retries``).
            ResponseError: a refusal or an empty reply; and every error of
            :meth:`tinyllm.Client.send_message`.
        """
        return self.respond(text, **variables).value

    async def asay(self, text: str | None = None, /, **variables: Any) -> Any:
        """The asyncio twin of :meth:`say`, through the client's ``arequest``."""
        return (await self.arespond(text, **variables)).value

    def respond(self, text: str | None = None, /, **variables: Any) -> Response:
        """Like :meth:`say`, but return the turn's complete :class:`~tinyllm.Response`
        (its ``messages`` are the whole conversation sent). Errors as :meth:`say`."""
        sender, response, opening, user, params, output_type, retries, merged, tools = self._plan(text, variables)
        with _closing(tools):
            respond_with(sender, response, params, output_type, retries, self._on_reply, tools)
        self._commit(opening, user, response, merged)
        return response

    async def arespond(self, text: str | None = None, /, **variables: Any) -> Response:
        """The asyncio twin of :meth:`respond`."""
        sender, response, opening, user, params, output_type, retries, merged, tools = self._plan(text, variables)
        with _closing(tools):
            await arespond_with(sender, response, params, output_type, retries, self._on_reply, tools)
        self._commit(opening, user, response, merged)
        return response

    def stream(self, text: str | None = None, /, **variables: Any) -> Response:
        """One turn, streamed: iterate the Response for text deltas (see :meth:`LLMCall.stream`).

        The turn is appended to :attr:`history` only when the stream is complete
        (an interrupted or failed turn leaves the history as it was).
        """
        sender, response, opening, user, params, output_type, retries, merged, tools = self._plan(text, variables)
        if not sender.capabilities.streaming:
            with _closing(tools):
                respond_with(sender, response, params, output_type, 0, self._on_reply, tools)
            self._commit(opening, user, response, merged)
            return response
        stream = _open_stream(sender, response, params, output_type, tools, self._on_reply, False)
        return _streaming(
            response, stream, output_type, self._on_reply, lambda r: self._commit(opening, user, r, merged)
        )

    async def astream(self, text: str | None = None, /, **variables: Any) -> Response:
        """The asyncio twin of :meth:`stream`."""
        sender, response, opening, user, params, output_type, retries, merged, tools = self._plan(text, variables)
        if not sender.capabilities.streaming:
            with _closing(tools):
                await arespond_with(sender, response, params, output_type, 0, self._on_reply, tools)
            self._commit(opening, user, response, merged)
            return response
        stream = _open_stream(sender, response, params, output_type, tools, self._on_reply, True)
        return _streaming(
            response, stream, output_type, self._on_reply, lambda r: self._commit(opening, user, r, merged)
        )

    def _on_reply(self, message: dict) -> None:
        self.model_output = message

    # -- bookkeeping -------------------------------------------------------------------
    def token_count(self, model: str | None = None) -> int:
        """Prompt tokens of the whole :attr:`history`, counted by the client's own counter.

        Args:
            model: the model to count for; default: the one this chat's calls use.

        Returns:
            int; 0 for an empty history.
        """
        if not self.history:
            return 0
        sender = self._sender()
        cfg = sender.settings()
        if model is None:
            params = {**(self.prompt.params if self.prompt is not None else {}), **self.model_params}
            model = sender.resolve_params(params, cfg)["model"]
        return int(sender.count_tokens(self.history, model, cfg))

    def _sender(self) -> Client:
        primary = self.client or get_client(self.api_type)
        return self.fallbacks.sender(primary) if self.fallbacks is not None else primary

    # -- MCP servers: open from the first turn to close() -----------------------------------
    def _hold(self, sources: list) -> None:
        """Keep ``sources`` open until :meth:`close` (each turn's own open and close then nest inside)."""
        for source in sources:
            if not any(source is held for held in self._held):
                source.open()
                self._held.append(source)
                if len(self._held) == 1:
                    import weakref

                    self._finalizer = weakref.finalize(self, _close_all, self._held)

    def close(self) -> None:
        """Stop the MCP servers this chat started (they start again at the next turn). No-op without any."""
        _close_all(self._held)

    def __enter__(self) -> "LLMChat":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def reset(self) -> None:
        """Start over: empty :attr:`history`, forget remembered variables and the last reply."""
        self.history = []
        self.variables = {}
        self.model_output = None


def _close_all(held: list) -> None:
    while held:
        held.pop().close()
