"""The whole server over HTTP with the GPU protocol switched on, on a CPU machine: the real
VRAM arbiter with a budget that holds the LLM or one encoder but never both, and a residency
double in place of the host-to-device copies (the weights stay where they are). Concurrent
streamed chats, embeddings and reranks then make the chat batch yield and the encoders
evict each other, the way they do on a small card. Every reply must equal the one the same
request gets with no contention; nothing may wait for the grant deadline or fall back to the
CPU; and the arbiter must end with nothing busy and nobody waiting."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from agile_rag.actors.model_base import ModelActor
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.configs import load_settings
from agile_rag.http.keys import SERVER
from agile_rag.server import Server, create_app

from support import CACHE, MINILM, SMOLLM, FakeResidency, sse_events

CHATS = [("Write a short story about a lighthouse keeper.", 40),
         ("Explain how rain forms, step by step.", 32),
         ("List some facts about the Moon.", 36)]
TEXTS = ["The tide rises twice a day.", "Bread needs yeast.", "The Moon pulls the sea."]
DOCS = ["The Moon's gravity raises the tides.", "Sourdough uses wild yeast.",
        "Tides rise and fall twice a day.", "Rivers flow to the sea."]


@pytest.fixture
async def simulated(tmp_path, monkeypatch):
    live = tmp_path / "liveconfigs.json"
    live.write_text(json.dumps({
        "standby_llms": ["smollm2"], "standby_embedders": ["minilm"],
        "standby_rerankers": ["minilm-rerank"],
        "llms": {"smollm2": {"llm_path": SMOLLM, "max_tokens": 2048}},
        "embedders": {"minilm": {"path": MINILM, "cuda_thres": 0}},
        "rerankers": {"minilm-rerank": {"path": MINILM, "kind": "bi-encoder"}},
        "llm_params": {"default_temp": 0, "gpu_min_slice_ms": 100}}))

    def start_arbiter(self):                       # what a CUDA machine gets, minus the copies
        self.system.spawn(VRAMArbiter(1 << 40, grant_timeout=30))
        self.residency_factory = FakeResidency

    monkeypatch.setattr(Server, "start_arbiter", start_arbiter)
    monkeypatch.setattr(ModelActor, "gpu_device", "cpu")
    app = create_app(load_settings(LIVECONFIGS_PATH=str(live), MODEL_CACHE_DIR=CACHE))
    async with TestServer(app) as srv, aiohttp.ClientSession() as session:
        server = app[SERVER]
        for _ in range(1200):
            if all(a.state != "loading" for a in server.models()):
                break
            await asyncio.sleep(0.1)
        assert all(a.state == "ready" for a in server.models())
        yield srv, session, server


async def chat(session, srv, prompt: str, n: int) -> str:
    async with session.post(srv.make_url("/v1/chat/completions"), json={
            "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
            "stream": True}) as r:
        assert r.status == 200, await r.text()
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    return "".join(c["delta"].get("content") or "" for e in events[:-1]
                   for c in e.get("choices", []))


async def embed(session, srv, text: str) -> np.ndarray:
    async with session.post(srv.make_url("/v1/embeddings"), json={"input": text}) as r:
        body = await r.json()
        assert r.status == 200, body
        return np.asarray(body["data"][0]["embedding"])


async def rerank(session, srv, query: str) -> list:
    async with session.post(srv.make_url("/v1/rerank"),
                            json={"query": query, "documents": DOCS}) as r:
        body = await r.json()
        assert r.status == 200, body
        return [(x["index"], round(x["relevance_score"], 5)) for x in body["results"]]


async def test_concurrent_work_on_a_card_that_fits_one_model_at_a_time(simulated):
    srv, session, server = simulated
    arbiter = server.system.actors["vram-arbiter"]
    llm = server.registry.resolve("llm", None)
    emb = server.registry.resolve("embedder", None)
    need = {a.name: a.lease.residency.weight_bytes + a.working_bytes(1) for a in (llm, emb)}
    arbiter.budget = need[llm.name] + need[emb.name] // 2     # the LLM or an encoder
    # references: one request at a time (models still swap, but nothing waits on another)
    want_chats = [await chat(session, srv, p, n) for p, n in CHATS]
    want_vecs = [await embed(session, srv, t) for t in TEXTS]
    want_ranks = [await rerank(session, srv, q) for q in TEXTS[:2]]
    assert all(want_chats)
    since = len(server.system.tracer.events)

    async def later(delay, coro):
        await asyncio.sleep(delay)
        return await coro
    jobs = [chat(session, srv, p, n) for p, n in CHATS]
    jobs += [later(0.3 + 0.4 * i, embed(session, srv, t)) for i, t in enumerate(TEXTS)]
    jobs += [later(0.5 + 0.6 * i, rerank(session, srv, q)) for i, q in enumerate(TEXTS[:2])]
    got = await asyncio.wait_for(asyncio.gather(*jobs), 600)

    assert got[:3] == want_chats                      # paused and resumed, same words
    for vec, want in zip(got[3:6], want_vecs):
        assert np.allclose(vec, want, atol=1e-5)
    assert got[6:] == want_ranks
    events = list(server.system.tracer.events)[since:]
    assert any(e.msg_type == "Yield" for e in events), "the chat batch never had to yield"
    assert any(e.msg_type == "BatchIdle" and e.detail.get("yielded") for e in events)
    fallbacks = [e.detail for e in events if "gpu" in e.detail]   # refused / timed out
    assert not fallbacks, fallbacks
    waits = [e.detail["grant_wait_s"] for e in events if "grant_wait_s" in e.detail]
    assert waits and max(waits) < 10, waits            # slices of the batch, not its length
    assert arbiter.peak_used <= arbiter.budget
    for _ in range(100):                               # the last job's JobFinished
        state = arbiter.state()
        if not state.busy and not state.waiting:
            break
        await asyncio.sleep(0.05)
    assert not state.busy and not state.waiting, state
    assert state.used <= arbiter.budget


async def test_the_seed_cycle_keeps_the_llm_weights_on_the_card(simulated):
    """Issue 13: under a budget that holds the LLM with its cache, or the LLM's weights with
    the encoders, but never all of it, the seed's cycle (chat, embed, rerank, chat) takes the
    idle LLM's cache (Trim) and idle encoders, never the LLM's weights: after the first
    admit the LLM is not evicted again, nothing yields, and every reply is the reference."""
    srv, session, server = simulated
    arbiter = server.system.actors["vram-arbiter"]
    llm = server.registry.resolve("llm", None)
    emb = server.registry.resolve("embedder", None)
    # the LLM with its cache fits; its weights with an encoder's job fit; all three do not
    rr = server.registry.resolve("reranker", None)
    enc = max(emb.lease.residency.weight_bytes + emb.working_bytes(1),
              rr.lease.residency.weight_bytes + rr.working_bytes(len(DOCS)))
    full = llm.lease.residency.weight_bytes + llm.working_bytes(1)
    arbiter.budget = full + enc // 2
    assert llm.working_bytes(1) >= enc // 2       # the LLM's weights and an encoder's job fit

    async def cycle():
        return (await chat(session, srv, CHATS[0][0], 8), await embed(session, srv, TEXTS[0]),
                await rerank(session, srv, TEXTS[1]), await chat(session, srv, CHATS[1][0], 8))
    want = [await cycle() for _ in range(2)]
    evicts = llm.lease.residency.evicts
    since = len(server.system.tracer.events)
    for _ in range(3):
        c1, v, r, c2 = await cycle()
        assert (c1, r, c2) == (want[0][0], want[0][2], want[0][3])
        assert np.allclose(v, want[0][1], atol=1e-5)
    events = list(server.system.tracer.events)[since:]
    assert llm.lease.residency.evicts == evicts, "the LLM's weights were evicted"
    assert any(e.msg_type == "Trim" and e.actor == llm.name for e in events)
    # no chat paused (a Yield may reach a loop that is ending anyway: it changes nothing)
    assert not any(e.msg_type == "BatchIdle" and e.detail.get("yielded") for e in events)
    assert not any(e.detail.get("preempted") for e in events if e.msg_type == "Chat")
    assert arbiter.peak_used <= arbiter.budget
    assert not [e.detail for e in events if "gpu" in e.detail]      # no CPU fallback


async def test_an_encoder_that_fits_beside_a_busy_batch_runs_without_a_yield(simulated):
    srv, session, server = simulated
    arbiter = server.system.actors["vram-arbiter"]
    llm = server.registry.resolve("llm", None)
    emb = server.registry.resolve("embedder", None)
    arbiter.budget = (llm.lease.residency.weight_bytes + llm.working_bytes(1) +
                      emb.lease.residency.weight_bytes + emb.working_bytes(1))
    want = await embed(session, srv, TEXTS[2])
    since = len(server.system.tracer.events)
    streaming = asyncio.ensure_future(chat(session, srv, "Write a long story about a dragon.", 60))
    while not llm.lease or not llm.lease.busy:
        await asyncio.sleep(0.01)
    got = await embed(session, srv, TEXTS[2])
    assert not streaming.done(), "the embedding should have run while the chat decoded"
    assert np.allclose(got, want, atol=1e-5)
    assert await streaming
    events = list(server.system.tracer.events)[since:]
    assert not any(e.msg_type == "Yield" for e in events)
