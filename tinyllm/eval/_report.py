"""Reports of a run: the terminal table, JSON lines (one object per cell) and JUnit XML.

Everything is streamed from the database (:class:`~tinyllm.eval.EvalReport`): memory stays flat in
the number of cells.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import IO, Any
from xml.sax.saxutils import escape, quoteattr

from ._model import CellSummary, EvalRow
from ._store import EvalReport, _row_of

__all__ = ["MAX_FAILURES_SHOWN", "json_lines", "table", "write_junit"]

MAX_FAILURES_SHOWN = 20  # failing cells listed under the table; the rest are counted


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _usd(x: float | None) -> str:
    from ..observe._pricing import usd

    return "-" if x is None else usd(x)


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


def _clip(text: str | None, limit: int = 160) -> str:
    if text is None:
        return "(no reply)"
    one = " ".join(text.split())
    return repr(one if len(one) <= limit else one[:limit] + "...")


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def table(report: EvalReport, summary: list[CellSummary] | None = None, *, failures: int = MAX_FAILURES_SHOWN) -> str:
    """The run as text: one line per (prompt, version, model) with the pass rate and its 95% Wilson
    interval, errors, cost, p50/p95 latency and tokens; the paired comparisons; flaky cases; then up
    to ``failures`` failing cells, each with its output and the assertions that failed."""
    summary = report.summary() if summary is None else summary
    header = ["prompt", "version", "model", "pass rate [95% CI]", "passed", "errors", "cost", "p50", "p95", "tokens"]
    rows = [
        [
            s.prompt,
            s.version,
            s.model,
            f"{_pct(s.pass_rate)} [{_pct(s.ci_low)}, {_pct(s.ci_high)}]" if s.n else "-",
            f"{s.passed}/{s.n}",
            str(s.errors),
            _usd(s.cost) + (f" +{s.unpriced} unpriced" if s.unpriced and s.cost else ""),
            _sec(s.p50_latency),
            _sec(s.p95_latency),
            str(s.tokens),
        ]
        for s in summary
    ]
    out = [f"run {report.run_id}", *_grid(header, rows)]
    for s in summary:
        if s.flaky:
            shown = ", ".join(s.flaky[:10]) + (f" and {len(s.flaky) - 10} more" if len(s.flaky) > 10 else "")
            out.append(f"flaky in {s.prompt} {s.version}/{s.model}: {shown}")
    comparisons = report.comparisons()
    if comparisons:
        out.append("")
        out.extend(f"{c.text}" for c in comparisons)
    shown_failures = 0
    more = 0
    for row in report.failures():
        if shown_failures >= failures:
            more += 1
            continue
        if shown_failures == 0:
            out.append("")
        shown_failures += 1
        head = f"{row.status.upper()} {row.prompt} {row.case_id}" + (
            f" ({row.case_description})" if row.case_description else ""
        )
        out.append(f"{head} [{row.version}/{row.model}, repeat {row.repeat}]")
        if row.error:
            out.append(f"    error: {row.error}")
        out.append(f"    output: {_clip(row.output)}")
        for a in row.failed_assertions():
            out.append(f"    {a.type}: {a.reason}")
    if more:
        out.append(f"... and {more} more failing cell(s); --json lists every cell")
    return "\n".join(out)


def json_lines(report: EvalReport) -> Iterator[str]:
    """One JSON object per cell (:meth:`EvalRow.as_dict` with ``run_id``), in matrix order."""
    for row in report.rows:
        yield json.dumps({"run_id": report.run_id, **row.as_dict()}, ensure_ascii=False, default=str)


def _by_group(report: EvalReport) -> Iterator[EvalRow]:
    """The report's cells ordered by group (prompt, version, model, in matrix order), then in matrix order
    (within a group that is case by case, each case's repeats together)."""
    where, args = report._where("r")
    with report._conn() as conn:
        query = (
            "SELECT r.* FROM eval_rows r JOIN (SELECT prompt, version, model, min(seq) AS gseq FROM eval_rows "
            "WHERE run_id = ? GROUP BY 1, 2, 3) g ON g.prompt = r.prompt AND g.version = r.version "
            f"AND g.model = r.model WHERE {where} ORDER BY g.gseq, r.seq"
        )
        for r in conn.execute(query, [report.run_id, *args]):
            yield _row_of(r)


def write_junit(report: EvalReport, file: str | os.PathLike[str] | IO[str]) -> None:
    """Write the run as JUnit XML: a ``<testsuite>`` per (prompt, version, model), a ``<testcase>`` per
    case in it (``classname`` ``prompt.version.model``, ``name`` the case id); its repeats folded in:
    ``<error>`` when a repeat ended in error, else ``<failure>`` when one failed (each message names
    the failed assertions), ``time`` the summed latency.

    Raises:
        OSError: the file cannot be written.
    """
    summary = {(s.prompt, s.version, s.model): s for s in report.summary()}
    # first pass: per-suite counts (flat: one small dict per group)
    cases_of: dict[tuple, list[int]] = {}
    current: tuple | None = None
    state: list[int] = [0, 0, 0]
    for row in _by_group(report):
        key, case = (row.prompt, row.version, row.model), row.case_id
        if (key, case) != current:
            if current is not None:
                _count(cases_of, current[0], state)
            current, state = (key, case), [0, 0, 0]
        state[0] |= row.passed is None
        state[1] |= row.passed is False
    if current is not None:
        _count(cases_of, current[0], state)
    with contextlib.ExitStack() as stack:
        f: Any = file if hasattr(file, "write") else stack.enter_context(open(file, "w", encoding="utf-8"))  # type: ignore[arg-type]
        tests = sum(c[0] for c in cases_of.values())
        failures = sum(c[1] for c in cases_of.values())
        errors = sum(c[2] for c in cases_of.values())
        f.write('<?xml version="1.0" encoding="UTF-8"?>\n')
        f.write(
            f'<testsuites name={quoteattr("tinyllm eval " + report.run_id)} tests="{tests}" '
            f'failures="{failures}" errors="{errors}">\n'
        )
        open_key: tuple | None = None
        pending: list[EvalRow] = []

        def flush_case(rows: list[EvalRow]) -> None:
            if not rows:
                return
            first = rows[0]
            name = first.case_id + (f" ({first.case_description})" if first.case_description else "")
            seconds = sum(r.latency or 0.0 for r in rows)
            f.write(
                f"    <testcase classname={quoteattr(f'{first.prompt}.{first.version}.{first.model}')} "
                f'name={quoteattr(name)} time="{seconds:.3f}">\n'
            )
            bad_errors = [r for r in rows if r.passed is None]
            bad = [r for r in rows if r.passed is False]
            if bad_errors:
                msg = "; ".join(f"repeat {r.repeat}: {r.error}" for r in bad_errors)
                f.write(f"      <error message={quoteattr(msg)}>{escape(_details(bad_errors))}</error>\n")
            elif bad:
                msg = "; ".join(
                    f"repeat {r.repeat}: " + ", ".join(f"{a.type}: {a.reason}" for a in r.failed_assertions())
                    for r in bad
                )
                f.write(f"      <failure message={quoteattr(msg)}>{escape(_details(bad))}</failure>\n")
            f.write("    </testcase>\n")

        for row in _by_group(report):
            key = (row.prompt, row.version, row.model)
            if key != open_key:
                flush_case(pending)
                pending = []
                if open_key is not None:
                    f.write("  </testsuite>\n")
                open_key = key
                counts = cases_of.get(key, [0, 0, 0])
                s = summary.get(key)
                f.write(
                    f'  <testsuite name={quoteattr(".".join(key))} tests="{counts[0]}" failures="{counts[1]}" '
                    f'errors="{counts[2]}" time="{(s.p50_latency or 0) * s.n if s else 0:.3f}">\n'
                )
            if pending and pending[0].case_id != row.case_id:
                flush_case(pending)
                pending = []
            pending.append(row)
        flush_case(pending)
        if open_key is not None:
            f.write("  </testsuite>\n")
        f.write("</testsuites>\n")


def _count(cases_of: dict[tuple, list[int]], key: tuple, state: list[int]) -> None:
    c = cases_of.setdefault(key, [0, 0, 0])
    c[0] += 1
    if state[0]:
        c[2] += 1
    elif state[1]:
        c[1] += 1


def _details(rows: list[EvalRow]) -> str:
    out = []
    for r in rows:
        out.append(f"repeat {r.repeat}: vars {json.dumps(r.vars, ensure_ascii=False, default=str)}")
        out.append(f"  output: {_clip(r.output, 2000)}")
        if r.error:
            out.append(f"  error: {r.error}")
        for a in r.failed_assertions():
            out.append(f"  {a.type}: {a.reason}")
    return "\n".join(out)
