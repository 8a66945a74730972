"""Dynamic batching: concurrent requests share forward passes and still get their own results.

Over real HTTP (the session server): many concurrent embedding and rerank requests of different
texts and sizes each get exactly what they would get alone, in their own order. In process (a
real EmbedderActor / RerankerActor in an ActorSystem): the batches really form, a bad request
fails alone, and the load-test script runs end to end without matplotlib."""
from __future__ import annotations

import asyncio
import json
import os
import random
import sys

import aiohttp
import numpy as np
import pytest

from agile_rag.actors.embedder_actor import EmbedderActor
from agile_rag.actors.messages import Describe, Embed, Rerank
from agile_rag.actors.reranker_actor import RerankerActor
from agile_rag.runtime.actor import Actor
from agile_rag.runtime.errors import ActorStopped, InvalidRequest
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.system import ActorSystem

from support import ROOT, minilm_dir

WORDS = ("apple river engine garden winter violin harbour ladder forest rocket planet coffee "
         "museum bridge storm island kitchen doctor teacher camera bicycle window lamp "
         "mountain letter bread music train library city market").split()


def texts_for(rng: random.Random, n: int, tag: str) -> list[str]:
    """``n`` distinct texts of very different lengths (padding inside a batch must not leak)."""
    return [f"{tag}-{k}: " + " ".join(rng.choice(WORDS) for _ in range(rng.choice((1, 3, 9, 40))))
            for k in range(n)]


async def post(session, url: str, body: dict) -> dict:
    async with session.post(url, json=body) as r:
        payload = await r.json()
        assert r.status == 200, payload
        return payload


# ---- over HTTP ---------------------------------------------------------------------------------
async def test_concurrent_embedding_requests_get_their_own_vectors(v1):
    rng = random.Random(5)
    requests = []
    for i in range(64):
        texts = texts_for(rng, rng.choice((1, 1, 2, 3, 5, 8)), f"r{i}")
        body = {"model": "minilm", "input": texts[0] if len(texts) == 1 and i % 2 else texts}
        if i % 7 == 3:
            body["dimensions"] = 128                # per-request truncation inside a batch
        requests.append((texts, body))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        url = v1 + "/embeddings"
        together = await asyncio.gather(*(post(s, url, body) for _, body in requests))
        alone = {}
        for texts, _ in requests:                   # every text on its own, one at a time
            for t in texts:
                alone[t] = np.array((await post(s, url, {"model": "minilm", "input": t}))
                                    ["data"][0]["embedding"], dtype=np.float32)
    for (texts, body), got in zip(requests, together):
        assert [d["index"] for d in got["data"]] == list(range(len(texts)))
        dims = body.get("dimensions")
        for t, d in zip(texts, got["data"]):
            want = alone[t]
            if dims:
                want = want[:dims] / np.linalg.norm(want[:dims])
            vec = np.array(d["embedding"], dtype=np.float32)
            assert vec.shape == want.shape
            np.testing.assert_allclose(vec, want, atol=2e-5, err_msg=t)


@pytest.mark.parametrize("model", ["minilm-rerank", "tiny-ce"])
async def test_concurrent_rerank_requests_get_their_own_scores(v1, model):
    rng = random.Random(11 if model == "tiny-ce" else 7)
    requests = []
    for i in range(24):
        docs = texts_for(rng, rng.choice((1, 2, 4, 7, 12)), f"q{i}-doc")
        requests.append({"model": model, "query": f"query {i}: " + rng.choice(WORDS),
                         "documents": docs, "return_documents": True})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        url = v1 + "/rerank"
        together = await asyncio.gather(*(post(s, url, body) for body in requests))
        alone = [await post(s, url, body) for body in requests]
    for body, got, want in zip(requests, together, alone):
        assert len(got["results"]) == len(body["documents"])
        scores = [r["relevance_score"] for r in got["results"]]
        assert scores == sorted(scores, reverse=True)             # best first
        for r in got["results"]:                                  # its own documents
            assert r["document"]["text"] == body["documents"][r["index"]]
        got_by_index = {r["index"]: r["relevance_score"] for r in got["results"]}
        want_by_index = {r["index"]: r["relevance_score"] for r in want["results"]}
        assert sorted(got_by_index) == list(range(len(body["documents"])))
        for i in want_by_index:
            assert got_by_index[i] == pytest.approx(want_by_index[i], abs=2e-5)
        assert got["usage"]["total_tokens"] == want["usage"]["total_tokens"]


# ---- in process: batches really form -----------------------------------------------------------
def _spec(kind: str, name: str) -> ModelSpec:
    path = minilm_dir()
    extra = {"backend": "bi-encoder"} if kind == "reranker" else {}
    return ModelSpec(kind, name, path, path, device="cpu", **extra)


async def _batch_sizes(system: ActorSystem, actor: str, key: str) -> list[int]:
    return [e.detail[key] for e in system.tracer.events
            if e.actor == actor and key in e.detail]


async def test_embedder_batches_form_and_a_bad_request_fails_alone():
    system = ActorSystem()
    emb = system.spawn(EmbedderActor(_spec("embedder", "emb"), {"token_estimation": "re"}))
    try:
        await emb.ask(Describe(), timeout=120)                         # loaded
        rng = random.Random(3)
        jobs = [texts_for(rng, 1 + i % 4, f"b{i}") for i in range(20)]
        alone = [(await emb.ask(Embed(texts=t), timeout=60)).vectors for t in jobs]
        before = len(system.tracer.events)
        msgs = [Embed(texts=t) for t in jobs]
        msgs.insert(5, Embed(texts=["too wide"], dimensions=10_000))    # invalid, in the middle
        results = await asyncio.gather(*(emb.ask(m, timeout=60) for m in msgs),
                                       return_exceptions=True)
        assert isinstance(results.pop(5), InvalidRequest)
        for got, want in zip(results, alone):
            assert got.vectors.shape == want.shape
            np.testing.assert_allclose(got.vectors, want, atol=2e-5)
        events = [e for e in list(system.tracer.events)[before:] if e.msg_type == "Embed"]
        batched = [e.detail["batch_texts"] for e in events if "batch_texts" in e.detail]
        total = sum(len(t) for t in jobs)
        assert max(batched) > max(len(t) for t in jobs), batched    # requests shared a forward
        assert max(batched) == total, batched                      # here: all in one batch
        starts = {e.started for e in events if e.outcome == "ok"}
        assert len(starts) < len(jobs)
    finally:
        await system.stop_all()


async def test_reranker_batches_form_and_scores_stay_with_their_request():
    system = ActorSystem()
    rr = system.spawn(RerankerActor(_spec("reranker", "rr")))
    try:
        await rr.ask(Describe(), timeout=120)
        rng = random.Random(4)
        jobs = [Rerank(query=f"query {i} " + rng.choice(WORDS),
                       documents=texts_for(rng, 1 + i % 5, f"d{i}"))
                for i in range(12)]
        alone = [(await rr.ask(j, timeout=60)).scores for j in jobs]
        before = len(system.tracer.events)
        together = await asyncio.gather(*(rr.ask(j, timeout=60) for j in jobs))
        for got, want in zip(together, alone):
            assert got.scores == pytest.approx(want, abs=2e-5)
        pairs = [e.detail["batch_pairs"] for e in list(system.tracer.events)[before:]
                 if "batch_pairs" in e.detail]
        assert max(pairs) == sum(len(j.documents) for j in jobs), pairs
    finally:
        await system.stop_all()


# ---- the linger window of the actor core ---------------------------------------------------------
class _Collector(Actor):
    batching = True
    max_batch = 64

    def __init__(self, linger: float, name: str = "collector"):
        super().__init__(name)
        self.batch_linger_s = linger
        self.batches: list[list[int]] = []

    def joinable(self, msg) -> bool:
        return isinstance(msg, int)

    async def handle(self, msg, env):
        if isinstance(msg, int):
            return (await self.handle_batch([env]))[0]
        return f"control:{msg}"

    async def handle_batch(self, envs):
        self.batches.append([e.msg for e in envs])
        await asyncio.sleep(0.01)                                   # a "forward"
        return [e.msg * 10 for e in envs]


async def _trickle(actor: Actor, n: int, gap: float) -> list:
    """``n`` asks arriving one by one, ``gap`` seconds apart (0: one loop turn apart)."""
    async def one(i: int):
        await asyncio.sleep(i * gap) if gap else [await asyncio.sleep(0) for _ in range(i)]
        return await actor.ask(i, timeout=5)
    return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.parametrize("linger", [0.0, 0.05])
async def test_linger_lets_a_trickle_share_the_first_batch(linger):
    system = ActorSystem()
    a = system.spawn(_Collector(linger))
    try:
        assert await _trickle(a, 12, 0.0002) == [i * 10 for i in range(12)]
        if linger:
            assert a.batches == [list(range(12))]                  # one forward for all
        else:
            assert a.batches[0] == [0] and len(a.batches) >= 2    # the first ran alone
        a.batches.clear()
        assert await a.ask(99, timeout=5) == 990                   # a lone request: one batch
        assert a.batches == [[99]]
    finally:
        await system.stop_all()


async def test_linger_is_bounded_and_ends_at_a_quiet_gap_or_a_control_message():
    system = ActorSystem()
    long = system.spawn(_Collector(0.5, "long"))
    short = system.spawn(_Collector(0.03, "short"))
    loop = asyncio.get_running_loop()
    try:
        await long.ask(0, timeout=5)
        await short.ask(0, timeout=5)
        t0 = loop.time()
        assert await long.ask(1, timeout=5) == 10               # alone: one quiet gap, not 0.5 s
        assert loop.time() - t0 < 0.25
        short.batches.clear()
        await _trickle(short, 40, 0.002)                         # a steady trickle for 80 ms
        assert len(short.batches[0]) < 40                        # the window is capped
        assert [m for b in short.batches for m in b] == list(range(40))   # order kept

        long.batch_linger_gap_s = 0.05
        long.batches.clear()
        t0 = loop.time()
        first = asyncio.ensure_future(long.ask(5, timeout=5))   # lingers on 5 ...
        feed = asyncio.ensure_future(_trickle(long, 30, 0.01))  # ... kept alive by a trickle
        await asyncio.sleep(0.06)
        assert not first.done()
        assert await long.ask("describe", timeout=5, priority=0) == "control:describe"
        assert await first == 50 and loop.time() - t0 < 0.3    # the control message ended it
        await feed
    finally:
        await system.stop_all()


def test_model_actors_linger_by_default_and_params_set_it():
    emb = EmbedderActor(_spec("embedder", "e"), {})
    rr = RerankerActor(_spec("reranker", "r"), {"batch_linger_ms": 0})
    assert emb.batch_linger_s == 0.05 and rr.batch_linger_s == 0.0
    for bad in ("5", -1, True, 5000, None):
        assert EmbedderActor(_spec("embedder", "e"), {"batch_linger_ms": bad}).batch_linger_s \
            == 0.05
    emb.update(emb.spec, {"batch_linger_ms": 12})                 # a live config edit
    assert emb.batch_linger_s == 0.012


async def test_stopping_while_lingering_loses_no_request():
    system = ActorSystem()
    a = system.spawn(_Collector(5.0))
    a.batch_linger_gap_s = 1.0
    await asyncio.sleep(0)
    pending = asyncio.ensure_future(a.ask(7, timeout=10))
    await asyncio.sleep(0.05)                                      # now lingering
    await system.stop("collector")
    with pytest.raises(ActorStopped):
        await asyncio.wait_for(pending, 2)
    await system.stop_all()


# ---- the load-test script ---------------------------------------------------------------------
def test_loadtest_script_writes_json_without_matplotlib(base, tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import loadtest
    finally:
        sys.path.pop(0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import fails: JSON only
    out = tmp_path / "load"
    rc = loadtest.main(["--url", base + "/v1", "--concurrency", "1,4", "--duration", "1",
                        "--mix", "chat=1,embed=4,rerank=2", "--max-tokens", "2",
                        "--model", "chat=smollm2,embed=minilm,rerank=tiny-ce",
                        "--grace", "60", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "loadtest.json").read_text())
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4]
    for lv in data["levels"]:
        assert lv["errors"] == 0 and lv["cut"] == 0
        assert lv["kinds"]["embed"]["ok"] > 0 and lv["kinds"]["embed"]["p50_s"] > 0
    assert not list(out.glob("*.png"))


def test_cpu_peers_pools_runs_round_by_round(tmp_path, capsys):
    """``cpu_peers.py --pool``: every round of every run, medians and the median of the
    per-round ratios (each round against the peer's figure of the same round and run)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import cpu_peers
    finally:
        sys.path.pop(0)

    def run(ours, peer):
        return {"runs": {"chat x1": {
            "ours": [{"round": i, "value": v} for i, v in enumerate(ours)],
            "llama.cpp": [{"round": i, "value": v} for i, v in enumerate(peer)]}}}
    files = []
    for i, (ours, peer) in enumerate([([10, 20, 30], [20, 20, 20]), ([40, 50], [40, 100])]):
        f = tmp_path / f"run{i}.json"
        f.write_text(json.dumps(run(ours, peer)))
        files.append(str(f))
    out = tmp_path / "pooled"
    assert cpu_peers.main(["--pool", *files, "--out", str(out)]) == 0
    md = (tmp_path / "pooled.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| chat x1"))
    # ours 10..50 -> 30; peer 20, 20, 20, 40, 100 -> 20; ratios .5, 1, 1.5, 1, .5 -> 1
    assert row == "| chat x1 | llama.cpp | 5 | 30.0 | 20.0 | 1.50 | 1.00 |"
    assert "2 runs pooled" in capsys.readouterr().out
