"""Stored evaluation runs: two tables in the call log's SQLite file (``LOG_DB``), and the report over them.

``eval_runs`` holds one row per run (its id, times, status, what the matrix spans, counts);
``eval_rows`` one row per graded cell. A run's cells are written to a resumable JSONL file
while it runs (the batch Runner's output, beside the database in ``evals/``) and imported here
when it ends or is interrupted. :class:`EvalReport` reads a run from the database: its rows
are streamed, its summary and comparisons computed in SQL, so memory stays flat in the
number of cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any, overload

from ..errors import ConfigError
from ._model import AssertionResult, CellSummary, Comparison, EvalRow, RunInfo

__all__ = ["EvalReport", "Store", "compare", "db_path", "list_runs", "load_run"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS eval_runs (
    run_id TEXT PRIMARY KEY, started REAL NOT NULL, finished REAL, status TEXT NOT NULL, fingerprint TEXT,
    prompts TEXT, versions TEXT, models TEXT, repeat INTEGER,
    cells INTEGER DEFAULT 0, passed INTEGER DEFAULT 0, failed INTEGER DEFAULT 0, errors INTEGER DEFAULT 0
);
CREATE INDEX IF NOT EXISTS eval_runs_fp ON eval_runs(fingerprint);
CREATE TABLE IF NOT EXISTS eval_rows (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, prompt TEXT, version TEXT, model TEXT, case_id TEXT,
    case_description TEXT, repeat INTEGER, vars TEXT, output TEXT, value TEXT, passed INTEGER, error TEXT,
    assertions TEXT, cost REAL, latency REAL, prompt_tokens INTEGER, completion_tokens INTEGER, cached INTEGER,
    score REAL, PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS eval_rows_group ON eval_rows(run_id, prompt, version, model);
"""
_ROW_COLUMNS = (
    "seq",
    "prompt",
    "version",
    "model",
    "case_id",
    "case_description",
    "repeat",
    "vars",
    "output",
    "value",
    "passed",
    "error",
    "assertions",
    "cost",
    "latency",
    "prompt_tokens",
    "completion_tokens",
    "cached",
    "score",
)


def db_path(db: str | os.PathLike[str] | None = None) -> str:
    """The database of stored runs: ``db`` if given, else the call log's file (``LOG_DB``, else
    ``calls.db`` in the user's data directory)."""
    if db is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(db)))
    from ..config import get_config
    from ..observe._calllog import log_path

    return log_path(get_config())


def _connect_ro(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    conn.row_factory = sqlite3.Row
    return conn


def _has_tables(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'eval_runs'").fetchone() is not None


def _run_info(r: sqlite3.Row) -> RunInfo:
    return RunInfo(
        run_id=r["run_id"],
        started=r["started"],
        finished=r["finished"],
        status=r["status"],
        prompts=json.loads(r["prompts"] or "[]"),
        models=json.loads(r["models"] or "[]"),
        versions=json.loads(r["versions"] or "[]"),
        repeat=r["repeat"] or 1,
        cells=r["cells"] or 0,
        passed=r["passed"] or 0,
        failed=r["failed"] or 0,
        errors=r["errors"] or 0,
    )


def list_runs(db: str | os.PathLike[str] | None = None) -> list[RunInfo]:
    """The stored runs, newest first (``list[RunInfo]``); ``[]`` when there is no database yet.

    Args:
        db: the SQLite file (default: the call log's, see :func:`db_path`).

    Raises:
        ConfigError: the file is not a readable SQLite database.
    """
    path = db_path(db)
    try:
        conn = _connect_ro(path)
    except FileNotFoundError:
        return []
    try:
        if not _has_tables(conn):
            return []
        return [_run_info(r) for r in conn.execute("SELECT * FROM eval_runs ORDER BY started DESC, run_id DESC")]
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot read the evaluation runs in {path!r}: {exc}") from exc
    finally:
        conn.close()


def load_run(run_id: str, db: str | os.PathLike[str] | None = None) -> EvalReport:
    """The stored run ``run_id`` (or the only run whose id starts with it; ``last``: the newest) as an
    :class:`EvalReport`; nothing is sent.

    Raises:
        ConfigError: no such run, a prefix of several runs, or an unreadable database.
    """
    path = db_path(db)
    try:
        conn = _connect_ro(path)
    except FileNotFoundError:
        raise ConfigError(f"no evaluation run {run_id!r}: there is no database {path!r} yet") from None
    try:
        if not _has_tables(conn):
            raise ConfigError(f"no evaluation run {run_id!r} in {path!r} (no run stored there yet)")
        if run_id == "last":
            rows = conn.execute("SELECT * FROM eval_runs ORDER BY started DESC, run_id DESC LIMIT 1").fetchall()
        else:
            rows = conn.execute(
                "SELECT * FROM eval_runs WHERE run_id LIKE ? ORDER BY started DESC LIMIT 2",
                [run_id.replace("%", "").replace("_", "") + "%"],
            ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot read the evaluation runs in {path!r}: {exc}") from exc
    finally:
        conn.close()
    if not rows:
        raise ConfigError(f"no evaluation run {run_id!r} in {path!r}; `tinyllm eval --list` shows the stored runs")
    if len(rows) > 1:
        raise ConfigError(f"{run_id!r} is the start of more than one run id; give more of it")
    return EvalReport(path, rows[0]["run_id"], info=_run_info(rows[0]))


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


class Store:
    """The writer of the evaluation tables in one SQLite file (a context manager; one connection)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def __enter__(self) -> Store:  # noqa: PYI034
        from ..observe._calllog import _open_for_writing

        try:
            conn = _open_for_writing(self.path)  # the call log's file, mode 0600, WAL, its own schema too
            conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cannot write the evaluation runs to {self.path!r}: {exc}") from exc
        self.conn = conn
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _db(self) -> sqlite3.Connection:
        assert self.conn is not None, "Store used outside its with block"
        return self.conn

    def resumable(self, fingerprint: str) -> tuple[str, str] | None:
        """(run id, status) of the newest run with this fingerprint, or None."""
        row = (
            self._db()
            .execute(
                "SELECT run_id, status FROM eval_runs WHERE fingerprint = ? ORDER BY started DESC, run_id DESC LIMIT 1",
                [fingerprint],
            )
            .fetchone()
        )
        return None if row is None else (row[0], row[1])

    def begin(
        self, run_id: str, fingerprint: str, prompts: list[str], versions: list[str], models: list[str], repeat: int
    ) -> None:
        """Record a new run (status ``running``), or mark a resumed one running again."""
        self._db().execute(
            "INSERT INTO eval_runs (run_id, started, status, fingerprint, prompts, versions, models, repeat) "
            "VALUES (?, ?, 'running', ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET status = 'running', finished = NULL",
            [run_id, time.time(), fingerprint, json.dumps(prompts), json.dumps(versions), json.dumps(models), repeat],
        )

    def import_jsonl(self, run_id: str, path: str) -> None:
        """Put the cells of the run's JSONL file into ``eval_rows`` (a content line wins over an error line)."""
        conn = self._db()
        marks = ", ".join("?" for _ in range(len(_ROW_COLUMNS) + 1))
        insert = f"INSERT OR {{}} INTO eval_rows (run_id, {', '.join(_ROW_COLUMNS)}) VALUES ({marks})"
        replace, ignore = insert.format("REPLACE"), insert.format("IGNORE")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM eval_rows WHERE run_id = ?", [run_id])
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue  # half a line left by a killed run
                    if not isinstance(rec, dict):
                        continue
                    row = rec.get("content") if "error" not in rec else rec.get("row")
                    if not isinstance(row, dict) or "seq" not in row:
                        continue
                    conn.execute(replace if "error" not in rec else ignore, [run_id, *_columns(row)])
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def finish(self, run_id: str, status: str) -> None:
        """Set the run's status and its counts from its stored cells."""
        conn = self._db()
        cells, passed, failed, errors = conn.execute(
            "SELECT count(*), coalesce(sum(passed = 1), 0), coalesce(sum(passed = 0), 0), coalesce(sum(passed IS NULL), 0) "
            "FROM eval_rows WHERE run_id = ?",
            [run_id],
        ).fetchone()
        conn.execute(
            "UPDATE eval_runs SET status = ?, finished = ?, cells = ?, passed = ?, failed = ?, errors = ? "
            "WHERE run_id = ?",
            [status, time.time() if status != "interrupted" else None, cells, passed, failed, errors, run_id],
        )


def _columns(row: dict) -> list[Any]:
    passed = row.get("passed")
    return [
        row.get("seq"),
        row.get("prompt"),
        row.get("version"),
        row.get("model"),
        row.get("case_id"),
        row.get("case_description"),
        row.get("repeat"),
        json.dumps(row.get("vars") or {}, ensure_ascii=False, default=str),
        row.get("output"),
        json.dumps(row.get("value"), ensure_ascii=False, default=str),
        None if passed is None else int(bool(passed)),
        row.get("error"),
        json.dumps(row.get("assertions") or [], ensure_ascii=False, default=str),
        row.get("cost"),
        row.get("latency"),
        row.get("prompt_tokens"),
        row.get("completion_tokens"),
        int(bool(row.get("cached"))),
        row.get("score"),
    ]


def _row_of(r: sqlite3.Row) -> EvalRow:
    passed = r["passed"]
    return EvalRow(
        prompt=r["prompt"],
        version=r["version"],
        model=r["model"],
        case_id=r["case_id"],
        case_description=r["case_description"],
        repeat=r["repeat"],
        vars=json.loads(r["vars"] or "{}"),
        output=r["output"],
        value=json.loads(r["value"]) if r["value"] is not None else None,
        passed=None if passed is None else bool(passed),
        error=r["error"],
        assertions=[AssertionResult(**a) for a in json.loads(r["assertions"] or "[]")],
        cost=r["cost"],
        latency=r["latency"],
        prompt_tokens=r["prompt_tokens"],
        completion_tokens=r["completion_tokens"],
        cached=bool(r["cached"]),
        score=r["score"],
    )


# --------------------------------------------------------------------------- #
# The report
# --------------------------------------------------------------------------- #


class _Rows(Sequence[EvalRow]):
    """A report's cells in matrix order, read from the database as they are used (a read-only sequence)."""

    def __init__(self, report: EvalReport) -> None:
        self._report = report

    def __len__(self) -> int:
        with self._report._conn() as conn:
            where, args = self._report._where()
            return conn.execute(f"SELECT count(*) FROM eval_rows WHERE {where}", args).fetchone()[0]

    @overload
    def __getitem__(self, i: int) -> EvalRow: ...
    @overload
    def __getitem__(self, i: slice) -> list[EvalRow]: ...

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("EvalReport.rows index out of range")
        with self._report._conn() as conn:
            where, args = self._report._where()
            r = conn.execute(
                f"SELECT * FROM eval_rows WHERE {where} ORDER BY seq LIMIT 1 OFFSET ?", [*args, i]
            ).fetchone()
        return _row_of(r)

    def __iter__(self) -> Iterator[EvalRow]:
        where, args = self._report._where()
        last = -1
        while True:  # in pages, so no cursor stays open between the caller's steps
            with self._report._conn() as conn:
                page = conn.execute(
                    f"SELECT * FROM eval_rows WHERE {where} AND seq > ? ORDER BY seq LIMIT 500", [*args, last]
                ).fetchall()
            if not page:
                return
            for r in page:
                yield _row_of(r)
            last = page[-1]["seq"]

    def __repr__(self) -> str:
        return f"<{len(self)} EvalRow(s) of run {self._report.run_id}>"


class EvalReport:
    """The result of an evaluation run, read from the database where it is stored.

    Attributes:
        run_id: the run's id (the ``batch_id`` of its calls in the call log).
        db: the SQLite file holding it.
        rows: the cells, one per (prompt, version, model, case, repeat), in matrix order
            (a read-only sequence of :class:`EvalRow`, read from the database as used).
        info: the run's :class:`RunInfo` (status, times, what it spans).
        prompt, version, model: the filter of a :meth:`select` view (None: all).

    Use :meth:`summary` for the table (per prompt, version and model: pass rate with its
    Wilson interval, cost, latency, flaky cases), :meth:`comparisons` for the paired tests
    between the groups of a prompt, :meth:`failures` for the cells that did not pass.
    """

    def __init__(
        self,
        db: str,
        run_id: str,
        *,
        info: RunInfo | None = None,
        prompt: str | None = None,
        version: str | None = None,
        model: str | None = None,
        attached: Any = None,
    ) -> None:
        self.db, self.run_id, self.prompt, self.version, self.model = db, run_id, prompt, version, model
        self._info = info
        self._attached = attached  # a temporary database kept alive with the report (evaluate(store=False))
        #: how evaluate() got it: None (a new run), "resumed" (an interrupted or incomplete run went on),
        #: "complete" (the same matrix was complete already: nothing was sent)
        self.resumed: str | None = None
        self.batch: Any = None  # the Runner's BatchSummary of the run that made it (None when loaded)
        self.spent: float = 0.0  # USD spent by the run that made it (priced calls)

    def __repr__(self) -> str:
        flt = "".join(
            f", {k}={v!r}"
            for k, v in (("prompt", self.prompt), ("version", self.version), ("model", self.model))
            if v is not None
        )
        return f"EvalReport(run_id={self.run_id!r}{flt})"

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = _connect_ro(self.db)
        try:
            yield conn
        finally:
            conn.close()

    def _where(self, alias: str = "") -> tuple[str, list[Any]]:
        p = f"{alias}." if alias else ""
        where, args = [f"{p}run_id = ?"], [self.run_id]
        for column in ("prompt", "version", "model"):
            value = getattr(self, column)
            if value is not None:
                where.append(f"{p}{column} = ?")
                args.append(value)
        return " AND ".join(where), args

    @property
    def info(self) -> RunInfo:
        """The run's :class:`RunInfo`, as stored now."""
        with self._conn() as conn:
            r = conn.execute("SELECT * FROM eval_runs WHERE run_id = ?", [self.run_id]).fetchone()
        if r is None:
            raise ConfigError(f"no evaluation run {self.run_id!r} in {self.db!r}")
        return _run_info(r)

    @property
    def rows(self) -> _Rows:
        """The cells (see the class docstring)."""
        return _Rows(self)

    def select(self, *, prompt: str | None = None, version: str | None = None, model: str | None = None) -> EvalReport:
        """A view of this report with only the cells of ``prompt``, ``version`` and/or ``model``."""
        return EvalReport(
            self.db,
            self.run_id,
            info=self._info,
            prompt=prompt or self.prompt,
            version=version or self.version,
            model=model or self.model,
            attached=self._attached,
        )

    def groups(self) -> list[tuple[str, str, str]]:
        """The (prompt, version, model) groups of the report, in matrix order."""
        where, args = self._where()
        with self._conn() as conn:
            return [
                tuple(r)
                for r in conn.execute(  # type: ignore[misc]
                    f"SELECT prompt, version, model FROM eval_rows WHERE {where} GROUP BY 1, 2, 3 ORDER BY min(seq)",
                    args,
                )
            ]

    def summary(self) -> list[CellSummary]:
        """One :class:`CellSummary` per (prompt, version, model), in matrix order.

        Raises:
            ConfigError: scipy is not installed (``pip install 'tinyllm[eval]'``).
        """
        from ._stats import wilson

        out = []
        with self._conn() as conn:
            for prompt, version, model in self.groups():
                args = [self.run_id, prompt, version, model]
                group = "run_id = ? AND prompt = ? AND version = ? AND model = ?"
                n, passed, failed, errors, cost, priced, unpriced, tokens = conn.execute(
                    "SELECT count(*), coalesce(sum(passed = 1), 0), coalesce(sum(passed = 0), 0), "
                    "coalesce(sum(passed IS NULL), 0), sum(cost), count(cost), "
                    "coalesce(sum(cost IS NULL AND output IS NOT NULL AND NOT cached), 0), "
                    "coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0) "
                    f"FROM eval_rows WHERE {group}",
                    args,
                ).fetchone()
                ((m,),) = conn.execute(f"SELECT count(latency) FROM eval_rows WHERE {group}", args)

                def pct(
                    q: float, m: int = m, group: str = group, args: list = args
                ) -> float | None:  # numpy's default: linear between the closest ranks
                    rank = (m - 1) * q / 100.0
                    lo = int(rank)
                    values = [
                        v
                        for (v,) in conn.execute(
                            f"SELECT latency FROM eval_rows WHERE {group} AND latency IS "
                            "NOT NULL ORDER BY latency LIMIT 2 OFFSET ?",
                            [*args, lo],
                        )
                    ]
                    if not values:
                        return None
                    hi = values[1] if len(values) > 1 else values[0]
                    return values[0] + (hi - values[0]) * (rank - lo)

                flaky = [
                    c
                    for (c,) in conn.execute(
                        f"SELECT case_id FROM eval_rows WHERE {group} GROUP BY case_id "
                        "HAVING max(passed IS 1) = 1 AND min(passed IS 1) = 0 AND count(*) > 1 ORDER BY min(seq)",
                        args,
                    )
                ]
                low, high = wilson(passed, n) if n else (None, None)
                out.append(
                    CellSummary(
                        prompt=prompt,
                        version=version,
                        model=model,
                        n=n,
                        passed=passed,
                        failed=failed,
                        errors=errors,
                        pass_rate=passed / n if n else None,
                        ci_low=low,
                        ci_high=high,
                        cost=cost if priced else None,
                        unpriced=unpriced,
                        p50_latency=pct(50) if m else None,
                        p95_latency=pct(95) if m else None,
                        tokens=tokens,
                        flaky=flaky,
                    )
                )
        return out

    def failures(self) -> Iterator[EvalRow]:
        """The cells that failed or ended in error, in matrix order (streamed)."""
        where, args = self._where()
        last = -1
        while True:
            with self._conn() as conn:
                page = conn.execute(
                    f"SELECT * FROM eval_rows WHERE {where} AND (passed IS NULL OR passed = 0) "
                    "AND seq > ? ORDER BY seq LIMIT 500",
                    [*args, last],
                ).fetchall()
            if not page:
                return
            yield from (_row_of(r) for r in page)
            last = page[-1]["seq"]

    def comparisons(self) -> list[Comparison]:
        """For each prompt with more than one (version, model) group: each group compared with the
        first (A: the first group, B: the other), paired on case and repeat (exact McNemar)."""
        by_prompt: dict[str, list[tuple[str, str]]] = {}
        for prompt, version, model in self.groups():
            by_prompt.setdefault(prompt, []).append((version, model))
        out = []
        for prompt, groups in by_prompt.items():
            first = self.select(prompt=prompt, version=groups[0][0], model=groups[0][1])
            for version, model in groups[1:]:
                out.append(compare(first, self.select(prompt=prompt, version=version, model=model)))
        return out

    def pass_rate(self) -> float | None:
        """Passed cells over all cells of the report (None when it has none)."""
        where, args = self._where()
        with self._conn() as conn:
            n, passed = conn.execute(
                f"SELECT count(*), coalesce(sum(passed = 1), 0) FROM eval_rows WHERE {where}", args
            ).fetchone()
        return passed / n if n else None

    def label(self) -> str:
        """``version/model`` when the view has one of each, else the run id (for comparisons)."""
        groups = {(v, m) for _, v, m in self.groups()}
        if len(groups) == 1:
            version, model = next(iter(groups))
            return f"{version}/{model}"
        return self.run_id


def compare(a: EvalReport, b: EvalReport, *, alpha: float = 0.05) -> Comparison:
    """Compare two reports (two runs, or two :meth:`EvalReport.select` views of one) on their shared cells.

    Cells are paired on (prompt, case id, repeat); each report must hold one (version, model)
    per prompt (select one otherwise). The exact McNemar test (scipy's binomtest on the
    discordant pairs) gives the p-value. Nothing is sent.

    Returns:
        :class:`Comparison`.

    Raises:
        ConfigError: a report holds several versions or models of one prompt, the two share
            no cell, or scipy is missing.
    """
    from ._stats import mcnemar

    for side, report in (("A", a), ("B", b)):
        seen: dict[str, tuple[str, str]] = {}
        for prompt, version, model in report.groups():
            if prompt in seen:
                raise ConfigError(
                    f"report {side} ({report.run_id}) holds more than one version/model of {prompt!r} "
                    f"({'/'.join(seen[prompt])} and {version}/{model}); compare "
                    "report.select(version=..., model=...) views"
                )
            seen[prompt] = (version, model)
    wa, args_a = a._where("x")
    wb, args_b = b._where("y")
    conn = _connect_ro(a.db)
    try:
        other = "main"
        if os.path.abspath(a.db) != os.path.abspath(b.db):
            conn.execute("ATTACH DATABASE ? AS other", [f"file:{b.db}?mode=ro"])
            other = "other"
        pairs, both, neither, only_a, only_b = conn.execute(
            "SELECT count(*), coalesce(sum(x.passed IS 1 AND y.passed IS 1), 0), "
            "coalesce(sum(x.passed IS NOT 1 AND y.passed IS NOT 1), 0), "
            "coalesce(sum(x.passed IS 1 AND y.passed IS NOT 1), 0), coalesce(sum(x.passed IS NOT 1 AND y.passed IS 1), 0) "
            f"FROM main.eval_rows x JOIN {other}.eval_rows y "
            f"ON x.prompt = y.prompt AND x.case_id = y.case_id AND x.repeat = y.repeat WHERE {wa} AND {wb}",
            [*args_a, *args_b],
        ).fetchone()
    finally:
        conn.close()
    la, lb = a.label(), b.label()
    if la == lb:
        la, lb = f"{la} ({a.run_id})", f"{lb} ({b.run_id})"
    if pairs == 0:
        raise ConfigError(f"{la} and {lb} share no case (paired on prompt, case id and repeat); nothing to compare")
    p = mcnemar(only_a, only_b)
    significant = p < alpha
    discordant = f"{only_a} pass only in {la}, {only_b} only in {lb}"
    if significant:
        better, worse, more = (lb, la, only_b - only_a) if only_b > only_a else (la, lb, only_a - only_b)
        text = f"{better} passes {more} more of {pairs} cases than {worse} (p = {p:.3g}; {discordant})"
    else:
        text = f"no significant difference between {la} and {lb} on {pairs} cases (p = {p:.3g}; {discordant})"
    return Comparison(
        a=la,
        b=lb,
        pairs=pairs,
        both=both,
        neither=neither,
        only_a=only_a,
        only_b=only_b,
        p_value=p,
        significant=significant,
        text=text,
    )
