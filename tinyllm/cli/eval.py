"""``tinyllm eval``: run a prompt's test cases on versions × models, report pass rates with honest statistics."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import click

from ._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    CLIError,
    _FiniteFloat,
    _log_option,
    _prompts_dir_option,
    _search_dirs,
    _turn_on_log,
    cli,
)


def _print_runs(runs: list) -> None:
    import datetime

    if not runs:
        click.echo("no stored evaluation runs")
        return
    for r in runs:
        when = datetime.datetime.fromtimestamp(r.started).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{r.run_id}  {when}  {r.status:<11}  {','.join(r.prompts)}  versions={','.join(r.versions)}  "
            f"models={','.join(r.models)}  {r.passed}/{r.cells} passed, {r.errors} errors"
        )


def _compare_runs(a: Any, b: Any) -> list:
    """Comparisons of two stored runs: per prompt in both, its one group on each side, or each group
    (version, model) the two runs share."""
    from ..eval import compare

    out = []
    groups_a, groups_b = a.groups(), b.groups()
    for prompt in dict.fromkeys(p for p, _, _ in groups_a):
        side_a = [(v, m) for p, v, m in groups_a if p == prompt]
        side_b = [(v, m) for p, v, m in groups_b if p == prompt]
        if not side_b:
            continue
        if len(side_a) == 1 and len(side_b) == 1:
            pairs = [(side_a[0], side_b[0])]
        else:
            pairs = [(g, g) for g in side_a if g in side_b]
        for (va, ma), (vb, mb) in pairs:
            out.append(
                compare(a.select(prompt=prompt, version=va, model=ma), b.select(prompt=prompt, version=vb, model=mb))
            )
    if not out:
        raise CLIError(f"runs {a.run_id} and {b.run_id} share no prompt (or no version/model of one) to compare")
    return out


@cli.command("eval")
@click.argument("names", nargs=-1)
@click.option(
    "--model",
    "-m",
    "models",
    multiple=True,
    metavar="MODEL",
    help="Run the cases on this model of the default client (repeatable: one column each).",
)
@click.option(
    "--client",
    "clients",
    multiple=True,
    metavar="NAME[=MODEL]",
    help="Run the cases on this client (a registered name: openai, ollama, azure, llamacpp, ...), "
    "optionally with a model (repeatable).",
)
@click.option(
    "--rev",
    "revs",
    multiple=True,
    metavar="GITREV",
    help="Also evaluate the template as it was at this git revision (read with git show; repeatable).",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run each cell N times; cases that pass in some runs and fail in others are listed as flaky.",
)
@click.option(
    "--threshold",
    type=_FiniteFloat(min=0, max=1),
    metavar="RATE",
    help="Exit 1 when a prompt version x model passes fewer than this share of its cells "
    "(default: exit 1 when any cell fails).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per cell on stdout (the table goes to stderr)."
)
@click.option(
    "--junit",
    "junit",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Write JUnit XML: one test case per case x version x model.",
)
@click.option(
    "--compare",
    "compare_ids",
    nargs=2,
    metavar="RUN_A RUN_B",
    help="Compare two stored runs (paired, exact McNemar); nothing is sent.",
)
@click.option("--show", "show_id", metavar="RUN", help="Report a stored run again (an id, a prefix of one, or 'last').")
@click.option("--list", "list_runs", is_flag=True, help="List the stored runs, newest first.")
@click.option(
    "--fresh",
    is_flag=True,
    help="Start a new run even if the same matrix was run before "
    "(default: resume it, or report it again when it is complete).",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    help="Cells in flight at once (default: MAX_CONCURRENT_REQUESTS).",
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
    help="Run the cells on a Dask cluster: a scheduler address (tcp://host:8786), or local:N for N worker "
    "processes on 127.0.0.1. Needs the dask extra.",
)
@click.option("--temperature", type=_FiniteFloat(min=0), help="Sampling temperature (over the front matter's).")
@click.option(
    "--cache/--no-cache",
    default=None,
    help="Cache API replies (default: the CACHE_API_CALLS setting). "
    "With --repeat, --no-cache gives each repeat its own reply.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress on stderr.")
@_log_option
@_prompts_dir_option
@click.pass_context
def eval_(
    ctx: click.Context,
    names: tuple[str, ...],
    models: tuple[str, ...],
    clients: tuple[str, ...],
    revs: tuple[str, ...],
    repeat: int,
    threshold: float | None,
    as_json: bool,
    junit: str | None,
    compare_ids: tuple[str, str] | None,
    show_id: str | None,
    list_runs: bool,
    fresh: bool,
    concurrency: int | None,
    max_cost: float | None,
    dask_address: str | None,
    temperature: float | None,
    cache: bool | None,
    progress: bool,
    prompts_dirs: tuple[str, ...],
) -> None:
    """Run the test cases of the prompts NAME... and report how well each version and model passes.

    Cases come from NAME.tests.yaml beside the template (or a tests: list in its front matter).
    Each (version, model, case, repeat) cell is one call; its reply is graded by the case's
    assertions. The table shows, per prompt version x model, the pass rate with its 95% Wilson
    interval, cost and latency; two versions or models are compared on the same cases with the
    exact McNemar test; failing cases are listed with their output and the assertion that failed.

    Runs are stored in the call log database (LOG_DB); run the same command again to resume an
    interrupted run (only cells not done are sent). --compare RUN_A RUN_B compares stored runs.

    With --dask, the cells run on the cluster's workers (in chunks of 50, each on --concurrency
    threads where it lands) and come back here, to the same stored, resumable run. The calls on the
    workers carry the run's id (their call-log batch_id, when the workers log calls: LOG_CALLS in
    their environment); the workers take their settings (API keys, BASE_URL, REDIS_URL,
    CACHE_API_CALLS, MAX_COST, LOG_DB) from their own environment; the template and its cases,
    --temperature and the --model/--client names travel with the cells. --max-cost and
    --cache/--no-cache are refused with --dask (they would hold in this process only).

    Exit status: 0 all passed (or every pass rate at --threshold); 1 a failing cell (or a pass
    rate below --threshold); 2 bad usage or a bad tests file; 130 interrupted.
    """
    from ..config import configure, get_config
    from ..eval import evaluate, load_run, table
    from ..eval import list_runs as stored_runs
    from ..eval._report import json_lines, write_junit

    if list_runs:
        _print_runs(stored_runs())
        return
    if compare_ids:
        a, b = (load_run(i) for i in compare_ids)
        for report in (a, b):
            click.echo(table(report, failures=0))
            click.echo("")
        for c in _compare_runs(a, b):
            click.echo(c.text)
        return
    if show_id:
        report = load_run(show_id)
    else:
        if not names:
            raise CLIError("name at least one prompt (tinyllm eval NAME), or give --compare, --show or --list")
        if dask_address is not None and (max_cost is not None or cache is not None):
            raise CLIError(
                "--max-cost and --cache/--no-cache hold in this process only and do not reach Dask workers; "
                "set MAX_COST or CACHE_API_CALLS in the workers' environment instead"
            )
        if cache is not None:
            from .. import force_api_cache

            force_api_cache(cache)
        if concurrency is not None:
            configure(max_concurrent_requests=concurrency, queue_size=max(concurrency, get_config().queue_size))
        _turn_on_log(ctx)
        from ..call import LLMCall

        dirs = _search_dirs(ctx)
        params: dict[str, Any] = {"temperature": temperature} if temperature is not None else {}
        calls = [LLMCall(name, prompts_dir=dirs, **params) for name in names]
        try:
            with contextlib.ExitStack() as stack:
                executor = None
                if dask_address is not None:
                    from ..batch._dask import dask_executor

                    executor = stack.enter_context(dask_executor(dask_address))[0]
                report = evaluate(
                    calls,
                    models=list(models) or None,
                    clients=list(clients) or None,
                    revs=list(revs),
                    repeat=repeat,
                    prompts_dir=dirs,
                    fresh=fresh,
                    max_cost=max_cost,
                    executor=executor,
                    progress=progress and not as_json or progress and sys.stderr.isatty(),
                )
        except KeyboardInterrupt:
            click.echo("interrupted: the finished cells are stored; run the same command again to resume", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        if report.resumed == "complete":
            click.echo(
                f"note: this matrix was evaluated before (run {report.run_id}); nothing sent. --fresh runs it again",
                err=True,
            )
        elif report.resumed == "resumed":
            click.echo(f"note: resumed run {report.run_id}", err=True)
    summary = report.summary()
    text = table(report, summary)
    if as_json:
        for line in json_lines(report):
            click.echo(line)
        click.echo(text, err=True)
    else:
        click.echo(text)
    if junit:
        try:
            write_junit(report, junit)
        except OSError as exc:
            raise CLIError(f"cannot write {junit!r}: {exc.strerror or exc}") from exc
    info = report.info
    if info.status == "interrupted":
        click.echo(
            f"run {report.run_id} stopped before its end (budget); run the same command again to go on", err=True
        )
        ctx.exit(EXIT_FAILED)
    if info.status == "incomplete":
        click.echo(
            f"some cells of run {report.run_id} failed on the way (API errors); run the same command again "
            "to retry them",
            err=True,
        )
    if threshold is not None:
        low = [s for s in summary if (s.pass_rate or 0.0) < threshold]
        if low:
            worst = min(low, key=lambda s: s.pass_rate or 0.0)
            click.echo(
                f"error: {len(low)} version/model pass rate(s) below {threshold:.0%} (lowest: {worst.prompt} "
                f"{worst.version}/{worst.model} at {100 * (worst.pass_rate or 0):.1f}%)",
                err=True,
            )
            ctx.exit(EXIT_FAILED)
    elif any(s.passed < s.n for s in summary):
        bad = sum(s.n - s.passed for s in summary)
        click.echo(f"error: {bad} cell(s) did not pass", err=True)
        ctx.exit(EXIT_FAILED)
