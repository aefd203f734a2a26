"""Anthropic's Message Batches API, seen through the interface of :class:`~tinyllm.batch._batch_files.BatchAPI`.

The differences from OpenAI's Batch API, and how they are bridged:

- There is no file to upload: a batch is created with ``POST /v1/messages/batches`` and the body
  ``{"requests": [{"custom_id", "params"}, ...]}``, where ``params`` is the Messages API body the
  live :class:`~tinyllm.AnthropicClient` would send. The request lines are gathered in the same
  temporary files (split at 100,000 requests or 256 MB, Anthropic's documented limits) and each
  file becomes the ``requests`` of one create call, sent through the SDK's ``post`` as the live
  client sends its requests (the body goes out byte for byte as built).
- A batch has no metadata to find it by, so a run records the batch's rows *before* creating it
  (``id`` None, ``created``); a run that finds such a record (the process stopped between the
  create request and recording its answer) looks for a batch created since then with as many
  requests that no record claims, adopts it if there is one, else frees the rows (they are
  submitted again). A retried create does the same first, so a create that reached the server
  but whose answer was lost is never sent twice.
- ``processing_status`` is ``in_progress``, ``canceling`` or ``ended``; the record keeps it as
  ``status`` with the ``request_counts`` (``processing``, ``succeeded``, ``errored``, ``canceled``,
  ``expired``) plus ``total``, ``completed`` (succeeded) and ``failed`` (the other three), the keys
  the progress line and ``tinyllm batches status`` show.
- The results are one JSONL file, each line ``{"custom_id", "result": {"type": "succeeded",
  "message"} | {"type": "errored", "error"} | {"type": "canceled"} | {"type": "expired"}}``.
- ``custom_id`` must match ``^[a-zA-Z0-9_-]{1,64}$``: a row id whose canonical text does not is
  sent as ``h`` and 32 hex digits of its hash (canonical texts start with ``s``, ``i`` or ``j``).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import BatchError, ResponseError, TinyLLMError

__all__ = ["MAX_BYTES_PER_BATCH", "MAX_REQUESTS_PER_BATCH", "MessageBatchesAPI", "message_result_of"]

#: requests per Message Batch at most (Anthropic: "up to 100,000 Message requests or 256 MB in size")
MAX_REQUESTS_PER_BATCH = 100_000
#: bytes of one batch's request lines at most: 256 MB read as 256 * 10**6 (the smaller reading), less
#: room for the ``{"requests": [...]}`` around them
MAX_BYTES_PER_BATCH = 256_000_000 - 1_000
#: how much earlier than the record a batch may say it was created and still be the record's
#: (clock differences between this machine and Anthropic's)
CLOCK_SKEW = timedelta(minutes=5)
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_COUNTS = ("processing", "succeeded", "errored", "canceled", "expired")


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        try:
            return _time(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def normalize(batch: Any) -> dict:
    """A Message Batch object (SDK model or dict) as the record keeps batches: ``id``, ``status``
    (``processing_status``), ``request_counts`` (Anthropic's five, plus ``total``, ``completed``,
    ``failed``), ``created_at`` (RFC 3339), ``results_url``, and the OpenAI-only fields as None."""
    raw = batch.model_dump(mode="json") if hasattr(batch, "model_dump") else dict(batch)
    counts = raw.get("request_counts") or {}
    c = {k: int(counts.get(k) or 0) for k in _COUNTS}
    return {
        "id": raw.get("id"),
        "status": raw.get("processing_status"),
        "request_counts": {
            "total": sum(c.values()),
            "completed": c["succeeded"],
            "failed": c["errored"] + c["canceled"] + c["expired"],
            **c,
        },
        "created_at": raw.get("created_at"),
        "results_url": raw.get("results_url"),
        "output_file_id": None,
        "error_file_id": None,
        "errors": None,
    }


def message_result_of(rec: Any, secrets: tuple[str, ...] = ()) -> tuple[str | None, Any]:
    """``(custom_id, result)`` of one line of a Message Batch's results: the Messages API reply (a dict)
    for ``succeeded``, the tinyllm error a live call would raise for ``errored``
    (:func:`tinyllm.clients.anthropic.error_of`), a :class:`BatchError` for ``canceled`` and ``expired``
    (run again to submit the row anew), a :class:`ResponseError` for a line of another shape."""
    from ..clients.anthropic import error_of

    if not isinstance(rec, dict):
        return None, ResponseError("malformed Message Batch result line", raw=rec)
    cid = rec.get("custom_id") if isinstance(rec.get("custom_id"), str) else None
    result = rec.get("result")
    if not isinstance(result, dict):
        result = {}
    kind = result.get("type")
    if kind == "succeeded" and isinstance(result.get("message"), dict):
        return cid, result["message"]
    if kind == "errored":
        error = result.get("error")
        return cid, error_of(
            error, request_id=error.get("request_id") if isinstance(error, dict) else None, secrets=secrets
        )
    if kind == "canceled":
        return cid, BatchError("the batch was canceled before this request ran; run again to submit this row anew")
    if kind == "expired":
        return cid, BatchError("the batch expired (24 h) before this request ran; run again to submit this row anew")
    return cid, ResponseError(f"malformed Message Batch result: type {kind!r}", raw=rec)


class MessageBatchesAPI:
    """The Message Batches endpoints of a live :class:`~tinyllm.AnthropicClient`, through its SDK object,
    retry loop and error mapping (keys scrubbed). Same interface as
    :class:`~tinyllm.batch._batch_files.BatchAPI`, for :class:`~tinyllm.batch.BatchAPIRunner`."""

    kind = "anthropic"
    #: a batch is created from its requests (no file is uploaded first)
    uploads = False
    max_requests = MAX_REQUESTS_PER_BATCH
    max_bytes = MAX_BYTES_PER_BATCH
    #: statuses of a batch asked to stop that has not ended yet
    stopping = frozenset({"canceling"})
    #: seconds a create or a results download may take at least (TIMEOUT applies when it is longer)
    TRANSFER_TIMEOUT = 600.0

    def __init__(self, client: Any) -> None:
        self.client = client

    def custom_id(self, row_id: Any) -> str:
        """The row's ``custom_id``: its canonical text when the API takes it, else ``h`` + 32 hex digits of its hash."""
        from ._batch_files import custom_id

        cid = custom_id(row_id)
        if _CUSTOM_ID.match(cid):
            return cid
        return "h" + hashlib.blake2b(cid.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()

    def line(self, cid: str, body: dict) -> bytes:
        """One request of the batch, as a line of the request file: ``{"custom_id", "params"}``."""
        return (json.dumps({"custom_id": cid, "params": body}, ensure_ascii=False) + "\n").encode("utf-8")

    def _timeout(self) -> float:
        return max(self.client.settings().timeout, self.TRANSFER_TIMEOUT)

    def _call(self, what: Callable[[Any], Any]) -> Any:
        cfg = self.client.settings()

        def attempt(n: int) -> Any:
            try:
                return what(self.client.sdk(cfg))
            except TinyLLMError:
                raise
            except Exception as exc:
                raise self.client._error(exc, cfg) from exc

        return self.client.retrying(cfg).call(attempt)

    def create(self, path: Path, count: int, *, since: float, exclude: set[str]) -> dict:
        """Create a batch of the request lines in ``path`` (``count`` of them). A retried attempt first
        looks for a batch an earlier attempt may have created (:meth:`find`): never two batches."""
        requests = [json.loads(raw) for raw in path.read_bytes().splitlines() if raw.strip()]
        cfg = self.client.settings()

        def attempt(n: int) -> dict:
            found = self.find(since, count, exclude) if n else None
            if found is not None:
                return found
            try:
                reply = self.client.sdk(cfg).post(
                    "/v1/messages/batches",
                    cast_to=object,
                    body={"requests": requests},
                    options={"timeout": self._timeout()},
                )
            except Exception as exc:
                raise self.client._error(exc, cfg) from exc
            if not isinstance(reply, dict) or not reply.get("id"):
                raise ResponseError(f"the Message Batches API answered {str(reply)[:200]!r}", raw=reply)
            return normalize(reply)

        return self.client.retrying(cfg).call(attempt)

    def find(self, since: float, count: int, exclude: set[str], scan: int = 1000) -> dict | None:
        """The batch of ``count`` requests, not in ``exclude``, that was most likely created by a request
        sent at ``since`` (Unix seconds): the first created at or after it, else (the two clocks may
        differ) the last created in the :data:`CLOCK_SKEW` before it; among the ``scan`` most recent; or None."""
        exact = datetime.fromtimestamp(since, tz=timezone.utc)
        start = exact - CLOCK_SKEW

        def look(sdk: Any) -> dict | None:
            after, before = None, None
            for i, batch in enumerate(sdk.messages.batches.list(limit=100)):
                created = _time(batch.created_at)
                if created is not None and created < start or i >= scan:
                    break  # newest first: the rest are older
                found = normalize(batch)
                if found["id"] in exclude or found["request_counts"]["total"] != count:
                    continue
                if created is None or created >= exact:
                    after = found  # keeps the oldest of those after ``since``
                elif before is None:
                    before = found  # the newest of those before it
            return after or before

        return self._call(look)

    def retrieve(self, batch_id: str) -> dict:
        """The batch, normalized (:func:`normalize`)."""
        return self._call(lambda sdk: normalize(sdk.messages.batches.retrieve(batch_id)))

    def cancel(self, batch_id: str) -> dict:
        """Ask to cancel a batch (``canceling``, then ``ended`` with the requests not run ``canceled``)."""
        return self._call(lambda sdk: normalize(sdk.messages.batches.cancel(batch_id)))

    def results(self, entry: dict, secrets: tuple[str, ...] = ()) -> Iterator[tuple[str | None, Any]]:
        """``(custom_id, result)`` of each line of an ended batch's results (:func:`message_result_of`).
        The file is streamed to a temporary file first (it can be hundreds of MB), then read line by line."""
        with tempfile.TemporaryFile() as tmp:

            def download(sdk: Any) -> None:
                tmp.seek(0)
                tmp.truncate()
                with sdk.messages.batches.with_streaming_response.results(
                    entry["id"], timeout=self._timeout()
                ) as response:
                    for chunk in response.iter_bytes():
                        tmp.write(chunk)

            self._call(download)
            tmp.seek(0)
            for raw in tmp:
                if raw.strip():
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        rec = raw.decode("utf-8", "replace")
                    yield message_result_of(rec, secrets)
