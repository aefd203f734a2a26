"""The python blocks of docs/batch-api.md run as written (those after a ``<!-- skip -->`` line need a real API key)."""

from __future__ import annotations

import pytest
from pytest_examples import CodeExample, EvalExample, find_examples

from helpers import ROOT

PAGE = ROOT / "docs" / "batch-api.md"


def _skipped(example: CodeExample) -> bool:
    before = PAGE.read_text(encoding="utf-8").splitlines()[: example.start_line - 1]
    previous = [line for line in before if line.strip()][-1:]
    return previous == ["<!-- skip -->"]


EXAMPLES = [ex for ex in find_examples(str(PAGE)) if ex.prefix == "python"]


def test_the_page_has_runnable_examples():
    assert [ex for ex in EXAMPLES if not _skipped(ex)]


@pytest.mark.parametrize("example", [ex for ex in EXAMPLES if not _skipped(ex)], ids=str)
def test_doc_example_runs(example: CodeExample, eval_example: EvalExample):
    eval_example.run(example)
