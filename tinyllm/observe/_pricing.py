"""Cost in USD of a reply, from pydantic's ``genai-prices`` table (or the ``PRICES`` setting).

The table is looked up by the client's provider (``openai``: the base URL's
provider when genai-prices knows the URL, else OpenAI's own prices, so a proxy
in front of OpenAI is priced as OpenAI; ``azure``: Azure's; ``anthropic``:
Anthropic's) and the model's name (the model that answered, else the one asked
for). It has cached-input prices (``prompt_tokens_details.cached_tokens``, read
from a prompt cache), prompt-cache write prices
(``prompt_tokens_details.cache_creation_tokens``, Anthropic's
``cache_creation_input_tokens``) and, where a model has one, a reasoning price
(``completion_tokens_details.reasoning_tokens``). ``prompt_tokens`` counts every
input token, cached and cache-written ones included (OpenAI's convention; the
Anthropic client adds them up so).

A model the table does not have, the embedded model (``llamacpp``), ``ollama``
and any other client cost None (unknown), never 0, unless ``PRICES`` names the
model: ``{"model": {"input_per_mtok": 0.5, "output_per_mtok": 1.5,
"cached_input_per_mtok": 0.25, "cache_write_per_mtok": 0.6}}`` (USD per million tokens;
cached input and cache writes default to the input price), which wins over the table. A reply from the cache costs 0.0
(nothing was paid) when the model is priced, else None.

Batch API replies (``tinyllm map --batch-api``) are priced at the batch price: genai-prices'
``{"processing": "batch"}`` price variant where the table has one, else half the list price
(OpenAI's, Azure's and Anthropic's published batch discount, 50%), which :func:`batch_price_kind` reports
so it can be marked. A client object with ``batch_pricing = True`` (the Batch API's replay of
the results) is priced that way.

genai-prices is imported on the first priced call (about 0.4 s), never by ``import tinyllm``.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any

__all__ = ["reply_cost", "estimate_cost", "model_prices", "usd", "batch_price_kind", "BATCH_DISCOUNT"]

log = logging.getLogger("tinyllm")
#: api_type -> genai-prices provider id; other clients are local or unknown: no price
PROVIDERS = {"openai": "openai", "azure": "azure", "anthropic": "anthropic"}
#: what a Batch API reply costs relative to the list price when the table has no batch price
#: (OpenAI's and Azure OpenAI's Batch API: "50% less cost" in both providers' docs; Anthropic's Message
#: Batches: "50% of standard API prices")
BATCH_DISCOUNT = 0.5
_BATCH_CONTEXT = {"processing": "batch"}  # genai-prices' price-variant condition of batch prices


def usd(cost: float | None) -> str:
    """USD as text: ``$1.2345``, amounts under a cent with six decimals (``$0.000016``), ``unknown`` for None."""
    if cost is None:
        return "unknown"
    return f"${cost:.4f}" if cost >= 0.01 or cost == 0 else f"${cost:.6f}"


def _tokens(usage: dict) -> tuple[int, int, int, int, int] | None:
    """(input, cached input, output, reasoning, cache-write input) tokens of an API ``usage`` dict; None when it reports none."""
    if not usage or (usage.get("prompt_tokens") is None and usage.get("completion_tokens") is None):
        return None
    details_in = usage.get("prompt_tokens_details") or {}
    details_out = usage.get("completion_tokens_details") or {}
    cached = details_in.get("cached_tokens") if isinstance(details_in, dict) else None
    written = details_in.get("cache_creation_tokens") if isinstance(details_in, dict) else None
    reasoning = details_out.get("reasoning_tokens") if isinstance(details_out, dict) else None
    return (
        int(usage.get("prompt_tokens") or 0),
        int(cached or 0),
        int(usage.get("completion_tokens") or 0),
        int(reasoning or 0),
        int(written or 0),
    )


@functools.lru_cache(maxsize=256)
def _table_entry(provider_id: str, base_url: str | None, model: str) -> Any:
    """(genai-prices Provider, ModelInfo) for ``model``, or None when the table has no price for it."""
    try:
        from genai_prices import data_snapshot
    except ImportError:  # Python 3.10 (genai-prices needs 3.11) or not installed
        return None
    snap = data_snapshot.get_snapshot()
    provider = None
    if base_url:
        try:
            provider = snap.find_provider(None, None, base_url)
        except LookupError:
            provider = None  # a proxy, a local server: priced by its api_type's provider
    try:
        if provider is not None:
            return snap.find_provider_model(model, provider, None, None)
        return snap.find_provider_model(model, None, provider_id, None)
    except LookupError:
        return None


@functools.lru_cache(maxsize=256)
def _has_batch_price(key: tuple[str, str | None, str]) -> bool:
    """Whether the table entry of ``key`` has a batch price variant in force now."""
    import datetime

    _, model = _table_entry(*key)
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    return any(
        v.when == _BATCH_CONTEXT and (v.constraint is None or v.constraint.active(now))
        for v in (getattr(model, "price_variants", None) or ())
    )


@functools.lru_cache(maxsize=4096)
def _table_cost(key: tuple[str, str | None, str], tokens: tuple[int, int, int, int, int], batch: bool = False) -> float:
    """USD of ``tokens`` for the table entry of ``key`` (``(provider_id, base_url, model)``, found);
    ``batch``: at the batch price (the table's, else the list price times :data:`BATCH_DISCOUNT`)."""
    from genai_prices import Usage

    n_in, n_cached, n_out, n_reasoning, n_written = tokens
    cached = min(n_cached, n_in)
    usage = Usage(
        input_tokens=n_in,
        cache_read_tokens=cached,
        cache_write_tokens=min(n_written, n_in - cached),
        output_tokens=n_out,
        output_reasoning_tokens=min(n_reasoning, n_out),
    )
    provider, model = _table_entry(*key)
    if batch and _has_batch_price(key):
        return float(model.calc_price(usage, provider, price_context=_BATCH_CONTEXT).total_price)
    total = float(model.calc_price(usage, provider).total_price)
    return total * BATCH_DISCOUNT if batch else total


def _override_cost(price: dict, tokens: tuple[int, int, int, int, int]) -> float:
    n_in, n_cached, n_out, _, n_written = tokens
    cached = min(n_cached, n_in)
    written = min(n_written, n_in - cached)
    per_cached = price.get("cached_input_per_mtok", price["input_per_mtok"])
    per_written = price.get("cache_write_per_mtok", price["input_per_mtok"])
    return (
        (n_in - cached - written) * price["input_per_mtok"]
        + cached * per_cached
        + written * per_written
        + n_out * price["output_per_mtok"]
    ) / 1e6


def _base_url(client: Any, cfg: Any) -> str | None:
    where = getattr(client, "where", None)
    try:
        return where(cfg) if where is not None else cfg.base_url
    except Exception:  # noqa: BLE001 - an unconfigured endpoint: price by the provider id alone
        return None


# (weak reference to the client, settings, models, source) of the last lookup: a run of calls asks
# the same question every time
_last_source: tuple[Any, Any, tuple, Any] = (lambda: None, None, (), None)


def _price_source(client: Any, cfg: Any, models: tuple[str | None, ...]) -> Any:
    """The override dict, or the table key ``(provider_id, base_url, model)``, pricing the first of
    ``models`` that has a price; None if none. The answer depends on the client, its settings
    (an immutable snapshot) and the models only, so the last one is kept."""
    global _last_source
    last = _last_source
    if last[1] is cfg and last[0]() is client and last[2] == models:
        return last[3]
    source = _find_source(client, cfg, models)
    try:
        _last_source = (weakref.ref(client), cfg, models, source)
    except TypeError:  # an object without weak references: not kept
        pass
    return source


def _find_source(client: Any, cfg: Any, models: tuple[str | None, ...]) -> Any:
    prices = cfg.prices
    for model in models:
        if model and model in prices:
            return prices[model]
    provider_id = PROVIDERS.get(getattr(client, "api_type", ""))
    if provider_id is None:
        return None
    base_url = _base_url(client, cfg) if provider_id == "openai" else None
    for model in models:
        if model:
            if _table_entry(provider_id, base_url, model) is not None:
                return (provider_id, base_url, model)
    return None


def reply_cost(
    client: Any,
    cfg: Any,
    usage: dict,
    model: str | None,
    asked: str | None = None,
    *,
    cached: bool = False,
    batch: bool = False,
) -> float | None:
    """USD of one reply.

    Args:
        client: the client that answered (its ``api_type`` picks the provider).
        cfg: the request's settings (``PRICES``; the base URL).
        usage: the API's ``usage`` dict (``prompt_tokens``, ``completion_tokens``, and the
            ``prompt_tokens_details`` / ``completion_tokens_details`` when sent).
        model: the model that answered; ``asked``: the one asked for, tried second.
        cached: the reply came from the cache (costs 0.0 when the model is priced).
        batch: a Batch API reply (also when ``client.batch_pricing`` is true): the batch price,
            see :func:`batch_price_kind`.

    Returns:
        float USD, or None when the price or the usage is unknown. Never raises.
    """
    try:
        source = _price_source(client, cfg, (model, asked))
        if source is None:
            return None
        if cached:
            return 0.0
        tokens = _tokens(usage)
        if tokens is None:
            return None
        batch = batch or bool(getattr(client, "batch_pricing", False))
        if isinstance(source, dict):
            return _override_cost(source, tokens) * (BATCH_DISCOUNT if batch else 1.0)
        return _table_cost(source, tokens, batch)
    except Exception as exc:  # noqa: BLE001 - a price is never worth failing a call for
        log.debug("no price for %s: %s", model, exc)
        return None


def estimate_cost(
    client: Any, cfg: Any, model: str, prompt_tokens: int, completion_tokens: int, *, batch: bool = False
) -> float | None:
    """USD of ``prompt_tokens`` input (none of it cached) and ``completion_tokens`` output for ``model``
    (``batch``: at the batch price); None when unpriced."""
    return reply_cost(
        client, cfg, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}, model, batch=batch
    )


def batch_price_kind(client: Any, cfg: Any, model: str) -> str | None:
    """How a Batch API reply of ``model`` is priced: ``"batch"`` (genai-prices has its batch price),
    ``"half"`` (half the list price: the table has no batch price for it, or ``PRICES`` prices it),
    or None (no price at all). Never raises."""
    try:
        source = _price_source(client, cfg, (model,))
        if source is None:
            return None
        return "half" if isinstance(source, dict) or not _has_batch_price(source) else "batch"
    except Exception:  # noqa: BLE001 - as reply_cost
        return None


def model_prices(client: Any, cfg: Any, model: str) -> dict[str, float] | None:
    """``{"input_per_mtok", "output_per_mtok"}`` USD for ``model``, as :func:`reply_cost` prices it; None when unpriced."""
    per_in = estimate_cost(client, cfg, model, 1_000_000, 0)
    per_out = estimate_cost(client, cfg, model, 0, 1_000_000)
    if per_in is None or per_out is None:
        return None
    return {"input_per_mtok": per_in, "output_per_mtok": per_out}
