"""Facts per model family, in one table: encoding, context window, reasoning or not.

A model name is matched by NAME PREFIX, never by substring: the longest prefix
in :data:`MODELS` that the name starts with wins, and the prefix must end at the
end of the name or before a ``-`` or ``:`` (so ``o3-mini-2025-01-31`` is
``o3-mini``, ``gpt-4o`` is never taken for the o-series, ``omni-x`` matches
nothing, and ``gpt-4.5-preview`` is not taken for ``gpt-4``). A leading
``openai/`` (LiteLLM/OpenRouter style) or ``ft:`` (fine-tuned models) is
stripped first; matching ignores case.

Sources of the numbers (all token counts): OpenAI's model pages,
https://platform.openai.com/docs/models/<model> (e.g. ``.../models/gpt-4o``,
``.../models/o3-mini``), "Context window" and "Max output tokens"; encodings
as in tiktoken's ``tiktoken/model.py`` (``MODEL_PREFIX_TO_ENCODING``); which
parameters reasoning models accept from OpenAI's reasoning guide,
https://platform.openai.com/docs/guides/reasoning (``max_completion_tokens``
instead of ``max_tokens``; no ``temperature``/``top_p``/penalties).

Claude models (Anthropic): "Context window" and "Max output" of each model's page,
https://platform.claude.com/docs/en/models/<model>/overview (e.g. ``.../models/sonnet-5-5/overview``,
``.../models/opus-4-6/overview``; December 2026), for the synchronous Messages API (the
Batch API's larger beta outputs are not counted). Claude 3.x and Claude 4.0/4.1 from the
former overview table, https://docs.anthropic.com/en/docs/about-claude/models/overview.
Anthropic's tokenizer is not public: the ``encoding`` of a Claude row is o200k_base as an
estimate only (:class:`tinyllm.AnthropicClient` counts exactly through the API when asked).
The Messages API requires ``max_tokens``; the Anthropic client sends the row's
``max_output_tokens`` when neither the call nor the settings give one.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Any

__all__ = ["ModelInfo", "MODELS", "model_info", "adapt_params", "SAMPLING_PARAMS"]


@dataclass(frozen=True)
class ModelInfo:
    """What tinyllm knows about one model family.

    Attributes:
        family (str): the table key that matched, e.g. ``"o3-mini"``.
        encoding (str): tiktoken encoding name, ``"o200k_base"`` or ``"cl100k_base"``.
        context_window (int): tokens of input plus output the model accepts.
        max_output_tokens (int | None): most tokens one reply may have (None: not documented).
        reasoning (bool): an o-series/gpt-5 style reasoning model (takes
            ``max_completion_tokens`` and ``reasoning_effort``).
        sampling_params (bool): accepts ``temperature``, ``top_p``,
            ``frequency_penalty``, ``presence_penalty``.
    """

    family: str
    encoding: str
    context_window: int
    max_output_tokens: int | None
    reasoning: bool
    sampling_params: bool


_O200K, _CL100K = "o200k_base", "cl100k_base"


def _chat(family: str, enc: str, window: int, out: int | None) -> ModelInfo:
    return ModelInfo(family, enc, window, out, reasoning=False, sampling_params=True)


def _reasoning(family: str, window: int, out: int | None) -> ModelInfo:
    return ModelInfo(family, _O200K, window, out, reasoning=True, sampling_params=False)


def _claude(family: str, window: int, out: int) -> ModelInfo:
    # sampling_params False: API version 2026-10-21 (anthropic SDK 2.x) refuses temperature/top_p/top_k with a 400
    return ModelInfo(family, _O200K, window, out, reasoning=False, sampling_params=False)


_1M, _128K = 1_000_000, 128_000


# prefix -> facts (context window, max output tokens: OpenAI model pages, see module doc).
MODELS: dict[str, ModelInfo] = {
    # GPT-5: reasoning models, 400,000 context, 128,000 output.
    "gpt-5": _reasoning("gpt-5", 400_000, 128_000),
    "gpt-5-mini": _reasoning("gpt-5-mini", 400_000, 128_000),
    "gpt-5-nano": _reasoning("gpt-5-nano", 400_000, 128_000),
    # gpt-5-chat-latest is the non-reasoning ChatGPT model: 128,000 context, 16,384 output.
    "gpt-5-chat": _chat("gpt-5-chat", _O200K, 128_000, 16_384),
    # GPT-4.1 (and -mini, -nano): 1,047,576 context, 32,768 output.
    "gpt-4.1": _chat("gpt-4.1", _O200K, 1_047_576, 32_768),
    # GPT-4o family: 128,000 context, 16,384 output.
    "gpt-4o": _chat("gpt-4o", _O200K, 128_000, 16_384),
    "gpt-4o-mini": _chat("gpt-4o-mini", _O200K, 128_000, 16_384),
    "chatgpt-4o": _chat("gpt-4o", _O200K, 128_000, 16_384),
    # o-series reasoning models: 200,000 context, 100,000 output; o1-mini 128,000 / 65,536,
    # o1-preview 128,000 / 32,768.
    "o1": _reasoning("o1", 200_000, 100_000),
    "o1-mini": _reasoning("o1-mini", 128_000, 65_536),
    "o1-preview": _reasoning("o1-preview", 128_000, 32_768),
    "o3": _reasoning("o3", 200_000, 100_000),
    "o3-mini": _reasoning("o3-mini", 200_000, 100_000),
    "o4-mini": _reasoning("o4-mini", 200_000, 100_000),
    # GPT-4 Turbo (and its dated previews): 128,000 context, 4,096 output.
    "gpt-4-turbo": _chat("gpt-4-turbo", _CL100K, 128_000, 4_096),
    "gpt-4-1106": _chat("gpt-4-turbo", _CL100K, 128_000, 4_096),
    "gpt-4-0125": _chat("gpt-4-turbo", _CL100K, 128_000, 4_096),
    # GPT-4: 8,192 context, 8,192 output; GPT-4-32k: 32,768 context.
    "gpt-4": _chat("gpt-4", _CL100K, 8_192, 8_192),
    "gpt-4-32k": _chat("gpt-4-32k", _CL100K, 32_768, None),
    # GPT-3.5 Turbo: 16,385 context, 4,096 output; the instruct model 4,096 context.
    "gpt-3.5-turbo": _chat("gpt-3.5-turbo", _CL100K, 16_385, 4_096),
    "gpt-3.5-turbo-instruct": _chat("gpt-3.5-turbo-instruct", _CL100K, 4_096, 4_096),
    # Embeddings: 8,191 input tokens, no output tokens.
    "text-embedding-3": _chat("text-embedding-3", _CL100K, 8_191, None),
    "text-embedding-ada-002": _chat("text-embedding-ada-002", _CL100K, 8_191, None),
    # Claude (Anthropic; see the module doc): the current lineup and Claude 4.6 to 5: 1M context, 128K output.
    "claude-fable-5-2": _claude("claude-fable-5-2", _1M, _128K),
    "claude-fable-5-1": _claude("claude-fable-5-1", _1M, _128K),
    "claude-opus-5-5": _claude("claude-opus-5-5", _1M, _128K),
    "claude-opus-5": _claude("claude-opus-5", _1M, _128K),
    "claude-sonnet-5-5": _claude("claude-sonnet-5-5", _1M, _128K),
    "claude-sonnet-5": _claude("claude-sonnet-5", _1M, _128K),
    "claude-haiku-5-5": _claude("claude-haiku-5-5", _1M, _128K),
    "claude-opus-4-8": _claude("claude-opus-4-8", _1M, _128K),
    "claude-opus-4-7": _claude("claude-opus-4-7", _1M, _128K),
    "claude-opus-4-6": _claude("claude-opus-4-6", _1M, _128K),
    "claude-sonnet-4-6": _claude("claude-sonnet-4-6", _1M, _128K),
    # Claude 4.5: 200,000 context, 64,000 output.
    "claude-opus-4-5": _claude("claude-opus-4-5", 200_000, 64_000),
    "claude-sonnet-4-5": _claude("claude-sonnet-4-5", 200_000, 64_000),
    "claude-haiku-4-5": _claude("claude-haiku-4-5", 200_000, 64_000),
    # Claude 4.0/4.1 and 3.x: 200,000 context; Opus 4/4.1 32,000 output, Sonnet 4 and 3.7 64,000,
    # Haiku 3.5 8,192, Haiku 3 4,096.
    "claude-opus-4-1": _claude("claude-opus-4-1", 200_000, 32_000),
    "claude-opus-4": _claude("claude-opus-4", 200_000, 32_000),
    "claude-sonnet-4": _claude("claude-sonnet-4", 200_000, 64_000),
    "claude-3-7-sonnet": _claude("claude-3-7-sonnet", 200_000, 64_000),
    "claude-3-5-haiku": _claude("claude-3-5-haiku", 200_000, 8_192),
    "claude-3-haiku": _claude("claude-3-haiku", 200_000, 4_096),
}

# Reasoning families that reject ``reasoning_effort`` (OpenAI API: "Unsupported
# parameter: 'reasoning_effort' is not supported with this model").
_NO_REASONING_EFFORT = frozenset({"o1-mini", "o1-preview"})

#: Parameters reasoning models reject (sampling_params False).
SAMPLING_PARAMS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")

_STRIP = ("openai/", "anthropic/", "ft:")
_BOUNDARY = ("-", ":")


def _normalize(model: str) -> str:
    name = model.strip().lower()
    for prefix in _STRIP:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def model_info(model: str) -> ModelInfo | None:
    """Return the facts for ``model`` (str), or None when no family matches.

    Longest matching prefix wins; see the module docstring for the rules.
    """
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, not {type(model).__name__}")
    return _scan(model)


@functools.lru_cache(maxsize=1024)  # called a few times per request: scan MODELS once per name
def _scan(model: str) -> ModelInfo | None:
    name = _normalize(model)
    best: str | None = None
    for prefix in MODELS:
        if name.startswith(prefix) and (len(name) == len(prefix) or name[len(prefix)] in _BOUNDARY):
            if best is None or len(prefix) > len(best):
                best = prefix
    return MODELS[best] if best is not None else None


def adapt_params(model: str, params: dict[str, Any], *, reasoning_effort: str | None = None) -> dict[str, Any]:
    """Return a NEW dict of request parameters that ``model`` accepts; ``params`` is not changed.

    Reasoning models (o-series, gpt-5): ``max_tokens`` becomes ``max_completion_tokens``
    (dropped if ``max_completion_tokens`` is already given); ``temperature``, ``top_p``,
    ``frequency_penalty`` and ``presence_penalty`` are dropped; ``reasoning_effort``
    (``"minimal"``/``"low"``/``"medium"``/``"high"``) is set when given and not already
    in ``params`` (o1-mini and o1-preview reject it, so it is dropped for them).

    Known non-reasoning models: ``reasoning_effort`` is dropped if present.
    Unknown models: ``params`` pass through untouched (a copy), and the
    ``reasoning_effort`` argument is ignored: the server decides.
    """
    out = dict(params)
    info = model_info(model)
    if info is None:
        return out
    if not info.reasoning:
        out.pop("reasoning_effort", None)
        return out
    if "max_tokens" in out:
        max_tokens = out.pop("max_tokens")
        out.setdefault("max_completion_tokens", max_tokens)
    if not info.sampling_params:
        for key in SAMPLING_PARAMS:
            out.pop(key, None)
    if info.family in _NO_REASONING_EFFORT:
        out.pop("reasoning_effort", None)
    elif reasoning_effort is not None:
        out.setdefault("reasoning_effort", reasoning_effort)
    return out
