"""``tinyllm map``: a template over every row of a CSV or JSONL file, into a resumable JSONL output."""

from __future__ import annotations

import contextlib
import os
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ._common import (
    CLIError,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    _cost_text,
    _dumps,
    _error,
    _llm,
    _log_option,
    _mcp_option,
    _model_options,
    _plain,
    _prompts_dir_option,
    _short_name,
    _usd,
    _var_option,
    cli,
)
from ..batch._readers import read_rows, readable_twice


def _result_line(row_id: Any, value: Any, exc: BaseException | None) -> str:
    """The row's output line: strict JSON (a NaN or infinite float in a content value is written as a string)."""
    from ..batch._runner import finite

    rec = (
        {"id": row_id, "content": _plain(value)}
        if exc is None
        else {"id": row_id, "error": {"type": type(exc).__name__, "message": str(exc)}}
    )
    try:
        return _dumps(rec, allow_nan=False)
    except ValueError:
        return _dumps(finite(rec), allow_nan=False)


def _exit_now(code: int) -> None:
    """Exit without waiting for the calls still running, and without the interpreter's teardown (which
    waits for the worker threads, and can crash under an embedded model mid-generation)."""
    from ..cache._store import active_cache

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
@click.option(
    "--input",
    "-i",
    "input_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    help="Rows of variables: a .jsonl file (one JSON object per line) or a .csv file with a header; - for stdin.",
)
@click.option(
    "--output",
    "-o",
    "output_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL results, one line per input row. An existing file is resumed.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    help="Requests in flight at once (default: MAX_CONCURRENT_REQUESTS).",
)
@click.option(
    "--id-field",
    default="id",
    show_default=True,
    help="Column or key holding a row's id; rows without it get their 0-based row number.",
)
@click.option(
    "--input-format",
    type=click.Choice(["jsonl", "csv"]),
    help="Default: from the input's extension (.csv, else jsonl).",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Progress on stderr: a bar on a terminal, else a plain line at every 1% (and every 30 s).",
)
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0),
    metavar="USD",
    help="Stop sending once the next call could take this run past USD; rerun to resume.",
)
@click.option(
    "--dask",
    "dask_address",
    metavar="ADDRESS",
    help="Run the rows on a Dask cluster: a scheduler address (tcp://host:8786), or local:N for N worker "
    "processes on 127.0.0.1. Needs the dask extra.",
)
@click.option(
    "--batch-api",
    is_flag=True,
    help="Send the rows through the OpenAI (or Azure OpenAI) Batch API, or Anthropic's Message Batches with "
    "API_TYPE=anthropic: half the price, done within 24 h. "
    "The batches are recorded in OUTPUT.batches.json; run the same command again to resume.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="With --batch-api: submit and return at once; run the same command again (or tinyllm batches "
    "fetch OUTPUT) to collect the results.",
)
@_mcp_option
@_log_option
@_var_option
@_model_options
@_prompts_dir_option
@click.pass_context
def map_(
    ctx: click.Context,
    name: str,
    input_path: str,
    output_path: str,
    concurrency: int | None,
    id_field: str,
    input_format: str | None,
    progress: bool,
    max_cost: float | None,
    dask_address: str | None,
    batch_api: bool,
    no_wait: bool,
    mcp_servers: list,
    variables: dict,
    model: str | None,
    api_type: str | None,
    temperature: float | None,
    max_tokens: int | None,
    cache: bool | None,
    prompts_dirs: tuple[str, ...],
) -> None:
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

    With --mcp, the model may call the tools of these MCP servers (as
    `tinyllm call --mcp`); a stdio server's process is started once for the
    whole run and stopped at its end. With --dask, the servers travel to the
    workers and each row's call opens its own connection there (a stdio
    server is started per row on its worker: prefer a URL). Not with
    --batch-api.

    With --batch-api, the rows go to the Batch API in files of up to 50,000
    requests (200 MB) (Anthropic's Message Batches: batches of up to 100,000
    requests, 256 MB), at the batch price; the command waits for them, polling
    every BATCH_POLL_INTERVAL seconds, and writes the same lines a live run
    would. Rows the cache answers are not sent. --max-cost then limits what is
    submitted (its worst case at the batch price). Stopping it (Ctrl-C, a
    kill) loses nothing: the batches run on and are recorded in
    OUTPUT.batches.json; the same command resumes, never sending a row twice;
    rows whose batch failed, expired or was cancelled get error lines and are
    sent again by the next run. With --no-wait the exit status is 0 while the
    batches run. See also tinyllm batches status|fetch|cancel.
    """
    import contextvars

    from ..observe import _calllog as calllog
    from ..observe import _usage as usage
    from ..limits._budget import Budget
    from ..config import configure, get_config
    from ..errors import BatchError, BudgetExceededError
    from ..batch._runner import Runner

    if input_path == "-" and ctx.meta.get("tinyllm.var_reads_stdin"):
        raise CLIError("--input - and --var KEY=@- both read standard input; give one of them a file")
    fmt = input_format or ("csv" if input_path.lower().endswith(".csv") else "jsonl")
    out_path = Path(output_path)
    if input_path != "-" and out_path.exists() and os.path.samefile(input_path, out_path):
        raise CLIError("--output must not be the --input file")
    if not out_path.parent.is_dir():
        raise CLIError(f"the output directory {str(out_path.parent)!r} does not exist")
    if dask_address is not None and (max_cost is not None or cache is not None):
        raise CLIError(
            "--max-cost and --cache/--no-cache hold in this process only and do not reach Dask workers; "
            "set MAX_COST or CACHE_API_CALLS in the workers' environment instead"
        )
    if no_wait and not batch_api:
        raise CLIError("--no-wait goes with --batch-api")
    if batch_api and mcp_servers:
        raise CLIError(
            "--mcp does not go with --batch-api: a tool loop needs an answer after each round, the "
            "Batch API answers once"
        )
    if batch_api and dask_address is not None:
        raise CLIError("--batch-api and --dask do not go together: the Batch API runs the rows at the provider")
    if concurrency is not None:
        configure(max_concurrent_requests=concurrency, queue_size=max(concurrency, get_config().queue_size))
    llm = _llm(ctx, name, model, api_type, temperature, max_tokens, cache, tools=mcp_servers or None)
    if batch_api:
        from ._common import _search_dirs

        command = {
            "name": name,
            "input": os.path.abspath(input_path) if input_path != "-" else None,
            "input_format": fmt,
            "id_field": id_field,
            "variables": variables,
            "model": model,
            "api_type": api_type,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "cache": cache,
            "prompts_dirs": [os.path.abspath(d) for d in _search_dirs(ctx)]
            + ([os.path.abspath("prompts")] if os.path.isdir("prompts") else []),
        }
        run_batches(
            ctx,
            llm,
            input_path,
            fmt,
            id_field,
            variables,
            out_path,
            max_cost=max_cost,
            progress=progress,
            submit=True,
            wait=not no_wait,
            command=command,
        )
        return
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
            for server in mcp_servers:  # open for the whole run: a stdio process starts once
                stack.enter_context(server)
            runner = Runner(
                one_row,
                max_workers=workers,
                progress=progress,
                desc=_short_name(llm.prompt),
                unit="row",
                counters=lambda: {"cached": usage.usage_stats()["cached_calls"] - cached_before},
            )
        else:  # the rows' calls run on the workers (their cache hits are not counted here)
            from ..batch._dask import dask_executor

            executor, threads = stack.enter_context(dask_executor(dask_address))
            runner = Runner(
                _Row(llm, variables),
                executor=executor,
                max_workers=workers,
                window=2 * threads + 2,
                progress=progress,
                desc=_short_name(llm.prompt),
                unit="row",
            )
        with readable_twice(input_path) as source:
            try:
                s = runner.to_jsonl(
                    lambda: read_rows(source, input_path, fmt, id_field),
                    out_path,
                    line=_result_line,
                    fatal=(ConfigError,),
                    stop_on=(BudgetExceededError,),
                )
            except BatchError as exc:
                raise CLIError(str(exc)) from exc
            except OSError as exc:
                raise CLIError(f"cannot write {output_path!r}: {exc.strerror or exc}", EXIT_FAILED) from exc
    if s.interrupted:
        dropped = f"; {s.abandoned} call(s) in flight dropped" if s.abandoned else ""
        click.echo(
            f"interrupted: {s.done_before + s.done_now} of {s.total} rows done ({s.failed} failed) and kept "
            f"in {output_path}{dropped}; run the same command again to resume",
            err=True,
        )
        if s.abandoned:
            _exit_now(EXIT_INTERRUPTED)
        ctx.exit(EXIT_INTERRUPTED)
    stats_after = usage.usage_stats()
    from_cache = stats_after["cached_calls"] - cached_before
    note = f" ({from_cache} from the cache)" if from_cache else ""
    unpriced = stats_after["unpriced_calls"] - stats_before["unpriced_calls"]
    over_budget: Any = s.stopped_by  # a BudgetExceededError (limit, estimate) or None
    left = f", {s.total - s.done_before - s.done_now - s.failed} not sent (budget)" if over_budget is not None else ""
    cost = _cost_text(run_budget.spent, unpriced) if dask_address is None else "on the Dask workers (not summed here)"
    click.echo(
        f"{s.total} rows: {s.done_now} done now{note}, {s.done_before} done before, {s.failed} failed{left} "
        f"-> {output_path}; cost {cost}",
        err=True,
    )
    if s.dropped:
        click.echo(f"note: dropped the lines of {s.dropped} id(s) of {output_path} that are not in the input", err=True)
    if over_budget is not None:
        _error(
            f"stopped at the budget of {_usd(over_budget.limit)} (spent {_usd(run_budget.spent)}; the next call "
            f"could cost up to {_usd(over_budget.estimate)}); run the same command again to go on"
        )
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


def run_batches(
    ctx: click.Context,
    llm: Any,
    input_path: str,
    fmt: str,
    id_field: str,
    variables: dict,
    out_path: Path,
    *,
    max_cost: float | None,
    progress: bool,
    submit: bool,
    wait: bool,
    command: dict | None,
) -> None:
    """``map --batch-api`` (and ``batches fetch``): one :class:`~tinyllm.batch.BatchAPIRunner` run, then its summary
    on stderr and the exit status (0 done or still running with --no-wait, 1 rows failed or left by the
    budget, 130 interrupted)."""
    from ..batch._batch_api import BatchAPIRunner
    from ..errors import BatchError

    runner = BatchAPIRunner(
        llm, variables=variables, max_cost=max_cost, progress=progress, command=command, desc=_short_name(llm.prompt)
    )
    with readable_twice(input_path) as source:
        try:
            s = runner.to_jsonl(
                lambda: read_rows(source, input_path, fmt, id_field),
                out_path,
                line=_result_line,
                submit=submit,
                wait=wait,
            )
        except BatchError as exc:
            raise CLIError(str(exc)) from exc
        except OSError as exc:
            raise CLIError(f"cannot write {str(out_path)!r}: {exc.strerror or exc}", EXIT_FAILED) from exc
    price = {"batch": "batch price", "half": "half the list price: no batch price known for the model"}.get(
        s.price or "", ""
    )
    cost = _usd(s.cost) + (f" ({price})" if price and s.cost is not None else "")
    cached = f" ({s.from_cache} from the cache)" if s.from_cache else ""
    click.echo(
        f"{s.total} rows: {s.done_now} done now{cached}, {s.done_before} done before, {s.failed} failed, "
        f"{s.submitted} submitted in {len(s.batches_created)} new batch(es), {s.waiting} waiting in "
        f"{len(s.running)} running batch(es) -> {out_path}; cost {cost}",
        err=True,
    )
    if s.interrupted:
        click.echo(
            f"interrupted: the batches keep running and are recorded in {out_path}.batches.json; run the same "
            "command again to collect them",
            err=True,
        )
        ctx.exit(EXIT_INTERRUPTED)
    if s.running:
        click.echo(
            f"batches still running: {', '.join(s.running)}; run the same command again (or tinyllm batches "
            f"fetch {out_path}) to collect them",
            err=True,
        )
    if s.not_sent:
        _error(
            f"{s.not_sent} row(s) not submitted: their worst case would take the submitted rows past the budget of "
            f"{_usd(max_cost)} (submitted: up to {_usd(s.submitted_estimate)}); run the same command again to go on"
        )
        ctx.exit(EXIT_FAILED)
    if s.failed:
        summary = ", ".join(f"{k} x{v}" for k, v in sorted(s.failed_kinds.items()))
        _error(f"{s.failed} of {s.total} rows failed ({summary}); run the same command again to submit them anew")
        ctx.exit(EXIT_FAILED)
