"""GPTQ-Int4 and AWQ checkpoints through the LLM actor on a real GPU (runs where CUDA is).

The tiny checkpoints of tests/test_quantized.py (written in each format's on-disk layout, loaded
by transformers + gptqmodel's portable torch kernels), behind the real VRAM arbiter and the real
WeightResidency: a chat admits the packed weights to the GPU and answers there; a revoke evicts
them (nothing of the model stays on the GPU, GPU memory returns to where it was); the next chat
admits them again and answers exactly as before."""
from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch
from test_quantized import write

from agile_rag.actors import llm_quant
from agile_rag.actors.llm_actor import LLMActor
from agile_rag.actors.messages import Chat, Describe, Revoke
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.residency import WeightResidency
from agile_rag.runtime.system import ActorSystem

from support import gpu_bytes_in_use

_missing = [p for p in ("gptqmodel", "optimum") if importlib.util.find_spec(p) is None]
pytestmark = pytest.mark.skipif(bool(_missing),
                                reason=f"GPTQ/AWQ kernels not installed ({', '.join(_missing)})")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant-gpu")
    return {fmt: (str(d / fmt), *write(fmt, str(d / fmt))) for fmt in ("gptq", "awq")}


def _chat(text: str, n: int = 16) -> Chat:
    return Chat(messages=[{"role": "user", "content": text}], max_tokens=n)


def _model_tensors(model):
    """Every tensor the model and its kernels hold: parameters, buffers, kernel attributes."""
    ts = list(model.parameters()) + list(model.buffers())
    for mod in llm_quant.quant_modules(model):
        for v in vars(mod).values():
            for t in (v.values() if isinstance(v, dict) else [v]):
                if isinstance(t, torch.Tensor):
                    ts.append(t)
    return ts


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_quantized_llm_on_the_gpu_answers_the_same_after_evict_and_admit(checkpoints, fmt):
    folder, ref, tok = checkpoints[fmt]

    async def go():
        torch.cuda.synchronize()
        base = gpu_bytes_in_use()
        system = ActorSystem()
        system.spawn(VRAMArbiter(1 << 30, grant_timeout=60))
        llm = LLMActor(ModelSpec("llm", fmt, folder, folder, max_tokens=256))
        llm.residency_factory = WeightResidency
        system.spawn(llm)
        state = await llm.ask(Describe(), timeout=300)
        assert state.state == "ready", state
        model = llm.model
        res = llm.lease.residency
        assert isinstance(res, llm_quant.QuantResidency) and res.pinned
        mods = llm_quant.quant_modules(model)
        kernel = {type(m).__name__ for m in mods}
        assert kernel == {"gptq": {"TorchLinear"}, "awq": {"AwqTorchLinear"}}[fmt]

        first = await llm.ask(_chat("capital of france"), timeout=300)      # admits, GPU
        assert res.on_gpu and llm.describe().device == "cuda"
        for m in mods:
            for name, t in m.named_buffers():
                assert t.is_cuda, f"{type(m).__name__}.{name} stayed on the CPU"
        triton = sorted({bool(getattr(m, "_triton_dequant_enabled", False)) for m in mods})
        ids = tok("paris is the capital of france", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            on_gpu = model(ids.cuda()).logits.float().cpu()
            want = ref(ids).logits.float()
        assert (on_gpu - want).abs().max() < 0.02 * want.abs().max()

        await llm.ask(Revoke(model=fmt, reason="test"), timeout=60)                      # evicts
        assert not res.on_gpu
        stray = [t.shape for t in _model_tensors(model) if t.is_cuda]
        assert not stray, f"tensors left on the GPU after eviction: {stray}"
        torch.cuda.synchronize()
        left = gpu_bytes_in_use() - base
        assert left < 8 * 2**20, f"{left} bytes still allocated after the eviction"

        second = await llm.ask(_chat("capital of france"), timeout=300)     # admits again
        assert res.on_gpu
        with torch.no_grad():
            again = model(ids.cuda()).logits.float().cpu()
        await system.stop_all()
        return first, second, on_gpu, again, kernel, triton

    first, second, on_gpu, again, kernel, triton = asyncio.run(go())
    print(f"{fmt}: kernel {kernel}, triton dequant {triton}: {first.text!r}")
    assert first.completion_tokens >= 4, first
    assert (second.text, second.completion_tokens, second.finish_reason) == \
        (first.text, first.completion_tokens, first.finish_reason)
    assert torch.equal(again, on_gpu)
