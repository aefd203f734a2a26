"""``tinyllm prompts`` and ``tinyllm prompts show``: list the templates on the search path, show one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from ..errors import TemplateError
from ._common import (
    CLIError,
    EXIT_USAGE,
    _dumps,
    _prompts_dir_option,
    _read_text,
    _resolve,
    _search_dirs,
    _short_name,
    cli,
)


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
    from ..prompts._templates import list_prompts, search_path

    dirs = _search_dirs(ctx)
    errors: list[tuple[Path, TemplateError]] = []
    loaded = list_prompts(dirs, errors=errors)
    # system file name -> Prompt, or the TemplateError it raised (broken ones listed last)
    found: dict[str, Any] = {**{p.name: p for p in loaded}, **{path.name: exc for path, exc in errors}}
    broken = [exc for _, exc in errors]
    if as_json:
        click.echo(
            _dumps(
                [
                    {
                        "name": _short_name(p),
                        "system": str(p.system_path),
                        "user": str(p.user_path) if p.user_path else None,
                        "description": p.description,
                        "variables": sorted(p.variables),
                    }
                    if not isinstance(p, TemplateError)
                    else {"name": name, "error": str(p)}
                    for name, p in found.items()
                ],
                indent=2,
            )
        )
    elif not found:
        click.echo(f"no templates found; searched: {', '.join(str(d) for d in search_path(dirs))}", err=True)
    else:
        rows = [
            (_short_name(p), p.description or "", ", ".join(sorted(p.variables)) or "-")
            if not isinstance(p, TemplateError)
            else (name, f"(broken: {' '.join(str(p).split())})", "")
            for name, p in found.items()
        ]
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


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

_SYSTEM = """---
description: {name}, in one line (shown by `tinyllm prompts`)
temperature: 0
max_tokens: 256
# output_type: str       # or int, float, bool, list, dict, [label, label]; see docs/typed-output.md
---
You are a careful assistant. Answer in one short paragraph.
"""

_USER = """{{{{ text }}}}
"""


@cli.command("new")
@click.argument("name")
@click.option(
    "--prompts-dir",
    "directory",
    default="prompts",
    show_default=True,
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Directory to write the pair into (created if missing).",
)
def new(name: str, directory: str) -> None:
    """Write a new prompt pair: NAME.system.md (with front matter) and NAME.user.md.

    NAME is letters, digits, '-' and '_' (a trailing .system.md is dropped).
    Refuses to overwrite: exits 2 when either file exists. Then try
    `tinyllm render NAME --var text=...` and `tinyllm call NAME --var text=...`.
    """
    name = name.removesuffix(".system.md").removesuffix(".user.md")
    if not _NAME.fullmatch(name):
        raise CLIError(f"bad prompt name {name!r}: use letters, digits, '-' and '_' (e.g. summarize)", EXIT_USAGE)
    folder = Path(directory)
    paths = {folder / f"{name}.system.md": _SYSTEM.format(name=name), folder / f"{name}.user.md": _USER.format()}
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        raise CLIError(
            f"{' and '.join(existing)} already {verb}; not overwriting (pick another NAME or delete it)", EXIT_USAGE
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path, text in paths.items():
            with path.open("x", encoding="utf-8") as f:  # "x": never overwrite, even in a race
                f.write(text)
    except OSError as exc:
        raise CLIError(f"cannot write the prompt pair in {folder}: {exc}", EXIT_USAGE) from exc
    for path in paths:
        click.echo(f"wrote {path}")
    hint = "" if folder == Path("prompts") else f" --prompts-dir {folder}"
    click.echo(f"next: tinyllm{hint} render {name} --var text='Hello'")
