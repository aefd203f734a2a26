"""The tinyllm error tree.

Every failure inside tinyllm surfaces as a subclass of :class:`TinyLLMError`,
chained (``raise ... from exc``) to the library exception that caused it.
Nothing in tinyllm returns ``None`` to mean "it failed".

::

    TinyLLMError
    ├── ConfigError
    │   └── InputFileError               (a CSV/JSONL rows file that cannot be read: .path, .line)
    ├── CacheValueError                  (also a TypeError)
    ├── TemplateError
    │   ├── TemplateNotFoundError        (also a LookupError)
    │   ├── TemplateVariableError
    │   ├── TemplateSecurityError
    │   └── PromptSaveError              (tinyllm ui: a save outside the prompts directories)
    │       └── PromptConflictError      (the file changed on disk since it was opened: .diff)
    ├── APIError                         (status_code, request_id, body; as openai-python's tree)
    │   ├── APIConnectionError           (no response: status_code None)
    │   │   └── APITimeoutError
    │   └── APIStatusError               (any HTTP error status, e.g. 408)
    │       ├── BadRequestError          (400, other 4xx not named here)
    │       │   ├── UnprocessableEntityError (422)
    │       │   └── ContextWindowExceededError
    │       ├── AuthenticationError (401) / PermissionDeniedError (403) / NotFoundError (404)
    │       ├── ConflictError            (409)
    │       ├── RateLimitError           (429)
    │       └── ServerError              (5xx; also named InternalServerError)
    ├── ResponseError                    (.raw; .response where a Response exists)
    │   ├── RefusalError                 (.refusal: the model's refusal text)
    │   ├── LengthFinishReasonError      (a typed reply cut at max_tokens)
    │   └── ContentFilterFinishReasonError (the server's content filter stopped the reply)
    ├── OutputParseError
    ├── MediaError                       (also a ValueError: an image, audio or file tinyllm cannot send)
    ├── QueueFullError
    ├── BatchError                       (a batch's output file or row ids cannot be used)
    ├── BudgetExceededError
    ├── ToolError                        (a tool call failed, with raise_tool_errors)
    └── ToolRoundsExceededError          (.messages: the conversation so far)

Error messages never contain an API key: :class:`APIError` keeps only the
status code, the request id, the response headers and the response body, all
redacted. The SDK exception chained as ``__cause__`` is clean too: the
transport scrubs keys a server echoes from error replies before the SDK sees
them, and the failed request it keeps has its credential headers blanked
(``tinyllm.http``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TinyLLMError",
    "ConfigError",
    "InputFileError",
    "CacheValueError",
    "TemplateError",
    "TemplateNotFoundError",
    "TemplateVariableError",
    "TemplateSecurityError",
    "PromptSaveError",
    "PromptConflictError",
    "APIError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ContextWindowExceededError",
    "APIStatusError",
    "UnprocessableEntityError",
    "ConflictError",
    "InternalServerError",
    "RateLimitError",
    "ServerError",
    "APIConnectionError",
    "APITimeoutError",
    "ResponseError",
    "RefusalError",
    "LengthFinishReasonError",
    "ContentFilterFinishReasonError",
    "OutputParseError",
    "MediaError",
    "QueueFullError",
    "BatchError",
    "BudgetExceededError",
    "ToolError",
    "ToolRoundsExceededError",
]


class TinyLLMError(Exception):
    """Base class of every error tinyllm raises.

    Every one survives pickling (to and from a Dask worker or another process) with its type,
    message and attributes, whatever its ``__init__`` requires.
    """

    def __reduce__(self) -> tuple:
        # Exception's own reduce calls cls(*args) on loading, which fails for an __init__ with required
        # keyword arguments (BudgetExceededError) or other positional ones (TemplateNotFoundError)
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[TinyLLMError], args: tuple, state: dict) -> TinyLLMError:
    """An error of type ``cls`` with ``args`` and attributes ``state``, without calling its ``__init__``."""
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ConfigError(TinyLLMError):
    """A setting is missing or has a bad value; the message names the key and its source."""


class InputFileError(ConfigError):
    """A rows file (CSV or JSONL, for ``map`` and ``eval``) that cannot be read or parsed.

    The message names the file and the line; ``path`` (str) and ``line`` (1-based int, or None for the
    whole file) say the same for code. Raised before anything is sent.
    """

    def __init__(self, message: str, *, path: str = "", line: int | None = None):
        super().__init__(message)
        self.path, self.line = path, line


class CacheValueError(TinyLLMError, TypeError):
    """A key or value the cache cannot store: a key that is not a str, a value that is not plain
    data (dict, list, tuple, set, frozenset of str, int, float, bool, None, bytes, complex),
    contains itself, or is nested deeper than ``tinyllm.cache._store.MAX_DEPTH`` containers."""


class TemplateError(TinyLLMError):
    """A prompt template could not be found, parsed or rendered."""


class TemplateNotFoundError(TemplateError, LookupError):
    """No template of that name on the search path.

    Attributes:
        name (str): the template name asked for.
        searched (list[str]): the directories searched, in order.
    """

    def __init__(self, name: str, searched: list[str]):
        self.name = name
        self.searched = [str(s) for s in searched]
        where = ", ".join(self.searched) or "(no directories)"
        super().__init__(
            f"template {name!r} not found; searched: {where}. "
            "Put the file in one of these directories, pass prompts_dir=, or set PROMPTS_DIRS."
        )


class TemplateVariableError(TemplateError):
    """A variable the template uses was not given.

    Attributes:
        variable (str | None): the missing variable's name, when Jinja reports it.
        template (str): the template file.
    """

    def __init__(self, message: str, *, variable: str | None = None, template: str = ""):
        self.variable = variable
        self.template = template
        super().__init__(message)


class TemplateSecurityError(TemplateError):
    """The sandboxed Jinja environment refused an unsafe operation in a template."""


class PromptSaveError(TemplateError):
    """A prompt file could not be saved (``tinyllm ui``): the target is outside the prompts
    directories, is not a prompt file, or cannot be written. ``path`` (str) names the file."""

    def __init__(self, message: str, *, path: str = ""):
        super().__init__(message)
        self.path = path


class PromptConflictError(PromptSaveError):
    """A save refused because the file changed on disk since it was opened (nothing written).

    Attributes:
        path (str): the file.
        diff (str): a unified diff from the text on disk now to the text that was to be saved.
    """

    def __init__(self, message: str, *, path: str = "", diff: str = ""):
        super().__init__(message, path=path)
        self.diff = diff


class APIError(TinyLLMError):
    """The API answered with an error status.

    Attributes:
        status_code (int | None): the HTTP status, when there was a response.
        request_id (str | None): the server's ``x-request-id``, if it sent one.
        body (object | None): the decoded error body the server sent.
        response_headers (dict[str, str]): the response's headers (lower-case
            names), for ``Retry-After`` and ``x-should-retry``.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        body: Any = None,
        response_headers: dict[str, str] | None = None,
    ):
        self.response_headers = response_headers or {}
        self.status_code = status_code
        self.request_id = request_id
        self.body = body
        super().__init__(message)

    def __str__(self) -> str:
        text = super().__str__()
        extra = []
        if self.status_code is not None:
            extra.append(f"status {self.status_code}")
        if self.request_id:
            extra.append(f"request id {self.request_id}")
        return f"{text} ({', '.join(extra)})" if extra else text


class APIStatusError(APIError):
    """The server answered with an HTTP error status (``status_code``); the subclasses name the
    common ones, as openai-python's do. A status with no class of its own (408, 418, ...) is this."""


class BadRequestError(APIStatusError):
    """HTTP 400 (and any other 4xx not named below, 408 excepted): the request itself is wrong."""


class UnprocessableEntityError(BadRequestError):
    """HTTP 422: the request is well-formed but cannot be processed (openai-python's name; also a
    BadRequestError, as tinyllm reported 422 before)."""


class ConflictError(APIStatusError):
    """HTTP 409: the request conflicts with the resource's state (retried, as openai-python does)."""


class AuthenticationError(APIStatusError):
    """HTTP 401: the API key or token is missing or wrong."""


class PermissionDeniedError(APIStatusError):
    """HTTP 403: the key is valid but may not use this resource."""


class NotFoundError(APIStatusError):
    """HTTP 404: unknown model, deployment or route."""


class ContextWindowExceededError(BadRequestError):
    """The prompt plus ``max_tokens`` cannot fit the model's context window.

    Raised before anything is sent when tinyllm can count the tokens, or mapped
    from the server's ``context_length_exceeded`` error.

    Attributes:
        prompt_tokens (int | None): the prompt's tokens.
        max_tokens (int | None): the reply's budget asked for.
        context_window (int | None): the model's window, in tokens.
    """

    def __init__(
        self,
        message: str,
        *,
        prompt_tokens: int | None = None,
        max_tokens: int | None = None,
        context_window: int | None = None,
        **kwargs: Any,
    ):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_window = context_window
        super().__init__(message, **kwargs)


class RateLimitError(APIStatusError):
    """HTTP 429 after the last attempt, or a server-directed wait longer than MAX_WAITING_TIME."""


class ServerError(APIStatusError):
    """HTTP 5xx after the last attempt (openai-python's InternalServerError; that name works too)."""


InternalServerError = ServerError


_STATUS_CLASSES: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_class(code: int) -> type[APIError]:
    """The :class:`APIError` subclass for an HTTP error status ``code`` (int), as openai-python's
    ``_make_status_error`` maps it: 400, 401, 403, 404, 409, 422, 429 to their own classes; 408 and a
    code below 400 (an error inside a 200 stream) to :class:`APIStatusError`; any other 4xx to
    :class:`BadRequestError`; 5xx (and Anthropic's 529) to :class:`ServerError`. Shared by every
    client's error mapping (a context-window message is recognised by each client before this)."""
    found = _STATUS_CLASSES.get(code)
    if found is not None:
        return found
    if code >= 500:
        return ServerError
    return APIStatusError if code == 408 or code < 400 else BadRequestError


class APIConnectionError(APIError):
    """The request did not get a response: connection refused, dropped or reset (``status_code`` None)."""


class APITimeoutError(APIConnectionError):
    """No response within TIMEOUT seconds."""


class ResponseError(TinyLLMError):
    """The server answered 2xx but the reply is malformed, empty or a refusal.

    Attributes:
        raw (object | None): what the server sent, for diagnosis.
    """

    def __init__(self, message: str, *, raw: Any = None):
        self.raw = raw
        super().__init__(message)


class RefusalError(ResponseError):
    """The model refused (the reply's ``refusal`` field, OpenAI's structured-output refusals).

    Attributes:
        refusal (str): the refusal text the model wrote.
        response (tinyllm.Response | None): the call's record: ``finish_reason``, ``usage``
            (the refusal's tokens are paid for), ``message``.
        raw (dict): the reply's message dict.
    """

    def __init__(self, message: str, *, refusal: str = "", response: Any = None, raw: Any = None):
        self.refusal = refusal
        self.response = response
        super().__init__(message, raw=raw)


class LengthFinishReasonError(ResponseError):
    """A reply for a typed ``output_type`` (anything but ``str``) was cut at ``max_tokens``
    (``finish_reason == "length"``), or any reply was cut before it had any text (a reasoning
    model can spend every token on reasoning): openai-python's name for the same case. Not an
    :class:`OutputParseError` (asking again with the same limit would be cut again), and output
    retries do not apply: raise ``max_tokens``.

    Attributes:
        response (tinyllm.Response | None): the call's record, ``usage`` included (the cut reply's
            tokens are paid for), ``text`` the cut content.
        raw (dict): the reply's message dict.
    """

    def __init__(self, message: str, *, response: Any = None, raw: Any = None):
        self.response = response
        super().__init__(message, raw=raw)


class ContentFilterFinishReasonError(ResponseError):
    """The server's content filter stopped the reply (``finish_reason == "content_filter"``),
    for any output type: openai-python's name for the same case. What was written before the
    filter stopped it, if anything, is ``response.text``.

    Attributes:
        response (tinyllm.Response | None): the call's record, ``usage`` included.
        raw (dict): the reply's message dict.
    """

    def __init__(self, message: str, *, response: Any = None, raw: Any = None):
        self.response = response
        super().__init__(message, raw=raw)


class MediaError(TinyLLMError, ValueError):
    """An image, audio or file (:class:`tinyllm.Image`, :class:`tinyllm.Audio`,
    :class:`tinyllm.File`) that tinyllm cannot send: a file that cannot be read, content of a
    type the API does not take (the message names the types it takes), a ``detail`` that is
    not ``auto``/``low``/``high``, or a client that takes no such content (the message names
    the client and what it lacks). Raised before anything is sent.
    """


class OutputParseError(TinyLLMError):
    """The reply does not fit the requested ``output_type``.

    Attributes:
        raw (str): the reply's content as received.
        output_type (object): the type asked for.
    """

    def __init__(self, message: str, *, raw: str = "", output_type: Any = None):
        self.raw = raw
        self.output_type = output_type
        super().__init__(message)


class QueueFullError(TinyLLMError):
    """The request queue is full, or a request waited longer than QUEUE_TIMEOUT seconds; it was never sent."""


class BatchError(TinyLLMError):
    """A batch cannot run: another run holds its output file, the file is unreadable, or two rows share an id;
    or, in a row's place, a result that an executor's worker (Dask) cannot send back because it does not pickle."""


class BudgetExceededError(TinyLLMError):
    """The call could cost more than what is left of the budget (``MAX_COST``, or a
    ``map`` run's ``--max-cost``); it was refused before anything was sent.

    The call's worst-case cost is its prompt tokens plus its ``max_tokens`` (else
    the rest of the model's context window) at the model's prices; calls in flight
    count at their worst case until they are answered.

    Attributes:
        limit (float): the budget, USD.
        spent (float): USD spent so far under it.
        in_flight (float): worst-case USD of the calls under way.
        estimate (float): the refused call's worst-case USD.
        model (str): the model it would have asked.
    """

    def __init__(self, message: str, *, limit: float, spent: float, in_flight: float, estimate: float, model: str):
        self.limit, self.spent, self.in_flight, self.estimate, self.model = limit, spent, in_flight, estimate, model
        super().__init__(message)


class ToolError(TinyLLMError):
    """A tool call failed while ``raise_tool_errors`` is set (otherwise the error text goes back to
    the model as the tool's result): an unknown tool name, arguments that do not fit the tool's
    schema, or the tool raised (chained as ``__cause__``).

    Attributes:
        call (tinyllm.tools.ToolCall | None): the failed call's record (name, arguments, error, duration).
    """

    def __init__(self, message: str, *, call: Any = None):
        self.call = call
        super().__init__(message)


class ToolRoundsExceededError(TinyLLMError):
    """The model still asked for tools after ``max_tool_rounds`` tool rounds.

    Attributes:
        messages (list[dict]): the conversation so far: the messages sent, every tool round's
            assistant and ``tool`` messages, and the last reply (which asked for more tools).
        rounds (int): the tool rounds that ran.
        response (tinyllm.Response | None): the call's record so far (usage, ``tool_rounds``).
    """

    def __init__(self, message: str, *, messages: list | None = None, rounds: int = 0, response: Any = None):
        self.messages = list(messages or [])
        self.rounds = rounds
        self.response = response
        super().__init__(message)
