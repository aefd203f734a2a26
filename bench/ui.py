"""Benchmark: the workbench page (``tinyllm ui``) on a large call log, and what the page adds to a run.

Run from a checkout: ``python bench/ui.py`` (``--rows 100000`` by default; ``--rounds 20``;
``--no-browser`` skips the Chromium parts; ``--local`` adds the embedded model). Prints Markdown
tables; asserts nothing.

1. A call log of ``--rows`` synthetic calls (30 days, 5 templates, 4 models, 2% errors, ~60-word
   replies) is written straight into SQLite with the call log's own schema (FTS5 index and all).
   The workbench (uvicorn on loopback) serves it; each page is fetched ``--rounds`` times over
   HTTP (median ms, the whole HTML read) and loaded in Chromium (``page.goto`` to the load event,
   median ms): the first page, its charts (an htmx fragment the page loads after it), full-text
   searches (a rare word, common words), a template filter, a model + errors filter, a date range,
   a page 1,000 pages deep (keyset pagination), one call's record.
2. Time to first token: the same prompt and variables, streamed from the loopback fake server
   (``--delay`` seconds before each chunk) by ``LLMCall.stream`` in Python, and by the page's
   Run button (in-page clock: from the click to the first text in the answer box). With
   ``--local``, the same on the embedded SmolLM2 model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
if importlib.util.find_spec("tinyllm") is None:
    sys.path.insert(0, str(ROOT))

from fakeserver import FakeOpenAIServer, Stream
from uiserver import Page, UIServer

CHROMIUM = os.environ.get("TINYLLM_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "summary",
    "invoice",
    "meeting",
    "contract",
]


def fill_log(path: str, rows: int) -> list[str]:
    """``rows`` synthetic calls in a new call log at ``path``; returns their ids, newest first."""
    from tinyllm.observe import _calllog as calllog

    rng = random.Random(7)
    conn = calllog._open_for_writing(path)
    now = time.time()
    templates = ["summarize.system.md", "classify.system.md", "translate.system.md", "extract_facts.system.md", "ask"]
    models = ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1-nano", "smollm2"]
    ids = []
    batch = []
    for i in range(rows):
        ts = now - 30 * 86400 * (rows - i) / rows
        call_id = f"{int(ts * 1000):012x}{rng.getrandbits(40):010x}"
        ids.append(call_id)
        text = " ".join(rng.choice(WORDS) for _ in range(40)) + f" customer{rng.randrange(20_000)}"
        reply = " ".join(rng.choice(WORDS) for _ in range(60))
        error = rng.random() < 0.02
        model = rng.choice(models)
        row = {c: None for c in calllog._COLUMNS}
        row.update(
            id=call_id,
            ts=ts,
            template=rng.choice(templates),
            variables=json.dumps({"text": text}),
            messages=json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]),
            response=None if error else reply,
            reply=None if error else json.dumps({"content": reply}),
            model_requested=model,
            model=model,
            api_type="openai",
            prompt_tokens=60,
            completion_tokens=80,
            total_tokens=140,
            cost=None if model == "smollm2" else 0.00012,
            latency=rng.uniform(0.2, 3.0),
            cached=0,
            retries=0,
            output_retries=0,
            finish_reason=None if error else "stop",
            error_type="RateLimitError" if error else None,
            error_message="429 slow down" if error else None,
            pid=1,
        )
        batch.append(tuple(row[c] for c in calllog._COLUMNS))
        if len(batch) == 5000:
            conn.executemany(calllog._INSERT, batch)
            batch = []
    if batch:
        conn.executemany(calllog._INSERT, batch)
    conn.close()
    return ids[::-1]


def _median_ms(samples: list[float]) -> str:
    return f"{1000 * statistics.median(samples):.1f}"


def page_times(ui: UIServer, paths: list[tuple[str, str]], rounds: int, browser: object | None) -> None:
    page = Page(ui.port)
    page.get("/prompts")
    bpage = None
    if browser is not None:
        bpage = browser.new_context(base_url=ui.url).new_page()  # type: ignore[attr-defined]
    print("| page | calls shown | HTTP, median ms | Chromium load, median ms |")
    print("|---|---:|---:|---:|")
    for label, path in paths:
        http, loads, shown = [], [], 0
        for _ in range(rounds):  # HTTP alone first: a page loaded in the browser also fetches its charts
            t = time.perf_counter()
            status, _, text = page.get(path)
            http.append(time.perf_counter() - t)
            assert status == 200, (path, status, text[:300])
            shown = text.count('class="call-row"')
        for _ in range(rounds if bpage is not None else 0):
            t = time.perf_counter()
            bpage.goto(path, wait_until="load")  # type: ignore[union-attr]
            loads.append(time.perf_counter() - t)
            bpage.wait_for_load_state("networkidle")  # type: ignore[union-attr]  # its charts too, before the next
        print(f"| {label} | {shown} | {_median_ms(http)} | {_median_ms(loads) if loads else '-'} |")


def ttft(
    ui: UIServer, prompts: Path, rounds: int, browser: object | None, api_type: str, model: str, before: object
) -> None:
    """Median time to the first token of one streamed call, from Python and from the page; ``before()``
    runs before each call (it scripts the fake server's answer)."""
    import tinyllm
    from tinyllm.prompts import load_prompt

    prompt = load_prompt("bench", prompts_dir=str(prompts))
    python = []
    for _ in range(rounds):
        call = tinyllm.LLMCall(prompt, api_type=api_type, **({"model": model} if model else {}))
        before()  # type: ignore[operator]
        t = time.perf_counter()
        response = call.stream(topic="owls")
        for delta in response:
            if delta:
                python.append(time.perf_counter() - t)
                break
        response.close()
    page_samples = []
    if browser is not None:
        bpage = browser.new_context(base_url=ui.url).new_page()  # type: ignore[attr-defined]
        bpage.goto("/prompts/bench")
        bpage.fill("#var-topic", "owls")
        bpage.select_option("#api_type", api_type)
        bpage.fill("#model", model)
        for _ in range(rounds):
            bpage.evaluate("""() => {
                window.__t = {};
                document.querySelector('#output').textContent = '';
                document.querySelector('#run').addEventListener('click', () => { window.__t.click = performance.now(); },
                                                                 {capture: true, once: true});
                const out = document.querySelector('#output');
                const seen = new MutationObserver(() => {
                    const a = out.querySelector('.answer');
                    if (a && a.textContent.length && !window.__t.first) { window.__t.first = performance.now(); seen.disconnect(); }
                });
                seen.observe(out, {subtree: true, childList: true, characterData: true});
            }""")
            before()  # type: ignore[operator]
            bpage.click("#run")
            bpage.locator("article.run.done").wait_for(timeout=120_000)
            t = bpage.evaluate("window.__t")
            page_samples.append((t["first"] - t["click"]) / 1000)
    row = f"| {api_type} {model or '(its model)'} | {_median_ms(python)} | {_median_ms(page_samples) if page_samples else '-'} |"
    print(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--delay", type=float, default=0.002, help="seconds before each streamed chunk (fake server)")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--local", action="store_true", help="also time the first token on the embedded model")
    args = ap.parse_args()

    import tinyllm

    tmp = Path(tempfile.mkdtemp(prefix="tinyllm-bench-ui-"))
    os.chdir(tmp)
    prompts = tmp / "prompts"
    prompts.mkdir()
    (prompts / "bench.system.md").write_text("You are terse.\n")
    (prompts / "bench.user.md").write_text("Write forty words about {{ topic }}.\n")
    db = str(tmp / "calls.db")
    t = time.perf_counter()
    ids = fill_log(db, args.rows)
    print(
        f"call log: {args.rows:,} rows written in {time.perf_counter() - t:.1f} s "
        f"({os.path.getsize(db) / 1e6:.0f} MB)\n"
    )

    browser = pw = None
    if not args.no_browser and os.path.exists(CHROMIUM):
        from playwright.sync_api import sync_playwright

        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    with FakeOpenAIServer() as fake:
        os.environ["OPENAI_API_KEY"] = "sk-bench-not-a-key"
        tinyllm.configure(api_type="openai", base_url=fake.base_url, model="gpt-4o-mini")
        day = time.strftime("%Y-%m-%d", time.localtime(time.time() - 10 * 86400))
        with UIServer(prompts_dirs=[str(prompts)], log_db=db) as ui:
            deep = ids[min(len(ids) - 1, 50 * 1000)]
            page_times(
                ui,
                [
                    ("first page (50 newest calls)", "/logs"),
                    ("its charts (cost and latency per day, 30 days; loaded after the page)", "/logs/charts"),
                    ("full-text search, a rare word: `customer4242`", "/logs?q=customer4242"),
                    ("full-text search, words in most calls: `invoice meeting`", "/logs?q=invoice+meeting"),
                    ("template filter", "/logs?template=classify"),
                    ("model + errors only", "/logs?model=gpt-4.1-nano&errors=1"),
                    ("one day", f"/logs?since={day}&until={day}"),
                    ("page 1,001 (keyset: before=...)", f"/logs?before={deep}"),
                    ("one call's record", f"/logs/{ids[len(ids) // 2]}"),
                ],
                args.rounds,
                browser,
            )
            print()
            print("| time to first token | Python `LLMCall.stream`, median ms | page Run to first text, median ms |")
            print("|---|---:|---:|")
            fake.reply_with(" ".join(f"word{i}" for i in range(40)))
            ttft(
                ui,
                prompts,
                args.rounds,
                browser,
                "openai",
                "gpt-4o-mini",
                lambda: fake.enqueue(Stream(pieces=40, delay=args.delay)),
            )
            if args.local:
                ttft(ui, prompts, max(3, args.rounds // 4), browser, "llamacpp", "", lambda: None)
    if browser is not None:
        browser.close()
        pw.stop()


if __name__ == "__main__":
    main()
