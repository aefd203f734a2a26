"""``tinyllm logs``, ``logs show``, ``logs stats``: the call log."""

from __future__ import annotations

import os
from typing import Any, Callable

import click

from ._common import CLIError, EXIT_FAILED, _dumps, _usd, cli


# -- logs -----------------------------------------------------------------------------


def _db_option(f: Callable) -> Callable:
    return click.option(
        "--db",
        "db",
        type=click.Path(dir_okay=False),
        help="The call log file (default: the LOG_DB setting, else calls.db in the user's data directory).",
    )(f)


def _open_log(db: str | None) -> tuple[Any, str]:
    """(read connection, path) of the call log; CLIError when there is none or it cannot be read."""
    import sqlite3

    from ..observe import _calllog as calllog
    from ..config import get_config

    path = os.path.abspath(os.path.expanduser(db)) if db else calllog.log_path(get_config())
    try:
        return calllog.connect(path), path
    except FileNotFoundError:
        raise CLIError(
            f"no call log at {path} yet: calls are logged by `tinyllm call` and `tinyllm map`, "
            "and by the library with LOG_CALLS=true",
            EXIT_FAILED,
        ) from None
    except sqlite3.Error as exc:
        hint = (
            (
                f"; the file is damaged: the next logged call moves it aside to {path}.damaged-<time> and starts a "
                f"new log (or move it yourself: mv {path} {path}.damaged)"
            )
            if calllog.damaged(exc)
            else ""
        )
        raise CLIError(f"cannot read the call log {path}: {exc}{hint}", EXIT_FAILED) from exc


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
        raise click.BadParameter(
            f"expected a duration such as 30m, 2h, 7d, or a date such as 2026-11-30, got {value!r}", ctx, param
        ) from None


def _since_option(f: Callable) -> Callable:
    return click.option(
        "--since",
        callback=_parse_since,
        metavar="WHEN",
        help="Only calls since WHEN: 30m, 2h, 7d, 1w ago, or a date/time such as 2026-11-30.",
    )(f)


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
@click.option(
    "-q",
    "text",
    metavar="QUERY",
    help="Full-text search (SQLite FTS5 syntax) in templates, variables, messages, replies and errors.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per call and line.")
@_db_option
@click.pass_context
def logs(
    ctx: click.Context,
    limit: int,
    template: str | None,
    model: str | None,
    since: float | None,
    errors: bool,
    batch_id: str | None,
    text: str | None,
    as_json: bool,
    db: str | None,
) -> None:
    """List recent calls from the call log, newest first.

    `tinyllm logs show ID` prints one call whole; `tinyllm logs stats` sums calls,
    tokens, cost and errors by model, template and day. `tinyllm call` and `tinyllm map`
    log every call unless --no-log or LOG_CALLS=false; the library logs with LOG_CALLS=true.
    """
    import sqlite3

    from ..observe import _calllog as calllog

    if ctx.invoked_subcommand is not None:
        return
    conn, path = _open_log(db)
    try:
        found = calllog.query(
            conn, limit=limit, template=template, model=model, since=since, errors=errors, batch_id=batch_id, text=text
        )
    except sqlite3.OperationalError as exc:
        raise CLIError(
            f"bad search query {text!r}: {exc}" if text else f"cannot read the call log {path}: {exc}"
        ) from exc
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
    click.echo(
        f"{'ID':<22}  {'TIME':<19}  {'TEMPLATE':<16}  {'MODEL':<22}  {'TOKENS':>11}  {'COST':>10}  "
        f"{'LATENCY':>7}  {'STATUS':<{sw}}  RESPONSE"
    )
    for rec, status in zip(found, statuses):
        tokens = f"{rec['prompt_tokens'] or 0}+{rec['completion_tokens'] or 0}" if rec["prompt_tokens"] else "-"
        latency = f"{rec['latency']:.2f}s" if rec["latency"] is not None else "-"
        tname = _one_line(rec["template"] and rec["template"].replace(".system.md", ""), 16)
        shown = rec["error"]["message"] if rec["error"] else rec["response"]
        click.echo(
            f"{rec['id']:<22}  {_when(rec['ts'])}  {tname or '-':<16}  {_one_line(rec['model'], 22):<22}  "
            f"{tokens:>11}  {_usd(rec['cost']):>10}  {latency:>7}  {_one_line(status, sw):<{sw}}  {_one_line(shown, 60)}"
        )


@logs.command("show")
@click.argument("call_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as one JSON object.")
@_db_option
@click.pass_context
def logs_show(ctx: click.Context, call_id: str, as_json: bool, db: str | None) -> None:
    """Print one call whole: what was sent, what came back, usage, cost, timing, error.

    ID is a call id from `tinyllm logs`, or its start, or `last`.
    """
    from ..observe import _calllog as calllog

    conn, path = _open_log(db or (ctx.parent.params.get("db") if ctx.parent else None))
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
        ("id", rec["id"]),
        ("time", _when(rec["ts"])),
        (
            "template",
            " ".join(
                filter(
                    None,
                    [
                        rec["template"] or "(none)",
                        rec["template_path"] and f"({rec['template_path']})",
                        rec["template_hash"] and f"sha256 {rec['template_hash']}",
                    ],
                )
            ),
        ),
        (
            "model",
            f"{rec['model']}"
            + (f" (asked {rec['model_requested']})" if rec["model_requested"] not in (None, rec["model"]) else ""),
        ),
        ("backend", f"{rec['api_type']} {where}".strip()),
        ("params", _dumps(rec["params"])),
        ("variables", _dumps(rec["variables"])),
        (
            "usage",
            f"{usage_.get('prompt_tokens', 0)} prompt + {usage_.get('completion_tokens', 0)} completion = "
            f"{usage_.get('total_tokens', 0)} tokens"
            if usage_
            else "-",
        ),
        ("cost", _usd(rec["cost"])),
        (
            "latency",
            (f"{rec['latency']:.3f} s" if rec["latency"] is not None else "-")
            + (f", first token after {rec['ttft']:.3f} s" if rec["ttft"] is not None else ""),
        ),
        ("cached", "yes" if rec["cached"] else "no"),
        ("retries", f"{rec['retries']} (output retries: {rec['output_retries']})"),
        ("finish", rec["finish_reason"] or "-"),
        ("batch", rec["batch_id"] or "-"),
    ]
    if rec["error"]:
        fields.append(("error", f"{rec['error']['type']}: {rec['error']['message']}"))
    for key, value in fields:
        click.echo(f"{key + ':':<11}{value}")
    for m in rec["messages"] or []:
        click.echo(f"\n--- {m.get('role')} ---")
        click.echo(m.get("content") if isinstance(m.get("content"), str) else _dumps(m.get("content")))
    for round_ in rec.get("tool_rounds") or []:
        _echo_round(round_)
    reply = rec["reply"]
    if reply is None and rec.get("response") is not None and rec["error"]:  # a stream that did not end
        click.echo(f"\n--- partial reply (the stream ended early: {rec['error']['type']}) ---")
        click.echo(rec["response"])
    if reply is not None:
        click.echo("\n--- reply ---")
        if reply.get("content") is not None:
            click.echo(reply["content"])
        if reply.get("tool_calls"):
            click.echo("tool calls: " + _dumps(reply["tool_calls"], indent=2))
        if reply.get("refusal"):
            click.echo(f"refusal: {reply['refusal']}")


def _echo_round(round_: dict) -> None:
    """One tool round of a row: each call's name and arguments, its duration, its result or error."""
    duration = round_.get("duration")
    click.echo(
        f"\n--- tool round {int(round_.get('index') or 0) + 1}"
        + (f" ({duration:.3f} s)" if isinstance(duration, (int, float)) else "")
        + " ---"
    )
    for call in round_.get("calls") or []:
        arguments = call.get("arguments")
        shown = _dumps(arguments) if arguments is not None else call.get("raw_arguments", "")
        took = call.get("duration")
        click.echo(f"{call.get('name')}({shown})" + (f"  {took:.3f} s" if isinstance(took, (int, float)) else ""))
        if call.get("error"):
            click.echo(f"  error: {call['error']}")
        else:
            click.echo(f"  -> {call.get('content', '')}")


@logs.command("stats")
@_since_option
@click.option("--template", "-t", help="Only calls of this template.")
@click.option("--model", "-m", help="Only calls of this model (* and ? glob).")
@click.option("--batch", "batch_id", metavar="ID", help="Only the calls of one map run.")
@click.option("--json", "as_json", is_flag=True, help='Print {"by_model", "by_template", "by_day", "total"} as JSON.')
@_db_option
@click.pass_context
def logs_stats(
    ctx: click.Context,
    since: float | None,
    template: str | None,
    model: str | None,
    batch_id: str | None,
    as_json: bool,
    db: str | None,
) -> None:
    """Sum calls, tokens, cost (USD) and errors by model, by template and by day."""
    from ..observe import _calllog as calllog

    conn, _ = _open_log(db or (ctx.parent.params.get("db") if ctx.parent else None))
    try:
        sums = calllog.stats(conn, since=since, template=template, model=model, batch_id=batch_id)
    finally:
        conn.close()
    if as_json:
        click.echo(_dumps(sums, indent=2))
        return
    header = ("CALLS", "PROMPT TOK", "COMPL TOK", "COST", "UNPRICED", "ERRORS", "CACHED")
    for group, label in (("by_model", "model"), ("by_template", "template"), ("by_day", "day")):
        rows = [
            (
                str(r[label]),
                str(r["calls"]),
                str(r["prompt_tokens"]),
                str(r["completion_tokens"]),
                _usd(r["cost"]) if r["cost"] is not None or not r["unpriced"] else "unknown",
                str(r["unpriced"] or 0),
                str(r["errors"] or 0),
                str(r["cached"] or 0),
            )
            for r in sums[group]
        ]
        width = max([len(label)] + [len(r[0]) for r in rows])
        click.echo(f"{label.upper():<{width}}  " + "  ".join(f"{h:>10}" for h in header))
        for r in rows:
            click.echo(f"{r[0]:<{width}}  " + "  ".join(f"{v:>10}" for v in r[1:]))
        click.echo()
    t = sums["total"][0]
    click.echo(
        f"total: {t['calls']} calls, {t['prompt_tokens']} prompt + {t['completion_tokens']} completion tokens, "
        f"cost {_usd(t['cost']) if t['cost'] is not None or not t['unpriced'] else 'unknown'}"
        + (f" (+ {t['unpriced']} call(s) without a price)" if t["unpriced"] and t["cost"] is not None else "")
        + f", {t['errors'] or 0} errors"
    )
