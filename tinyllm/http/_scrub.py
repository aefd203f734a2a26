"""Scrubbing secrets from text and JSON bodies: API keys given, and anything shaped like one."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["redact", "redact_body"]

_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,}|Bearer\s+\S+)")


def redact(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` with every given secret and anything shaped like an API key replaced by ``****``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "****")
    return _KEYLIKE.sub("****", text)


def redact_body(body: Any, secrets: tuple[str, ...]) -> Any:
    """``body`` (JSON: str, dict, list, other) with :func:`redact` applied to every string in it."""
    if isinstance(body, str):
        return redact(body, secrets)
    if isinstance(body, dict):
        return {k: redact_body(v, secrets) for k, v in body.items()}
    if isinstance(body, list):
        return [redact_body(v, secrets) for v in body]
    return body
