"""``tinyllm ui``: serve the local workbench page (see :mod:`tinyllm.ui`)."""

from __future__ import annotations

import click

from ._common import _log_option, _prompts_dir_option, _search_dirs, _turn_on_log, cli


@cli.command()
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="TCP port (0: any free one)."
)
@click.option(
    "--host",
    default=None,
    metavar="ADDRESS",
    help="Listen on ADDRESS instead of 127.0.0.1 (e.g. 0.0.0.0); then every request needs the token "
    "printed at start (it is in the URL to open).",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default web browser.")
@click.option(
    "--db",
    "db",
    type=click.Path(dir_okay=False),
    help="The call log file the page shows and its runs are "
    "logged to (default: LOG_DB, else calls.db in the "
    "user's data directory).",
)
@_prompts_dir_option
@_log_option
@click.pass_context
def ui(
    ctx: click.Context, port: int, host: str | None, open_browser: bool, db: str | None, prompts_dirs: tuple[str, ...]
) -> None:
    """Serve the workbench page: edit prompts and see them rendered, run and compare models,
    read evaluations and the call log. Needs `pip install 'tinyllm[ui]'`.

    It listens on 127.0.0.1 unless --host is given. Run and Compare are logged (LOG_CALLS is on
    unless --no-log or LOG_CALLS=false), to the --db file when given.
    """
    import secrets

    from ..ui import LOOPBACK, serve

    _turn_on_log(ctx)
    if db and not ctx.meta.get("tinyllm.no_log"):  # the page's runs go to the log it shows
        from ..config import configure

        configure(log_db=db)
    listen = host or LOOPBACK
    token = secrets.token_urlsafe(24) if host is not None else None

    def ready(bound: int) -> None:
        shown = listen if listen not in ("0.0.0.0", "::") else "127.0.0.1"
        shown = f"[{shown}]" if ":" in shown else shown
        url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
        click.echo(f"tinyllm workbench at {url}  (Ctrl-C stops it)", err=False)
        if open_browser:
            import webbrowser

            webbrowser.open(url)

    serve(host=listen, port=port, prompts_dirs=_search_dirs(ctx), token=token, log_db=db, on_ready=ready)
