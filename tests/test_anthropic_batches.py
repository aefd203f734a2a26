"""`tinyllm map --batch-api` and `LLMCall.map(batch_api=True)` with the Anthropic client: Anthropic's Message
Batches, against the loopback fake of the Messages API (tests/fake_anthropic.py) running in its own process,
with the real anthropic SDK in between."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("anthropic")

import fake_anthropic as fa
from click.testing import CliRunner
from helpers import question_prompts, write

KEY = "sk-ant-api03-BATCHSECRETBATCHSECRET"
MODEL = "claude-haiku-4-5"


@pytest.fixture(autouse=True)
def _own_cache_folder(tmp_path, monkeypatch):
    """LLMCall.map(batch_api=True) records its batches in the user's cache folder by default: the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def remote():
    """tests/fake_anthropic.py in a child process, for the whole session."""
    with fa.spawn() as server:
        yield server


@pytest.fixture
def fake(remote, monkeypatch):
    """The fake, reset to plain behaviour, with the default anthropic client pointed at it."""
    import tinyllm

    remote.reset()
    remote.plan_batches()
    before = set(remote.batch_state())
    remote.new = lambda: [b for bid, b in sorted(remote.batch_state().items()) if bid not in before]
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", remote.base_url)
    tinyllm.configure(api_type="anthropic", model=MODEL, waiting_time=0.001, batch_poll_interval=0.01)
    return remote


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(tmp_path, ask="Answer briefly.")


def rows_csv(path: Path, n: int) -> Path:
    return write(path, "id,question\n" + "".join(f"{i},question {i}\n" for i in range(n)))


def run_map(*args: str) -> object:
    from tinyllm.cli import cli

    return CliRunner().invoke(cli, ["map", *args], catch_exceptions=False)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def live_bodies(fake) -> list[dict]:
    return [r["body"] for r in fake.requests if r["path"] == "/v1/messages"]


# --------------------------------------------------------------------------- #


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_map_batch_api_writes_what_a_live_map_writes(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 5)
    live = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "live.jsonl"), "--no-progress")
    assert live.exit_code == 0, live.output
    result = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "batch.jsonl"), "--batch-api", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "batch.jsonl").read_bytes() == (tmp_path / "live.jsonl").read_bytes()
    (batch,) = fake.new()
    assert batch["batch"]["processing_status"] == "ended" and batch["batch"]["request_counts"]["succeeded"] == 5
    assert [r["custom_id"] for r in batch["requests"]] == ["s0", "s1", "s2", "s3", "s4"]

    def canonical(bodies):
        return sorted(json.dumps(b, sort_keys=True) for b in bodies)  # the live run is concurrent

    assert canonical(r["params"] for r in batch["requests"]) == canonical(
        live_bodies(fake)
    )  # what it sent, row for row
    state = json.loads((tmp_path / "batch.jsonl.batches.json").read_text())
    (entry,) = state["batches"]
    assert entry["id"] == batch["batch"]["id"] and entry["api"] == "anthropic" and entry["fetched"]
    assert "5 rows: 5 done now" in result.stderr and "batch price" in result.stderr


def test_request_params_are_the_live_request_bodies(fake, prompts, tmp_path):
    """Typed output (a forced output tool), tools, prompt caching, max_tokens: each request's params are the
    Messages API body the live client sends for the same row, as the server received it."""
    from pydantic import BaseModel

    import tinyllm

    class Verdict(BaseModel):
        label: str
        score: int

    def lookup(word: str) -> str:
        """Look a word up."""
        return word

    reply = fa.tool_use("Verdict", {"label": "ok", "score": 3})
    fake.enqueue(reply, reply)
    fake.plan_batches(reply=reply)
    llm = tinyllm.LLMCall(
        "ask", prompts_dir=prompts, output_type=Verdict, tools=[lookup], max_tokens=50, cache="system"
    )
    rows = [{"question": "first"}, {"question": "second \u00e9"}]
    live = [llm.call(**row) for row in rows]
    sent = live_bodies(fake)[-2:]
    got = llm.map(rows, batch_api=True, batch_output=tmp_path / "out.jsonl", progress=False)
    assert got == live and isinstance(got[0], Verdict)
    (batch,) = fake.new()
    assert [r["params"] for r in batch["requests"]] == sent
    assert [r["custom_id"] for r in batch["requests"]] == ["i0", "i1"]
    body = sent[0]
    assert body["max_tokens"] == 50 and body["tool_choice"] == {"type": "any"}
    assert [t["name"] for t in body["tools"]] == ["lookup", "Verdict"]
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}


def test_status_moves_from_in_progress_to_ended_and_resumes(fake, prompts, tmp_path):
    """Runs with no waiting: each one looks at the batch (never submitting the rows again) until it has ended."""
    import tinyllm

    fake.plan_batches(polls=2)
    llm = tinyllm.LLMCall("ask", prompts_dir=prompts)
    out = tmp_path / "out.jsonl"
    runner = tinyllm.BatchAPIRunner(llm)

    def rows():
        return enumerate([{"question": "a"}, {"question": "b"}])

    summary = runner.to_jsonl(rows, out, wait=False)
    assert summary.submitted == 2 and summary.waiting == 2 and len(summary.running) == 1

    def record():
        return json.loads((tmp_path / "out.jsonl.batches.json").read_text())["batches"][0]

    seen = [record()["status"]]
    while not record().get("fetched"):
        summary = runner.to_jsonl(rows, out, wait=False)
        assert summary.submitted == 0  # never the same rows twice
        seen.append(record()["status"])
    assert seen == ["in_progress", "in_progress", "in_progress", "ended"]
    assert record()["request_counts"] == {
        "total": 2,
        "completed": 2,
        "failed": 0,
        "processing": 0,
        "succeeded": 2,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert [x["content"] for x in lines(out)] == ["echo: a", "echo: b"]
    assert len(fake.new()) == 1


def test_no_wait_then_rerun_collects_without_submitting_again(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 4)
    out = tmp_path / "out.jsonl"
    fake.plan_batches(hold=True)
    first = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-wait", "--no-progress")
    assert first.exit_code == 0, first.output
    assert "4 submitted in 1 new batch(es), 4 waiting in 1 running batch(es)" in first.stderr
    again = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-wait", "--no-progress")
    assert "0 submitted in 0 new batch(es), 4 waiting" in again.stderr
    assert not out.read_text().strip()
    fake.advance()
    done = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-progress")
    assert done.exit_code == 0, done.output
    assert [x["content"] for x in lines(out)] == [f"echo: question {i}" for i in range(4)] and len(fake.new()) == 1


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_errored_and_expired_results_get_error_lines_and_only_they_are_sent_again(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 5)
    out = tmp_path / "out.jsonl"
    fake.plan_batches(errored={"s1": "invalid_request_error", "s3": "overloaded_error"})
    first = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-progress")
    assert first.exit_code == 1
    got = {x["id"]: x for x in lines(out)}
    assert got["1"]["error"]["type"] == "BadRequestError" and "invalid_request_error" in got["1"]["error"]["message"]
    assert got["3"]["error"]["type"] == "ServerError"
    assert "2 of 5 rows failed" in first.stderr
    fake.plan_batches(end="expired", run_before_end=1)
    second = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-progress")
    assert second.exit_code == 1
    retry = fake.new()[-1]
    assert [r["custom_id"] for r in retry["requests"]] == ["s1", "s3"]
    got = {x["id"]: x for x in lines(out)}
    assert got["1"]["content"] == "echo: question 1"
    assert got["3"]["error"]["type"] == "BatchError" and "expired" in got["3"]["error"]["message"]
    fake.plan_batches()
    assert run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-progress").exit_code == 0
    assert [r["custom_id"] for r in fake.new()[-1]["requests"]] == ["s3"]
    assert [x["content"] for x in lines(out)] == [f"echo: question {i}" for i in range(5)]


def test_a_batch_canceled_from_outside(fake, prompts, tmp_path):
    import tinyllm
    from tinyllm.cli import cli

    rows = rows_csv(tmp_path / "rows.csv", 3)
    out = tmp_path / "out.jsonl"
    fake.plan_batches(hold=True, run_before_end=1)
    assert run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--no-wait").exit_code == 0
    status = CliRunner().invoke(cli, ["batches", "status", str(out)])
    assert status.exit_code == 0 and "in_progress" in status.output and "not collected yet" in status.output
    cancel = CliRunner().invoke(cli, ["batches", "cancel", str(out)])
    assert cancel.exit_code == 0 and "canceling" in cancel.output, cancel.output
    tinyllm.configure(api_type="openai")  # the record says Message Batches: the anthropic client collects them
    fetched = CliRunner().invoke(cli, ["batches", "fetch", str(out)])
    assert fetched.exit_code == 1, fetched.output
    got = lines(out)
    assert got[0]["content"] == "echo: question 0"
    assert [x["error"]["type"] for x in got[1:]] == ["BatchError", "BatchError"] and "canceled" in got[1]["error"][
        "message"
    ]
    status = CliRunner().invoke(cli, ["batches", "status", str(out)])
    assert "ended" in status.output and "in the output" in status.output


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_batches_split_at_the_limits_and_ids_the_api_refuses_are_hashed(fake, prompts, tmp_path):
    import tinyllm

    llm = tinyllm.LLMCall("ask", prompts_dir=prompts)
    rows = [(f"row {i} \u00e9" if i % 2 else f"r{i}", {"question": f"q{i}"}) for i in range(5)]
    fake.plan_batches(limits={"max_requests": 2})
    summary = tinyllm.BatchAPIRunner(llm, max_requests=2).to_jsonl(lambda: iter(rows), tmp_path / "o.jsonl")
    assert summary.done_now == 5 and [len(b["requests"]) for b in fake.new()] == [2, 2, 1]
    cids = [r["custom_id"] for b in fake.new() for r in b["requests"]]
    assert cids[0] == "sr0" and cids[1].startswith("h") and len(cids[1]) == 33 and len(set(cids)) == 5
    assert [x["id"] for x in lines(tmp_path / "o.jsonl")] == [r[0] for r in rows]
    assert [x["content"] for x in lines(tmp_path / "o.jsonl")] == [f"echo: q{i}" for i in range(5)]


def test_cost_is_the_batch_price_and_the_call_log_has_the_batch(fake, prompts, tmp_path):
    import tinyllm
    from tinyllm.observe import _calllog as calllog
    from tinyllm.observe import _pricing as pricing

    tinyllm.configure(log_calls=True)
    llm = tinyllm.LLMCall("ask", prompts_dir=prompts, max_tokens=20)
    live = llm.respond(question="price me")
    out = tmp_path / "out.jsonl"
    summary = tinyllm.BatchAPIRunner(llm).to_jsonl(lambda: enumerate([{"question": "price me"}]), out)
    assert summary.price == "batch" and summary.cost == pytest.approx(live.cost / 2)  # claude-haiku-4-5: half price
    client = tinyllm.get_client("anthropic")
    assert pricing.batch_price_kind(client, client.settings(), MODEL) == "batch"
    (batch,) = fake.new()
    calllog.flush_all()
    rows = calllog.query(calllog.connect(calllog.default_path()), limit=20)
    (mine,) = [r for r in rows if r["batch_id"] == batch["batch"]["id"]]
    assert mine["usage"]["batch"] == {"id": batch["batch"]["id"], "price": "batch"}
    assert (
        mine["cost"] == pytest.approx(live.cost / 2) and mine["usage"]["prompt_tokens"] == live.usage["prompt_tokens"]
    )


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_max_cost_limits_what_is_submitted(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 6)
    out = tmp_path / "out.jsonl"
    # claude-haiku-4-5 at the batch price: $0.50 / $2.50 per Mtok; a row's worst case ~ 12 prompt + 100 output tokens
    first = run_map(
        "ask", "-i", str(rows), "-o", str(out), "--batch-api", "--max-tokens", "100", "--max-cost", "0.0007"
    )
    assert first.exit_code == 1
    submitted = len(fake.new()[0]["requests"])
    assert 0 < submitted < 6 and f"{6 - submitted} row(s) not submitted" in first.stderr
    second = run_map("ask", "-i", str(rows), "-o", str(out), "--batch-api", "--max-tokens", "100")
    assert second.exit_code == 0
    assert len(fake.new()[-1]["requests"]) == 6 - submitted and len(lines(out)) == 6


def test_cached_rows_are_not_submitted_and_a_batch_fills_the_cache(fake, prompts, tmp_path):
    rows = rows_csv(tmp_path / "rows.csv", 3)
    some = rows_csv(tmp_path / "some.csv", 1)
    assert run_map("ask", "-i", str(some), "-o", str(tmp_path / "live.jsonl"), "--cache").exit_code == 0
    result = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "out.jsonl"), "--batch-api", "--cache")
    assert result.exit_code == 0, result.output
    assert "(1 from the cache)" in result.stderr
    (batch,) = fake.new()
    assert [r["custom_id"] for r in batch["requests"]] == ["s1", "s2"]
    sent = len(live_bodies(fake))
    again = run_map("ask", "-i", str(rows), "-o", str(tmp_path / "again.jsonl"), "--cache")
    assert again.exit_code == 0 and len(live_bodies(fake)) == sent  # every row from the cache now
    assert lines(tmp_path / "again.jsonl") == lines(tmp_path / "out.jsonl")


@pytest.mark.parametrize("created", [False, True])
@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_stopped_while_creating_the_batch(fake, prompts, tmp_path, created):
    """Rows recorded without a batch id (the process stopped between the create request and recording its
    answer): the next run adopts the batch created then, or submits the rows again; never two batches."""
    import tinyllm
    from tinyllm.batch._batch_files import BatchState, api_for, state_path
    from tinyllm.batch._replay import batch_request, body_hash

    llm = tinyllm.LLMCall("ask", prompts_dir=prompts)
    rows = [{"question": "a"}, {"question": "b"}]
    planned = [batch_request(llm, row) for row in rows]
    api = api_for(tinyllm.get_client())
    since = time.time()
    if created:
        path = write(tmp_path / "req.jsonl", "".join(api.line(f"i{i}", p.body).decode() for i, p in enumerate(planned)))
        api.create(path, 2, since=since, exclude=set())
    out = tmp_path / "out.jsonl"
    BatchState(
        state_path(out),
        [
            {
                "id": None,
                "api": "anthropic",
                "input_file_id": None,
                "model": MODEL,
                "rows": {f"i{i}": body_hash(p.body) for i, p in enumerate(planned)},
                "status": None,
                "fetched": False,
                "created": since,
            }
        ],
    ).save()
    assert llm.map(rows, batch_api=True, batch_output=out, progress=False) == ["echo: a", "echo: b"]
    assert len(fake.new()) == 1


def test_batches_of_one_provider_are_not_collected_through_another(fake, prompts, tmp_path):
    import tinyllm
    from tinyllm.batch._batch_files import BatchState, state_path

    out = tmp_path / "out.jsonl"
    BatchState(
        state_path(out),
        [
            {
                "id": "batch-1",
                "input_file_id": "file-1",
                "model": "gpt-4o-mini",
                "rows": {"i0": "0" * 16},
                "status": "in_progress",
                "fetched": False,
            }
        ],
    ).save()
    llm = tinyllm.LLMCall("ask", prompts_dir=prompts)
    with pytest.raises(tinyllm.ConfigError, match="openai batch API; this call uses the anthropic one"):
        llm.map([{"question": "a"}], batch_api=True, batch_output=out, progress=False)


@pytest.mark.slow
def test_killed_while_waiting_then_resumed(fake, prompts, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from helpers import child_env, wait_until

    rows = rows_csv(tmp_path / "rows.csv", 3)
    out = tmp_path / "out.jsonl"
    fake.plan_batches(hold=True)
    env = child_env(
        ANTHROPIC_API_KEY=KEY,
        ANTHROPIC_BASE_URL=fake.base_url,
        TINYLLM_API_TYPE="anthropic",
        TINYLLM_MODEL=MODEL,
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
    fake.advance()
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert len(fake.new()) == 1  # resumed, not submitted again
    assert [x["content"] for x in lines(out)] == [f"echo: question {i}" for i in range(3)]
