"""The Python blocks of docs/multimodal-and-choices.md run as written (pytest-examples); a block preceded by a
``<!-- skip -->`` line needs a real API key and is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_examples import CodeExample, EvalExample, find_examples

from tinyllm.clients.llamacpp import local_available

DOC = Path(__file__).resolve().parent.parent / "docs" / "multimodal-and-choices.md"
LINES = DOC.read_text(encoding="utf-8").splitlines()


EXAMPLES = [
    pytest.param(e, id=str(e), marks=[pytest.mark.local] if "LlamaCppClient" in e.source else [])
    for e in find_examples(DOC)
]


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_page_runs(example: CodeExample, eval_example: EvalExample):
    if LINES[example.start_line - 2].strip() == "<!-- skip -->":
        pytest.skip("needs a real API key")
    if "LlamaCppClient" in example.source and not local_available():
        pytest.skip("needs the local extra")
    eval_example.run(example)
