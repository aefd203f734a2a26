"""Extract the facts of a text as JSON with the shipped `extract_facts` prompt.

    python examples/extract_facts.py examples/data/gettysburg.txt

The prompt declares `output_type: json`; here a pydantic model is asked for
instead, so tinyllm requests a JSON schema, which the embedded llama.cpp model
follows by grammar: the reply always parses. Runs offline by default.
"""

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from tinyllm import LLMCall, TinyLLMError

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


class Facts(BaseModel):
    """The facts stated in a text, one short sentence each."""

    facts: list[str]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a UTF-8 text file")
    args = parser.parse_args()
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    try:
        facts = LLMCall("extract_facts.system.md", output_type=Facts, prompts_dir=PROMPTS).call(text=text[:4000])
    except TinyLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(facts.model_dump(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
