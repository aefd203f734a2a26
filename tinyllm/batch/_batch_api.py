"""Half-price batches: :class:`BatchAPIRunner`, the Batch API mode of ``tinyllm map`` and ``LLMCall.map``,
through OpenAI's (and Azure OpenAI's) Batch API or Anthropic's Message Batches
(:func:`~tinyllm.batch._batch_files.api_for` picks the provider's endpoints by the call's client:
:class:`~tinyllm.batch._batch_files.BatchAPI` or :class:`~tinyllm.batch._message_batches.MessageBatchesAPI`).

One run (:meth:`BatchAPIRunner.to_jsonl`):

1. takes the output file's lock and reads what it holds (rows with a content line are done);
2. reads the batches recorded beside it (``OUTPUT.batches.json``) and collects those that ended:
   their output and error files are downloaded, each result is joined to its row by ``custom_id``
   and answered through the live path (:mod:`tinyllm.batch._replay`), and the row's line is written;
3. submits the rows that have no content line and are in no batch still running: each row is
   planned as a live call would be (a row the cache answers is answered from it, at once), its
   request line goes into a request file, split at the API's limits (and per model); each file is
   uploaded (purpose ``batch``) and its batch created (``completion_window`` 24h), recorded before
   and after (Anthropic: no upload; the file's lines are the batch's ``requests``, its rows recorded
   before the batch is created and the batch after); ``max_cost`` stops the submitting once the worst case of what is submitted would pass it;
4. unless told not to wait, polls every ``BATCH_POLL_INTERVAL`` seconds, collecting batches as they end;
5. when no batch is running any more, rewrites the output in input order (as the live runner does).

Rows whose batch failed, expired or was cancelled get error lines; running again submits those
rows only. The output lines are the live runner's: ``{"id", "content"}`` or ``{"id", "error"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BatchError, ConfigError
from ._batch_files import (
    TERMINAL,
    BatchState,
    RequestFiles,
    api_for,
    creation_failed,
    now,
    scratch_folder,
    state_path,
)
from ._runner import BatchSummary, JsonlOutput, finite

__all__ = ["BatchAPIRunner", "BatchAPISummary", "default_line"]

log = logging.getLogger("tinyllm")


@dataclass
class BatchAPISummary(BatchSummary):
    """What :meth:`BatchAPIRunner.to_jsonl` did: the fields of :class:`~tinyllm.batch.BatchSummary`
    (``done_now`` counts rows answered from batches and from the cache in this run), and:

    ``submitted``: rows sent in new batches in this run; ``batches_created``: their batch ids;
    ``waiting``: rows in batches still running (no line yet); ``running``: those batches' ids;
    ``not_sent``: rows left out by ``max_cost`` (a rerun sends them); ``from_cache``: rows answered
    from the cache; ``cost``: USD of the replies joined in this run, at the batch price (None when
    a reply's price is unknown); ``submitted_estimate``: worst-case USD of what was submitted;
    ``price``: ``"batch"`` (genai-prices' batch price), ``"half"`` (half the list price, the table
    having no batch price), or None (unpriced).
    """

    submitted: int = 0
    batches_created: list[str] = field(default_factory=list)
    waiting: int = 0
    running: list[str] = field(default_factory=list)
    not_sent: int = 0
    from_cache: int = 0
    cost: float | None = 0.0
    submitted_estimate: float = 0.0
    price: str | None = None


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def default_line(row_id: Any, value: Any, exc: BaseException | None) -> str:
    """A row's output line, as ``tinyllm map`` writes it: ``{"id", "content"}`` or ``{"id", "error": {"type", "message"}}``."""
    rec = (
        {"id": row_id, "content": _plain(value)}
        if exc is None
        else {"id": row_id, "error": {"type": type(exc).__name__, "message": str(exc)}}
    )
    try:
        return json.dumps(rec, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:
        return json.dumps(finite(rec), ensure_ascii=False, allow_nan=False, default=str)


class _Progress:
    """A line on ``file`` each time the batches' statuses or counts change."""

    def __init__(self, on: bool, desc: str) -> None:
        self.on, self.desc, self.last = on, desc, ""

    def show(self, state: BatchState) -> None:
        running = state.unfinished()
        if not self.on or not running:
            return
        counts = {"total": 0, "completed": 0, "failed": 0}
        statuses: dict[str, int] = {}
        for b in running:
            statuses[b.get("status") or "submitting"] = statuses.get(b.get("status") or "submitting", 0) + 1
            for k in counts:
                counts[k] += int((b.get("request_counts") or {}).get(k) or 0)
        text = (
            f"{self.desc + ': ' if self.desc else ''}{len(running)} batch(es) "
            f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}): "
            f"{counts['completed']}/{counts['total'] or '?'} requests done, {counts['failed']} failed"
        )
        if text != self.last:
            self.last = text
            print(text, file=sys.stderr, flush=True)


class BatchAPIRunner:
    """Run an :class:`~tinyllm.LLMCall` over many rows through the OpenAI (or Azure OpenAI) Batch API, or
    Anthropic's Message Batches, at the batch price, into the same resumable JSONL output
    :class:`~tinyllm.Runner` writes.

    Args:
        llm: the call; its client must be the ``openai``, ``azure`` or ``anthropic`` one.
        variables: variables under each row's (``tinyllm map --var``).
        max_cost: USD: rows are submitted while the worst case of everything submitted in this run
            (prompt tokens plus ``max_tokens``, else the rest of the context window, at the batch
            price) stays within it; the rest are left for a rerun. None: no limit.
        poll_interval: seconds between status checks (default ``BATCH_POLL_INTERVAL``, 30).
        progress: a line on stderr whenever the batches' statuses or request counts change.
        max_requests, max_bytes: the limits of one request file (default 50,000 requests and
            200 MB, OpenAI's documented limits; Anthropic: 100,000 requests and 256 MB per batch;
            tests lower them).
        command: recorded with the batches (what ``tinyllm batches fetch`` needs to rebuild the call).
        desc: the progress label.

    Raises:
        ConfigError: ``poll_interval`` not > 0, ``max_requests`` / ``max_bytes`` not >= 1.
    """

    def __init__(
        self,
        llm: Any,
        *,
        variables: dict | None = None,
        max_cost: float | None = None,
        poll_interval: float | None = None,
        progress: bool = False,
        max_requests: int | None = None,
        max_bytes: int | None = None,
        command: dict | None = None,
        desc: str = "",
    ) -> None:
        if poll_interval is not None and not poll_interval > 0:
            raise ConfigError(f"poll_interval must be a number of seconds > 0, got {poll_interval!r}")
        for name, value in (("max_requests", max_requests), ("max_bytes", max_bytes)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if max_cost is not None and not max_cost >= 0:
            raise ConfigError(f"max_cost must be a number of USD >= 0, got {max_cost!r}")
        self.llm, self.variables, self.max_cost = llm, dict(variables or {}), max_cost
        self.poll_interval, self.progress = poll_interval, progress
        self.max_requests, self.max_bytes, self.command, self.desc = max_requests, max_bytes, command, desc
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop waiting (from another thread): :meth:`to_jsonl` returns after its current step, the
        batches still running stay recorded."""
        self._stop.set()

    # -- the client ---------------------------------------------------------------------
    def client(self) -> Any:
        """The live client of the call (ConfigError unless it is the openai, azure or anthropic one)."""
        from ..clients import get_client
        from ._replay import check_batch_client

        return check_batch_client(self.llm.client or get_client(self.llm.api_type))

    # -- one run ------------------------------------------------------------------------
    def to_jsonl(
        self,
        rows: Callable[[], Iterable[tuple[Any, dict]]],
        path: str | os.PathLike[str],
        *,
        line: Callable[[Any, Any, BaseException | None], str] = default_line,
        submit: bool = True,
        wait: bool = True,
        fatal: tuple[type[BaseException], ...] = (ConfigError,),
    ) -> BatchAPISummary:
        """Submit, wait for and collect the batches of ``rows`` into the JSONL output ``path``.

        Args:
            rows: returns a fresh iterable of ``(row_id, variables)`` in input order (called
                several times: to check the ids, to submit, and once per poll that collects ended batches).
            path: the output; resumed when it exists. The batches are recorded in ``PATH.batches.json``.
            line: ``line(row_id, value, error) -> str``, as for :meth:`Runner.to_jsonl`.
            submit: send the rows that need it (False: only collect recorded batches, ``tinyllm batches fetch``).
            wait: poll until every batch has ended (False: return once submitted, ``--no-wait``).
            fatal: error types of a row that stop the run (raised), e.g. a configuration error.

        Returns:
            :class:`BatchAPISummary`. ``interrupted`` is set after Ctrl-C while waiting (the
            batches keep running at the provider and stay recorded).

        Raises:
            BatchError: the output is held by another run, unreadable, has two rows with one id;
                the batch record is unreadable or unwritable.
            ConfigError: the call's client has no Batch API (or a row's ``fatal`` error).
            APIError: a failure of the files or batches endpoints (AuthenticationError,
                RateLimitError, APIConnectionError, ...), after the client's retries; what was
                submitted before it stays recorded.
        """
        from ..config import get_config

        summary = BatchAPISummary()
        sender = self.client()
        api = api_for(sender)
        interval = self.poll_interval or get_config().batch_poll_interval
        with JsonlOutput(path) as out:
            twice = out.expect(row_id for row_id, _ in rows())
            if twice is not None:
                row_id = next(r for i, (r, _) in enumerate(rows()) if i == twice[1])
                raise BatchError(
                    f"rows {twice[0]} and {twice[1]} (counted from 0) have the same id {row_id!r}; ids must be unique"
                )
            summary.total = out.expected
            summary.done_before = out.load()
            todo = set(out.pending())  # positions without a content line, kept up to date below
            state = BatchState.load(state_path(path))
            _check_api(state, api, path)
            if self.command is not None:
                state.command = self.command
            run = _Run(self, sender, api, out, state, rows, line, todo, summary, fatal)
            progress = _Progress(self.progress, self.desc)
            self._stop.clear()
            try:
                run.settle()
                progress.show(state)
                if submit:
                    run.submit()
                progress.show(state)
                while wait and state.unfinished() and not self._stop.is_set():
                    self._stop.wait(interval)
                    run.settle()
                    progress.show(state)
            except KeyboardInterrupt:
                summary.interrupted = True
            running = state.unfinished()
            summary.running = [b.get("id") or b["input_file_id"] for b in running]
            summary.waiting = len(state.waiting_rows())
            if not running and not summary.interrupted and summary.not_sent == 0:
                summary.dropped = out.finish()
        return summary

    # -- in memory ------------------------------------------------------------------------
    def map(
        self, inputs: Iterable[dict], *, path: str | os.PathLike[str] | None = None, return_exceptions: bool = False
    ) -> list[Any]:
        """``[llm.call(**row) for row in inputs]`` through the Batch API; waits until every batch ended.

        The rows' ids are their positions. The batches are recorded beside ``path`` (default: a file
        in the user's cache folder named for the template and the rows), so calling it again with
        the same rows, in this process or another, picks up the batches already submitted.

        Returns:
            list of values in input order (a failed row's exception with ``return_exceptions``).

        Raises:
            The first failed row's error (a :class:`BatchError` carrying its type and message for a
            row that failed in an earlier run); KeyboardInterrupt when interrupted while waiting;
            the errors of :meth:`to_jsonl`.
        """
        items = [dict(row) for row in inputs]
        for i, row in enumerate(items):
            if not isinstance(row, dict):
                raise ConfigError(f"map(batch_api=True): row {i} is a {type(row).__name__}, not a dict of variables")
        if path is None:
            path = self._default_path(items)
        got: dict[int, Any] = {}

        def record(row_id: Any, value: Any, exc: BaseException | None) -> str:
            got[row_id] = exc if exc is not None else value
            return default_line(row_id, value, exc)

        summary = self.to_jsonl(lambda: enumerate(items), path, line=record)
        if summary.interrupted:
            raise KeyboardInterrupt
        out: list[Any] = [None] * len(items)
        missing = [i for i in range(len(items)) if i not in got]
        if missing:
            earlier = _read_lines(Path(path))
            for i in missing:
                out[i] = self._from_line(earlier.get(i), items[i])
        for i, value in got.items():
            out[i] = value
        if not return_exceptions:
            for value in out:
                if isinstance(value, BaseException):
                    raise value
        return out

    def _from_line(self, rec: dict | None, variables: dict) -> Any:
        from ..output import parse_output

        if rec is None:
            return BatchError("the row has no result (its batch is still running, or max_cost left it out)")
        if "content" in rec and "error" not in rec:
            content = rec["content"]
            output_type = self.llm._plan({**self.variables, **variables})[3]
            return parse_output(content if isinstance(content, str) else json.dumps(content), output_type)
        err = rec.get("error") or {}
        return BatchError(f"{err.get('type', 'Error')}: {err.get('message', '')}")

    def _default_path(self, items: list[dict]) -> Path:
        import platformdirs

        prompt = self.llm.prompt
        sources = [
            hashlib.sha256(p.read_bytes()).hexdigest() if p is not None and p.exists() else None
            for p in (getattr(prompt, "system_path", None), getattr(prompt, "user_path", None))
        ]
        what = [
            self.llm.system_template_name,
            self.llm.user_template_name,
            sources,
            self.llm.model_params,
            repr(self.llm.output_type),
            self.variables,
            items,
        ]
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()[:24]
        folder = Path(platformdirs.user_cache_dir("tinyllm", appauthor=False)) / "batches"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{digest}.jsonl"


def _read_lines(path: Path) -> dict[Any, dict]:
    out: dict[Any, dict] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if (
                    isinstance(rec, dict)
                    and "id" in rec
                    and (rec["id"] not in out or ("content" in rec and "error" not in rec))
                ):
                    out[rec["id"]] = rec
    except FileNotFoundError:
        pass
    return out


class _Run:
    """The state of one :meth:`BatchAPIRunner.to_jsonl` call."""

    def __init__(
        self,
        runner: BatchAPIRunner,
        sender: Any,
        api: Any,
        out: JsonlOutput,
        state: BatchState,
        rows: Callable[[], Iterable[tuple[Any, dict]]],
        line: Callable,
        todo: set[int],
        summary: BatchAPISummary,
        fatal: tuple[type[BaseException], ...],
    ) -> None:
        from ._replay import ReplayClient

        self.runner, self.sender, self.api, self.out, self.state = runner, sender, api, out, state
        self.rows, self.line, self.todo, self.summary, self.fatal = rows, line, todo, summary, fatal
        self.replay = ReplayClient(sender)
        self._warned_unpriced: set[str] = set()

    # -- writing a row's line ---------------------------------------------------------------
    def write(self, position: int, row_id: Any, value: Any, exc: BaseException | None) -> None:
        if exc is not None and self.fatal and isinstance(exc, self.fatal):
            raise exc
        ok = exc is None
        self.out.append(row_id, self.line(row_id, value, exc), ok)
        if ok:
            self.todo.discard(position)
            self.summary.done_now += 1
        else:
            self.summary.failed += 1
            kind = type(exc).__name__
            self.summary.failed_kinds[kind] = self.summary.failed_kinds.get(kind, 0) + 1

    def variables(self, row: dict) -> dict:
        return {**self.runner.variables, **row}

    def _cost(self, cost: float | None) -> None:
        if cost is None:
            self.summary.cost = None
        elif self.summary.cost is not None:
            self.summary.cost += cost

    # -- collecting ended batches -------------------------------------------------------------
    def settle(self) -> None:
        """Bring every unfinished recorded batch up to date; collect those that ended (in one pass over the input)."""
        ended, changed = [], False
        for entry in self.state.unfinished():
            if entry.get("id") is None and not self.api.uploads:
                if not self._adopt(entry):
                    continue
            elif entry.get("id") is None:
                try:
                    self._create(entry)
                except Exception as exc:
                    if not creation_failed(exc):
                        raise
                    log.warning(
                        "the recorded request file %s could not be made a batch (%s); its rows will be submitted again",
                        entry["input_file_id"],
                        exc,
                    )
                    continue  # _create dropped the record: the rows are free to go again
            changed = _update(entry, self.api.retrieve(entry["id"])) or changed
            if entry["status"] in TERMINAL:
                ended.append(entry)
        if ended:
            self.collect(ended)
        elif changed:
            self.state.save()

    def _claimed(self) -> set[str]:
        return {b["id"] for b in self.state.batches if b.get("id")}

    def _adopt(self, entry: dict) -> bool:
        """A Message Batch whose creation was not recorded (the process stopped while creating it):
        the batch found for it is recorded (True); none found: the record is dropped and its rows
        are free to go again (False)."""
        batch = self.api.find(entry["created"], len(entry.get("rows") or {}), self._claimed())
        if batch is None:
            log.warning(
                "the batch of %d row(s) being created when a run stopped was not created; its rows will be "
                "submitted again",
                len(entry.get("rows") or {}),
            )
            self.state.batches.remove(entry)
            self.state.save()
            return False
        _update(entry, batch)
        self.state.save()
        return True

    def _create(self, entry: dict) -> None:
        """The batch of an uploaded file whose creation was not recorded: found, else created."""
        batch = self.api.find(entry["input_file_id"])
        if batch is None:
            try:
                batch = self.api.create(entry["input_file_id"])
            except Exception as exc:
                if creation_failed(exc):  # nothing was created: the rows are free to go again
                    self.state.batches.remove(entry)
                    self.state.save()
                raise
        _update(entry, batch)
        self.state.save()

    def collect(self, entries: list[dict]) -> None:
        """Download ended batches' results, answer each of their rows through the live path, write the lines;
        then mark the batches collected (a run stopped before that collects them again, skipping the rows
        that got a content line)."""
        from ..observe import _calllog as calllog
        from ..observe import _pricing as pricing

        keys = self.sender._keys(self.sender.settings())
        owner: dict[str, tuple[dict, dict]] = {}  # custom id -> (its batch's record, its batch's results)
        for entry in entries:
            results: dict[str, Any] = {}
            for cid, result in self.api.results(entry, keys):
                if cid is not None:
                    results[cid] = result
            kind = pricing.batch_price_kind(self.sender, self.sender.settings(), entry.get("model") or "")
            self.summary.price = self.summary.price or kind
            entry["_note"] = {"id": entry["id"], "price": kind}
            for cid in entry.get("rows", {}):
                owner[cid] = (entry, results)
        try:
            for position, (row_id, row) in enumerate(self.rows()):
                if position not in self.todo:
                    continue
                cid = self.api.custom_id(row_id)
                found = owner.get(cid)
                if found is None:
                    continue
                entry, results = found
                result = results.get(cid)
                if result is None:
                    result = BatchError(
                        f"batch {entry['id']} {entry['status']}: {_why_missing(entry)}; "
                        "run again to submit this row anew"
                    )
                with calllog.batch(entry["id"]):  # the call log's batch_id: the provider's batch id
                    value, exc, cost = self._replay(self.variables(row), entry["rows"][cid], result, entry["_note"])
                self._cost(cost)
                self.write(position, row_id, value, exc)
        finally:
            for entry in entries:
                entry.pop("_note", None)
        for entry in entries:
            entry["fetched"], entry["rows"] = True, {}
        self.state.save()

    def _replay(self, variables: dict, expected: str, result: Any, note: dict) -> tuple[Any, BaseException | None, Any]:
        from ..call import respond_with

        try:
            _, response, params, output_type, retries, tools = self.runner.llm._plan(variables)
        except Exception as exc:  # noqa: BLE001 - the row no longer renders (the template changed): its error line
            return None, exc, None
        self.replay.answer(expected, result, note)
        try:
            response = respond_with(self.replay, response, params, output_type, retries, tools=tools)
            return response.value, None, response.cost
        except Exception as exc:  # noqa: BLE001 - the row's failure, written in its place (a live run does the same)
            return None, exc, response.cost if response.message is not None else 0.0
        finally:
            self.replay._pending = None

    # -- submitting ------------------------------------------------------------------------
    def submit(self) -> None:
        """Send the rows without a content line that are in no running batch."""
        from ..limits._budget import DEFAULT_WORST_OUTPUT
        from ..observe import _pricing as pricing
        from ._replay import batch_request, body_hash

        waiting = self.state.waiting_rows()
        max_cost = self.runner.max_cost
        with scratch_folder() as folder:
            files = RequestFiles(
                folder,
                self._send,
                max_requests=self.runner.max_requests or self.api.max_requests,
                max_bytes=self.runner.max_bytes or self.api.max_bytes,
            )
            try:
                for position, (row_id, row) in enumerate(self.rows()):
                    if position not in self.todo:
                        continue
                    cid = self.api.custom_id(row_id)
                    if cid in waiting:
                        continue
                    if self.summary.not_sent:  # over the budget: the rest waits for a rerun
                        self.summary.not_sent += 1
                        continue
                    variables = self.variables(row)
                    try:
                        planned = batch_request(self.runner.llm, variables)
                    except Exception as exc:  # noqa: BLE001 - what a live call raises before sending: the row's error line
                        self.write(position, row_id, None, exc)
                        continue
                    body = planned.body  # None exactly when cached
                    if planned.cached or body is None:  # answered from the cache, as a live call would be
                        self._live(position, row_id, variables)
                        continue
                    if max_cost is not None:
                        estimate = self._estimate(planned, pricing, DEFAULT_WORST_OUTPUT)
                        if estimate is not None and self.summary.submitted_estimate + estimate > max_cost + 1e-12:
                            self.summary.not_sent += 1
                            continue
                        self.summary.submitted_estimate += estimate or 0.0
                    data = self.api.line(cid, body)
                    if not files.fits(data):
                        self.write(
                            position,
                            row_id,
                            None,
                            BatchError(
                                f"the row's request is {len(data)} bytes, more than a batch file may hold ({files.max_bytes})"
                            ),
                        )
                        continue
                    files.add(cid, body_hash(body), data, planned.model)
                    self.summary.submitted += 1
                files.close()
            except BaseException:
                files.discard()
                raise

    def _estimate(self, planned: Any, pricing: Any, default_output: int) -> float | None:
        output = planned.max_tokens
        if not output:
            window = self.sender.context_window(planned.model, planned.cfg)
            output = max(1, window - planned.prompt_tokens) if window else default_output
        estimate = pricing.estimate_cost(
            self.sender, planned.cfg, planned.model, planned.prompt_tokens, output, batch=True
        )
        if estimate is None and planned.model not in self._warned_unpriced:
            self._warned_unpriced.add(planned.model)
            log.warning(
                "no price is known for %s: its rows are not held to max_cost (set PRICES to price it)", planned.model
            )
        return estimate

    def _live(self, position: int, row_id: Any, variables: dict) -> None:
        try:
            response = self.runner.llm.respond(**variables)
        except Exception as exc:  # noqa: BLE001 - the row's failure, written in its place
            self.write(position, row_id, None, exc)
            return
        self.summary.from_cache += bool(response.cached)
        self._cost(response.cost)
        self.write(position, row_id, response.value, None)

    def _send(self, path: Path, rows: dict, model: str) -> None:
        """Upload one request file and create its batch, recorded before and after."""
        if not self.api.uploads:
            self._send_requests(path, rows, model)
            return
        file_id = self.api.upload(path)
        entry = {
            "id": None,
            "input_file_id": file_id,
            "model": model,
            "rows": rows,
            "status": None,
            "request_counts": None,
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
            "fetched": False,
            "created": now(),
        }
        self.state.batches.append(entry)
        self.state.save()  # the file is recorded before its batch exists: a rerun finds or creates the batch
        self._create(entry)
        self.summary.batches_created.append(entry["id"])

    def _send_requests(self, path: Path, rows: dict, model: str) -> None:
        """Create a Message Batch of one request file's lines, its rows recorded before (``id`` None: a
        rerun looks for the batch, see :meth:`_adopt`) and the batch after."""
        entry = {
            "id": None,
            "api": self.api.kind,
            "input_file_id": None,
            "model": model,
            "rows": rows,
            "status": None,
            "request_counts": None,
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
            "fetched": False,
            "created": now(),
        }
        claimed = self._claimed()
        self.state.batches.append(entry)
        self.state.save()
        try:
            batch = self.api.create(path, len(rows), since=entry["created"], exclude=claimed)
        except Exception as exc:
            if creation_failed(exc):  # refused: nothing was created, the rows are free to go again
                self.state.batches.remove(entry)
                self.state.save()
            raise
        _update(entry, batch)
        self.state.save()
        self.summary.batches_created.append(entry["id"])


def _update(entry: dict, batch: dict) -> bool:
    """Copy what matters of a batch object into its record; whether anything changed."""
    before = (entry.get("id"), entry.get("status"), entry.get("request_counts"))
    entry["id"] = batch.get("id")
    entry["status"] = batch.get("status")
    entry["request_counts"] = batch.get("request_counts")
    entry["output_file_id"] = batch.get("output_file_id")
    entry["error_file_id"] = batch.get("error_file_id")
    errors = batch.get("errors")
    entry["errors"] = [e.get("message") for e in (errors.get("data") or [])] if isinstance(errors, dict) else None
    return before != (entry["id"], entry["status"], entry["request_counts"])


def _check_api(state: BatchState, api: Any, path: Any) -> None:
    """Refuse to go on with batches recorded through another provider's batch API than the call's."""
    for entry in state.unfinished():
        recorded = entry.get("api", "openai")
        if recorded != api.kind:
            raise ConfigError(
                f"the batches recorded beside {str(path)!r} were sent through the {recorded} batch API; "
                f"this call uses the {api.kind} one (use the client they were sent with)"
            )


def _why_missing(entry: dict) -> str:
    """Why a row of an ended batch has no result line."""
    status = entry["status"]
    if status == "failed":
        errors = entry.get("errors") or []
        return "; ".join(str(e) for e in errors[:3]) or "the batch failed"
    if status == "expired":
        return "the batch expired (24 h) before this row ran"
    if status == "cancelled":
        return "the batch was cancelled before this row ran"
    return "no result for this row in the batch's results"
