"""Where a lean prefill pass's time goes (issue 15: a burst of 32 chats at 25x one chat).

Builds a Qwen2.5-3B-shaped model (random weights, fp16, no download) on the GPU, lays its
q/k/v and gate/up weights end to end (actors/llm_fused.py, as a load does) and reads prompts of
``--prompt-tokens`` tokens through the lean decoder's prefill (actors/llm_lean_decode.py, what a
burst's PREFILL pass runs), their keys and values copied into a slot cache as the runner does.
Prints, per pass of ``--rows`` rows: its wall time (median of ``--repeat``), the time the host
took to launch it (no sync), the replay of the same pass from a CUDA graph (its GPU work alone:
how far the eager pass is bound by its launches), the throughput of its projections; the
middle pass with each way of computing the MLP's gate and up (``AGILE_RAG_GATE_UP``); then
plain GEMMs of the pass's shapes and its activation (what the projections could reach on this
card), and with ``--profile`` the pass's kernels by device time. ``--tiny``: a small model on
the CPU, to check the script.

    python3 benchmarks/gpu_prefill_pass.py --profile
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,11,16,32", help="rows of a pass")
    ap.add_argument("--prompt-tokens", type=int, default=220)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from _qwen_model import qwen_model

    q = qwen_model(a.tiny)
    from agile_rag.actors.llm_lean_decode import GATE_UP_FORMS, gate_up_setting, lean_decoder

    model, cuda, dev, dt, shape = q.model, q.cuda, q.dev, q.dtype, q.shape
    lean = lean_decoder(model)
    if lean is None:
        raise SystemExit("no lean decoder for this model")
    cfg = model.config
    hid, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kvh, hd = cfg.num_key_value_heads, hid // cfg.num_attention_heads
    qkv = hid + 2 * kvh * hd
    flop_token = 2 * layers * (hid * qkv + hid * hid + 2 * hid * inter + inter * hid)
    rows = [int(x) for x in a.rows.split(",") if x.strip()]
    lp = a.prompt_tokens
    keys = [torch.empty(max(rows), kvh, lp, hd, device=dev, dtype=dt) for _ in range(layers)]
    vals = [torch.empty(max(rows), kvh, lp, hd, device=dev, dtype=dt) for _ in range(layers)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, n: int = a.repeat) -> float:
        for _ in range(2):
            fn()
        sync()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def graph_of(f):
        """``f`` warmed once on a side stream, then captured: (the graph, its output)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = f()
        return g, out

    def pass_of(n: int):
        ids = torch.randint(0, shape["vocab_size"], (n, lp), device=dev)
        last = torch.full((n,), lp - 1, device=dev)

        def store(layer, k, v):
            keys[layer][:n, :, :lp].copy_(k)
            vals[layer][:n, :, :lp].copy_(v)
        return lambda: lean.prefill(ids, last, store)

    print(f"{'cuda: ' + torch.cuda.get_device_name() if cuda else 'cpu'}; {lp}-token prompts; "
          f"median of {a.repeat}")
    with torch.inference_mode():
        for n in rows:
            f = pass_of(n)
            wall = timed(f)
            launches = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                f()
                launches.append(time.perf_counter() - t)
                sync()
            replay = "-"
            if cuda:
                g, out = graph_of(f)
                rep = timed(g.replay)
                same = torch.allclose(out.float(), f().float(), rtol=3e-2, atol=3e-2)
                replay = f"{rep * 1e3:.2f} ms (same logits: {same})"
                del g
            m = n * lp
            print(f"pass of {n} x {lp} tokens: wall {wall * 1e3:.2f} ms, launch "
                  f"{statistics.median(launches) * 1e3:.2f} ms, graph replay {replay}; "
                  f"{m * flop_token / wall / 1e12:.1f} TFLOP/s in projections, "
                  f"{m / wall:.0f} tok/s", flush=True)
        mid = rows[len(rows) // 2]
        for form in GATE_UP_FORMS[1:]:         # how the MLP computes gate and up
            lean.gate_up = form
            print(f"pass of {mid} x {lp} tokens, gate_up {form}: "
                  f"{timed(pass_of(mid)) * 1e3:.2f} ms")
        lean.gate_up = gate_up_setting()
        if cuda:       # the elementwise steps in fewer kernels (actors/llm_elementwise.py) or not
            key = (keys[0].device, dt)             # (the device as the tensors name it)
            fused = lean.rotate_signed, lean.product_ok.get(key)
            for n in rows:
                fewer: list[float] = []
                torchs: list[float] = []
                for _ in range(3):                     # interleaved
                    for on, times in ((True, fewer), (False, torchs)):
                        lean.rotate_signed = on and fused[0]
                        lean.product_ok[key] = bool(on and fused[1])
                        g, _ = graph_of(pass_of(n))
                        times.append(timed(g.replay))
                        del g
                print(f"pass of {n} x {lp} tokens, graph replay: elementwise in fewer kernels "
                      f"(rotation in 3, SiLU and product in 1: {fused[0]}, {fused[1]}) "
                      f"{statistics.median(fewer) * 1e3:.2f} ms, torch's "
                      f"{statistics.median(torchs) * 1e3:.2f} ms", flush=True)
            lean.rotate_signed, lean.product_ok[key] = fused[0], bool(fused[1])
        m = max(rows) * lp
        x = torch.randn(m, hid, device=dev, dtype=dt)
        xi = torch.randn(m, inter, device=dev, dtype=dt)
        per_layer = 0.0
        for name, k, nout, inp in (("qkv", hid, qkv, x), ("o", hid, hid, x),
                                   ("gate", hid, inter, x), ("up", hid, inter, x),
                                   ("down", inter, hid, xi)):
            w = torch.randn(nout, k, device=dev, dtype=dt)
            s_ = timed(lambda inp=inp, w=w: F.linear(inp, w))
            per_layer += s_
            print(f"  GEMM {name:5s} [{m} x {k}] x [{k} x {nout}]: {s_ * 1e6:8.1f} us, "
                  f"{2 * m * k * nout / s_ / 1e12:6.1f} TFLOP/s")
        g_, u_ = torch.randn(m, inter, device=dev, dtype=dt), torch.randn(m, inter, device=dev,
                                                                          dtype=dt)
        act = timed(lambda: F.silu(g_).mul_(u_))
        from agile_rag.actors.llm_elementwise import silu_mul
        one = timed(lambda: silu_mul(g_, u_))
        print(f"  {m} tokens: the GEMMs {per_layer * layers * 1e3:.1f} ms over {layers} layers, "
              f"SiLU and product {act * layers * 1e3:.1f} ms (in one kernel: "
              f"{one * layers * 1e3:.1f} ms)")
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            f = pass_of(mid)
            f()
            sync()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                for _ in range(3):
                    f()
                sync()
            print(prof.key_averages().table(
                sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
