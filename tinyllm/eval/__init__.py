"""Evaluating prompts: test cases beside the templates, a matrix of prompt versions × models, honest statistics.

- :func:`evaluate` runs every case of a prompt (``NAME.tests.yaml`` beside the template, a
  ``tests:`` list in its front matter, or cases given in code) on each version (the files as
  they are, and ``revs`` read from git) and each target (client, model), ``repeat`` times, on
  the batch Runner; grades each reply with assertions; stores the run; returns an
  :class:`EvalReport`.
- :func:`list_runs`, :func:`load_run`: the stored runs (in the call log's database).
- :func:`compare`: a paired comparison of two runs (or two groups of one), exact McNemar.
- :func:`check`: the pytest helper (raises AssertionError with the failing cases).
- ``tinyllm eval`` (``tinyllm/cli/eval.py``) is the command over the same functions.

Importing this package loads neither scipy nor the runner; statistics import scipy (the
``eval`` extra) when first computed.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ASSERTION_TYPES",
    "Assertion",
    "AssertionResult",
    "Case",
    "CellSummary",
    "Comparison",
    "EvalReport",
    "EvalRow",
    "RunInfo",
    "check",
    "compare",
    "evaluate",
    "json_lines",
    "list_runs",
    "load_run",
    "parse_assertion",
    "table",
    "write_junit",
]

_WHERE = {
    "evaluate": "._run",
    "list_runs": "._store",
    "load_run": "._store",
    "compare": "._store",
    "EvalReport": "._store",
    "EvalRow": "._model",
    "AssertionResult": "._model",
    "CellSummary": "._model",
    "Comparison": "._model",
    "RunInfo": "._model",
    "Case": "._cases",
    "Assertion": "._assertions",
    "parse_assertion": "._assertions",
    "table": "._report",
    "json_lines": "._report",
    "write_junit": "._report",
    "check": "._pytest",
}


def __getattr__(name: str) -> Any:
    if name == "ASSERTION_TYPES":
        return importlib.import_module("._assertions", __name__).TYPES
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'tinyllm.eval' has no attribute {name!r}")
