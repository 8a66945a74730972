#!/usr/bin/env python3
"""One chat at a time after a burst (issue 15): the time to the first token of lone chats in
a served server, and what the batch loop did for each.

The model is benchmarks/chat_http.py's (Qwen2.5-3B shape, random weights, fp16, SmolLM2's
tokenizer and chat template; ``--tiny``: the toy size in fp32 on the CPU). For each variant a
fresh server (``python -m agile_rag`` on loopback, the LLM ``device: cuda``, uncapped) gets a
burst of 32 chats, then four lone chats of ~220-token prompts, then lone chats of ~60, ~900,
~60 and ~900 tokens; every prompt is new to the server (the chat template's first block is
all they share), each chat asks ``--new-tokens`` tokens and waits for the loop to end (its
idle warm-up included) before the next. Per chat: time to the first content chunk over HTTP,
and the loop's figures from ``/debug/traces`` (prefill or chunk seconds, prefix hits, graph
captures on the request path and while idle, new allocator segments).

Variants: ``default`` (the default liveconfigs), ``noprefix`` (``llm_params.prefix_cache_tokens``
0: no prompt starts from a stored prefix).

    python3 benchmarks/lone_chats.py --tokenizers .gpucarry --out $OUT          # GPU
    .venv/bin/python benchmarks/lone_chats.py --tiny --out /tmp/lone-chats      # CPU

Writes ``lone-chats-<gpu or tiny>.json`` and ``.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import chat_http as ch  # noqa: E402 - this folder's module, on the path just above

SEQUENCE = [("burst 32", 220, 32)] + [("lone 220", 220, 1)] * 4 + \
    [("lone 60", 60, 1), ("lone 900", 900, 1), ("lone 60", 60, 1), ("lone 900", 900, 1)]
KEYS = ("admit_s", "chunk_s", "prefills", "lean_prefills", "prefill_chunks", "prefix_hits",
        "prefix_hit_tokens", "captures", "warm_captures", "warm_chunk_captures",
        "device_allocs", "steps", "decode_s", "seconds")
VARIANTS = {"default": {}, "noprefix": {"prefix_cache_tokens": 0}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tokenizers", default=None)
    p.add_argument("--variants", default="default,noprefix,default",
                   help="comma-separated, one fresh server each: " + ", ".join(VARIANTS))
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--work", default="/tmp/lone-chats")
    a = p.parse_args(argv)
    bad = [v for v in a.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant {bad[0]!r}: one of {', '.join(VARIANTS)}")
    return a


def one_server(folder: str, a, variant: str, texts, cuda: bool, work: str) -> list[dict]:
    from _server import start_server, stop_servers, wait_ready

    live = {"standby_llms": ["llm"],
            "llms": {"llm": {"llm_path": folder, "device": "cuda" if cuda else "cpu",
                             "max_tokens": 4096, "dtype": "float16" if cuda else "float32"}},
            "llm_params": {"default_temp": 0, "max_batch_size": 64, "batch_kv_tokens": 16384,
                           **VARIANTS[variant]}}
    cfg = f"TOTAL_CUDA_MEMORY = 0\nMEMORY_REDUNDANCY = 0.0\nADMIN_KEY = {ch.ADMIN_KEY!r}\n"
    proc, base, _ = start_server(work, live, cfg)
    out = []
    try:
        wait_ready(base, proc, timeout=400)
        for name, n_tokens, chats in SEQUENCE:
            b = ch.timed_burst(base, [texts(n_tokens) for _ in range(chats)], a.new_tokens)
            loop = b.get("loop") or {}
            out.append({"chat": name, "ttft_p50_s": round(b["ttft_p50_s"], 4),
                        "loop": {k: loop[k] for k in KEYS if loop.get(k)}})
    finally:
        stop_servers([proc])
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    ch.import_project()
    import torch
    cuda = torch.cuda.is_available() and not a.tiny
    folder, info = ch.model_in_work(a)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    counter = iter(range(10_000))

    def texts(n_tokens: int) -> str:            # every prompt new to the server
        return ch.prompt_text(tok, n_tokens, next(counter))
    runs = []
    for i, variant in enumerate(a.variants.split(",")):
        chats = one_server(folder, a, variant, texts, cuda, os.path.join(a.work, f"s{i}"))
        runs.append({"variant": variant, "chats": chats})
        print(json.dumps(runs[-1]), flush=True)
        write(runs, a, info, cuda)             # after each server: a cut call keeps its runs


def write(runs: list[dict], a, info: dict, cuda: bool) -> None:
    slug = "tiny" if a.tiny else (info["gpu"] or "cpu").lower().replace("nvidia ", "") \
        .replace(" ", "-")
    r = {"device": info["gpu"] or "cpu", "versions": info["versions"], "args": vars(a),
         "command": " ".join(["python3"] + sys.argv), "runs": runs}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"lone-chats-{slug}.json"), "w") as f:
        json.dump(r, f, indent=1)
    lines = [f"# Lone chats after a burst: {r['device']}", "", "Command:", "", "```",
             r["command"], "```", "",
             "Time to first token (s) of each chat, by server (variant); the loop's prefill "
             "or chunk seconds; `cap` graph captures on the request path, `warm` decode "
             "graphs captured while idle after it; `hit` prefix tokens read from the store.",
             "", "| chat | " + " | ".join(f"{x['variant']} ({i})" for i, x in
                                           enumerate(runs)) + " |",
             "| --- |" + " --- |" * len(runs)]
    for j, (name, _, _) in enumerate(SEQUENCE):
        cells = []
        for x in runs:
            c = x["chats"][j] if j < len(x["chats"]) else None
            if c is None:
                cells.append("-")
                continue
            lp = c["loop"]
            read = lp.get("admit_s") or lp.get("chunk_s") or 0
            extra = [f"read {read:.3f}"]
            for k, tag in (("prefix_hit_tokens", "hit"), ("captures", "cap"),
                           ("warm_captures", "warm")):
                if lp.get(k):
                    extra.append(f"{tag} {lp[k]}")
            cells.append(f"{c['ttft_p50_s']:.4f} ({', '.join(extra)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    by = {}
    for x in runs:
        for j, c in enumerate(x["chats"]):
            by.setdefault((x["variant"], SEQUENCE[j][0]), []).append(c["ttft_p50_s"])
    lines += ["", "Median time to first token by variant and chat (all such chats of all "
              "servers of that variant):", "", "| variant | chat | TTFT median (min..max) | n |",
              "| --- | --- | --- | --- |"]
    for (v, name), xs in by.items():
        lines.append(f"| {v} | {name} | {statistics.median(xs):.4f} ({min(xs):.4f}.."
                     f"{max(xs):.4f}) | {len(xs)} |")
    with open(os.path.join(a.out, f"lone-chats-{slug}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
