"""``tinyllm prompts`` and ``tinyllm prompts show``: list the templates on the search path, show one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import TemplateError
from ._common import CLIError, EXIT_USAGE, _dumps, _prompts_dir_option, _read_text, _resolve, _search_dirs, _short_name, cli


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
