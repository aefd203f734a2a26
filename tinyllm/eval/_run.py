"""``evaluate``: the matrix of prompt versions × targets (client, model) × cases × repeats, on the batch Runner.

Every cell is one row of :class:`tinyllm.batch.Runner`'s resumable JSONL output (``evals/RUN_ID.jsonl``
beside the database): concurrency, rate limits, the cache, budgets and Redis apply as for
``tinyllm map``; each call goes to the call log with the run's id as its ``batch_id``. A cell whose
call failed on the way (an API error) gets an error line and is sent again by a rerun; a cell whose
template variable is missing, whose judge reply cannot be read or whose ``python`` assertion
raised is an *error* cell, graded and kept. A rerun of the same matrix (same template texts,
targets, cases and repeats: its fingerprint) resumes an interrupted or incomplete run and sends
only the cells not done; a complete one is reported again without sending anything (``fresh=True``
starts a new run).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import hashlib
import json
import os
import tempfile
import weakref
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    BudgetExceededError,
    ConfigError,
    OutputParseError,
    ResponseError,
    TemplateError,
    TinyLLMError,
    ToolError,
    ToolRoundsExceededError,
)
from ._assertions import Reply
from ._cases import Case, CaseSource, case_sources, tests_file_for
from ._git import WORKING, Version, version_at
from ._model import AssertionResult, EvalRow
from ._store import EvalReport, Store, db_path

__all__ = ["WORKING", "Target", "Version", "evaluate"]


@dataclass
class Target:
    """Where cells are sent: ``label`` for the report; ``api_type`` (a registered client name) or
    ``client`` (a Client object), or neither (the default client); ``model`` or None (the default)."""

    label: str
    api_type: str | None = None
    client: Any = None
    model: str | None = None


@dataclass
class _PromptPlan:
    name: str  # short name, for the report
    llm: Any  # the LLMCall: template name, output_type, parameters, client, tools
    versions: list[Version]
    sources: list[CaseSource]
    uses_judge: bool = False


def _short(prompt: Any) -> str:
    head, sep, _ = prompt.system_path.name.rpartition(".system.")
    return head if sep and head else prompt.system_path.name


# --------------------------------------------------------------------------- #
# One cell
# --------------------------------------------------------------------------- #


class _Retry(Exception):
    """A cell whose call failed on the way (retried by a rerun); carries the row for the report."""

    def __init__(self, row: EvalRow, cause: BaseException, seq: int) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.row, self.cause, self.seq = row, cause, seq

    def __reduce__(self) -> tuple:  # back from a worker process with its row (Exception pickles only .args)
        return (_Retry, (self.row, self.cause, self.seq))


_GRADED_ERRORS = (TemplateError, ToolError, ToolRoundsExceededError)  # deterministic: an error cell, kept


class _Cells:
    """The function the Runner calls once per cell (picklable with its plans, for process executors).

    ``context``: the evaluating thread's context (the run's call-log batch id and budget), which each
    cell runs in a copy of on local threads; None on another process (a Dask worker, a process pool),
    where each cell runs with ``run_id`` as its call-log batch id instead (a context does not travel).
    """

    def __init__(
        self, plans: list[_PromptPlan], targets: list[Target], judge: Any, context: Any, run_id: str | None = None
    ) -> None:
        self.plans, self.targets, self.judge, self.context, self.run_id = plans, targets, judge, context, run_id

    def __getstate__(self) -> dict:
        return {**self.__dict__, "context": None}  # a Context does not pickle; the run id goes instead

    def __call__(self, item: tuple) -> dict:
        if self.context is not None:
            return self.context.copy().run(self._run, item)
        from ..observe import _calllog as calllog

        with calllog.batch(self.run_id):
            return self._run(item)

    def _sender(self, plan: _PromptPlan, target: Target) -> Any:
        from ..clients import get_client

        if target.client is not None:
            return target.client
        if target.api_type is not None:
            return get_client(target.api_type)
        return plan.llm.client or get_client(plan.llm.api_type)

    def _run(self, item: tuple) -> dict:
        from ..call import plan_output, respond_with
        from ..response import Response
        from ..tools import plan_tools

        seq, pi, vi, ti, case, repeat = item
        plan, target = self.plans[pi], self.targets[ti]
        version = plan.versions[vi]
        llm, prompt = plan.llm, version.prompt
        row = EvalRow(
            prompt=plan.name,
            version=version.label,
            model=target.label,
            case_id=case.id,
            case_description=case.description,
            repeat=repeat,
            vars=case.vars,
        )
        response = None
        try:
            sender = self._sender(plan, target)
            params = {**llm.model_params, **({"model": target.model} if target.model else {})}
            output_type, params, retries = plan_output(prompt, sender, llm.output_type, llm.output_retries, params)
            messages = prompt.render(case.vars)
            tools = (
                None
                if llm.tools is None and not prompt.tools
                else plan_tools(
                    llm.tools, prompt.tools, llm.system_template_name, sender, params, max_rounds=llm.max_tool_rounds
                )
            )
            response = Response(messages, template=llm.system_template_name, variables=dict(case.vars), prompt=prompt)
            parsed, parse_error = True, None
            try:
                respond_with(sender, response, params, output_type, retries, tools=tools)
            except (OutputParseError, ResponseError) as exc:
                if response.message is None:
                    raise
                parsed, parse_error = False, str(exc)
                response.latency = response.latency or _elapsed(response)
            self._fill(row, response)
            reply = Reply(
                row.output,
                response.value if parsed else None,
                parsed,
                parse_error,
                case.vars,
                response,
                sender,
                self.judge,
            )
            self._grade(row, case, reply, output_type is not None)
        except _GRADED_ERRORS as exc:
            self._error(row, exc, response)
        except BudgetExceededError:
            raise
        except ConfigError as exc:
            if response is not None and response.message is not None:  # a python assertion or a judge setting
                self._error(row, exc, response)
            else:
                raise
        except TinyLLMError as exc:
            if isinstance(exc, OutputParseError):  # the judge's reply could not be read
                self._error(row, exc, response)
            else:
                raise _Retry(self._error(row, exc, response), exc, seq) from exc
        except Exception as exc:
            if response is not None and response.message is not None:
                self._error(row, exc, response)
            else:
                raise _Retry(self._error(row, exc, response), exc, seq) from exc
        out = row.as_dict()
        out["seq"] = seq
        return out

    @staticmethod
    def _fill(row: EvalRow, response: Any) -> None:
        row.output = response.text if response.message is not None else None
        usage = response.usage or {}
        row.cost, row.latency, row.cached = response.cost, response.latency, bool(response.cached)
        row.prompt_tokens, row.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")

    @staticmethod
    def _error(row: EvalRow, exc: BaseException, response: Any) -> EvalRow:
        if response is not None and response.message is not None:
            _Cells._fill(row, response)
        row.passed, row.score, row.error = None, None, f"{type(exc).__name__}: {exc}"
        return row

    @staticmethod
    def _grade(row: EvalRow, case: Case, reply: Reply, typed: bool) -> None:
        results = [a.check(reply) for a in case.assertions]
        if typed and not reply.parsed and not any(a.kind == "output-type" for a in case.assertions):
            results.append(
                AssertionResult(
                    "output-type", False, 0.0, f"the reply did not parse as the output type: {reply.parse_error}"
                )
            )
        row.value = reply.value
        row.assertions = results
        weight = sum(r.weight for r in results)
        row.score = (
            sum(r.weight * r.score for r in results) / weight if weight else float(all(r.passed for r in results))
        )
        if case.threshold is not None:
            row.passed = row.score >= case.threshold
        else:
            row.passed = all(r.passed for r in results if r.weight > 0 or r.type == "output-type")


def _elapsed(response: Any) -> float:
    import time

    return time.perf_counter() - response._started


def _line(row_id: Any, value: Any, error: BaseException | None) -> str:
    from ..batch._runner import finite

    if error is None:
        rec: dict[str, Any] = {"id": row_id, "content": value}
    else:
        rec = {"id": row_id, "error": {"type": type(getattr(error, "cause", error)).__name__, "message": str(error)}}
        if isinstance(error, _Retry):
            rec["row"] = {**error.row.as_dict(), "seq": error.seq}
    try:
        return json.dumps(rec, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:
        return json.dumps(finite(rec), ensure_ascii=False, allow_nan=False, default=str)


# --------------------------------------------------------------------------- #
# The matrix
# --------------------------------------------------------------------------- #


def _plans(
    call_or_name: Any, cases: Any, revs: Sequence[str], prompts_dir: Any, include_working: bool
) -> list[_PromptPlan]:
    from ..call import LLMCall

    items = call_or_name if isinstance(call_or_name, (list, tuple)) else [call_or_name]
    if not items:
        raise ConfigError("evaluate: name at least one prompt")
    plans: list[_PromptPlan] = []
    for item in items:
        if isinstance(item, LLMCall):
            llm = item
        elif isinstance(item, (str, os.PathLike)):
            llm = LLMCall(os.fspath(item), prompts_dir=prompts_dir)
        else:
            raise ConfigError(f"evaluate: expected an LLMCall or a template name, not {type(item).__name__}")
        prompt = llm.prompt
        name = _short(prompt)
        versions = [Version(WORKING, prompt)] if include_working or not revs else []
        seen = {v.label for v in versions}
        for rev in revs:
            if rev not in seen:
                seen.add(rev)
                versions.append(version_at(prompt, rev))
        tests_file = None if cases is not None else tests_file_for(prompt, llm.prompts_dir)
        sources = case_sources(name, prompt, tests_file, cases)
        if not sources:
            where = f" (looked for {name}.tests.yaml beside {prompt.system_path} and on the search path)"
            raise ConfigError(
                f"no test cases for {name!r}: give cases=, a tests: list in its front matter, "
                f"or a {name}.tests.yaml file{where}"
            )
        if name in {p.name for p in plans}:
            raise ConfigError(f"evaluate: the prompt {name!r} is named twice")
        uses_judge = any(a.kind == "llm-rubric" for s in sources for a in s.assertions)
        plans.append(_PromptPlan(name, llm, versions, sources, uses_judge))
    return plans


def _targets(plans: list[_PromptPlan], models: Sequence[str] | None, clients: Sequence[Any] | None) -> list[Target]:
    from ..clients import get_client

    out: list[Target] = []
    for m in models or ():
        if not isinstance(m, str) or not m.strip():
            raise ConfigError(f"evaluate: a model is a non-empty name, not {m!r}")
        out.append(Target(m.strip(), model=m.strip()))
    for c in clients or ():
        model = None
        if isinstance(c, tuple):
            c, model = c
        if isinstance(c, str):
            name, sep, given = c.partition("=")
            name, model = name.strip().lower(), (given.strip() or None) if sep else model
            if not name:
                raise ConfigError(f"evaluate: a client is NAME or NAME=MODEL, not {c!r}")
            get_client(name)  # ConfigError now: an unknown or unconfigured client
            out.append(Target(f"{name}={model}" if model else name, api_type=name, model=model))
        else:
            label = getattr(c, "api_type", None) or type(c).__name__
            out.append(Target(f"{label}={model}" if model else label, client=c, model=model))
    if not out:  # the default client (labelled with the model it asks for), or the LLMCall's own client object
        llm = plans[0].llm
        sender = llm.client or get_client(llm.api_type)
        asked = {**plans[0].versions[0].prompt.params, **llm.model_params}.get("model")
        if llm.client is not None:
            out.append(Target(f"{sender.api_type}={asked}" if asked else str(sender.api_type)))
        else:
            out.append(Target(str(asked or sender.settings().model)))
    labels = [t.label for t in out]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ConfigError(f"evaluate: the target {twice[0]!r} is given twice")
    return out


def _cells(plans: list[_PromptPlan], targets: list[Target], repeat: int) -> Iterator[tuple[list, tuple]]:
    """(row id, item) per cell, streamed, case-major (an interrupted run has every version and
    target of the cases it reached, so they pair)."""
    seq = 0
    for pi, plan in enumerate(plans):
        for source in plan.sources:
            for case in source.cases():
                for r in range(repeat):
                    for vi, version in enumerate(plan.versions):
                        for ti, target in enumerate(targets):
                            yield [plan.name, version.label, target.label, case.id, r], (seq, pi, vi, ti, case, r)
                            seq += 1


def _fingerprint(plans: list[_PromptPlan], targets: list[Target], repeat: int) -> str:
    """sha256 of what decides a run's cells: template texts per version, targets, cases, repeats."""
    h = hashlib.sha256()

    def add(value: Any) -> None:
        h.update(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\0")

    add({"repeat": repeat, "targets": [t.label for t in targets]})
    for plan in plans:
        add({"prompt": plan.name, "params": plan.llm.model_params, "output_type": str(plan.llm.output_type)})
        for v in plan.versions:
            add(
                {
                    "version": v.label,
                    "includes": sorted(v.prompt._included().items()),
                    "texts": sorted(v.prompt._texts.items())
                    or [str(v.prompt.system_path), _read(v.prompt.system_path), _read(v.prompt.user_path)],
                }
            )
        for source in plan.sources:
            for case in source.cases():
                add([case.id, case.vars, [a.as_spec() for a in case.assertions], case.threshold])
    return h.hexdigest()


def _read(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def evaluate(
    call_or_name: Any,
    cases: Iterable[Any] | None = None,
    models: Sequence[str] | None = None,
    repeat: int = 1,
    revs: Sequence[str] | None = None,
    prompts_dir: Any = None,
    *,
    clients: Sequence[Any] | None = None,
    include_working: bool = True,
    judge: Any = None,
    judge_model: str | None = None,
    db: str | os.PathLike[str] | None = None,
    store: bool = True,
    fresh: bool = False,
    max_workers: int | None = None,
    executor: Any = None,
    max_cost: float | None = None,
    progress: bool = False,
) -> EvalReport:
    """Evaluate prompts: every case on every version × target, ``repeat`` times; graded, stored, summarized.

    Args:
        call_or_name: a template name (``"classify"``, ``"classify.system.md"``), an
            :class:`~tinyllm.LLMCall` (its output_type, parameters, client and tools apply), or a list of them.
        cases: the cases (dicts as in a tests file: ``vars``, ``expected``, ``assert``, ``dataset``, ...,
            or :class:`~tinyllm.eval.Case` objects); default: the prompt's ``tests:`` front matter and
            its ``NAME.tests.yaml``.
        models: model names to run on the default client (one target each).
        repeat: runs of each cell (>= 1); cases that pass in some and fail in others are flaky.
        revs: git revisions whose template files are evaluated too (read with ``git show``).
        prompts_dir: directories searched first for templates (and tests files).
        clients: more targets: a registered client name (``"llamacpp"``), ``"NAME=MODEL"``, a
            :class:`~tinyllm.Client`, or a ``(client, model)`` pair.
        include_working: evaluate the files as they are (label ``working``) besides ``revs``.
        judge, judge_model: the client (name or object) and model of ``llm-rubric``'s judge
            (default: the JUDGE_API_TYPE and JUDGE_MODEL settings).
        db: the SQLite file runs are stored in (default: the call log's, LOG_DB).
        store: False keeps the run in a temporary database that lives as long as the report.
        fresh: start a new run even when the same matrix was run before (default: resume it,
            or report a complete one again without sending anything).
        max_workers, executor: as :class:`~tinyllm.batch.Runner` (threads; any Executor). On an executor
            of other processes (a ``ProcessPoolExecutor``, Dask's ``client.get_executor()``) the cells run
            there in chunks of 50, each on ``max_workers`` threads; each call on a worker is tagged with the
            run's id (its call-log ``batch_id``, when the worker logs calls: LOG_CALLS in its settings); the
            workers use their own settings (API keys, BASE_URL, REDIS_URL, CACHE_API_CALLS, MAX_COST).
        max_cost: USD the run may spend; then it stops sending (status ``interrupted``: rerun to go on).
            Not with an executor of other processes (a ConfigError: it would hold in this process only).
        progress: show progress on stderr.

    Returns:
        :class:`EvalReport` (``.rows``, ``.summary()``, ``.comparisons()``, ``.info.status``).

    Raises:
        InputFileError: a malformed tests file or dataset (file and line), before anything is sent.
        ConfigError: no cases, an unknown assertion type (naming the closest), an ``llm-rubric``
            without a judge, a bad ``--rev``, an unknown client; nothing is sent.
        TemplateNotFoundError, TemplateError: the template cannot be loaded.
        KeyboardInterrupt: after Ctrl-C, once the finished cells are stored (a rerun resumes).
    """
    from ..batch._runner import Runner
    from ..errors import BatchError
    from ..limits._budget import Budget
    from ..observe import _calllog as calllog

    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"evaluate: repeat must be an int >= 1, got {repeat!r}")
    remote = executor is not None and not isinstance(executor, concurrent.futures.ThreadPoolExecutor)
    if remote and max_cost is not None:
        raise ConfigError(
            "evaluate: max_cost holds in this process only and does not reach the workers of a process "
            "or Dask executor; set MAX_COST in the workers' environment instead (a limit per worker process)"
        )
    if isinstance(revs, str):
        revs = [revs]
    if isinstance(models, str):
        models = [models]
    if cases is not None:
        cases = list(cases)
    plans = _plans(call_or_name, cases, list(revs or ()), prompts_dir, include_working)
    targets = _targets(plans, models, clients)
    the_judge = None
    if any(p.uses_judge for p in plans):
        from ._judge import judge_for

        the_judge = judge_for(judge, judge_model)  # ConfigError now: refused before anything is sent
    fingerprint = _fingerprint(plans, targets, repeat)  # also reads every dataset: a bad row fails now

    keep: Any = None
    if store:
        path = db_path(db)
    else:
        keep = tempfile.TemporaryDirectory(prefix="tinyllm-eval-")
        keep._finalizer.detach()  # type: ignore[attr-defined]  # removed, quietly, when the last report using it goes
        weakref.finalize(keep, shutil.rmtree, keep.name, ignore_errors=True)
        path = os.path.join(keep.name, "eval.db")
    with Store(path) as st:
        found = None if fresh else st.resumable(fingerprint)
        if found is not None and found[1] == "complete":
            report = EvalReport(path, found[0], attached=keep)
            report.resumed = "complete"
            return report
        run_id = found[0] if found is not None else calllog.new_id()
        st.begin(
            run_id,
            fingerprint,
            [p.name for p in plans],
            sorted({v.label for p in plans for v in p.versions}, key=lambda v: (v != WORKING, v)),
            [t.label for t in targets],
            repeat,
        )
    jsonl = Path(path).parent / "evals" / f"{run_id}.jsonl"
    jsonl.parent.mkdir(parents=True, exist_ok=True)

    budget = Budget(max_cost)
    with calllog.batch(run_id), budget.activate():
        context: contextvars.Context | None = contextvars.copy_context()
    if remote:
        context = None  # a context does not travel to another process: each cell sets the run id where it runs
    runner = Runner(
        _Cells(plans, targets, the_judge, context, run_id),
        executor=executor,
        max_workers=max_workers,
        progress=progress,
        desc="eval",
        unit="cell",
    )
    try:
        summary = runner.to_jsonl(
            lambda: _cells(plans, targets, repeat),
            jsonl,
            line=_line,
            fatal=(ConfigError,),
            stop_on=(BudgetExceededError,),
        )
    except BatchError as exc:
        raise ConfigError(str(exc)) from exc
    except BaseException:
        with Store(path) as st:  # a fatal error: keep what finished
            st.import_jsonl(run_id, str(jsonl))
            st.finish(run_id, "interrupted")
        raise
    status = (
        "interrupted"
        if summary.interrupted or summary.stopped_by is not None
        else "incomplete"
        if summary.failed
        else "complete"
    )
    with Store(path) as st:
        st.import_jsonl(run_id, str(jsonl))
        st.finish(run_id, status)
    if status == "complete":
        for leftover in (jsonl, jsonl.with_name(f".{jsonl.name}.lock")):
            with contextlib.suppress(OSError):
                leftover.unlink()
    report = EvalReport(path, run_id, attached=keep)
    report.resumed = "resumed" if found is not None else None
    report.batch, report.spent = summary, budget.spent
    if summary.interrupted:
        raise KeyboardInterrupt
    return report
