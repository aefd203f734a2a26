"""Budget defects found under attack (issue 20): a Budget activated around LLMCall.map (or with
all_threads=True around any threads) holds their calls; calls without max_tokens reserve a realistic
estimate and wait for the calls in flight instead of being refused while the budget is unused;
usage no reply can have is refused as a ResponseError, not counted or charged."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest
from fakeserver import Delay, Reply, Stream
from helpers import question_prompts, wire

import tinyllm
from tinyllm import BudgetExceededError, LLMCall, ResponseError, usage_stats
from tinyllm.limits._budget import Budget

KEY = "sk-budget-defects-000000001"
# $1 per output token, input free: a call with max_tokens=10 costs at most $10.
DOLLAR_PER_OUTPUT_TOKEN = {"gpt-4o-mini": {"input_per_mtok": 0, "output_per_mtok": 1_000_000}}
CENT_PER_OUTPUT_TOKEN = {"gpt-4o-mini": {"input_per_mtok": 0, "output_per_mtok": 10_000}}
TEN = {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(tmp_path, ask="You answer briefly.\n")


@pytest.fixture
def wired(server, monkeypatch):
    return wire(server, monkeypatch, KEY)


def test_a_budget_activated_around_map_holds_its_calls(wired, prompts):
    tinyllm.configure(prices=DOLLAR_PER_OUTPUT_TOKEN, max_tokens=10)
    wired.enqueue(*[Reply(f"a{i}", usage=TEN) for i in range(5)])
    llm = LLMCall("ask.system.md", prompts_dir=prompts)
    with Budget(25).activate() as run:
        results = llm.map(
            [{"question": str(i)} for i in range(5)], max_workers=1, progress=False, return_exceptions=True
        )
    refused = [r for r in results if isinstance(r, BudgetExceededError)]
    assert len(refused) == 3 and run.refused == 3
    assert run.spent == 20 and len(wired.chat_requests()) == 2


def test_a_budget_for_all_threads_holds_the_calls_of_a_pool_of_ones_own(wired, prompts):
    tinyllm.configure(prices=DOLLAR_PER_OUTPUT_TOKEN, max_tokens=10)
    wired.enqueue(*[Reply(f"a{i}", usage=TEN) for i in range(4)])
    llm = LLMCall("ask.system.md", prompts_dir=prompts)
    with Budget(25).activate(all_threads=True) as run, concurrent.futures.ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(llm.call, question=str(i)) for i in range(4)]
        outcomes = [f.exception() for f in futures]
    assert sum(isinstance(e, BudgetExceededError) for e in outcomes) == 2 and run.spent == 20
    assert llm.call(question="after") == "a2"  # the block is over: no limit


def test_twenty_threads_without_max_tokens_use_the_budget_instead_of_being_refused(wired, prompts):
    # a reply costs $0.20 (20 output tokens at $0.01): the budget of $16 pays for 80 of the 100 rows. The
    # first call reserves RESERVED_OUTPUT tokens ($10.24), the others wait for it, then reserve what replies take.
    tinyllm.configure(prices=CENT_PER_OUTPUT_TOKEN, max_cost=16, max_concurrent_requests=20)
    twenty = {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}
    wired.enqueue(*[Delay(0.01, Reply(f"r{i}", usage=twenty)) for i in range(100)])
    llm = LLMCall("ask.system.md", prompts_dir=prompts)
    results = llm.map(
        [{"question": str(i)} for i in range(100)], max_workers=20, progress=False, return_exceptions=True
    )
    answered = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, BudgetExceededError)]
    assert len(answered) + len(refused) == 100
    assert len(answered) == 80 and usage_stats()["cost"] == pytest.approx(16.0)
    assert wired.max_in_flight > 4  # the calls ran side by side, not one after the other


def test_a_waiting_call_goes_on_when_the_call_in_flight_is_answered():
    b = Budget(25)
    b.reserve(20, "m")
    threading.Timer(0.05, b.settle, (20, 3.0)).start()
    started = time.monotonic()
    b.reserve(20, "m", wait=5)  # 20 in flight + 20 > 25, but 20 alone fits: it waits
    assert 0.03 < time.monotonic() - started < 2 and (b.spent, b.in_flight) == (3.0, 20.0)
    with pytest.raises(BudgetExceededError):
        b.reserve(20, "m", wait=0.1)  # 3 spent + 20 fits alone, but 20 in flight never settles in 0.1 s
    b.settle(20, 10.0)
    with pytest.raises(BudgetExceededError):
        b.reserve(20, "m", wait=5)  # 13 spent + 20 > 25: refused at once, nothing to wait for


def test_an_async_call_waits_without_blocking_the_loop():
    b = Budget(25)

    async def main():
        b.reserve(20, "m")
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, b.settle, 20, 3.0)
        await b.areserve(20, "m", wait=5)
        return b.in_flight

    assert asyncio.run(main()) == 20


def test_async_calls_under_max_cost_wait_their_turn(wired, prompts):
    tinyllm.configure(prices=DOLLAR_PER_OUTPUT_TOKEN, max_cost=25, max_tokens=10)
    wired.enqueue(
        *[Reply(f"a{i}", usage={"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}) for i in range(4)]
    )
    llm = LLMCall("ask.system.md", prompts_dir=prompts)

    async def main():
        return await asyncio.gather(*(llm.acall(question=str(i)) for i in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert sum(isinstance(r, str) for r in results) == 4  # $5 each: 4 fit the $25 once the first are answered
    assert sum(isinstance(r, BudgetExceededError) for r in results) == 1


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 10**15, "completion_tokens": 1, "total_tokens": 10**15 + 1},
        {"prompt_tokens": 5, "completion_tokens": 300_000, "total_tokens": 300_005},  # gpt-4o-mini: a 128k window
    ],
    ids=["huge-prompt", "completion-above-window"],
)
def test_impossible_usage_is_refused_not_counted(wired, prompts, usage):
    tinyllm.configure(prices=DOLLAR_PER_OUTPUT_TOKEN, max_tokens=10)
    wired.enqueue(Reply("x", usage=usage))
    with pytest.raises(ResponseError, match="no reply can have"):
        LLMCall("ask.system.md", prompts_dir=prompts).call(question="q")
    stats = usage_stats()
    assert stats["cost"] == 0 and stats["prompt_tokens"] == 0


def test_impossible_usage_in_a_stream_is_refused_too(wired, prompts):
    wired.enqueue(
        Stream(Reply("x", usage={"prompt_tokens": 10**15, "completion_tokens": 1, "total_tokens": 10**15 + 1}))
    )
    response = LLMCall("ask.system.md", prompts_dir=prompts).stream(question="q")
    with pytest.raises(ResponseError, match="prompt_tokens=1000000000000000"):
        list(response)


def test_map_progress_shows_budget_refusals_as_not_sent_like_the_summary(wired, prompts, tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from tinyllm.cli import cli

    monkeypatch.setenv("TINYLLM_PRICES", json.dumps(DOLLAR_PER_OUTPUT_TOKEN))
    monkeypatch.setenv("TINYLLM_LOG_CALLS", "false")
    rows, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    rows.write_text("".join(json.dumps({"id": f"r{i}", "question": f"q{i}"}) + "\n" for i in range(20)))
    wired.enqueue(*[Reply(f"answer {i}", usage=TEN) for i in range(20)])
    result = CliRunner().invoke(
        cli,
        [
            "map",
            "ask",
            "--prompts-dir",
            str(prompts),
            "-i",
            str(rows),
            "-o",
            str(out),
            "-c",
            "4",
            "--max-tokens",
            "10",
            "--max-cost",
            "50",
            "--progress",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    progress = [line for line in result.stderr.splitlines() if " rows done" in line]
    assert progress and "failed=" not in result.stderr
    assert "20 rows: 5 done now, 0 done before, 0 failed, 15 not sent (budget)" in result.stderr
    assert "not sent=15" in progress[-1] and progress[-1].startswith(("ask: 5/20 rows done", "ask.system.md: 5/20"))
