"""The model side of GPU residency, with the real MiniLM models and the real VRAM arbiter.

No GPU here: a residency double records admits and evicts while the weights stay on the CPU,
so the protocol (who asks, who is revoked, who releases) is tested without CUDA."""
from __future__ import annotations

import dataclasses

import pytest

from agile_rag.actors.embedder_actor import EmbedderActor
from agile_rag.actors.messages import Describe, Embed, Rerank, UpdateModel
from agile_rag.actors.reranker_actor import RerankerActor
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.system import ActorSystem

from support import FakeResidency, minilm_dir

MB = 2**20


def spec(kind, name, **kw):
    path = minilm_dir()
    return ModelSpec(kind, name, path, path, **{"backend": "bi-encoder"} if kind == "reranker"
                     else {}, **kw)


async def start(budget_mb, *actors):
    system = ActorSystem()
    arbiter = system.spawn(VRAMArbiter(budget_mb * MB, grant_timeout=10))
    for a in actors:
        a.residency_factory = FakeResidency
        a.gpu_device = "cpu"
        system.spawn(a)
        await a.ask(Describe())                       # loaded
    return system, arbiter


async def test_cpu_model_never_asks_and_cuda_thres_keeps_small_jobs_on_cpu():
    cpu = EmbedderActor(spec("embedder", "cpu-only", device="cpu"))
    flex = EmbedderActor(spec("embedder", "flex", device="flex", cuda_thres=5))
    system, arbiter = await start(1000, cpu, flex)
    await cpu.ask(Embed(texts=["a"] * 10))
    assert cpu.lease is None and arbiter.granted_count == 0
    await flex.ask(Embed(texts=["a", "b"]))                  # 2 < cuda_thres: CPU, no ask
    assert arbiter.granted_count == 0 and flex.lease.residency.admits == 0
    await flex.ask(Embed(texts=["a"] * 6))                    # big enough: granted and admitted
    assert arbiter.granted_count == 1 and flex.lease.residency.admits == 1
    assert "flex" in (await arbiter.ask(Describe())).holders
    await flex.ask(Embed(texts=["a"]))                        # already resident: uses the GPU again
    assert arbiter.granted_count == 2 and flex.lease.residency.admits == 1
    await system.stop_all()


async def test_idle_on_cpu_releases_right_after_the_job():
    r = RerankerActor(spec("reranker", "rr", device="flex", idle_on_cpu=True))
    system, arbiter = await start(1000, r)
    result = await r.ask(Rerank(query="capital of France",
                                documents=["Paris is in France.", "Bananas."]))
    assert result.scores[0] > result.scores[1]
    state = await arbiter.ask(Describe())
    assert state.holders == {} and r.lease.residency.admits == 1 == r.lease.residency.evicts
    await system.stop_all()


async def test_the_idle_holder_is_revoked_for_the_model_with_work():
    e = EmbedderActor(spec("embedder", "emb", device="flex"))
    r = RerankerActor(spec("reranker", "rr", device="flex"))
    # room for one model's job at a time: not even the idle embedder's weights beside the
    # reranker's job (with 250 MB, trimming the embedder's working memory was enough)
    system, arbiter = await start(200, e, r)
    await e.ask(Embed(texts=["hello"]))
    assert (await arbiter.ask(Describe())).holders.keys() == {"emb"}
    await r.ask(Rerank(query="q", documents=["a", "b"]))
    state = await arbiter.ask(Describe())
    assert state.holders.keys() == {"rr"}
    assert e.lease.residency.evicts == 1 and not e.lease.residency.on_gpu
    assert e.describe().device == "cpu" and r.describe().device == "cuda"
    assert arbiter.peak_used <= 200 * MB
    events = [ev for ev in system.tracer.events if ev.actor == "emb" and ev.msg_type == "Revoke"]
    assert events and "evict_s" in events[0].detail
    await system.stop_all()


async def test_a_cuda_pinned_model_is_never_evicted_and_others_fall_back_to_cpu():
    pinned = EmbedderActor(spec("embedder", "pinned", device="cuda"))
    r = RerankerActor(spec("reranker", "rr", device="flex"))
    system, arbiter = await start(250, pinned, r)
    assert pinned.lease.residency.on_gpu                # pinned at load
    result = await r.ask(Rerank(query="capital of France",
                                documents=["Paris is in France.", "Bananas."]))
    assert result.scores[0] > result.scores[1]          # served, on the CPU
    assert r.lease.residency.admits == 0 and pinned.lease.residency.evicts == 0
    gpu = [ev for ev in system.tracer.events if ev.actor == "rr" and "gpu" in ev.detail]
    assert "refused" in gpu[-1].detail["gpu"]
    await system.stop_all()


async def test_device_changes_release_and_pin():
    e = EmbedderActor(spec("embedder", "emb", device="flex"))
    system, arbiter = await start(1000, e)
    await e.ask(Embed(texts=["x"]))
    assert e.lease.residency.on_gpu
    await e.ask(UpdateModel(spec=dataclasses.replace(e.spec, device="cpu"), params=e.params))
    assert not e.lease.residency.on_gpu and (await arbiter.ask(Describe())).holders == {}
    await e.ask(Embed(texts=["x"] * 50))
    assert not e.lease.residency.on_gpu                 # cpu: never asks
    await e.ask(UpdateModel(spec=dataclasses.replace(e.spec, device="cuda"), params=e.params))
    assert e.lease.residency.on_gpu and "emb" in (await arbiter.ask(Describe())).holders
    await system.stop_all()




async def test_gpu_out_of_memory_gives_back_retries_once_then_503():
    import torch

    from agile_rag.runtime.errors import Overloaded

    e = EmbedderActor(spec("embedder", "emb", device="flex"))
    system, arbiter = await start(1000, e)
    real = e._encode
    fails = {"left": 1}

    def encode(texts):
        if e.lease.residency.on_gpu and fails["left"] > 0:
            fails["left"] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(texts)
    e._encode = encode
    result = await e.ask(Embed(texts=["retried"]))                # first OOM: give back, ask, retry
    assert result.vectors.shape == (1, 384)
    assert e.lease.residency.evicts == 1 and e.lease.residency.admits == 2
    grants = [ev for ev in system.tracer.events if ev.msg_type == "RequestGrant"]
    assert grants[-1].detail["nbytes"] > grants[-2].detail["nbytes"]   # asked for more room
    fails["left"] = 2
    with pytest.raises(Overloaded, match="ran out of GPU memory twice"):
        await e.ask(Embed(texts=["twice"]))
    assert (await arbiter.ask(Describe())).holders == {}     # nothing left held
    assert (await e.ask(Embed(texts=["after"]))).vectors.shape == (1, 384)
    await system.stop_all()
