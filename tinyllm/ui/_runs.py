"""Runs started from the page: a POST (Origin and session token checked) registers a run under
an unguessable id; the page's EventSource then reads it once as server-sent events.

Events (each ``data`` is JSON): ``start`` ``{"model", "api_type"}``; ``delta`` a text delta
(str); ``done`` ``{"model", "latency", "ttft", "prompt_tokens", "completion_tokens", "cost"}``
(seconds, tokens, USD or null); ``error`` ``{"type", "message"}`` (secrets scrubbed).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..call import LLMCall
from ..config import API_KEY_NAMES, get_config
from ..http import redact
from ..prompts import Prompt

__all__ = ["MAX_COMPARE", "Run", "Runs", "run_events"]

log = logging.getLogger("tinyllm")
MAX_COMPARE = 4  # models side by side in Compare
PENDING_SECONDS = 120.0  # a run whose stream is not opened within this time is dropped
MAX_PENDING = 64


@dataclass
class Run:
    """One run waiting for its stream: the (possibly edited) prompt, its variables, where to send it."""

    prompt: Prompt
    variables: dict[str, Any]
    api_type: str | None
    model: str | None
    session: str
    created: float = field(default_factory=time.monotonic)


class Runs:
    """Runs registered by POST and taken, once, by the stream that sends them (thread-safe)."""

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()

    def add(self, run: Run) -> str:
        """Register ``run``; returns its id (32 random bytes, URL-safe)."""
        run_id = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for key in [k for k, r in self._runs.items() if now - r.created > PENDING_SECONDS]:
                del self._runs[key]
            while len(self._runs) >= MAX_PENDING:
                del self._runs[next(iter(self._runs))]
            self._runs[run_id] = run
        return run_id

    def take(self, run_id: str, session: str) -> Run | None:
        """The run ``run_id`` registered by ``session``, removed; None if unknown, expired, taken or another session's."""
        with self._lock:
            run = self._runs.get(run_id)
            if (
                run is None
                or not secrets.compare_digest(run.session, session)
                or time.monotonic() - run.created > PENDING_SECONDS
            ):
                return None
            del self._runs[run_id]
            return run


def _scrubbed(text: str) -> str:
    cfg = get_config()
    return redact(text, tuple(v for v in (cfg.secret(n) for n in API_KEY_NAMES) if v))


def _event(name: str, data: Any) -> dict[str, str]:
    return {"event": name, "data": json.dumps(data, ensure_ascii=False)}


async def run_events(run: Run) -> AsyncIterator[dict[str, str]]:
    """Send ``run`` as a streamed call (``LLMCall(prompt).astream``) and yield its SSE events (see the module doc).

    Every failure becomes one ``error`` event; the stream is closed when the page goes away.
    """
    response = None
    try:
        params: dict[str, Any] = {"model": run.model} if run.model else {}
        call = LLMCall(run.prompt, api_type=run.api_type or None, **params)
        yield _event("start", {"model": run.model, "api_type": run.api_type})
        response = await call.astream(**run.variables)
        async for delta in response:
            yield _event("delta", delta)
        usage = response.usage or {}
        yield _event(
            "done",
            {
                "model": response.model,
                "latency": response.latency,
                "ttft": response.time_to_first_token,
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "cost": response.cost,
            },
        )
    except Exception as exc:
        log.debug("tinyllm ui: run failed", exc_info=True)
        yield _event("error", {"type": type(exc).__name__, "message": _scrubbed(str(exc))})
    finally:
        if response is not None:
            await response.aclose()
