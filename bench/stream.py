"""Benchmark: streaming, tinyllm against the raw openai SDK and raw llama-cpp-python.

Run from a checkout: ``python bench/stream.py`` (``--rounds 50`` for a quicker run;
``--no-local`` skips the embedded model). Prints Markdown tables; asserts nothing.

1. The loopback server of ``tests/fakeserver.py`` streams the same 40-word reply
   (one chunk per word, ``--delay`` seconds between chunks, default 2 ms) to
   - the raw SDK: ``openai.OpenAI(...).chat.completions.create(..., stream=True)``, iterated;
   - tinyllm: ``LLMCall.stream(...)`` iterated (templates, settings, queue slot, retry
     loop until the first chunk, chunk assembly, usage, Response).
   Each round runs both, in alternating order. Time to first token (first non-empty
   content delta) and total time (the stream read to its end), medians in ms, and
   tinyllm's difference in %.
2. The embedded SmolLM2 model streams a reply of up to ``--local-tokens`` tokens through
   raw ``llama_cpp.Llama.create_chat_completion(stream=True)`` and through
   ``LLMCall.stream`` on ``LlamaCppClient`` (the same loaded model, same parameters).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
if importlib.util.find_spec("tinyllm") is None:
    sys.path.insert(0, str(ROOT))

from fakeserver import FakeOpenAIServer, Reply, Stream  # noqa: E402

WORDS = " ".join(f"word{i}" for i in range(40))
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say forty words."}]


def timed(deltas) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    for delta in deltas:
        if first is None and delta:
            first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


def raw_sdk(sdk):
    for chunk in sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content


def row(name: str, ttft: list[float], total: list[float], base: tuple[float, float] | None) -> str:
    t, w = statistics.median(ttft), statistics.median(total)
    if base is None:
        return f"| {name} | {t * 1000:.2f} | {w * 1000:.2f} | | |"
    return f"| {name} | {t * 1000:.2f} | {w * 1000:.2f} | {100 * (t / base[0] - 1):+.1f}% | {100 * (w / base[1] - 1):+.1f}% |"


def server_table(rounds: int, delay: float) -> None:
    import openai

    from tinyllm import LLMCall, OpenAIClient

    with FakeOpenAIServer() as server, tempfile.TemporaryDirectory() as folder:
        Path(folder, "s.system.md").write_text("You are terse.\n", encoding="utf-8")
        Path(folder, "s.user.md").write_text("Say forty words.\n", encoding="utf-8")
        sdk = openai.OpenAI(base_url=server.base_url, api_key="sk-bench-000000000000", max_retries=0)
        call = LLMCall(
            "s", prompts_dir=folder, client=OpenAIClient(base_url=server.base_url, api_key="sk-bench-000000000000")
        )
        paths = {"raw openai SDK": lambda: raw_sdk(sdk), "tinyllm LLMCall.stream": lambda: call.stream()}
        results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in paths}
        for i in range(rounds + 5):
            order = list(paths) if i % 2 == 0 else list(reversed(paths))
            for name in order:
                server.enqueue(Stream(Reply(WORDS), delay=delay))
                first, total = timed(paths[name]())
                if i >= 5:  # warm-up rounds not counted
                    results[name][0].append(first)
                    results[name][1].append(total)
    base = tuple(statistics.median(v) for v in results["raw openai SDK"])
    print(f"\nLoopback server, 40 chunks {delay * 1000:g} ms apart, {rounds} rounds (median ms):\n")
    print("| path | time to first token | total | TTFT vs SDK | total vs SDK |")
    print("|---|---:|---:|---:|---:|")
    for name, (ttft, total) in results.items():
        print(row(name, ttft, total, None if name == "raw openai SDK" else base))  # type: ignore[arg-type]


def local_table(rounds: int, tokens: int) -> None:
    from tinyllm import LLMCall, LlamaCppClient
    from tinyllm.clients.llamacpp import DEFAULT_PARAMS

    client = LlamaCppClient(max_tokens=tokens, temperature=0)
    llm, lock = client.model(client.settings())
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "s.system.md").write_text("You are terse.\n", encoding="utf-8")
        Path(folder, "s.user.md").write_text("Say forty words.\n", encoding="utf-8")
        call = LLMCall("s", prompts_dir=folder, client=client)

        def raw():
            with lock:
                for chunk in llm.create_chat_completion(
                    messages=MESSAGES,
                    stream=True,
                    max_tokens=tokens,
                    temperature=0,
                    repeat_penalty=DEFAULT_PARAMS["repeat_penalty"],
                ):
                    delta = chunk["choices"][0]["delta"].get("content")
                    if delta:
                        yield delta

        paths = {"raw llama-cpp-python": raw, "tinyllm LLMCall.stream": lambda: call.stream()}
        results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in paths}
        for i in range(rounds + 1):
            for name in list(paths) if i % 2 == 0 else list(reversed(paths)):
                first, total = timed(paths[name]())
                if i >= 1:
                    results[name][0].append(first)
                    results[name][1].append(total)
    base = tuple(statistics.median(v) for v in results["raw llama-cpp-python"])
    print(f"\nEmbedded SmolLM2-135M, up to {tokens} tokens, {rounds} rounds (median ms):\n")
    print("| path | time to first token | total | TTFT vs raw | total vs raw |")
    print("|---|---:|---:|---:|---:|")
    for name, (ttft, total) in results.items():
        print(row(name, ttft, total, None if name == "raw llama-cpp-python" else base))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.002, help="seconds between chunks (default 0.002)")
    parser.add_argument("--local-rounds", type=int, default=10)
    parser.add_argument("--local-tokens", type=int, default=32)
    parser.add_argument("--no-local", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TINYLLM_FILE_CHECK_INTERVAL", "1")
    server_table(args.rounds, args.delay)
    if not args.no_local:
        local_table(args.local_rounds, args.local_tokens)


if __name__ == "__main__":
    main()
