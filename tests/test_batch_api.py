"""`tinyllm map --batch-api`, `LLMCall.map(batch_api=True)` and `tinyllm batches`, against the loopback fake of
the Files and Batches endpoints running in its own process (tests/fake_batches.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import child_env, question_prompts, wait_until, write

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _own_cache_folder(tmp_path, monkeypatch):
    """LLMCall.map(batch_api=True) records its batches in the user's cache folder by default: the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def fake_process():
    """tests/fake_batches.py in a child process, for the whole session; yields its base URL (http://127.0.0.1:N)."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fake_batches.py")],
        cwd=HERE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Fake:
    """The test's handle on the fake: its controls, and what it received."""

    def __init__(self, url: str) -> None:
        self.url, self.base_url = url, url + "/v1"

    def _control(self, what: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.url}/_fake/{what}",
            data=data,
            method="POST" if data else "GET",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as answer:
            return json.loads(answer.read())

    def plan(self, **plan) -> None:
        self._control("plan", plan)

    def reply(self, content: str | None) -> None:
        self._control("reply", {"content": content})

    def advance(self, batch_id: str | None = None) -> None:
        self._control("advance", {"id": batch_id})

    def state(self) -> dict:
        return self._control("state")

    def batches(self) -> list[dict]:
        return sorted(self.state()["batches"].values(), key=lambda b: b["id"])

    def request_lines(self, batch: dict) -> list[dict]:
        text = self.state()["files"][batch["input_file_id"]]["bytes"]
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def fake(fake_process, monkeypatch):
    """The fake, reset to plain behaviour, with the default openai client pointed at it."""
    import tinyllm

    f = Fake(fake_process)
    f.plan()
    f.reply(None)
    before = {b["id"] for b in f.batches()}
    f.new = lambda: [b for b in f.batches() if b["id"] not in before]  # the batches this test created
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-batches")
    tinyllm.configure(
        api_type="openai", base_url=f.base_url, waiting_time=0.001, model="gpt-4o-mini", batch_poll_interval=0.01
    )
    return f


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(tmp_path, ask="Answer briefly.")


def rows_csv(path: Path, n: int, start: int = 0) -> Path:
    return write(path, "id,question\n" + "".join(f"{i},question {i}\n" for i in range(start, start + n)))


def run_map(*args: str) -> object:
    from tinyllm.cli import cli

    return CliRunner().invoke(cli, ["map", *args], catch_exceptions=False)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# --------------------------------------------------------------------------- #


def test_map_batch_api_writes_what_a_live_map_writes(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 5)
    live = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "live.jsonl"), "--no-progress")
    assert live.exit_code == 0, live.output
    result = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "batch.jsonl"), "--batch-api", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "batch.jsonl").read_bytes() == (tmp_path / "live.jsonl").read_bytes()
    (batch,) = fake.new()
    assert batch["status"] == "completed" and batch["endpoint"] == "/v1/chat/completions"
    assert batch["completion_window"] == "24h"
    state = json.loads((tmp_path / "batch.jsonl.batches.json").read_text())
    assert [b["id"] for b in state["batches"]] == [batch["id"]] and state["batches"][0]["fetched"]
    assert "5 rows: 5 done now" in result.stderr and "batch price" in result.stderr


def test_request_lines_are_the_live_requests(fake, prompts, tmp_path):
    """Typed output (a json_schema response_format), tools, parameters: each request line's body is the body
    tinyllm sends live for the same row, as the server received it."""
    from pydantic import BaseModel

    import tinyllm

    class Verdict(BaseModel):
        label: str
        score: int

    def lookup(word: str) -> str:
        """Look a word up."""
        return word

    fake.reply('{"label": "ok", "score": 3}')
    llm = tinyllm.LLMCall(
        "ask", prompts_dir=prompts, output_type=Verdict, tools=[lookup], temperature=0.25, max_tokens=50
    )
    rows = [{"question": "first"}, {"question": "second \u00e9"}]
    live = [llm.call(**row) for row in rows]
    sent = fake.state()["chat"][-2:]
    got = llm.map(rows, batch_api=True, batch_output=tmp_path / "out.jsonl", progress=False)
    assert got == live and isinstance(got[0], Verdict)
    (batch,) = fake.new()
    request_lines = fake.request_lines(batch)
    assert [line["body"] for line in request_lines] == sent
    assert [line["custom_id"] for line in request_lines] == ["i0", "i1"]
    assert {line["method"] for line in request_lines} == {"POST"}
    assert {line["url"] for line in request_lines} == {"/v1/chat/completions"}
    assert sent[0]["response_format"]["type"] == "json_schema" and sent[0]["tools"][0]["function"]["name"] == "lookup"


def test_status_moves_through_validating_in_progress_finalizing_completed(fake, prompts, tmp_path):
    import tinyllm

    llm = tinyllm.LLMCall("ask", prompts_dir=prompts)
    seen = []
    out = tmp_path / "out.jsonl"
    runner = tinyllm.BatchAPIRunner(llm)

    def rows():
        return enumerate([{"question": "a"}, {"question": "b"}])

    summary = runner.to_jsonl(rows, out, wait=False)
    assert summary.submitted == 2 and summary.waiting == 2 and len(summary.running) == 1

    def state():
        return json.loads((tmp_path / "out.jsonl.batches.json").read_text())["batches"][0]

    seen.append(state()["status"])
    while not state().get("fetched"):
        summary = runner.to_jsonl(rows, out, wait=False)
        seen.append(state()["status"])
        assert summary.submitted == 0  # never the same rows twice
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    assert [x["content"] for x in lines(out)] == ["echo: a", "echo: b"]
    assert len(fake.new()) == 1


def test_no_wait_then_rerun_collects_without_submitting_again(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 4)
    out = tmp_path / "out.jsonl"
    fake.plan(hold=True)
    first = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-wait", "--no-progress")
    assert first.exit_code == 0, first.output
    assert "4 submitted in 1 new batch(es), 4 waiting in 1 running batch(es)" in first.stderr
    again = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-wait", "--no-progress")
    assert "0 submitted in 0 new batch(es), 4 waiting" in again.stderr
    assert not out.read_text().strip()  # nothing to write yet
    (batch,) = fake.new()
    fake.advance(batch["id"])
    done = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-progress")
    assert done.exit_code == 0, done.output
    assert [x["id"] for x in lines(out)] == ["0", "1", "2", "3"] and len(fake.new()) == 1


def test_partial_error_file_rows_get_error_lines_and_only_they_are_sent_again(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 5)
    out = tmp_path / "out.jsonl"
    fake.plan(error_ids=["s1", "s3"])
    first = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-progress")
    assert first.exit_code == 1
    got = {x["id"]: x for x in lines(out)}
    assert got["1"]["error"]["type"] == "ServerError" and got["3"]["error"]["type"] == "ServerError"
    assert got["0"]["content"] == "echo: question 0"
    assert "2 of 5 rows failed (ServerError x2)" in first.stderr
    fake.plan()
    second = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-progress")
    assert second.exit_code == 0, second.output
    retry = fake.new()[-1]
    assert [line["custom_id"] for line in fake.request_lines(retry)] == ["s1", "s3"]
    assert [x.get("content") for x in lines(out)] == [f"echo: question {i}" for i in range(5)]


@pytest.mark.parametrize("end, kept", [("failed", 0), ("expired", 2)])
def test_failed_and_expired_batches(fake, prompts, tmp_path, end, kept):
    rows = rows_csv(tmp_path / "rows.csv", 4)
    out = tmp_path / "out.jsonl"
    fake.plan(end=end, run_before_end=kept)
    first = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-progress")
    assert first.exit_code == 1
    got = lines(out)
    assert [("content" in x) for x in got] == [True] * kept + [False] * (4 - kept)
    assert all(x["error"]["type"] == "BatchError" for x in got[kept:])
    assert (end in got[-1]["error"]["message"]) and "run again" in got[-1]["error"]["message"]
    fake.plan()
    assert run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-progress").exit_code == 0
    assert len(fake.request_lines(fake.new()[-1])) == 4 - kept
    assert all("content" in x for x in lines(out))


def test_a_batch_cancelled_from_outside(fake, prompts, tmp_path):
    from tinyllm.cli import cli

    rows = rows_csv(tmp_path / "rows.csv", 3)
    out = tmp_path / "out.jsonl"
    fake.plan(hold=True, run_before_end=1)
    assert run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-wait").exit_code == 0
    status = CliRunner().invoke(cli, ["batches", "status", str(out)])
    assert status.exit_code == 0 and "validating" in status.output and "not collected yet" in status.output
    cancel = CliRunner().invoke(cli, ["batches", "cancel", str(out)])
    assert cancel.exit_code == 0 and "cancelling" in cancel.output, cancel.output
    fetched = CliRunner().invoke(cli, ["batches", "fetch", str(out)])
    assert fetched.exit_code == 1, fetched.output
    got = lines(out)
    assert got[0]["content"] == "echo: question 0"
    assert [x["error"]["type"] for x in got[1:]] == ["BatchError", "BatchError"] and "cancelled" in got[1]["error"][
        "message"
    ]
    status = CliRunner().invoke(cli, ["batches", "status", str(out)])
    assert "cancelled" in status.output and "in the output" in status.output


def test_big_inputs_split_at_the_limits(fake, prompts, tmp_path):
    import tinyllm

    llm = tinyllm.LLMCall("ask", prompts_dir=prompts)
    rows = [{"question": f"q{i}"} for i in range(7)]
    fake.plan(limits={"max_requests": 3})
    runner = tinyllm.BatchAPIRunner(llm, max_requests=3)
    summary = runner.to_jsonl(lambda: enumerate(rows), tmp_path / "a.jsonl")
    assert [len(fake.request_lines(b)) for b in fake.new()] == [3, 3, 1] and summary.done_now == 7
    one_line = len(json.dumps(fake.request_lines(fake.new()[0])[0]).encode()) + 1
    before = len(fake.new())
    fake.plan(limits={"max_bytes": 2 * one_line + 4})
    runner = tinyllm.BatchAPIRunner(llm, max_bytes=2 * one_line + 4)
    assert runner.to_jsonl(lambda: enumerate(rows), tmp_path / "b.jsonl").done_now == 7
    sizes = [len(fake.request_lines(b)) for b in fake.new()[before:]]
    assert sum(sizes) == 7 and max(sizes) == 2
    assert all(b["status"] == "completed" for b in fake.new())
    assert lines(tmp_path / "a.jsonl") == lines(tmp_path / "b.jsonl")


def test_the_fake_refuses_a_file_over_its_limit(fake, prompts, tmp_path):
    """The limits matter: a file over them makes a failed batch, whose rows get error lines."""
    import tinyllm

    fake.plan(limits={"max_requests": 2})
    llm = tinyllm.LLMCall("ask", prompts_dir=prompts)
    s = tinyllm.BatchAPIRunner(llm).to_jsonl(lambda: enumerate([{"question": "x"}] * 3), tmp_path / "o.jsonl")
    assert s.failed == 3 and "over the limit" in lines(tmp_path / "o.jsonl")[0]["error"]["message"]


def test_cache_rows_are_not_submitted_and_a_batch_fills_the_cache(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 4)
    some = rows_csv(tmp_path / "some.csv", 2)
    assert run_map("ask", "-i", str(some), "-o", str(tmp_path / "live.jsonl"), "--cache").exit_code == 0
    result = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "out.jsonl"), "--batch-api", "--cache")
    assert result.exit_code == 0, result.output
    assert "(2 from the cache)" in result.stderr
    (batch,) = fake.new()
    assert [line["custom_id"] for line in fake.request_lines(batch)] == ["s2", "s3"]
    chats = len(fake.state()["chat"])
    again = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "again.jsonl"), "--cache")
    assert again.exit_code == 0 and len(fake.state()["chat"]) == chats  # every row from the cache now
    assert lines(tmp_path / "again.jsonl") == lines(tmp_path / "out.jsonl")


def test_call_log_rows_carry_the_batch_and_the_batch_price(fake, prompts, tmp_path):
    from tinyllm.clients.openai import OpenAIClient
    from tinyllm.observe import _calllog as calllog
    from tinyllm.observe import _pricing as pricing

    rows = rows_csv(tmp_path / "rows.csv", 2)
    result = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "out.jsonl"), "--batch-api")
    assert result.exit_code == 0
    assert "ask: 1 batch(es) (1 validating): 0/? requests done, 0 failed" in result.stderr  # the progress lines
    assert "ask: 1 batch(es) (1 in_progress): 0/2 requests done, 0 failed" in result.stderr
    (batch,) = fake.new()
    calllog.flush_all()
    found = calllog.query(calllog.connect(calllog.default_path()), limit=10)
    mine = [r for r in found if r["batch_id"] == batch["id"]]
    assert len(mine) == 2
    usage = mine[0]["usage"]
    assert usage["batch"] == {"id": batch["id"], "price": "batch"}
    client = OpenAIClient(api_key="sk-x")
    live = pricing.reply_cost(client, client.settings(), usage, "gpt-4o-mini")
    assert mine[0]["cost"] == pytest.approx(live / 2)  # gpt-4o-mini's batch price is half its list price


def test_max_cost_limits_what_is_submitted(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 6)
    out = tmp_path / "out.jsonl"
    # gpt-4o-mini at the batch price: $0.075 / $0.30 per Mtok; a row's worst case here is ~ 11 prompt + 100 output tokens
    first = run_map(
        "ask", "-i", str(rows), "-o", str(out), "--batch-api", "--max-tokens", "100", "--max-cost", "0.00007"
    )
    assert first.exit_code == 1
    submitted = len(fake.request_lines(fake.new()[0]))
    assert 0 < submitted < 6 and f"{6 - submitted} row(s) not submitted" in first.stderr
    assert len(lines(out)) == submitted
    second = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--max-tokens", "100")
    assert second.exit_code == 0
    assert len(fake.request_lines(fake.new()[-1])) == 6 - submitted and len(lines(out)) == 6


def test_llmcall_map_batch_api_typed_and_resumed_in_memory(fake, prompts, tmp_path):
    import tinyllm

    fake.reply("42")
    llm = tinyllm.LLMCall("ask", prompts_dir=prompts, output_type=int)
    rows = [{"question": "a"}, {"question": "b"}]
    assert llm.map(rows, batch_api=True, progress=False) == [42, 42]
    assert llm.map(rows, batch_api=True, progress=False) == [42, 42]  # read back from the recorded output
    assert len(fake.new()) == 1
    (record,) = (tmp_path / "cache" / "tinyllm" / "batches").glob("*.jsonl.batches.json")
    assert json.loads(record.read_text())["batches"][0]["id"] == fake.new()[0]["id"]


def test_batches_commands_need_a_record(tmp_path):
    from tinyllm.cli import cli

    result = CliRunner().invoke(cli, ["batches", "status", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "no batches are recorded" in result.output


def test_the_batch_api_refuses_other_clients(prompts, tmp_path):
    import tinyllm

    class Echo:
        def send_message(self, messages, **params):
            return {"role": "assistant", "content": "x"}

    llm = tinyllm.LLMCall("ask", prompts_dir=prompts, client=Echo())
    with pytest.raises(tinyllm.ConfigError, match="openai, azure or anthropic"):
        llm.map([{"question": "a"}], batch_api=True, batch_output=tmp_path / "o.jsonl")


@pytest.mark.slow
def test_killed_while_waiting_then_resumed(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 3)
    out = tmp_path / "out.jsonl"
    fake.plan(hold=True)
    env = child_env(
        OPENAI_API_KEY="sk-test",
        TINYLLM_BASE_URL=fake.base_url,
        TINYLLM_API_TYPE="openai",
        TINYLLM_BATCH_POLL_INTERVAL="0.05",
    )
    args = [
        sys.executable,
        "-m",
        "tinyllm",
        "map",
        "ask",
        "-i",
        str(rows),
        "-o",
        str(out),
        "--batch-api",
        "--prompts-dir",
        str(prompts),
    ]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = tmp_path / "out.jsonl.batches.json"
    try:
        wait_until(lambda: state.exists() and json.loads(state.read_text())["batches"][0]["id"], timeout=30)
        time.sleep(0.2)  # polling
        assert proc.poll() is None
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()  # waits, and closes its pipes
    (batch,) = fake.new()
    fake.advance(batch["id"])
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert len(fake.new()) == 1  # resumed, not submitted again
    assert [x["content"] for x in lines(out)] == [f"echo: question {i}" for i in range(3)]


def test_azure_global_batch_through_the_same_code(fake, prompts, tmp_path):
    """Azure OpenAI: /openai/files and /openai/batches, lines with url /chat/completions and the deployment as model."""
    import tinyllm

    client = tinyllm.AzureClient(
        endpoint=fake.url, api_key="azure-key-123456", deployments={"gpt-4o-mini": "dep-batch"}, model="gpt-4o-mini"
    )
    llm = tinyllm.LLMCall("ask", prompts_dir=prompts, client=client)
    live = llm.call(question="hi")
    sent = fake.state()["chat"][-1]
    assert llm.map([{"question": "hi"}], batch_api=True, batch_output=tmp_path / "o.jsonl", progress=False) == [live]
    (batch,) = fake.new()
    assert batch["endpoint"] == "/chat/completions"
    (line,) = fake.request_lines(batch)
    assert line["url"] == "/chat/completions" and line["body"] == sent and sent["model"] == "dep-batch"


def test_batch_prices(monkeypatch):
    """genai-prices' batch price where it has one; else half the list price, reported as such."""
    import tinyllm
    from tinyllm.observe import _pricing as pricing

    client = tinyllm.OpenAIClient(api_key="sk-x")
    cfg = client.settings()
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}
    assert pricing.batch_price_kind(client, cfg, "gpt-4o-mini") == "batch"
    assert pricing.reply_cost(client, cfg, usage, "gpt-4o-mini", batch=True) == pytest.approx(0.075 + 0.30)
    tinyllm.configure(prices={"my-model": {"input_per_mtok": 1.0, "output_per_mtok": 3.0}})
    cfg = client.settings()
    assert pricing.batch_price_kind(client, cfg, "my-model") == "half"
    assert pricing.reply_cost(client, cfg, usage, "my-model", batch=True) == pytest.approx(2.0)
    assert pricing.reply_cost(client, cfg, usage, "my-model") == pytest.approx(4.0)
    assert pricing.batch_price_kind(client, cfg, "no-such-model") is None


def test_a_row_whose_template_changed_since_submission_is_submitted_anew(fake, prompts, tmp_path):
    import tinyllm
    from tinyllm.cli import cli

    tinyllm.configure(file_check_interval=0)
    rows = rows_csv(tmp_path / "rows.csv", 2)
    out = tmp_path / "out.jsonl"
    fake.plan(hold=True)
    assert run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-wait").exit_code == 0
    write(prompts / "ask.system.md", "Answer at length.")
    fake.advance()
    changed = CliRunner().invoke(cli, ["batches", "fetch", str(out), "--wait"])
    assert changed.exit_code == 1, changed.output
    assert {x["error"]["type"] for x in lines(out)} == {"BatchError"}
    assert "not the one its batch sent" in lines(out)[0]["error"]["message"]
    fake.plan()
    assert run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api").exit_code == 0
    resent = fake.request_lines(fake.new()[-1])
    assert len(resent) == 2 and resent[0]["body"]["messages"][0]["content"] == "Answer at length."


@pytest.mark.parametrize("batch_exists", [False, True])
def test_stopped_between_upload_and_recording_the_batch(fake, prompts, tmp_path, batch_exists):
    """A file recorded without its batch id: the next run finds the batch made from it, or creates it; never two."""
    import tinyllm
    from tinyllm.batch._batch_files import BatchAPI, BatchState, state_path
    from tinyllm.batch._replay import batch_request, body_hash

    llm = tinyllm.LLMCall("ask", prompts_dir=prompts)
    rows = [{"question": "a"}, {"question": "b"}]
    planned = [batch_request(llm, row) for row in rows]
    data = "".join(
        json.dumps({"custom_id": f"i{i}", "method": "POST", "url": "/v1/chat/completions", "body": p.body}) + "\n"
        for i, p in enumerate(planned)
    )
    api = BatchAPI(tinyllm.get_client())
    file_id = api.upload(write(tmp_path / "req.jsonl", data))
    if batch_exists:
        api.create(file_id)
    out = tmp_path / "out.jsonl"
    state = BatchState(
        state_path(out),
        [
            {
                "id": None,
                "input_file_id": file_id,
                "model": "gpt-4o-mini",
                "rows": {f"i{i}": body_hash(p.body) for i, p in enumerate(planned)},
                "status": None,
                "fetched": False,
            }
        ],
    )
    state.save()
    assert llm.map(rows, batch_api=True, batch_output=out, progress=False) == ["echo: a", "echo: b"]
    assert len(fake.new()) == 1 and fake.new()[0]["input_file_id"] == file_id


def test_an_output_retry_after_a_batch_reply_is_a_live_request(fake, prompts, tmp_path):
    import tinyllm

    fake.reply("not a number")
    fake._control("enqueue", {"content": "7"})
    llm = tinyllm.LLMCall("ask", prompts_dir=prompts, output_type=int, output_retries=1)
    chats = len(fake.state()["chat"])
    assert llm.map([{"question": "a"}], batch_api=True, batch_output=tmp_path / "o.jsonl", progress=False) == [7]
    (retry,) = fake.state()["chat"][chats:]
    assert retry["messages"][-2] == {"role": "assistant", "content": "not a number"}


def test_a_recorded_file_that_cannot_become_a_batch_frees_its_rows(fake, prompts, tmp_path, caplog):
    import tinyllm
    from tinyllm.batch._batch_files import BatchState, state_path

    out = tmp_path / "out.jsonl"
    BatchState(
        state_path(out),
        [
            {
                "id": None,
                "input_file_id": "file-gone",
                "model": "gpt-4o-mini",
                "rows": {"i0": "0" * 16},
                "status": None,
                "fetched": False,
            }
        ],
    ).save()
    llm = tinyllm.LLMCall("ask", prompts_dir=prompts)
    assert llm.map([{"question": "a"}], batch_api=True, batch_output=out, progress=False) == ["echo: a"]
    assert "file-gone could not be made a batch" in caplog.text
    assert [b["id"] for b in json.loads(state_path(out).read_text())["batches"]] == [fake.new()[0]["id"]]


@pytest.mark.slow
def test_ctrl_c_while_waiting_keeps_the_batches(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 2)
    out = tmp_path / "out.jsonl"
    fake.plan(hold=True)
    env = child_env(
        OPENAI_API_KEY="sk-test",
        TINYLLM_BASE_URL=fake.base_url,
        TINYLLM_API_TYPE="openai",
        TINYLLM_BATCH_POLL_INTERVAL="0.05",
    )
    args = [
        sys.executable,
        "-m",
        "tinyllm",
        "map",
        "ask",
        "-i",
        str(rows),
        "-o",
        str(out),
        "--batch-api",
        "--prompts-dir",
        str(prompts),
    ]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "out.jsonl.batches.json"
    wait_until(lambda: state.exists() and json.loads(state.read_text())["batches"][0]["id"], timeout=30)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "the batches keep running" in err
    fake.advance()
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert len(fake.new()) == 1 and len(lines(out)) == 2
