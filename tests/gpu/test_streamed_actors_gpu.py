"""Layer-streamed encoders through the real actors, arbiter and residencies on the GPU: under
a budget that holds the LLM and the encoders' streamed modes but not the whole encoders, the
embedder and the cross-encoder run streamed with the resident model's results, and the LLM's
weights stay on the GPU throughout (issue 13)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from test_model_actors_gpu import DOCS, TEXTS, build, build_tiny_llm, spawn_pair

from agile_rag.actors.llm_actor import LLMActor
from agile_rag.actors.messages import Chat, Describe, Embed, Rerank, Revoke
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.residency import WeightResidency
from agile_rag.runtime.system import ActorSystem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
WORK = 16 << 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("streamed")
    return (build(str(d / "emb"), False), build(str(d / "ce"), True),
            build_tiny_llm(str(d / "llm"), hidden=256, max_positions=512, words_only=True))


def test_streamed_encoders_give_the_resident_results_and_the_llm_stays(models):
    emb_path, ce_path, llm_path = models

    async def go():
        system = ActorSystem()
        arbiter = system.spawn(VRAMArbiter(1 << 36, grant_timeout=30))
        e, r = spawn_pair(system, emb_path, ce_path, device="flex")
        llm = LLMActor(ModelSpec("llm", "tiny", llm_path, llm_path, max_tokens=512),
                       {"batch_kv_tokens": 1024})
        llm.residency_factory = WeightResidency
        system.spawn(llm)
        for a in (e, r, llm):
            assert (await a.ask(Describe(), timeout=120)).state == "ready"
        for a in (e, r):
            a.working_bytes = lambda items: WORK
            assert 0 < a.lease.residency.stream_bytes < a.lease.residency.weight_bytes

        def chat():
            return llm.ask(Chat(messages=[{"role": "user", "content": "paris is"}],
                                max_tokens=8), timeout=120)
        # references, everything resident
        want = (await chat(), (await e.ask(Embed(texts=TEXTS))).vectors,
                np.asarray((await r.ask(Rerank(query="capital of france", documents=DOCS))
                            ).scores))
        assert e.describe().gpu_mode == "resident" and r.describe().gpu_mode == "resident"
        for a in (e, r):
            await a.ask(Revoke(model=a.name, reason="test"), timeout=30)
        llm_need = llm.lease.residency.weight_bytes + llm.working_bytes(1)
        arbiter.budget = (llm_need + e.lease.residency.stream_bytes +
                          r.lease.residency.stream_bytes + 2 * WORK + (1 << 20))
        # each encoder must stream: whichever one runs whole, the other does not fit beside it
        assert arbiter.budget < (llm_need + min(e.lease.residency.weight_bytes,
                                                r.lease.residency.weight_bytes) +
                                 max(e.lease.residency.stream_bytes,
                                     r.lease.residency.stream_bytes) + 2 * WORK)
        evicts = llm.lease.residency
        torch.cuda.synchronize()
        for _ in range(3):
            c1 = await chat()
            v = (await e.ask(Embed(texts=TEXTS))).vectors
            s = np.asarray((await r.ask(Rerank(query="capital of france",
                                                 documents=DOCS))).scores)
            c2 = await chat()
            assert c1.text == want[0].text == c2.text and c1.text
            assert np.allclose(v, want[1], atol=1e-3), (v, want[1])
            assert np.allclose(s, want[2], atol=1e-3), (s, want[2])
            assert e.describe().gpu_mode == "streamed" and r.describe().gpu_mode == "streamed"
            assert llm.lease.residency.on_gpu
        modes = [ev.detail.get("gpu_mode") for ev in system.tracer.events
                 if ev.actor in (e.name, r.name) and ev.detail.get("gpu_mode")]
        assert modes.count("streamed") >= 6, modes
        revokes = [ev for ev in system.tracer.events if ev.actor == llm.name and
                   ev.msg_type == "Revoke"]
        assert not revokes, "the LLM's weights were evicted"
        assert arbiter.peak_used <= 1 << 36 and evicts is llm.lease.residency
        await system.stop_all()

    asyncio.run(go())
