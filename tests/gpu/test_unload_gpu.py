"""A stopped model actor frees its pinned host copy and its GPU copy at once (issue 11,
defect 3, on a real GPU): weak references to the module, the pinned master copy's storage and
the GPU copy's storage die when the actor stops (automatic garbage collection off, so a
reference cycle would show), pinned host memory goes back to what it was, and
torch.cuda.memory_allocated() returns to its baseline."""
from __future__ import annotations

import asyncio
import gc
import weakref

import torch
from test_model_actors_gpu import DOCS, TEXTS, build, build_tiny_llm

from agile_rag.actors.embedder_actor import EmbedderActor
from agile_rag.actors.llm_actor import LLMActor
from agile_rag.actors.messages import Chat, Describe, Embed, Rerank
from agile_rag.actors.model_base import live_weights
from agile_rag.actors.reranker_actor import RerankerActor
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.residency import WeightResidency
from agile_rag.runtime.system import ActorSystem

from support import gpu_bytes_in_use

MB = 2**20


def pinned_bytes() -> int | None:
    """Pinned host memory handed out by torch's host allocator now (None: not reported)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    try:
        value = stats().get("allocated_bytes.current")
    except RuntimeError:
        return None
    return None if value is None else int(value)


def refs_of(actor) -> list[weakref.ref]:
    res = actor.lease.residency
    assert res.pinned, "the host master copy should be pinned on a CUDA machine"
    refs = [weakref.ref(actor.torch_module()),
            weakref.ref(res.host_buffer.untyped_storage())]
    if res.on_gpu:
        refs.append(weakref.ref(next(actor.torch_module().parameters()).untyped_storage()))
    return refs


def test_stopped_models_free_their_pinned_host_copy_and_gpu_copy(tmp_path):
    emb = build(str(tmp_path / "emb"), False)
    ce = build(str(tmp_path / "ce"), True)
    llm_dir = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=256)

    async def go():
        system = ActorSystem()
        system.spawn(VRAMArbiter(1 << 32))
        base_gpu, base_pinned = gpu_bytes_in_use(), pinned_bytes()
        e = EmbedderActor(ModelSpec("embedder", "emb", emb, emb, device="cuda"))     # pinned
        r = RerankerActor(ModelSpec("reranker", "ce", ce, ce, backend="cross-encoder",
                                    max_tokens=64))                                   # flex
        llm = LLMActor(ModelSpec("llm", "tiny", llm_dir, llm_dir, max_tokens=256))
        for a in (e, r, llm):
            a.residency_factory = WeightResidency
            system.spawn(a)
            await a.ask(Describe())
        await e.ask(Embed(texts=TEXTS))
        await r.ask(Rerank(query="capital of france", documents=DOCS))
        res = await llm.ask(Chat(messages=[{"role": "user", "content": "capital of france"}],
                                 max_tokens=8), timeout=120)
        assert res.completion_tokens > 0
        assert all(a.lease.on_gpu for a in (e, r, llm))      # each one computed on the GPU
        refs = {a.name: refs_of(a) for a in (e, r, llm)}
        loaded_gpu, loaded_pinned = gpu_bytes_in_use(), pinned_bytes()
        gc.collect()
        gc.disable()                     # the unload path itself must free them
        try:
            for a in (e, r, llm):
                await system.stop(a.name)
            del a, e, r, llm, res
            alive = {name: sum(x() is not None for x in rs) for name, rs in refs.items()}
            watched = live_weights()
        finally:
            gc.enable()
        after_gpu, after_pinned = gpu_bytes_in_use(), pinned_bytes()
        await system.stop_all()
        return (base_gpu, loaded_gpu, after_gpu), (base_pinned, loaded_pinned, after_pinned), \
            alive, watched

    gpu, pinned, alive, watched = asyncio.run(go())
    assert not any(alive.values()), f"still referenced after stop: {alive}"
    assert not watched, watched
    base, loaded, after = gpu
    assert loaded - base > 4 * MB, gpu                     # the three models were on the GPU
    assert after - base < 2 * MB, f"GPU memory not back to baseline: {gpu}"
    if pinned[0] is not None:
        base, loaded, after = pinned
        assert loaded - base > 4 * MB, pinned              # their pinned master copies
        assert after - base < 2 * MB, f"pinned host memory not given back: {pinned}"
