"""Screenshots of every workbench page, for docs/ui.md (imported as ``screenshots`` by
tests/test_ui_browser.py, which checks that they are taken; run as a script to refresh docs/images/):

    python tests/screenshots.py            # writes docs/images/ui-*.png

The pages show the shipped prompts (prompts/), answers from the loopback fake server, a call log of
a few calls, and, when the eval package is installed, two evaluation runs.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from fakeserver import Stream

SHOTS = ["ui-prompts.png", "ui-prompt.png", "ui-compare.png", "ui-logs.png", "ui-call.png", "ui-evals.png"]


def _replies(req: dict) -> str:
    return f"[{req['model']}] In short: {req['messages'][-1]['content'][:70]}"


def take_screenshots(page: Any, out: Path, root: Path, fake: Any, log_db: str) -> list[Path]:
    """Drive ``page`` (a Playwright page whose base URL is a workbench serving ``root/prompts`` with the
    call log ``log_db``) through every page and write ``out/ui-*.png``; returns the files written.

    The default client must already point at ``fake`` (a FakeOpenAIServer)."""
    from playwright.sync_api import expect

    import tinyllm
    from tinyllm.observe._calllog import flush_all

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def shot(name: str, full: bool = True) -> None:
        path = out / name
        page.screenshot(path=str(path), full_page=full)
        written.append(path)

    fake.reply_with(_replies)
    tinyllm.configure(log_calls=True, log_db=log_db)
    prompts = str(root / "prompts")
    summarize = tinyllm.LLMCall("summarize", prompts_dir=prompts)
    for text in ["The meeting moved to Friday.", "Sales rose 4% in May.", "The train is late again."]:
        summarize.call(text=text)
    tinyllm.LLMCall("summarize", prompts_dir=prompts, model="gpt-4.1-mini").call(text="A longer text " * 20)
    assert flush_all(10)

    page.goto("/prompts")
    page.wait_for_selector("tr.prompt-row")
    shot("ui-prompts.png")

    page.goto("/prompts/summarize")
    page.fill("#var-text", "Four score and seven years ago our fathers brought forth on this continent a new nation.")
    page.wait_for_selector("#preview:has-text('Four score')")
    fake.enqueue(Stream(pieces=6, delay=0.02))
    page.click("#run")
    page.wait_for_selector("article.run.done", timeout=15_000)
    shot("ui-prompt.png")

    page.click("#compare-box summary")
    page.fill("#cmp_model_0", "gpt-4o-mini")
    page.fill("#cmp_model_1", "gpt-4.1-mini")
    page.fill("#cmp_model_2", "gpt-4.1-nano")
    page.click("#compare")
    expect(page.locator("article.run.done")).to_have_count(3, timeout=15_000)
    page.locator("#output").scroll_into_view_if_needed()
    shot("ui-compare.png")

    page.goto("/logs")
    page.wait_for_selector("tr.call-row")
    shot("ui-logs.png")
    page.locator("tr.call-row a").first.click()
    page.wait_for_selector("#call-fields")
    shot("ui-call.png")

    try:
        import scipy  # noqa: F401
        import tinyllm.eval as ev
    except ImportError:
        ev = None
    if ev is not None and hasattr(ev, "evaluate"):
        cases = [
            {"id": "happy", "vars": {"text": "Best purchase all year, I adore it."}, "expected": "positive"},
            {"id": "angry", "vars": {"text": "Awful food, rude staff."}, "expected": "negative"},
            {"id": "fact", "vars": {"text": "The train leaves at 9 am."}, "expected": "neutral"},
            {"id": "mixed", "vars": {"text": "Great screen, terrible battery."}, "expected": "neutral"},
        ]

        def sentiment(req: dict) -> str:
            text = req["messages"][-1]["content"]
            if "adore" in text or ("Great" in text and req["model"] == "gpt-4o-mini"):
                return "positive"
            return "negative" if "Awful" in text or "terrible" in text else "neutral"

        fake.reply_with(sentiment)
        ev.evaluate("classify", cases=cases, models=["gpt-4o-mini", "gpt-4.1-mini"], prompts_dir=prompts, db=log_db)
        report = ev.evaluate(
            "classify",
            cases=cases,
            models=["gpt-4o-mini", "gpt-4.1-mini"],
            prompts_dir=prompts,
            db=log_db,
            repeat=2,
            fresh=True,
        )
        page.goto(f"/evals/{report.run_id}")
        page.wait_for_selector("table.matrix")
    else:
        page.goto("/evals")
    shot("ui-evals.png")
    fake.reply_with(None)
    return written


def main() -> None:
    """Write docs/images/ui-*.png from the shipped prompts, served by a workbench in a temporary folder."""
    import os

    from fakeserver import FakeOpenAIServer
    from playwright.sync_api import sync_playwright
    from uiserver import UIServer

    import tinyllm

    tmp = Path(tempfile.mkdtemp(prefix="tinyllm-shots-"))
    try:
        shutil.copytree(ROOT / "prompts", tmp / "prompts")
        os.chdir(tmp)
        with FakeOpenAIServer() as fake:
            os.environ["OPENAI_API_KEY"] = "sk-screenshot-not-a-key"
            tinyllm.configure(api_type="openai", base_url=fake.base_url, model="gpt-4o-mini")
            log_db = str(tmp / "calls.db")
            with UIServer(prompts_dirs=[str(tmp / "prompts")], log_db=log_db) as ui, sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=os.environ.get("TINYLLM_CHROMIUM", "/usr/bin/chromium"),
                    args=[
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        "--no-first-run",
                    ],
                )
                page = browser.new_context(base_url=ui.url, viewport={"width": 1400, "height": 900}).new_page()
                for path in take_screenshots(page, ROOT / "docs" / "images", tmp, fake, log_db):
                    print(path.relative_to(ROOT))
                browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
