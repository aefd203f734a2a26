"""The OpenAI, Ollama and Azure clients and the registry, checked by what the fake server received.

Templates are written into tmp_path; requests go through the real openai SDK
to ``fakeserver.FakeOpenAIServer``; assertions read the recorded request
(path, query, headers, JSON body) and the value the caller got back.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from fakeserver import Reply, Shuffled, Status, fake_embedding

import tinyllm
import tinyllm.clients.llamacpp as llamacpp_module
from tinyllm import BadRequestError, ConfigError, ServerError
from tinyllm.clients import detect_api_type
from tinyllm.clients.azure import AzureClient
from tinyllm.clients.openai import OllamaClient, OpenAIClient

KEY = "sk-test-key-for-headers-0001"
MESSAGES = [{"role": "user", "content": "hello"}]


pytestmark = pytest.mark.usefixtures("no_server_errors")


@pytest.fixture
def api(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tinyllm.configure(api_type="openai", base_url=server.base_url, waiting_time=0.001)
    return server


@pytest.fixture
def prompts(tmp_path) -> Path:
    d = tmp_path / "myprompts"
    d.mkdir()
    (d / "greet.system.md").write_text(
        "---\ndescription: greet someone\ntemperature: 0.2\nmax_tokens: 50\ntop_k: 5\n---\nYou are {{ persona }}.\n",
        encoding="utf-8",
    )
    (d / "greet.user.md").write_text("Say hi to {{ name }}.\n", encoding="utf-8")
    (d / "plain.system.md").write_text("You answer in {{ language }}.\n", encoding="utf-8")
    (d / "plain.user.md").write_text("{{ question }}\n", encoding="utf-8")
    return d


UNSET_PARAMS = (
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "reasoning_effort",
    "timeout",
    "extra_body",
    "api_key",
)


# --------------------------------------------------------------------------- what is sent


def test_llmcall_sends_rendered_messages_and_merged_params(api, prompts):
    call = tinyllm.LLMCall("greet.system.md", prompts_dir=prompts, temperature=0.9)
    assert call.call(persona="a pirate", name="Bob") == "echo: Say hi to Bob."
    (request,) = api.chat_requests()
    assert request.path == "/v1/chat/completions"
    assert request.messages == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Say hi to Bob."},
    ]
    body = request.json
    assert body["temperature"] == 0.9  # LLMCall beats the front matter's 0.2
    assert body["max_tokens"] == 50  # from the front matter
    assert body["top_k"] == 5  # not an OpenAI parameter: passed through in the JSON body
    assert body["model"] == "gpt-4o-mini"  # the built-in default
    for name in ("top_p", "presence_penalty", "frequency_penalty", "extra_body", "timeout", "description"):
        assert name not in body
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert call.messages == request.messages
    assert call.model_output == {"role": "assistant", "content": "echo: Say hi to Bob."}


def test_config_defaults_are_sent_and_unset_ones_are_not(api, prompts):
    tinyllm.configure(temperature=0.7, model="gpt-4o", presence_penalty=0.5)
    call = tinyllm.LLMCall("plain.system.md", prompts_dir=prompts)
    assert call.call(language="French", question="Why?") == "echo: Why?"
    body = api.chat_requests()[0].json
    assert body["temperature"] == 0.7
    assert body["model"] == "gpt-4o"
    assert body["presence_penalty"] == 0.5
    assert set(body) == {"model", "messages", "temperature", "presence_penalty"}


def test_front_matter_beats_config_and_kwargs_beat_both(api, prompts):
    tinyllm.configure(temperature=0.7, max_tokens=999)
    tinyllm.LLMCall("greet.system.md", prompts_dir=prompts).call(persona="x", name="y")
    tinyllm.LLMCall("greet.system.md", prompts_dir=prompts, max_tokens=7, model="gpt-4o").call(persona="x", name="y")
    first, second = (r.json for r in api.chat_requests())
    assert (first["temperature"], first["max_tokens"], first["model"]) == (0.2, 50, "gpt-4o-mini")
    assert (second["temperature"], second["max_tokens"], second["model"]) == (0.2, 7, "gpt-4o")


def test_bare_send_message_sends_only_model_and_messages(api):
    assert tinyllm.get_client().send_message(MESSAGES)["content"] == "echo: hello"
    body = api.chat_requests()[0].json
    assert body == {"model": "gpt-4o-mini", "messages": MESSAGES}
    for name in UNSET_PARAMS:
        assert name not in body


def test_none_param_means_not_sent(api):
    tinyllm.configure(temperature=0.3)
    tinyllm.get_client().send_message(MESSAGES, temperature=None, top_p=None)
    body = api.chat_requests()[0].json
    assert "temperature" not in body and "top_p" not in body


def test_reasoning_model_params_are_adapted(api):
    tinyllm.configure(temperature=0.3)
    tinyllm.get_client().send_message(MESSAGES, model="o3-mini", max_tokens=100)
    body = api.chat_requests()[0].json
    assert body["model"] == "o3-mini"
    assert body["max_completion_tokens"] == 100
    assert "max_tokens" not in body and "temperature" not in body


def test_extra_body_and_unknown_params_are_merged(api):
    tinyllm.get_client().send_message(MESSAGES, top_k=3, extra_body={"min_p": 0.1}, seed=1)
    body = api.chat_requests()[0].json
    assert body["top_k"] == 3 and body["min_p"] == 0.1 and body["seed"] == 1
    assert "extra_body" not in body


def test_extra_body_wins_over_a_param_of_the_same_name(api):
    tinyllm.get_client().send_message(MESSAGES, temperature=0.1, extra_body={"temperature": 0.9})
    assert api.chat_requests()[0].json["temperature"] == 0.9


def test_extra_headers_and_extra_query_are_sent_but_not_in_the_body(api):
    tinyllm.get_client().send_message(MESSAGES, extra_headers={"X-Trace": "t-1"}, extra_query={"tag": "a b"})
    (request,) = api.chat_requests()
    assert request.headers["x-trace"] == "t-1"
    assert request.query == {"tag": "a b"}
    assert set(request.json) == {"model", "messages"}


def test_json_reply_without_a_json_content_type_is_read(api):
    from fakeserver import Status

    body = '{"choices": [{"index": 0, "message": {"role": "assistant", "content": "plain"}}], "usage": {"total_tokens": 3}}'
    api.enqueue(Status(200, body=body, headers={"Content-Type": "text/plain"}))
    assert tinyllm.get_client().send_message(MESSAGES)["content"] == "plain"
    assert tinyllm.last_call_info().usage == {"total_tokens": 3}


@pytest.mark.parametrize(
    "body", ["<html>gateway</html>", "[1, 2]", '{"choices": "none"}', '{"choices": [{"message": 3}]}']
)
def test_reply_that_is_not_a_chat_completion_is_a_response_error(api, sleeps, body):
    from fakeserver import Status

    api.enqueue(*[Status(200, body=body, headers={"Content-Type": "text/plain"})] * 2)
    with pytest.raises(tinyllm.ResponseError):
        tinyllm.get_client().send_message(MESSAGES)
    assert len(api.chat_requests()) == 2  # an unusable reply is asked for once more, then given up


ODD_REPLIES = [
    ({"content": 42}, "content is int"),
    ({"content": ["a", "list"]}, "content is list"),
    ({"content": "ok", "role": 7}, "role is int"),
    ({"content": None, "tool_calls": "f()"}, "tool_calls is str"),
    ({"content": None, "tool_calls": ["f()"]}, "tool_calls is list"),
    ({"content": "no", "refusal": {"why": 1}}, "refusal is dict"),
]


@pytest.mark.parametrize("message, says", ODD_REPLIES)
def test_a_message_of_the_wrong_shape_is_a_response_error(api, sleeps, message, says):
    from fakeserver import Message

    api.enqueue(Message(message), Message(message))
    with pytest.raises(tinyllm.ResponseError, match=says):
        tinyllm.get_client().send_message(MESSAGES)
    assert len(api.chat_requests()) == 2  # asked for once more, like any unusable reply


@pytest.mark.parametrize(
    "usage, says",
    [
        ({"prompt_tokens": "abc"}, "usage.prompt_tokens"),
        ({"completion_tokens": -3}, "usage.completion_tokens"),
        ({"total_tokens": 2.5}, "usage.total_tokens"),
        ({"total_tokens": True}, "usage.total_tokens"),
        ("lots", "usage is str"),
    ],
)
def test_usage_of_the_wrong_shape_is_a_response_error(api, sleeps, usage, says):
    api.enqueue(Reply("fine", usage=usage), Reply("fine", usage=usage))
    with pytest.raises(tinyllm.ResponseError, match=says):
        tinyllm.get_client().send_message(MESSAGES)


def test_whole_number_usage_sent_as_floats_is_read_as_int(api):
    api.enqueue(Reply("fine", usage={"prompt_tokens": 3.0, "completion_tokens": 1, "total_tokens": 4.0}))
    assert tinyllm.get_client().send_message(MESSAGES)["content"] == "fine"
    assert tinyllm.last_call_info().usage == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert tinyllm.usage_stats()["total_tokens"] == 4


def test_odd_reply_to_a_typed_llmcall_is_a_response_error(api, sleeps, prompts):
    from fakeserver import Message

    api.enqueue(Message({"content": 42}), Message({"content": 42}))
    with pytest.raises(tinyllm.ResponseError, match="content is int"):
        tinyllm.LLMCall("plain.system.md", prompts_dir=prompts, output_type=bool).call(language="en", question="?")


def test_a_reply_body_nested_too_deeply_is_a_response_error(api, sleeps):
    body = "[" * 3000 + "]" * 3000
    for content_type in ("application/json", "text/plain"):
        api.enqueue(*[Status(200, body=body, headers={"Content-Type": content_type})] * 2)
        with pytest.raises(tinyllm.ResponseError):
            tinyllm.get_client().send_message(MESSAGES)


def test_odd_replies_from_the_command_are_one_error_line(api, prompts):
    from click.testing import CliRunner

    from tinyllm.cli import cli

    api.enqueue(*[Reply("fine", usage={"prompt_tokens": "abc"})] * 2)
    result = CliRunner().invoke(
        cli,
        ["call", "plain", "--prompts-dir", str(prompts), "--var", "language=en", "--var", "question=?"],
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ResponseError") and "Traceback" not in result.stderr


def test_a_generator_param_is_sent_as_a_list(api):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    tinyllm.get_client().send_message(MESSAGES, tools=(t for t in [tool]), stop=iter(["\n"]))
    body = api.chat_requests()[0].json
    assert body["tools"] == [tool] and body["stop"] == ["\n"]


def test_a_pydantic_class_as_response_format_is_a_bad_request_never_sent(api):
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        text: str

    with pytest.raises(BadRequestError, match="output_type"):
        tinyllm.get_client().send_message(MESSAGES, response_format=Answer)
    assert api.chat_requests() == []


@pytest.mark.parametrize("timeout", [0, -1])
def test_per_call_timeout_must_be_positive(api, timeout):
    with pytest.raises(BadRequestError, match="timeout"):
        tinyllm.get_client().send_message(MESSAGES, timeout=timeout)
    assert api.chat_requests() == []


def test_reply_keeps_tool_calls_and_refusal(api):
    from fakeserver import Message

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    api.enqueue(Message({"content": None, "tool_calls": [call]}))
    reply = tinyllm.get_client().send_message(MESSAGES)
    assert reply["content"] is None and reply["tool_calls"][0]["function"]["name"] == "f"


def test_last_call_info_records_usage(api):
    api.enqueue(Reply("x", usage={"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}))
    tinyllm.get_client().send_message(MESSAGES, model="gpt-4o")
    info = tinyllm.last_call_info()
    assert info.model == "gpt-4o" and info.usage["total_tokens"] == 13 and info.cached is False
    assert info.prompt_tokens > 0


# --------------------------------------------------------------------------- api types, keys, detection


def test_ollama_uses_base_url_override(server):
    tinyllm.configure(api_type="ollama", base_url=server.base_url)
    client = tinyllm.get_client()
    assert isinstance(client, OllamaClient)
    assert client.send_message(MESSAGES)["content"] == "echo: hello"
    (request,) = server.chat_requests()
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer no-key"  # local servers take any key


def test_ollama_default_address():
    tinyllm.configure(api_type="ollama")
    assert tinyllm.get_client().where(tinyllm.get_config()) == "http://localhost:11434/v1"


def test_openai_base_url_from_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert tinyllm.get_client().send_message(MESSAGES)["content"] == "echo: hello"  # auto-detected as openai
    assert isinstance(tinyllm.get_client(), OpenAIClient)
    assert server.chat_requests()[0].headers["authorization"] == f"Bearer {KEY}"


def test_missing_key_without_base_url_is_a_config_error():
    tinyllm.configure(api_type="openai")
    with pytest.raises(ConfigError) as info:
        tinyllm.get_client().send_message(MESSAGES)
    assert "OPENAI_API_KEY" in str(info.value)
    assert "BASE_URL" in str(info.value)


def test_missing_key_is_not_retried(sleeps):
    tinyllm.configure(api_type="openai")
    with pytest.raises(ConfigError):
        tinyllm.get_client().send_message(MESSAGES)
    assert sleeps == []
    assert tinyllm.usage_stats()["retries"] == 0


def test_unknown_api_type_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        tinyllm.get_client("nosuchapi")
    assert "nosuchapi" in str(info.value) and "openai" in str(info.value)
    tinyllm.configure(api_type="alsonot")
    with pytest.raises(ConfigError) as info:
        tinyllm.get_client()
    assert "alsonot" in str(info.value)
    with pytest.raises(ConfigError):
        tinyllm.force_api_type("nosuchapi")


def test_auto_detection_order(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp_module, "local_available", lambda: True)
    assert detect_api_type(tinyllm.get_config()) == "llamacpp"
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert detect_api_type(tinyllm.get_config()) == "openai"
    assert isinstance(tinyllm.get_client(), OpenAIClient) and not isinstance(tinyllm.get_client(), AzureClient)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example.openai.azure.com")
    assert detect_api_type(tinyllm.get_config()) == "azure"
    assert isinstance(tinyllm.get_client(), AzureClient)
    tinyllm.configure(api_type="openai")  # an explicit API_TYPE beats detection
    assert type(tinyllm.get_client()) is OpenAIClient
    assert isinstance(tinyllm.get_client("azure"), AzureClient)  # the api_type asked for beats API_TYPE


def test_auto_detection_base_url_alone_means_openai(monkeypatch):
    monkeypatch.setattr(llamacpp_module, "local_available", lambda: True)
    tinyllm.configure(base_url="http://127.0.0.1:9/v1")
    assert detect_api_type(tinyllm.get_config()) == "openai"


def test_auto_detection_with_nothing_configured(monkeypatch):
    monkeypatch.setattr(llamacpp_module, "local_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        tinyllm.get_client()
    text = str(info.value)
    for hint in ("OPENAI_API_KEY", "BASE_URL", "AZURE_OPENAI_ENDPOINT", "tinyllm[local]"):
        assert hint in text


# --------------------------------------------------------------------------- Azure


@pytest.fixture
def azure(server, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.azure_endpoint)
    monkeypatch.setenv("AZURE_OPENAI_KEY", "azure-secret-key-0002")
    tinyllm.configure(api_type="azure", azure_deployments="gpt-4o=my-deploy", model="gpt-4o", waiting_time=0.001)
    return server


def test_azure_request_goes_to_the_deployment(azure):
    tinyllm.configure(azure_api_version="2024-06-01")
    assert tinyllm.get_client().send_message(MESSAGES, temperature=0)["content"] == "echo: hello"
    (request,) = azure.chat_requests()
    assert request.path == "/openai/deployments/my-deploy/chat/completions"
    assert request.deployment == "my-deploy"
    assert request.query["api-version"] == "2024-06-01"
    assert request.headers["api-key"] == "azure-secret-key-0002"
    assert request.messages == MESSAGES
    assert request.json["temperature"] == 0


def test_azure_extra_body_cannot_move_the_request_to_another_deployment(azure):
    tinyllm.get_client().send_message(MESSAGES, extra_body={"model": "other", "top_k": 2})
    (request,) = azure.chat_requests()
    assert request.deployment == "my-deploy" and request.json["top_k"] == 2


def test_azure_api_version_from_environment_and_default(azure, monkeypatch):
    tinyllm.get_client().send_message(MESSAGES)
    assert azure.chat_requests()[-1].query["api-version"] == tinyllm.get_config().azure_api_version
    monkeypatch.setenv("AZURE_OPENAI_VERSION", "2025-01-01-preview")
    tinyllm.get_client().send_message(MESSAGES)
    assert azure.chat_requests()[-1].query["api-version"] == "2025-01-01-preview"


def test_azure_deployment_fallbacks(azure, monkeypatch):
    tinyllm.get_client().send_message(MESSAGES, model="gpt-4o-mini")  # not in the map: the model name itself
    assert azure.chat_requests()[-1].deployment == "gpt-4o-mini"
    monkeypatch.setenv("AZURE_OPENAI_DEPLOYMENT", "default-deploy")
    tinyllm.get_client().send_message(MESSAGES, model="gpt-4o-mini")
    assert azure.chat_requests()[-1].deployment == "default-deploy"
    tinyllm.get_client().send_message(MESSAGES)  # gpt-4o: the map wins
    assert azure.chat_requests()[-1].deployment == "my-deploy"


def test_azure_api_key_alias(azure, monkeypatch):
    monkeypatch.delenv("AZURE_OPENAI_KEY")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-alias-key-0003")
    tinyllm.get_client().send_message(MESSAGES)
    assert azure.chat_requests()[0].headers["api-key"] == "azure-alias-key-0003"


def test_azure_retries_and_errors(azure, sleeps):
    azure.enqueue(Status(503), Reply("azure ok"))
    assert tinyllm.get_client().send_message(MESSAGES)["content"] == "azure ok"
    assert len(azure.chat_requests()) == 2
    azure.enqueue(Status(400))
    with pytest.raises(BadRequestError) as info:
        tinyllm.get_client().send_message(MESSAGES, temperature=1)
    assert len(azure.chat_requests()) == 3
    assert info.value.request_id == "req_3"


def test_azure_missing_endpoint(monkeypatch, sleeps):
    monkeypatch.setenv("AZURE_OPENAI_KEY", "azure-secret-key-0002")
    tinyllm.configure(api_type="azure")
    with pytest.raises(ConfigError) as info:
        tinyllm.get_client().send_message(MESSAGES)
    assert "AZURE_OPENAI_ENDPOINT" in str(info.value)
    assert sleeps == []


def test_azure_missing_endpoint_with_cache_on(monkeypatch, tmp_path):
    monkeypatch.setenv("AZURE_OPENAI_KEY", "azure-secret-key-0002")
    tinyllm.configure(api_type="azure", cache_api_calls=True, cache_file_name=str(tmp_path / "c.pickle"))
    with pytest.raises(ConfigError) as info:
        tinyllm.get_client().send_message(MESSAGES)
    assert "AZURE_OPENAI_ENDPOINT" in str(info.value)


def test_azure_no_key_and_no_azure_identity(server, monkeypatch, sleeps):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.azure_endpoint)
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # importing it now raises ImportError
    tinyllm.configure(api_type="azure")
    with pytest.raises(ConfigError) as info:
        tinyllm.get_client().send_message(MESSAGES)
    assert "azure-identity" in str(info.value)
    assert "AZURE_OPENAI_KEY" in str(info.value)
    assert server.requests == []
    assert sleeps == []


def test_azure_embeddings_use_the_embeddings_deployment(azure, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_EMBEDDINGS_DEPLOYMENT", "emb-deploy")
    vectors = tinyllm.get_client().get_embeddings(["one", "two"])
    assert vectors == [fake_embedding("one"), fake_embedding("two")]
    (request,) = azure.embedding_requests()
    assert request.deployment == "emb-deploy"
    assert request.path == "/openai/deployments/emb-deploy/embeddings"
    assert request.headers["api-key"] == "azure-secret-key-0002"
    assert "api-version" in request.query


# --------------------------------------------------------------------------- embeddings


def test_embeddings_in_input_order_when_server_shuffles(api):
    api.enqueue(Shuffled(), path_contains="embeddings")
    texts = ["a", "b", "c", "d"]
    assert tinyllm.get_client().get_embeddings(texts) == [fake_embedding(t) for t in texts]
    (request,) = api.embedding_requests()
    assert isinstance(request.item, Shuffled)
    assert request.json["input"] == texts
    assert request.json["model"] == "text-embedding-3-small"
    assert request.headers["authorization"] == f"Bearer {KEY}"


def test_embeddings_retry_path(api, sleeps):
    api.enqueue(Status(503), Shuffled(), path_contains="embeddings")
    texts = ["a", "b", "c"]
    assert tinyllm.get_client().get_embeddings(texts) == [fake_embedding(t) for t in texts]
    assert len(api.embedding_requests()) == 2
    assert len(sleeps) == 1
    assert tinyllm.usage_stats()["retries"] == 1


def test_embeddings_bad_request_not_retried(api, sleeps):
    api.enqueue(Status(400), path_contains="embeddings")
    with pytest.raises(BadRequestError) as info:
        tinyllm.get_client().get_embeddings(["a"])
    assert len(api.embedding_requests()) == 1
    assert info.value.request_id == "req_1"


def test_embeddings_give_up_after_max_attempts(api, sleeps):
    tinyllm.configure(max_attempts=2)
    api.enqueue(Status(500), Status(500), path_contains="embeddings")
    with pytest.raises(ServerError):
        tinyllm.get_client().get_embeddings(["a"])
    assert len(api.embedding_requests()) == 2


def test_embeddings_are_cached(api, tmp_path):
    tinyllm.configure(cache_api_calls=True, cache_file_name=str(tmp_path / "c.pickle"))
    texts = ["a", "b", "c"]
    expected = [fake_embedding(t) for t in texts]
    assert tinyllm.get_client().get_embeddings(texts) == expected
    assert tinyllm.get_client().get_embeddings(texts) == expected
    assert len(api.embedding_requests()) == 1
    assert tinyllm.usage_stats()["cached_calls"] == 3
    # only the misses are sent, in one batch, and the result keeps input order
    assert tinyllm.get_client().get_embeddings(["d", "b", "e"]) == [fake_embedding(t) for t in ("d", "b", "e")]
    assert len(api.embedding_requests()) == 2
    assert api.embedding_requests()[-1].json["input"] == ["d", "e"]
    # a different embedding model misses
    tinyllm.get_client().get_embeddings(["a"], model="text-embedding-3-large")
    assert len(api.embedding_requests()) == 3
    assert api.embedding_requests()[-1].json["model"] == "text-embedding-3-large"


def test_module_level_get_embedding(api):
    assert tinyllm.get_embedding("hello") == fake_embedding("hello")
    assert tinyllm.get_embeddings(["x", "y"]) == [fake_embedding("x"), fake_embedding("y")]
    assert [r.json["input"] for r in api.embedding_requests()] == [["hello"], ["x", "y"]]


def test_embeddings_reject_a_bare_string(api):
    with pytest.raises(BadRequestError):
        tinyllm.get_client().get_embeddings("abc")
    assert tinyllm.get_client().get_embeddings([]) == []
    assert api.requests == []


# --------------------------------------------------------------------------- async


def test_llmcall_acall(api, prompts, sleeps):
    api.enqueue(Status(503), Reply("async hi"))
    call = tinyllm.LLMCall("greet.system.md", prompts_dir=prompts, temperature=0.9)
    assert asyncio.run(call.acall(persona="a cat", name="Ann")) == "async hi"
    first, second = api.chat_requests()
    assert first.json == second.json
    assert second.messages == [
        {"role": "system", "content": "You are a cat."},
        {"role": "user", "content": "Say hi to Ann."},
    ]
    assert second.json["temperature"] == 0.9 and second.json["top_k"] == 5
    assert call.model_output["content"] == "async hi"


def test_llmcall_acall_bad_request_once(api, prompts):
    api.enqueue(Status(400))
    call = tinyllm.LLMCall("greet.system.md", prompts_dir=prompts)
    with pytest.raises(BadRequestError):
        asyncio.run(call.acall(persona="a cat", name="Ann"))
    assert len(api.chat_requests()) == 1


def test_async_azure(azure):
    azure.enqueue(Status(502), Reply("azure async"))
    assert asyncio.run(tinyllm.get_client().asend_message(MESSAGES))["content"] == "azure async"
    assert [r.deployment for r in azure.chat_requests()] == ["my-deploy", "my-deploy"]
    assert azure.chat_requests()[0].headers["api-key"] == "azure-secret-key-0002"


# --------------------------------------------------------------------------- regressions


def test_model_none_means_the_default_model(api, prompts):
    assert tinyllm.get_client().send_message(MESSAGES, model=None)["content"] == "echo: hello"
    assert api.chat_requests()[-1].json["model"] == "gpt-4o-mini"
    tinyllm.configure(model="gpt-4o")
    tinyllm.LLMCall("plain.system.md", prompts_dir=prompts, model=None).call(language="en", question="q")
    assert api.chat_requests()[-1].json["model"] == "gpt-4o"


def test_azure_embedding_cache_is_per_embeddings_deployment(azure, monkeypatch, tmp_path):
    tinyllm.configure(cache_api_calls=True, cache_file_name=str(tmp_path / "c.pickle"))
    monkeypatch.setenv("AZURE_OPENAI_DEPLOYMENT", "chat-deploy")
    monkeypatch.setenv("AZURE_OPENAI_EMBEDDINGS_DEPLOYMENT", "emb-small")
    tinyllm.get_client().get_embeddings(["x"])
    tinyllm.get_client().get_embeddings(["x"])
    assert [r.deployment for r in azure.embedding_requests()] == ["emb-small"]
    monkeypatch.setenv("AZURE_OPENAI_EMBEDDINGS_DEPLOYMENT", "emb-large")  # another deployment: another vector space
    tinyllm.get_client().get_embeddings(["x"])
    assert [r.deployment for r in azure.embedding_requests()] == ["emb-small", "emb-large"]


def test_azure_key_never_written_to_cache_file(azure, tmp_path):
    path = tmp_path / "c.pickle"
    tinyllm.configure(cache_api_calls=True, cache_file_name=str(path))
    tinyllm.get_client().send_message(MESSAGES)
    tinyllm.get_client().get_embeddings(["x"])
    assert azure.chat_requests()[0].headers["api-key"] == "azure-secret-key-0002"
    data = path.read_bytes()
    assert b"echo: hello" in data
    assert b"azure-secret-key-0002" not in data
