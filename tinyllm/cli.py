"""The ``tinyllm`` command: list, render and call prompt templates; map a prompt over a file.

Subcommands: ``prompts`` (and ``prompts show``), ``render``, ``call``, ``map``,
``tokens``, ``cache stats|clear``, ``config``, ``logs`` (and ``logs show|stats``).
``call`` and ``map`` write every call to the call log unless ``--no-log`` or
``LOG_CALLS=false`` (:mod:`tinyllm.calllog`). ``python -m tinyllm`` is the same.

Exit codes: 0 success; 1 an API or output error (for ``map``: any row that
ended in error); 2 bad usage (unknown template, missing variable, bad file,
bad ``--var``, bad configuration); 130 interrupted. A failure prints one line,
``error: ...``, on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import traceback
import contextlib
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from . import __version__
from .errors import ConfigError, TemplateError, TemplateNotFoundError, TemplateVariableError, TinyLLMError

__all__ = ["cli", "main"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CLIError(click.ClickException):
    """A failure reported as one ``error: ...`` line, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def _error(message: str) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)


def _describe(exc: TinyLLMError) -> str:
    """The one-line message for a tinyllm error, worded for the command line."""
    if isinstance(exc, TemplateNotFoundError):
        return (f"template {exc.name!r} not found; searched: {', '.join(exc.searched) or '(nothing)'}. "
                "Put the file in one of these directories, or pass --prompts-dir, or set TINYLLM_PROMPTS_DIRS.")
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
                calllog = sys.modules.get("tinyllm.calllog")
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

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
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
        "--prompts-dir", "prompts_dirs", multiple=True, metavar="DIR",
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
        "--var", "variables", multiple=True, metavar="KEY=VALUE", callback=_parse_vars,
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
    for option in reversed([
        click.option("--model", "-m", help="Model name (default: the front matter's, else the MODEL setting)."),
        click.option("--api-type", help="Backend: openai, ollama, azure, llamacpp or a registered one "
                                        "(default: API_TYPE, else auto-detected)."),
        click.option("--temperature", type=_FiniteFloat(min=0), help="Sampling temperature."),
        click.option("--max-tokens", type=click.IntRange(min=1), help="Maximum tokens in the reply."),
        click.option("--cache/--no-cache", default=None,
                     help="Cache API replies on disk (default: the CACHE_API_CALLS setting)."),
    ]):
        f = option(f)
    return f


def _set_no_log(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["tinyllm.no_log"] = True


def _log_option(f: Callable) -> Callable:
    return click.option("--no-log", is_flag=True, expose_value=False, callback=_set_no_log,
                        help="Do not write these calls to the call log (default: logged, unless LOG_CALLS=false).")(f)


def _turn_on_log(ctx: click.Context) -> None:
    """The command logs its calls: LOG_CALLS on, unless --no-log or the setting was given (e.g. LOG_CALLS=false)."""
    from .config import configure, get_config

    if ctx.meta.get("tinyllm.no_log"):
        configure(log_calls=False)
    elif get_config().source("LOG_CALLS") == "default":
        configure(log_calls=True)


def _resolve(name: str, dirs: list[str]) -> tuple[str, Any]:
    """(template name to give LLMCall, Prompt). ``NAME`` without ``.system.`` means ``NAME.system.md``
    (or ``NAME.system.<ext>``), else the file ``NAME`` itself: ``load_prompt`` resolves short names
    (the same rule as the library). Raises TemplateNotFoundError."""
    from .templates import load_prompt

    return name, load_prompt(name, prompts_dir=dirs)


def _llm(ctx: click.Context, name: str, model: str | None, api_type: str | None, temperature: float | None,
         max_tokens: int | None, cache: bool | None, **extra: Any) -> Any:
    """An LLMCall for the command-line options; checks the template and the backend before anything is sent.
    ``extra``: more LLMCall arguments (tools, tool_choice, on_tool_call), None ones left out."""
    from . import client, force_api_cache
    from .call import LLMCall

    template, _ = _resolve(name, _search_dirs(ctx))
    params = {k: v for k, v in (("model", model), ("temperature", temperature), ("max_tokens", max_tokens), *extra.items())
              if v is not None}
    llm = LLMCall(template, prompts_dir=_search_dirs(ctx), api_type=api_type, **params)
    if cache is not None:
        force_api_cache(cache)
    _turn_on_log(ctx)
    client(api_type)  # ConfigError (exit 2) now: unknown api_type, or no backend configured
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
    return json.dumps(value, ensure_ascii=False, default=lambda v: _plain(v) if hasattr(v, "model_dump") else str(v), **kw)


def _show(value: Any) -> str:
    """A call's result as text: a str as is, anything else (coerced output types) as JSON."""
    return value if isinstance(value, str) else _dumps(_plain(value))


def _usd(cost: float | None) -> str:
    """USD as text (``$0.0123``, ``$0.000016``; ``unknown`` for None)."""
    from .pricing import usd

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


@cli.group(invoke_without_command=True)
@_prompts_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_context
def prompts(ctx: click.Context, prompts_dirs: tuple[str, ...], as_json: bool) -> None:
    """List the templates on the search path, with their description and variables.

    `tinyllm prompts show NAME` prints one template's files and front matter.
    """
    if ctx.invoked_subcommand is not None:
        return
    from .templates import list_prompts, search_path

    dirs = _search_dirs(ctx)
    errors: list[tuple[Path, TemplateError]] = []
    loaded = list_prompts(dirs, errors=errors)
    # system file name -> Prompt, or the TemplateError it raised (broken ones listed last)
    found: dict[str, Any] = {**{p.name: p for p in loaded}, **{path.name: exc for path, exc in errors}}
    broken = [exc for _, exc in errors]
    if as_json:
        click.echo(_dumps([
            {"name": _short_name(p), "system": str(p.system_path), "user": str(p.user_path) if p.user_path else None,
             "description": p.description, "variables": sorted(p.variables)}
            if not isinstance(p, TemplateError) else {"name": name, "error": str(p)}
            for name, p in found.items()], indent=2))
    elif not found:
        click.echo(f"no templates found; searched: {', '.join(str(d) for d in search_path(dirs))}", err=True)
    else:
        rows = [(_short_name(p), p.description or "", ", ".join(sorted(p.variables)) or "-")
                if not isinstance(p, TemplateError) else (name, f"(broken: {' '.join(str(p).split())})", "")
                for name, p in found.items()]
        width = max(len("NAME"), *(len(r[0]) for r in rows))
        dwidth = max(len("DESCRIPTION"), *(len(r[1]) for r in rows))
        click.echo(f"{'NAME':<{width}}  {'DESCRIPTION':<{dwidth}}  VARIABLES")
        for name, description, variables in rows:
            click.echo(f"{name:<{width}}  {description:<{dwidth}}  {variables}".rstrip())
    if broken:
        raise CLIError(f"{len(broken)} template(s) do not load; the first: {broken[0]}", EXIT_USAGE)


@prompts.command("show")
@click.argument("name")
@_prompts_dir_option
@click.pass_context
def prompts_show(ctx: click.Context, name: str, prompts_dirs: tuple[str, ...]) -> None:
    """Print a template's files (paths and contents), front matter and variables."""
    import yaml

    _, prompt = _resolve(name, _search_dirs(ctx))
    for path in (prompt.system_path, prompt.user_path):
        if path is not None:
            click.echo(f"==> {path} <==")
            click.echo(_read_text(str(path), "the template").rstrip("\n"))
            click.echo()
    click.echo("front matter:")
    fm = yaml.safe_dump(prompt.front_matter, sort_keys=False, allow_unicode=True).rstrip("\n")
    click.echo("  (none)" if not prompt.front_matter else "\n".join("  " + line for line in fm.split("\n")))
    click.echo(f"variables: {', '.join(sorted(prompt.variables)) or '(none)'}")


@cli.command()
@click.argument("name")
@_var_option
@click.option("--model", "-m", help="Model to ask (default: the front matter's, else the MODEL setting).")
@click.option("--api-type", help="Backend whose model name and tokenizer apply (default: API_TYPE, else auto-detected).")
@click.option("--json", "as_json", is_flag=True, help="Print {messages, model, api_type, params, prompt_tokens} as JSON.")
@_prompts_dir_option
@click.pass_context
def render(ctx: click.Context, name: str, variables: dict, model: str | None, api_type: str | None, as_json: bool,
           prompts_dirs: tuple[str, ...]) -> None:
    """Print the messages NAME renders to, the parameters that would be sent, and the prompt's
    tokens as the answering backend counts them (its model name and tokenizer), sending nothing."""
    from .call import plan_output
    from .clients import client
    from .config import get_config
    from .tokens import count_tokens

    _, prompt = _resolve(name, _search_dirs(ctx))
    messages = prompt.render(variables)
    given = {"model": model} if model else {}
    try:
        sender = client(api_type)
    except ConfigError as exc:  # no backend configured: tiktoken's count for the configured model
        if api_type:
            raise
        sender, note = None, f"no backend configured ({str(exc).split('.')[0]}); counted with tiktoken"
    if sender is not None:
        cfg = sender.settings()
        params = sender.resolve_params(plan_output(prompt, sender, None, None, given)[1], cfg)
        used_model = params["model"]
        n = sender.count_tokens(messages, used_model, cfg)
        backend, note = sender.api_type, None
    else:
        params = {**prompt.params, **given}
        used_model = params.get("model") or get_config().model
        n, backend = count_tokens(messages, used_model), None
    params = {k: v for k, v in params.items() if k != "model"}
    if as_json:
        click.echo(_dumps({"messages": messages, "model": used_model, "api_type": backend, "params": params,
                           "prompt_tokens": n}, indent=2))
        return
    for m in messages:
        click.echo(f"--- {m['role']} ---")
        click.echo(m["content"])
        click.echo()
    if params:
        click.echo(f"--- parameters: {_dumps(params)} ---")
    where = f"{backend}, {used_model}" if backend else used_model
    click.echo(f"--- {n} prompt tokens ({where}) ---" + (f"\n({note})" if note else ""))


@cli.command()
@click.argument("name")
@_var_option
@_model_options
@click.option("--stream/--no-stream", default=None,
              help="Print the reply as it is written (default: when stdout is a terminal and not --json).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the complete call record (content, model, usage, cost in USD or null, cached, latency, ...) as JSON at the end.")
@_log_option
@click.option("--tool", "tool_paths", multiple=True, metavar="MODULE:FUNCTION", callback=_parse_tools,
              help="A Python function the model may call (repeatable), imported from MODULE (the working "
                   "directory is searched first); each call it runs is printed on stderr.")
@click.option("--tool-choice", help="auto, required, none, or a tool's name (default: the front matter's, else auto).")
@_prompts_dir_option
@click.pass_context
def call(ctx: click.Context, name: str, variables: dict, model: str | None, api_type: str | None,
         temperature: float | None, max_tokens: int | None, cache: bool | None, stream: bool | None, as_json: bool,
         tool_paths: list, tool_choice: str | None, prompts_dirs: tuple[str, ...]) -> None:
    """Render NAME with the variables, send it, print the reply's content.

    A reply coerced to another output type than str (the front matter's
    output_type) is printed as JSON. Streamed text is printed as it arrives;
    a coerced value is printed again at the end only with --json.
    """
    llm = _llm(ctx, name, model, api_type, temperature, max_tokens, cache, tools=tool_paths or None,
               tool_choice=tool_choice, on_tool_call=_print_tool_call)
    if stream is None:
        stream = not as_json and sys.stdout.isatty()
    if stream:
        response = llm.stream(**variables)
        for delta in response:
            click.echo(delta, nl=False)
            sys.stdout.flush()
        if not as_json:
            click.echo("")
    else:
        response = llm.respond(**variables)
        if not as_json:
            click.echo(_show(response.value))
    if as_json:
        record = response.as_dict()
        record["content"] = _plain(response.value)
        record["latency"] = round(response.latency, 4) if response.latency is not None else None
        click.echo(_dumps(record))


@cli.command()
@click.argument("name", required=False)
@_var_option
@_model_options
@click.option("--system", help="A plain system message instead of a template.")
@_prompts_dir_option
@click.pass_context
def chat(ctx: click.Context, name: str | None, variables: dict, model: str | None, api_type: str | None,
         temperature: float | None, max_tokens: int | None, cache: bool | None, system: str | None,
         prompts_dirs: tuple[str, ...]) -> None:
    """An interactive conversation, each answer streamed as it is written.

    NAME (optional) is a template whose system part opens the conversation
    (rendered with the --var values). Type a message and press Enter; `exit`
    or Ctrl-D ends the conversation; Ctrl-C stops the current answer (the
    turn is dropped) without leaving.
    """
    from . import client, force_api_cache
    from .chat import LLMChat

    if name is not None and system is not None:
        raise CLIError("give a template NAME or --system, not both")
    params = {k: v for k, v in (("model", model), ("temperature", temperature), ("max_tokens", max_tokens)) if v is not None}
    template = _resolve(name, _search_dirs(ctx))[0] if name is not None else None
    conversation = LLMChat(template, system=system, prompts_dir=_search_dirs(ctx), api_type=api_type, **params)
    if template is not None:
        # the system part only: each line typed is the user's message
        conversation.history = conversation.prompt.render(variables, include_user=False)
    if cache is not None:
        force_api_cache(cache)
    client(api_type)  # ConfigError (exit 2) now
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            click.echo("")
            return
        except KeyboardInterrupt:
            click.echo("")
            continue
        if line.strip() in ("exit", "quit"):
            return
        if not line.strip():
            continue
        response = conversation.stream(line)
        try:
            for delta in response:
                click.echo(delta, nl=False)
                sys.stdout.flush()
            click.echo("")
        except KeyboardInterrupt:
            response.close()
            click.echo("\n[stopped]", err=True)
        except TinyLLMError as exc:
            response.close()
            click.echo(f"\nerror: {_describe(exc)}", err=True)


# -- map ----------------------------------------------------------------------------


@contextmanager
def _readable_twice(path: str) -> Iterator[str]:
    """A path to the input that can be read more than once: standard input (``-``) is first copied to a temporary file."""
    if path != "-":
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix="tinyllm-map-", suffix=".input")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
        yield tmp
    finally:
        with suppress(OSError):
            os.unlink(tmp)


def _lines(f: Any, shown: str) -> Iterator[str]:
    """The lines of a binary file as text (each with its ending), decoded one by one so a bad byte names its line."""
    for lineno, raw in enumerate(f, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CLIError(f"{shown}: line {lineno} is not UTF-8 text (byte {exc.start} of the line)") from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def _jsonl_rows(lines: Iterator[str], shown: str, id_field: str) -> Iterator[tuple[Any, dict]]:
    n = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = _STRICT_JSON.decode(line)
        except ValueError as exc:
            raise CLIError(f"{shown}: line {lineno} is not valid JSON: {exc}") from exc
        if not isinstance(rec, dict):
            raise CLIError(f"{shown}: line {lineno} is not a JSON object (one object of variables per line)")
        rid = rec.get(id_field)
        yield (rid if rid not in (None, "") else n), rec
        n += 1


def _csv_rows(lines: Iterator[str], shown: str, id_field: str) -> Iterator[tuple[Any, dict]]:
    reader = csv.reader(lines, strict=True)  # strict: a stray quote is an error, not a field that runs on
    header: list[str] | None = None
    n = 0
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            where = f"line {start}" + (f" (read on to line {reader.line_num})" if reader.line_num > start else "")
            hint = "; a quote that is never closed takes the lines after it into one field" \
                if reader.line_num > start else ""
            raise CLIError(f"{shown}: {where}: bad CSV: {exc}{hint}") from exc
        if not fields:  # a blank line
            continue
        if header is None:
            twice = sorted({name for name in fields if fields.count(name) > 1})
            if twice:
                raise CLIError(f"{shown}: line {start}: the header names {', '.join(map(repr, twice))} more than once")
            header = fields
            continue
        if len(fields) != len(header):
            raise CLIError(f"{shown}: line {start}: {len(fields)} field(s), but the header has {len(header)}")
        rec = dict(zip(header, fields))
        rid = rec.get(id_field)
        yield (rid if rid not in (None, "") else n), rec
        n += 1


def _rows(path: str, shown: str, fmt: str, id_field: str) -> Iterator[tuple[Any, dict]]:
    """(id, variables) per input row, in input order, streamed. A row without an id gets its 0-based row number.

    Raises CLIError (exit 2) for a bad file, naming the line.
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CLIError(f"cannot read the input {shown!r}: {exc.strerror or exc}") from exc
    with f:
        yield from (_csv_rows if fmt == "csv" else _jsonl_rows)(_lines(f, shown), shown, id_field)


def _result_line(row_id: Any, value: Any, exc: BaseException | None) -> str:
    """The row's output line: strict JSON (a NaN or infinite float in a content value is written as a string)."""
    from .runner import finite

    rec = ({"id": row_id, "content": _plain(value)} if exc is None
           else {"id": row_id, "error": {"type": type(exc).__name__, "message": str(exc)}})
    try:
        return _dumps(rec, allow_nan=False)
    except ValueError:
        return _dumps(finite(rec), allow_nan=False)


def _exit_now(code: int) -> None:
    """Exit without waiting for the calls still running, and without the interpreter's teardown (which
    waits for the worker threads, and can crash under an embedded model mid-generation)."""
    from .cache import active_cache

    with suppress(Exception):
        active = active_cache()
        if active is not None and hasattr(active, "flush_counts"):
            active.flush_counts()  # the hit counts of `tinyllm cache stats`
    with suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


@cli.command("map")
@click.argument("name")
@click.option("--input", "-i", "input_path", required=True, type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="Rows of variables: a .jsonl file (one JSON object per line) or a .csv file with a header; - for stdin.")
@click.option("--output", "-o", "output_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL results, one line per input row. An existing file is resumed.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1),
              help="Requests in flight at once (default: MAX_CONCURRENT_REQUESTS).")
@click.option("--id-field", default="id", show_default=True,
              help="Column or key holding a row's id; rows without it get their 0-based row number.")
@click.option("--input-format", type=click.Choice(["jsonl", "csv"]),
              help="Default: from the input's extension (.csv, else jsonl).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress on stderr: a bar on a terminal, else a plain line at every 1% (and every 30 s).")
@click.option("--max-cost", type=click.FloatRange(min=0), metavar="USD",
              help="Stop sending once the next call could take this run past USD; rerun to resume.")
@click.option("--dask", "dask_address", metavar="ADDRESS",
              help="Run the rows on a Dask cluster: a scheduler address (tcp://host:8786), or local:N for N worker "
                   "processes on 127.0.0.1. Needs the dask extra.")
@_log_option
@_var_option
@_model_options
@_prompts_dir_option
@click.pass_context
def map_(ctx: click.Context, name: str, input_path: str, output_path: str, concurrency: int | None, id_field: str,
         input_format: str | None, progress: bool, max_cost: float | None, dask_address: str | None, variables: dict,
         model: str | None, api_type: str | None, temperature: float | None, max_tokens: int | None, cache: bool | None,
         prompts_dirs: tuple[str, ...]) -> None:
    """Run NAME once per row of --input; write {"id", "content"} or {"id", "error"} lines to --output.

    Columns (CSV) or keys (JSONL) are the variables, over the --var values.
    The whole input is checked first (a malformed row stops the run before
    anything is sent). Each row's line is appended as soon as the row
    finishes, so an interrupted or killed run keeps all its finished work; run
    the same command again to resume: rows whose id already has a content
    line are skipped, rows that ended in error are retried. When every row has
    a line, the file is rewritten (atomically) with one line per input row in
    input order. One run at a time per output file. Exit status 1 if any row
    ended in error; 130 if interrupted (the first Ctrl-C stops at once,
    keeping every finished row).

    With --max-cost, a call that could take the run's cost past it is not sent
    (its worst case: prompt tokens plus max_tokens at the model's prices): the
    run stops sending, finishes the calls in flight, writes what is done, and
    exits with status 1; run it again to go on. The last line on stderr sums
    the run's cost in USD.

    With --dask, the rows go to the cluster's workers in chunks of 50 (each
    chunk on --concurrency threads where it lands) and the results come back
    here, to the same ordered, resumable output file. The workers take their
    settings (REDIS_URL, BASE_URL, API keys, CACHE_API_CALLS, LOG_CALLS) from
    their own environment; the call carries the template and the model options.
    --max-cost and --cache/--no-cache are refused with --dask (they would
    hold in this process only).
    """
    import contextvars

    from . import calllog, usage
    from .budget import Budget
    from .config import configure, get_config
    from .errors import BatchError, BudgetExceededError
    from .runner import Runner

    if input_path == "-" and ctx.meta.get("tinyllm.var_reads_stdin"):
        raise CLIError("--input - and --var KEY=@- both read standard input; give one of them a file")
    fmt = input_format or ("csv" if input_path.lower().endswith(".csv") else "jsonl")
    out_path = Path(output_path)
    if input_path != "-" and out_path.exists() and os.path.samefile(input_path, out_path):
        raise CLIError("--output must not be the --input file")
    if not out_path.parent.is_dir():
        raise CLIError(f"the output directory {str(out_path.parent)!r} does not exist")
    if dask_address is not None and (max_cost is not None or cache is not None):
        raise CLIError("--max-cost and --cache/--no-cache hold in this process only and do not reach Dask workers; "
                       "set MAX_COST or CACHE_API_CALLS in the workers' environment instead")
    if concurrency is not None:
        configure(max_concurrent_requests=concurrency, queue_size=max(concurrency, get_config().queue_size))
    llm = _llm(ctx, name, model, api_type, temperature, max_tokens, cache)
    stats_before = usage.usage_stats()
    cached_before = stats_before["cached_calls"]
    run_budget = Budget(max_cost)  # also sums the run's cost without a limit
    with calllog.batch(), run_budget.activate():  # every row runs in a copy of this context: budget and batch id
        context = contextvars.copy_context()

    def one_row(row: dict) -> Any:
        return context.copy().run(llm.call, **{**variables, **row})

    workers = concurrency or get_config().max_concurrent_requests
    with contextlib.ExitStack() as stack:
        if dask_address is None:
            runner = Runner(one_row, max_workers=workers, progress=progress, desc=_short_name(llm.prompt), unit="row",
                            counters=lambda: {"cached": usage.usage_stats()["cached_calls"] - cached_before})
        else:  # the rows' calls run on the workers (their cache hits are not counted here)
            from .cluster import dask_executor

            executor, threads = stack.enter_context(dask_executor(dask_address))
            runner = Runner(_Row(llm, variables), executor=executor, max_workers=workers, window=2 * threads + 2,
                            progress=progress, desc=_short_name(llm.prompt), unit="row")
        with _readable_twice(input_path) as source:
            try:
                s = runner.to_jsonl(lambda: _rows(source, input_path, fmt, id_field), out_path, line=_result_line,
                                    fatal=(ConfigError,), stop_on=(BudgetExceededError,))
            except BatchError as exc:
                raise CLIError(str(exc)) from exc
            except OSError as exc:
                raise CLIError(f"cannot write {output_path!r}: {exc.strerror or exc}", EXIT_FAILED) from exc
    if s.interrupted:
        dropped = f"; {s.abandoned} call(s) in flight dropped" if s.abandoned else ""
        click.echo(f"interrupted: {s.done_before + s.done_now} of {s.total} rows done ({s.failed} failed) and kept "
                   f"in {output_path}{dropped}; run the same command again to resume", err=True)
        if s.abandoned:
            _exit_now(EXIT_INTERRUPTED)
        ctx.exit(EXIT_INTERRUPTED)
    stats_after = usage.usage_stats()
    from_cache = stats_after["cached_calls"] - cached_before
    note = f" ({from_cache} from the cache)" if from_cache else ""
    unpriced = stats_after["unpriced_calls"] - stats_before["unpriced_calls"]
    over_budget = s.stopped_by
    left = f", {s.total - s.done_before - s.done_now - s.failed} not sent (budget)" if over_budget is not None else ""
    cost = _cost_text(run_budget.spent, unpriced) if dask_address is None else "on the Dask workers (not summed here)"
    click.echo(f"{s.total} rows: {s.done_now} done now{note}, {s.done_before} done before, {s.failed} failed{left} "
               f"-> {output_path}; cost {cost}", err=True)
    if s.dropped:
        click.echo(f"note: dropped the lines of {s.dropped} id(s) of {output_path} that are not in the input", err=True)
    if over_budget is not None:
        _error(f"stopped at the budget of {_usd(over_budget.limit)} (spent {_usd(run_budget.spent)}; the next call "
               f"could cost up to {_usd(over_budget.estimate)}); run the same command again to go on")
        ctx.exit(EXIT_FAILED)
    if s.failed:
        summary = ", ".join(f"{k} x{v}" for k, v in sorted(s.failed_kinds.items()))
        _error(f"{s.failed} of {s.total} rows failed ({summary}); run the same command again to retry them")
        ctx.exit(EXIT_FAILED)


class _Row:
    """One row's call where a Dask worker runs it: picklable (the LLMCall carries its templates)."""

    def __init__(self, llm: Any, variables: dict) -> None:
        self.llm, self.variables = llm, variables

    def __call__(self, row: dict) -> Any:
        return self.llm.call(**{**self.variables, **row})


# -- tokens, cache, config ----------------------------------------------------------


@cli.command()
@click.argument("file", metavar="FILE|-")
@click.option("--model", "-m", help="Model whose tokenizer counts (default: the MODEL setting).")
def tokens(file: str, model: str | None) -> None:
    """Count the tokens of the text in FILE (- for standard input)."""
    from .config import get_config
    from .tokens import count_tokens

    text = _read_text(file, "the file")
    click.echo(count_tokens(text, model or get_config().model))


@cli.group()
def cache() -> None:
    """Inspect or clear the API reply cache (CACHE_FILE_NAME, or Redis with REDIS_URL)."""


def _cache_file_option(f: Callable) -> Callable:
    return click.option("--file", "file", type=click.Path(dir_okay=False),
                        help="The cache file (default: the CACHE_FILE_NAME setting).")(f)


def _cache_path(file: str | None) -> Path:
    from .config import get_config

    return Path(os.path.abspath(os.path.expanduser(file or get_config().cache_file_name)))


def _redis_cache(file: str | None) -> Any:
    """The Redis cache the settings select (CACHE_BACKEND, REDIS_URL) unless --file names a file, else None.

    Raises CLIError when Redis fails."""
    from .cache import cache_backend
    from .config import get_config

    cfg = get_config()
    if file is not None or cache_backend(cfg) != "redis":
        return None
    from .redis_cache import shared_redis_cache

    try:
        cache = shared_redis_cache(cfg)
        cache.len()  # fails now, not half-way through the output
    except OSError as exc:
        raise CLIError(str(exc)) from exc
    return cache


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@cache.command("stats")
@_cache_file_option
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def cache_stats(file: str | None, as_json: bool) -> None:
    """Show the cache's entries, size, and the hits and misses of every process that used it."""
    from .cache import MAGIC, MAGIC_V1, PickleCache

    shared = _redis_cache(file)
    if shared is not None:
        info = shared.stats()
        if as_json:
            click.echo(_dumps(info))
            return
        click.echo(f"redis:   {info['path']}")
        click.echo(f"entries: {info['entries']}")
        click.echo(f"size:    {_size(info['size_bytes'])} (JSON values)")
        click.echo(f"hits:    {info['hits']}   misses: {info['misses']}   (all processes and machines)")
        return
    path = _cache_path(file)
    if path.exists():
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) not in (MAGIC, MAGIC_V1):  # opening it as a cache would convert or initialise it
                raise CLIError(f"{str(path)!r} is not a tinyllm cache file (a TinyTroupe cache is converted "
                               "the first time a call uses it)")
        c = PickleCache(path)
        try:
            info = c.stats()
        finally:
            c.close()
    else:
        info = {"entries": 0, "size_bytes": 0, "hits": 0, "misses": 0, "path": str(path)}
    if as_json:
        click.echo(_dumps({**info, "exists": path.exists()}))
        return
    click.echo(f"file:    {info['path']}{'' if path.exists() else ' (does not exist yet)'}")
    click.echo(f"entries: {info['entries']}")
    click.echo(f"size:    {_size(info['size_bytes'])}")
    click.echo(f"hits:    {info['hits']}   misses: {info['misses']}   (all processes, counted when each exits)")


@cache.command("clear")
@_cache_file_option
def cache_clear(file: str | None) -> None:
    """Remove every entry from the cache (the file, or with REDIS_URL this cache's Redis keys)."""
    from .cache import PickleCache

    shared = _redis_cache(file)
    if shared is not None:
        n = shared.len()
        shared.clear()
        click.echo(f"cleared {n} entries from {shared.path}")
        return
    path = _cache_path(file)
    if not path.exists():
        click.echo(f"no cache file at {path}; nothing to clear")
        return
    c = PickleCache(path)
    try:
        n = len(c)
        c.clear()
    finally:
        c.close()
    click.echo(f"cleared {n} entries from {path}")


# -- logs -----------------------------------------------------------------------------


def _db_option(f: Callable) -> Callable:
    return click.option("--db", "db", type=click.Path(dir_okay=False),
                        help="The call log file (default: the LOG_DB setting, else calls.db in the user's data directory).")(f)


def _open_log(db: str | None) -> tuple[Any, str]:
    """(read connection, path) of the call log; CLIError when there is none or it cannot be read."""
    import sqlite3

    from . import calllog
    from .config import get_config

    path = os.path.abspath(os.path.expanduser(db)) if db else calllog.log_path(get_config())
    try:
        return calllog.connect(path), path
    except FileNotFoundError:
        raise CLIError(f"no call log at {path} yet: calls are logged by `tinyllm call` and `tinyllm map`, "
                       "and by the library with LOG_CALLS=true", EXIT_FAILED) from None
    except sqlite3.Error as exc:
        raise CLIError(f"cannot read the call log {path}: {exc}", EXIT_FAILED) from exc


def _parse_since(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``30m``, ``2h``, ``7d``, ``1w`` (ago), or an ISO date or time (local) -> Unix time."""
    import re
    import time
    from datetime import datetime

    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise click.BadParameter(f"expected a duration such as 30m, 2h, 7d, or a date such as 2026-11-30, got {value!r}",
                                 ctx, param) from None


def _since_option(f: Callable) -> Callable:
    return click.option("--since", callback=_parse_since, metavar="WHEN",
                        help="Only calls since WHEN: 30m, 2h, 7d, 1w ago, or a date/time such as 2026-11-30.")(f)


def _when(ts: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _one_line(text: Any, width: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


@cli.group(invoke_without_command=True)
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many calls.")
@click.option("--template", "-t", help="Only calls of this template (NAME or NAME.system.md).")
@click.option("--model", "-m", help="Only calls that asked for or got this model (* and ? glob).")
@_since_option
@click.option("--errors", is_flag=True, help="Only failed calls.")
@click.option("--batch", "batch_id", metavar="ID", help="Only the calls of one map run (its batch id, or its start).")
@click.option("-q", "text", metavar="QUERY", help="Full-text search (SQLite FTS5 syntax) in templates, variables, "
                                                  "messages, replies and errors.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per call and line.")
@_db_option
@click.pass_context
def logs(ctx: click.Context, limit: int, template: str | None, model: str | None, since: float | None, errors: bool,
         batch_id: str | None, text: str | None, as_json: bool, db: str | None) -> None:
    """List recent calls from the call log, newest first.

    `tinyllm logs show ID` prints one call whole; `tinyllm logs stats` sums calls,
    tokens, cost and errors by model, template and day. `tinyllm call` and `tinyllm map`
    log every call unless --no-log or LOG_CALLS=false; the library logs with LOG_CALLS=true.
    """
    import sqlite3

    from . import calllog

    if ctx.invoked_subcommand is not None:
        return
    conn, path = _open_log(db)
    try:
        found = calllog.query(conn, limit=limit, template=template, model=model, since=since, errors=errors,
                              batch_id=batch_id, text=text)
    except sqlite3.OperationalError as exc:
        raise CLIError(f"bad search query {text!r}: {exc}" if text else f"cannot read the call log {path}: {exc}") from exc
    finally:
        conn.close()
    if as_json:
        for rec in found:
            click.echo(_dumps(rec))
        return
    if not found:
        click.echo(f"no calls match in {path}", err=True)
        return
    statuses = [rec["error"]["type"] if rec["error"] else ("cached" if rec["cached"] else "ok") for rec in found]
    sw = min(24, max(len("STATUS"), *map(len, statuses)))
    click.echo(f"{'ID':<22}  {'TIME':<19}  {'TEMPLATE':<16}  {'MODEL':<22}  {'TOKENS':>11}  {'COST':>10}  "
               f"{'LATENCY':>7}  {'STATUS':<{sw}}  RESPONSE")
    for rec, status in zip(found, statuses):
        tokens = f"{rec['prompt_tokens'] or 0}+{rec['completion_tokens'] or 0}" if rec["prompt_tokens"] else "-"
        latency = f"{rec['latency']:.2f}s" if rec["latency"] is not None else "-"
        tname = _one_line(rec["template"] and rec["template"].replace(".system.md", ""), 16)
        shown = rec["error"]["message"] if rec["error"] else rec["response"]
        click.echo(f"{rec['id']:<22}  {_when(rec['ts'])}  {tname or '-':<16}  {_one_line(rec['model'], 22):<22}  "
                   f"{tokens:>11}  {_usd(rec['cost']):>10}  {latency:>7}  {_one_line(status, sw):<{sw}}  {_one_line(shown, 60)}")


@logs.command("show")
@click.argument("call_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as one JSON object.")
@_db_option
@click.pass_context
def logs_show(ctx: click.Context, call_id: str, as_json: bool, db: str | None) -> None:
    """Print one call whole: what was sent, what came back, usage, cost, timing, error.

    ID is a call id from `tinyllm logs`, or its start, or `last`.
    """
    from . import calllog

    conn, path = _open_log(db or ctx.parent.params.get("db"))
    try:
        rec = calllog.get(conn, call_id)
    except LookupError as exc:
        raise CLIError(str(exc)) from None
    finally:
        conn.close()
    if rec is None:
        raise CLIError(f"no call with id {call_id!r} in {path}", EXIT_FAILED)
    if as_json:
        click.echo(_dumps(rec, indent=2))
        return
    usage_ = rec["usage"] or {}
    endpoint = rec["endpoint"] or {}
    where = endpoint.get("base_url") or endpoint.get("endpoint") or endpoint.get("model_file") or ""
    fields = [
        ("id", rec["id"]), ("time", _when(rec["ts"])),
        ("template", " ".join(filter(None, [rec["template"] or "(none)", rec["template_path"] and f"({rec['template_path']})",
                                            rec["template_hash"] and f"sha256 {rec['template_hash']}"]))),
        ("model", f"{rec['model']}" + (f" (asked {rec['model_requested']})" if rec["model_requested"] not in (None, rec["model"]) else "")),
        ("backend", f"{rec['api_type']} {where}".strip()),
        ("params", _dumps(rec["params"])), ("variables", _dumps(rec["variables"])),
        ("usage", f"{usage_.get('prompt_tokens', 0)} prompt + {usage_.get('completion_tokens', 0)} completion = "
                  f"{usage_.get('total_tokens', 0)} tokens" if usage_ else "-"),
        ("cost", _usd(rec["cost"])),
        ("latency", (f"{rec['latency']:.3f} s" if rec["latency"] is not None else "-")
         + (f", first token after {rec['ttft']:.3f} s" if rec["ttft"] is not None else "")),
        ("cached", "yes" if rec["cached"] else "no"), ("retries", f"{rec['retries']} (output retries: {rec['output_retries']})"),
        ("finish", rec["finish_reason"] or "-"), ("batch", rec["batch_id"] or "-"),
    ]
    if rec["error"]:
        fields.append(("error", f"{rec['error']['type']}: {rec['error']['message']}"))
    for key, value in fields:
        click.echo(f"{key + ':':<11}{value}")
    for m in rec["messages"] or []:
        click.echo(f"\n--- {m.get('role')} ---")
        click.echo(m.get("content") if isinstance(m.get("content"), str) else _dumps(m.get("content")))
    reply = rec["reply"]
    if reply is not None:
        click.echo("\n--- reply ---")
        if reply.get("content") is not None:
            click.echo(reply["content"])
        if reply.get("tool_calls"):
            click.echo("tool calls: " + _dumps(reply["tool_calls"], indent=2))
        if reply.get("refusal"):
            click.echo(f"refusal: {reply['refusal']}")


@logs.command("stats")
@_since_option
@click.option("--template", "-t", help="Only calls of this template.")
@click.option("--model", "-m", help="Only calls of this model (* and ? glob).")
@click.option("--batch", "batch_id", metavar="ID", help="Only the calls of one map run.")
@click.option("--json", "as_json", is_flag=True, help='Print {"by_model", "by_template", "by_day", "total"} as JSON.')
@_db_option
@click.pass_context
def logs_stats(ctx: click.Context, since: float | None, template: str | None, model: str | None,
               batch_id: str | None, as_json: bool, db: str | None) -> None:
    """Sum calls, tokens, cost (USD) and errors by model, by template and by day."""
    from . import calllog

    conn, _ = _open_log(db or ctx.parent.params.get("db"))
    try:
        sums = calllog.stats(conn, since=since, template=template, model=model, batch_id=batch_id)
    finally:
        conn.close()
    if as_json:
        click.echo(_dumps(sums, indent=2))
        return
    header = ("CALLS", "PROMPT TOK", "COMPL TOK", "COST", "UNPRICED", "ERRORS", "CACHED")
    for group, label in (("by_model", "model"), ("by_template", "template"), ("by_day", "day")):
        rows = [(str(r[label]), str(r["calls"]), str(r["prompt_tokens"]), str(r["completion_tokens"]),
                 _usd(r["cost"]) if r["cost"] is not None or not r["unpriced"] else "unknown",
                 str(r["unpriced"] or 0), str(r["errors"] or 0), str(r["cached"] or 0)) for r in sums[group]]
        width = max([len(label)] + [len(r[0]) for r in rows])
        click.echo(f"{label.upper():<{width}}  " + "  ".join(f"{h:>10}" for h in header))
        for r in rows:
            click.echo(f"{r[0]:<{width}}  " + "  ".join(f"{v:>10}" for v in r[1:]))
        click.echo()
    t = sums["total"][0]
    click.echo(f"total: {t['calls']} calls, {t['prompt_tokens']} prompt + {t['completion_tokens']} completion tokens, "
               f"cost {_usd(t['cost']) if t['cost'] is not None or not t['unpriced'] else 'unknown'}"
               + (f" (+ {t['unpriced']} call(s) without a price)" if t["unpriced"] and t["cost"] is not None else "")
               + f", {t['errors'] or 0} errors")


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print {KEY: {value, source}} as JSON.")
def config_(as_json: bool) -> None:
    """Show the effective settings and where each came from; API keys are masked."""
    from .config import KEYS, get_config

    cfg = get_config()
    values = cfg.as_dict(mask_secrets=True)  # never the raw keys
    rows: list[tuple[str, Any, str]] = [(k, values[k], cfg.source(k)) for k in KEYS]
    for name in cfg.secrets:
        rows.append((name, values[name], "environment" if os.environ.get(name) else ".env"))
    detected = None
    if cfg.api_type is None:
        from .clients import detect_api_type

        try:
            detected = detect_api_type(cfg)
        except ConfigError as exc:
            detected = f"none ({' '.join(str(exc).split())})"
    if as_json:
        out = {k: {"value": v, "source": s} for k, v, s in rows}
        if detected is not None:
            out["API_TYPE"]["detected"] = detected
        click.echo(_dumps(out, indent=2))
        return
    shown = [(k, "(unset)" if v is None else v if isinstance(v, str) else _dumps(v), s) for k, v, s in rows]
    kw = max(len(k) for k, _, _ in shown)
    vw = min(40, max(len(v) for _, v, _ in shown))
    for k, v, s in shown:
        click.echo(f"{k:<{kw}}  {v:<{vw}}  {s}")
    if detected is not None:
        click.echo(f"\nAPI_TYPE is unset: auto-detected backend: {detected}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tinyllm`` console script and ``python -m tinyllm``."""
    cli.main(args=argv, prog_name="tinyllm")


if __name__ == "__main__":  # pragma: no cover
    main()
