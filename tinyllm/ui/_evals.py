"""The Evaluations page's data, from the eval package's public API (``tinyllm.eval``:
``list_runs``, ``load_run``, ``EvalReport.summary``, ``compare``; see EVAL-API). When the eval
package is not installed the pages say so instead of failing."""

from __future__ import annotations

import itertools
from typing import Any

from starlette.exceptions import HTTPException

from ..errors import TinyLLMError

__all__ = ["compare_page", "matrix", "run_page", "runs_page"]

MAX_FAILING = 200  # failing cells listed on a run's page
MISSING = "the evaluation package (tinyllm.eval) is not available in this installation"


def _eval() -> Any:
    try:
        import tinyllm.eval as ev
    except ImportError:
        return None
    return ev if hasattr(ev, "list_runs") and hasattr(ev, "load_run") else None


def runs_page(db: str | None) -> dict[str, Any]:
    """``{"missing", "runs"}``: the stored runs, newest first (``RunInfo`` objects)."""
    ev = _eval()
    if ev is None:
        return {"missing": MISSING, "runs": []}
    return {"missing": None, "runs": ev.list_runs(db)}


def _load(ev: Any, run_id: str, db: str | None) -> Any:
    try:
        return ev.load_run(run_id, db)
    except TinyLLMError as exc:
        raise HTTPException(404, str(exc)) from None


def matrix(summary: list[Any]) -> list[dict[str, Any]]:
    """Per prompt: ``{"prompt", "versions", "models", "cells": {(version, model): CellSummary}}``."""
    out: dict[str, dict[str, Any]] = {}
    for cell in summary:
        m = out.setdefault(cell.prompt, {"prompt": cell.prompt, "versions": [], "models": [], "cells": {}})
        if cell.version not in m["versions"]:
            m["versions"].append(cell.version)
        if cell.model not in m["models"]:
            m["models"].append(cell.model)
        m["cells"][(cell.version, cell.model)] = cell
    return list(out.values())


def run_page(run_id: str, db: str | None) -> dict[str, Any]:
    """One run: its matrix, and the failing or erroring cells (at most :data:`MAX_FAILING`) with
    their output and failed assertions."""
    ev = _eval()
    if ev is None:
        raise HTTPException(404, MISSING)
    report = _load(ev, run_id, db)
    cells = report.failures() if hasattr(report, "failures") else (r for r in report.rows if r.passed is not True)
    failing = list(itertools.islice(cells, MAX_FAILING + 1))
    info = getattr(report, "info", None)
    return {
        "run_id": run_id,
        "matrices": matrix(report.summary()),
        "failing": failing[:MAX_FAILING],
        "more_failing": len(failing) > MAX_FAILING,
        "rows": len(report.rows),
        "status": getattr(info, "status", None),
    }


def _pairs(ev: Any, ra: Any, rb: Any) -> list[tuple[str, Any]]:
    """(label, Comparison) of two runs: the runs as wholes when each holds one version and model per
    prompt, else each (prompt, version, model) group the two share, compared group with group."""
    try:
        return [("", ev.compare(ra, rb))]
    except TinyLLMError:
        if not (hasattr(ra, "groups") and hasattr(ra, "select")):
            raise
    shared = [g for g in ra.groups() if g in set(rb.groups())]
    if not shared:
        raise HTTPException(400, "the two runs share no (prompt, version, model) group to compare")
    out = []
    for prompt, version, model in shared:
        view_a = ra.select(prompt=prompt, version=version, model=model)
        view_b = rb.select(prompt=prompt, version=version, model=model)
        out.append((f"{prompt} · {version} · {model}", ev.compare(view_a, view_b)))
    return out


def compare_page(a: str, b: str, db: str | None) -> dict[str, Any]:
    """Two runs compared: each one's matrix and the paired tests (exact McNemar) on their shared cases."""
    ev = _eval()
    if ev is None:
        raise HTTPException(404, MISSING)
    if not a or not b:
        raise HTTPException(400, "pick two runs to compare (a=RUN_ID&b=RUN_ID)")
    ra, rb = _load(ev, a, db), _load(ev, b, db)
    try:
        comparisons = _pairs(ev, ra, rb)
    except TinyLLMError as exc:
        raise HTTPException(400, str(exc)) from None
    return {
        "a": a,
        "b": b,
        "comparisons": comparisons,
        "matrix_a": matrix(ra.summary()),
        "matrix_b": matrix(rb.summary()),
    }
