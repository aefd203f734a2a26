"""Benchmark: `tinyllm.evaluate` on 10,000 cases against the loopback server: eval's own overhead per cell, peak memory.

Run from a checkout: ``python bench/eval.py`` (``--cases 1000,10000`` by default; ``--concurrency 8``).
Prints a Markdown table. Nothing here is asserted; numbers depend on the machine.

For each size, a prompt with an ``output_type`` of three labels and a tests file whose one
entry is a CSV dataset of that many rows (``{type: equals, value: "{{ label }}"}``) is written
to a temporary folder; the loopback server of ``tests/fakeserver.py`` (in this process) answers
every request with a label. Two child processes run, each against the same server, with the
cache and the call log off:

- ``evaluate``: ``tinyllm.evaluate(...)`` (reading the dataset three times, the fingerprint, the
  Runner's resumable JSONL, grading, the import into SQLite) and then ``report.summary()``
  (scipy, the SQL aggregates);
- ``baseline``: the same calls through ``LLMCall.map`` (the Runner, in memory, no grading, no storage).

Eval's own overhead per cell is ``(evaluate - baseline) / cells``. Peak RSS is the child's own
high-water mark (``VmHWM`` of ``/proc/self/status`` at exit; Linux only), which includes the
interpreter, the openai SDK and scipy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LABELS = ("positive", "negative", "neutral")

_CHILD = r"""
import json, os, sys, time
import tinyllm
mode, folder, n, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tinyllm.configure(api_type="openai", base_url=os.environ["BENCH_BASE_URL"], cache_api_calls=False, log_calls=False,
                  max_concurrent_requests=workers, log_db=os.path.join(folder, "runs.db"))
started = time.perf_counter()
if mode == "evaluate":
    report = tinyllm.evaluate("bench", prompts_dir=folder, max_workers=workers)
    (s,) = report.summary()
    assert s.n == n, s
    extra = {"passed": s.passed}
else:
    import csv
    with open(os.path.join(folder, "rows.csv")) as f:
        rows = [{"text": r["text"]} for r in csv.DictReader(f)]
    out = tinyllm.LLMCall("bench", prompts_dir=folder).map(rows, max_workers=workers, progress=False)
    assert len(out) == n
    extra = {}
seconds = time.perf_counter() - started
with open("/proc/self/status") as f:
    kib = int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
print(json.dumps({"seconds": seconds, "peak_kib": kib, **extra}))
"""


def write_prompt(folder: Path, n: int) -> None:
    (folder / "bench.system.md").write_text(
        "---\noutput_type: [positive, negative, neutral]\n---\nClassify the text.\n"
    )
    (folder / "bench.user.md").write_text("{{ text }}\n")
    (folder / "bench.tests.yaml").write_text(
        '- dataset: rows.csv\n  assert:\n    - {type: equals, value: "{{ label }}"}\n'
    )
    with open(folder / "rows.csv", "w") as f:
        f.write("id,text,label\n")
        f.writelines(f"r{i},review number {i} of the product,{LABELS[i % 3]}\n" for i in range(n))


def run_child(mode: str, folder: Path, n: int, workers: int, base_url: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BENCH_BASE_URL": base_url,
        "OPENAI_API_KEY": "sk-bench",
        "XDG_DATA_HOME": str(folder / "xdg"),
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(folder), str(n), str(workers)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1000,10000", help="comma-separated numbers of cases (default 1000,10000)")
    parser.add_argument("--concurrency", type=int, default=8, help="threads / requests in flight (default 8)")
    args = parser.parse_args()
    from fakeserver import FakeOpenAIServer

    print(
        f"Python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} CPUs; "
        f"concurrency {args.concurrency}; {time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| cases | evaluate (s) | baseline map (s) | eval overhead per cell (ms) | cells/s | peak RSS evaluate (MiB) | peak RSS baseline (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with FakeOpenAIServer() as server:
        # the label of the review's number, except every tenth review: "neutral" (a failure when it is not neutral)
        def reply(req: dict) -> str:
            i = int(req["messages"][-1]["content"].split()[2])
            return LABELS[i % 3] if i % 10 else "neutral"

        server.reply_with(reply)
        for n in (int(x) for x in args.cases.split(",")):
            with tempfile.TemporaryDirectory(prefix="tinyllm-bench-eval-") as tmp:
                folder = Path(tmp)
                write_prompt(folder, n)
                ev = run_child("evaluate", folder, n, args.concurrency, server.base_url)
                base = run_child("baseline", folder, n, args.concurrency, server.base_url)
            per_cell = (ev["seconds"] - base["seconds"]) / n * 1000
            print(
                f"| {n:,} | {ev['seconds']:.1f} | {base['seconds']:.1f} | {per_cell:.2f} | {n / ev['seconds']:.0f} | "
                f"{ev['peak_kib'] / 1024:.0f} | {base['peak_kib'] / 1024:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
