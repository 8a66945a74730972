"""Low-precision LLM weights on the CPU (issue 17): a GGUF LLM computing on the CPU loads in
bfloat16 where the CPU computes it natively, with int4 weight-only layers where the file is
4-bit and int8 for the rest by default (llm_params.weight_quant); an entry's dtype wins; the
answers stay right (SmolLM2, greedy)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from agile_rag.actors import llm_loading
from agile_rag.actors.llm_actor import LLMActor
from agile_rag.actors.llm_int4 import int4_layers
from agile_rag.actors.llm_int8 import INT8_ROWS, Int8Linear, int8_layers, quantize_int8
from agile_rag.actors.messages import Chat, Describe, TokenStream
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec, resolve_path
from agile_rag.runtime.system import ActorSystem

from support import CACHE, ROOT, SMOLLM, FakeResidency, tiny_llama

NATIVE_BF16 = llm_loading.cpu_has_bf16()


def paris() -> Chat:
    return Chat(messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=16, temperature=0)


async def start(params: dict, *, dtype: str | None = None, device: str = "flex",
                residency=None):
    system = ActorSystem()
    if residency is not None:                # a GPU machine's wiring, the weights on the CPU
        system.spawn(VRAMArbiter(8 << 30, grant_timeout=10))
    path = resolve_path(SMOLLM, ROOT)
    actor = LLMActor(ModelSpec("llm", "smollm2", path, path, max_tokens=2048, device=device,
                               dtype=dtype), params, cache_dir=CACHE)
    actor.residency_factory = residency
    actor.gpu_device = "cpu"
    system.spawn(actor)
    state = await actor.ask(Describe(), timeout=300)
    assert state.state == "ready", state
    return actor, system


def float_dtypes(model) -> set:
    """The float dtypes of the weights (rotary tables, float32 by design, are not weights)."""
    return {t.dtype for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_floating_point() and not name.endswith("inv_freq")}


# ---- the choice -------------------------------------------------------------------------------
def test_dtype_choice(monkeypatch):
    monkeypatch.setattr(llm_loading, "_BF16", True)
    assert llm_loading.llm_dtype(None, gguf=True, cpu_only=True) == "bfloat16"
    assert llm_loading.llm_dtype(None, gguf=False, cpu_only=True) == "bfloat16"
    assert llm_loading.llm_dtype(None, gguf=False, cpu_only=False) is None    # checkpoint's own
    assert llm_loading.llm_dtype(None, gguf=True, cpu_only=False) == "float32"  # may move: as was
    assert llm_loading.llm_dtype("float32", gguf=True, cpu_only=True) == "float32"  # entry wins
    q = llm_loading.weight_quant
    monkeypatch.setattr(llm_loading, "_BF16", False)
    assert llm_loading.llm_dtype(None, gguf=True, cpu_only=True) == "float32"
    assert llm_loading.llm_dtype(None, gguf=False, cpu_only=True) is None
    assert q({}, entry_dtype=None, gguf=True, cpu_only=True) == "none"   # int8 is slow in fp32
    monkeypatch.setattr(llm_loading, "_BF16", True)
    assert q({}, entry_dtype=None, gguf=True, cpu_only=True) == "file"     # int4 where 4-bit
    assert q({}, entry_dtype=None, gguf=True, cpu_only=False) == "none"     # may go to a GPU
    assert q({}, entry_dtype="float32", gguf=True, cpu_only=True) == "none"   # dtype wins
    assert q({}, entry_dtype=None, gguf=False, cpu_only=True) == "none"
    assert q({"weight_quant": "int8"}, entry_dtype=None, gguf=False, cpu_only=False) == "int8"
    assert q({"weight_quant": "none"}, entry_dtype=None, gguf=True, cpu_only=True) == "none"
    assert q({"weight_quant": "int4"}, entry_dtype=None, gguf=False, cpu_only=False) == "int4"
    assert q({"weight_quant": "int4?"}, entry_dtype=None, gguf=True, cpu_only=True) == "file"


# ---- the int8 layers --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_matches_the_float_layer_on_both_paths(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True)
    q = Int8Linear.from_linear(lin, dtype)
    assert q.qweight.dtype == torch.int8 and q.scales.dtype == dtype
    w = lin.weight.detach()
    step = w.abs().amax() / 127                          # half a step, plus bfloat16's rounding
    assert (q.dequantized().float() - w).abs().max() <= step * 0.51 + w.abs().amax() * 2**-7
    for rows in (1, 3, INT8_ROWS, INT8_ROWS + 5):      # int8 kernel, then dequantise + GEMM
        x = torch.randn(rows, 64)
        want = lin(x)
        got = q(x.to(dtype)).float()
        assert got.shape == (rows, 96)
        assert (got - want).abs().max() < 0.03 * want.abs().max() + 0.02, rows
    x = torch.randn(2, 5, 64, dtype=dtype)               # batch x sequence: shape kept
    assert q(x).shape == (2, 5, 96)
    small = q(x[:, :1].contiguous())                     # the kernel and the GEMM agree
    big = torch.cat([q(x.reshape(10, 64).repeat(INT8_ROWS, 1))[:10].reshape(2, 5, 96)[:, :1]])
    assert (small.float() - big.float()).abs().max() < 0.02 * big.float().abs().max() + 0.02


def test_quantize_int8_replaces_every_linear_and_unties_the_head():
    model = tiny_llama(tie=True).to(torch.bfloat16)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        want = model(ids).logits.float()
    n = quantize_int8(model, torch.bfloat16)
    assert n == n_linear and len(int8_layers(model)) == n
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model.config.tie_word_embeddings is False
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(ids).logits.float()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    # the int8 tensors are buffers: whatever moves the weights (the residency) moves them
    names = {k for k, _ in model.named_buffers()}
    assert {f"lm_head.{s}" for s in ("qweight", "scales")} <= names


# ---- SmolLM2 through the actor ----------------------------------------------------------------
async def test_gguf_on_the_cpu_defaults_to_bf16_int4_and_int8_and_says_paris():
    actor, system = await start({})          # no GPU (no residency): the CPU default
    try:
        model = actor.model
        want = torch.bfloat16 if NATIVE_BF16 else torch.float32
        assert float_dtypes(model) == {want}                   # no float32 copy beside it
        # the file keeps the 30 x 7 decoder layers in Q4_1 (int4 here), the head in Q8_0 (int8)
        assert len(int4_layers(model)) == (210 if NATIVE_BF16 else 0)
        assert len(int8_layers(model)) == (1 if NATIVE_BF16 else 0)
        # every linear is int4 / int8 with native bfloat16; without it (an AVX2 CPU) they stay
        # float32 nn.Linear layers
        assert any(isinstance(m, torch.nn.Linear) for m in model.modules()) != NATIVE_BF16
        res = await actor.ask(paris(), timeout=300)
        assert "Paris" in res.text, res.text
        long = Chat(messages=[{"role": "user", "content": "Tell me a long story."}],
                    max_tokens=48, temperature=0, stream=TokenStream())
        task = asyncio.ensure_future(actor.ask(long, timeout=300))
        got = ""
        while not got.strip():
            item = await asyncio.wait_for(long.stream.get(), 120)
            assert isinstance(item, str), item
            got += item
        cache = actor.engine.runner.cache                      # while it decodes
        assert cache is not None and cache.keys[0].dtype == want   # KV in the model's dtype
        await task
        for _ in range(100):                                   # idle on the CPU: freed
            if actor._loop is None and actor.engine.runner.cache is None:
                break
            await asyncio.sleep(0.05)
        assert actor.engine.runner.cache is None
    finally:
        await system.stop_all()


async def test_weight_quant_none_keeps_bf16_linears_and_says_paris():
    actor, system = await start({"weight_quant": "none"})
    try:
        assert not int8_layers(actor.model)
        want = torch.bfloat16 if NATIVE_BF16 else torch.float32
        assert float_dtypes(actor.model) == {want}
        res = await actor.ask(paris(), timeout=300)
        assert "Paris" in res.text, res.text
    finally:
        await system.stop_all()


async def test_an_entrys_dtype_wins():
    actor, system = await start({}, dtype="float32", device="cpu")
    try:
        assert float_dtypes(actor.model) == {torch.float32}
        assert not int8_layers(actor.model)                    # auto: the entry asked float32
        res = await actor.ask(paris(), timeout=300)
        assert "Paris" in res.text, res.text
    finally:
        await system.stop_all()


async def test_int8_weights_go_through_a_residency_and_answer_the_same():
    """A flex model that may move (a residency: here the double that keeps them on the CPU)
    with weight_quant int8: the int8 layers and their scales are what the residency moves,
    and it answers the same as before the admit (the GPU test does it with real moves)."""
    await through_a_residency("int8", int4=0, int8=211)


def layer_bytes(layers) -> int:
    """The bytes of quantized layers' buffers (int8: qweight and scales; int4: packed and
    scale_zero)."""
    return sum(t.numel() * t.element_size() for lay in layers for t in lay.buffers())


async def through_a_residency(mode: str, *, int4: int, int8: int) -> set[str]:
    """SmolLM2 with ``weight_quant: mode`` behind a residency (the double that keeps the
    weights on the CPU): ``int4`` / ``int8`` layers of each kind, their buffers counted in what
    the residency moves, Paris, and the same answer twice. Returns the model's buffer names."""
    actor, system = await start({"weight_quant": mode}, residency=FakeResidency)
    try:
        res = actor.lease.residency
        fours, eights = int4_layers(actor.model), int8_layers(actor.model)
        assert (len(fours), len(eights)) == (int4, int8)
        assert res.weight_bytes >= layer_bytes(fours + eights)
        names = {k for k, _ in actor.model.named_buffers()}
        first = await actor.ask(paris(), timeout=300)
        assert res.admits >= 1 and "Paris" in first.text, first.text
        again = await actor.ask(paris(), timeout=300)
        assert again.text == first.text
        return names
    finally:
        await system.stop_all()
