"""Batches: the :class:`Runner` behind ``LLMCall.map`` and ``tinyllm map`` (a bounded window of futures on
any executor, a durable resumable JSONL output), :class:`BatchAPIRunner` (the same through the OpenAI / Azure
OpenAI Batch API, at the batch price), the CSV/JSONL row readers, and Dask executors.

Everything here is imported on first use: ``import tinyllm`` loads none of it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Runner",
    "BatchSummary",
    "Outcome",
    "JsonlOutput",
    "read_rows",
    "readable_twice",
    "dask_executor",
    "BatchAPIRunner",
    "BatchAPISummary",
]

_WHERE = {
    "Runner": "._runner",
    "BatchSummary": "._runner",
    "Outcome": "._runner",
    "JsonlOutput": "._runner",
    "read_rows": "._readers",
    "readable_twice": "._readers",
    "dask_executor": "._dask",
    "BatchAPIRunner": "._batch_api",
    "BatchAPISummary": "._batch_api",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'tinyllm.batch' has no attribute {name!r}")
