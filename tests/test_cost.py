"""Cost in USD (genai-prices, the PRICES setting) and budgets (MAX_COST, map --max-cost)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import question_prompts, wire
from fakeserver import Reply, Status
from genai_prices import Usage, calc_price

import tinyllm
from tinyllm import BudgetExceededError, LLMCall, usage_stats
from tinyllm.observe import _calllog as calllog
from tinyllm.observe import _pricing as pricing
from tinyllm.limits._budget import Budget
from tinyllm.cache._store import MemoryCache
from tinyllm.cli import cli
from tinyllm.clients.openai import OpenAIClient

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-cost-test-000000000001"


def table(model: str, provider: str = "openai", **tokens: int) -> float:
    return float(calc_price(Usage(**tokens), model, provider_id=provider).total_price)


@pytest.fixture
def prompts(tmp_path):
    return question_prompts(
        tmp_path,
        ask="You answer briefly.\n",
        num="---\noutput_type: int\noutput_retries: 1\n---\nA number.\n",
    )


@pytest.fixture
def wired(server, monkeypatch):
    return wire(server, monkeypatch, KEY)


USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 500,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 400},
    "completion_tokens_details": {"reasoning_tokens": 100},
}


def test_a_priced_model_costs_what_the_table_says_with_cached_input(wired, prompts):
    wired.enqueue(Reply("ok", usage=USAGE))
    response = LLMCall("ask.system.md", prompts_dir=prompts).respond(question="q")
    expected = table("gpt-4o-mini", input_tokens=1000, cache_read_tokens=400, output_tokens=500)
    assert response.cost == pytest.approx(expected)
    assert response.cost < table("gpt-4o-mini", input_tokens=1000, output_tokens=500)  # cached input is cheaper
    assert response.as_dict()["cost"] == response.cost
    stats = usage_stats()
    assert stats["cost"] == pytest.approx(expected) and stats["unpriced_calls"] == 0


def test_reasoning_tokens_are_priced_where_the_table_has_a_price_for_them():
    client = OpenAIClient(base_url="https://api.perplexity.ai")
    cfg = client.settings()
    with_reasoning = pricing.reply_cost(client, cfg, USAGE, "sonar-deep-research")
    expected = table(
        "sonar-deep-research",
        "perplexity",
        input_tokens=1000,
        cache_read_tokens=400,
        output_tokens=500,
        output_reasoning_tokens=100,
    )
    assert with_reasoning == pytest.approx(expected)
    assert with_reasoning != pytest.approx(
        table("sonar-deep-research", "perplexity", input_tokens=1000, cache_read_tokens=400, output_tokens=500)
    )


def test_unknown_and_local_models_cost_none_never_zero(wired, prompts):
    from tinyllm.clients.llamacpp import LlamaCppClient

    wired.enqueue(Reply("ok", usage=USAGE))
    response = LLMCall("ask.system.md", prompts_dir=prompts, model="my-own-finetune").respond(question="q")
    assert response.cost is None
    assert usage_stats()["cost"] is None and usage_stats()["unpriced_calls"] == 1
    local = LlamaCppClient()
    assert (
        pricing.reply_cost(local, local.settings(), USAGE, "gpt-4o-mini") is None
    )  # a local model is free of a table price
    ollama = OpenAIClient(base_url="http://127.0.0.1:11434/v1")
    ollama.api_type = "ollama"
    assert pricing.reply_cost(ollama, ollama.settings(), USAGE, "gpt-4o-mini") is None


@pytest.mark.local
def test_the_embedded_model_costs_none():
    from tinyllm.clients.llamacpp import LlamaCppClient, default_model_path

    if default_model_path() is None:
        pytest.skip("the local extra is not installed")
    response = tinyllm.LLMChat(system="Be brief.", client=LlamaCppClient(), max_tokens=3).respond("Hi")
    assert response.usage["completion_tokens"] > 0 and response.cost is None
    assert usage_stats()["cost"] is None and usage_stats()["unpriced_calls"] == 1


def test_the_prices_setting_wins_over_the_table_and_prices_private_models(wired, prompts, monkeypatch):
    monkeypatch.setenv(
        "TINYLLM_PRICES",
        json.dumps(
            {
                "my-own-finetune": {"input_per_mtok": 2, "output_per_mtok": 10, "cached_input_per_mtok": 1},
                "gpt-4o-mini": {"input_per_mtok": 1, "output_per_mtok": 1},
            }
        ),
    )
    wired.enqueue(Reply("ok", usage=USAGE), Reply("ok", usage=USAGE))
    private = LLMCall("ask.system.md", prompts_dir=prompts, model="my-own-finetune").respond(question="q")
    assert private.cost == pytest.approx((600 * 2 + 400 * 1 + 500 * 10) / 1e6)
    overridden = LLMCall("ask.system.md", prompts_dir=prompts).respond(question="q")
    assert overridden.cost == pytest.approx((1000 + 500) / 1e6)
    tinyllm.configure(prices={"x": {"input_per_mtok": 0, "output_per_mtok": 0.5}})
    assert tinyllm.get_config().prices == {"x": {"input_per_mtok": 0.0, "output_per_mtok": 0.5}}


@pytest.mark.parametrize(
    "bad",
    [
        '{"m": {"input_per_mtok": 1}}',
        '{"m": {"input_per_mtok": -1, "output_per_mtok": 1}}',
        '{"m": {"input_per_mtok": 1, "output_per_mtok": 1, "per_call": 2}}',
        "[1]",
        "{",
    ],
)
def test_a_bad_prices_setting_is_a_config_error(bad, monkeypatch):
    monkeypatch.setenv("TINYLLM_PRICES", bad)
    with pytest.raises(tinyllm.ConfigError, match="PRICES"):
        tinyllm.get_config()


def test_cost_is_summed_over_retries_and_output_retries_and_a_cache_hit_costs_nothing(wired, prompts, sleeps):
    one = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
    wired.enqueue(Status(500), Reply("forty-two", usage=one), Reply("42", usage=one))
    cache = MemoryCache()
    llm = LLMCall("num.system.md", prompts_dir=prompts, client=OpenAIClient(base_url=wired.base_url, cache=cache))
    response = llm.respond(question="6 x 7?")
    assert response.retries == 1 and response.output_retries == 1
    assert response.cost == pytest.approx(2 * table("gpt-4o-mini", input_tokens=100, output_tokens=10))
    assert usage_stats()["cost"] == pytest.approx(response.cost)
    wired.enqueue(Reply("Paris.", usage=one))
    ask = LLMCall("ask.system.md", prompts_dir=prompts, client=OpenAIClient(base_url=wired.base_url, cache=cache))
    paid = ask.respond(question="Capital?")
    again = ask.respond(question="Capital?")
    assert again.cached and again.text == "Paris." and again.cost == 0.0 and paid.cost > 0
    assert usage_stats()["cost"] == pytest.approx(response.cost + paid.cost)


# --------------------------------------------------------------------------- #
# Budgets
# --------------------------------------------------------------------------- #

# $1 per output token, input free: a call with max_tokens=10 costs at most $10.
DOLLAR_PER_OUTPUT_TOKEN = {"gpt-4o-mini": {"input_per_mtok": 0, "output_per_mtok": 1_000_000}}
TEN = {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}


def test_max_cost_refuses_a_call_that_could_exceed_it_before_sending(wired, prompts):
    tinyllm.configure(prices=DOLLAR_PER_OUTPUT_TOKEN, max_cost=25, max_tokens=10)
    wired.enqueue(Reply("a", usage=TEN), Reply("b", usage=TEN))
    llm = LLMCall("ask.system.md", prompts_dir=prompts)
    assert [llm.call(question="1"), llm.call(question="2")] == ["a", "b"]
    with pytest.raises(BudgetExceededError) as info:
        llm.call(question="3")
    assert len(wired.chat_requests()) == 2  # the third was never sent
    exc = info.value
    assert (exc.limit, exc.spent, exc.in_flight, exc.estimate, exc.model) == (25, 20, 0, 10, "gpt-4o-mini")
    assert "nothing was sent" in str(exc) and "$25" in str(exc)
    tinyllm.configure(max_tokens=5)  # a smaller worst case fits what is left
    wired.enqueue(Reply("c", usage={"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}))
    assert llm.call(question="4") == "c"


def test_without_max_tokens_the_reservation_is_the_longest_reply_seen(wired, prompts):
    from tinyllm.limits._budget import RESERVED_OUTPUT

    tinyllm.configure(prices=DOLLAR_PER_OUTPUT_TOKEN, max_cost=RESERVED_OUTPUT - 1)
    llm = LLMCall("ask.system.md", prompts_dir=prompts)
    with pytest.raises(BudgetExceededError) as info:
        llm.call(question="q")
    assert info.value.estimate == pytest.approx(RESERVED_OUTPUT)  # before any reply: RESERVED_OUTPUT tokens
    assert wired.chat_requests() == []
    tinyllm.configure(max_cost=100_000)
    wired.enqueue(Reply("long", usage={"prompt_tokens": 5, "completion_tokens": 3000, "total_tokens": 3005}))
    assert llm.call(question="q") == "long"
    tinyllm.configure(max_cost=5999)  # $3000 spent: the next reservation is the longest reply, 3000 tokens
    with pytest.raises(BudgetExceededError) as info:
        llm.call(question="again")
    assert info.value.estimate == pytest.approx(3000) and info.value.spent == pytest.approx(3000)


def test_a_budget_counts_calls_in_flight_at_their_worst_case():
    b = Budget(25)
    b.reserve(10, "m")
    b.reserve(10, "m")
    with pytest.raises(BudgetExceededError):
        b.reserve(10, "m")  # 20 in flight + 10 > 25
    b.settle(10, 3.0)  # one answered, for $3
    b.reserve(10, "m")
    assert (b.spent, b.in_flight, b.remaining) == (3.0, 20.0, 22.0)
    with pytest.raises(tinyllm.ConfigError):
        Budget(-1)


def test_an_active_budget_holds_the_calls_of_its_block(wired, prompts):
    tinyllm.configure(prices=DOLLAR_PER_OUTPUT_TOKEN, max_tokens=10)
    wired.enqueue(Reply("a", usage=TEN), Reply("b", usage=TEN))
    llm = LLMCall("ask.system.md", prompts_dir=prompts)
    with Budget(15).activate() as run:
        assert llm.call(question="1") == "a"
        with pytest.raises(BudgetExceededError):
            llm.call(question="2")
    assert run.spent == 10 and llm.call(question="3") == "b"  # outside the block: no limit


def test_an_unpriced_model_is_not_held_to_the_budget_and_says_so_once(wired, prompts, caplog):
    tinyllm.configure(max_cost=0.0000001, max_tokens=10)
    llm = LLMCall("ask.system.md", prompts_dir=prompts, model="my-own-finetune")
    with caplog.at_level("WARNING", logger="tinyllm"):
        llm.call(question="1")
        llm.call(question="2")
    assert [r.getMessage() for r in caplog.records if "no price" in r.getMessage()] == [
        "no price is known for my-own-finetune: its calls are not held to the budget (set PRICES to price it)"
    ]


def write_rows(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"id": f"r{i}", "question": f"q{i}"}) + "\n" for i in range(n)))


def test_map_stops_at_max_cost_midway_and_a_rerun_finishes(wired, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_PRICES", json.dumps(DOLLAR_PER_OUTPUT_TOKEN))
    monkeypatch.setenv("TINYLLM_LOG_DB", str(tmp_path / "calls.db"))
    rows, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    write_rows(rows, 10)
    wired.enqueue(*[Reply(f"answer {i}", usage=TEN) for i in range(10)])
    args = [
        "map",
        "ask",
        "--prompts-dir",
        str(prompts),
        "-i",
        str(rows),
        "-o",
        str(out),
        "-c",
        "1",
        "--max-tokens",
        "10",
        "--max-cost",
        "50",
    ]
    first = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 1, first.output
    done = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["id"] for d in done] == ["r0", "r1", "r2", "r3", "r4"] and all("content" in d for d in done)
    assert len(wired.chat_requests()) == 5
    assert "10 rows: 5 done now, 0 done before, 0 failed, 5 not sent (budget)" in first.stderr
    assert "cost $50.0000" in first.stderr and "stopped at the budget of $50.0000" in first.stderr
    second = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert "10 rows: 5 done now, 5 done before, 0 failed -> " in second.stderr and "cost $50.0000" in second.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"r{i}" for i in range(10)]
    assert len(wired.chat_requests()) == 10
    logged = calllog.query(calllog.connect(str(tmp_path / "calls.db")), limit=100)
    answered = [r for r in logged if r["error"] is None]
    assert len(answered) == 10 and sum(r["cost"] for r in answered) == 100
    assert {r["error"]["type"] for r in logged if r["error"]} == {"BudgetExceededError"}  # refused: logged, never sent
    batches = {r["batch_id"] for r in logged}
    assert len(batches) == 2 and None not in batches  # one batch id per run


@pytest.mark.slow
def test_map_summary_says_when_the_cost_is_unknown(server, tmp_path, monkeypatch):
    """A real subprocess: the summary line of a run against a model without a price."""
    rows, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    write_rows(rows, 3)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "ask.system.md").write_text("{{ question }}\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OPENAI_API_KEY": KEY,
        "TINYLLM_API_TYPE": "openai",
        "TINYLLM_BASE_URL": server.base_url,
        "TINYLLM_MODEL": "my-own-finetune",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyllm",
            "map",
            "ask",
            "--prompts-dir",
            str(tmp_path / "p"),
            "-i",
            str(rows),
            "-o",
            str(out),
            "--no-log",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "3 rows: 3 done now, 0 done before, 0 failed -> " in result.stderr
    assert "cost unknown (3 call(s) to a model without a price)" in result.stderr
    assert not (tmp_path / "xdg-data" / "tinyllm").exists()  # --no-log
