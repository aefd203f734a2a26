"""Clients as objects with their own settings, declared capabilities, the registry as an extension point.

Two loopback servers stand for two endpoints with different keys; everything is
checked by what each server received.
"""

from __future__ import annotations

import asyncio
import logging
import traceback

import pytest
from helpers import question_prompts
from fakeserver import FakeOpenAIServer, Reply, Status

import tinyllm
from tinyllm import Capabilities, Client, ConfigError, LLMCall, LLMChat, ServerError
from tinyllm.cache._store import MemoryCache
from tinyllm.clients.azure import AzureClient
from tinyllm.clients.llamacpp import LlamaCppClient
from tinyllm.clients.openai import OpenAIClient

KEY_A = "sk-endpoint-a-000000000001"
KEY_B = "sk-endpoint-b-000000000002"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def two():
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        yield a, b


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(tmp_path, ask="You answer briefly.\n")


def test_two_endpoints_with_their_own_keys_and_settings_in_one_program(two, prompts, sleeps):
    a, b = two
    client_a = OpenAIClient(base_url=a.base_url, api_key=KEY_A, model="model-a", max_attempts=1)
    client_b = OpenAIClient(base_url=b.base_url, api_key=KEY_B, model="model-b", max_attempts=3, waiting_time=0.001)
    a.enqueue(Status(503))
    b.enqueue(Status(503), Reply("from b"))
    with pytest.raises(ServerError):
        LLMCall("ask.system.md", prompts_dir=prompts, client=client_a).call(question="q")
    assert LLMCall("ask.system.md", prompts_dir=prompts, client=client_b).call(question="q") == "from b"
    assert len(a.chat_requests()) == 1 and len(b.chat_requests()) == 2  # each client's own MAX_ATTEMPTS
    assert {r.headers["authorization"] for r in a.chat_requests()} == {f"Bearer {KEY_A}"}
    assert {r.headers["authorization"] for r in b.chat_requests()} == {f"Bearer {KEY_B}"}
    assert a.chat_requests()[0].model == "model-a" and b.chat_requests()[0].model == "model-b"
    assert tinyllm.get_config().max_attempts == 5  # the process-wide defaults are untouched


def test_unset_settings_follow_the_configuration(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY_A)
    mine = OpenAIClient(base_url=server.base_url)
    tinyllm.configure(model="from-configure")
    mine.send_message(MESSAGES)
    tinyllm.configure(model="changed-later")
    mine.send_message(MESSAGES)
    assert [r.model for r in server.chat_requests()] == ["from-configure", "changed-later"]
    assert server.chat_requests()[0].headers["authorization"] == f"Bearer {KEY_A}"


def test_the_retry_count_header_is_the_attempt_number(server, sleeps):
    mine = OpenAIClient(base_url=server.base_url, api_key=KEY_A, max_attempts=3)
    server.enqueue(Status(500), Status(502), Reply("third time"))
    assert mine.send_message(MESSAGES)["content"] == "third time"
    assert [r.headers.get("x-stainless-retry-count") for r in server.chat_requests()] == ["0", "1", "2"]


def test_bad_settings_fail_at_construction():
    with pytest.raises(ConfigError, match="unknown setting"):
        OpenAIClient(timeot=3)
    with pytest.raises(ConfigError, match="TIMEOUT"):
        OpenAIClient(timeout=-1)
    with pytest.raises(ConfigError, match="api_key"):
        OpenAIClient(api_key="")
    with pytest.raises(ConfigError, match="takes no api_key"):
        LlamaCppClient(api_key="sk-nope-0000000000000")
    with pytest.raises(ConfigError, match="not both"):
        LLMCall("x", api_type="openai", client=OpenAIClient())


def test_the_key_never_shows(server, caplog):
    mine = OpenAIClient(base_url="http://user:pw-secret@127.0.0.1:9/v1", api_key=KEY_A, timeout=5)
    assert KEY_A not in repr(mine) and "pw-secret" not in repr(mine)
    assert KEY_A not in repr(mine.settings())
    bad = OpenAIClient(base_url=server.base_url, api_key=KEY_A, max_attempts=1)
    server.enqueue(Status(401, body={"error": {"message": f"Incorrect API key provided: {KEY_A}"}}))
    with caplog.at_level(logging.DEBUG, logger="tinyllm"), pytest.raises(tinyllm.AuthenticationError) as info:
        bad.send_message(MESSAGES)
    assert KEY_A not in str(info.value) and KEY_A not in caplog.text
    assert KEY_A not in "".join(traceback.format_exception(info.value))


def test_each_client_has_its_own_cache(server):
    one, two_ = MemoryCache(), MemoryCache()
    first = OpenAIClient(base_url=server.base_url, api_key=KEY_A, cache=one)
    second = OpenAIClient(base_url=server.base_url, api_key=KEY_A, cache=two_)
    off = OpenAIClient(base_url=server.base_url, api_key=KEY_A, cache=False)
    tinyllm.force_api_cache(True)  # a process-wide switch does not override a client's own cache choice
    for c in (first, first, second, off, off):
        c.send_message(MESSAGES)
    assert len(server.chat_requests()) == 4  # first: 1 sent + 1 hit; second: 1; off: 2
    assert len(one) == 1 and len(two_) == 1


def test_a_cache_path_per_client(server, tmp_path):
    mine = OpenAIClient(base_url=server.base_url, api_key=KEY_A, cache=tmp_path / "mine.pickle")
    mine.send_message(MESSAGES)
    mine.send_message(MESSAGES)
    assert len(server.chat_requests()) == 1 and (tmp_path / "mine.pickle").stat().st_size > 0


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_each_client_has_its_own_concurrency_limit(two):
    a, b = two
    a.latency = b.latency = 0.05
    narrow = OpenAIClient(base_url=a.base_url, api_key=KEY_A, max_concurrent_requests=1)
    wide = OpenAIClient(base_url=b.base_url, api_key=KEY_B, max_concurrent_requests=4)

    async def main():
        await asyncio.gather(*(c.asend_message(MESSAGES) for c in (narrow, wide) for _ in range(8)))

    asyncio.run(main())
    assert a.max_in_flight == 1
    assert 1 < b.max_in_flight <= 4


def test_azure_client_object(server):
    mine = AzureClient(
        endpoint=server.azure_endpoint, api_key=KEY_A, api_version="2024-06-01", deployments={"gpt-4o-mini": "dep-mini"}
    )
    mine.send_message(MESSAGES, model="gpt-4o-mini")
    rec = server.chat_requests()[0]
    assert "/deployments/dep-mini/" in rec.path and rec.query.get("api-version") == "2024-06-01"
    assert rec.headers.get("api-key") == KEY_A


class Scripted:
    """A plain object with send_message only: the documented extension point."""

    def __init__(self):
        self.seen = []

    def send_message(self, messages, **params):
        self.seen.append((messages, params))
        return {"role": "assistant", "content": f"plain saw {messages[-1]['content']}"}


def test_register_client_with_a_plain_object(prompts):
    plain = Scripted()
    tinyllm.register_client("scripted", plain)
    call = LLMCall("ask.system.md", prompts_dir=prompts, api_type="scripted", temperature=0)
    assert call.call(question="one") == "plain saw one"
    assert asyncio.run(call.acall(question="two")) == "plain saw two"
    assert plain.seen[0][1] == {"temperature": 0}  # accept= is not passed to a plain object
    assert LLMChat(system="s", api_type="scripted").say("three") == "plain saw three"
    assert isinstance(tinyllm.get_client("scripted").capabilities, Capabilities)


def test_register_client_rejects_an_object_without_send_message():
    with pytest.raises(ConfigError, match="send_message"):
        tinyllm.register_client("broken", object())


def test_a_plain_object_returning_junk_is_a_response_error(prompts):
    class Junk:
        def send_message(self, messages, **params):
            return None

    with pytest.raises(tinyllm.ResponseError):
        LLMCall("ask.system.md", prompts_dir=prompts, client=Junk()).call(question="q")


class Echo(Client):
    """A Client subclass: implements only the raw request and its endpoint identity."""

    api_type = "echo"
    capabilities = Capabilities(json_schema=False, tools=False, embeddings=False)

    def __init__(self, **settings):
        super().__init__(**settings)
        self.sent = 0

    def endpoint(self, cfg, model):
        return {"api_type": "echo"}

    def _chat(self, messages, params, cfg):
        self.sent += 1
        return {"role": "assistant", "content": messages[-1]["content"].upper()}, {
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "total_tokens": 2,
        }


def test_register_client_with_a_client_subclass_gets_the_pipeline(prompts):
    echo = Echo(cache=MemoryCache(), model="echo-1")
    tinyllm.register_client("echo", echo)
    call = LLMCall("ask.system.md", prompts_dir=prompts, api_type="echo")
    assert call.call(question="hi") == "HI"
    assert call.call(question="hi") == "HI"
    assert echo.sent == 1  # the second answer came from the client's own cache
    assert tinyllm.get_client("echo") is echo
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        text: str

    out = LLMCall("ask.system.md", prompts_dir=prompts, client=echo, output_type=Answer)
    assert out._plan({"question": "q"})[2]["response_format"] == {"type": "json_object"}  # json_schema=False


def test_api_key_and_misspelled_parameters_are_refused_at_construction(prompts):
    with pytest.raises(ConfigError, match="client setting") as info:
        LLMCall("ask.system.md", prompts_dir=prompts, api_key="sk-never-shown-000000000001")
    assert "sk-never-shown" not in str(info.value)
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        LLMCall("ask.system.md", prompts_dir=prompts, temprature=0)
    with pytest.raises(ConfigError, match="did you mean 'max_tokens'"):
        LLMChat(system="s", max_token=5)
    LLMCall("ask.system.md", prompts_dir=prompts, top_k=5)  # a server-specific parameter is still sent as given


def test_capabilities_defaults_claim_nothing():
    assert Capabilities() == Capabilities(
        json_schema=False, json_grammar=False, grammar=False, tools=False, streaming=False, embeddings=False
    )


@pytest.mark.parametrize("cls", [OpenAIClient, tinyllm.OllamaClient, AzureClient, LlamaCppClient])
def test_every_built_in_client_declares_its_capabilities(cls):
    """Each built-in client sets its own declaration (not inherited from a parent, not the claim-nothing default)."""
    assert "capabilities" in vars(cls)
    caps = cls.capabilities
    assert caps.tools and caps.streaming and caps.json_schema


def test_a_plain_object_without_a_declaration_is_refused_tools(prompts):
    def lookup(word: str) -> str:
        """Look a word up."""
        return word

    with pytest.raises(ConfigError, match="tools=False"):
        LLMCall("ask.system.md", prompts_dir=prompts, client=Scripted(), tools=[lookup]).call(question="q")


def test_close_closes_the_connection_pool_and_the_client_stays_usable(server):
    with OpenAIClient(base_url=server.base_url, api_key=KEY_A) as mine:
        mine.send_message(MESSAGES)
        sdk = mine.sdk(mine.settings())
        assert not sdk.is_closed()
        mine.close()
        assert sdk.is_closed()
        assert mine.send_message(MESSAGES)["content"] == "echo: hello"  # a new pool
        again = mine.sdk(mine.settings())
    assert again is not sdk and again.is_closed()  # closed by the with block
    assert len({r.peer for r in server.chat_requests()}) == 2  # two connections: the first one was closed


def test_registry_reset_closes_the_clients_it_built_not_the_registered_ones(server):
    tinyllm.configure(api_type="openai", base_url=server.base_url)
    built = tinyllm.get_client()
    built.send_message(MESSAGES)
    mine = OpenAIClient(base_url=server.base_url, api_key=KEY_A)
    mine.send_message(MESSAGES)
    tinyllm.register_client("mine", mine)
    built_sdk, mine_sdk = built.sdk(built.settings()), mine.sdk(mine.settings())
    tinyllm.clients.default_registry.reset()
    assert built_sdk.is_closed() and not mine_sdk.is_closed()
    mine.close()
