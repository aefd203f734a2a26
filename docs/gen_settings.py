"""The settings table of docs/settings.md, generated from ``tinyllm.config.Config`` (one source of truth).

    python docs/gen_settings.py           # rewrite the table in docs/settings.md
    python docs/gen_settings.py --check   # exit 1 if the committed table is stale (tests/test_docs.py runs it)

The table sits between the ``<!-- settings:start -->`` and ``<!-- settings:end -->`` lines of the page;
everything else on the page is written by hand. A row per ``Config`` field: the key (also
``TINYLLM_<KEY>``, a ``config.ini`` key, a ``configure()`` keyword and a client keyword in lower case),
its built-in default and its meaning (the field's ``doc``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "settings.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`" if value else "none"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def table() -> str:
    """The Markdown table, one row per setting, in ``Config``'s field order."""
    from tinyllm.config import ALIASES, Config

    also = {target: alias for alias, target in ALIASES.items()}
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Config):
        if "parse" not in f.metadata:
            continue
        key = f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        meaning = f.metadata.get("doc", "").replace("|", "\\|")
        if key in also and also[key] not in meaning:
            meaning += f" (also read as `{also[key]}`)"
        rows.append(f"| `{key}` | {_shown(default)} | {meaning} |")
    return "\n".join(rows) + "\n"


def render(page_text: str) -> str:
    """``page_text`` with the table between the markers replaced by the current one."""
    head, found, rest = page_text.partition(START + "\n")
    _, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise SystemExit(f"{PAGE}: the {START} / {END} lines are missing")
    return head + START + "\n" + table() + END + tail


def main(argv: list[str]) -> int:
    text = PAGE.read_text(encoding="utf-8")
    fresh = render(text)
    if "--check" in argv:
        if fresh != text:
            print(f"{PAGE} is stale: run python docs/gen_settings.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
