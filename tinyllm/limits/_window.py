"""How long until a rate limit (from the ``limits`` package) has room: shared by the in-process and Redis limiters."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["time_to_room"]


def time_to_room(limiter: Any, item: Any, tokens: int, sliding: bool) -> float:
    """Seconds until ``limiter`` has room for ``tokens`` (requests or tokens) under ``item`` (0 if it has now).

    ``cost=`` below is the ``limits`` library's name for a hit's weight, not USD.
    """
    if limiter.test(item, cost=tokens):
        return 0.0
    if not sliding:
        # moving window, one unit: room when the oldest entry in the window expires
        return max(limiter.get_window_stats(item).reset_time - time.time(), 0.001)
    # sliding window counter: weighted = prev * prev_ttl / E + cur must fall below room
    expiry, room = item.get_expiry(), item.amount - tokens + 1
    prev, prev_ttl, cur, cur_ttl = limiter.storage.get_sliding_window(item.key_for(), expiry)
    if cur < room:  # room comes as the previous window's weight decays
        return (max(prev_ttl - (room - cur) * expiry / prev, 0.0) if prev else 0.0) + 0.001
    # else after the current window rolls over (in cur_ttl - E s) and decays enough
    return cur_ttl - expiry + expiry * (1 - room / cur) + 0.001
