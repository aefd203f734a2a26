"""Label the sentiment of each line of text with the shipped `classify` prompt.

    python examples/classify.py "I love this phone." "The screen cracked after a week."
    printf 'great\nawful\n' | python examples/classify.py -

The prompt's front matter declares `output_type: [positive, negative, neutral]`,
so each answer is exactly one of those labels (or an OutputParseError). Runs
offline on the embedded model by default; its 135M parameters make mistakes.
"""

import argparse
import sys
from pathlib import Path

from tinyllm import LLMCall, TinyLLMError

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("texts", nargs="+", help="texts to label, or - to read one per line from stdin")
    args = parser.parse_args()
    texts = [line.strip() for line in sys.stdin if line.strip()] if args.texts == ["-"] else args.texts
    classify = LLMCall("classify.system.md", prompts_dir=PROMPTS)
    results = classify.map([{"text": t} for t in texts], progress=False, return_exceptions=True)
    failed = 0
    for text, label in zip(texts, results):
        if isinstance(label, TinyLLMError):
            failed += 1
            label = f"error: {label}"
        print(f"{label}\t{text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
