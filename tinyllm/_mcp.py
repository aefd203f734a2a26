"""Tools from MCP servers: :class:`MCPServer`, a source of tools for ``tools=[...]``.

>>> weather = tinyllm.MCPServer(command=["python", "weather_server.py"])       # stdio: a child process
>>> docs = tinyllm.MCPServer(url="http://127.0.0.1:8000/mcp")                  # streamable HTTP
>>> LLMCall("travel.system.md", tools=[weather, docs]).call(question="Paris today?")

Built on the official ``mcp`` SDK (the ``mcp`` extra), which is imported only when a server is
opened. Opening a server starts its process (stdio) or its session (HTTP), initializes the MCP
session and lists its tools (``tools/list``, every page); each becomes a :class:`MCPTool` offered
to the model with the server's name, description and input schema. A tool call is a
``tools/call`` request; its result goes back to the model: the structured content (JSON) when
the server sends some, else the text of its content blocks (other blocks as JSON). A result the
server marks ``isError``, a call that times out, and a server that died (its process exited, its
connection closed) are answered to the model as the tool's error, and the tool loop goes on.

Lifetime: a server is open while something uses it. A call opens it when it plans its tools and
closes it when it ends (its stream too); ``LLMCall.map`` keeps it open for the whole batch;
``LLMChat`` from its first turn until :meth:`LLMChat.close` (or the end of a ``with`` block, or
the chat being collected); ``with server:`` keeps it open for a block of your own. Opens nest: the
process is started by the first and stopped by the last close. Each open server runs its MCP
session on an asyncio event loop in a daemon thread of its own; sync and async tool calls are
sent to it.
"""

from __future__ import annotations

import json
import os
import shlex
import threading
from typing import Any

from ._fork import reset_in_child
from .errors import ConfigError, ToolError
from .tools import Tool, ToolSource

__all__ = ["FrontServers", "MCPServer", "MCPTool", "from_front_matter", "tool_sources"]

#: seconds a tool call may take by default (``MCPServer(timeout=...)``)
TIMEOUT = 60.0
#: seconds to start a server, initialize the session and list its tools by default
STARTUP_TIMEOUT = 30.0


def _field(obj: Any, snake: str, camel: str) -> Any:
    """A result field under its mcp 2 name (snake_case) or its mcp 1 name (camelCase)."""
    value = getattr(obj, snake, None)
    return value if value is not None else getattr(obj, camel, None)


class MCPTool(Tool):
    """One tool of an MCP server, as the model sees it and as the tool loop runs it.

    Attributes:
        name (str): the server's name for it (with the server's ``prefix``, if any); ``description`` (str);
        parameters (dict): its input JSON schema as the server gave it; ``server`` (:class:`MCPServer`).

    Running it validates the arguments against the input schema (jsonschema), then sends
    ``tools/call`` to the server and returns the structured content (``dict``) or the text (``str``).
    """

    def __init__(self, server: MCPServer, remote_name: str, description: str, parameters: dict) -> None:
        self.server = server
        self.remote_name = remote_name
        self.name = f"{server.prefix}{remote_name}" if server.prefix else remote_name
        self.description = description
        self.parameters = (
            parameters if isinstance(parameters, dict) and parameters else {"type": "object", "properties": {}}
        )
        self.target = None
        self.is_model = False
        self.is_async = False
        self.strict = False  # the server's schema, sent as given (not made strict-compatible)

    def __repr__(self) -> str:
        return f"<MCPTool {self.name!r} of {self.server!r}>"

    def __call__(self, **arguments: Any) -> Any:
        return self.run(arguments)

    def validate(self, arguments: Any) -> dict:
        """The arguments (a dict, or its JSON text) checked against the tool's input schema.

        Raises:
            ValueError: not JSON, not an object, or not valid for the schema (the first error's path and message).
        """
        if isinstance(arguments, str):
            arguments = json.loads(arguments or "{}")
        if not isinstance(arguments, dict):
            raise ValueError(f"the arguments must be a JSON object, not {type(arguments).__name__}")  # noqa: TRY004 (the tool loop reports ValueErrors)
        import jsonschema

        try:
            validator = jsonschema.validators.validator_for(self.parameters)(self.parameters)
            error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        except jsonschema.exceptions.SchemaError:  # the server's schema is its own business: let it judge
            return arguments
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "(arguments)"
            raise ValueError(f"{where}: {error.message}")
        return arguments

    def invoke(self, validated: Any) -> Any:
        """Send ``tools/call`` and wait for the result (at most the server's ``timeout`` seconds).

        Raises:
            ToolError: the server answered with ``isError``, timed out, or is gone.
        """
        return self.server._call(self.remote_name, validated)

    async def ainvoke(self, validated: Any) -> Any:
        """The asyncio twin of :meth:`invoke` (the call runs on the server's own loop)."""
        return await self.server._acall(self.remote_name, validated)


class _Connection:
    """One open MCP session: its event loop thread, the session, and the listed tools."""

    def __init__(self, server: MCPServer) -> None:
        import asyncio

        self.server = server
        self.loop = asyncio.new_event_loop()
        self.session: Any = None
        self.tools: list[dict] = []
        self.gone: BaseException | None = None  # why the session ended early (the process died, ...)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._closing: Any = None
        self._thread = threading.Thread(target=self._run, name=f"tinyllm-mcp-{server.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(server.startup_timeout):
            self.close()
            raise ToolError(f"MCP server {server.name!r} did not start within {server.startup_timeout:g} s")
        if self._startup_error is not None:
            self._thread.join(5)
            raise ToolError(
                f"MCP server {server.name!r} could not be started: "
                f"{type(self._startup_error).__name__}: {_message(self._startup_error)}"
            ) from self._startup_error

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        import asyncio
        import contextlib

        self._closing = asyncio.Event()
        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await self._open(stack)
                from mcp import ClientSession

                self.session = await stack.enter_async_context(ClientSession(read, write))
                await self.session.initialize()
                self.tools = await self._list()
                self._ready.set()
                await self._closing.wait()
        except BaseException as exc:  # noqa: BLE001 - reported to the thread that opened, or on the next call
            if not self._ready.is_set():
                self._startup_error = exc
            else:
                self.gone = exc
        finally:
            self._ready.set()

    async def _open(self, stack: Any) -> tuple[Any, Any]:
        server = self.server
        if server.url is not None:
            try:
                from mcp.client.streamable_http import streamable_http_client as opener
            except ImportError:  # mcp 1.x
                from mcp.client.streamable_http import (  # type: ignore[no-redef,attr-defined]  # mcp 1.x's name
                    streamablehttp_client as opener,
                )
            options: dict[str, Any] = {"headers": server.headers} if server.headers and _takes_headers(opener) else {}
            streams = await stack.enter_async_context(opener(server.url, **options))
        else:
            from mcp.client.stdio import StdioServerParameters, stdio_client

            command, *args = server.command  # type: ignore[misc]  # not None: __init__ sets exactly one of url and command
            params = StdioServerParameters(command=command, args=args, env=server.env, cwd=server.cwd)
            streams = await stack.enter_async_context(stdio_client(params, errlog=_errlog()))
        return streams[0], streams[1]

    async def _list(self) -> list[dict]:
        out: list[dict] = []
        cursor = None
        for _ in range(1000):  # pages
            if cursor is None:
                page = await self.session.list_tools()
            else:
                from mcp import types

                page = await self.session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
            for t in page.tools:
                out.append(
                    {
                        "name": t.name,
                        "description": t.description or "",
                        "parameters": _field(t, "input_schema", "inputSchema") or {},
                    }
                )
            cursor = _field(page, "next_cursor", "nextCursor")
            if not cursor:
                break
        return out

    def call(self, name: str, arguments: dict) -> Any:
        import asyncio
        import concurrent.futures

        future = asyncio.run_coroutine_threadsafe(self._call(name, arguments), self.loop)
        try:
            return future.result(self.server.timeout + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ToolError(
                f"MCP server {self.server.name!r}: {name} did not answer within {self.server.timeout:g} s"
            ) from None

    async def acall(self, name: str, arguments: dict) -> Any:
        import asyncio

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._call(name, arguments), self.loop))

    async def _call(self, name: str, arguments: dict) -> Any:
        import asyncio

        server = self.server
        if self.gone is not None:
            raise ToolError(f"MCP server {server.name!r} is gone ({_message(self.gone)})")
        try:
            result = await asyncio.wait_for(self.session.call_tool(name, arguments), server.timeout)
        except asyncio.TimeoutError:
            raise ToolError(f"MCP server {server.name!r}: {name} did not answer within {server.timeout:g} s") from None
        except Exception as exc:  # the SDK's McpError / MCPError (e.g. "Connection closed"), a broken stream, ...
            raise ToolError(
                f"MCP server {server.name!r} failed on {name}: {type(exc).__name__}: {_message(exc)}"
            ) from exc
        return _result(server, name, result)

    def close(self) -> None:
        loop = self.loop
        if self._closing is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._closing.set)
            except RuntimeError:  # the loop ended already
                pass
        self._thread.join(10)


def _errlog() -> Any:
    """Where a stdio server's stderr goes: this process's ``sys.stderr`` when it has a file descriptor,
    else the interpreter's original stderr (a notebook, a test runner or click's CliRunner put an object
    without one in ``sys.stderr``, which a child process cannot write to), else nowhere."""
    import subprocess
    import sys

    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.fileno()
                return stream
        except (AttributeError, OSError, ValueError):
            continue
    return subprocess.DEVNULL


def _takes_headers(opener: Any) -> bool:
    import inspect

    try:
        return "headers" in inspect.signature(opener).parameters
    except (TypeError, ValueError):
        return False


def _message(exc: BaseException) -> str:
    """The text of an exception; an exception group's first leaf (anyio task groups wrap them)."""
    while isinstance(getattr(exc, "exceptions", None), (list, tuple)) and exc.exceptions:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return str(exc) or type(exc).__name__


def _result(server: MCPServer, name: str, result: Any) -> Any:
    """What a ``tools/call`` result gives back: structured content, else the content blocks' text.

    Raises:
        ToolError: the server marked the result as an error (its text is the message).
    """
    blocks = list(getattr(result, "content", None) or [])
    texts = [b.text for b in blocks if getattr(b, "type", None) == "text" and isinstance(getattr(b, "text", None), str)]
    if _field(result, "is_error", "isError"):
        raise ToolError(f"{name} failed on MCP server {server.name!r}: {' '.join(texts) or 'no message'}")
    structured = _field(result, "structured_content", "structuredContent")
    if structured is not None:
        return structured
    if len(texts) == len(blocks):
        return "\n".join(texts)
    return [b.model_dump(mode="json", exclude_none=True) if hasattr(b, "model_dump") else str(b) for b in blocks]


class MCPServer(ToolSource):
    """An MCP server whose tools a call may use: ``tools=[MCPServer(...)]``.

    Args:
        command: the stdio server's command line (``list[str]``, or a str split like a shell
            would): the process is started when the server is opened and stopped when it is closed.
        url: the streamable-HTTP endpoint (``http://127.0.0.1:8000/mcp``) instead of ``command``.
        env: environment variables for the process (over the SDK's safe default environment).
        cwd: its working directory.
        headers: HTTP headers for ``url`` (e.g. an ``Authorization``; never shown in reprs).
        name: how errors and the repr name it (default: the command's program, or the URL's host).
        prefix: put before each tool's name the model sees (``"docs_"``), when servers share names.
        timeout: seconds a tool call may take (default :data:`TIMEOUT`, 60).
        startup_timeout: seconds to start, initialize and list the tools (default :data:`STARTUP_TIMEOUT`, 30).

    Raises:
        ConfigError: neither or both of ``command`` and ``url``; an empty command; a URL that is not
            http(s); a timeout that is not > 0. Opening raises :class:`~tinyllm.ToolError` when the
            server cannot be started or reached, and ConfigError when the ``mcp`` package is missing.
    """

    def __init__(
        self,
        command: list[str] | str | None = None,
        *,
        url: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        headers: dict[str, str] | None = None,
        name: str | None = None,
        prefix: str | None = None,
        timeout: float = TIMEOUT,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        if (command is None) == (url is None):
            raise ConfigError(
                "MCPServer needs either command=[...] (a stdio server) or url='http://...' (streamable HTTP)"
            )
        if command is not None:
            command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
            if not command:
                raise ConfigError("MCPServer(command=...) must not be empty")
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise ConfigError(f"MCPServer(url=...) must be an http:// or https:// URL, not {url!r}")
        for label, value in (("timeout", timeout), ("startup_timeout", startup_timeout)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"MCPServer({label}=...) must be a number of seconds > 0, not {value!r}")
        self.command = command
        self.url = url
        self.env = {str(k): str(v) for k, v in env.items()} if env else None
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.headers = dict(headers) if headers else None
        self.prefix = prefix or ""
        self.timeout = float(timeout)
        self.startup_timeout = float(startup_timeout)
        if name is None:
            if command is not None:
                name = os.path.basename(
                    command[-1]
                    if os.path.basename(command[0]).startswith("python") and len(command) > 1
                    else command[0]
                )
            elif url is not None:  # always, __init__ took exactly one of command and url
                from urllib.parse import urlsplit

                name = urlsplit(url).netloc.rpartition("@")[2] or str(url)
        self.name = name
        self._reset()
        reset_in_child(self._reset)  # a forked child has no connection thread: it opens its own

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._conn: _Connection | None = None

    def __repr__(self) -> str:
        from .config import redact_url

        where = f"url={redact_url(self.url)!r}" if self.url else f"command={self.command!r}"
        return f"<MCPServer {self.name!r} {where}{' open' if self._conn is not None else ''}>"

    def __getstate__(self) -> dict:
        """Its settings (command or url, env, ...), never an open connection: the unpickled server opens its own."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_users", "_conn")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()
        reset_in_child(self._reset)

    # -- lifetime ------------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """Whether the server's process or session is running now."""
        return self._conn is not None

    def open(self) -> MCPServer:
        """Start the server (first open) or count one more user; returns self.

        Raises:
            ConfigError: the ``mcp`` package is not installed (``pip install 'tinyllm[mcp]'``).
            ToolError: the server could not be started, initialized or listed in time.
        """
        with self._lock:
            if self._conn is None:
                try:
                    import mcp  # noqa: F401
                except ImportError:
                    raise ConfigError("MCP servers need the mcp package: pip install 'tinyllm[mcp]'") from None
                self._conn = _Connection(self)
            self._users += 1
        return self

    def close(self) -> None:
        """One user fewer; the last one stops the process (stdio) or ends the session (HTTP). No-op when not open."""
        with self._lock:
            if self._conn is None:
                return
            self._users -= 1
            if self._users > 0:
                return
            conn, self._conn, self._users = self._conn, None, 0
        conn.close()

    def __enter__(self) -> MCPServer:  # noqa: PYI034
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tools(self) -> list[Tool]:
        """The server's tools (:class:`MCPTool` objects) as listed when it was opened.

        Raises:
            ToolError: the server is not open.
        """
        conn = self._conn
        if conn is None:
            raise ToolError(
                f"MCP server {self.name!r} is not open (use it in tools=[...], or open it with `with server:`)"
            )
        return [MCPTool(self, t["name"], t["description"], t["parameters"]) for t in conn.tools]

    # -- calls ------------------------------------------------------------------------------------
    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is None:
            raise ToolError(f"MCP server {self.name!r} was closed")
        return conn

    def _call(self, name: str, arguments: dict) -> Any:
        return self._connection().call(name, arguments)

    async def _acall(self, name: str, arguments: dict) -> Any:
        return await self._connection().acall(name, arguments)


def from_front_matter(spec: Any, origin: str = "front matter") -> MCPServer:
    """An :class:`MCPServer` for one entry of a front matter's ``mcp_servers:`` list.

    An entry is a URL (``http://127.0.0.1:8000/mcp``), a command line (``python server.py``), or a
    mapping with ``command`` (a list or a str) or ``url``, and optionally ``env``, ``cwd``,
    ``name``, ``prefix``, ``timeout``, ``startup_timeout`` (as :class:`MCPServer` takes them).
    A relative ``cwd`` is taken from the working directory.

    Raises:
        ConfigError: an entry of another shape, or an unknown key (the message names ``origin``).
    """
    if isinstance(spec, str):
        return MCPServer(url=spec) if spec.startswith(("http://", "https://")) else MCPServer(command=spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"{origin}: each mcp_servers entry must be a URL, a command line or a mapping, not {spec!r}")
    known = {"command", "url", "env", "cwd", "name", "prefix", "timeout", "startup_timeout"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(
            f"{origin}: unknown mcp_servers key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return MCPServer(spec.get("command"), **{k: v for k, v in spec.items() if k != "command"})


def tool_sources(tools: Any) -> list[ToolSource]:
    """The :class:`~tinyllm.tools.ToolSource` objects (MCP servers) among ``tools`` (None: none)."""
    return [t for t in tools or () if isinstance(t, ToolSource)]


class FrontServers:
    """The :class:`MCPServer` objects of the front matters an LLMCall or LLMChat used, one per entry,
    kept so that opens nest (a batch keeps one process per server). Not pickled: rebuilt where used."""

    def __init__(self) -> None:
        self._made: dict[str, MCPServer] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def of(self, prompt: Any) -> list[MCPServer]:
        """The servers of ``prompt``'s ``mcp_servers:`` (none for None or a prompt without them).

        Raises:
            TemplateError: an entry :func:`from_front_matter` refuses (the message names the prompt).
        """
        specs = getattr(prompt, "mcp_servers", None) if prompt is not None else None
        if not specs:
            return []
        out = []
        for spec in specs:
            key = json.dumps(spec, sort_keys=True, default=str)
            found = self._made.get(key)
            if found is None:
                with self._lock:
                    found = self._made.get(key)
                    if found is None:
                        try:
                            found = self._made[key] = from_front_matter(
                                spec, str(getattr(prompt, "system_path", "front matter"))
                            )
                        except ConfigError as exc:
                            from .errors import TemplateError

                            raise TemplateError(str(exc)) from None
            out.append(found)
        return out
