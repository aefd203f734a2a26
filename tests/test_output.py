"""Structured output: output_type parsing (tables), and LLMCall over the loopback server.

What the server RECEIVED is checked (response_format, retry messages), not only
what LLMCall returns.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import write
from fakeserver import Message, Reply
from pydantic import BaseModel

from tinyllm import LLMCall, OutputParseError, ResponseError, configure, get_client
from tinyllm.output import extract_json, normalize_output_type, parse_output, response_format_for


class Item(BaseModel):
    name: str
    tags: list[str]


class Order(BaseModel):
    id: int
    items: list[Item]


class Facts(BaseModel):
    facts: list[str]


# --- normalize_output_type -------------------------------------------------------------------------

NORMALIZE = [
    (None, None),
    (str, None),
    ("str", None),
    ("bool", bool),
    ("BOOL", bool),
    ("int", int),
    ("float", float),
    ("json", dict),
    ("dict", dict),
    ("list", list),
    (bool, bool),
    (int, int),
    (float, float),
    (dict, dict),
    (list, list),
    (Order, Order),
    (["positive", "negative"], ("positive", "negative")),
    (("a", "b"), ("a", "b")),
    ([1, 2, 3], ("1", "2", "3")),  # YAML reads `[1, 2, 3]` as ints
]


@pytest.mark.parametrize("given, expected", NORMALIZE)
def test_normalize_output_type(given, expected):
    assert normalize_output_type(given) == expected


@pytest.mark.parametrize("given", ["yaml", "text", [], ["ok", ""], [True, False], set, object(), 3])
def test_normalize_output_type_rejects(given):
    with pytest.raises(OutputParseError):
        normalize_output_type(given)


def test_bool_labels_get_a_yaml_hint():
    with pytest.raises(OutputParseError, match="quote them"):
        normalize_output_type([True, False])  # what YAML makes of `[yes, no]`


# --- parse_output: a table ----------------------------------------------------------------------------

LABELS = ("positive", "negative", "neutral")
PARSE = [
    # (reply, output_type, expected)
    ("hello", None, "hello"),
    ("  spaced  ", None, "  spaced  "),  # str is returned untouched
    # bool
    ("Yes.", bool, True),
    ("yes", bool, True),
    ("TRUE", bool, True),
    ("no", bool, False),
    ("No, it is not.", bool, False),
    ("false", bool, False),
    ("1", bool, True),
    ("0", bool, False),
    ("**Yes**", bool, True),
    ("The answer is yes.", bool, True),
    ("I would say no.", bool, False),
    # int / float
    ("42", int, 42),
    ("The answer is 42.", int, 42),
    ("-7 degrees", int, -7),
    ("42.0", int, 42),
    ("1,000,000 people", int, 1_000_000),
    ("I am gpt-4", int, 4),  # a dash glued to a word is not a minus sign
    ("3.14", float, 3.14),
    ("about 3,5 kg", float, 3.5),  # decimal comma
    ("Pi is roughly .5e1", float, 5.0),
    ("2.5e-3", float, 0.0025),
    ("The total is 1,234.5 EUR", float, 1234.5),
    ("7", float, 7.0),
    # labels: case, punctuation, quotes, surrounding text
    ("positive", LABELS, "positive"),
    ("Negative", LABELS, "negative"),
    ("NEUTRAL.", LABELS, "neutral"),
    ('"positive"', LABELS, "positive"),
    ("The sentiment is negative.", LABELS, "negative"),
    ("Very Positive", ("positive", "very positive"), "very positive"),
    ("It is very positive!", ("positive", "very positive"), "very positive"),
    ("spam", ("Spam", "Ham"), "Spam"),  # returned as spelled in the labels
    # dict / JSON
    ('{"a": 1}', dict, {"a": 1}),
    ('```json\n{"a": 1}\n```', dict, {"a": 1}),
    ('```\n{"a": [1, 2]}\n```', dict, {"a": [1, 2]}),
    ('Sure! Here it is:\n```json\n{"a": 1}\n```\nAnything else?', dict, {"a": 1}),
    ('{"a": 1} I hope this helps.', dict, {"a": 1}),
    ('Here: {"a": {"b": "}"}} -- done', dict, {"a": {"b": "}"}}),
    ('See [1]. {"a": 1}', dict, {"a": 1}),  # an object is preferred over an earlier array
    ('```json\n{"a": 1}', dict, {"a": 1}),  # unclosed fence
    # list
    ("[1, 2, 3]", list, [1, 2, 3]),
    ('```json\n["x", "y"]\n```', list, ["x", "y"]),
    ('{"items": ["x", "y"]}', list, ["x", "y"]),  # JSON mode forces an object: unwrapped
    ('Answer: {"a": 1} and ["x"]', list, ["x"]),  # an array is preferred over an earlier object
    # pydantic
    ('{"facts": ["a", "b"]}', Facts, Facts(facts=["a", "b"])),
    (
        '```json\n{"id": 7, "items": [{"name": "pen", "tags": ["blue"]}]}\n```',
        Order,
        Order(id=7, items=[Item(name="pen", tags=["blue"])]),
    ),
]


@pytest.mark.parametrize("reply, output_type, expected", PARSE)
def test_parse_output(reply, output_type, expected):
    value = parse_output(reply, normalize_output_type(output_type))
    assert value == expected
    assert type(value) is type(expected)


PARSE_ERRORS = [
    ("maybe", bool),
    ("maybe yes, maybe no", bool),
    ("", bool),
    ("no number here", int),
    ("3.5", int),
    ("", float),
    ("mixed", LABELS),
    ("positive or negative", LABELS),
    ("", LABELS),
    ("not json at all", dict),
    ('{"a": 1,}', dict),  # invalid JSON
    ("[1, 2]", dict),  # an array is not an object
    ('{"a": 1, "b": 2}', list),  # an object of two keys is not a list
    ("{'facts': ['single quotes']}", Facts),
    ('{"facts": "not a list"}', Facts),
    ('{"id": "x", "items": []}', Order),
    ('{"id": 1, "items": [{"name": "pen"}]}', Order),  # nested item lacks tags
]


@pytest.mark.parametrize("reply, output_type", PARSE_ERRORS)
def test_parse_output_errors_carry_the_raw_reply(reply, output_type):
    with pytest.raises(OutputParseError) as info:
        parse_output(reply, normalize_output_type(output_type))
    assert info.value.raw == reply
    assert info.value.output_type is not None


# --- extract_json ----------------------------------------------------------------------------------------

EXTRACT = [
    ('{"a": 1}', None, {"a": 1}),
    ("[1]", None, [1]),
    ('text ```json\n{"a": 1}\n``` text {"b": 2}', None, {"a": 1}),  # a fence wins
    ('```\nnot json\n```\n{"b": 2}', None, {"b": 2}),  # a fence without JSON is skipped
    ('{broken {"ok": true}', None, {"ok": True}),
    ('[x] {"a": 1}', None, {"a": 1}),
    ('[1] {"a": 1}', None, [1]),
    ('[1] {"a": 1}', dict, {"a": 1}),
    ('{"a": 1} [2]', list, [2]),
    ('{"a": 1}', list, {"a": 1}),  # nothing fits: the first value
    ('{"k": [1]}', list, {"k": [1]}),  # a one-key object holding a list fits list
    ('{"text": "a ``` b"}', None, {"text": "a ``` b"}),
]


@pytest.mark.parametrize("text, expect, expected", EXTRACT)
def test_extract_json(text, expect, expected):
    assert extract_json(text, expect) == expected


@pytest.mark.parametrize("text", ["", "nothing", "{", "[1, 2", "```json\n{oops}\n```"])
def test_extract_json_errors(text):
    with pytest.raises(OutputParseError) as info:
        extract_json(text)
    assert info.value.raw == text


@pytest.mark.parametrize("text", ["[" * 3000, "[" * 3000 + "]" * 3000, '{"a": ' * 3000 + "1" + "}" * 3000])
def test_extract_json_too_deep_is_an_output_parse_error(text):
    with pytest.raises(OutputParseError, match="nested too deeply") as info:
        extract_json(text)
    assert info.value.raw == text
    with pytest.raises(OutputParseError):
        parse_output(text, list)


@pytest.mark.timeout(60)  # a hang guard: the search used to be quadratic (hours on these)
@pytest.mark.parametrize(
    "text",
    [
        '{"a" ' * 400_000,  # 2.4 MB: an object start everywhere, each broken
        "[1, " * 500_000,  # 2 MB: unbalanced and deep
        "[" + "[1]," * 500_000,  # 2 MB: an unclosed list of lists
    ],
)
@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_extract_json_on_megabytes_of_broken_json_is_bounded(text):
    try:
        value = extract_json(text, expect=dict)
    except OutputParseError as exc:
        assert exc.raw == text
    else:
        assert value == [1]  # the first value, as no object fits


def test_extract_json_still_finds_a_value_after_much_prose():
    text = "See [1] and [the docs](http://x). " * 2000 + '```json\n{"ok": true}\n```'
    assert extract_json(text, expect=dict) == {"ok": True}
    assert extract_json("[note] " * 5000 + '{"ok": true}', expect=dict) == {"ok": True}


# --- response_format_for ------------------------------------------------------------------------------


def test_response_format_for():
    assert response_format_for(dict) == {"type": "json_object"}
    for kind in (None, bool, int, float, list, LABELS):
        assert response_format_for(kind) is None
    assert response_format_for(list, json_grammar=True)["json_schema"]["schema"] == {"type": "array"}
    fmt = response_format_for(Order)
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "Order"
    assert fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert schema["required"] == ["id", "items"] and schema["additionalProperties"] is False
    assert "Item" in schema["$defs"]


def test_response_format_for_a_model_is_built_once_and_returned_as_a_copy(monkeypatch):
    class Ticket(BaseModel):
        title: str

    built = []
    real = Ticket.model_json_schema.__func__
    monkeypatch.setattr(
        Ticket, "model_json_schema", classmethod(lambda cls, *a, **k: built.append(1) or real(cls, *a, **k))
    )
    first = response_format_for(Ticket)
    first["json_schema"]["schema"]["properties"].clear()  # a caller changing its dict changes no later one
    second = response_format_for(Ticket)
    assert second["json_schema"]["schema"]["properties"] == {"title": {"title": "Title", "type": "string"}}
    assert second == response_format_for(Ticket) and len(built) == 1


# --- LLMCall over the loopback server -------------------------------------------------------------------


@pytest.fixture
def wired(server, tmp_path):
    """The openai client pointed at the fake server; a prompt q.system.md / q.user.md in ./prompts."""
    configure(api_type="openai", base_url=server.base_url, max_attempts=1)
    write(tmp_path / "prompts" / "q.system.md", "Answer the question.")
    write(tmp_path / "prompts" / "q.user.md", "{{ question }}")
    return server


WIRE = [
    ('```json\n{"city": "Paris"}\n```', dict, {"city": "Paris"}),
    ('{"city": "Paris"}\n\nLet me know if you need more.', "json", {"city": "Paris"}),
    ("NEGATIVE", LABELS, "negative"),
    ("Yes.", bool, True),
    ("The answer is 42.", int, 42),
    ("It costs 9.99 dollars.", float, 9.99),
    ('["a", "b"]', list, ["a", "b"]),
    (
        '{"id": 3, "items": [{"name": "pen", "tags": ["red", "cheap"]}, {"name": "ink", "tags": []}]}',
        Order,
        Order(id=3, items=[Item(name="pen", tags=["red", "cheap"]), Item(name="ink", tags=[])]),
    ),
    ("plain text", None, "plain text"),
]


@pytest.mark.parametrize("reply, output_type, expected", WIRE)
def test_call_returns_typed_values(wired, reply, output_type, expected):
    wired.enqueue(Reply(reply))
    call = LLMCall("q.system.md", output_type=output_type)
    assert call.call(question="?") == expected
    assert call.model_output["content"] == reply
    assert len(wired.chat_requests()) == 1


def test_invalid_json_raises_with_raw_reply(wired):
    wired.enqueue(Reply('{"city": Paris}'))
    with pytest.raises(OutputParseError) as info:
        LLMCall("q.system.md", output_type=dict).call(question="?")
    assert info.value.raw == '{"city": Paris}'
    assert len(wired.chat_requests()) == 1  # no retry unless asked


def test_response_format_sent_for_dict_and_model(wired):
    wired.enqueue(Reply('{"a": 1}'), Reply('{"facts": ["x"]}'), Reply("[1]"), Reply("yes"))
    LLMCall("q.system.md", output_type=dict).call(question="?")
    LLMCall("q.system.md", output_type=Facts).call(question="?")
    LLMCall("q.system.md", output_type=list).call(question="?")
    LLMCall("q.system.md", output_type=bool).call(question="?")
    first, second, third, fourth = [r.json for r in wired.chat_requests()]
    assert first["response_format"] == {"type": "json_object"}
    fmt = second["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "Facts"
    assert fmt["json_schema"]["schema"]["properties"]["facts"]["type"] == "array"
    assert "response_format" not in third  # JSON mode would force an object: list asks for nothing
    assert "response_format" not in fourth


def test_explicit_response_format_is_kept(wired):
    wired.enqueue(Reply('{"a": 1}'))
    LLMCall("q.system.md", output_type=dict, response_format={"type": "text"}).call(question="?")
    assert wired.chat_requests()[0].json["response_format"] == {"type": "text"}


def test_output_retries_feed_the_error_back(wired):
    wired.enqueue(Reply("I think it is about forty"), Reply("42"))
    call = LLMCall("q.system.md", output_type=int, output_retries=1)
    assert call.call(question="6*7?") == 42
    first, second = wired.chat_requests()
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user"]
    assert second.messages[2]["content"] == "I think it is about forty"
    feedback = second.messages[3]["content"]
    assert "no number in the reply" in feedback and "forty" in feedback
    assert call.messages == first.messages  # the rendered prompt, not the retry conversation


def test_output_retries_exhausted_raises_last_error(wired):
    wired.enqueue(Reply("nope"), Reply("still nope"))
    with pytest.raises(OutputParseError) as info:
        LLMCall("q.system.md", output_type=int, output_retries=1).call(question="?")
    assert info.value.raw == "still nope"
    assert len(wired.chat_requests()) == 2


def test_output_retries_async(wired):
    wired.enqueue(Reply("{bad"), Reply('{"facts": ["ok"]}'))
    call = LLMCall("q.system.md", output_type=Facts, output_retries=2)
    assert asyncio.run(call.acall(question="?")) == Facts(facts=["ok"])
    second = wired.chat_requests()[1]
    assert second.messages[-1]["role"] == "user" and "no JSON found" in second.messages[-1]["content"]
    assert second.json["response_format"]["json_schema"]["name"] == "Facts"


def test_front_matter_output_type_and_retries(wired, tmp_path):
    write(tmp_path / "prompts" / "n.system.md", "---\noutput_type: int\noutput_retries: 1\n---\nGive a number.")
    write(tmp_path / "prompts" / "l.system.md", "---\noutput_type: [Spam, Ham]\n---\nLabel it.")
    write(tmp_path / "prompts" / "j.system.md", "---\noutput_type: json\n---\nJSON please.")
    wired.enqueue(Reply("none"), Reply("Seven: 7"), Reply("ham"), Reply('```json\n{"k": 1}\n```'))
    assert LLMCall("n.system.md").call() == 7
    assert LLMCall("l.system.md").call() == "Ham"
    assert LLMCall("j.system.md").call() == {"k": 1}
    assert wired.chat_requests()[3].json["response_format"] == {"type": "json_object"}
    # code wins over the front matter
    wired.enqueue(Reply("7"))
    assert LLMCall("n.system.md", output_type=str).call() == "7"


def test_unknown_output_type_fails_at_construction(wired):
    with pytest.raises(OutputParseError):
        LLMCall("q.system.md", output_type="yaml")
    assert wired.requests == []


# --- refusals and tool calls ------------------------------------------------------------------------------


def test_refusal_is_a_response_error(wired):
    wired.enqueue(Message({"content": None, "refusal": "I can't help with that."}))
    call = LLMCall("q.system.md")
    with pytest.raises(ResponseError, match="refused") as info:
        call.call(question="?")
    assert info.value.raw["refusal"] == "I can't help with that."
    assert call.model_output["refusal"] == "I can't help with that."


def test_refusal_is_not_retried_as_a_parse_error(wired):
    wired.enqueue(Message({"content": None, "refusal": "No."}))
    with pytest.raises(ResponseError):
        LLMCall("q.system.md", output_type=dict, output_retries=3).call(question="?")
    assert len(wired.chat_requests()) == 1


TOOL_CALLS = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]


def test_send_message_keeps_tool_calls_and_refusal(wired):
    wired.enqueue(
        Message({"content": None, "tool_calls": TOOL_CALLS}), Message({"content": None, "refusal": "Not allowed."})
    )
    message = get_client().send_message([{"role": "user", "content": "hi"}])
    assert message["role"] == "assistant" and message["content"] is None
    assert message["tool_calls"] == TOOL_CALLS
    message = get_client().send_message([{"role": "user", "content": "hi"}])
    assert message["refusal"] == "Not allowed."


def test_tool_calls_only_reply_is_a_response_error_from_llmcall(wired):
    wired.enqueue(Message({"content": None, "tool_calls": TOOL_CALLS}))
    with pytest.raises(ResponseError, match="no text content"):
        LLMCall("q.system.md").call(question="?")


# --- the simple types as TinyTroupe's LLMChat coerces them (its unit tests, string inputs) --------------
# tests/unit/test_llm_chat.py of microsoft/TinyTroupe: _coerce_to_bool/_integer/_float/_enumerable.

COLORS = ("red", "blue", "green")
TINYTROUPE = [
    ("True", bool, True),
    ("true", bool, True),
    ("TRUE", bool, True),
    ("Yes", bool, True),
    ("yes", bool, True),
    ("Positive", bool, True),
    ("positive", bool, True),
    ("False", bool, False),
    ("false", bool, False),
    ("FALSE", bool, False),
    ("No", bool, False),
    ("no", bool, False),
    ("Negative", bool, False),
    ("negative", bool, False),
    ("Yes, that is correct", bool, True),
    ("No, that is wrong", bool, False),
    ("The sentiment is positive.", bool, True),
    ("42", int, 42),
    ("-17", int, -17),
    ("0", int, 0),
    ("  123  ", int, 123),
    ("The answer is 42", int, 42),
    ("3.14", float, 3.14),
    ("42", float, 42.0),
    ("-17.5", float, -17.5),
    ("0.0", float, 0.0),
    ("  2.5  ", float, 2.5),
    ("The value is 3.14", float, 3.14),
    ("red", COLORS, "red"),
    ("RED", COLORS, "red"),
    ("Blue", COLORS, "blue"),
    ("I choose green", COLORS, "green"),
]
TINYTROUPE_ERRORS = [
    ("maybe", bool),
    ("123", bool),
    ("", bool),
    ("not a number", int),
    ("3.14", int),
    ("", int),
    ("not a number", float),
    ("", float),
    ("yellow", COLORS),
    ("", COLORS),
    ("not json", dict),
    ("42", dict),
    ("not json", list),
    ('{"key": "value"}', list),
]


@pytest.mark.parametrize("reply, output_type, expected", TINYTROUPE)
def test_simple_types_coerce_as_tinytroupe_does(reply, output_type, expected):
    value = parse_output(reply, normalize_output_type(output_type))
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("reply, output_type", TINYTROUPE_ERRORS)
def test_simple_types_refuse_what_tinytroupe_refuses(reply, output_type):
    with pytest.raises(OutputParseError) as info:
        parse_output(reply, normalize_output_type(output_type))
    assert info.value.raw == reply
