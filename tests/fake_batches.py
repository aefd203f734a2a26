"""A loopback fake of OpenAI's Files and Batches endpoints, on top of :class:`fakeserver.FakeOpenAIServer`.

It serves everything the chat fake serves (so a live call and a batch of the same row can be
compared at one server), and::

    POST /v1/files                  multipart upload (purpose "batch")
    GET  /v1/files/{id}             the file object
    GET  /v1/files/{id}/content     its bytes
    POST /v1/batches                create (input_file_id, endpoint, completion_window, metadata)
    GET  /v1/batches                list, newest first
    GET  /v1/batches/{id}           retrieve: each retrieve moves the batch one status on,
                                    validating -> in_progress -> finalizing -> its end
    POST /v1/batches/{id}/cancel    cancelling, then cancelled at the next retrieve

(Azure's ``/openai/files`` and ``/openai/batches`` are the same routes.)

A batch's requests are answered when it ends, each through the chat fake's own answer (echo, or
``reply_with``), so a batch's replies equal the live replies to the same bodies. The input file is
checked as OpenAI does: JSONL, unique ``custom_id``, method POST, ``url`` equal to the batch's
endpoint, one model, at most ``max_requests`` lines and ``max_bytes`` bytes; a bad file makes a
``failed`` batch with ``errors``.

Test controls (JSON over HTTP, so they work when the server runs in its own process)::

    POST /_fake/plan    {"end": "completed"|"failed"|"expired"|"cancelled", "hold": bool,
                         "error_ids": [custom ids answered with HTTP 500 in the error file],
                         "run_before_end": n (expired/cancelled: requests run before the end),
                         "limits": {"max_requests": n, "max_bytes": n}}  for the batches created next
    POST /_fake/reply   {"content": "..."} (or null for echo): the chat reply
    POST /_fake/enqueue {"content": "..."}: the reply to the next live chat request only
    POST /_fake/advance {"id": batch id | null (all)}: release held batches
    GET  /_fake/state   {"files": {id: {purpose, filename, bytes}}, "batches": {id: batch},
                         "chat": [live chat request bodies]}

Run it in its own process: ``python tests/fake_batches.py`` prints ``PORT <n>`` and serves until
its standard input closes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fakeserver import FakeOpenAIServer, Recorded, Reply, _error_body

ORDER = ("validating", "in_progress", "finalizing")


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out


class FakeBatchServer(FakeOpenAIServer):
    """The chat fake plus Files and Batches (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.plan: dict = {}
        self._batch_plans: dict[str, dict] = {}
        self._ids = 0
        self._blk = threading.RLock()

    def _new_id(self, prefix: str) -> str:
        with self._blk:
            self._ids += 1
            return f"{prefix}-{self._ids:04d}"

    @staticmethod
    def _route(method: str, path: str) -> tuple[str | None, str | None]:
        path = path.rstrip("/")
        for prefix in ("/v1/", "/openai/"):
            if path.startswith(prefix):
                rest = path[len(prefix) :]
                if rest.startswith(("files", "batches")):
                    return "batchapi", None
        if path.startswith("/_fake/"):
            return "control", None
        return FakeOpenAIServer._route(method, path)

    def _answer(self, route: str | None, rec: Recorded, item: Any) -> tuple[int, Any, dict[str, str]]:
        if route == "control":
            return self._control(rec)
        if route == "batchapi":
            with self._blk:
                return self._batchapi(rec)
        return super()._answer(route, rec, item)

    # -- controls ---------------------------------------------------------------------
    def _control(self, rec: Recorded) -> tuple[int, Any, dict]:
        what = rec.path.rstrip("/").split("/")[-1]
        body = rec.json if isinstance(rec.json, dict) else {}
        if what == "plan":
            self.plan = body
            return 200, {"ok": True}, {}
        if what == "reply":
            self.reply_with(body.get("content"))
            return 200, {"ok": True}, {}
        if what == "enqueue":  # a scripted reply for the next live chat request (batches never take it)
            self.enqueue(Reply(body["content"]), path_contains="chat/completions")
            return 200, {"ok": True}, {}
        if what == "advance":
            with self._blk:
                for bid, plan in self._batch_plans.items():
                    if body.get("id") in (None, bid):
                        plan["hold"] = False
            return 200, {"ok": True}, {}
        if what == "state":
            with self._blk:
                files = {
                    k: {
                        "purpose": v["purpose"],
                        "filename": v["filename"],
                        "bytes": v["data"].decode("utf-8", "replace"),
                    }
                    for k, v in self.files.items()
                }
                chat = [r.json for r in self.requests if r.route == "chat"]
                return 200, {"files": files, "batches": self.batches, "chat": chat}, {}
        return 404, _error_body(404), {}

    # -- files and batches ----------------------------------------------------------------
    def _batchapi(self, rec: Recorded) -> tuple[int, Any, dict]:
        path = rec.path.rstrip("/")
        parts = path.split("/")[2:]  # after /v1 or /openai
        kind = parts[0]
        if kind == "files":
            if rec.method == "POST" and len(parts) == 1:
                form = _multipart(rec.headers.get("content-type", ""), rec.body)
                purpose = form.get("purpose", (None, b""))[1].decode()
                filename, data = form.get("file", (None, b""))
                if purpose != "batch" or not data:
                    return 400, _error_body(400, f"bad upload (purpose {purpose!r}, {len(data)} bytes)"), {}
                return 200, self._add_file(data, purpose, filename or "upload.jsonl"), {}
            if rec.method == "GET" and len(parts) in (2, 3) and parts[1] in self.files:
                f = self.files[parts[1]]
                if len(parts) == 3 and parts[2] == "content":
                    return 200, f["data"], {"Content-Type": "application/octet-stream"}
                return 200, f["object"], {}
            return 404, _error_body(404, "No such file"), {}
        if rec.method == "POST" and len(parts) == 1:
            return self._create(rec.json if isinstance(rec.json, dict) else {})
        if rec.method == "GET" and len(parts) == 1:
            data = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
            return (
                200,
                {
                    "object": "list",
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                },
                {},
            )
        batch = self.batches.get(parts[1]) if len(parts) > 1 else None
        if batch is None:
            return 404, _error_body(404, "No such batch"), {}
        if rec.method == "GET" and len(parts) == 2:
            self._step(batch)
            return 200, batch, {}
        if rec.method == "POST" and len(parts) == 3 and parts[2] == "cancel":
            if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                batch["status"] = "cancelling"
                self._batch_plans[batch["id"]]["end"] = "cancelled"
            return 200, batch, {}
        return 404, _error_body(404), {}

    def _add_file(self, data: bytes, purpose: str, filename: str) -> dict:
        fid = self._new_id("file")
        obj = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self.files[fid] = {"object": obj, "data": data, "purpose": purpose, "filename": filename}
        return obj

    def _create(self, req: dict) -> tuple[int, Any, dict]:
        fid = req.get("input_file_id")
        if fid not in self.files or self.files[fid]["purpose"] != "batch":
            return 400, _error_body(400, f"input_file_id {fid!r} is not a batch file"), {}
        if (
            req.get("endpoint") not in ("/v1/chat/completions", "/chat/completions")
            or req.get("completion_window") != "24h"
        ):
            return 400, _error_body(400, "bad endpoint or completion_window"), {}
        bid = self._new_id("batch")
        batch = {
            "id": bid,
            "object": "batch",
            "endpoint": req["endpoint"],
            "errors": None,
            "input_file_id": fid,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "in_progress_at": None,
            "expires_at": None,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": req.get("metadata"),
        }
        self.batches[bid] = batch
        self._batch_plans[bid] = {
            "end": "completed",
            "hold": False,
            "error_ids": [],
            "run_before_end": 0,
            "limits": {},
            **self.plan,
        }
        return 200, batch, {}

    def _lines(self, batch: dict) -> tuple[list[dict], str | None]:
        """The input file's request lines, or the reason it is refused."""
        plan = self._batch_plans[batch["id"]]
        data = self.files[batch["input_file_id"]]["data"]
        limits = plan.get("limits") or {}
        if len(data) > limits.get("max_bytes", 200_000_000):
            return [], f"the file is {len(data)} bytes, over the limit"
        lines, seen, models = [], set(), set()
        for n, raw in enumerate(data.splitlines(), 1):
            try:
                line = json.loads(raw)
            except ValueError:
                return [], f"line {n} is not JSON"
            if (
                not isinstance(line, dict)
                or line.get("method") != "POST"
                or line.get("url") != batch["endpoint"]
                or not isinstance(line.get("custom_id"), str)
                or not isinstance(line.get("body"), dict)
            ):
                return [], f"line {n} is not a request line for {batch['endpoint']}"
            if line["custom_id"] in seen:
                return [], f"line {n}: duplicate custom_id {line['custom_id']!r}"
            seen.add(line["custom_id"])
            models.add(line["body"].get("model"))
            lines.append(line)
        if len(lines) > limits.get("max_requests", 50_000):
            return [], f"{len(lines)} requests, over the limit"
        if len(models) > 1:
            return [], "a batch's requests must all use one model"
        return lines, None

    def _step(self, batch: dict) -> None:
        """One retrieve's worth of progress."""
        plan = self._batch_plans[batch["id"]]
        status = batch["status"]
        if status in ("completed", "failed", "expired", "cancelled") or plan["hold"] and status != "cancelling":
            return
        lines, problem = self._lines(batch)
        if status == "validating":
            if problem:
                batch.update(
                    status="failed",
                    failed_at=int(time.time()),
                    errors={"object": "list", "data": [{"code": "invalid_request", "message": problem, "line": None}]},
                )
                return
            batch.update(
                status="in_progress",
                in_progress_at=int(time.time()),
                request_counts={"total": len(lines), "completed": 0, "failed": 0},
            )
            return
        if status == "in_progress" and plan["end"] in ("completed", "failed"):
            done = len(lines) // 2
            batch["request_counts"] = {"total": len(lines), "completed": done, "failed": 0}
            batch.update(status="finalizing", finalizing_at=int(time.time()))
            return
        end = plan["end"] if status != "cancelling" else "cancelled"
        run = lines if end in ("completed", "failed") else lines[: plan["run_before_end"]]
        if end == "failed":
            batch.update(
                status="failed",
                failed_at=int(time.time()),
                errors={
                    "object": "list",
                    "data": [{"code": "server_error", "message": "the batch failed", "line": None}],
                },
            )
            return
        out, err = [], []
        for n, line in enumerate(lines):
            cid = line["custom_id"]
            if line in run and cid in plan["error_ids"]:
                err.append(
                    {
                        "id": f"batch_req_{n}",
                        "custom_id": cid,
                        "error": None,
                        "response": {"status_code": 500, "request_id": f"req_b{n}", "body": _error_body(500)},
                    }
                )
            elif line in run:
                rec = Recorded(
                    "POST",
                    "/v1/chat/completions",
                    {},
                    {},
                    line["body"],
                    b"",
                    None,
                    time.monotonic(),
                    route="batch",
                    request_id=f"req_b{n}",
                )
                code, answer, _ = self._chat(rec, None)
                out.append(
                    {
                        "id": f"batch_req_{n}",
                        "custom_id": cid,
                        "error": None,
                        "response": {"status_code": code, "request_id": f"req_b{n}", "body": answer},
                    }
                )
            else:
                code = "batch_expired" if end == "expired" else "batch_cancelled"
                err.append(
                    {
                        "id": f"batch_req_{n}",
                        "custom_id": cid,
                        "response": None,
                        "error": {"code": code, "message": f"This request was not executed: the batch was {end}."},
                    }
                )
        for key, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[key] = self._add_file(data, "batch_output", f"{batch['id']}_{key}.jsonl")["id"]
        batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(lines) - len(out)}
        batch.update(status=end, **{f"{end}_at": int(time.time())})


if __name__ == "__main__":  # its own process: serve until stdin closes
    server = FakeBatchServer().start()
    print(f"PORT {server.port}", flush=True)
    sys.stdin.read()
    server.stop()
