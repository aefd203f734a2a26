"""Typed outputs: each shipped prompt returns a Python value of the type its front matter declares.

    python examples/typed_outputs.py [--api-type llamacpp|openai|ollama|azure]

Runs offline on the embedded SmolLM2-135M model by default (a few seconds per
call on a laptop CPU; expect small-model answers). The front matter of each
prompt in prompts/ says what comes back:

    summarize      output_type: str
    translate      output_type: str
    classify       output_type: [positive, negative, neutral]   (one label)
    extract_facts  output_type: json                            (a dict)

and ``output_type=`` in code may ask for a pydantic model instead; tinyllm then
requests a JSON schema (``response_format``), which llama.cpp enforces with a
grammar, and validates the reply into the model (this script needs pydantic:
``pip install pydantic``, part of the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from tinyllm import LLMCall, TinyLLMError

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"

TEXT = (
    "The Amazon rainforest covers much of the Amazon basin in South America. "
    "It is home to millions of species of insects, plants, birds and other animals."
)


class Facts(BaseModel):
    """The facts stated in a text, one short sentence each."""

    facts: list[str]


def show(title: str, call: LLMCall, **variables: object) -> None:
    started = time.perf_counter()
    try:
        value = call.call(**variables)
    except TinyLLMError as exc:
        print(f"{title:<28} failed: {type(exc).__name__}: {exc}")
        return
    print(f"{title:<28} {type(value).__name__:<6} {value!r}  ({time.perf_counter() - started:.1f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-type", default="llamacpp", help="the backend (default: the embedded model)")
    args = parser.parse_args()
    common = {"prompts_dir": PROMPTS, "api_type": args.api_type}
    try:
        show("summarize -> str", LLMCall("summarize.system.md", max_tokens=60, **common), text=TEXT, max_words=20)
        show(
            "translate -> str",
            LLMCall("translate.system.md", max_tokens=30, **common),
            text="Good morning.",
            target_language="French",
        )
        classify = LLMCall("classify.system.md", **common)
        for text in ("I love this phone, the battery lasts for days!", "The train leaves at 9 am."):
            show("classify -> label", classify, text=text)
        show("extract_facts -> dict", LLMCall("extract_facts.system.md", max_tokens=120, **common), text=TEXT)
        show(
            "extract_facts -> Facts",
            LLMCall("extract_facts.system.md", output_type=Facts, max_tokens=120, **common),
            text="Mount Everest is 8,849 metres high. It lies on the border of Nepal and China.",
        )
    except TinyLLMError as exc:  # e.g. no backend installed or configured
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
