"""The Python blocks of docs/logging.md run as written (pytest-examples); the streamed-call example runs on
the embedded model (marker ``local``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_examples import CodeExample, EvalExample, find_examples

from tinyllm.clients.llamacpp import local_available

DOC = Path(__file__).resolve().parent.parent / "docs" / "logging.md"
EXAMPLES = [
    pytest.param(e, id=str(e), marks=[pytest.mark.local] if "LlamaCppClient" in e.source else [])
    for e in find_examples(DOC)
    if e.prefix == "python"
]


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_page_runs(example: CodeExample, eval_example: EvalExample):
    if "LlamaCppClient" in example.source and not local_available():
        pytest.skip("needs the local extra")
    eval_example.run(example)
