"""The whole server over HTTP with the GPU protocol switched on, on a CPU machine: the real
VRAM arbiter with a budget that holds the LLM or one encoder but never both, and a residency
double in place of the host-to-device copies (the weights stay where they are). Concurrent
streamed chats, embeddings and reranks then make the chat batch yield and the encoders
evict each other, the way they do on a small card. Every reply must equal the one the same
request gets with no contention; nothing may wait for the grant deadline or fall back to the
CPU; and the arbiter must end with nothing busy and nobody waiting."""
from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from agile_rag.actors.llm_actor import LLMActor
from agile_rag.actors.messages import RevokeAllFlex
from agile_rag.actors.model_base import ModelActor
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.configs import load_settings
from agile_rag.http.keys import SERVER
from agile_rag.runtime.streamed_residency import StreamableResidency
from agile_rag.server import Server, create_app

from support import CACHE, MINILM, SMOLLM, FakeResidency, sse_events

CHATS = [("Write a short story about a lighthouse keeper.", 40),
         ("Explain how rain forms, step by step.", 32),
         ("List some facts about the Moon.", 36)]
TEXTS = ["The tide rises twice a day.", "Bread needs yeast.", "The Moon pulls the sea."]
DOCS = ["The Moon's gravity raises the tides.", "Sourdough uses wild yeast.",
        "Tides rise and fall twice a day.", "Rivers flow to the sea."]


async def _serve_simulated(tmp_path, monkeypatch, factory, llm_params=None, max_tokens=2048):
    live = tmp_path / "liveconfigs.json"
    live.write_text(json.dumps({
        "standby_llms": ["smollm2"], "standby_embedders": ["minilm"],
        "standby_rerankers": ["minilm-rerank"],
        "llms": {"smollm2": {"llm_path": SMOLLM, "max_tokens": max_tokens}},
        "embedders": {"minilm": {"path": MINILM, "cuda_thres": 0}},
        "rerankers": {"minilm-rerank": {"path": MINILM, "kind": "bi-encoder"}},
        "llm_params": {"default_temp": 0, "gpu_min_slice_ms": 100, **(llm_params or {})}}))

    def start_arbiter(self):                       # what a CUDA machine gets, minus the copies
        self.system.spawn(VRAMArbiter(1 << 40, grant_timeout=30))
        self.residency_factory = factory

    monkeypatch.setattr(Server, "start_arbiter", start_arbiter)
    monkeypatch.setattr(ModelActor, "gpu_device", "cpu")
    app = create_app(load_settings(LIVECONFIGS_PATH=str(live), MODEL_CACHE_DIR=CACHE))
    return app


@contextlib.asynccontextmanager
async def _running(app):
    async with TestServer(app) as srv, aiohttp.ClientSession() as session:
        server = app[SERVER]
        for _ in range(1200):
            if all(a.state != "loading" for a in server.models()):
                break
            await asyncio.sleep(0.1)
        assert all(a.state == "ready" for a in server.models())
        yield srv, session, server


@pytest.fixture
async def simulated(tmp_path, monkeypatch):
    app = await _serve_simulated(tmp_path, monkeypatch, FakeResidency)
    async with _running(app) as running:
        yield running


class CpuStreamable(StreamableResidency):
    """Encoder residency double for a CPU machine: the resident mode is FakeResidency's (the
    weights stay where they are), the layer-streamed mode is the real one on a CPU 'device'
    (runtime/streamed_residency.py: the same hooks and slots as on a GPU, plain copies)."""

    resident = False

    def __init__(self, module):
        super().__init__(module, pin=False, device="cpu")

    def admit(self, device="cuda", *, streamed=False):
        if streamed:
            self.resident = False
            return super().admit(device, streamed=True)
        if self.streamed:
            self.stream.detach()
        self.resident = True
        return {"bytes": self.weight_bytes, "seconds": 0.0}

    def evict(self):
        if self.streamed:
            return super().evict()
        was, self.resident = self.resident, False
        return {"seconds": 0.0, "bytes": self.weight_bytes if was else 0}

    @property
    def on_gpu(self):
        return self.resident or self.streamed


class TimedResidency(FakeResidency):
    """The residency double, saying its admit took what a PCIe copy of the weights would."""

    def admit(self, device="cuda"):
        return {**super().admit(device), "seconds": self.weight_bytes / 25e9}


def streaming_encoders(module):
    """The LLM gets the residency double; the encoders the real layer-streamable residency
    on a CPU 'device' (the same hooks and slots as on a GPU, plain copies)."""
    if hasattr(module, "generate"):
        return TimedResidency(module)
    return CpuStreamable(module)


@pytest.fixture
async def simulated_streaming(tmp_path, monkeypatch):
    """As ``simulated``, with encoders that can run layer-streamed, and an LLM whose idle
    cache is small (a 6 GiB card's settings: a short context, ``batch_kv_tokens`` as small,
    no prefix store)."""
    # what the LLM says its weights' return and a trim cost it on the H200: its decode graphs
    # are captured again after an admit (0.8 s measured), not after a trim (its KV cache
    # comes back at the same addresses: runtime/stable_memory.py)
    monkeypatch.setattr(LLMActor, "restore_extra_s", 0.8)
    monkeypatch.setattr(LLMActor, "trim_extra_s", 0.0)
    app = await _serve_simulated(tmp_path, monkeypatch, streaming_encoders,
                                 {"batch_kv_tokens": 256, "prefix_cache_tokens": 0},
                                 max_tokens=256)
    async with _running(app) as running:
        yield running


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
    # its cache went: a Trim when it was idle, or at the end of a batch loop still open when
    # the encoder asked (a Yield for the cache only, answered when the loop ended on its own)
    assert any(e.actor == llm.name and (e.msg_type == "Trim" or e.detail.get("trimmed"))
               for e in events)
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


async def test_a_6gib_cycle_streams_the_encoders_beside_the_llm_weights(simulated_streaming):
    """Issue 13 at 6 GiB (session 13 on the H200): the LLM's weights and idle cache fill the
    card; an encoder's resident grant fits only by evicting the LLM, its smallest streamed
    grant once the LLM's cache goes. Every 1-query embed there evicted the LLM (6 GB back a
    cycle). The cycle must trim the LLM's cache and stream the encoders instead: after the
    first admit the LLM's weights never leave, and every reply is the reference."""
    srv, session, server = simulated_streaming
    arbiter = server.system.actors["vram-arbiter"]
    llm = server.registry.resolve("llm", None)
    emb = server.registry.resolve("embedder", None)
    rr = server.registry.resolve("reranker", None)
    llm_full = llm.lease.residency.weight_bytes + llm.working_bytes(1)
    want = [await chat(session, srv, CHATS[0][0], 8), await embed(session, srv, TEXTS[0]),
            await rerank(session, srv, TEXTS[1]), await chat(session, srv, CHATS[1][0], 8)]
    arbiter.tell(RevokeAllFlex(reason="a smaller card"))   # the references ran uncapped
    for _ in range(200):
        if not arbiter.state().used:
            break
        await asyncio.sleep(0.05)
    arbiter.budget = llm_full + (1 << 20)          # 1 MB beside the LLM and its cache
    arbiter.peak_used = 0
    spare = llm.working_bytes(1) + (1 << 20)
    for enc in (emb, rr):
        res = enc.lease.residency
        assert 0 < res.stream_bytes < res.weight_bytes
        assert res.weight_bytes + enc.working_bytes(1) > spare      # resident: evict the LLM
        assert res.stream_bytes + enc._stream_working_min() <= spare  # streamed: trim it
    evicts = None
    since = len(server.system.tracer.events)
    for _ in range(3):
        c1 = await chat(session, srv, CHATS[0][0], 8)
        if evicts is None:
            evicts = llm.lease.residency.evicts       # the LLM is on the card from here
        v = await embed(session, srv, TEXTS[0])
        r = await rerank(session, srv, TEXTS[1])
        c2 = await chat(session, srv, CHATS[1][0], 8)
        assert (c1, r, c2) == (want[0], want[2], want[3])
        assert np.allclose(v, want[1], atol=1e-5)
    events = list(server.system.tracer.events)[since:]
    assert llm.lease.residency.evicts == evicts, "the LLM's weights were evicted"
    modes = [e.detail["gpu_mode"] for e in events
             if e.detail.get("gpu_mode") and e.actor in (emb.name, rr.name)]
    assert len(modes) == 6 and set(modes) == {"streamed"}, modes
    # the trace says what the arbiter weighed (each room's cost, whom it evicts and why)
    weighed = [e.detail["weighed"] for e in events if e.msg_type == "RequestGrant" and
               e.detail.get("model") in (emb.name, rr.name) and "weighed" in e.detail]
    assert weighed and all("stream_s" in w and "streamed" in w for w in weighed), weighed
    assert arbiter.peak_used <= arbiter.budget
    assert not [e.detail for e in events if "gpu" in e.detail]      # no CPU fallback
