"""The pytest helper: keep prompt evaluations in a project's own test suite.

::

    from tinyllm.eval import check

    def test_classify_prompt():
        check("classify", clients=["llamacpp"], threshold=0.9)
"""

from __future__ import annotations

from typing import Any

from ._store import EvalReport

__all__ = ["check"]


def check(call_or_name: Any, *, threshold: float | None = None, store: bool = False, **kwargs: Any) -> EvalReport:
    """Run :func:`~tinyllm.eval.evaluate` and fail (``AssertionError``) unless it passes.

    Args:
        call_or_name: as :func:`evaluate`.
        threshold: the pass rate in [0, 1] each (prompt, version, model) needs; default: every cell must pass.
        store: keep the run in the runs database (default False: a temporary one).
        **kwargs: more arguments of :func:`evaluate` (``cases``, ``models``, ``clients``, ``repeat``, ``revs``, ...).

    Returns:
        the :class:`EvalReport` when it passes.

    Raises:
        AssertionError: a group below ``threshold`` (or any failing cell), with the table and the failing cases.
        The errors of :func:`evaluate` (a bad tests file, no judge, ...).
    """
    from ._report import table
    from ._run import evaluate

    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"check: threshold must be in [0, 1], got {threshold!r}")
    report = evaluate(call_or_name, store=store, **kwargs)
    summary = report.summary()
    if threshold is None:
        bad = [s for s in summary if s.passed < s.n]
    else:
        bad = [s for s in summary if (s.pass_rate or 0.0) < threshold]
    if bad:
        need = "every case to pass" if threshold is None else f"a pass rate of at least {threshold:.0%}"
        raise AssertionError(f"prompt evaluation below {need}:\n" + table(report, summary))
    return report
