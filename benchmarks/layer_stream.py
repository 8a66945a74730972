#!/usr/bin/env python3
"""Layer-streamed encoders vs resident ones (issue 13, item 3): runtime.layer_stream.LayerStream.

For an XLM-R-large-shaped cross-encoder (bge-reranker-v2-m3 shape) and an embedder (bge-m3 shape,
XLM-R large; or --embedder bert: bge-large shape), fp16 with random weights built on the device
and kept in a pinned WeightResidency master copy as the server keeps them, it times in ONE run:

- resident: the whole model admitted (WeightResidency.admit), then each workload;
- streamed with K = 2 and 3 slots: LayerStream.attach, then the same workloads;
- with --host-embeddings, also K = 2 with the word-embedding table left in host memory;

workloads: rerank 100 pairs x 512 tokens in batches of 32 (the server's batch) and in one
forward of 100, embed one 24-token query, embed 64 passages x 256 and x 512 tokens. Each figure
is measured --repeat times (one untimed warm-up first): median and spread (min-max). Also: the
pass copy rate (every layer copied back to back into the slots, no compute), the copy time
measured during the streamed passes, the GPU memory each mode holds (weights) and its peak
during the rerank, and whether the streamed outputs equal the resident ones.

    python3 benchmarks/layer_stream.py --repeat 3 --host-embeddings --out benchmarks/results  # GPU
    python3 benchmarks/layer_stream.py --small --repeat 2 --out /tmp/ls      # CPU smoke run

On the lent GPU image (torch 2.11, transformers 5.17), from the repository root:

    mkdir -p /tmp/pp && ln -sfn $PWD /tmp/pp/agile_rag
    PYTHONPATH=/tmp/pp python3 benchmarks/layer_stream.py --repeat 3 --host-embeddings --out $OUT

Output in --out: layer-stream-<gpu slug or cpu>.json (every sample) and .md (the table, the
command, the GPU, versions).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time

MB = 1e6

SHAPES = {
    "xlmr": dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                 num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                 type_vocab_size=1, pad_token_id=1),
    "bert": dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                 num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512,
                 type_vocab_size=2, pad_token_id=0),
}
SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="folder for layer-stream-<gpu>.json and .md")
    p.add_argument("--repeat", type=int, default=3, help="timed samples per figure")
    p.add_argument("--slots", default="2,3", help="K values to stream with")
    p.add_argument("--embedder", choices=("xlmr", "bert"), default="xlmr")
    p.add_argument("--host-embeddings", action="store_true",
                   help="also stream with K=2 and the word embeddings kept in host memory")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--seq", type=int, default=512, help="tokens per query+passage pair")
    p.add_argument("--rr-batch", type=int, default=32)
    p.add_argument("--small", action="store_true",
                   help="tiny shapes, fp32, CPU when CUDA is absent: a smoke run")
    return p.parse_args(argv)


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if name else "cpu"


def build(kind: str, cls_name: str, device, dtype, small: bool):
    import torch
    import transformers
    cfg_cls = transformers.XLMRobertaConfig if kind == "xlmr" else transformers.BertConfig
    shape = dict(SHAPES[kind])
    if small:
        shape.update(SMALL)
    extra = {"num_labels": 1} if "Classification" in cls_name else {}
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, cls_name)(cfg_cls(**shape, **extra)).to(dtype).eval()
    return model


def make_inputs(n: int, seq: int, vocab: int, pad: int, *, ragged: bool, seed: int = 0):
    """n rows of `seq` token ids; with `ragged` the lengths run from seq down to 3/4 of it."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    if ragged:
        for r in range(n):
            length = seq - (r * seq // 4) // max(n - 1, 1)
            ids[r, length:] = pad
            mask[r, length:] = 0
    return ids, mask


def forward(model, ids, mask, batch: int, device):
    """The model's outputs for all rows, `batch` rows per forward (logits, or CLS vectors)."""
    import torch
    outs = []
    for s in range(0, ids.shape[0], batch):
        out = model(input_ids=ids[s:s + batch].to(device, non_blocking=True),
                    attention_mask=mask[s:s + batch].to(device, non_blocking=True))
        outs.append(out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0])
    return torch.cat(outs)


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int):
    fn()                                   # warm-up (not timed)
    sync(device)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return samples, out


def summary(samples):
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": samples}


def run_model(name, model, workloads, args, device, stream_modes):
    import torch

    from agile_rag.runtime.layer_stream import LayerStream
    from agile_rag.runtime.residency import WeightResidency

    cuda = device.type == "cuda"
    res = WeightResidency(model)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    result = {"model": type(model).__name__, "weight_bytes": res.weight_bytes,
              "pinned": res.pinned, "modes": {}}
    refs = {}

    def measure(mode):
        row = {}
        for wname, (ids, mask, batch) in workloads.items():
            samples, out = timed(lambda ids=ids, mask=mask, batch=batch:
                                 forward(model, ids, mask, batch, device), device, args.repeat)
            row[wname] = summary(samples)
            if mode == "resident":
                refs[wname] = out
            else:
                ref = refs[wname]
                diff = (out.float() - ref.float()).abs().max().item()
                row[wname].update(identical=bool(torch.equal(out, ref)), max_abs_diff=diff)
            if cuda and wname.startswith("rerank"):
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                forward(model, ids, mask, batch, device)
                sync(device)
                row[wname]["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
                row[wname]["held_bytes"] = base
        return row

    with torch.inference_mode():
        if cuda:
            base0 = torch.cuda.memory_allocated(device)
            adm = res.admit(device)
            held = torch.cuda.memory_allocated(device) - base0
            r = measure("resident")
            r["_admit"] = {"gbps": adm["gbps"], "seconds": adm["seconds"]}
            r["_weights_on_gpu_bytes"] = held
            res.evict()
        else:                              # CPU smoke run: the plain module is the reference
            r = measure("resident")
        result["modes"]["resident"] = r
        for label, k, host_emb in stream_modes:
            ls = LayerStream(model, device, slots=k, timing=True, host_embeddings=host_emb)
            if cuda:
                gc.collect()
                base0 = torch.cuda.memory_allocated(device)
            att = ls.attach()
            held = torch.cuda.memory_allocated(device) - base0 if cuda else None
            row = measure(label)
            st = ls.stats()
            row["_stream"] = {k2: st[k2] for k2 in (
                "slots", "slot_bytes", "resident_bytes", "weight_bytes", "model_bytes",
                "bytes_per_pass", "copies_per_layer", "pinned", "source", "passes",
                "layer_copies", "bytes_copied", "last_copy_seconds", "host_embedding_bytes",
                "host_lookups")}
            row["_stream"]["copy_gbps_in_passes"] = st.get("copy_gbps")
            row["_stream"]["attach_seconds"] = att["seconds"]
            if cuda:
                row["_stream"]["allocated_by_attach"] = held
                row["_stream"]["copy_rate"] = ls.measure_copy_rate(max(args.repeat, 3))
            ls.detach()
            if cuda:
                gc.collect()
                row["_stream"]["left_after_detach"] = torch.cuda.memory_allocated(device) - base0
            result["modes"][label] = row
    res.release()
    return result


def render(results: dict) -> str:
    env = results["env"]
    lines = [f"# Layer-streamed encoders vs resident: {env['gpu'] or 'CPU (smoke run)'}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, dtype {env['dtype']}, "
             f"{results['args']['repeat']} samples per figure (median, [min-max]). Random weights "
             "built on the device, kept in a pinned WeightResidency master copy; streamed passes "
             "copy every layer from it through K slots.", "", "Command:", "",
             "```", results["command"], "```", ""]
    for mname, m in results["models"].items():
        modes = m["modes"]
        ks = [k for k in modes if k != "resident"]
        lines += [f"## {mname}: {m['model']}, {m['weight_bytes'] / MB:.0f} MB of weights", ""]
        head = "| workload | resident | " + " | ".join(
            f"{k} streamed | {k} / resident" for k in ks) + " | same output |"
        lines += [head, "|" + " --- |" * (2 + 2 * len(ks) + 1)]
        for w in modes["resident"]:
            if w.startswith("_"):
                continue
            rs = modes["resident"][w]
            cells = [w, _fmt(rs)]
            same = []
            for k in ks:
                s = modes[k][w]
                cells += [_fmt(s), f"**{s['median_s'] / rs['median_s']:.2f}**"]
                same.append("identical" if s["identical"] else f"max diff {s['max_abs_diff']:.2e}")
            cells.append(", ".join(sorted(set(same))))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["| mode | GPU weights held | rerank activations (peak) | pass bytes "
                  "| pass copy rate (copies alone) | copy rate in passes | copies/layer |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        rr = next((w for w in modes["resident"] if w.startswith("rerank")), None)
        r = modes["resident"]

        peaks = {k: _mb(modes[k][rr].get("peak_extra_bytes")) if rr else "-" for k in modes}
        admit_gbps = r.get("_admit", {}).get("gbps", 0)
        lines.append(f"| resident | {_mb(r.get('_weights_on_gpu_bytes'))} | {peaks['resident']} | "
                     f"{_mb(m['weight_bytes'])} per admit ({admit_gbps:.1f} GB/s) | - | - | - |")
        for k in ks:
            s = modes[k]["_stream"]
            rate = s.get("copy_rate", {}).get("gbps")
            in_pass = s.get("copy_gbps_in_passes")
            lines.append(
                f"| {k} | {_mb(s['weight_bytes'])} (resident parts {_mb(s['resident_bytes'])}"
                f" + {s['slots']} x {_mb(s['slot_bytes'])}) | {peaks[k]} | "
                f"{_mb(s['bytes_per_pass'])} | {f'{rate:.1f} GB/s' if rate else '-'} | "
                f"{f'{in_pass:.1f} GB/s' if in_pass else '-'} | {s['copies_per_layer']} |")
        lines.append("")
    return "\n".join(lines)


def _fmt(s):
    return f"{s['median_s'] * 1e3:.1f} ms [{s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f}]"


def _mb(b):
    return "-" if b is None else f"{b / MB:.1f} MB"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.float16 if cuda and not args.small else torch.float32
    stream_modes = [(f"K={k}", int(k), False) for k in args.slots.split(",")]
    if args.host_embeddings:
        stream_modes.append(("K=2, host embeddings", 2, True))
    seq = args.seq if not args.small else min(args.seq, 64)
    pairs = args.pairs if not args.small else min(args.pairs, 10)
    t0 = time.perf_counter()
    results = {
        "command": "python3 " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]
                                        if argv is None else [__file__] + list(argv)),
        "args": vars(args),
        "env": {"gpu": torch.cuda.get_device_name(device) if cuda else None,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "dtype": str(dtype).replace("torch.", "")},
        "models": {},
    }
    plan = [("reranker", "xlmr", "XLMRobertaForSequenceClassification"),
            ("embedder", args.embedder,
             "XLMRobertaModel" if args.embedder == "xlmr" else "BertModel")]
    for name, kind, cls_name in plan:
        shape = SHAPES[kind]
        vocab, pad = shape["vocab_size"], shape["pad_token_id"]
        model = build(kind, cls_name, device, dtype, args.small)
        if name == "reranker":
            ids, mask = make_inputs(pairs, seq, vocab, pad, ragged=True)
            workloads = {f"rerank {pairs}x{seq}, batch {args.rr_batch}": (ids, mask, args.rr_batch),
                         f"rerank {pairs}x{seq}, one forward": (ids, mask, pairs)}
        else:
            q = make_inputs(1, 24, vocab, pad, ragged=False, seed=1)
            p256 = make_inputs(64, min(256, seq), vocab, pad, ragged=True, seed=2)
            p512 = make_inputs(64, seq, vocab, pad, ragged=True, seed=3)
            workloads = {"embed 1 query x 24": (*q, 1),
                         f"embed 64 x {min(256, seq)}": (*p256, 64),
                         f"embed 64 x {seq}": (*p512, 64)}
        print(f"{name}: {cls_name} ({kind}), {sum(p.numel() for p in model.parameters()) / 1e6:.0f}"
              f" M parameters, built in {time.perf_counter() - t0:.1f} s", flush=True)
        results["models"][name] = run_model(name, model, workloads, args, device, stream_modes)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    results["seconds"] = time.perf_counter() - t0
    md = render(results)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"layer-stream-{slug(results['env']['gpu'])}")
        with open(base + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(md + "\n")
        print(f"wrote {base}.json and .md")
    return results


if __name__ == "__main__":
    main()
