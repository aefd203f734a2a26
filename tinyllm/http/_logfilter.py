"""A logging filter that keeps credentials out of the HTTP libraries' own log lines.

httpx logs every request at INFO as ``HTTP Request: POST https://user:password@host/v1/...?key=... "HTTP/1.1 200 OK"``
(logger ``httpx``, ``httpx2`` for the SDK's newer releases): a password in ``BASE_URL`` or a key sent as
a query parameter (``extra_query``) would be printed by any application that shows INFO logs. The
openai SDK's DEBUG lines carry the request options (``headers``, ``params``), where it masks only
``Authorization`` and ``api-key``.

:func:`install` puts :class:`RedactingFilter` on those loggers (once per process; tinyllm calls it
when it builds an HTTP client): a URL in a record's arguments loses its user:password part and its
query values (:func:`tinyllm.config.redact_url`); header and query values in the SDK's option dicts
are masked unless their name is known to be safe (the call log's allow-lists).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["LOGGERS", "RedactingFilter", "install"]

#: the loggers filtered: httpx (both package names), httpcore, the openai SDK
LOGGERS = ("httpx", "httpx2", "httpcore", "openai", "anthropic")


class RedactingFilter(logging.Filter):
    """Rewrites a record's arguments in place: URLs redacted, unsafe header and query values masked.
    Never drops a record (one it cannot redact is replaced by a line saying so)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        try:
            if isinstance(args, tuple):
                record.args = tuple(_redact(a) for a in args)
            elif isinstance(args, dict):
                record.args = _redact_options(args)
            if isinstance(record.msg, str) and "://" in record.msg:
                record.msg = _redact_text(record.msg)
        except Exception as exc:  # noqa: BLE001 - a filter must never break the application's logging
            # what could not be redacted is not shown: the line says so instead
            record.msg, record.args = f"(a log line withheld: tinyllm could not redact it: {type(exc).__name__})", ()
        return True


def _is_url(value: Any) -> bool:
    return type(value).__name__ == "URL" or (isinstance(value, str) and "://" in value)


def _redact(value: Any) -> Any:
    from ..config import redact_url

    return redact_url(str(value)) if _is_url(value) else value


def _redact_text(text: str) -> str:
    """URLs inside free text redacted word by word."""
    from ..config import redact_url

    return " ".join(redact_url(w) if "://" in w else w for w in text.split(" "))


def _redact_options(options: dict) -> dict:
    from ..observe._calllog import MASKED, SAFE_HEADERS, SAFE_QUERY

    out = dict(options)
    for name, safe in (("headers", SAFE_HEADERS), ("params", SAFE_QUERY)):
        given = out.get(name)
        if isinstance(given, dict):
            out[name] = {k: (v if str(k).lower() in safe else MASKED) for k, v in given.items()}
    if "url" in out and _is_url(out["url"]):
        out["url"] = _redact(out["url"])
    return out


_filter = RedactingFilter()


def install() -> None:
    """Put the filter on :data:`LOGGERS` (idempotent; it does not import the libraries)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _filter not in logger.filters:
            logger.addFilter(_filter)
