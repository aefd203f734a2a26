"""``tinyllm plugins``: list the installed plugins (entry-point group ``tinyllm.plugins``) and what they add."""

from __future__ import annotations

import warnings

import click

from ._common import EXIT_FAILED, _dumps, cli


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_context
def plugins_command(ctx: click.Context, as_json: bool) -> None:
    """List the installed plugins: name, package and version, and the clients and tools each registered.

    A plugin that failed to load is listed with its error (and the command exits 1).
    """
    from ..clients._plugins import load_plugins

    with warnings.catch_warnings():  # the failures are listed below, not warned about twice
        warnings.simplefilter("ignore")
        found = load_plugins()
    if as_json:
        click.echo(_dumps([p.as_dict() for p in found], indent=2))
    elif not found:
        click.echo("no plugins installed (entry-point group 'tinyllm.plugins')")
    for p in found if not as_json else ():
        package = f"{p.distribution} {p.version}" if p.distribution else "?"
        if p.loaded:
            adds = (
                ", ".join([*(f"client {c}" for c in p.clients), *(f"tool {t}" for t in p.tools)])
                or "nothing registered"
            )
            click.echo(f"{p.name}\t{package}\t{p.value}\t{adds}")
        else:
            click.echo(f"{p.name}\t{package}\t{p.value}\tFAILED: {p.error}")
    if any(not p.loaded for p in found):
        ctx.exit(EXIT_FAILED)
