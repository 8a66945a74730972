"""The GPU queries workload of issue 14, simulated in one process on a CPU: does a burst split
into two waves (``split_burst_rows``) keep the GPU and the event loop busy at the same time?

    .venv/bin/python benchmarks/encoder_waves_sim.py --loop-us 100,200 --split 0,64

The real EmbedderActor (MiniLM loaded, its job loop, tokenizer and pool) on a simulated GPU
(tests/support.py's FakeResidency says "cuda", so a job runs two forwards in flight). Each
forward holds the GIL for ``--launch-ms`` (Python launching a 24-layer model's kernels) under
the backend's launch lock while the one simulated stream starts on it, and ends
``--fwd-ms + --row-ms x rows`` after the stream got to it, or when its launch ends if that is
later; it returns zeros. The defaults approximate bge-large's direct ``encode`` on the H200
(24, 28, 39 and 72 ms for 64, 128, 256 and 512 texts there; here 10/10/35/68). 256
closed-loop clients each spend ``--loop-us`` of event-loop CPU per request (HTTP parse and
reply, half before the ask, half after) and send again at once. Prints requests/s, the mean
rows per forward and the ratio to the best a direct encode of batch 512 would do.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def spin(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def run(split: int, args) -> dict:
    import numpy as np
    from test_encoder_batching import spec, started

    from agile_rag.actors.embedder_actor import EmbedderActor
    from agile_rag.actors.messages import Embed

    emb = EmbedderActor(spec("embedder", "emb", device="cuda"), {"split_burst_rows": split})
    system = await started(emb, arbiter_mb=4000, gpu="cuda")
    rows: list[int] = []
    gpu_free = [0.0]                 # when the one simulated stream finishes what is queued

    def fake_forward(batch):
        n = len(batch.pieces)
        rows.append(n)
        with emb.engine.launch:      # kernels queued in launch order, run one after another
            start = max(time.monotonic(), gpu_free[0])       # the GPU runs them as they come
            spin(1000 * args.launch_ms)
            done_at = max(time.monotonic(), start + (args.fwd_ms + args.row_ms * n) / 1e3)
            gpu_free[0] = done_at
        time.sleep(max(0.0, done_at - time.monotonic()))       # the wait for the result
        return np.zeros((n, 384), dtype=np.float32)

    emb._encode = fake_forward
    texts = [f"query {i} about the harbour and its boats" for i in range(args.clients)]
    done = 0
    stop = time.monotonic() + args.seconds

    async def client(i: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            spin(args.loop_us / 2)
            await emb.ask(Embed(texts=[texts[i]]), timeout=60)
            spin(args.loop_us / 2)
            await asyncio.sleep(0)
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    wall = time.monotonic() - t0
    await system.stop_all()
    direct = 512 / (max(args.launch_ms, args.fwd_ms + args.row_ms * 512) / 1000)
    return {"per_s": done / wall, "rows_mean": sum(rows) / max(len(rows), 1),
            "forwards": len(rows), "ratio": done / wall / direct}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loop-us", default="100,200", help="event-loop CPU per request (us)")
    ap.add_argument("--split", default="0,64", help="split_burst_rows values")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--launch-ms", type=float, default=10.0)
    ap.add_argument("--fwd-ms", type=float, default=2.0)
    ap.add_argument("--row-ms", type=float, default=0.13)
    args = ap.parse_args()
    for us in (float(x) for x in args.loop_us.split(",")):
        for split in (int(x) for x in args.split.split(",")):
            args.loop_us = us
            r = asyncio.run(run(split, args))
            print(f"loop {us:g} us/request, split_burst_rows {split}: {r['per_s']:,.0f} "
                  f"requests/s ({r['ratio']:.2f} of direct batch 512), {r['forwards']} "
                  f"forwards of {r['rows_mean']:.0f} rows on average", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
