"""n choices, logprobs, typed finish reasons (length, content_filter, refusals) and the record-like output
types (dataclasses, pydantic dataclasses, TypedDict), over the loopback server: what tinyllm makes of
the replies, and what the server received."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import pickle
import sys
import typing
from typing import Literal

import pydantic
import pytest
from fakeserver import Choices, Message, Reply, Stream
from helpers import write
from typing_extensions import TypedDict

from tinyllm import (
    ContentFilterFinishReasonError,
    LengthFinishReasonError,
    LLMCall,
    LLMChat,
    OpenAIClient,
    OutputParseError,
    RefusalError,
    ResponseError,
    configure,
)
from tinyllm.cache import MemoryCache
from tinyllm.output import normalize_output_type, parse_output, response_format_for


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


@dataclasses.dataclass
class Point:
    x: int
    y: int = 0


@pydantic.dataclasses.dataclass
class City:
    name: str
    population: int


class Movie(TypedDict):
    title: str
    year: int


@pytest.fixture
def wired(server, tmp_path):
    configure(api_type="openai", base_url=server.base_url, max_attempts=2, waiting_time=0, model="gpt-4o-mini")
    write(tmp_path / "prompts" / "q.system.md", "Answer the question.")
    write(tmp_path / "prompts" / "q.user.md", "{{ question }}")
    return server


# --- n choices -----------------------------------------------------------------------------------------------


def test_n_returns_every_choice(wired):
    wired.enqueue(Choices(Reply("7"), Reply("8", finish_reason="length"), Reply("9")))
    r = LLMCall("q", n=3).respond(question="?")
    assert wired.chat_requests()[0].json["n"] == 3
    assert r.value == ["7", "8", "9"] and r.text == "7"
    assert [(c.index, c.text, c.finish_reason, c.value) for c in r.choices] == [
        (0, "7", "stop", "7"),
        (1, "8", "length", "8"),
        (2, "9", "stop", "9"),
    ]
    assert r.as_dict()["choices"][1]["message"]["content"] == "8"


def test_n_with_a_typed_output_parses_every_choice(wired):
    wired.enqueue(Choices(Reply("7"), Reply("The answer is 8."), Reply("9")))
    assert LLMCall("q", output_type=int, n=3).call(question="?") == [7, 8, 9]


def test_n_given_as_one_still_gives_a_list(wired):
    assert LLMCall("q", n=1).call(question="hi") == ["echo: hi"]
    assert LLMCall("q").call(question="hi") == "echo: hi"


def test_a_choice_that_does_not_fit_asks_again_for_all(wired):
    wired.enqueue(Choices(Reply("7"), Reply("none")), Choices(Reply("1"), Reply("2")))
    r = LLMCall("q", output_type=int, n=2, output_retries=1).respond(question="?")
    assert r.value == [1, 2] and r.output_retries == 1
    wired.enqueue(Choices(Reply("7"), Reply("none")))
    with pytest.raises(OutputParseError):
        LLMCall("q", output_type=int, n=2).call(question="?")


def test_n_choices_are_cached_together(wired, tmp_path):
    cached = OpenAIClient(base_url=wired.base_url, cache=MemoryCache())
    call = LLMCall("q", client=cached, n=2)
    first = call.respond(question="hi")
    again = call.respond(question="hi")
    assert first.value == again.value == ["echo: hi #1", "echo: hi #2"] and again.cached
    assert len(wired.chat_requests()) == 1


def test_streamed_choices_are_kept_apart(wired):
    wired.enqueue(Stream(Choices(Reply("one two three"), Reply("four five"), Reply("six"))))
    r = LLMCall("q", n=3).stream(question="?")
    deltas = list(r)
    assert "".join(deltas) == "one two three"  # the deltas are choice 0's
    assert r.value == ["one two three", "four five", "six"]
    assert [c.index for c in r.choices] == [0, 1, 2]


def test_async_streamed_choices(wired):
    wired.enqueue(Stream(Choices(Reply("a b"), Reply("c d"))))

    async def main():
        r = await LLMCall("q", n=2).astream(question="?")
        return "".join([d async for d in r]), r.value

    assert asyncio.run(main()) == ("a b", ["a b", "c d"])


# --- logprobs -------------------------------------------------------------------------------------------------


def test_logprobs_are_kept(wired):
    r = LLMCall("q", logprobs=True, top_logprobs=2).respond(question="hi there")
    sent = wired.chat_requests()[0].json
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    assert "".join(t["token"] for t in r.logprobs) == r.text == "echo: hi there"
    assert all(t["logprob"] == -0.1 and len(t["top_logprobs"]) == 2 for t in r.logprobs)
    assert r.choices[0].logprobs == r.logprobs
    assert LLMCall("q").respond(question="x").logprobs is None


def test_streamed_logprobs(wired):
    r = LLMCall("q", logprobs=True, top_logprobs=3).stream(question="a b c")
    text = "".join(r)
    assert "".join(t["token"] for t in r.logprobs) == text == "echo: a b c"
    assert [len(t["top_logprobs"]) for t in r.logprobs] == [3] * 4


def test_label_probability(wired):
    wired.enqueue(Reply("happy", logprob=-0.25), Reply("I think: SAD.", logprob=-0.5), Reply("happy"))
    r = LLMCall("q", output_type=Mood, logprobs=True).respond(question="?")
    assert r.value is Mood.HAPPY and r.label_probability == pytest.approx(math.exp(-0.25))
    r = LLMCall("q", output_type=["happy", "sad"], logprobs=True).respond(question="?")
    # tokens "I", " think:", " SAD." : only " SAD." covers the label
    assert r.value == "sad" and r.label_probability == pytest.approx(math.exp(-0.5))
    assert (
        LLMCall("q", output_type=Literal["happy", "sad"]).respond(question="?").label_probability is None
    )  # no logprobs
    assert LLMCall("q", logprobs=True).respond(question="?").label_probability is None  # not a label type


# --- finish reasons and refusals ----------------------------------------------------------------------------


def test_a_typed_reply_cut_at_max_tokens(wired):
    usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    wired.enqueue(Reply('{"name": "Par', finish_reason="length", usage=usage))
    with pytest.raises(LengthFinishReasonError, match="max_tokens") as info:
        LLMCall("q", output_type=City, max_tokens=5, output_retries=2).call(question="?")
    assert not isinstance(info.value, OutputParseError) and isinstance(info.value, ResponseError)
    assert info.value.response.usage["completion_tokens"] == 5 and info.value.response.finish_reason == "length"
    assert info.value.response.text == '{"name": "Par'
    assert len(wired.chat_requests()) == 1  # output retries do not apply
    wired.enqueue(Reply("a cut", finish_reason="length"))
    assert LLMCall("q").call(question="?") == "a cut"  # plain text: the cut text, as before


def test_content_filter_stop(wired):
    wired.enqueue(Reply("partial", finish_reason="content_filter"))
    with pytest.raises(ContentFilterFinishReasonError) as info:
        LLMCall("q").call(question="?")
    assert info.value.response.text == "partial" and info.value.response.usage["total_tokens"] > 0


def test_refusal(wired):
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    wired.enqueue(Message({"content": None, "refusal": "I can't help with that."}, usage=usage))
    with pytest.raises(RefusalError) as info:
        LLMCall("q", output_type=City).call(question="?")
    err = info.value
    assert isinstance(err, ResponseError) and err.refusal == "I can't help with that."
    assert err.response.finish_reason == "stop" and err.response.usage["total_tokens"] == 13
    assert pickle.loads(pickle.dumps(err)).refusal == err.refusal


def test_streamed_refusal_and_length(wired):
    wired.enqueue(Stream(Message({"content": None, "refusal": "No."})))
    r = LLMCall("q").stream(question="?")
    with pytest.raises(RefusalError, match="No."):
        list(r)
    wired.enqueue(Stream(Reply("[1, 2", finish_reason="length")))
    with pytest.raises(LengthFinishReasonError):
        list(LLMCall("q", output_type=list[int]).stream(question="?"))


def test_chat_refusal(wired):
    wired.enqueue(Message({"content": None, "refusal": "No."}))
    with pytest.raises(RefusalError):
        LLMChat(system="Be brief.").say("?")


# --- dataclasses and TypedDict ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Point, City, Movie])
def test_record_types_get_a_strict_schema(kind):
    assert normalize_output_type(kind) is kind
    fmt = response_format_for(kind)
    spec = fmt["json_schema"]
    assert fmt["type"] == "json_schema" and spec["name"] == kind.__name__ and spec["strict"] is True
    assert spec["schema"]["additionalProperties"] is False
    assert spec["schema"]["required"] == list(spec["schema"]["properties"])
    assert response_format_for(kind, json_schema=False) == {"type": "json_object"}


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="pydantic takes typing.TypedDict from Python 3.12")
def test_typing_typeddict_before_312_is_refused_clearly():
    class Old(typing.TypedDict):
        a: int

    with pytest.raises(OutputParseError, match="typing_extensions.TypedDict"):
        LLMCall("q", output_type=Old)


def test_a_pydantic_dataclass_is_asked_for_as_the_sdk_asks():
    from openai.lib._parsing._completions import type_to_response_format_param

    assert response_format_for(City) == type_to_response_format_param(City)


def test_record_types_parse():
    assert parse_output('Here: {"x": 1, "y": 2}', Point) == Point(1, 2)
    assert parse_output('{"name": "Paris", "population": 2100000}', City) == City("Paris", 2100000)
    assert parse_output('{"title": "Alien", "year": 1979}', Movie) == {"title": "Alien", "year": 1979}
    with pytest.raises(OutputParseError):
        parse_output('{"title": "Alien", "year": "late"}', Movie)


def test_record_types_over_the_server(wired):
    wired.enqueue(Reply('{"name": "Oslo", "population": 700000}'), Reply('{"title": "Up", "year": 2009}'))
    assert LLMCall("q", output_type=City).call(question="?") == City("Oslo", 700000)
    assert LLMCall("q", output_type=Movie).call(question="?") == {"title": "Up", "year": 2009}
    sent = [r.json["response_format"]["json_schema"]["name"] for r in wired.chat_requests()]
    assert sent == ["City", "Movie"]


# --- the embedded model ---------------------------------------------------------------------------------------


@pytest.mark.local
def test_n_and_logprobs_on_the_embedded_model(embedded_model):
    if embedded_model is None:
        pytest.skip("the local extra is not installed")
    from tinyllm import BadRequestError, LlamaCppClient

    chat = LLMChat(system="Answer briefly.", client=LlamaCppClient(cache=False), n=2, max_tokens=6, temperature=1.0)
    r = chat.respond("Name a colour.")
    assert (
        isinstance(r.value, list) and len(r.value) == 2 == len(r.choices) and all(isinstance(v, str) for v in r.value)
    )
    assert r.usage["completion_tokens"] <= 12
    with pytest.raises(BadRequestError, match="no logprobs"):
        LLMChat(system="x", client=LlamaCppClient(cache=False), logprobs=True).say("hi")


def test_streamed_content_filter(wired):
    wired.enqueue(Stream(Reply("so far", finish_reason="content_filter")))
    r = LLMCall("q").stream(question="?")
    with pytest.raises(ContentFilterFinishReasonError):
        list(r)


def test_stored_choices_of_the_wrong_shape_are_ignored(wired):
    class DictCache:
        def __init__(self):
            self.data = {}

        def get(self, key):
            return self.data.get(key)

        def set(self, key, value):
            self.data[key] = value

    cache = DictCache()
    call = LLMCall("q", client=OpenAIClient(base_url=wired.base_url, cache=cache))
    call.respond(question="hi")
    [(key, stored)] = cache.data.items()
    cache.set(key, {**stored, "choices": [{"index": "x"}], "logprobs": "zzz"})
    r = call.respond(question="hi")
    assert r.cached and r.value == "echo: hi" and len(r.choices) == 1 and r.logprobs is None


def test_a_stop_before_any_content(wired):
    # a reasoning model that spent max_completion_tokens on reasoning; Azure's filter with null content
    wired.enqueue(
        Message({"content": None}, finish_reason="length"), Message({"content": None}, finish_reason="content_filter")
    )
    with pytest.raises(LengthFinishReasonError):
        LLMCall("q").call(question="?")
    with pytest.raises(ContentFilterFinishReasonError):
        LLMCall("q").call(question="?")
