"""Summarize a text file with the shipped prompt; runs offline on the embedded model by default.

    python examples/summarize.py README.md [--max-words 60]

With OPENAI_API_KEY, BASE_URL or AZURE_OPENAI_ENDPOINT set, the same code
talks to that server instead.
"""

import argparse
import sys
from pathlib import Path

from tinyllm import LLMCall, TinyLLMError, last_call_info

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a UTF-8 text file to summarize")
    parser.add_argument("--max-words", type=int, default=60)
    args = parser.parse_args()
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    summarize = LLMCall("summarize.system.md", prompts_dir=ROOT / "prompts")
    try:
        summary = summarize.call(text=text[:6000], max_words=args.max_words)
    except TinyLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary)
    info = last_call_info()
    if info is not None:
        print(
            f"\n[{info.model}: {info.usage.get('prompt_tokens', '?')} prompt tokens, "
            f"{info.usage.get('completion_tokens', '?')} completion tokens, {info.latency:.1f} s]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
