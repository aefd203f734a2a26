"""The fake OpenAI server, checked with the real openai SDK (max_retries=0)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import openai
import pytest
from helpers import wait_until

from fakeserver import (
    Delay,
    Drop,
    EmptyChoices,
    FakeOpenAIServer,
    Hang,
    Malformed,
    Message,
    Reply,
    Shuffled,
    Status,
    fake_embedding,
)


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    yield c
    c.close()


@pytest.fixture
def azure(server):
    c = openai.AzureOpenAI(azure_endpoint=server.azure_endpoint, api_key="k", api_version="2024-10-21", max_retries=0)
    yield c
    c.close()


def chat(client, content="hello", model="gpt-4o-mini", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


# --------------------------------------------------------------------------- normal answers


def test_addresses(server):
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert server.azure_endpoint == server.url == f"http://127.0.0.1:{server.port}"


def test_chat_reply_and_recording(server, client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there"},
    ]
    resp = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, temperature=0)
    assert resp.headers["x-request-id"] == "req_1"
    completion = resp.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    chars = len("You are terse.") + len("hello there")
    assert completion.usage.prompt_tokens == chars // 4 + 1
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.usage.completion_tokens > 0

    (rec,) = server.requests
    assert server.chat_requests() == [rec]
    assert rec.method == "POST" and rec.path == "/v1/chat/completions" and rec.route == "chat"
    assert rec.json["messages"] == messages == rec.messages
    assert rec.json["model"] == "gpt-4o-mini" == rec.model
    assert rec.json["temperature"] == 0
    assert json.loads(rec.body) == rec.json
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert rec.headers["content-type"].startswith("application/json")
    assert rec.deployment is None
    assert rec.request_id == "req_1"
    assert server.errors == []


def test_keep_alive_reuses_connection(server, client):
    for i in range(3):
        assert chat(client, f"m{i}").choices[0].message.content == f"echo: m{i}"
    peers = {r.peer for r in server.requests}
    assert len(peers) == 1, "the SDK should reuse one kept-alive connection"
    assert [r.request_id for r in server.requests] == ["req_1", "req_2", "req_3"]


def test_reply_with_str_and_callable(server, client):
    server.reply_with("fixed")
    assert chat(client).choices[0].message.content == "fixed"
    server.reply_with(lambda req: req["model"].upper())
    assert chat(client, model="abc").choices[0].message.content == "ABC"
    server.reply_with(None)
    assert chat(client, "x").choices[0].message.content == "echo: x"


def test_reply_and_message_items(server, client):
    tool_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"q": "x"}'},
    }
    server.enqueue(
        Reply("scripted", usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}),
        Reply("cut", finish_reason="length"),
        Message({"content": None, "tool_calls": [tool_call]}),
        Message({"content": None, "refusal": "I can't help with that."}),
    )
    first = chat(client)
    assert first.choices[0].message.content == "scripted"
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (7, 3, 10)
    assert chat(client).choices[0].finish_reason == "length"
    tools = chat(client).choices[0]
    assert tools.finish_reason == "tool_calls"
    assert tools.message.content is None
    assert tools.message.tool_calls[0].function.name == "lookup"
    refusal = chat(client).choices[0].message
    assert refusal.content is None and refusal.refusal == "I can't help with that."
    assert server.pending == 0
    assert chat(client, "back").choices[0].message.content == "echo: back"


def test_models_and_unknown_route(server, client):
    assert "gpt-4o-mini" in [m.id for m in client.models.list()]
    # 404 with an OpenAI-style error; it consumes no scripted item.
    server.enqueue(Reply("kept"))
    with pytest.raises(openai.NotFoundError) as info:
        client.post("/nope", cast_to=object, body={})
    assert info.value.status_code == 404
    assert info.value.body["type"] == "invalid_request_error"  # the SDK unwraps body["error"]
    assert server.pending == 1
    assert chat(client).choices[0].message.content == "kept"


# --------------------------------------------------------------------------- faults


def test_status_429_retry_after(server, client):
    server.enqueue(Status(429, headers={"Retry-After": "2"}))
    with pytest.raises(openai.RateLimitError) as info:
        chat(client)
    err = info.value
    assert err.status_code == 429
    assert err.response.headers["retry-after"] == "2"
    assert err.request_id == "req_1"
    assert err.code == "rate_limit_exceeded"
    # the script is used up: the next request is answered normally
    assert chat(client).choices[0].message.content == "echo: hello"


def test_status_429_retry_after_ms_and_503(server, client):
    server.enqueue(Status(429, headers={"retry-after-ms": "150"}), Status(503))
    with pytest.raises(openai.RateLimitError) as info:
        chat(client)
    assert info.value.response.headers["retry-after-ms"] == "150"
    with pytest.raises(openai.InternalServerError) as info:
        chat(client)
    assert info.value.status_code == 503


def test_status_400_context_length(server, client):
    body = {
        "error": {
            "message": "This model's maximum context length is 128000 tokens.",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
        }
    }
    server.enqueue(Status(400, body=body))
    with pytest.raises(openai.BadRequestError) as info:
        chat(client)
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length" in info.value.message


def test_drop_is_connection_error(server, client):
    # Closing the socket without a response: httpx2 raises RemoteProtocolError
    # ("Server disconnected without sending a response"), which the SDK wraps
    # in openai.APIConnectionError (not APITimeoutError).
    server.enqueue(Drop())
    with pytest.raises(openai.APIConnectionError) as info:
        chat(client)
    assert not isinstance(info.value, openai.APITimeoutError)
    assert len(server.requests) == 1  # recorded even though unanswered
    assert chat(client).choices[0].message.content == "echo: hello"  # a new connection works


def test_hang_is_timeout_and_stop_is_prompt():
    srv = FakeOpenAIServer().start()
    c = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0, timeout=0.3)
    try:
        srv.enqueue(Hang(30))
        t0 = time.monotonic()
        # httpx2 ReadTimeout -> openai.APITimeoutError (a subclass of APIConnectionError)
        with pytest.raises(openai.APITimeoutError):
            chat(c)
        assert time.monotonic() - t0 < 2
        # a second hang still pending while we stop the server
        srv.enqueue(Hang(30))
        errors = []
        th = threading.Thread(target=lambda: _capture(errors, chat, c), daemon=True)
        th.start()
        wait_until(lambda: srv.in_flight >= 1)
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 1.0
        th.join(2)
        assert not th.is_alive()
        assert errors and isinstance(errors[0], openai.APIConnectionError)
    finally:
        c.close()
        srv.stop()


def test_hang_and_delay_ignore_patched_sleep(server, client, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    server.enqueue(Delay(0.2), Delay(0.05, then=Status(500)))
    t0 = time.monotonic()
    assert chat(client).choices[0].message.content == "echo: hello"
    assert time.monotonic() - t0 >= 0.19
    with pytest.raises(openai.InternalServerError):
        chat(client)


def test_malformed_json(server, client):
    # 200 + Content-Type application/json + a body that is not JSON: the SDK
    # calls response.json() unguarded, so json.JSONDecodeError (a ValueError)
    # escapes from create() as-is; it is NOT an openai.OpenAIError.
    # (With a non-JSON Content-Type the SDK would instead return the raw text,
    # or raise APIResponseValidationError when _strict_response_validation=True.)
    server.enqueue(Malformed())
    with pytest.raises(json.JSONDecodeError):
        chat(client)
    server.enqueue(Malformed(body=b"<html>oops</html>"))
    with pytest.raises(ValueError):
        chat(client)


def test_empty_choices(server, client):
    server.enqueue(EmptyChoices())
    completion = chat(client)
    assert completion.choices == []
    assert completion.object == "chat.completion"


def test_misused_item_is_reported(server, client):
    server.enqueue(Shuffled())  # embeddings only
    with pytest.raises(openai.InternalServerError) as info:
        chat(client)
    assert "fakeserver" in info.value.message
    assert len(server.errors) == 1
    server.errors.clear()


# --------------------------------------------------------------------------- azure


def test_azure_route_records_deployment(server, azure):
    completion = chat(azure, "hi azure", model="my-deployment")
    assert completion.choices[0].message.content == "echo: hi azure"
    assert completion.model == "my-deployment"
    (rec,) = server.requests
    assert rec.path == "/openai/deployments/my-deployment/chat/completions"
    assert rec.deployment == "my-deployment"
    assert rec.query["api-version"] == "2024-10-21"
    assert rec.headers["api-key"] == "k"
    assert "authorization" not in rec.headers

    emb = azure.embeddings.create(model="emb-deployment", input="x", encoding_format="float")
    assert emb.data[0].embedding == fake_embedding("x")
    assert server.requests[-1].deployment == "emb-deployment"
    assert server.embedding_requests() == [server.requests[-1]]


# --------------------------------------------------------------------------- embeddings


def test_embeddings_float_and_base64(server, client):
    texts = ["alpha", "beta", "gamma"]
    # The SDK asks for encoding_format="base64" by default and decodes it itself.
    default = client.embeddings.create(model="text-embedding-3-small", input=texts)
    assert server.requests[-1].json.get("encoding_format") == "base64"
    assert [d.embedding for d in default.data] == [fake_embedding(t) for t in texts]
    floats = client.embeddings.create(model="text-embedding-3-small", input=texts, encoding_format="float")
    assert [d.embedding for d in floats.data] == [fake_embedding(t) for t in texts]
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.model == "text-embedding-3-small"
    assert floats.usage.prompt_tokens > 0
    single = client.embeddings.create(model="m", input="alpha", encoding_format="float")
    assert single.data[0].embedding == fake_embedding("alpha")
    assert len(fake_embedding("alpha")) == 8
    dims = client.embeddings.create(model="m", input="alpha", dimensions=20, encoding_format="float")
    assert len(dims.data[0].embedding) == 20


def test_embeddings_shuffled(server, client):
    texts = [f"t{i}" for i in range(6)]
    server.enqueue(Shuffled())
    resp = client.embeddings.create(model="m", input=texts, encoding_format="float")
    indexes = [d.index for d in resp.data]
    assert indexes != sorted(indexes) and sorted(indexes) == list(range(6))
    for d in resp.data:
        assert d.embedding == fake_embedding(texts[d.index])
    by_index = [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
    assert by_index == [fake_embedding(t) for t in texts]


def test_path_contains_filter(server, client):
    server.enqueue(Shuffled(), path_contains="embeddings")
    server.enqueue(Reply("for chat"))
    assert chat(client).choices[0].message.content == "for chat"  # skipped the embeddings-only item
    resp = client.embeddings.create(model="m", input=["a", "b", "c"], encoding_format="float")
    assert [d.index for d in resp.data] != [0, 1, 2]
    assert server.pending == 0


def test_enqueue_rejects_unknown_items(server):
    with pytest.raises(TypeError):
        server.enqueue("not an item")


# --------------------------------------------------------------------------- concurrency


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_max_in_flight_with_latency(server):
    # latency well above the thread start-up skew on a loaded machine, so all overlap
    server.latency = 0.5
    n = 6
    results, errors = [], []
    barrier = threading.Barrier(n)

    def worker(i):
        c = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        try:
            barrier.wait()
            results.append(chat(c, f"w{i}").choices[0].message.content)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    elapsed = time.monotonic() - t0
    assert errors == []
    assert sorted(results) == sorted(f"echo: w{i}" for i in range(n))
    assert server.max_in_flight == n
    assert server.in_flight == 0
    assert elapsed < 0.5 * n  # served concurrently, not one after another

    server.reset()
    assert server.max_in_flight == 0 and server.requests == [] and server.pending == 0
    assert server.latency == 0.5  # settings survive reset()


def test_reset_clears_script_and_records(server, client):
    server.enqueue(Status(500), Status(500))
    with pytest.raises(openai.InternalServerError):
        chat(client)
    server.reset()
    assert server.pending == 0 and server.requests == []
    assert chat(client).choices[0].message.content == "echo: hello"


# --------------------------------------------------------------------------- fixtures


def test_isolate_env_and_cwd(tmp_path):
    assert Path(os.getcwd()) == tmp_path
    found = {k: v for k, v in os.environ.items() if k.startswith(("TINYLLM_", "OPENAI_", "AZURE_OPENAI"))}
    assert found == {"TINYLLM_LOCAL_THREADS": "1"}  # the one the fixture sets: llama.cpp on one thread


def test_server_starts_and_stops_fast():
    timings = []
    for _ in range(3):  # best of three: a loaded CI machine may stall one attempt
        t0 = time.monotonic()
        with FakeOpenAIServer() as srv:
            started = time.monotonic() - t0
            assert srv.port > 0
        timings.append((started, time.monotonic() - t0))
    assert min(t[0] for t in timings) < 0.05
    assert min(t[1] for t in timings) < 0.5


# --------------------------------------------------------------------------- helpers


def _capture(errors, fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        errors.append(exc)
