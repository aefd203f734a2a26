"""The Batch API's bookkeeping and wire formats: the state file beside the output, the request files
(split at the API's limits), the result lines, and the SDK calls (files and batches).

The state file ``OUTPUT.batches.json`` records every batch a run created, with the custom ids of
its rows and a digest of each row's request body, before and after the batch is created (so a
process stopped at any point leaves nothing unrecorded: an uploaded file whose batch may or may not
exist is looked up by its file id on the next run). It is rewritten atomically (a temporary file,
``fsync``, ``os.replace``) and written only by the run holding the output's lock.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from ..errors import (
    APIConnectionError,
    APIStatusError,
    BatchError,
    ResponseError,
    TinyLLMError,
)

__all__ = [
    "MAX_BYTES_PER_FILE",
    "MAX_REQUESTS_PER_FILE",
    "TERMINAL",
    "BatchAPI",
    "BatchState",
    "RequestFiles",
    "api_for",
    "custom_id",
    "result_of",
    "state_path",
]

#: requests per Batch API input file at most (OpenAI: "up to 50,000 requests"; Azure global batch allows more)
MAX_REQUESTS_PER_FILE = 50_000
#: bytes per input file at most (OpenAI and Azure: "up to 200 MB"; taken as 200 * 10**6 bytes, the smaller reading)
MAX_BYTES_PER_FILE = 200_000_000
#: batch statuses after which nothing changes (OpenAI's Batch object: ``status``; Anthropic's Message
#: Batch: ``processing_status`` ``ended``)
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled", "ended"})
STATE_VERSION = 1


def custom_id(row_id: Any) -> str:
    """A row's ``custom_id``: the canonical text of its id (:func:`tinyllm.batch._runner.row_key`), unique
    per row and the same across runs (``1`` and ``"1"`` differ: ``i1`` and ``s1``).

    Raises:
        BatchError: the id is NaN or infinite.
    """
    from ._runner import row_key

    return row_key(row_id)


def state_path(output: str | os.PathLike[str]) -> Path:
    """Where the batches of ``output`` are recorded: ``OUTPUT.batches.json`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".batches.json")


class BatchState:
    """The recorded batches of one output file (``OUTPUT.batches.json``).

    ``batches``: one dict per batch, oldest first: ``id`` (None until the batch exists),
    ``input_file_id``, ``rows`` (custom id -> request body digest; emptied once its results are in the
    output), ``model``, ``status``, ``request_counts``, ``output_file_id``, ``error_file_id``,
    ``errors``, ``fetched`` (its results are in the output), ``created`` (Unix seconds).
    ``command``: what ``tinyllm batches fetch`` needs to redo the join (the map command's arguments), or None.
    """

    def __init__(self, path: Path, batches: list[dict] | None = None, command: dict | None = None) -> None:
        self.path, self.batches, self.command = path, batches or [], command

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BatchState:
        """The state at ``path`` (empty when the file does not exist).

        Raises:
            BatchError: the file is not a state file tinyllm wrote.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as exc:
            raise BatchError(f"cannot read the batch record {str(path)!r}: {exc}") from exc
        if (
            not isinstance(data, dict)
            or data.get("version") != STATE_VERSION
            or not isinstance(data.get("batches"), list)
        ):
            raise BatchError(f"{str(path)!r} is not a batch record of this tinyllm (version {STATE_VERSION})")
        return cls(path, data["batches"], data.get("command"))

    def save(self) -> None:
        """Write the state atomically (never a half-written file, even when killed mid-write).

        Raises:
            BatchError: the file cannot be written.
        """
        data = json.dumps(
            {"version": STATE_VERSION, "command": self.command, "batches": self.batches}, ensure_ascii=False, indent=1
        )
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with suppress(OSError):
                os.unlink(tmp)
            raise BatchError(f"cannot write the batch record {str(self.path)!r}: {exc.strerror or exc}") from exc

    def unfinished(self) -> list[dict]:
        """The batches whose results are not in the output yet."""
        return [b for b in self.batches if not b.get("fetched")]

    def waiting_rows(self) -> set[str]:
        """Custom ids of the rows in batches whose results are not in the output yet (never submitted again)."""
        return {cid for b in self.unfinished() for cid in b.get("rows", {})}


class RequestFiles:
    """Request lines gathered into files no bigger than the API's limits (one model per file).

    Args:
        folder: where the files are written (temporary).
        max_requests, max_bytes: the limits (default :data:`MAX_REQUESTS_PER_FILE`, :data:`MAX_BYTES_PER_FILE`).
        on_full: called with ``(path, rows, model)`` for each full file (``rows``: custom id -> body
            digest); :meth:`close` sends the last one.
    """

    def __init__(
        self,
        folder: str,
        on_full: Callable[[Path, dict, str], None],
        *,
        max_requests: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.folder, self.on_full = Path(folder), on_full
        self.max_requests = max_requests or MAX_REQUESTS_PER_FILE
        self.max_bytes = max_bytes or MAX_BYTES_PER_FILE
        self._file: Any = None
        self._path: Path | None = None
        self._rows: dict[str, str] = {}
        self._bytes = 0
        self._model: str | None = None
        self._count = 0

    def fits(self, data: bytes) -> bool:
        """Whether one line of ``data`` bytes fits in a file at all."""
        return len(data) <= self.max_bytes

    def add(self, cid: str, digest: str, data: bytes, model: str) -> None:
        """Add one request line (``data``, newline included); starts a new file when this one is full
        or holds another model's requests."""
        if self._file is not None and (
            len(self._rows) >= self.max_requests or self._bytes + len(data) > self.max_bytes or model != self._model
        ):
            self._send()
        if self._file is None:
            self._count += 1
            self._path = self.folder / f"batch-{self._count:04d}.jsonl"
            self._file = open(self._path, "wb")  # noqa: SIM115 - kept open while rows are added; closed by _send/discard
            self._model = model
        self._file.write(data)
        self._bytes += len(data)
        self._rows[cid] = digest

    def _send(self) -> None:
        self._file.close()
        path, rows, model = self._path, self._rows, self._model
        self._file, self._path, self._rows, self._bytes, self._model = None, None, {}, 0, None
        self.on_full(path, rows, model)  # type: ignore[arg-type]
        with suppress(OSError):
            os.unlink(path)  # type: ignore[arg-type]

    def close(self) -> None:
        """Send the last file, if any."""
        if self._file is not None:
            self._send()

    def discard(self) -> None:
        """Drop the file being gathered (a run stopped before sending it)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def result_of(rec: Any, secrets: tuple[str, ...] = ()) -> tuple[str | None, Any]:
    """``(custom_id, result)`` of one line of a batch's output or error file: the chat completion
    (a dict) for a 200 answer, else the tinyllm error for it (``status_error`` for an HTTP error,
    :class:`BatchError` for a request that was not run: expired, cancelled, invalid)."""
    from ..clients.openai import status_error

    if not isinstance(rec, dict):
        return None, ResponseError("malformed batch result line", raw=rec)
    cid = rec.get("custom_id") if isinstance(rec.get("custom_id"), str) else None
    response, error = rec.get("response"), rec.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        code = response["status_code"]
        if code == 200:
            return cid, response.get("body")
        return cid, status_error(code, response.get("body"), request_id=response.get("request_id"), secrets=secrets)
    if isinstance(error, dict):
        code = error.get("code")
        return cid, BatchError(
            f"{error.get('message') or 'the request was not run'}{f' ({code})' if code else ''}; "
            "run again to submit this row anew"
        )
    return cid, ResponseError("malformed batch result line: neither a response nor an error", raw=rec)


def api_for(client: Any) -> Any:
    """The batch endpoints of a live client: :class:`BatchAPI` for ``openai`` / ``azure``,
    :class:`~tinyllm.batch._message_batches.MessageBatchesAPI` for ``anthropic``."""
    if getattr(client, "api_type", None) == "anthropic":
        from ._message_batches import MessageBatchesAPI

        return MessageBatchesAPI(client)
    return BatchAPI(client)


class BatchAPI:
    """The files and batches endpoints of a live ``openai`` / ``azure`` client, through its SDK object,
    retry loop and error mapping (keys scrubbed). ``endpoint``: ``/v1/chat/completions`` (OpenAI),
    ``/chat/completions`` (Azure OpenAI's global batch)."""

    kind = "openai"
    #: a request file is uploaded, then its batch created
    uploads = True
    max_requests = MAX_REQUESTS_PER_FILE
    max_bytes = MAX_BYTES_PER_FILE
    #: statuses of a batch asked to stop that has not ended yet
    stopping = frozenset({"cancelling"})
    #: seconds an upload or a download may take at least (TIMEOUT applies when it is longer)
    TRANSFER_TIMEOUT = 600.0

    def __init__(self, client: Any) -> None:
        self.client = client
        self.endpoint = "/chat/completions" if client.api_type == "azure" else "/v1/chat/completions"

    def custom_id(self, row_id: Any) -> str:
        """The row's ``custom_id`` (:func:`custom_id`)."""
        return custom_id(row_id)

    def line(self, cid: str, body: dict) -> bytes:
        """One line of a request file: ``{"custom_id", "method": "POST", "url", "body"}``."""
        return (
            json.dumps({"custom_id": cid, "method": "POST", "url": self.endpoint, "body": body}, ensure_ascii=False)
            + "\n"
        ).encode("utf-8")

    def results(self, entry: dict, secrets: tuple[str, ...] = ()) -> Iterator[tuple[str | None, Any]]:
        """``(custom_id, result)`` of each line of an ended batch's output and error files (:func:`result_of`)."""
        for file_id in (entry.get("output_file_id"), entry.get("error_file_id")):
            if file_id:
                for rec in self.lines(file_id):
                    yield result_of(rec, secrets)

    def _call(self, what: Callable[[Any], Any], retry: bool = True) -> Any:
        cfg = self.client.settings()
        sdk = self.client.sdk(cfg)

        def attempt(n: int) -> Any:
            try:
                return what(sdk)
            except TinyLLMError:
                raise
            except Exception as exc:
                raise self.client._error(exc, cfg) from exc

        return self.client.retrying(cfg).call(attempt) if retry else attempt(0)

    def _timeout(self) -> float:
        return max(self.client.settings().timeout, self.TRANSFER_TIMEOUT)

    def upload(self, path: Path) -> str:
        """Upload a request file (purpose ``batch``); returns its file id."""

        def send(sdk: Any) -> Any:
            with open(path, "rb") as f:
                return sdk.files.create(
                    file=(path.name, f, "application/jsonl"), purpose="batch", timeout=self._timeout()
                )

        return self._call(send).id

    def create(self, file_id: str) -> dict:
        """Create the batch of an uploaded file (``completion_window`` 24h). A retried attempt first
        looks for a batch of that file the earlier attempt may have created (never two batches)."""

        def send(sdk: Any) -> Any:
            return sdk.batches.create(
                input_file_id=file_id,
                endpoint=self.endpoint,
                completion_window="24h",
                metadata={"tinyllm_input_file": file_id},
            )

        cfg = self.client.settings()

        def attempt(n: int) -> dict:
            found = self.find(file_id) if n else None
            if found is not None:
                return found
            try:
                return send(self.client.sdk(cfg)).model_dump()
            except Exception as exc:
                raise self.client._error(exc, cfg) from exc

        return self.client.retrying(cfg).call(attempt)

    def find(self, file_id: str, scan: int = 1000) -> dict | None:
        """The batch created from ``file_id`` among the ``scan`` most recent ones, or None."""

        def look(sdk: Any) -> dict | None:
            for i, batch in enumerate(sdk.batches.list(limit=100)):
                if batch.input_file_id == file_id:
                    return batch.model_dump()
                if i + 1 >= scan:
                    break
            return None

        return self._call(look)

    def retrieve(self, batch_id: str) -> dict:
        """The batch object (``status``, ``request_counts``, ``output_file_id``, ``error_file_id``, ``errors``)."""
        return self._call(lambda sdk: sdk.batches.retrieve(batch_id).model_dump())

    def cancel(self, batch_id: str) -> dict:
        """Ask to cancel a batch (it goes to ``cancelling``, then ``cancelled`` with the results done so far)."""
        return self._call(lambda sdk: sdk.batches.cancel(batch_id).model_dump())

    def lines(self, file_id: str) -> Iterator[Any]:
        """The decoded JSON lines of a result file (blank lines skipped; a line that is not JSON is
        yielded as its text, which :func:`result_of` reports). The file is streamed to a temporary
        file first (a result file can be hundreds of MB), then read line by line."""
        with tempfile.TemporaryFile() as tmp:

            def download(sdk: Any) -> None:
                tmp.seek(0)
                tmp.truncate()
                with sdk.files.with_streaming_response.content(file_id, timeout=self._timeout()) as response:
                    for chunk in response.iter_bytes():
                        tmp.write(chunk)

            self._call(download)
            tmp.seek(0)
            for raw in tmp:
                if raw.strip():
                    try:
                        yield json.loads(raw)
                    except ValueError:
                        yield raw.decode("utf-8", "replace")


def scratch_folder() -> tempfile.TemporaryDirectory:
    """A temporary folder for the request files of one run."""
    return tempfile.TemporaryDirectory(prefix="tinyllm-batch-")


def now() -> float:
    return time.time()


def creation_failed(exc: BaseException) -> bool:
    """Whether a failed batch creation certainly created nothing (an HTTP error answer; not a
    connection failure, after which the batch may exist)."""
    return isinstance(exc, APIStatusError) and not isinstance(exc, APIConnectionError)
