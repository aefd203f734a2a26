"""``tinyllm render``, ``tinyllm call`` and ``tinyllm chat``: one template, rendered, sent, or talked to."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import ConfigError, TinyLLMError
from ._common import (
    CLIError,
    _describe,
    _dumps,
    _fallbacks,
    _llm,
    _log_option,
    _mcp_option,
    _model_options,
    _parse_tools,
    _plain,
    _print_tool_call,
    _prompts_dir_option,
    _resolve,
    _search_dirs,
    _show,
    _var_option,
    cli,
)


def _parse_media(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list:
    """``NAME=PATH`` (or, for images, ``NAME=URL``) pairs as ``(name, Image | Audio | File)``; a bad file is a usage error."""
    from ..errors import MediaError
    from ..media import Audio, File, Image

    kind = {"images": Image, "audios": Audio, "files": File}[param.name or ""]
    out = []
    for item in values:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or not value:
            raise click.BadParameter(f"expected NAME=PATH with NAME a variable name, got {item!r}", ctx, param)
        try:
            out.append((key, kind(value)))
        except MediaError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return out


def _media_options(f: Any) -> Any:
    """``--image``, ``--audio``, ``--file``: media template variables from the shell."""
    for flag, dest, what in (
        ("--file", "files", "a PDF file"),
        ("--audio", "audios", "a WAV or MP3 file"),
        ("--image", "images", "a PNG, JPEG, GIF or WebP file, or an http(s) URL"),
    ):
        f = click.option(
            flag,
            dest,
            multiple=True,
            metavar="NAME=PATH",
            callback=_parse_media,
            help=f"A template variable holding {what}, placed where the template writes "
            "{{ NAME }} (repeatable; a NAME given twice is a list).",
        )(f)
    return f


def _merge_media(variables: dict, *groups: list) -> dict:
    """``variables`` with the media of ``groups`` added (a name given twice becomes a list)."""
    out = dict(variables)
    for name, value in (pair for group in groups for pair in group):
        if name in variables:
            raise CLIError(f"{name!r} is given both as --var and as an --image/--audio/--file")
        if name not in out:
            out[name] = value
        elif isinstance(out[name], list):
            out[name].append(value)
        else:
            out[name] = [out[name], value]
    return out


def _shown_content(content: Any) -> str:
    """A message's content as text: media parts as one line each (type, sha256, size; never the bytes)."""
    from ..media import redacted

    if isinstance(content, str):
        return content
    lines = []
    for part in redacted([{"role": "user", "content": content}])[0]["content"]:
        if part.get("type") == "text":
            lines.append(part["text"])
        else:
            body = part.get(part.get("type"), {})
            lines.append(f"[{part.get('type')}: {body.get('url') or body.get('data') or body.get('file_data')}]")
    return "".join(line if line.endswith("\n") or i == len(lines) - 1 else line + "\n" for i, line in enumerate(lines))


@cli.command()
@click.argument("name")
@_var_option
@_media_options
@click.option("--model", "-m", help="Model to ask (default: the front matter's, else the MODEL setting).")
@click.option(
    "--api-type", help="Backend whose model name and tokenizer apply (default: API_TYPE, else auto-detected)."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print {messages, model, api_type, params, prompt_tokens} as JSON."
)
@_prompts_dir_option
@click.pass_context
def render(
    ctx: click.Context,
    name: str,
    variables: dict,
    images: list,
    audios: list,
    files: list,
    model: str | None,
    api_type: str | None,
    as_json: bool,
    prompts_dirs: tuple[str, ...],
) -> None:
    """Print the messages NAME renders to, the parameters that would be sent, and the prompt's
    tokens as the answering backend counts them (its model name and tokenizer), sending nothing.
    Images, audio and files are shown as their type, sha256 and size."""
    from ..call import plan_output
    from ..clients import get_client
    from ..config import get_config
    from ..media import redacted
    from ..tokens import count_tokens

    variables = _merge_media(variables, images, audios, files)
    _, prompt = _resolve(name, _search_dirs(ctx))
    messages = prompt.render(variables)
    given = {"model": model} if model else {}
    note: str | None = None
    sender: Any = None
    try:
        sender = get_client(api_type)
    except ConfigError as exc:  # no backend configured: tiktoken's count for the configured model
        if api_type:
            raise
        note = f"no backend configured ({str(exc).split('.')[0]}); counted with tiktoken"
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
        click.echo(
            _dumps(
                {
                    "messages": redacted(messages),
                    "model": used_model,
                    "api_type": backend,
                    "params": params,
                    "prompt_tokens": n,
                },
                indent=2,
            )
        )
        return
    for m in messages:
        click.echo(f"--- {m['role']} ---")
        click.echo(_shown_content(m["content"]))
        click.echo()
    if params:
        click.echo(f"--- parameters: {_dumps(params)} ---")
    where = f"{backend}, {used_model}" if backend else used_model
    click.echo(f"--- {n} prompt tokens ({where}) ---" + (f"\n({note})" if note else ""))


@cli.command()
@click.argument("name")
@_var_option
@_media_options
@_model_options
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Print the reply as it is written (default: when stdout is a terminal and not --json).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the complete call record (content, model, usage, cost in USD or null, cached, latency, ...) as JSON at the end.",
)
@_log_option
@click.option(
    "--tool",
    "tool_paths",
    multiple=True,
    metavar="MODULE:FUNCTION",
    callback=_parse_tools,
    help="A Python function the model may call (repeatable), imported from MODULE (the working "
    "directory is searched first); each call it runs is printed on stderr.",
)
@_mcp_option
@click.option("--tool-choice", help="auto, required, none, or a tool's name (default: the front matter's, else auto).")
@_prompts_dir_option
@click.pass_context
def call(
    ctx: click.Context,
    name: str,
    variables: dict,
    images: list,
    audios: list,
    files: list,
    model: str | None,
    api_type: str | None,
    temperature: float | None,
    max_tokens: int | None,
    cache: bool | None,
    stream: bool | None,
    as_json: bool,
    tool_paths: list,
    mcp_servers: list,
    tool_choice: str | None,
    prompts_dirs: tuple[str, ...],
) -> None:
    """Render NAME with the variables, send it, print the reply's content.

    A reply coerced to another output type than str (the front matter's
    output_type) is printed as JSON. Streamed text is printed as it arrives;
    a coerced value is printed again at the end only with --json.
    --image/--audio/--file NAME=PATH place an image (also an http(s) URL), audio or a
    PDF where the template writes {{ NAME }}; --json shows them as sha256 and size.
    """
    from ..media import redacted

    variables = _merge_media(variables, images, audios, files)
    llm = _llm(
        ctx,
        name,
        model,
        api_type,
        temperature,
        max_tokens,
        cache,
        tools=[*tool_paths, *mcp_servers] or None,
        tool_choice=tool_choice,
        on_tool_call=_print_tool_call,
    )
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
        record["messages"] = redacted(record["messages"])
        record["content"] = _plain(response.value)
        record["latency"] = round(response.latency, 4) if response.latency is not None else None
        click.echo(_dumps(record))


@cli.command()
@click.argument("name", required=False)
@_var_option
@_model_options
@click.option("--system", help="A plain system message instead of a template.")
@_mcp_option
@_prompts_dir_option
@click.pass_context
def chat(
    ctx: click.Context,
    name: str | None,
    variables: dict,
    model: str | None,
    api_type: str | None,
    temperature: float | None,
    max_tokens: int | None,
    cache: bool | None,
    system: str | None,
    mcp_servers: list,
    prompts_dirs: tuple[str, ...],
) -> None:
    """An interactive conversation, each answer streamed as it is written.

    NAME (optional) is a template whose system part opens the conversation
    (rendered with the --var values). Type a message and press Enter; `exit`
    or Ctrl-D ends the conversation; Ctrl-C stops the current answer (the
    turn is dropped) without leaving.
    """
    from .. import force_api_cache, get_client
    from ..chat import LLMChat

    if name is not None and system is not None:
        raise CLIError("give a template NAME or --system, not both")
    params: dict[str, Any] = {
        k: v for k, v in (("model", model), ("temperature", temperature), ("max_tokens", max_tokens)) if v is not None
    }
    template = _resolve(name, _search_dirs(ctx))[0] if name is not None else None
    if mcp_servers:
        params.update(tools=mcp_servers, on_tool_call=_print_tool_call)
    conversation = LLMChat(
        template, system=system, prompts_dir=_search_dirs(ctx), api_type=api_type, fallbacks=_fallbacks(ctx), **params
    )
    if template is not None and conversation.prompt is not None:
        # the system part only: each line typed is the user's message
        conversation.history = conversation.prompt.render(variables, include_user=False)
    if cache is not None:
        force_api_cache(cache)
    get_client(api_type)  # ConfigError (exit 2) now
    with conversation:  # MCP servers started at the first turn that uses them stay open until the end
        _converse(conversation)


def _converse(conversation: Any) -> None:
    """The chat loop: a line in, the answer streamed out, until `exit`, `quit` or end of input."""
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
