"""tinyllm.tokens: bundled encodings (offline, exact), message counting, context-window checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tinyllm import tokens
from tinyllm.errors import APIError, ContextWindowExceededError
from tinyllm.tokens import check_context_window, count_tokens, encoding_for_model, get_encoding

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the repo on the path and an empty tiktoken cache."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TIKTOKEN_CACHE_DIR=str(cache))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- encodings ---------------------------------------------------------------


def test_bundled_files_present():
    for name in ("cl100k_base", "o200k_base"):
        assert (tokens.ENCODINGS_DIR / f"{name}.tiktoken").is_file()


@pytest.mark.parametrize(
    "name,ids",
    [("cl100k_base", [15339, 1917]), ("o200k_base", [24912, 2375])],
)
def test_encode_exact(name, ids):
    enc = get_encoding(name)
    assert enc.name == name
    assert enc.encode("hello world") == ids
    assert enc.decode(ids) == "hello world"


def test_cookbook_string_example():
    # Cookbook section 3: "tiktoken is great!" -> [83, 1609, 5963, 374, 2294, 0] in cl100k_base.
    assert get_encoding("cl100k_base").encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_matches_tiktoken_openai_public(monkeypatch, name):
    """Split pattern and special tokens are exactly those of tiktoken_ext/openai_public.py."""
    import tiktoken_ext.openai_public as public

    monkeypatch.setattr(public, "load_tiktoken_bpe", lambda *a, **k: {})  # no download, ranks unused
    expected = public.ENCODING_CONSTRUCTORS[name]()
    enc = get_encoding(name)
    assert enc._pat_str == expected["pat_str"]
    assert enc._special_tokens == expected["special_tokens"]
    for token, rank in expected["special_tokens"].items():
        assert enc.encode(token, allowed_special="all") == [rank]


def test_special_token_ids():
    assert get_encoding("cl100k_base").encode("<|endoftext|>", allowed_special="all") == [100257]
    assert get_encoding("o200k_base").encode("<|endoftext|>", allowed_special="all") == [199999]
    assert get_encoding("cl100k_base").encode("<|endofprompt|>", allowed_special="all") == [100276]
    assert get_encoding("o200k_base").encode("<|endofprompt|>", allowed_special="all") == [200018]


def test_get_encoding_unknown():
    with pytest.raises(ValueError, match="p50k_base"):
        get_encoding("p50k_base")


def test_get_encoding_memoized():
    assert get_encoding("o200k_base") is get_encoding("o200k_base")


def test_get_encoding_loads_once_across_threads(monkeypatch):
    monkeypatch.setattr(tokens, "_loaded", {})
    real = tokens._read_ranks
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokens, "_read_ranks", counting)
    barrier = threading.Barrier(8)
    results = []

    def worker():
        barrier.wait()
        results.append(get_encoding("cl100k_base"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_hash_mismatch_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "enc"
    bad.mkdir()
    data = (tokens.ENCODINGS_DIR / "cl100k_base.tiktoken").read_bytes()
    (bad / "cl100k_base.tiktoken").write_bytes(data.replace(b"IQ== 0", b"IQ== 1", 1))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tokens, "ENCODINGS_DIR", bad)
    monkeypatch.setattr(tokens, "_loaded", {})
    with pytest.raises(ValueError, match="[Hh]ash"):
        get_encoding("cl100k_base")


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_ranks_are_what_tiktoken_loader_reads(monkeypatch, name):
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: "" = read the file, cache nothing
    path = str(tokens.ENCODINGS_DIR / f"{name}.tiktoken")
    assert tokens._read_ranks(name) == load_tiktoken_bpe(path, expected_hash=tokens._HASHES[name])


_COUNT_BOTH = """
    import tinyllm.tokens as t
    assert t.count_tokens("hello world", "gpt-4o") == 2 and t.count_tokens("hello world", "gpt-4") == 2
    print("ok")
"""


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_counts_with_an_unwritable_tiktoken_cache_dir(tmp_path):
    # Tests run as root, where a chmod 0o555 directory is still writable: a cache directory
    # under a regular file makes every attempt to create or write it fail with OSError.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TIKTOKEN_CACHE_DIR=str(blocker / "cache"))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COUNT_BOTH)],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_counting_writes_no_file(tmp_path):
    # Without TIKTOKEN_CACHE_DIR tiktoken's loader caches in $TMPDIR/data-gym-cache.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COUNT_BOTH)],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp.rglob("*")) == []


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_no_network_used(tmp_path):
    result = _run(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network disabled by test")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        import tinyllm.tokens as t
        assert t.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
        assert t.get_encoding("o200k_base").encode("hello world") == [24912, 2375]
        assert t.count_tokens("hello world", "gpt-4o") == 2

        # Control: tiktoken's own get_encoding needs the download host here and is refused,
        # so the guard above really blocks the network.
        import tiktoken
        try:
            tiktoken.get_encoding("cl100k_base")
        except Exception:
            print("control refused")
        else:
            raise SystemExit("tiktoken.get_encoding worked: the network guard is not effective")
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["control", "refused", "ok"]


def test_import_is_lazy(tmp_path):
    result = _run(
        "import tinyllm.tokens, sys; assert 'tiktoken' not in sys.modules, sorted(sys.modules)",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


# --- encoding_for_model ------------------------------------------------------


@pytest.mark.parametrize(
    "model,name",
    [
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("gpt-4o", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("foo-model", "o200k_base"),  # unknown: o200k_base fallback
    ],
)
def test_encoding_for_model(model, name):
    assert encoding_for_model(model).name == name


# --- count_tokens ------------------------------------------------------------

# The cookbook's example (section 6), verified there against the API's usage.prompt_tokens.
EXAMPLE_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


@pytest.mark.parametrize(
    "model,expected",
    [("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_cookbook_messages(model, expected):
    assert count_tokens(EXAMPLE_MESSAGES, model) == expected


def _n(text: str, enc: str = "o200k_base") -> int:
    return len(get_encoding(enc).encode(text))


def test_count_text():
    assert count_tokens("hello world", "gpt-4") == 2
    assert count_tokens("", "gpt-4o") == 0


def test_count_text_with_special_token_text_counts_it_as_ordinary_text():
    n = count_tokens("a <|endoftext|> b", "gpt-4o")
    assert n == len(get_encoding("o200k_base").encode_ordinary("a <|endoftext|> b")) > 3


def test_count_empty_list_is_reply_priming():
    assert count_tokens([], "gpt-4o") == 3


def test_count_name_adds_one():
    msg = {"role": "user", "name": "bob", "content": "hi there"}
    assert count_tokens([msg], "gpt-4o") == 3 + _n("user") + _n("bob") + 1 + _n("hi there") + 3


def test_count_content_parts():
    parts = [
        {"type": "text", "text": "Describe this picture."},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": " Be brief."},
    ]
    # an image by URL is not fetched: it counts as the largest high-detail image (85 + 8 tiles * 170)
    expected = 3 + _n("user") + _n("Describe this picture.") + _n(" Be brief.") + 3 + 85 + 8 * 170
    assert count_tokens([{"role": "user", "content": parts}], "gpt-4o") == expected
    parts[1]["image_url"]["detail"] = "low"
    assert count_tokens([{"role": "user", "content": parts}], "gpt-4o") == expected - 8 * 170
    single = [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    assert count_tokens(single, "gpt-4o") == count_tokens([{"role": "user", "content": "hi there"}], "gpt-4o")


def test_count_tool_calls_as_json():
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    msg = {"role": "assistant", "content": None, "tool_calls": calls}
    as_json = json.dumps(calls, ensure_ascii=False, separators=(",", ":"))
    assert count_tokens([msg], "gpt-4") == 3 + _n("assistant", "cl100k_base") + _n(as_json, "cl100k_base") + 3


def test_count_unknown_model_uses_o200k():
    assert count_tokens(EXAMPLE_MESSAGES, "my-local-model") == count_tokens(EXAMPLE_MESSAGES, "gpt-4o")


@pytest.mark.parametrize(
    "bad", [42, None, {"role": "user", "content": "hi"}, ["hi"], [{"role": "user", "content": [3]}]]
)
def test_count_bad_input_type(bad):
    with pytest.raises(TypeError):
        count_tokens(bad, "gpt-4o")


# --- check_context_window ----------------------------------------------------


def test_context_window_fits_exactly():
    check_context_window(8000, 192, "gpt-4")
    check_context_window(8192, None, "gpt-4")
    check_context_window(100, 0, "gpt-4o-mini")


def test_context_window_exceeded():
    with pytest.raises(ContextWindowExceededError) as info:
        check_context_window(8000, 193, "gpt-4-0613")
    err = info.value
    assert isinstance(err, APIError)
    assert (err.prompt_tokens, err.max_tokens, err.context_window) == (8000, 193, 8192)
    text = str(err)
    assert "8192" in text and "Shorten" in text and "max_tokens" in text and "larger context window" in text


def test_context_window_exceeded_without_max_tokens():
    with pytest.raises(ContextWindowExceededError) as info:
        check_context_window(128_001, None, "gpt-4o")
    assert (info.value.max_tokens, info.value.context_window) == (None, 128_000)


def test_context_window_override():
    with pytest.raises(ContextWindowExceededError) as info:
        check_context_window(90, 20, "my-local-model", context_window=100)
    assert info.value.context_window == 100
    with pytest.raises(ContextWindowExceededError):
        check_context_window(11, None, "gpt-4o", context_window=10)
    check_context_window(200_000, None, "gpt-4", context_window=1_000_000)


def test_context_window_unknown_model_not_checked():
    check_context_window(10**9, 10**9, "my-local-model")
