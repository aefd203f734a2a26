"""Tools from MCP servers: a real MCP server (tests/mcp_server.py, written with the mcp SDK) over stdio
and over streamable HTTP on 127.0.0.1, with the loopback OpenAI server asking for the tool calls.

Starting the server's Python process takes about a second, so the end-to-end tests are ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from fakeserver import Message, Reply
from helpers import ROOT, free_port, wait_until, write

import tinyllm
from tinyllm import LLMCall, LLMChat, MCPServer

SERVER = str(ROOT / "tests" / "mcp_server.py")


def _calls(*calls: tuple[str, dict]) -> Message:
    return Message(
        {
            "content": None,
            "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
                for i, (name, args) in enumerate(calls)
            ],
        }
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def pids(tmp_path):
    return tmp_path / "pids.txt"


def _started(pids) -> list[int]:
    return [int(line) for line in pids.read_text().split()] if pids.exists() else []


@pytest.fixture
def stdio_server(pids):
    return MCPServer(command=[sys.executable, SERVER], env={"MCP_PID_FILE": str(pids)})


@pytest.fixture(scope="module")
def http_url():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, SERVER, "--http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        import socket

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, timeout=30)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def prompts(tmp_path):
    write(tmp_path / "prompts" / "ask.system.md", "Use the tools.")
    write(tmp_path / "prompts" / "ask.user.md", "{{ question }}")
    return tmp_path / "prompts"


# -- quick: arguments and front matter ---------------------------------------------------------------


def test_an_mcp_server_needs_a_command_or_a_url():
    with pytest.raises(tinyllm.ConfigError):
        MCPServer()
    with pytest.raises(tinyllm.ConfigError):
        MCPServer(command=["x"], url="http://127.0.0.1:1/mcp")
    with pytest.raises(tinyllm.ConfigError):
        MCPServer(url="ftp://example.org")
    with pytest.raises(tinyllm.ConfigError):
        MCPServer(command=[], timeout=1)
    assert MCPServer(command="python -m my_server --flag").command == ["python", "-m", "my_server", "--flag"]
    assert "secret" not in repr(
        MCPServer(url="http://user:secret@127.0.0.1:9/mcp", headers={"Authorization": "Bearer secret"})
    )


@pytest.mark.slow  # imports the mcp SDK (a second)
def test_a_server_that_cannot_start_is_a_tool_error(prompts, server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    broken = MCPServer(command=[str(prompts / "no-such-program")])
    with pytest.raises(tinyllm.ToolError, match="could not be started"):
        LLMCall("ask.system.md", prompts_dir=prompts, tools=[broken]).call(question="hi")
    assert not broken.is_open and server.chat_requests() == []


def test_front_matter_mcp_servers_are_checked(tmp_path):
    write(tmp_path / "p" / "bad.system.md", "---\nmcp_servers: [{command: x, url: 'http://a/mcp'}]\n---\nHi")
    with pytest.raises(tinyllm.TemplateError, match="mcp_servers"):
        LLMCall("bad.system.md", prompts_dir=tmp_path / "p")
    from tinyllm._mcp import from_front_matter

    assert from_front_matter("http://127.0.0.1:8000/mcp").url == "http://127.0.0.1:8000/mcp"
    assert from_front_matter({"command": ["python", "s.py"], "prefix": "s_", "timeout": 5}).prefix == "s_"
    with pytest.raises(tinyllm.ConfigError, match="unknown mcp_servers key"):
        from_front_matter({"command": "x", "headerz": {}})


# -- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stdio_server_tools_are_offered_called_and_the_process_ends_with_the_call(
    server, prompts, stdio_server, pids, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    server.enqueue(_calls(("add", {"a": 2, "b": 3}), ("forecast", {"city": "Paris"})), Reply("5, and 18 C in Paris"))
    response = LLMCall("ask.system.md", prompts_dir=prompts, tools=[stdio_server]).respond(question="2+3? Paris?")
    assert response.value == "5, and 18 C in Paris"
    offered = {t["function"]["name"]: t["function"] for t in server.chat_requests()[0].json["tools"]}
    assert set(offered) == {"add", "forecast", "shout", "fail", "die"}
    assert (
        offered["add"]["parameters"]["required"] == ["a", "b"] and offered["add"]["description"] == "Add two integers."
    )
    results = [m for m in server.chat_requests()[1].messages if m["role"] == "tool"]
    assert [json.loads(m["content"]) for m in results] == [{"result": 5}, {"city": "Paris", "celsius": 18}]
    assert response.tool_calls[1].result == {"city": "Paris", "celsius": 18}
    [pid] = _started(pids)
    assert not stdio_server.is_open
    wait_until(lambda: not _alive(pid), timeout=10)


@pytest.mark.slow
def test_http_server_tools_and_errors_go_back_to_the_model(server, prompts, http_url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    docs = MCPServer(url=http_url, prefix="docs_")
    server.enqueue(
        _calls(("docs_shout", {"text": "hi"}), ("docs_fail", {"why": "nope"}), ("docs_add", {"a": "x"})), Reply("done")
    )
    response = LLMCall("ask.system.md", prompts_dir=prompts, tools=[docs]).respond(question="go")
    assert response.value == "done"
    shout, fail, bad = response.tool_calls
    assert shout.result == {"result": "HI"} and shout.error is None
    assert "failed on MCP server" in fail.error and fail.content.startswith("Error:")
    assert bad.error.startswith("invalid arguments for docs_add") and "required" in bad.error
    assert not docs.is_open


@pytest.mark.slow
def test_a_server_that_dies_mid_call_gives_the_model_an_error_and_the_loop_goes_on(
    server, prompts, stdio_server, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    server.enqueue(_calls(("die", {})), _calls(("add", {"a": 1, "b": 2})), Reply("the tools are gone"))
    started = time.monotonic()
    response = LLMCall("ask.system.md", prompts_dir=prompts, tools=[stdio_server]).respond(question="go")
    assert response.value == "the tools are gone" and time.monotonic() - started < 15
    died, after = response.tool_calls
    assert "Connection closed" in died.error and after.error is not None
    assert server.chat_requests()[1].messages[-1]["content"].startswith("Error:")
    assert not stdio_server.is_open


@pytest.mark.slow
def test_map_and_a_chat_start_the_process_once(server, prompts, stdio_server, pids, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    for _ in range(3):
        server.enqueue(_calls(("add", {"a": 1, "b": 1})), Reply("2"))
    call = LLMCall("ask.system.md", prompts_dir=prompts, tools=[stdio_server])
    assert call.map([{"question": "1+1"}] * 3, max_workers=1, progress=False) == ["2", "2", "2"]
    assert len(_started(pids)) == 1 and not stdio_server.is_open
    server.enqueue(_calls(("shout", {"text": "a"})), Reply("A"), _calls(("shout", {"text": "b"})), Reply("B"))
    with LLMChat(system="Use the tools.", tools=[stdio_server]) as chat:
        assert chat.say("a") == "A" and chat.say("b") == "B"
        assert stdio_server.is_open  # between turns
    assert len(_started(pids)) == 2 and not stdio_server.is_open


@pytest.mark.slow
def test_front_matter_names_mcp_servers(server, tmp_path, pids, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    write(
        tmp_path / "p" / "calc.system.md",
        f"---\nmcp_servers:\n  - command: [{json.dumps(sys.executable)}, {json.dumps(SERVER)}]\n"
        f"    env: {{MCP_PID_FILE: {json.dumps(str(pids))}}}\n---\nUse the tools.",
    )
    write(tmp_path / "p" / "calc.user.md", "{{ question }}")
    server.enqueue(_calls(("add", {"a": 20, "b": 22})), Reply("42"))
    assert LLMCall("calc.system.md", prompts_dir=tmp_path / "p").call(question="20+22") == "42"
    assert server.chat_requests()[1].messages[-1]["content"] == '{"result":42}'
    assert len(_started(pids)) == 1


@pytest.mark.slow
def test_async_calls_and_streams_use_the_server(server, prompts, stdio_server, monkeypatch):
    import asyncio

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    call = LLMCall("ask.system.md", prompts_dir=prompts, tools=[stdio_server])
    server.enqueue(_calls(("add", {"a": 2, "b": 2}), ("shout", {"text": "x"})), Reply("4"))
    response = asyncio.run(call.arespond(question="2+2"))
    assert response.value == "4" and [c.result for c in response.tool_calls] == [{"result": 4}, {"result": "X"}]
    assert not stdio_server.is_open
    from fakeserver import Stream

    server.enqueue(Stream(_calls(("add", {"a": 3, "b": 3}))), Stream(Reply("six")))
    streamed = call.stream(question="3+3")
    assert "".join(streamed) == "six" and streamed.tool_calls[0].result == {"result": 6}
    assert not stdio_server.is_open


# -- the command line: --mcp -------------------------------------------------------------------------


def _cli(*args: str):
    from click.testing import CliRunner

    from tinyllm.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_cli_mcp_values_are_checked_before_anything_is_sent(server, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    empty = _cli("call", "ask", "--prompts-dir", str(prompts), "--var", "question=hi", "--mcp", " ", "--no-log")
    assert empty.exit_code == 2 and "--mcp" in empty.output and "must not be empty" in empty.output
    rows = write(tmp_path / "rows.jsonl", '{"question": "hi"}\n')
    batch = _cli(
        "map",
        "ask",
        "--prompts-dir",
        str(prompts),
        "--input",
        str(rows),
        "--output",
        str(tmp_path / "o.jsonl"),
        "--mcp",
        "http://127.0.0.1:9/mcp",
        "--batch-api",
        "--no-log",
    )
    assert batch.exit_code == 2 and "--mcp does not go with --batch-api" in batch.output
    assert server.chat_requests() == []


@pytest.mark.slow
def test_cli_call_mcp_offers_a_stdio_servers_tools_and_prints_each_call(server, prompts, pids, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    server.enqueue(_calls(("add", {"a": 2, "b": 3})), Reply("5"))
    command = f"env MCP_PID_FILE={pids} {sys.executable} {SERVER}"
    result = _cli("call", "ask", "--prompts-dir", str(prompts), "--var", "question=2+3?", "--mcp", command, "--no-log")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "5"
    assert 'tool add({"a": 2, "b": 3}) -> {"result":5}' in result.stderr
    offered = {t["function"]["name"] for t in server.chat_requests()[0].json["tools"]}
    assert offered == {"add", "forecast", "shout", "fail", "die"}
    [pid] = _started(pids)
    wait_until(lambda: not _alive(pid), timeout=10)  # stopped when the call ended


@pytest.mark.slow
def test_cli_map_mcp_starts_the_server_once_and_call_takes_two_servers(
    server, prompts, pids, http_url, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    for _ in range(3):
        server.enqueue(_calls(("shout", {"text": "a"})), Reply("A"))
    rows = write(tmp_path / "rows.jsonl", "".join(f'{{"id": {i}, "question": "q{i}"}}\n' for i in range(3)))
    out = tmp_path / "out.jsonl"
    command = f"env MCP_PID_FILE={pids} {sys.executable} {SERVER}"
    result = _cli(
        "map",
        "ask",
        "--prompts-dir",
        str(prompts),
        "--input",
        str(rows),
        "--output",
        str(out),
        "--concurrency",
        "1",
        "--no-progress",
        "--mcp",
        command,
        "--no-log",
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["content"] for line in out.read_text().splitlines()] == ["A", "A", "A"]
    assert len(_started(pids)) == 1  # one process for the whole run
    wait_until(lambda: not _alive(_started(pids)[0]), timeout=10)

    server.reset()
    server.enqueue(_calls(("add", {"a": 1, "b": 1}), ("docs_shout", {"text": "b"})), Reply("2 B"))
    both = _cli(
        "call",
        "ask",
        "--prompts-dir",
        str(prompts),
        "--var",
        "question=go",
        "--mcp",
        command,
        "--mcp",
        f"docs={http_url}",
        "--no-log",
    )
    assert both.exit_code == 0, both.output
    assert both.stdout.strip() == "2 B"
    assert 'tool docs_shout({"text": "b"}) -> {"result":"B"}' in both.stderr
    offered = {t["function"]["name"] for t in server.chat_requests()[0].json["tools"]}
    assert offered == {
        "add",
        "forecast",
        "shout",
        "fail",
        "die",
        "docs_add",
        "docs_forecast",
        "docs_shout",
        "docs_fail",
        "docs_die",
    }
    results = [json.loads(m["content"]) for m in server.chat_requests()[1].messages if m["role"] == "tool"]
    assert results == [{"result": 2}, {"result": "B"}]

    clash = _cli(
        "call",
        "ask",
        "--prompts-dir",
        str(prompts),
        "--var",
        "question=go",
        "--mcp",
        command,
        "--mcp",
        http_url,
        "--no-log",
    )  # the same tool names from two servers, no NAME=
    assert clash.exit_code == 2 and "two tools are named" in clash.output


@pytest.mark.slow
def test_cli_chat_mcp_keeps_the_server_for_the_conversation(server, prompts, pids, monkeypatch):
    from click.testing import CliRunner

    from tinyllm.cli import cli

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    tinyllm.configure(api_type="openai", base_url=server.base_url, model="gpt-4o-mini")
    server.enqueue(_calls(("add", {"a": 2, "b": 3})), Reply("It is 5."), _calls(("shout", {"text": "hi"})), Reply("HI"))
    command = f"env MCP_PID_FILE={pids} {sys.executable} {SERVER}"
    result = CliRunner().invoke(
        cli, ["chat", "--system", "Use the tools.", "--mcp", command], input="2+3?\nshout hi\nexit\n"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["It", "is", "5.", "HI"]
    assert 'tool add({"a": 2, "b": 3}) -> {"result":5}' in result.stderr
    assert 'tool shout({"text": "hi"}) -> {"result":"HI"}' in result.stderr
    [pid] = _started(pids)  # one process for both turns
    wait_until(lambda: not _alive(pid), timeout=10)  # stopped when the conversation ended


def test_an_mcp_tool_is_offered_with_the_servers_schema_as_given():
    """An MCP tool's spec is the server's input schema, not strict (it is not made strict-compatible)."""
    from tinyllm._mcp import MCPTool

    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    tool = MCPTool(MCPServer(command=["server"]), "search", "Search the docs.", schema)
    assert tool.spec() == {
        "type": "function",
        "function": {"name": "search", "description": "Search the docs.", "parameters": schema},
    }
