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


async def loaded(models):
    """A real arbiter (no cap yet), the two flex encoders (a job's working memory told as
    WORK) and the LLM with real residencies, loaded: (system, arbiter, emb, ce, llm)."""
    emb_path, ce_path, llm_path = models
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
        a.working_bytes = lambda items, depth=2: WORK
    return system, arbiter, e, r, llm


def test_streamed_encoders_give_the_resident_results_and_the_llm_stays(models):

    async def go():
        system, arbiter, e, r, llm = await loaded(models)
        for a in (e, r):
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
        es, rs = e.lease.residency.stream_bytes, r.lease.residency.stream_bytes
        # the busy LLM and one encoder's streamed mode fit; a whole encoder does not
        arbiter.budget = llm_need + max(es, rs) + WORK + (1 << 20)
        assert arbiter.budget < llm_need + min(e.lease.residency.weight_bytes,
                                               r.lease.residency.weight_bytes) + WORK
        arbiter.peak_used = 0                   # (the reference phase had a bigger budget)
        long_ref = await llm.ask(Chat(messages=[{"role": "user", "content": "the city"}],
                                      max_tokens=400), timeout=120)
        since = len(system.tracer.events)
        # only jobs that ran while the chat was still decoding count (a fast chat may end
        # before an encoder asks: then the idle LLM's cache is trimmed instead, also right)
        beside: list[str] = []
        for _ in range(6):
            busy = asyncio.ensure_future(llm.ask(Chat(
                messages=[{"role": "user", "content": "the city"}], max_tokens=400),
                timeout=120))
            while not (llm.lease.busy and llm.engine is not None and llm.engine.running):
                await asyncio.sleep(0.001)
            mark = len(system.tracer.events)
            v = (await e.ask(Embed(texts=TEXTS))).vectors
            held_e = not busy.done()
            s = np.asarray((await r.ask(Rerank(query="capital of france",
                                                 documents=DOCS))).scores)
            held_r = not busy.done()
            assert np.allclose(v, want[1], atol=1e-3), (v, want[1])
            assert np.allclose(s, want[2], atol=1e-3), (s, want[2])
            got = await busy
            assert got.text == long_ref.text
            c = await chat()
            assert c.text == want[0].text
            assert llm.lease.residency.on_gpu
            for ev in list(system.tracer.events)[mark:]:
                mode = ev.detail.get("gpu_mode")
                if mode and (ev.actor == e.name and held_e or ev.actor == r.name and held_r):
                    beside.append(mode)
            if len(beside) >= 2:
                break
        events = list(system.tracer.events)[since:]
        assert beside and set(beside) == {"streamed"}, beside
        assert not [ev for ev in events if ev.actor == llm.name and
                    ev.msg_type in ("Revoke", "Yield")], "the LLM was evicted or paused"
        assert arbiter.peak_used <= arbiter.budget
        await system.stop_all()

    asyncio.run(go())


def test_a_card_the_llm_and_its_cache_fill_streams_the_encoders_in_the_cycle(models):
    """The 6 GiB shape at toy scale (session 13): the LLM's weights and idle cache fill the
    budget; a whole encoder fits only by evicting the LLM, its streamed mode once the LLM's
    cache goes. The seed's cycle (chat, embed, rerank, chat), after the LLM was evicted once
    and admitted again, trims the LLM's cache and streams the encoders: the LLM's weights never
    leave, and every result is the resident one."""

    async def go():
        system, arbiter, e, r, llm = await loaded(models)
        # what the LLM asks beyond its weights (its cache and activations): room for either
        # encoder's streamed mode, not for a whole encoder
        told = max(e.lease.residency.stream_bytes, r.lease.residency.stream_bytes) + WORK
        llm.working_bytes = lambda items: told

        def chat():
            return llm.ask(Chat(messages=[{"role": "user", "content": "paris is"}],
                                max_tokens=8), timeout=120)

        async def cycle():
            c1 = await chat()
            v = (await e.ask(Embed(texts=TEXTS))).vectors
            s = np.asarray((await r.ask(Rerank(query="capital of france",
                                                 documents=DOCS))).scores)
            return c1, v, s, await chat()
        want = await cycle()                             # references, everything resident
        for a in (e, r, llm):                            # a smaller card from here
            await a.ask(Revoke(model=a.name, reason="test"), timeout=30)
        spare = llm.working_bytes(1) + (1 << 20)
        arbiter.budget = llm.lease.residency.weight_bytes + spare
        arbiter.peak_used = 0
        for a in (e, r):
            res = a.lease.residency
            assert res.weight_bytes + WORK > spare >= res.stream_bytes + WORK
        since = len(system.tracer.events)
        for _ in range(3):
            c1, v, s, c2 = await cycle()
            assert c1.text == want[0].text and c2.text == want[3].text
            assert np.allclose(v, want[1], atol=1e-3), (v, want[1])
            assert np.allclose(s, want[2], atol=1e-3), (s, want[2])
        events = list(system.tracer.events)[since:]
        revokes = [ev for ev in events if ev.actor == llm.name and ev.msg_type == "Revoke"]
        assert not revokes, [ev.detail for ev in events if "weighed" in ev.detail]
        modes = [ev.detail["gpu_mode"] for ev in events
                 if ev.detail.get("gpu_mode") and ev.actor in (e.name, r.name)]
        assert len(modes) == 6 and set(modes) == {"streamed"}, modes
        assert llm.lease.residency.on_gpu
        assert arbiter.peak_used <= arbiter.budget
        await system.stop_all()

    asyncio.run(go())
