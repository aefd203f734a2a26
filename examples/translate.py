"""Translate a text with the shipped `translate` prompt (offline on the embedded model by default).

    python examples/translate.py "Good morning." --to French
    python examples/translate.py notes.txt --to German      # a file path works too

The 135M embedded model only manages short, common phrases; point tinyllm at a
real model (OPENAI_API_KEY, BASE_URL or AZURE_OPENAI_ENDPOINT) for real work.
"""

import argparse
import sys
from pathlib import Path

from tinyllm import LLMCall, TinyLLMError

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", help="the text, or a path to a UTF-8 text file")
    parser.add_argument("--to", default="French", help="target language (default: French)")
    args = parser.parse_args()
    path = Path(args.text)
    text = path.read_text(encoding="utf-8") if path.is_file() else args.text
    try:
        print(LLMCall("translate.system.md", prompts_dir=PROMPTS).call(text=text, target_language=args.to))
    except TinyLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
