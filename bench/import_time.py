"""Benchmark: how long ``import tinyllm`` takes, next to ``import openai``.

Run from a checkout: ``python bench/import_time.py`` (``--runs 5`` for a quicker run).
Prints a Markdown table. Nothing here is asserted; numbers depend on the machine.

Each statement runs in a fresh interpreter (``python -c "..."``, the same
``sys.executable``), ``--runs`` times, alternating between them; the table shows the
median and the minimum wall time of the whole process (interpreter start-up
included: that is what a user waits for) and, as a reference, ``python -c "pass"``.
``--modules`` also lists what ``import tinyllm`` loads, heaviest first
(``python -X importtime``), to find what could be made lazy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STATEMENTS = [
    ("python -c 'pass'", "pass"),
    ("import tinyllm", "import tinyllm"),
    ("import openai", "import openai"),
]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    if importlib.util.find_spec("tinyllm") is None:  # run from a checkout without installing
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def run_once(code: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=str(ROOT))
    return time.perf_counter() - started


def heaviest_imports(env: dict[str, str], top: int) -> list[tuple[int, str]]:
    """(cumulative µs, module) of the top-level imports of ``import tinyllm``, from -X importtime."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import tinyllm"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=str(ROOT),
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        try:
            us = int(cumulative.strip())
        except ValueError:  # the header line
            continue
        depth = (len(name) - len(name.lstrip())) // 2
        if depth <= 2:
            rows.append((us, name.strip()))
    rows.sort(reverse=True)
    return rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="fresh interpreters per statement (default 15)")
    parser.add_argument(
        "--modules",
        type=int,
        default=0,
        metavar="N",
        help="also list the N heaviest imports of tinyllm (python -X importtime)",
    )
    args = parser.parse_args()
    env = environment()

    for _, code in STATEMENTS:  # warm the OS file cache and the .pyc files
        run_once(code, env)
    times: dict[str, list[float]] = {label: [] for label, _ in STATEMENTS}
    for _ in range(args.runs):
        for label, code in STATEMENTS:
            times[label].append(run_once(code, env))

    import openai

    med = {label: statistics.median(values) for label, values in times.items()}
    print(f"### Import time: median of {args.runs} fresh interpreters each\n")
    print(
        f"Python {platform.python_version()}, openai {openai.__version__}, {os.cpu_count()} CPUs, {platform.system()}\n"
    )
    print("| statement | median (ms) | min (ms) | vs import openai |")
    print("|---|---:|---:|---:|")
    for label, _ in STATEMENTS:
        ratio = med[label] / med["import openai"]
        print(f"| `{label}` | {med[label] * 1000:.0f} | {min(times[label]) * 1000:.0f} | {ratio:.2f}× |")
    startup = med["python -c 'pass'"]
    print(
        f"\nWithout interpreter start-up: tinyllm {(med['import tinyllm'] - startup) * 1000:.0f} ms, "
        f"openai {(med['import openai'] - startup) * 1000:.0f} ms "
        f"({(med['import tinyllm'] - startup) / (med['import openai'] - startup):.2f}×)."
    )
    if args.modules:
        print("\n| module (import tinyllm, -X importtime) | cumulative (ms) |")
        print("|---|---:|")
        for us, name in heaviest_imports(env, args.modules):
            print(f"| `{name}` | {us / 1000:.1f} |")


if __name__ == "__main__":
    main()
