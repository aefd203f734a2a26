"""Tools as the openai SDK sends them: a pydantic model's own docstring only, ``strict: true`` with the SDK's
strict schema; functions strict on request. Compared with ``openai.pydantic_function_tool`` itself, and checked
in what the loopback server received."""

from __future__ import annotations

import openai
import pytest
from fakeserver import Message, Reply
from helpers import write
from pydantic import BaseModel, Field

from tinyllm import LLMCall, Tool, configure


class Undocumented(BaseModel):
    city: str


class Address(BaseModel):
    street: str
    zip_code: str | None = None


class Order(BaseModel):
    """An order to place.

    Several lines, as written.
    """

    item: str = Field(description="what to buy")
    quantity: int = 1
    ship_to: Address


def lookup(city: str, unit: str = "C") -> str:
    """The weather.

    Args:
        city: the city.
        unit: C or F.
    """
    return f"{city} 18{unit}"


@pytest.mark.parametrize("model", [Undocumented, Order])
def test_a_model_tool_is_what_the_sdk_sends(model):
    assert Tool(model).spec() == openai.pydantic_function_tool(model)


def test_an_undocumented_model_has_no_inherited_description():
    spec = Tool(Undocumented).spec()["function"]
    assert "description" not in spec and Tool(Undocumented).description == ""
    assert BaseModel.__doc__  # what was sent before: pydantic's own docstring


def test_a_strict_model_schema():
    params = Tool(Order).spec()["function"]["parameters"]
    assert params["additionalProperties"] is False and params["required"] == ["item", "quantity", "ship_to"]
    assert params["$defs"]["Address"]["additionalProperties"] is False
    assert params["$defs"]["Address"]["required"] == ["street", "zip_code"]


def test_functions_are_not_strict_unless_asked():
    loose = Tool(lookup).spec()["function"]
    assert "strict" not in loose and loose["parameters"]["required"] == ["city"]
    strict = Tool(lookup, strict=True).spec()["function"]
    assert strict["strict"] is True and strict["description"] == "The weather."
    assert (
        strict["parameters"]["required"] == ["city", "unit"] and strict["parameters"]["additionalProperties"] is False
    )
    assert "strict" not in Tool(Order, strict=False).spec()["function"]


def test_the_server_receives_the_sdk_spec(server, tmp_path):
    configure(api_type="openai", base_url=server.base_url, waiting_time=0, model="gpt-4o-mini")
    write(tmp_path / "prompts" / "q.system.md", "Answer.")
    write(tmp_path / "prompts" / "q.user.md", "{{ question }}")
    call = {
        "id": "c1",
        "type": "function",
        "function": {
            "name": "Order",
            "arguments": '{"item": "tea", "quantity": 2, "ship_to": {"street": "x", "zip_code": null}}',
        },
    }
    server.enqueue(Message({"content": None, "tool_calls": [call]}), Reply("ordered"))
    r = LLMCall("q", tools=[Order]).respond(question="?")
    assert r.value == "ordered" and r.tool_calls[0].result.item == "tea"
    assert server.chat_requests()[0].json["tools"] == [openai.pydantic_function_tool(Order)]
