"""Worker processes for tests/test_redis.py, forked from a warm "zygote" process.

``python tests/redis_worker.py`` imports openai and tinyllm and loads a tiktoken
encoding once, prints ``ready``, then reads one JSON job per line on stdin and forks
a worker for each (printing its pid): each worker is a real process of its own (own
memory, Redis connections, request queue) that starts in milliseconds. The zygote
has no threads, so forking it is safe; it exits at the end of its stdin.

A job is ``{"port": int, "args": {"base_url", "api_key", "threads", "messages": [str],
"settings": {configure() keys}}}``. The worker connects to 127.0.0.1:port, builds its
client, sends ``ready\\n``, waits for ``go\\n`` (so all workers start together), sends
the messages (``threads`` at a time) and answers one JSON line:
``{"calls": [[status, text], ...], "cached_calls": int}``, status ``ok`` or the error's class name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import openai  # noqa: F401  (loaded once, in the zygote)

from tinyllm import configure, count_tokens, usage_stats
from tinyllm.clients.openai import OpenAIClient


def work(port: int, args: dict) -> None:
    """One worker's life (see the module docstring)."""
    configure(**args["settings"])
    client = OpenAIClient(base_url=args["base_url"], api_key=args["api_key"])
    cfg = client.settings()
    client.queue._cluster(cfg)  # connect to Redis and build the SDK client before the start
    client.sdk(cfg)
    with socket.create_connection(("127.0.0.1", port)) as conn, conn.makefile("rwb") as f:
        f.write(b"ready\n")
        f.flush()
        if f.readline() != b"go\n":
            return

        def one(text: str) -> list:
            try:
                return ["ok", client.send_message([{"role": "user", "content": text}])["content"]]
            except Exception as exc:  # reported, not raised
                return [type(exc).__name__, str(exc)]

        with ThreadPoolExecutor(args["threads"]) as pool:
            calls = list(pool.map(one, args["messages"]))
        f.write(json.dumps({"calls": calls, "cached_calls": usage_stats()["cached_calls"]}).encode() + b"\n")
        f.flush()


def main() -> None:
    count_tokens("warm up", "gpt-4o-mini")  # the encoding, loaded once
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 0
            try:
                work(job["port"], job["args"])
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
