#!/usr/bin/env python3
"""Quantized swap benchmark (issue 8): a 7B-shaped 4-bit LLM admitted to the GPU and evicted.

For each format (GPTQ-Int4, AWQ), in ONE run on one GPU:
  1. write a checkpoint of the Qwen2-7B shape in the format's on-disk layout with random packed
     weights (no calibration; actors/llm_quant.save_random_quantized), built on the device;
  2. load it through the real loader (llm_quant.load_quantized: transformers + gptqmodel's portable
     torch kernel, as the LLM actor does) and wrap it the way the actor's lease does
     (QuantResidency over runtime.residency.WeightResidency, pinned host master copy);
  3. measure the pinned host->device copy rate of the residency's own flat buffer, and admit /
     evict, interleaved (target: admit >= 0.80 of the copy rate; evict <= 20 ms);
  4. check that greedy generation after evict + admit equals generation before it, that nothing
     of the model is left on the GPU after an eviction, and time batch-1 decode for information.

    python3 benchmarks/quant_swap.py --out benchmarks/results          # full run (CUDA)
    python3 benchmarks/quant_swap.py --small --out /tmp/qs             # tiny shape; CPU smoke

On the lent GPU (no registry there; torch 2.11, transformers 5.17, Python 3.12): carry the kernel
packages as wheels in the ignored folder .qwhl/, built here for Python 3.12: gptqmodel 7.6.0,
pypcre 0.6.4 (compiled: `python3.12 -m pip wheel --no-deps`; it links libpcre2-8.so.0, carried
beside it), logbar, device-smi, tokenicer, defuser (sdists: `pip wheel --no-deps`), optimum 2.3.0,
threadpoolctl, plus pytest, json-five and sly for the tests; install them with `pip install --no-index
--no-deps --target /tmp/site .qwhl/*.whl` and put /tmp/site and a folder holding an `agile_rag`
link to the checkout on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

GiB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--formats", default="gptq,awq")
    p.add_argument("--small", action="store_true", help="tiny shape (CPU smoke: no moves)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: tmp)")
    p.add_argument("--time-budget-s", type=float, default=0,
                   help="if > 0, skip a format that the time left would not fit")
    return p.parse_args(argv)


def now() -> float:
    return time.perf_counter()


def qwen2_7b(small: bool):
    from transformers import Qwen2Config
    if small:
        return Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                           tie_word_embeddings=False, max_position_embeddings=2048)
    # Qwen2-7B(-Instruct): 7.6 B parameters; untied lm_head; q/k/v with bias.
    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False, max_position_embeddings=32768,
                       rope_theta=1e6, rms_norm_eps=1e-6)


def h2d_copy_seconds(torch, host, dst, stream):
    t0 = now()
    with torch.cuda.stream(stream):
        dst.copy_(host, non_blocking=True)
    stream.synchronize()
    return now() - t0


def greedy(torch, model, ids, n):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones_like(ids), pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def run_format(args, fmt, cuda, workdir):
    import torch

    from agile_rag.actors import llm_quant
    from agile_rag.runtime.residency import WeightResidency

    rec = {"format": fmt}
    cfg = qwen2_7b(args.small)
    folder = os.path.join(workdir, f"qwen2-7b-{fmt}")
    t0 = now()
    llm_quant.save_random_quantized(cfg, folder, fmt, args.group,
                                    device="cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.empty_cache()
    rec["write_s"] = round(now() - t0, 2)
    rec["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(folder, f))
                                  for f in os.listdir(folder) if f.endswith(".safetensors"))
    print(f"[{fmt}] checkpoint {rec['checkpoint_bytes'] / 1e9:.2f} GB written in "
          f"{rec['write_s']} s", flush=True)

    t0 = now()
    model = llm_quant.load_quantized(folder, fmt, dtype=torch.float16).eval()
    rec["load_s"] = round(now() - t0, 2)
    mods = llm_quant.quant_modules(model)
    rec["kernel"] = sorted({type(m).__name__ for m in mods})
    rec["quantized_layers"] = len(mods)
    t0 = now()
    res = llm_quant.QuantResidency(WeightResidency(model), model)
    rec["pin_and_copy_s"] = round(now() - t0, 2)
    rec.update(weight_bytes=res.weight_bytes, buffer_bytes=res.buffer_bytes,
               tensors=res.num_tensors, pinned=res.pinned)
    print(f"[{fmt}] loaded in {rec['load_s']} s ({rec['kernel']}, {len(mods)} layers); "
          f"residency {res.buffer_bytes / 1e9:.3f} GB, {res.num_tensors} tensors, "
          f"pinned={res.pinned}, built in {rec['pin_and_copy_s']} s", flush=True)
    ids = torch.randint(10, 900, (1, 24), generator=torch.Generator().manual_seed(0))
    if not cuda:
        t0 = now()
        rec["cpu_tokens"] = greedy(torch, model, ids, 2)
        rec["cpu_two_tokens_s"] = round(now() - t0, 2)
        return rec

    # copy rate of the residency's own pinned buffer, interleaved with admits and evicts
    host = res.host_buffer
    stream = torch.cuda.Stream()
    base = torch.cuda.memory_allocated()
    res.admit()
    res.evict()                              # warm: the first admit pays the page mapping
    dst = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
    h2d_copy_seconds(torch, host, dst, stream)
    copies, admits, copy_ev, evicts = [], [], [], []
    for _ in range(args.reps):
        copies.append(h2d_copy_seconds(torch, host, dst, stream))
        a = res.admit()
        admits.append(a["seconds"])
        copy_ev.append(a["copy_seconds"])
        evicts.append(res.evict()["seconds"])
    del dst
    torch.cuda.empty_cache()
    n = host.numel()
    rate = n / statistics.median(copies) / 1e9
    a_med = statistics.median(admits)
    rec["copy"] = {"bytes": n, "seconds": copies, "gbps_median": round(rate, 2)}
    rec["admit"] = {"seconds": admits, "copy_seconds_events": copy_ev,
                    "gbps_median": round(n / a_med / 1e9, 2),
                    "fraction_of_copy": round(n / a_med / 1e9 / rate, 3),
                    "overhead_ms_median": round((a_med - statistics.median(copy_ev)) * 1e3, 2)}
    rec["evict"] = {"seconds": evicts, "ms_median": round(statistics.median(evicts) * 1e3, 3),
                    "ms_max": round(max(evicts) * 1e3, 3)}
    print(f"[{fmt}] pinned copy {rate:.1f} GB/s; admit {rec['admit']['gbps_median']} GB/s = "
          f"{rec['admit']['fraction_of_copy']:.3f} of it; evict "
          f"{rec['evict']['ms_median']} ms median", flush=True)

    # the same answer after a round trip; nothing left on the GPU after an eviction
    res.admit()
    rec["triton_dequant"] = sorted({bool(getattr(m, "_triton_dequant_enabled", False))
                                    for m in mods})
    g = ids.cuda()
    t0 = now()
    before = greedy(torch, model, g, args.new_tokens)           # first call: kernel compiles
    rec["first_generate_s"] = round(now() - t0, 2)
    torch.cuda.synchronize()
    t0 = now()
    again = greedy(torch, model, g, args.new_tokens)
    torch.cuda.synchronize()
    dt = now() - t0
    rec["decode_tok_s_batch1"] = round(args.new_tokens / dt, 1)
    res.evict()
    torch.cuda.synchronize()
    stray = [tuple(t.shape) for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda]
    stray += llm_quant.kernel_state(model)
    rec["left_on_gpu_after_evict"] = {"tensors": stray,
                                      "bytes": torch.cuda.memory_allocated() - base}
    res.admit()
    after = greedy(torch, model, g, args.new_tokens)
    res.evict()
    rec["tokens_before"], rec["tokens_after_round_trip"] = before, after
    rec["same_after_round_trip"] = before == again == after
    print(f"[{fmt}] greedy {args.new_tokens} tokens equal after evict+admit: "
          f"{rec['same_after_round_trip']}; batch-1 decode {rec['decode_tok_s_batch1']} tok/s "
          f"(triton dequant {rec['triton_dequant']}); left after evict: "
          f"{rec['left_on_gpu_after_evict']}", flush=True)
    del model, res
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = now()
    import torch
    import transformers
    cuda = torch.cuda.is_available()
    from agile_rag.actors import llm_quant
    try:
        llm_quant.import_kernels("gptq")       # as the loader does: the environment stays
        import gptqmodel
        gv = getattr(gptqmodel, "__version__", "?")
    except (ImportError, RuntimeError) as e:
        print(f"the kernel packages are missing ({e})")
        return 2
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gptqmodel": gv, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") or
           os.environ.get("PYTORCH_ALLOC_CONF", "")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    print(json.dumps(env), flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="quant-swap-")
    results = {"env": env, "command": "python3 " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
               "shape": "small" if args.small else "Qwen2-7B", "group_size": args.group,
               "formats": {}}
    per_format = None
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        left = args.time_budget_s - (now() - t_start) if args.time_budget_s else None
        if left is not None and per_format is not None and left < 1.2 * per_format:
            results["formats"][fmt] = {"skipped": f"{left:.0f} s left, one format took "
                                                  f"{per_format:.0f} s"}
            print(f"[{fmt}] skipped: {results['formats'][fmt]['skipped']}", flush=True)
            continue
        t0 = now()
        try:
            results["formats"][fmt] = run_format(args, fmt, cuda, workdir)
        except Exception as e:  # one format's failure must not lose the other's figures
            import traceback
            traceback.print_exc()
            results["formats"][fmt] = {"error": f"{type(e).__name__}: {e}"[:500]}
        per_format = now() - t0
        results["formats"][fmt]["format_s"] = round(per_format, 1)
        shutil.rmtree(os.path.join(workdir, f"qwen2-7b-{fmt}"), ignore_errors=True)
        write(args.out, results)
    results["total_s"] = round(now() - t_start, 1)
    write(args.out, results)
    ok = all(r.get("same_after_round_trip") and r["admit"]["fraction_of_copy"] >= 0.80
             for r in results["formats"].values() if "admit" in r)
    return 0 if ok else 1


def write(out: str, results: dict) -> None:
    os.makedirs(out, exist_ok=True)
    gpu = (results["env"]["gpu"] or "cpu").lower().replace(" ", "-")
    gpu = "".join(c for c in gpu if c.isalnum() or c in "-_.")
    base = os.path.join(out, f"quant-swap-{gpu}")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    env = results["env"]
    lines = [f"# Quantized swap benchmark: {env['gpu'] or 'CPU (smoke)'}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, gptqmodel "
             f"{env['gptqmodel']}, triton {env['triton']}, CUDA {env['cuda']}. Shape "
             f"{results['shape']}, group size {results['group_size']}, random packed weights "
             "written in each format's layout on the device, loaded by the real loader.", "",
             "Command:", "", "```", results["command"], "```", "",
             "| format | checkpoint | residency | load | pinned copy | admit | admit / copy "
             "(goal >= 0.80) | evict | same answer after round trip | left on GPU | "
             "decode batch 1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fmt, r in results["formats"].items():
        if "admit" not in r:
            lines.append(f"| {fmt} | {r.get('skipped') or r.get('error') or 'CPU smoke'} |"
                         + " |" * 9)
            continue
        lines.append(
            f"| {fmt} ({', '.join(r['kernel'])}) | {r['checkpoint_bytes'] / 1e9:.2f} GB | "
            f"{r['buffer_bytes'] / 1e9:.2f} GB, {r['tensors']} tensors | {r['load_s']} s | "
            f"{r['copy']['gbps_median']} GB/s | {r['admit']['gbps_median']} GB/s "
            f"({statistics.median(r['admit']['seconds']) * 1e3:.0f} ms) | "
            f"**{r['admit']['fraction_of_copy']:.3f}** | {r['evict']['ms_median']} ms | "
            f"{r['same_after_round_trip']} | {r['left_on_gpu_after_evict']['bytes']} B | "
            f"{r['decode_tok_s_batch1']} tok/s |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
