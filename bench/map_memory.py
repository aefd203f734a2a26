"""Benchmark: peak memory (RSS) of `tinyllm map` against the number of input rows.

Run from a checkout: ``python bench/map_memory.py`` (``--rows 100000`` for a quicker run).
Prints a Markdown table. Nothing here is asserted; numbers depend on the machine.

For each size in ``--rows`` (default 100,000 and 1,000,000) an input JSONL file is
generated (about 198 bytes a row, as in the issue that reported 1.16 GB for 1 M rows),
and ``python -m tinyllm map`` runs on it in a child process, with the cache on, against
the loopback server of ``tests/fakeserver.py`` (in this process). The template renders
the same messages for every row, so one request reaches the server and every other row
is a cache hit: the run measures the batch machinery (reading, checking and streaming the
rows, the futures, the output file, the final rewrite in input order) at a few thousand
rows a second, instead of the network. Three runs per size:

- ``fresh``: no output file yet;
- ``resume half``: the output holds the first half of the rows (in input order), the run
  sends the other half;
- ``nothing to do``: the output is complete; the run reads it and rewrites it.

Peak RSS is the child's own high-water mark (``VmHWM`` in ``/proc/self/status``, written
by a small wrapper at exit; Linux only). Not ``ru_maxrss`` from ``getrusage(RUSAGE_CHILDREN)``
or ``wait4``: a child started with vfork + exec (as ``subprocess`` does) inherits its
parent's high-water mark there. Wall time includes the interpreter's start-up. ``--root DIR`` runs the
tinyllm found in another checkout (e.g. an older commit, for comparison).
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


def write_input(path: Path, n: int) -> int:
    """``n`` rows of {"id", "text"}, about 198 bytes each; returns the file's size in bytes."""
    filler = "lorem ipsum dolor sit amet " * 6
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"row-{i:08d}", "text": f"{i} {filler}"[:165]}) + "\n")
    return path.stat().st_size


# Runs `python -m tinyllm` and, at exit, writes its peak RSS (VmHWM of /proc/self/status, KiB) to a file.
# Not ru_maxrss: a child started with vfork + exec inherits its parent's high-water mark there.
_WRAPPER = """
import atexit, os, runpy, sys
def report():
    with open('/proc/self/status') as f:
        kib = next(line.split()[1] for line in f if line.startswith('VmHWM:'))
    with open(os.environ['BENCH_PEAK_FILE'], 'w') as f:
        f.write(kib)
atexit.register(report)
sys.argv = ['tinyllm', *sys.argv[1:]]
runpy.run_module('tinyllm', run_name='__main__', alter_sys=True)
"""


def run_map(root: Path, cwd: Path, base_url: str, concurrency: int) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS in bytes, stderr's last line) of one `tinyllm map` run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYLLM_", "OPENAI_", "AZURE_OPENAI"))}
    env.update(
        PYTHONPATH=str(root),
        TINYLLM_BASE_URL=base_url,
        TINYLLM_API_TYPE="openai",
        TINYLLM_CACHE_FILE_NAME=str(cwd / "cache.pickle"),
        BENCH_PEAK_FILE=str(cwd / "peak.txt"),
    )
    cmd = [
        sys.executable,
        "-c",
        _WRAPPER,
        "--prompts-dir",
        str(cwd / "prompts"),
        "map",
        "same",
        "-i",
        "in.jsonl",
        "-o",
        "out.jsonl",
        "-c",
        str(concurrency),
        "--cache",
        "--no-progress",
    ]
    started = time.monotonic()
    with open(cwd / "stderr.txt", "wb") as err:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err).returncode
    wall = time.monotonic() - started
    last = (cwd / "stderr.txt").read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return code, wall, int((cwd / "peak.txt").read_text()) * 1024, last[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated input sizes (default: %(default)s)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="--concurrency of the runs (default: %(default)s; a cache hit is CPU work, more threads "
        "than cores only fight over the GIL)",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose tinyllm runs (default: this one)")
    args = parser.parse_args()
    import fakeserver

    server = fakeserver.FakeOpenAIServer().start()
    server.reply_with("OK")
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, tinyllm from {args.root}\n")
    print("| rows | input | run | peak RSS | wall time | rows/s |")
    print("|---:|---:|---|---:|---:|---:|")
    try:
        for n in (int(x) for x in args.rows.split(",")):
            with tempfile.TemporaryDirectory(prefix="tinyllm-bench-") as tmp:
                cwd = Path(tmp)
                (cwd / "prompts").mkdir()
                (cwd / "prompts" / "same.system.md").write_text("You answer OK.\n", encoding="utf-8")
                (cwd / "prompts" / "same.user.md").write_text("Say OK.\n", encoding="utf-8")
                size = write_input(cwd / "in.jsonl", n)
                for label in ("fresh", "resume half", "nothing to do"):
                    if label == "resume half":  # keep the first half of the lines (streamed)
                        with open(cwd / "out.jsonl", "rb") as f, open(cwd / "half.jsonl", "wb") as half:
                            half.writelines(line for _, line in zip(range(n // 2), f))
                        os.replace(cwd / "half.jsonl", cwd / "out.jsonl")
                    code, wall, rss, last = run_map(args.root, cwd, server.base_url, args.concurrency)
                    if code != 0:
                        print(f"| {n:,} | | {label} | exit {code}: {last} | | |", flush=True)
                        continue
                    sent = n - n // 2 if label == "resume half" else n if label == "fresh" else 0
                    rate = f"{sent / wall:,.0f}" if sent else "-"
                    print(
                        f"| {n:,} | {size / 1e6:.0f} MB | {label} | {rss / 2**20:,.0f} MiB | {wall:.1f} s | {rate} |",
                        flush=True,
                    )
    finally:
        server.stop()
    print(f"\nrequests that reached the server: {len(server.chat_requests())} (the rest were cache hits)")


if __name__ == "__main__":
    main()
