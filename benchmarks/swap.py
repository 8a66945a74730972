#!/usr/bin/env python3
"""Swap benchmark: GPU residency by admit/evict (issue 3, VRAMArbiter).

Measures, in ONE run on one GPU:
  1. the pinned host->device copy rate of one flat buffer of the LLM's size;
  2. WeightResidency.admit of each model as a fraction of that rate (target >= 0.90), and evict time
     (target <= 20 ms);
  3. the seed's RAG cycle (chat 128 tokens -> embed one query -> rerank 100 passages -> chat 128 tokens)
     with the three models swapped in and out under an 8 GiB cap vs all three resident uncapped
     (target: capped / uncapped <= 1.10).

Models have real shapes and random weights, built on the device (no downloads): a Qwen2.5-3B-shaped
fp16 LLM (6.17 GB), an XLM-R-large-shaped embedder (bge-m3) and cross-encoder (bge-reranker-v2-m3).

    python3 benchmarks/swap.py --out benchmarks/results            # full run (CUDA)
    python3 benchmarks/swap.py --small --out /tmp/swap             # tiny shapes; CPU-only smoke too
    python3 benchmarks/swap.py --render benchmarks/results/swap-X.json   # PNG + markdown from a JSON

The cap is torch.cuda.set_per_process_memory_fraction(cap / total): it limits PyTorch's allocator, not
the CUDA context, which a real 8 GB card also has to hold.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections import OrderedDict

GiB = 1 << 30
MiB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for swap-<gpu>.json, .md, .png")
    p.add_argument("--small", action="store_true", help="tiny shapes: a quick smoke run (CPU-only works)")
    p.add_argument("--cap-gib", type=float, default=None,
                   help="VRAM cap of the capped cycle (default 8; --small: sized to force swaps)")
    p.add_argument("--cycles", type=int, default=3, help="timed cycles per mode (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed cycles per mode first")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each copy/admit/evict figure")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per chat")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--query-tokens", type=int, default=24)
    p.add_argument("--passages", type=int, default=100)
    p.add_argument("--passage-tokens", type=int, default=512,
                   help="tokens per 768-char passage before truncation (Chinese text ~1.4 chars/token "
                        "with XLM-R's tokenizer overflows 512; English ~4 chars/token gives ~190)")
    p.add_argument("--max-length", type=int, default=512, help="query+passage truncation")
    p.add_argument("--batch", type=int, default=32, help="rerank batch size")
    p.add_argument("--slack-mib", type=int, default=256,
                   help="kept free under the cap for fragmentation and stray allocations")
    p.add_argument("--alloc-conf", default="expandable_segments:True",
                   help="PYTORCH_CUDA_ALLOC_CONF for this run ('' for PyTorch's default); "
                        "an already set environment variable wins")
    p.add_argument("--no-probe", action="store_true", help="skip the allocator fragmentation probe")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip timing one chat resident/uncapped vs resident/capped vs freshly admitted")
    p.add_argument("--time-budget-s", type=float, default=0,
                   help="if > 0, fewer timed cycles (never under 2) when the first cycle says they won't fit")
    p.add_argument("--render", metavar="JSON", help="only render PNG + markdown from a result JSON")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # child of the probe
    p.add_argument("--probe-sizes", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


ARGS = parse_args()
if not ARGS.render and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and ARGS.alloc_conf:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ARGS.alloc_conf  # must precede CUDA's first allocation

if not ARGS.render:
    import torch  # noqa: E402
    import torch.nn.functional as F  # noqa: E402


def now() -> float:
    return time.perf_counter()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- allocator probe
def probe_child(sizes: str) -> int:
    """Runs in a subprocess: the swap pattern of one capped cycle with raw allocations."""
    llm, enc, cap = (int(x) for x in sizes.split(","))
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total)
    res = {"alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}

    def alloc(n):
        return torch.empty(n, dtype=torch.uint8, device="cuda")
    try:
        a = alloc(llm)                    # chat: LLM resident
        b = alloc(enc)                    # embed: embedder admitted beside it
        del a                             # rerank: LLM evicted ...
        c = alloc(enc)                    # ... reranker admitted (best fit: inside the LLM's old block)
        del b                             # chat: embedder evicted ...
        t0 = now()
        a = alloc(llm)                    # ... LLM admitted again
        res["readmit_llm"] = "ok"
        res["readmit_alloc_ms"] = (now() - t0) * 1e3
        del a, c
    except torch.cuda.OutOfMemoryError as e:
        res["readmit_llm"] = "OOM"
        res["error"] = str(e).split("\n")[0][:300]
    torch.cuda.empty_cache()
    try:
        x = alloc(cap + 256 * MiB)        # the cap must really bind
        del x
        res["cap_enforced"] = False
    except torch.cuda.OutOfMemoryError:
        res["cap_enforced"] = True
    print("PROBE " + json.dumps(res))
    return 0


def run_probe(llm_bytes, enc_bytes, cap_bytes):
    out = {}
    for conf in ("", "expandable_segments:True"):
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf)
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe",
                                "--probe-sizes", f"{llm_bytes},{enc_bytes},{cap_bytes}"],
                               env=env, capture_output=True, text=True, timeout=120)
            line = [x for x in p.stdout.splitlines() if x.startswith("PROBE ")]
            out[conf or "default"] = json.loads(line[-1][6:]) if line else {"failed": p.stderr[-500:]}
        except Exception as e:  # the probe is evidence, never a reason to lose the run
            out[conf or "default"] = {"failed": repr(e)}
    return out


# --------------------------------------------------------------------------- models
def configs(small: bool):
    from transformers import Qwen2Config, XLMRobertaConfig
    if small:
        llm = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True,
                          max_position_embeddings=2048)
        enc = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, max_position_embeddings=1026)
    else:
        # Qwen2.5-3B: 3.09 B parameters, lm_head tied to the embedding -> 6.17 GB in fp16.
        llm = Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                          tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                          rms_norm_eps=1e-6)
        # XLM-R large as in bge-m3 / bge-reranker-v2-m3 (8194 positions): 568 M parameters.
        enc = dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096, max_position_embeddings=8194)
    enc.update(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    emb = XLMRobertaConfig(**enc)
    rer = XLMRobertaConfig(**enc, num_labels=1)
    return llm, emb, rer


def build(cls, cfg, device, dtype):
    with torch.device(device):
        m = cls._from_config(cfg, dtype=dtype)
    return m.eval()


def build_models(small, device, dtype):
    from transformers import Qwen2ForCausalLM, XLMRobertaForSequenceClassification, XLMRobertaModel
    try:
        from agile_rag.runtime.residency import WeightResidency
    except ImportError as e:
        raise SystemExit(f"cannot import agile_rag ({e}): `pip install -e .`, or put a folder holding an "
                         "`agile_rag` link to the repository root on PYTHONPATH")
    llm_cfg, emb_cfg, rer_cfg = configs(small)
    models, res, info = {}, {}, {}
    for name, cls, cfg in (("llm", Qwen2ForCausalLM, llm_cfg), ("embedder", XLMRobertaModel, emb_cfg),
                           ("reranker", XLMRobertaForSequenceClassification, rer_cfg)):
        t0 = now()
        m = build(cls, cfg, device, dtype)
        sync()
        t1 = now()
        r = WeightResidency(m)   # built on the GPU: copied straight into pinned host memory
        del m
        if device == "cuda":
            torch.cuda.empty_cache()
        t2 = now()
        models[name], res[name] = r.module, r
        info[name] = {"class": cls.__name__, "weight_bytes": r.weight_bytes,
                      "buffer_bytes": r.buffer_bytes, "tensors": r.num_tensors, "pinned": r.pinned,
                      "params": sum(p.numel() for p in r.module.parameters()),
                      "build_seconds": round(t1 - t0, 3), "pin_and_copy_seconds": round(t2 - t1, 3),
                      "attn_implementation": getattr(r.module.config, "_attn_implementation", None)}
        print(f"built {name}: {r.weight_bytes / 1e9:.3f} GB, {info[name]['tensors']} tensors, "
              f"build {t1 - t0:.1f}s, pin+copy {t2 - t1:.1f}s", flush=True)
    return models, res, info


# --------------------------------------------------------------------------- copy / admit / evict
def h2d_copy_seconds(host, dst, stream):
    t0 = now()
    with torch.cuda.stream(stream):
        dst.copy_(host, non_blocking=True)
    stream.synchronize()
    return now() - t0


def measure_moves(res, reps):
    llm_host = res["llm"].host_buffer
    dst = torch.empty(llm_host.numel(), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    h2d_copy_seconds(llm_host, dst, stream)  # warm
    out = {"copy": {}, "admit": {}, "evict": {}}
    llm_copy = []
    for name, r in res.items():
        host = r.host_buffer
        n = host.numel()
        same, adm, ev, adm_copy = [], [], [], []
        r.admit()
        r.evict()  # warm: the first admit pays cudaMalloc / page mapping
        for _ in range(reps):
            llm_copy.append(h2d_copy_seconds(llm_host, dst, stream))
            same.append(h2d_copy_seconds(host, dst[:n], stream))
            a = r.admit()
            adm.append(a["seconds"])
            adm_copy.append(a["copy_seconds"])
            ev.append(r.evict()["seconds"])
        out["admit"][name] = {"bytes": n, "seconds": adm, "copy_seconds_events": adm_copy,
                              "same_size_copy_seconds": same, "evict_seconds": ev}
    del dst
    torch.cuda.empty_cache()
    llm_n = llm_host.numel()
    rate = llm_n / statistics.median(llm_copy) / 1e9
    out["copy"] = {"bytes": llm_n, "seconds": llm_copy, "gbps_median": rate}
    for name, d in out["admit"].items():
        a_med = statistics.median(d["seconds"])
        d["gbps_median"] = d["bytes"] / a_med / 1e9
        d["fraction_of_llm_size_copy"] = d["gbps_median"] / rate
        d["fraction_of_same_size_copy"] = statistics.median(d["same_size_copy_seconds"]) / a_med
        d["overhead_ms_median"] = (a_med - statistics.median(d["copy_seconds_events"])) * 1e3
        out["evict"][name] = {"ms_median": statistics.median(d["evict_seconds"]) * 1e3,
                              "ms_max": max(d["evict_seconds"]) * 1e3}
    return out


# --------------------------------------------------------------------------- the RAG cycle
class Gpu:
    """The arbiter's decisions, inline: LRU eviction of idle models until the next one fits the cap."""

    def __init__(self, res, cuda, cap_bytes=None, slack_bytes=0):
        self.res, self.cuda, self.cap, self.slack = res, cuda, cap_bytes, slack_bytes
        self.lru: "OrderedDict[str, None]" = OrderedDict()  # resident, least recently used first
        self.events, self.t0, self.oom_retries = [], now(), 0
        for name, r in res.items():
            if r.on_gpu:
                self.lru[name] = None

    def resident_bytes(self):
        return sum(self.res[n].buffer_bytes for n in self.lru)

    def _event(self, name, what, t0, t1, **kw):
        self.events.append(dict(model=name, what=what, start=t0 - self.t0, end=t1 - self.t0, **kw))

    def admit(self, name):
        t0 = now()
        info = self.res[name].admit() if self.cuda else {"bytes": self.res[name].buffer_bytes}
        self._event(name, "admit", t0, now(), bytes=info["bytes"], copy_seconds=info.get("copy_seconds"))
        self.lru[name] = None

    def evict(self, name):
        t0 = now()
        if self.cuda:
            self.res[name].evict()
        self._event(name, "evict", t0, now())
        del self.lru[name]

    def acquire(self, name, work_bytes):
        if name in self.lru:
            self.lru.move_to_end(name)
            return
        if self.cap is not None:
            need = self.res[name].buffer_bytes + work_bytes
            while self.lru and self.resident_bytes() + need > self.cap - self.slack:
                self.evict(next(iter(self.lru)))
        self.admit(name)

    def run(self, name, fn, work_bytes=0, measure=None):
        for attempt in (0, 1):
            try:
                self.acquire(name, work_bytes)
                if measure is not None and self.cuda:
                    sync()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                t0 = now()
                with torch.inference_mode():
                    fn()
                sync()
                t1 = now()
                if measure is not None and self.cuda:
                    peak = torch.cuda.max_memory_allocated() - before
                    measure[name] = max(measure.get(name, 0), peak)
                break
            except torch.cuda.OutOfMemoryError:
                if attempt or not self.cuda:
                    raise
                self.oom_retries += 1   # counted and reported: evict every other model and retry
                self._event(name, "oom", now(), now())
                for other in [n for n in self.lru if n != name]:
                    self.evict(other)
                torch.cuda.empty_cache()
        self._event(name, "compute", t0, t1)
        self.lru.move_to_end(name)


def make_workload(args, device, llm_vocab, enc_vocab):
    g = torch.Generator(device="cpu").manual_seed(1234)
    prompt = torch.randint(3, llm_vocab, (1, args.prompt_tokens), generator=g).to(device)
    query = torch.randint(5, enc_vocab, (1, args.query_tokens), generator=g).to(device)
    seq = min(args.max_length, args.query_tokens + args.passage_tokens + 3)
    pairs = torch.randint(5, enc_vocab, (args.passages, seq), generator=g).to(device)
    pairs[:, 0], pairs[:, -1] = 0, 2   # <s> ... </s>
    return prompt, query, pairs


def jobs(models, args, workload):
    prompt, query, pairs = workload
    llm, emb, rer = models["llm"], models["embedder"], models["reranker"]
    n = args.new_tokens

    def chat():
        out = llm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=1)
        assert out.shape[1] == prompt.shape[1] + n, out.shape

    def embed():
        h = emb(input_ids=query, attention_mask=torch.ones_like(query)).last_hidden_state[:, 0]
        F.normalize(h.float(), dim=-1).cpu()

    def rerank():
        scores = []
        for i in range(0, pairs.shape[0], args.batch):
            b = pairs[i:i + args.batch]
            scores.append(torch.sigmoid(rer(input_ids=b, attention_mask=torch.ones_like(b)).logits.float()
                                        .view(-1)))
        s = torch.cat(scores).cpu()
        assert s.shape[0] == pairs.shape[0]

    return [("llm", chat), ("embedder", embed), ("reranker", rerank), ("llm", chat)]


def alloc_stats():
    if not torch.cuda.is_available():
        return {}
    st = torch.cuda.memory_stats()
    return {k: st.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                      "num_sync_all_streams", "num_ooms")}


def run_ablation(res, chat, frac, rounds=3):
    """One chat, LLM alone on the GPU: uncapped, capped, and capped right after a fresh admit."""
    out = {"resident_uncapped": [], "resident_capped": [], "fresh_admit_capped": []}
    for n, r in res.items():
        if n != "llm":
            r.evict()
    res["llm"].admit()
    gc.collect()
    torch.cuda.empty_cache()
    for _ in range(rounds):
        for key in out:
            torch.cuda.set_per_process_memory_fraction(1.0 if key == "resident_uncapped" else frac)
            if key == "fresh_admit_capped":
                res["llm"].evict()
                res["llm"].admit()
            sync()
            t0 = now()
            with torch.inference_mode():
                chat()
            sync()
            out[key].append(now() - t0)
    torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def run_cycles(gpu, steps, n, work=None, measure=None):
    out = []
    for _ in range(n):
        gpu.events, gpu.t0 = [], now()
        for name, fn in steps:
            gpu.run(name, fn, (work or {}).get(name, 0), measure)
        secs = now() - gpu.t0
        out.append({"seconds": secs, "events": gpu.events})
    return out


def summarize(cycles):
    secs = [c["seconds"] for c in cycles]
    med = statistics.median(secs)
    mid = min(cycles, key=lambda c: abs(c["seconds"] - med))
    def total(c, what):
        return sum(e["end"] - e["start"] for e in c["events"] if e["what"] == what)
    return {"seconds": secs, "median": med,
            "admits_per_cycle": [sum(e["what"] == "admit" for e in c["events"]) for c in cycles],
            "evicts_per_cycle": [sum(e["what"] == "evict" for e in c["events"]) for c in cycles],
            "swap_seconds": [total(c, "admit") + total(c, "evict") for c in cycles],
            "compute_seconds": [total(c, "compute") for c in cycles],
            "median_cycle_events": mid["events"]}


# --------------------------------------------------------------------------- report
def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def render_png(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib absent: timeline kept in the JSON; render it with --render", flush=True)
        return False
    events = result["timeline"]["events"]
    models = ["llm", "embedder", "reranker"]
    colors = {"admit": "tab:green", "compute": "tab:blue", "evict": "tab:red", "oom": "black"}
    computes = [e for e in events if e["what"] == "compute"]
    # Zoom: from the end of the first chat to the start of the second chat's compute.
    z0 = computes[0]["end"] - 0.02 if computes else 0
    z1 = (computes[-1]["start"] + 0.05) if computes else result["timeline"]["cycle_seconds"]
    fig, axes = plt.subplots(2, 1, figsize=(12, 6.5))
    for ax, (lo, hi), title in ((axes[0], (0, result["timeline"]["cycle_seconds"]), "one capped cycle"),
                                (axes[1], (z0, z1), "zoom: swaps around embed and rerank")):
        for e in events:
            y = models.index(e["model"])
            w = max(e["end"] - e["start"], (hi - lo) / 2000)
            ax.barh(y, w, left=e["start"], color=colors[e["what"]], edgecolor="black", linewidth=0.3)
            label = e["what"] == "admit" or (ax is axes[1] and e["what"] != "oom")
            if lo <= e["start"] <= hi and label:
                left = e["what"] == "evict"   # evict labels end where the evict starts, admits begin there
                ax.text(e["start"], y + 0.42, f"{e['what']} {1e3 * (e['end'] - e['start']):.0f} ms ",
                        fontsize=7, va="bottom", ha="right" if left else "left")
        ax.set_xlim(lo, hi)
        ax.set_yticks(range(len(models)), models)
        ax.set_ylim(-0.75, len(models) - 0.1)
        ax.set_xlabel("seconds since cycle start")
        ax.set_title(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    axes[0].legend(handles, list(colors), loc="upper right", fontsize=8)
    c = result["cycle"]
    fig.suptitle(f"{result['gpu']}: capped {result['cap_gib']:g} GiB cycle {c['capped']['median']:.2f}s vs "
                 f"uncapped {c['uncapped']['median']:.2f}s (ratio {c['ratio']:.3f})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_md(result, path):
    t = result["targets"]
    c = result["cycle"]
    lines = [
        f"# Swap benchmark: {result['gpu']}", "",
        f"torch {result['torch']}, transformers {result['transformers']}, CUDA {result['cuda']}, "
        f"PYTORCH_CUDA_ALLOC_CONF=`{result['alloc_conf']}`, host memory "
        f"{'pinned' if all(m['pinned'] for m in result['models'].values()) else 'NOT pinned'}.", "",
        "Command:", "", "```", result["command"], "```", "",
        "| target | measured | goal | pass |", "| --- | --- | --- | --- |"]
    for k, v in t.items():
        lines.append(f"| {k} | {v['value']:.3f} | {v['goal']} | {'yes' if v['pass'] else 'NO'} |")
    if result.get("moves"):
        a, ev = result["moves"]["admit"], result["moves"]["evict"]
        cp = result["moves"]["copy"]
        lines += ["", f"Pinned host->device copy of one flat buffer of the LLM's size "
                  f"({cp['bytes'] / 1e9:.2f} GB): **{cp['gbps_median']:.1f} GB/s** "
                  f"(median of {len(cp['seconds'])}).", "",
                  "| model | weights GB | admit s (median) | admit GB/s | / LLM-size copy | / same-size copy | "
                  "admit overhead beyond the copy, ms | evict ms median / max |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, d in a.items():
            lines.append(f"| {name} | {d['bytes'] / 1e9:.3f} | {statistics.median(d['seconds']):.4f} | "
                         f"{d['gbps_median']:.1f} | {d['fraction_of_llm_size_copy']:.3f} | "
                         f"{d['fraction_of_same_size_copy']:.3f} | {d['overhead_ms_median']:.1f} | "
                         f"{ev[name]['ms_median']:.2f} / {ev[name]['ms_max']:.2f} |")
    w = c["workload"]
    lines += ["", f"RAG cycle: chat {w['new_tokens']} tokens from a {w['prompt_tokens']}-token prompt -> "
              f"embed a {w['query_tokens']}-token query -> rerank {w['passages']} pairs of "
              f"{w['pair_tokens']} tokens (batch {w['batch']}) -> chat {w['new_tokens']} tokens.", "",
              "| mode | cycle s (median) | all cycles | admits / evicts per cycle | swap s per cycle |",
              "| --- | --- | --- | --- | --- |"]
    for mode in ("uncapped", "capped"):
        s = c[mode]
        lines.append(f"| {mode} | {s['median']:.3f} | {', '.join(f'{x:.3f}' for x in s['seconds'])} | "
                     f"{s['admits_per_cycle']} / {s['evicts_per_cycle']} | "
                     f"{', '.join(f'{x:.3f}' for x in s['swap_seconds'])} |")
    lines += ["", f"Ratio capped / uncapped: **{c['ratio']:.3f}**. OOM retries in capped cycles: "
              f"{c['capped']['oom_retries']}. Work memory reserved per job (measured uncapped peak x1.2 "
              f"+ 32 MiB): " + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in c["work_bytes"].items()) + ".",
              "", "Job times (uncapped median cycle): " + ", ".join(
                  f"{e['model']} {e['end'] - e['start']:.3f}s" for e in c["uncapped"]["median_cycle_events"]
                  if e["what"] == "compute") + ".", ""]
    ins = c["capped"].get("in_cycle_admit")
    if ins:
        lines += ["Admits inside the capped cycles (median; the copy alone timed with CUDA events): " + "; ".join(
            f"{k} {1e3 * v['seconds_median']:.1f} ms (copy {1e3 * v['copy_seconds_median']:.1f} ms) = "
            f"{v['fraction_of_copy_rate']:.3f} of the copy rate" for k, v in ins.items()) + ".", ""]
    ab = result.get("ablation_chat_seconds")
    if ab:
        lines += ["One chat alone (LLM the only model on the GPU), seconds, rounds interleaved: " + "; ".join(
            f"{k} {statistics.median(v):.3f} ({', '.join(f'{x:.3f}' for x in v)})" for k, v in ab.items()) + ".",
            ""]
    lines += ["Cycles alternate between the modes (U C, then C U, ...); mode switches are untimed. "
              "Allocator events per capped cycle (retries / device allocs / device frees): " + ", ".join(
                  f"{a.get('num_alloc_retries', 0)}/{a.get('num_device_alloc', 0)}/{a.get('num_device_free', 0)}"
                  for a in c["capped"].get("alloc_stats", [])) + ".", ""]
    if result.get("fragmentation_probe"):
        lines += ["Allocator probe (raw allocations, the capped cycle's swap pattern, under the cap):", ""]
        for k, v in result["fragmentation_probe"].items():
            lines.append(f"- `{k}`: re-admit of the LLM: {v.get('readmit_llm', v)}; cap enforced: "
                         f"{v.get('cap_enforced')}")
        lines.append("")
    if result.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    lines.append("Timeline of one capped cycle: `swap-timeline.png`.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def render_all(json_path):
    with open(json_path) as f:
        result = json.load(f)
    folder = os.path.dirname(os.path.abspath(json_path))
    ok = render_png(result, os.path.join(folder, "swap-timeline.png"))
    write_md(result, os.path.join(folder, "swap.md"))
    print(f"rendered {'PNG and ' if ok else ''}markdown beside {json_path}")
    return 0


# --------------------------------------------------------------------------- main
def main(args):
    if args.render:
        return render_all(args.render)
    if args.probe:
        return probe_child(args.probe_sizes)
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        print("CUDA is absent (torch.cuda.is_available() is False): nothing to measure. "
              "Use --small for a CPU-only smoke run of the benchmark's logic.")
        return 0
    import transformers
    transformers.logging.set_verbosity_error()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    t_start = now()
    gpu_name = torch.cuda.get_device_name() if cuda else "cpu"
    total_mem = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    notes = []
    if args.small and args.new_tokens == 128:
        args.new_tokens, args.prompt_tokens, args.passages, args.passage_tokens = 8, 32, 10, 48
    print(f"device {gpu_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}", flush=True)

    models, res, model_info = build_models(args.small, device, dtype)
    llm_b, enc_b = res["llm"].buffer_bytes, max(res["embedder"].buffer_bytes, res["reranker"].buffer_bytes)
    if args.cap_gib is not None:
        cap = int(args.cap_gib * GiB)
    elif args.small:
        cap = llm_b + enc_b + enc_b // 2    # the LLM and one encoder fit, not all three
    else:
        cap = 8 * GiB
    slack = args.slack_mib * MiB if not args.small else 0

    probe = None
    if cuda and not args.small and not args.no_probe:
        probe = run_probe(llm_b, enc_b, cap)
        print("allocator probe:", json.dumps(probe), flush=True)

    moves = measure_moves(res, args.reps) if cuda else None
    if moves:
        print(f"pinned H2D copy, LLM size: {moves['copy']['gbps_median']:.1f} GB/s", flush=True)
        for n_, d in moves["admit"].items():
            print(f"  admit {n_}: {d['gbps_median']:.1f} GB/s = {d['fraction_of_llm_size_copy']:.3f} of it "
                  f"({d['fraction_of_same_size_copy']:.3f} of a same-size copy); evict "
                  f"{moves['evict'][n_]['ms_median']:.2f} ms (max {moves['evict'][n_]['ms_max']:.2f})",
                  flush=True)

    workload = make_workload(args, device, models["llm"].config.vocab_size,
                             models["embedder"].config.vocab_size)
    steps = jobs(models, args, workload)

    # (b) all three resident, uncapped, and (a) capped, the models taking turns under the cap.
    # The two modes alternate cycle by cycle (U C C U U C ...), so drift in the machine's speed falls
    # on both alike; switching modes is untimed and leaves the capped residents as the last capped
    # cycle left them, with the allocator's cache trimmed (a steady 8 GiB card's state).
    frac = min(1.0, cap / total_mem) if cuda else 1.0
    unc_gpu = Gpu(res, cuda)
    cap_gpu = Gpu(res, cuda, cap_bytes=cap, slack_bytes=slack)
    cap_state: list = []

    def enter(mode):
        if mode == "uncapped":
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
                for r in res.values():
                    r.admit()
            unc_gpu.lru = OrderedDict((n, None) for n in res)
            return unc_gpu
        for n, r in res.items():
            if n not in cap_state:
                r.evict()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(frac)
        cap_gpu.lru = OrderedDict((n, None) for n in cap_state)
        return cap_gpu

    def one(mode, work=None, measure=None):
        nonlocal cap_state
        g = enter(mode)
        gc.collect()
        before = alloc_stats()
        c = run_cycles(g, steps, 1, work, measure)[0]
        c["alloc"] = {k: v - before.get(k, 0) for k, v in alloc_stats().items()}
        if mode == "capped":
            cap_state = list(g.lru)
        return c

    peaks = {}
    tw = now()
    one("uncapped", measure=peaks)   # job memory peaks are measured here, not in timed cycles
    per_cycle = now() - tw
    work = {k: int(peaks.get(k, 0) * 1.2) + 32 * MiB if cuda else 0 for k in res}
    for i in range(max(1, args.warmup)):
        if i:
            one("uncapped")
        last = one("capped", work)
    per_cycle = last["seconds"]   # a warm cycle (the very first one also pays one-time start-up costs)
    if args.time_budget_s > 0:
        left = args.time_budget_s - (now() - t_start) - (30 * 9 / 128 * args.new_tokens if cuda else 0)
        fit = int(left / (per_cycle * 1.15)) // 2
        if fit < args.cycles:
            notes.append(f"timed cycles cut from {args.cycles} to {max(2, fit)} per mode to fit "
                         f"--time-budget-s {args.time_budget_s:g} (one cycle took {per_cycle:.1f}s)")
            args.cycles = max(2, fit)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    unc, cap_c = [], []
    for i in range(args.cycles):
        for mode in (("uncapped", "capped") if i % 2 == 0 else ("capped", "uncapped")):
            if mode == "uncapped":
                unc.append(one("uncapped"))
            else:
                cap_c.append(one("capped", work))
        print(f"  round {i}: uncapped {unc[-1]['seconds']:.3f}s, capped {cap_c[-1]['seconds']:.3f}s", flush=True)
    unc_s, cap_s = summarize(unc), summarize(cap_c)
    for s_, cs in ((unc_s, unc), (cap_s, cap_c)):
        s_["alloc_stats"] = [c["alloc"] for c in cs]
        s_["job_seconds"] = [[round(e["end"] - e["start"], 4) for e in c["events"] if e["what"] == "compute"]
                             for c in cs]
    cap_s["oom_retries"] = cap_gpu.oom_retries
    if moves:   # admits inside the capped cycles, against the same copy rate as the isolated figures
        ins = {}
        for n in res:
            evs = [e for c in cap_c for e in c["events"] if e["model"] == n and e["what"] == "admit"]
            if evs:
                sec = statistics.median(e["end"] - e["start"] for e in evs)
                cp = statistics.median(e["copy_seconds"] for e in evs)
                gbps = res[n].buffer_bytes / sec / 1e9
                ins[n] = {"count": len(evs), "seconds_median": sec, "copy_seconds_median": cp, "gbps": gbps,
                          "fraction_of_copy_rate": gbps / moves["copy"]["gbps_median"]}
        cap_s["in_cycle_admit"] = ins
    if cuda:
        cap_s["max_reserved_bytes_any_mode"] = torch.cuda.max_memory_reserved()
    print(f"uncapped cycles: {[round(x, 3) for x in unc_s['seconds']]}; work peaks MiB "
          f"{ {k: round(v / MiB) for k, v in peaks.items()} }", flush=True)
    print(f"capped cycles: {[round(x, 3) for x in cap_s['seconds']]}", flush=True)

    ablation = None
    if cuda and not args.no_ablation:
        ablation = run_ablation(res, steps[0][1], frac, rounds=3)
        print("ablation (chat seconds):", json.dumps({k: [round(x, 3) for x in v] for k, v in ablation.items()}),
              flush=True)
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
    ratio = cap_s["median"] / unc_s["median"]
    print(f"capped cycles: {[round(x, 3) for x in cap_s['seconds']]}; ratio {ratio:.3f}", flush=True)

    result = {
        "command": " ".join(["python3"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "gpu": gpu_name, "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "small": args.small, "cap_gib": cap / GiB, "total_gpu_bytes": total_mem,
        "slack_bytes": slack, "models": model_info, "moves": moves,
        "cycle": {"workload": {"new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                               "query_tokens": args.query_tokens, "passages": args.passages,
                               "pair_tokens": workload[2].shape[1], "batch": args.batch,
                               "dtype": str(dtype), "warmup": args.warmup, "cycles": args.cycles},
                  "work_bytes": work, "uncapped": unc_s, "capped": cap_s, "ratio": ratio},
        "timeline": {"cycle_seconds": cap_s["median"], "events": cap_s["median_cycle_events"]},
        "fragmentation_probe": probe, "ablation_chat_seconds": ablation, "wall_seconds": None,
        "notes": notes,
    }
    targets = {}
    if moves:
        for n_ in res:
            f = moves["admit"][n_]["fraction_of_llm_size_copy"]
            targets[f"admit {n_} / pinned copy rate"] = {"value": f, "goal": ">= 0.90", "pass": f >= 0.90}
        e = moves["evict"]["llm"]["ms_max"]
        targets["evict llm ms (max)"] = {"value": e, "goal": "<= 20", "pass": e <= 20}
    targets["RAG cycle capped / uncapped"] = {"value": ratio, "goal": "<= 1.10", "pass": ratio <= 1.10}
    result["targets"] = targets
    if cap_s["oom_retries"]:
        notes.append(f"{cap_s['oom_retries']} capped job(s) hit OOM and were retried after evicting every "
                     "other model and emptying the cache (their time is in the cycle).")
    if not cuda:
        notes.append("CPU-only smoke: no admits/evicts happen, the cap is only accounted.")
    result["wall_seconds"] = now() - t_start

    os.makedirs(args.out, exist_ok=True)
    base = "swap-small-" if args.small else "swap-"
    jpath = os.path.join(args.out, f"{base}{slug(gpu_name)}.json")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1)
    if not args.small:
        render_png(result, os.path.join(args.out, "swap-timeline.png"))
        write_md(result, os.path.join(args.out, "swap.md"))
    else:
        write_md(result, os.path.join(args.out, "swap-small.md"))
    print("\n| target | value | goal | pass |")
    for k, v in targets.items():
        print(f"| {k} | {v['value']:.3f} | {v['goal']} | {'yes' if v['pass'] else 'NO'} |")
    print(f"wrote {jpath} (run took {result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
