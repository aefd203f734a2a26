"""``tinyllm batches status|fetch|cancel OUTPUT``: the Batch API batches recorded beside a ``map --batch-api`` output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._common import CLIError, _turn_on_log, cli


def _state(output: str) -> Any:
    from ..batch._batch_files import BatchState, state_path
    from ..errors import BatchError

    path = state_path(output)
    if not path.exists():
        raise CLIError(
            f"no batches are recorded for {output!r} (no {path.name}); run tinyllm map ... --batch-api first"
        )
    try:
        return BatchState.load(path)
    except BatchError as exc:
        raise CLIError(str(exc)) from exc


def _recorded_api_type(state: Any) -> str | None:
    """The api_type the map command was given, else ``anthropic`` when the batches went through Message
    Batches (whatever API_TYPE says now), else None (API_TYPE or auto-detection)."""
    recorded = (state.command or {}).get("api_type")
    if recorded is None and state.batches and all(b.get("api") == "anthropic" for b in state.batches):
        return "anthropic"
    return recorded


def _api(state: Any, api_type: str | None) -> Any:
    from ..batch._batch_files import api_for
    from ..batch._replay import check_batch_client
    from ..clients import get_client

    kinds = {b.get("api", "openai") for b in state.unfinished()}
    api = api_for(check_batch_client(get_client(api_type or _recorded_api_type(state))))
    if kinds - {api.kind}:
        raise CLIError(
            f"these batches were sent through the {', '.join(sorted(kinds))} batch API; this client is "
            f"{api.kind!r} (give --api-type)"
        )
    return api


_api_type_option = click.option(
    "--api-type",
    help="The client the batches were sent with (default: the one recorded, else API_TYPE or auto-detected).",
)


@cli.group("batches")
def batches() -> None:
    """The Batch API batches (OpenAI, Azure OpenAI) or Message Batches (Anthropic) of a `tinyllm map
    --batch-api` output (recorded in OUTPUT.batches.json)."""


@batches.command("status")
@click.argument("output", type=click.Path(dir_okay=False))
@_api_type_option
def status(output: str, api_type: str | None) -> None:
    """One line per recorded batch: its id, status, request counts, and whether its results are in OUTPUT.

    Batches whose results are in OUTPUT are shown as recorded; the others are asked for now.
    """
    state = _state(output)
    if not state.batches:
        click.echo("no batches recorded")
        return
    api = _api(state, api_type) if state.unfinished() else None
    for entry in state.batches:
        if not entry.get("fetched") and entry.get("id") and api is not None:
            batch = api.retrieve(entry["id"])
            entry = {**entry, "status": batch.get("status"), "request_counts": batch.get("request_counts")}
        counts = entry.get("request_counts") or {}
        where = "in the output" if entry.get("fetched") else "not collected yet"
        rows = f", {len(entry.get('rows') or {})} rows" if not entry.get("fetched") else ""
        click.echo(
            f"{entry.get('id') or '(being created from ' + entry['input_file_id'] + ')'}  "
            f"{entry.get('status') or 'submitting'}  {counts.get('completed', 0)}/{counts.get('total', 0)} done, "
            f"{counts.get('failed', 0)} failed{rows}; {where}"
        )


@batches.command("cancel")
@click.argument("output", type=click.Path(dir_okay=False))
@_api_type_option
def cancel(output: str, api_type: str | None) -> None:
    """Cancel every recorded batch that is still running. The rows they did not run get error lines
    when the batches are collected (the next map run or `batches fetch`), and a later map run sends them again."""
    from ..batch._batch_files import TERMINAL

    state = _state(output)
    running = [b for b in state.unfinished() if b.get("id")]
    if not running:
        click.echo("no running batches recorded")
        return
    api = _api(state, api_type)
    for entry in running:
        batch = api.retrieve(entry["id"])
        if batch.get("status") in TERMINAL or batch.get("status") in api.stopping:
            click.echo(f"{entry['id']}: already {batch.get('status')}")
            continue
        click.echo(f"{entry['id']}: {api.cancel(entry['id']).get('status')}")


@batches.command("fetch")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option(
    "--wait", is_flag=True, help="Wait until every recorded batch has ended (polling every BATCH_POLL_INTERVAL s)."
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress on stderr while waiting.")
@click.pass_context
def fetch(ctx: click.Context, output: str, wait: bool, progress: bool) -> None:
    """Collect the recorded batches that have ended into OUTPUT (nothing new is submitted), with the
    template, input and options the map command recorded."""
    from ..cache._store import force_api_cache
    from ..call import LLMCall
    from .map import run_batches

    state = _state(output)
    cmd = state.command
    if not cmd or not cmd.get("input"):
        raise CLIError(
            "these batches were not submitted by `tinyllm map ... --input FILE` (no command recorded); "
            "collect them by running the same LLMCall.map(..., batch_api=True) again"
        )
    if not Path(cmd["input"]).is_file():
        raise CLIError(f"the recorded input {cmd['input']!r} is gone; the rows are needed to collect the results")
    params = {k: cmd.get(k) for k in ("model", "temperature", "max_tokens") if cmd.get(k) is not None}
    from ._common import _resolve

    template, _ = _resolve(cmd["name"], cmd.get("prompts_dirs") or [])
    llm = LLMCall(template, prompts_dir=cmd.get("prompts_dirs") or None, api_type=_recorded_api_type(state), **params)
    if cmd.get("cache") is not None:
        force_api_cache(cmd["cache"])
    _turn_on_log(ctx)
    run_batches(
        ctx,
        llm,
        cmd["input"],
        cmd.get("input_format") or "jsonl",
        cmd.get("id_field") or "id",
        cmd.get("variables") or {},
        Path(output),
        max_cost=None,
        progress=progress,
        submit=False,
        wait=wait,
        command=None,
    )
