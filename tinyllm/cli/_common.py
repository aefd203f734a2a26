"""The root ``tinyllm`` group, its error handling and exit codes, and the options and helpers the commands share."""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from typing import Any, Callable

import click

from .. import __version__
from ..errors import ConfigError, TemplateError, TemplateNotFoundError, TemplateVariableError, TinyLLMError


EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CLIError(click.ClickException):
    """A failure reported as one ``error: ...`` line, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class; each error has its own


def _error(message: str) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)


def _describe(exc: TinyLLMError) -> str:
    """The one-line message for a tinyllm error, worded for the command line."""
    if isinstance(exc, TemplateNotFoundError):
        return (
            f"template {exc.name!r} not found; searched: {', '.join(exc.searched) or '(nothing)'}. "
            "Put the file in one of these directories, or pass --prompts-dir, or set TINYLLM_PROMPTS_DIRS."
        )
    if isinstance(exc, TemplateVariableError) and exc.variable:
        return f"{exc} (on the command line: --var {exc.variable}=VALUE)"
    if isinstance(exc, (ConfigError, TemplateError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _TinyLLM(click.Group):
    """The root group: turns tinyllm errors into ``error:`` lines and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            finally:
                calllog = sys.modules.get("tinyllm.observe._calllog")
                if calllog is not None:  # the rows of this command are in the log when it returns
                    calllog.flush_all(10.0)
        except TinyLLMError as exc:
            if ctx.params.get("debug"):
                traceback.print_exc()
            code = EXIT_USAGE if isinstance(exc, (ConfigError, TemplateError)) else EXIT_FAILED
            raise CLIError(_describe(exc), code) from exc
        except CLIError:
            if ctx.params.get("debug"):
                traceback.print_exc()
            raise
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                raise  # click quiets it
            if ctx.params.get("debug"):
                traceback.print_exc()
            raise CLIError(str(exc), EXIT_FAILED) from exc

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name or "tinyllm", complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _error(exc.format_message() + hint)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _error(exc.format_message())
            sys.exit(exc.exit_code)
        except click.Abort:
            _error("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)


# --------------------------------------------------------------------------- #
# Shared options and helpers
# --------------------------------------------------------------------------- #


def _prompts_dir_option(f: Callable) -> Callable:
    return click.option(
        "--prompts-dir",
        "prompts_dirs",
        multiple=True,
        metavar="DIR",
        type=click.Path(exists=True, file_okay=False),
        help="Directory searched for templates before TINYLLM_PROMPTS_DIRS and ./prompts (repeatable).",
    )(f)


def _search_dirs(ctx: click.Context) -> list[str]:
    """--prompts-dir values from this command up to the root, innermost first."""
    out: list[str] = []
    c: click.Context | None = ctx
    while c is not None:
        out.extend(c.params.get("prompts_dirs") or ())
        c = c.parent
    return out


def _read_text(path: str, what: str) -> str:
    """Text of a file (``-``: standard input). Raises CLIError (exit 2) when it cannot be read."""
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise CLIError(f"{what} {path!r} is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise CLIError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from exc


def _chomp(text: str) -> str:
    """``text`` without the one line ending that ends a file (as the shell's ``$(cat FILE)``, but only one)."""
    return text[:-1] if text.endswith("\n") else text


def _parse_vars(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    stdin_used = False
    for item in values:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE with KEY a variable name, got {item!r}", ctx, param)
        if value.startswith("@@"):
            value = value[1:]
        elif value == "@-":
            if stdin_used:
                raise click.BadParameter("only one --var may read standard input (@-)", ctx, param)
            stdin_used = ctx.meta["tinyllm.var_reads_stdin"] = True
            value = _chomp(_read_text("-", "standard input"))
        elif value.startswith("@"):
            value = _chomp(_read_text(value[1:], f"the file for --var {key}"))
        out[key] = value
    return out


def _var_option(f: Callable) -> Callable:
    return click.option(
        "--var",
        "variables",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_parse_vars,
        help="A template variable (repeatable). KEY=@FILE reads the value from FILE, KEY=@- from "
        "standard input (without the final newline); KEY=@@TEXT is the literal text @TEXT.",
    )(f)


class _FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (a usage error, exit 2)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _model_options(f: Callable) -> Callable:
    for option in reversed(
        [
            click.option("--model", "-m", help="Model name (default: the front matter's, else the MODEL setting)."),
            click.option(
                "--api-type",
                help="Backend: openai, ollama, azure, llamacpp or a registered one "
                "(default: API_TYPE, else auto-detected).",
            ),
            click.option("--temperature", type=_FiniteFloat(min=0), help="Sampling temperature."),
            click.option("--max-tokens", type=click.IntRange(min=1), help="Maximum tokens in the reply."),
            click.option(
                "--cache/--no-cache",
                default=None,
                help="Cache API replies on disk (default: the CACHE_API_CALLS setting).",
            ),
            click.option(
                "--fallback",
                multiple=True,
                metavar="API_TYPE_OR_MODEL",
                expose_value=False,
                callback=_set_fallbacks,
                help="Where a request goes when the backend fails after its retries with a rate limit, 5xx, "
                "timeout, connection error or context window exceeded (repeatable, tried in order): a "
                "registered api_type (ollama), API_TYPE:MODEL (openai:gpt-4o-mini), or a model name "
                "(the same backend, that model).",
            ),
        ]
    ):
        f = option(f)
    return f


def _set_fallbacks(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    if value:
        ctx.meta["tinyllm.fallbacks"] = list(value)


def _fallbacks(ctx: click.Context) -> list[str] | None:
    """The --fallback values of this command, or None."""
    return ctx.meta.get("tinyllm.fallbacks")


def _set_no_log(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["tinyllm.no_log"] = True


def _log_option(f: Callable) -> Callable:
    return click.option(
        "--no-log",
        is_flag=True,
        expose_value=False,
        callback=_set_no_log,
        help="Do not write these calls to the call log (default: logged, unless LOG_CALLS=false).",
    )(f)


def _turn_on_log(ctx: click.Context) -> None:
    """The command logs its calls: LOG_CALLS on, unless --no-log or the setting was given (e.g. LOG_CALLS=false)."""
    from ..config import configure, get_config

    if ctx.meta.get("tinyllm.no_log"):
        configure(log_calls=False)
    elif get_config().source("LOG_CALLS") == "default":
        configure(log_calls=True)


def _resolve(name: str, dirs: list[str]) -> tuple[str, Any]:
    """(template name to give LLMCall, Prompt). ``NAME`` without ``.system.`` means ``NAME.system.md``
    (or ``NAME.system.<ext>``), else the file ``NAME`` itself: ``load_prompt`` resolves short names
    (the same rule as the library). Raises TemplateNotFoundError."""
    from ..prompts._templates import load_prompt

    return name, load_prompt(name, prompts_dir=dirs)


def _llm(
    ctx: click.Context,
    name: str,
    model: str | None,
    api_type: str | None,
    temperature: float | None,
    max_tokens: int | None,
    cache: bool | None,
    **extra: Any,
) -> Any:
    """An LLMCall for the command-line options; checks the template and the backend before anything is sent.
    ``extra``: more LLMCall arguments (tools, tool_choice, on_tool_call), None ones left out."""
    from .. import force_api_cache, get_client
    from ..call import LLMCall

    template, _ = _resolve(name, _search_dirs(ctx))
    params = {
        k: v
        for k, v in (("model", model), ("temperature", temperature), ("max_tokens", max_tokens), *extra.items())
        if v is not None
    }
    llm = LLMCall(template, prompts_dir=_search_dirs(ctx), api_type=api_type, fallbacks=_fallbacks(ctx), **params)
    if cache is not None:
        force_api_cache(cache)
    _turn_on_log(ctx)
    get_client(api_type)  # ConfigError (exit 2) now: unknown api_type, or no backend configured
    return llm


def _parse_tools(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list:
    """``--tool MODULE:FUNCTION`` values as the functions (the working directory is searched first)."""
    import importlib

    out = []
    for item in values:
        module_name, sep, attr = item.partition(":")
        if not sep or not module_name or not attr:
            raise click.BadParameter(f"expected MODULE:FUNCTION, got {item!r}", ctx, param)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except ImportError as exc:
            raise click.BadParameter(f"cannot import {module_name!r}: {exc}", ctx, param) from exc
        except AttributeError:
            raise click.BadParameter(f"{module_name!r} has no {attr!r}", ctx, param) from None
        out.append(target)
    return out


def _parse_mcp(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list:
    """``--mcp [NAME=]COMMAND_OR_URL`` values as :class:`~tinyllm.MCPServer` objects (not opened yet): an
    http(s) URL is a streamable-HTTP server, anything else a stdio server's command line (split like a
    shell). ``NAME=`` (letters, digits, ``_``) names the server and puts ``NAME_`` before its tools' names,
    for servers whose tools share names."""
    import re

    from .._mcp import MCPServer, from_front_matter

    out = []
    for item in values:
        named = re.fullmatch(r"([A-Za-z][A-Za-z0-9_]*)=(\S.*)", item.strip(), re.DOTALL)
        try:
            if named is None:
                out.append(from_front_matter(item, "--mcp"))
            else:
                name, spec = named.groups()
                kind: dict[str, Any] = {"url": spec} if spec.startswith(("http://", "https://")) else {"command": spec}
                out.append(MCPServer(**kind, name=name, prefix=f"{name}_"))
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx, param) from exc
    return out


def _mcp_option(f: Callable) -> Callable:
    return click.option(
        "--mcp",
        "mcp_servers",
        multiple=True,
        metavar="[NAME=]COMMAND_OR_URL",
        callback=_parse_mcp,
        help="An MCP server whose tools the model may call (repeatable): a command line started over stdio "
        '(quoted: "python server.py"), or a streamable-HTTP URL (http://127.0.0.1:8000/mcp); NAME= puts '
        "NAME_ before its tools' names (for servers whose tools share names). Needs the mcp "
        "extra. Like --tool (and tools= in code), it replaces the tools the front matter names.",
    )(f)


def _print_tool_call(call: Any) -> None:
    """One tool call on stderr: ``tool get_weather({"city": "Paris"}) -> 18 C (0.001 s)``."""
    outcome = call.content
    if len(outcome) > 300:
        outcome = outcome[:300] + "..."
    click.echo(f"tool {call.name}({call.raw_arguments}) -> {outcome} ({call.duration:.3f} s)", err=True)


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # a pydantic model
        return value.model_dump(mode="json")
    return value


def _dumps(value: Any, **kw: Any) -> str:
    return json.dumps(
        value, ensure_ascii=False, default=lambda v: _plain(v) if hasattr(v, "model_dump") else str(v), **kw
    )


def _show(value: Any) -> str:
    """A call's result as text: a str as is, anything else (coerced output types) as JSON."""
    return value if isinstance(value, str) else _dumps(_plain(value))


def _usd(cost: float | None) -> str:
    """USD as text (``$0.0123``, ``$0.000016``; ``unknown`` for None)."""
    from ..observe._pricing import usd

    return usd(cost)


def _cost_text(spent: float, unpriced: int) -> str:
    """A run's cost: the priced replies' sum, and how many replies had no known price."""
    if unpriced and not spent:
        return f"unknown ({unpriced} call(s) to a model without a price)"
    return _usd(spent) + (f" + {unpriced} call(s) without a price" if unpriced else "")


def _short_name(prompt: Any) -> str:
    head, _, ext = prompt.system_path.name.rpartition(".system.")
    return head if ext == "md" and head else prompt.system_path.name


# --------------------------------------------------------------------------- #
# The commands
# --------------------------------------------------------------------------- #


@click.group(cls=_TinyLLM, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@_prompts_dir_option
@click.version_option(__version__, "--version", prog_name="tinyllm")
@click.pass_context
def cli(ctx: click.Context, debug: bool, prompts_dirs: tuple[str, ...]) -> None:
    """Template-driven LLM calls from the command line.

    Templates are found in --prompts-dir, then TINYLLM_PROMPTS_DIRS, then ./prompts.
    A template NAME is a file name such as summarize.system.md, or just summarize.

    Exit status: 0 success, 1 API or output error, 2 bad usage or configuration.
    """
