"""tinyllm.models: prefix matching of model families and parameter adaptation."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from tinyllm.models import MODELS, ModelInfo, adapt_params, model_info

# (model name, family, encoding, context window, reasoning); family None = unknown model.
CASES = [
    ("gpt-4o", "gpt-4o", "o200k_base", 128_000, False),
    ("gpt-4o-2024-08-06", "gpt-4o", "o200k_base", 128_000, False),
    ("gpt-4o-mini", "gpt-4o-mini", "o200k_base", 128_000, False),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini", "o200k_base", 128_000, False),
    ("chatgpt-4o-latest", "gpt-4o", "o200k_base", 128_000, False),
    ("o1", "o1", "o200k_base", 200_000, True),
    ("o1-2024-12-17", "o1", "o200k_base", 200_000, True),
    ("o1-mini", "o1-mini", "o200k_base", 128_000, True),
    ("o3", "o3", "o200k_base", 200_000, True),
    ("o3-mini", "o3-mini", "o200k_base", 200_000, True),
    ("o3-mini-2025-01-31", "o3-mini", "o200k_base", 200_000, True),
    ("o4-mini", "o4-mini", "o200k_base", 200_000, True),
    ("gpt-5", "gpt-5", "o200k_base", 400_000, True),
    ("gpt-5-mini", "gpt-5-mini", "o200k_base", 400_000, True),
    ("gpt-5-nano-2025-08-07", "gpt-5-nano", "o200k_base", 400_000, True),
    ("gpt-5-chat-latest", "gpt-5-chat", "o200k_base", 128_000, False),
    ("gpt-4.1", "gpt-4.1", "o200k_base", 1_047_576, False),
    ("gpt-4.1-nano", "gpt-4.1", "o200k_base", 1_047_576, False),
    ("gpt-4.1-mini-2025-04-14", "gpt-4.1", "o200k_base", 1_047_576, False),
    ("gpt-4-turbo", "gpt-4-turbo", "cl100k_base", 128_000, False),
    ("gpt-4-turbo-2024-04-09", "gpt-4-turbo", "cl100k_base", 128_000, False),
    ("gpt-4-0125-preview", "gpt-4-turbo", "cl100k_base", 128_000, False),
    ("gpt-4", "gpt-4", "cl100k_base", 8_192, False),
    ("gpt-4-0613", "gpt-4", "cl100k_base", 8_192, False),
    ("gpt-4-32k", "gpt-4-32k", "cl100k_base", 32_768, False),
    ("gpt-3.5-turbo", "gpt-3.5-turbo", "cl100k_base", 16_385, False),
    ("gpt-3.5-turbo-0125", "gpt-3.5-turbo", "cl100k_base", 16_385, False),
    ("text-embedding-3-small", "text-embedding-3", "cl100k_base", 8_191, False),
    ("text-embedding-3-large", "text-embedding-3", "cl100k_base", 8_191, False),
    ("text-embedding-ada-002", "text-embedding-ada-002", "cl100k_base", 8_191, False),
    # provider prefix, fine-tune prefix and case are normalized
    ("openai/o4-mini", "o4-mini", "o200k_base", 200_000, True),
    ("ft:gpt-4o-mini-2024-07-18:org::abc123", "gpt-4o-mini", "o200k_base", 128_000, False),
    ("GPT-4o", "gpt-4o", "o200k_base", 128_000, False),
]

UNKNOWN = [
    "foo-model",
    "omni-x",  # no substring match on "o"
    "my-o3-mini",  # o-series only at the start of the name
    "llama-3-gpt-4o",
    "o10",  # the prefix must end at a boundary
    "gpt-4.5-preview",  # not gpt-4 (8k window would refuse valid prompts)
    "gpt-4ox",
    "",
]


@pytest.mark.parametrize("name,family,encoding,window,reasoning", CASES)
def test_model_info_known(name, family, encoding, window, reasoning):
    info = model_info(name)
    assert info is not None
    assert (info.family, info.encoding, info.context_window, info.reasoning) == (
        family,
        encoding,
        window,
        reasoning,
    )
    assert info.sampling_params is (not reasoning)


@pytest.mark.parametrize("name", UNKNOWN)
def test_model_info_unknown(name):
    assert model_info(name) is None


def test_model_info_rejects_non_str():
    with pytest.raises(TypeError):
        model_info(None)  # type: ignore[arg-type]


def test_model_info_is_frozen():
    info = model_info("gpt-4o")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.context_window = 1  # type: ignore[misc]


def test_table_is_consistent():
    for prefix, info in MODELS.items():
        assert isinstance(info, ModelInfo)
        assert prefix == prefix.lower()
        assert info.encoding in ("o200k_base", "cl100k_base")
        assert info.context_window > 0
        if info.max_output_tokens is not None:
            assert 0 < info.max_output_tokens <= info.context_window
        if info.reasoning:
            assert info.encoding == "o200k_base"


PARAMS = {
    "max_tokens": 500,
    "temperature": 0.2,
    "top_p": 0.9,
    "frequency_penalty": 0.1,
    "presence_penalty": 0.3,
    "seed": 7,
}


@pytest.mark.parametrize("model", ["o3-mini", "o3-mini-2025-01-31", "o4-mini", "o1", "gpt-5-mini", "openai/o3"])
def test_adapt_params_reasoning(model):
    params = copy.deepcopy(PARAMS)
    out = adapt_params(model, params, reasoning_effort="low")
    assert out == {"max_completion_tokens": 500, "seed": 7, "reasoning_effort": "low"}
    assert params == PARAMS  # input not mutated
    assert out is not params


def test_adapt_params_reasoning_keeps_explicit_values():
    params = {"max_tokens": 500, "max_completion_tokens": 900, "reasoning_effort": "high"}
    out = adapt_params("o3-mini", params, reasoning_effort="low")
    assert out == {"max_completion_tokens": 900, "reasoning_effort": "high"}


def test_adapt_params_reasoning_without_effort():
    assert adapt_params("o4-mini", {"temperature": 0}) == {}


def test_adapt_params_o1_mini_rejects_reasoning_effort():
    out = adapt_params("o1-mini", {"max_tokens": 10, "reasoning_effort": "low"}, reasoning_effort="high")
    assert out == {"max_completion_tokens": 10}


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "gpt-3.5-turbo"])
def test_adapt_params_non_reasoning_keeps_sampling(model):
    params = dict(PARAMS, reasoning_effort="low")
    out = adapt_params(model, params, reasoning_effort="high")
    assert out == PARAMS  # reasoning_effort dropped, the rest kept
    assert params == dict(PARAMS, reasoning_effort="low")


@pytest.mark.parametrize("model", ["foo-model", "omni-x", "llama3.2:1b"])
def test_adapt_params_unknown_untouched(model):
    params = dict(PARAMS, reasoning_effort="low")
    before = copy.deepcopy(params)
    out = adapt_params(model, params, reasoning_effort="high")
    assert out == before
    assert out is not params
    assert params == before
