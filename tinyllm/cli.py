"""The ``tinyllm`` command: list, render and call prompt templates; map a prompt over a file.

Subcommands: ``prompts`` (and ``prompts show``), ``render``, ``call``, ``map``,
``tokens``, ``cache stats|clear``, ``config``. ``python -m tinyllm`` is the same.

Exit codes: 0 success; 1 an API or output error (for ``map``: any row that
ended in error); 2 bad usage (unknown template, missing variable, bad file,
bad ``--var``, bad configuration); 130 interrupted. A failure prints one line,
``error: ...``, on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import stat
import sys
import threading
import traceback
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable

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
            return super().invoke(ctx)
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


def _model_options(f: Callable) -> Callable:
    for option in reversed([
        click.option("--model", "-m", help="Model name (default: the front matter's, else the MODEL setting)."),
        click.option("--api-type", help="Backend: openai, ollama, azure, llamacpp or a registered one "
                                        "(default: API_TYPE, else auto-detected)."),
        click.option("--temperature", type=click.FloatRange(min=0), help="Sampling temperature."),
        click.option("--max-tokens", type=click.IntRange(min=1), help="Maximum tokens in the reply."),
        click.option("--cache/--no-cache", default=None,
                     help="Cache API replies on disk (default: the CACHE_API_CALLS setting)."),
    ]):
        f = option(f)
    return f


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
@click.option("--model", "-m", help="Model whose tokenizer counts the tokens (default: the front matter's, "
                                    "else the MODEL setting).")
@click.option("--json", "as_json", is_flag=True, help="Print {messages, model, prompt_tokens} as JSON.")
@_prompts_dir_option
@click.pass_context
def render(ctx: click.Context, name: str, variables: dict, model: str | None, as_json: bool,
           prompts_dirs: tuple[str, ...]) -> None:
    """Print the messages NAME renders to, and their prompt token count, without sending anything."""
    from .config import get_config
    from .tokens import count_tokens

    _, prompt = _resolve(name, _search_dirs(ctx))
    messages = prompt.render(variables)
    model = model or prompt.params.get("model") or get_config().model
    n = count_tokens(messages, model)
    if as_json:
        click.echo(_dumps({"messages": messages, "model": model, "prompt_tokens": n}, indent=2))
        return
    for m in messages:
        click.echo(f"--- {m['role']} ---")
        click.echo(m["content"])
        click.echo()
    click.echo(f"--- {n} prompt tokens ({model}) ---")


@cli.command()
@click.argument("name")
@_var_option
@_model_options
@click.option("--stream/--no-stream", default=None,
              help="Print the reply as it is written (default: when stdout is a terminal and not --json).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the complete call record (content, model, usage, cached, latency, ...) as JSON at the end.")
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


def _row_key(row_id: Any) -> str:
    return json.dumps(row_id, sort_keys=True, ensure_ascii=False, default=str)


def _read_rows(path: str, fmt: str, id_field: str) -> list[tuple[Any, dict]]:
    """(id, variables) per input row, in input order. Raises CLIError (exit 2) for a bad file."""
    text = _read_text(path, "the input")
    rows: list[tuple[Any, dict]] = []
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for i, rec in enumerate(reader):
                if None in rec:
                    raise CLIError(f"{path}: row {i} (line {reader.line_num}) has more fields than the header")
                variables = {k: v for k, v in rec.items() if v is not None}
                rid = variables.get(id_field)
                rows.append((rid if rid not in (None, "") else i, variables))
        except csv.Error as exc:
            raise CLIError(f"{path}: line {reader.line_num}: bad CSV: {exc}") from exc
    else:
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise CLIError(f"{path}: line {lineno} is not valid JSON: {exc}") from exc
            if not isinstance(rec, dict):
                raise CLIError(f"{path}: line {lineno} is not a JSON object (one object of variables per line)")
            rid = rec.get(id_field)
            rows.append((rid if rid not in (None, "") else len(rows), rec))
    seen: dict[str, int] = {}
    for i, (rid, _) in enumerate(rows):
        prior = seen.setdefault(_row_key(rid), i)
        if prior != i:
            raise CLIError(f"{path}: rows {prior} and {i} have the same id {rid!r}; ids must be unique "
                           f"(--id-field {id_field!r}, else the row number)")
    return rows


def _load_done(path: Path) -> tuple[dict[str, str], set[str]]:
    """(row key -> its line, for rows with a ``content``; keys of every row with a line) of an existing output file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return {}, set()
    except UnicodeDecodeError as exc:
        raise CLIError(f"the output file {str(path)!r} is not UTF-8 text (byte {exc.start}); "
                       "is it really an earlier output of tinyllm map?") from exc
    except OSError as exc:
        raise CLIError(f"cannot read the output file {str(path)!r}: {exc.strerror or exc}") from exc
    done: dict[str, str] = {}
    seen: set[str] = set()
    for line in text.split("\n"):  # not splitlines(): a JSON string may hold U+2028
        line = line.strip()
        try:
            rec = json.loads(line) if line else None
        except ValueError:  # e.g. a line torn when a run was killed
            continue
        if isinstance(rec, dict) and "id" in rec:
            seen.add(_row_key(rec["id"]))
            if "content" in rec and "error" not in rec:
                done[_row_key(rec["id"])] = line
    return done, seen


def _result_line(row_id: Any, value: Any, exc: BaseException | None) -> str:
    if exc is None:
        return _dumps({"id": row_id, "content": _plain(value)})
    return _dumps({"id": row_id, "error": {"type": type(exc).__name__, "message": str(exc)}})


def _open_append(path: Path) -> Any:
    """The output file opened for appending, on a fresh line (a run killed mid-write may leave half a line)."""
    f = open(path, "a+b")
    try:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")
                f.flush()
    except BaseException:
        f.close()
        raise
    return f


def _replace_atomically(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        with suppress(OSError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


@cli.command("map")
@click.argument("name")
@click.option("--input", "-i", "input_path", required=True, type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="Rows of variables: a .jsonl file (one JSON object per line) or a .csv file with a header; - for stdin.")
@click.option("--output", "-o", "output_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL results, one line per input row in input order. An existing file is resumed.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1),
              help="Requests in flight at once (default: MAX_CONCURRENT_REQUESTS).")
@click.option("--id-field", default="id", show_default=True,
              help="Column or key holding a row's id; rows without it get their 0-based row number.")
@click.option("--input-format", type=click.Choice(["jsonl", "csv"]),
              help="Default: from the input's extension (.csv, else jsonl).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr (only when stderr is a terminal).")
@_var_option
@_model_options
@_prompts_dir_option
@click.pass_context
def map_(ctx: click.Context, name: str, input_path: str, output_path: str, concurrency: int | None, id_field: str,
         input_format: str | None, progress: bool, variables: dict, model: str | None, api_type: str | None,
         temperature: float | None, max_tokens: int | None, cache: bool | None, prompts_dirs: tuple[str, ...]) -> None:
    """Run NAME once per row of --input; write {"id", "content"} or {"id", "error"} lines to --output.

    Columns (CSV) or keys (JSONL) are the variables, over the --var values.
    Lines are written in input order as soon as a row and all rows before it
    are done, so an interrupted run keeps its finished work; run the same
    command again to resume: rows whose id already has a content line are
    skipped, rows that ended in error are retried. At the end the output file
    is rewritten (atomically) with exactly one line per input row. Exit status
    1 if any row ended in error.
    """
    from . import usage
    from .config import configure, get_config

    if input_path == "-" and ctx.meta.get("tinyllm.var_reads_stdin"):
        raise CLIError("--input - and --var KEY=@- both read standard input; give one of them a file")
    fmt = input_format or ("csv" if input_path.lower().endswith(".csv") else "jsonl")
    out_path = Path(output_path)
    if input_path != "-" and out_path.exists() and os.path.samefile(input_path, out_path):
        raise CLIError("--output must not be the --input file")
    if not out_path.parent.is_dir():
        raise CLIError(f"the output directory {str(out_path.parent)!r} does not exist")
    rows = _read_rows(input_path, fmt, id_field)
    if concurrency is not None:
        configure(max_concurrent_requests=concurrency, queue_size=max(concurrency, get_config().queue_size))
    concurrency = concurrency or get_config().max_concurrent_requests
    llm = _llm(ctx, name, model, api_type, temperature, max_tokens, cache)

    done, seen = _load_done(out_path)
    keys = [_row_key(rid) for rid, _ in rows]
    lines: list[str | None] = [done.get(k) for k in keys]
    pending = [i for i, line in enumerate(lines) if line is None]
    unknown = len(seen - set(keys))
    failed: dict[int, str] = {}  # row -> error type

    from tqdm import tqdm

    bar = tqdm(total=len(rows), initial=len(rows) - len(pending), desc=_short_name(llm.prompt), unit="row",
               file=sys.stderr, disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
    tasks: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            i = tasks.get()
            if i is None or stop.is_set():
                return
            try:
                results.put((i, llm.call(**{**variables, **rows[i][1]}), None))
            except Exception as exc:  # reported on the row's line
                results.put((i, None, exc))

    threads = [threading.Thread(target=worker, name=f"tinyllm-map-{n}", daemon=True)
               for n in range(min(concurrency, len(pending)))]
    window = max(64, 8 * concurrency)  # rows started ahead of the first unwritten one: bounds the reorder buffer
    ready: dict[int, str] = {}
    submitted = written = 0
    cached_before = usage.usage_stats()["cached_calls"]
    out = _open_append(out_path)
    try:
        for t in threads:
            t.start()
        while written < len(pending):
            while submitted < len(pending) and submitted < written + window:
                tasks.put(pending[submitted])
                submitted += 1
            try:
                i, value, exc = results.get(timeout=0.25)
            except queue.Empty:
                continue
            if isinstance(exc, ConfigError):  # the same for every row: stop
                raise exc
            if exc is not None:
                failed[i] = type(exc).__name__
            lines[i] = ready[i] = _result_line(rows[i][0], value, exc)
            bar.update(1)
            if failed:
                bar.set_postfix(errors=len(failed), refresh=False)
            while written < len(pending) and pending[written] in ready:
                out.write(ready.pop(pending[written]).encode("utf-8") + b"\n")
                written += 1
            out.flush()
    except KeyboardInterrupt:
        stop.set()
        for _ in threads:
            tasks.put(None)
        busy = [t for t in threads if t.is_alive()]
        if busy:  # exiting under a running call (an embedded model mid-generation) can crash the interpreter
            click.echo(f"interrupted: waiting for {len(busy)} call(s) in flight to end...", err=True)
            for t in busy:
                t.join()
        bar.close()
        out.close()
        click.echo(f"interrupted: {len(rows) - len(pending) + written} of {len(rows)} rows are in {output_path}; "
                   "run the same command again to resume", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    finally:
        stop.set()
        for _ in threads:
            tasks.put(None)
        bar.close()
        out.close()
    try:
        _replace_atomically(out_path, [line for line in lines if line is not None])
    except OSError as exc:
        raise CLIError(f"cannot write {output_path!r}: {exc.strerror or exc}", EXIT_FAILED) from exc
    from_cache = usage.usage_stats()["cached_calls"] - cached_before
    note = f" ({from_cache} from the cache)" if from_cache else ""
    click.echo(f"{len(rows)} rows: {len(pending) - len(failed)} done now{note}, {len(rows) - len(pending)} "
               f"done before, {len(failed)} failed -> {output_path}", err=True)
    if unknown:
        click.echo(f"note: dropped the lines of {unknown} id(s) of {output_path} that are not in the input", err=True)
    if failed:
        kinds: dict[str, int] = {}
        for kind in failed.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        summary = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
        _error(f"{len(failed)} of {len(rows)} rows failed ({summary}); run the same command again to retry them")
        ctx.exit(EXIT_FAILED)


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
