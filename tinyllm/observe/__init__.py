"""Seeing what calls did: the SQLite call log, OpenTelemetry spans, usage statistics and USD prices."""

from __future__ import annotations

from ._calllog import CallLog, call_log, default_path, log_path
from ._pricing import estimate_cost, model_prices, reply_cost, usd
from ._usage import reset_usage_stats, usage_stats

__all__ = [
    "CallLog",
    "call_log",
    "log_path",
    "default_path",
    "usage_stats",
    "reset_usage_stats",
    "reply_cost",
    "estimate_cost",
    "model_prices",
    "usd",
]
