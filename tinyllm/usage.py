"""Usage statistics, summed over every client in this process (thread-safe)."""

from __future__ import annotations

import threading

__all__ = ["usage_stats", "reset_usage_stats", "record"]

_FIELDS = ("calls", "cached_calls", "retries", "prompt_tokens", "completion_tokens", "total_tokens")
_lock = threading.Lock()
_stats = dict.fromkeys(_FIELDS, 0)


def record(**counts: int) -> None:
    """Add ``counts`` (names from :func:`usage_stats`) to the totals."""
    with _lock:
        for name, value in counts.items():
            _stats[name] += value


def usage_stats() -> dict[str, int]:
    """Totals since start or the last :func:`reset_usage_stats`.

    Returns:
        dict[str, int] with ``calls`` (requests answered, from the API or the
        cache), ``cached_calls`` (answered from the cache), ``retries`` (extra
        HTTP attempts), and ``prompt_tokens``, ``completion_tokens``,
        ``total_tokens`` as the API's ``usage`` reported them, summed over
        every attempt that returned usage.
    """
    with _lock:
        return dict(_stats)


def reset_usage_stats() -> None:
    """Set every counter of :func:`usage_stats` back to zero."""
    with _lock:
        for name in _FIELDS:
            _stats[name] = 0
