"""The workbench in a real browser: Playwright for Python driving Debian's Chromium
(``/usr/bin/chromium``, no browser download), one browser per test session, the server on a free
loopback port. End to end against the loopback fake server (and the embedded model, marked
``local``): the prompt list, a prompt's variables and live rendering, Run streaming, Compare,
Save and a refused conflicting save, a call found in the log, a reply with HTML shown as text.

All slow (a browser); run with ``-m slow``."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("starlette")
playwright_api = pytest.importorskip("playwright.sync_api")

from fakeserver import FakeOpenAIServer, Reply, Stream
from helpers import wire, write
from uiserver import UIServer

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("TINYLLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "sk-ui-browser-SECRET-abcdef0123456789"
expect = playwright_api.expect


@pytest.fixture(scope="session")
def browser():
    if not os.path.exists(CHROMIUM):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set TINYLLM_CHROMIUM)"
        if os.environ.get("CI"):  # .ci/run installs it: a missing browser there is a failure, not a skip
            pytest.fail(missing)
        pytest.skip(missing)
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uib")
    prompts = folder / "prompts"
    write(prompts / "greet.system.md", "---\ndescription: Greets someone\nmodel: gpt-4o-mini\n---\nYou are friendly.\n")
    write(prompts / "greet.user.md", "Say hello to {{ name }}.\n")
    write(prompts / "other.system.md", "---\ndescription: Something else\n---\nAnswer {{ question }}\n")
    return folder


@pytest.fixture(scope="module")
def ui(root):
    with UIServer(prompts_dirs=[str(root / "prompts")], log_db=str(root / "calls.db")) as server:
        yield server


@pytest.fixture
def wired(fake, monkeypatch):
    fake.reset()
    fake.reply_with(None)
    return wire(fake, monkeypatch, KEY)


@pytest.fixture
def page(browser, ui):
    context = browser.new_context(base_url=ui.url, viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield pg
    context.close()
    # no script error, no CSP violation (a 4xx answer the page shows, such as a refused save, is logged too)
    assert not [e for e in errors if "the server responded with a status of 4" not in e], errors


def test_prompt_list_filter_open_fill_render_and_run(page, wired):
    wired.enqueue(Stream(pieces=4, delay=0.05))
    page.goto("/prompts")
    expect(page.locator("tr.prompt-row")).to_have_count(2)
    page.fill("#prompt-filter", "greets")
    expect(page.locator("tr.prompt-row")).to_have_count(1)
    page.click("text=greet")
    expect(page).to_have_url(re.compile(r"/prompts/greet$"))
    expect(page.locator("label[for=var-name]")).to_have_text("name")
    before = int(page.locator("#total-tokens").inner_text())
    page.fill("#var-name", "Ada Lovelace of the Analytical Engine")
    expect(page.locator("#preview")).to_contain_text("Say hello to Ada Lovelace of the Analytical Engine.")
    expect(page.locator("#total-tokens")).not_to_have_text(str(before))
    assert int(page.locator("#total-tokens").inner_text()) > before
    expect(page.locator("#context-share")).to_contain_text("%")
    page.click("#run")
    run = page.locator("article.run")
    expect(run).to_have_class(re.compile(r"\bdone\b"), timeout=15_000)
    expect(run.locator(".answer")).to_have_text("echo: Say hello to Ada Lovelace of the Analytical Engine.")
    expect(run.locator(".stat-tokens")).to_contain_text("+")
    assert wired.chat_requests()[-1].json["stream"] is True


def test_editing_the_template_updates_the_fields_and_messages(page, wired):
    page.goto("/prompts/greet")
    page.fill("#user", "Dear {{ name }}, how is {{ city }}?")
    expect(page.locator("label[for=var-city]")).to_have_text("city")
    page.fill("#var-city", "Paris")
    expect(page.locator("#preview")).to_contain_text("Dear , how is Paris?")


def test_compare_two_models_side_by_side(page, wired):
    wired.reply_with(lambda req: f"answer from {req['model']}")
    page.goto("/prompts/greet")
    page.fill("#var-name", "Bob")
    page.click("#compare-box summary")
    page.fill("#cmp_model_0", "gpt-4o-mini")
    page.fill("#cmp_model_1", "gpt-4.1-mini")
    page.click("#compare")
    runs = page.locator("article.run")
    expect(runs).to_have_count(2)
    for i, model in enumerate(["gpt-4o-mini", "gpt-4.1-mini"]):
        expect(runs.nth(i)).to_have_class(re.compile(r"\bdone\b"), timeout=15_000)
        expect(runs.nth(i).locator(".answer")).to_have_text(f"answer from {model}")
        expect(runs.nth(i).locator(".stat-latency")).to_contain_text(" s")
        expect(runs.nth(i).locator(".stat-cost")).to_contain_text("$")
    box = [runs.nth(i).bounding_box() for i in range(2)]
    assert box[0]["y"] == box[1]["y"] and box[0]["x"] < box[1]["x"]  # side by side


def test_save_an_edit_and_a_conflicting_edit_is_refused(page, root, wired):
    path = root / "prompts" / "other.system.md"
    page.goto("/prompts/other")
    page.fill("#system", "Answer {{ question }} briefly.")
    with page.expect_response(re.compile(r"/save$")):
        page.click("#save")
    expect(page.locator("#save-message")).to_contain_text("saved other.system.md")
    assert path.read_text() == "---\ndescription: Something else\n---\nAnswer {{ question }} briefly."
    page.fill("#system", "Answer {{ question }} at length.")  # a second save from the same page is fine
    with page.expect_response(re.compile(r"/save$")):
        page.click("#save")
    expect(page.locator("#save-message")).to_contain_text("saved")
    assert path.read_text().endswith("at length.")
    write(path, "---\ndescription: Something else\n---\nChanged elsewhere: {{ question }}\n")
    page.fill("#system", "My edit: {{ question }}")
    with page.expect_response(re.compile(r"/save$")):
        page.click("#save")
    expect(page.locator("#save-message")).to_contain_text("changed on disk")
    expect(page.locator("#save-diff")).to_contain_text("-Changed elsewhere: {{ question }}")
    expect(page.locator("#save-diff")).to_contain_text("+My edit: {{ question }}")
    assert path.read_text().endswith("Changed elsewhere: {{ question }}\n")


def test_a_reply_with_html_is_shown_as_text(page, wired):
    reply = '<script>window.pwned = 1</script><b>bold?</b><img src=x onerror="window.pwned = 2">'
    wired.enqueue(Stream(then=Reply(reply), pieces=3))
    page.goto("/prompts/greet")
    page.fill("#var-name", "<i>Eve</i>")
    expect(page.locator("#preview")).to_contain_text("Say hello to <i>Eve</i>.")
    assert page.locator("#preview i").count() == 0
    page.click("#run")
    run = page.locator("article.run")
    expect(run).to_have_class(re.compile(r"\bdone\b"), timeout=15_000)
    expect(run.locator(".answer")).to_have_text(reply)
    assert run.locator(".answer b, .answer img, .answer script").count() == 0
    assert page.evaluate("window.pwned") is None


def test_find_a_call_in_the_log(page, root, fake, monkeypatch):
    import tinyllm
    from tinyllm.observe._calllog import flush_all

    fake.reset()
    fake.reply_with(None)
    wire(fake, monkeypatch, KEY)
    tinyllm.configure(log_calls=True, log_db=str(root / "calls.db"))
    call = tinyllm.LLMCall("greet", prompts_dir=str(root / "prompts"))
    for name in ("Alice", "Zebediah", "Carol"):
        call.call(name=name)
    assert flush_all(10)
    page.goto("/logs")
    expect(page.locator("tr.call-row")).to_have_count(3)
    expect(page.locator("figure.chart svg rect.bar").first).to_be_attached()
    page.fill("#log-search", "Zebediah")
    page.click("#log-go")
    expect(page.locator("tr.call-row")).to_have_count(1)
    page.locator("tr.call-row a").click()
    expect(page.locator("#reply")).to_contain_text("echo: Say hello to Zebediah.")
    expect(page.locator("#call-fields")).to_contain_text("gpt-4o-mini")
    html = page.content()
    assert KEY not in html and KEY[:16] not in html


@pytest.mark.local
def test_run_on_the_embedded_model(page, embedded_model):
    if embedded_model is None:
        pytest.skip("the local extra (llama-cpp-python) is not installed")
    page.goto("/prompts/greet")
    page.fill("#var-name", "Ada")
    page.select_option("#api_type", "llamacpp")
    page.fill("#model", "")
    page.click("#run")
    run = page.locator("article.run")
    expect(run).to_have_class(re.compile(r"\bdone\b"), timeout=120_000)
    assert run.locator(".answer").inner_text().strip()
    expect(run.locator(".stat-tokens")).to_contain_text("+")


def test_screenshots_of_every_page(browser, fake, monkeypatch, tmp_path):
    """Every page renders in the browser; the same code writes docs/images/ (python tests/screenshots.py)."""
    import shutil

    from helpers import ROOT
    from screenshots import SHOTS, take_screenshots

    fake.reset()
    wire(fake, monkeypatch, KEY)
    shutil.copytree(ROOT / "prompts", tmp_path / "prompts")
    with UIServer(prompts_dirs=[str(tmp_path / "prompts")], log_db=str(tmp_path / "calls.db")) as server:
        context = browser.new_context(base_url=server.url, viewport={"width": 1400, "height": 900})
        try:
            written = take_screenshots(
                context.new_page(), tmp_path / "shots", tmp_path, fake, str(tmp_path / "calls.db")
            )
        finally:
            context.close()
    assert sorted(p.name for p in written) == sorted(SHOTS)
    assert all(p.stat().st_size > 5_000 for p in written)
