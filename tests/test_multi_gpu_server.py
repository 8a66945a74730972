"""The whole server over HTTP with two (simulated) GPUs, on a CPU machine: the real VRAM
arbiter with one budget per card and the residency double of test_simulated_gpu.py standing
for the copies. Pinned models on each card, a hot device flip cuda:0 -> cuda:1 through the
admin API (it edits liveconfigs.json), /health, /metrics and /admin/models naming each
grant's card, and the concurrent chats, embeddings and reranks of test_simulated_gpu.py over
two cards that each hold one model's job at a time: every reply equals its uncontended
reference."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from test_simulated_gpu import CHATS, DOCS, TEXTS, chat, embed, rerank

from agile_rag.actors.model_base import ModelActor
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.configs import load_settings
from agile_rag.http.keys import SERVER
from agile_rag.server import Server, create_app

from support import CACHE, MINILM, SMOLLM, FakeResidency

pytestmark = pytest.mark.timeout(900)
AUTH = {"Authorization": "Bearer adm"}
CARDS = ("cuda:0", "cuda:1")


async def start(tmp_path, monkeypatch, live_config: dict, budgets: dict):
    live = tmp_path / "liveconfigs.json"
    live.write_text(json.dumps(live_config))

    def start_arbiter(self):                       # two cards, minus the copies
        self.system.spawn(VRAMArbiter(dict(budgets), grant_timeout=30))
        self.residency_factory = FakeResidency

    monkeypatch.setattr(Server, "start_arbiter", start_arbiter)
    monkeypatch.setattr(ModelActor, "gpu_device", "cpu")
    return create_app(load_settings(LIVECONFIGS_PATH=str(live), MODEL_CACHE_DIR=CACHE,
                                    ADMIN_KEY="adm", DEBOUNCE_TIME=0.1))


async def ready(server):
    for _ in range(1200):
        if all(a.state != "loading" for a in server.models()):
            break
        await asyncio.sleep(0.1)
    assert all(a.state == "ready" for a in server.models())


def encoders(emb_device="flex", rr_device="flex") -> dict:
    return {"standby_llms": [], "standby_embedders": ["minilm"],
            "standby_rerankers": ["minilm-rerank"],
            "embedders": {"minilm": {"path": MINILM, "device": emb_device}},
            "rerankers": {"minilm-rerank": {"path": MINILM, "kind": "bi-encoder",
                                            "device": rr_device}}}


async def test_a_pinned_model_on_each_card_and_a_hot_flip(tmp_path, monkeypatch):
    app = await start(tmp_path, monkeypatch, encoders("cuda", "cuda:1"),
                      {c: 1 << 40 for c in CARDS})
    async with TestServer(app) as srv, aiohttp.ClientSession(headers=AUTH) as session:
        server = app[SERVER]
        await ready(server)
        arbiter = server.system.actors["vram-arbiter"]
        emb = server.registry.resolve("embedder", "minilm")
        rr = server.registry.resolve("reranker", "minilm-rerank")
        # "cuda" is cuda:0 (a file written for one GPU keeps its meaning); cuda:1 is card 1
        assert (emb.spec.placement, rr.spec.placement) == CARDS
        assert (emb.describe().gpu, rr.describe().gpu) == CARDS
        assert arbiter.state().placement == {"minilm": "cuda:0", "minilm-rerank": "cuda:1"}
        want_vec = await embed(session, srv, TEXTS[0])
        want_rank = await rerank(session, srv, TEXTS[1])

        async with session.get(srv.make_url("/health")) as r:
            health = await r.json()
        assert health["models"]["minilm"]["gpu"] == "cuda:0"
        assert health["models"]["minilm-rerank"]["gpu"] == "cuda:1"
        assert set(health["gpus"]) == set(CARDS)
        assert health["gpus"]["cuda:1"]["used"] == arbiter.holders["minilm-rerank"].nbytes

        # the hot flip: the embedder moves to card 1, card 0 is left empty
        async with session.post(srv.make_url("/admin/models/minilm/device"),
                                json={"device": "cuda:1"}) as r:
            body = await r.json()
            assert r.status == 200, body
        assert "device='cuda:1'" in json.dumps(body)
        assert json.loads((tmp_path / "liveconfigs.json").read_text())[
            "embedders"]["minilm"]["device"] == "cuda:1"
        emb = server.registry.resolve("embedder", "minilm")
        assert emb.describe().gpu == "cuda:1" and emb.lease.at == "cuda:1"
        st = arbiter.state()
        assert st.placement == {"minilm": "cuda:1", "minilm-rerank": "cuda:1"}
        assert st.devices["cuda:0"]["used"] == 0
        assert st.devices["cuda:1"]["used"] == sum(st.holders.values())
        assert np.allclose(await embed(session, srv, TEXTS[0]), want_vec, atol=1e-5)
        assert await rerank(session, srv, TEXTS[1]) == want_rank

        async with session.get(srv.make_url("/admin/models")) as r:
            admin = await r.json()
        assert {m["name"]: m["gpu"] for m in admin["models"]} == {
            "minilm": "cuda:1", "minilm-rerank": "cuda:1"}
        assert admin["gpu"]["placement"] == st.placement
        async with session.get(srv.make_url("/metrics")) as r:
            text = await r.text()
        assert 'agile_rag_gpu_holder_device{device="cuda:1",model="minilm"} 1.0' in text
        assert 'agile_rag_gpu_device_budget_bytes{device="cuda:0"}' in text
        assert 'agile_rag_gpu_device_grants_total{device="cuda:1",model="minilm"}' in text
        # the trace of the grant names its card
        grants = [e for e in server.system.tracer.events
                  if e.msg_type == "RequestGrant" and e.detail.get("model") == "minilm"
                  and "granted" in e.detail]
        assert [e.detail["device"] for e in grants][-1] == "cuda:1"
        assert any(e.detail.get("device") == "cuda:0" for e in grants)

        # back to flex, and a card the server does not have: refused with a clear 400 ...
        async with session.post(srv.make_url("/admin/models/minilm/device"),
                                json={"device": "cuda:x"}) as r:
            assert r.status == 400 and "cuda:N" in (await r.json())["error"]["message"]
        # ... or, when it parses, the model runs on the CPU with the reason logged
        async with session.post(srv.make_url("/admin/models/minilm/device"),
                                json={"device": "cuda:5"}) as r:
            assert r.status == 200
        emb = server.registry.resolve("embedder", "minilm")
        assert emb.describe().gpu is None
        assert np.allclose(await embed(session, srv, TEXTS[0]), want_vec, atol=1e-5)


async def test_flex_models_spread_over_two_cards(tmp_path, monkeypatch):
    """Two flex encoders, two cards that each hold one: each goes to the card with room,
    and neither is ever evicted."""
    app = await start(tmp_path, monkeypatch, encoders(), {c: 1 << 40 for c in CARDS})
    async with TestServer(app) as srv, aiohttp.ClientSession() as session:
        server = app[SERVER]
        await ready(server)
        arbiter = server.system.actors["vram-arbiter"]
        emb = server.registry.resolve("embedder", "minilm")
        need = emb.lease.residency.weight_bytes + emb.working_bytes(len(DOCS))
        for c in CARDS:
            arbiter.budgets[c] = need + need // 2
        want = [await embed(session, srv, t) for t in TEXTS]
        ranks = [await rerank(session, srv, q) for q in TEXTS[:2]]
        got = await asyncio.gather(*(embed(session, srv, t) for t in TEXTS * 3),
                                   *(rerank(session, srv, q) for q in TEXTS[:2] * 3))
        for vec, w in zip(got[:9], want * 3):
            assert np.allclose(vec, w, atol=1e-5)
        assert list(got[9:]) == ranks * 3
        st = arbiter.state()
        assert sorted(st.placement.values()) == list(CARDS)
        assert arbiter.revoked_count == 0, "each card had room for one: nothing to evict"


async def test_concurrent_work_over_two_cards(tmp_path, monkeypatch):
    """test_simulated_gpu.py's contended run over two cards, each of which holds the LLM or
    one encoder but not both: three models on two cards still take turns, and every reply is
    its uncontended reference."""
    config = {**encoders(), "standby_llms": ["smollm2"],
              # float32: greedy text that does not depend on what else is in the batch
              "llms": {"smollm2": {"llm_path": SMOLLM, "max_tokens": 2048, "dtype": "float32"}},
              "llm_params": {"default_temp": 0, "gpu_min_slice_ms": 100}}
    app = await start(tmp_path, monkeypatch, config, {c: 1 << 40 for c in CARDS})
    async with TestServer(app) as srv, aiohttp.ClientSession() as session:
        server = app[SERVER]
        await ready(server)
        arbiter = server.system.actors["vram-arbiter"]
        llm = server.registry.resolve("llm", None)
        emb = server.registry.resolve("embedder", None)
        need = {a.name: a.lease.residency.weight_bytes + a.working_bytes(1) for a in (llm, emb)}
        for c in CARDS:
            arbiter.budgets[c] = need[llm.name] + need[emb.name] // 2   # the LLM or an encoder
        want_chats = [await chat(session, srv, p, n) for p, n in CHATS]
        want_vecs = [await embed(session, srv, t) for t in TEXTS]
        want_ranks = [await rerank(session, srv, q) for q in TEXTS[:2]]
        assert all(want_chats)
        since = len(server.system.tracer.events)

        async def later(delay, coro):
            await asyncio.sleep(delay)
            return await coro
        jobs = [chat(session, srv, p, n) for p, n in CHATS]
        jobs += [later(0.2 + 0.3 * i, embed(session, srv, t)) for i, t in enumerate(TEXTS)]
        jobs += [later(0.3 + 0.4 * i, rerank(session, srv, q)) for i, q in enumerate(TEXTS[:2])]
        jobs += [later(0.5 + 0.2 * i, embed(session, srv, t)) for i, t in enumerate(TEXTS)]
        got = await asyncio.wait_for(asyncio.gather(*jobs), 600)

        assert got[:3] == want_chats
        for vec, want in zip(got[3:6] + got[8:11], want_vecs * 2):
            assert np.allclose(vec, want, atol=1e-5)
        assert got[6:8] == want_ranks
        events = list(server.system.tracer.events)[since:]
        granted = [e.detail for e in events if e.msg_type == "RequestGrant" and
                   "granted" in e.detail]
        assert {d["device"] for d in granted} == set(CARDS), "both cards took grants"
        fallbacks = [e.detail for e in events if "gpu" in e.detail]     # refused / timed out
        assert not fallbacks, fallbacks
        for c in CARDS:
            assert arbiter.peaks[c] <= arbiter.budgets[c]
        for _ in range(100):
            st = arbiter.state()
            if not st.busy and not st.waiting:
                break
            await asyncio.sleep(0.05)
        assert not st.busy and not st.waiting, st
        assert all(d["used"] <= d["budget"] for d in st.devices.values())


async def test_four_cards_and_a_flip_by_editing_the_file(tmp_path, monkeypatch):
    """Four cards: pinned models where the file says; then the file itself is edited (as a
    person would, the watcher applies it) to move the embedder from cuda:3 to cuda:1."""
    cards = [f"cuda:{i}" for i in range(4)]
    config = encoders("cuda:3", "cuda:2")
    app = await start(tmp_path, monkeypatch, config, {c: 1 << 40 for c in cards})
    async with TestServer(app) as srv, aiohttp.ClientSession() as session:
        server = app[SERVER]
        await ready(server)
        arbiter = server.system.actors["vram-arbiter"]
        assert arbiter.state().placement == {"minilm": "cuda:3", "minilm-rerank": "cuda:2"}
        want_vec = await embed(session, srv, TEXTS[1])
        want_rank = await rerank(session, srv, TEXTS[0])

        config["embedders"]["minilm"]["device"] = "cuda:1"
        (tmp_path / "liveconfigs.json").write_text(json.dumps(config))
        # the arbiter places the new version first; the version says so once its grant came
        # (CI, a loaded machine: a check in between saw gpu None)
        for _ in range(300):
            emb = server.registry.resolve("embedder", "minilm")
            if arbiter.state().placement.get("minilm") == "cuda:1" and \
                    emb.describe().gpu == "cuda:1":
                break
            await asyncio.sleep(0.05)
        st = arbiter.state()
        assert st.placement == {"minilm": "cuda:1", "minilm-rerank": "cuda:2"}
        assert st.devices["cuda:3"]["used"] == 0 and st.devices["cuda:0"]["used"] == 0
        assert emb.describe().gpu == "cuda:1"
        assert np.allclose(await embed(session, srv, TEXTS[1]), want_vec, atol=1e-5)
        assert await rerank(session, srv, TEXTS[0]) == want_rank
        async with session.get(srv.make_url("/health")) as r:
            health = await r.json()
        assert sorted(health["gpus"]) == cards
        assert {m: v["gpu"] for m, v in health["models"].items()} == {
            "minilm": "cuda:1", "minilm-rerank": "cuda:2"}
