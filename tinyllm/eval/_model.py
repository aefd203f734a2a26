"""The records of an evaluation: a graded cell, an assertion's result, a cell group's summary, a comparison, a run.

Plain dataclasses (standard library only): importing them loads neither scipy nor the runner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["AssertionResult", "CellSummary", "Comparison", "EvalRow", "RunInfo"]


@dataclass(frozen=True)
class AssertionResult:
    """One assertion of one cell.

    Attributes:
        type: the assertion's type as written (``equals``, ``not-contains``, ``llm-rubric``, ...).
        passed: whether it held (a negated type already inverted).
        score: in [0, 1] (1.0 for a pass and 0.0 for a failure of a yes/no assertion; a similarity,
            a judge's score, a ``python`` function's score otherwise).
        reason: why, in words (what was expected and what came), for the report.
        weight: its weight in the case's weighted score (default 1; 0: informative only).
    """

    type: str
    passed: bool
    score: float
    reason: str = ""
    weight: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        """As plain JSON-ready data."""
        return asdict(self)


@dataclass
class EvalRow:
    """One cell of the matrix: one (prompt, version, model, case, repeat), sent once and graded.

    Attributes:
        prompt: the prompt's short name (``classify``).
        version: ``"working"`` (the files as they are), or the git revision as given (``HEAD``).
        model: the target's label (the model asked for, or ``CLIENT`` / ``CLIENT=MODEL``).
        case_id: the case's id (its ``id:``, else ``NAME#N`` counted from 1, with ``:ROW`` for a dataset row).
        case_description: the case's ``description`` (or None).
        repeat: 0 .. repeat-1.
        vars: the template variables of the call (``dict``).
        output: the reply's text (None when no reply came).
        value: the reply as the prompt's output_type (None when it did not parse).
        passed: True, False, or None for an *error* cell (no reply, a missing template variable,
            a judge reply that could not be read): an error is never a pass.
        error: ``"TypeName: message"`` of an error cell, else None.
        assertions: the :class:`AssertionResult` of each assertion, in order.
        cost: USD of the call (None: no price known, or no reply).
        latency: seconds from sending to the complete answer (None: no reply).
        prompt_tokens, completion_tokens: tokens of the call (None: no reply).
        cached: the reply came from the cache.
        score: the case's weighted score in [0, 1] (None for an error cell).
    """

    prompt: str
    version: str
    model: str
    case_id: str
    case_description: str | None = None
    repeat: int = 0
    vars: dict = field(default_factory=dict)
    output: str | None = None
    value: Any = None
    passed: bool | None = None
    error: str | None = None
    assertions: list[AssertionResult] = field(default_factory=list)
    cost: float | None = None
    latency: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached: bool = False
    score: float | None = None

    @property
    def status(self) -> str:
        """``"pass"``, ``"fail"`` or ``"error"``."""
        return "error" if self.passed is None else "pass" if self.passed else "fail"

    def failed_assertions(self) -> list[AssertionResult]:
        """The assertions that did not hold."""
        return [a for a in self.assertions if not a.passed]

    def as_dict(self) -> dict[str, Any]:
        """As plain JSON-ready data (a pydantic ``value`` dumped), with ``status``."""
        out = asdict(self)
        value = self.value
        if hasattr(value, "model_dump"):
            out["value"] = value.model_dump(mode="json")
        out["status"] = self.status
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalRow:
        """The row :meth:`as_dict` made (unknown keys ignored)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["assertions"] = [AssertionResult(**a) for a in known.get("assertions") or []]
        return cls(**known)


@dataclass(frozen=True)
class CellSummary:
    """One (prompt, version, model) of a run, over its cases and repeats.

    Attributes:
        n: cells; ``passed + failed + errors == n``.
        pass_rate: ``passed / n`` (errors count as not passed); None when n is 0.
        ci_low, ci_high: the Wilson score 95% confidence interval of the pass rate
            (scipy.stats.binomtest(...).proportion_ci(method="wilson")); None when n is 0.
        cost: USD summed over the priced cells (None when no cell had a price).
        unpriced: cells with a reply but no known price.
        p50_latency, p95_latency: seconds, over the cells with a reply (linear interpolation
            between the closest ranks, as numpy's default percentile); None without replies.
        tokens: prompt plus completion tokens, summed.
        flaky: ids of the cases that passed in some repeats and failed in others.
    """

    prompt: str
    version: str
    model: str
    n: int
    passed: int
    failed: int
    errors: int
    pass_rate: float | None
    ci_low: float | None
    ci_high: float | None
    cost: float | None
    unpriced: int
    p50_latency: float | None
    p95_latency: float | None
    tokens: int
    flaky: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """As plain JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of two reports (or two groups of one) on their shared cells.

    Cells are paired on (prompt, case id, repeat). ``only_a`` cells pass in A and not in B,
    ``only_b`` the reverse (error cells count as not passed); the exact McNemar test is the
    two-sided binomial test of ``only_a`` out of ``only_a + only_b`` at 1/2 (scipy's binomtest);
    ``p_value`` is 1.0 when no pair is discordant.

    Attributes:
        a, b: the labels of the two sides (``version/model`` or a run id).
        pairs: shared cells; ``both``: pass in both; ``neither``: in neither.
        significant: ``p_value < alpha`` (default alpha 0.05).
        text: one sentence ("B passes 7 more of 40 cases than A (p = 0.016)", or
            "no significant difference ...").
    """

    a: str
    b: str
    pairs: int
    both: int
    neither: int
    only_a: int
    only_b: int
    p_value: float
    significant: bool
    text: str

    def as_dict(self) -> dict[str, Any]:
        """As plain JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class RunInfo:
    """A stored run, as :func:`tinyllm.eval.list_runs` lists it.

    Attributes:
        run_id: the run's id (sorts by time; also the ``batch_id`` of its calls in the call log).
        started: Unix seconds; ``finished``: Unix seconds or None while it runs or when interrupted.
        status: ``"running"``, ``"interrupted"`` (a rerun resumes it), ``"incomplete"`` (cells
            ended in an API error; a rerun retries them) or ``"complete"``.
        prompts, models, versions: what the matrix spans.
        repeat: runs of each cell.
        cells, passed, failed, errors: counts over the stored cells.
    """

    run_id: str
    started: float
    finished: float | None
    status: str
    prompts: list[str]
    models: list[str]
    versions: list[str]
    repeat: int
    cells: int
    passed: int
    failed: int
    errors: int

    def as_dict(self) -> dict[str, Any]:
        """As plain JSON-ready data."""
        return asdict(self)
