"""Int8 weight-only SmolLM2 (issue 17) through a real GPU round trip: the LLM actor behind the
real VRAM arbiter and WeightResidency, ``llm_params.weight_quant: int8``. A chat admits the
int8 weights and their scales to the GPU (the same tensors, no re-quantization) and answers
there; a revoke evicts them (nothing left on the GPU); a chat with the model set to the CPU
answers from the host copy with the CPU's int8 kernel; back on the GPU it answers as the
first time. Every answer says Paris."""
from __future__ import annotations

import asyncio

import torch

from agile_rag.actors.llm_actor import LLMActor
from agile_rag.actors.llm_int8 import int8_layers
from agile_rag.actors.messages import Chat, Describe, Revoke
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec, resolve_path
from agile_rag.runtime.residency import WeightResidency
from agile_rag.runtime.system import ActorSystem

from support import CACHE, ROOT, SMOLLM, gpu_bytes_in_use


def _paris() -> Chat:
    return Chat(messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=16, temperature=0)


def test_int8_smollm2_answers_on_the_gpu_after_evict_and_on_the_cpu():
    async def go():
        torch.cuda.synchronize()
        base = gpu_bytes_in_use()
        system = ActorSystem()
        system.spawn(VRAMArbiter(2 << 30, grant_timeout=60))
        path = resolve_path(SMOLLM, ROOT)
        llm = LLMActor(ModelSpec("llm", "smollm2", path, path, max_tokens=2048),
                       {"weight_quant": "int8"}, cache_dir=CACHE)
        llm.residency_factory = WeightResidency
        system.spawn(llm)
        state = await llm.ask(Describe(), timeout=300)
        assert state.state == "ready", state
        layers = int8_layers(llm.model)
        assert len(layers) == 211
        res = llm.lease.residency

        first = await llm.ask(_paris(), timeout=300)                       # admits, GPU
        assert res.on_gpu and llm.describe().device == "cuda"
        for lay in layers:
            assert lay.qweight.is_cuda and lay.qweight.dtype == torch.int8
            assert lay.scales.is_cuda
        on_gpu_bytes = sum(lay.qweight.numel() for lay in layers)

        await llm.ask(Revoke(model="smollm2", reason="test"), timeout=60)   # evicts
        assert not res.on_gpu
        stray = [n for n, t in list(llm.model.named_parameters()) +
                 list(llm.model.named_buffers()) if t.is_cuda]
        assert not stray, f"left on the GPU after eviction: {stray[:5]}"
        torch.cuda.synchronize()
        left = gpu_bytes_in_use() - base
        assert left < 8 * 2**20, f"{left} bytes still allocated after the eviction"

        # the host copy computes on the CPU (the int8 kernel), as a device: cpu model would
        with torch.inference_mode():
            ids = llm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
            cpu_next = llm.model(ids).logits[0, -1].argmax().item()
        cpu_word = llm.tokenizer.decode([cpu_next])

        second = await llm.ask(_paris(), timeout=300)                      # admits again
        assert res.on_gpu
        await system.stop_all()
        return first, second, cpu_word, on_gpu_bytes

    first, second, cpu_word, nbytes = asyncio.run(go())
    print(f"int8 on the GPU: {first.text!r}; CPU next word {cpu_word!r}; "
          f"{nbytes / 2**20:.0f} MB of int8 weights moved")
    assert "Paris" in first.text, first.text
    assert "Paris" in cpu_word, cpu_word
    assert (second.text, second.completion_tokens) == (first.text, first.completion_tokens)
