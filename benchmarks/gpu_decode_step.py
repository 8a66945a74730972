"""The GPU decode step, transformers' forward against the lean step (issue 15: batch-1 decode at
0.40 of the bandwidth bound).

Builds a Qwen2.5-3B-shaped model (random weights, fp16, no download) on the GPU, lays its
q/k/v and gate/up weights end to end (actors/llm_fused.py: what ``llm_params.gpu_lean_decode``
does at load; transformers' forward computes the same on them), and gives two batch runners
(actors/batch_runner.py) the same weights: one captures transformers' forward in its decode
graphs, the other the lean step (actors/llm_lean_decode.py), tried and checked against
transformers' first step as the server does. Each (batch, view) graph is replayed ``--steps``
times per window, the two runners' windows interleaved, ``--repeat`` windows each; the table
gives ms per step (median and range), tokens/s per stream, the share of the batch-1 bandwidth
bound (weight bytes / the card's measured copy rate), and how far the two steps' logits are
apart. ``--tiny``: a small model on the CPU, eager, to check the script.

    python3 benchmarks/gpu_decode_step.py --out benchmarks/results/gpu-decode-step
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--view", type=int, default=256, help="keys attended (a graph's bucket)")
    ap.add_argument("--steps", type=int, default=100, help="replays per window")
    ap.add_argument("--repeat", type=int, default=3, help="windows per runner")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cudnn-attention", action=argparse.BooleanOptionalAction, default=False,
                    help="let SDPA use cuDNN's kernels (the server's CUDNN_ATTENTION, off by "
                         "default: off here too, as the server runs)")
    ap.add_argument("--profile", action="store_true",
                    help="torch profiler over the fused lean step's replays at each batch: "
                         "kernels by device time")
    ap.add_argument("--out", default=None, help="path prefix for .json and .md")
    a = ap.parse_args(argv)

    import torch
    from _qwen_model import qwen_model
    from chat_batching import copy_bandwidth

    q = qwen_model(a.tiny)
    from agile_rag.actors.batch_runner import BatchRunner
    from agile_rag.actors import llm_rope_kv
    from agile_rag.actors.kv_slots import make_slot_cache
    from agile_rag.actors.llm_lean_decode import LeanDecoder
    from agile_rag.runtime.executor import set_cudnn_attention

    set_cudnn_attention(a.cudnn_attention)     # as the server does at start
    model, cuda, dev, dtype, shape, laid = q.model, q.cuda, q.dev, q.dtype, q.shape, q.laid
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(torch, dev.type)
    bound = bw["gbps_read_write"] * 1e9 / weight_bytes if bw.get("gbps_read_write") else None
    batches = [int(x) for x in a.batches.split(",") if x.strip()]
    slots = max(batches)

    def runner(lean: bool, fused: bool | None = None, rope_kv: bool = False) -> BatchRunner:
        r = BatchRunner(model, pad=0, cuda_graphs=cuda)
        r.cache = make_slot_cache(model.config.num_hidden_layers, slots, r.kv_heads,
                                  max(512, a.view), r.head_dim, dtype, dev)
        r.gpu_lean = None if lean else False
        r.lean_fused_ops = fused
        r.rope_kv = rope_kv
        return r

    # the lean step without and with its fused small operations (LeanDecoder.fused_ops; on a
    # GPU the server's default is with them), and with its rotary embedding and KV write in
    # one Triton kernel a layer too (llm_params.decode_rope_kv; where Triton is not, the same
    # step as lean_fused)
    ways = {"transformers": runner(False), "lean": runner(True, False),
            "lean_fused": runner(True, True), "lean_rope_kv": runner(True, True, True)}
    heads = model.config.num_attention_heads

    def rope_kv_ready() -> bool:
        return llm_rope_kv.ready(dev, dtype, heads, ways["lean"].kv_heads, ways["lean"].head_dim)

    g = torch.Generator().manual_seed(1)
    rows: dict = {}
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(0, shape["vocab_size"], (b,), generator=g)
            pos = torch.randint(a.view // 2, a.view - 1, (b,), generator=g)
            logits, times = {}, {name: [] for name in ways}

            def step(r: BatchRunner, ids=ids, pos=pos, b=b):
                if cuda:
                    return r._graph_set().run(ids, pos, a.view, {"captures": 0})
                return r.decode_body(ids.to(dev)[:, None], pos.to(dev),
                                     torch.arange(b, device=dev), a.view)

            for name, r in ways.items():         # capture (and the lean step's check)
                logits[name] = step(r).float().clone()
            for _ in range(a.repeat):
                for name, r in ways.items():
                    for _ in range(3):
                        step(r)
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(a.steps):
                        step(r)
                    if cuda:
                        torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - t0) / a.steps * 1e3)
            scale = logits["transformers"].abs().max().item() or 1.0
            rows[b] = {name: {"ms": sorted(t), "ms_median": statistics.median(t),
                              "tok_s_per_stream": 1e3 / statistics.median(t)}
                       for name, t in times.items()}
            for name in LEAN_WAYS:
                diff = (logits[name] - logits["transformers"]).abs().max().item()
                rows[b][name]["logits_max_diff_rel"] = diff / scale
                rows[b][name]["same_argmax"] = bool((logits[name].argmax(-1) ==
                                                     logits["transformers"].argmax(-1)).all())
            if a.profile and cuda:
                rows[b]["profile"] = profile_steps(torch, lambda: step(ways["lean_fused"]))
                if rope_kv_ready():
                    rows[b]["profile_rope_kv"] = profile_steps(
                        torch, lambda: step(ways["lean_rope_kv"]))
    lean_r = ways["lean"]
    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "shape": shape,
           "dtype": str(dtype), "weight_bytes": weight_bytes, "bandwidth": bw,
           "bound_tok_s": bound, "groups_laid": laid,
           "lean_in_use": isinstance(lean_r.gpu_lean, LeanDecoder),
           "lean_fused_in_use": isinstance(ways["lean_fused"].gpu_lean, LeanDecoder),
           "rope_kv_in_use": rope_kv_ready(),
           "lean_fused_layers": sum(c is not None for c in lean_r.gpu_lean.linear)
           if isinstance(lean_r.gpu_lean, LeanDecoder) else 0,
           "view": a.view, "cudnn_attention": a.cudnn_attention, "steps": a.steps, "repeat": a.repeat, "rows": rows,
           "command": "python3 " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
           "versions": {"torch": torch.__version__}}
    md = markdown(out)
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(out, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(md)


LEAN_WAYS = ("lean", "lean_fused", "lean_rope_kv")


def profile_steps(torch, step, n: int = 20) -> str:
    """The kernels of ``n`` replays by device time (torch profiler), as a table."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30,
                                     max_name_column_width=60)


def markdown(r: dict) -> str:
    bound = r["bound_tok_s"]
    names = ("transformers", *LEAN_WAYS)
    lines = [f"# The decode step in CUDA graphs: transformers' forward against the lean step "
             f"({r['device']})", "", "```", r["command"], "```", "",
             f"Qwen2 shape {r['shape']['hidden_size']} hidden x "
             f"{r['shape']['num_hidden_layers']} layers, {r['dtype']}, "
             f"{r['weight_bytes'] / 1e9:.2f} GB of weights; view {r['view']} keys "
             f"(cuDNN attention {'on' if r.get('cudnn_attention') else 'off'}); "
             f"{r['repeat']} windows of {r['steps']} steps each, interleaved. Lean step in use: "
             f"{r['lean_in_use']} ({r['lean_fused_layers']} layers with q/k/v and gate/up as "
             f"one matmul each); with its fused small operations (`lean_fused`, the GPU's "
             f"default): {r.get('lean_fused_in_use')}; with the one-kernel rotary embedding "
             f"and KV write (`lean_rope_kv`, llm_params.decode_rope_kv): "
             f"{r.get('rope_kv_in_use')}. Batch-1 bandwidth bound: "
             f"{f'{bound:.0f} tok/s' if bound else '-'}.", "",
             "| batch | step | ms/step (range) | / transformers | tok/s per stream | "
             "of the bound | max logit diff (rel.) | same argmax |", "|" + " --- |" * 8]
    for b, row in r["rows"].items():
        t = row["transformers"]
        for name in names:
            w = row.get(name)
            if w is None:
                continue
            of_bound = f"{w['tok_s_per_stream'] / bound:.3f}" if bound and int(b) == 1 else "-"
            diff = f"{w['logits_max_diff_rel']:.2e}" if "logits_max_diff_rel" in w else "-"
            lines.append(
                f"| {b} | {name} | {w['ms_median']:.3f} ({w['ms'][0]:.3f}..{w['ms'][-1]:.3f}) | "
                f"{w['ms_median'] / t['ms_median']:.3f} | {w['tok_s_per_stream']:.1f} | "
                f"{of_bound} | {diff} | {w.get('same_argmax', '-')} |")
    for b, row in r["rows"].items():
        if row.get("profile"):
            lines += ["", f"Profile of the fused lean step, batch {b}, 20 replays:", "", "```",
                      row["profile"], "```"]
        if row.get("profile_rope_kv"):
            lines += ["", f"Profile of the fused lean step with the one-kernel rotary embedding "
                      f"and KV write, batch {b}, 20 replays:", "", "```",
                      row["profile_rope_kv"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
