"""The lean request path (issue 14): per-request metrics kept as plain numbers and folded into
prometheus in bulk, one middleware for request ids, keys and errors; what is observable stays
the same (every request counted and timed, traced with its id, its answer unchanged)."""
from __future__ import annotations

import asyncio
import random

import aiohttp
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram
from test_traces import metric_samples, sample


def test_bulk_observations_fill_the_same_buckets_as_observe():
    from agile_rag.http.metrics import LATENCY_BUCKETS, _Children, _Tally

    rng = random.Random(7)
    values = [rng.choice([0.0, 1e-4, 0.005, 0.01, 0.0100001, 0.3, 600.0, 601.0, 1e6])
              for _ in range(500)] + [rng.uniform(0, 700) for _ in range(500)]
    one, bulk = CollectorRegistry(), CollectorRegistry()
    tally = _Tally()
    bulk.register(tally)                 # first, as Metrics does: a read folds it in first
    h1 = Histogram("lat", "x", ["route"], buckets=LATENCY_BUCKETS, registry=one)
    h2 = Histogram("lat", "x", ["route"], buckets=LATENCY_BUCKETS, registry=bulk)
    children = _Children(h2)
    for v in values:
        h1.labels("r").observe(v)
        tally.observe(children, ("r",), v)
    assert bulk.get_sample_value("lat_count", {"route": "r"}) == len(values)  # a read folds
    for le in [*map(str, LATENCY_BUCKETS), "+Inf"]:
        want = one.get_sample_value("lat_bucket", {"route": "r", "le": le})
        assert bulk.get_sample_value("lat_bucket", {"route": "r", "le": le}) == want, le
    assert bulk.get_sample_value("lat_sum", {"route": "r"}) == \
        pytest.approx(one.get_sample_value("lat_sum", {"route": "r"}))


def test_tally_folds_by_itself_when_many_wait():
    from agile_rag.http.metrics import _Children, _Tally

    reg = CollectorRegistry()
    h = Histogram("w", "x", ["a"], registry=reg)
    tally = _Tally()
    children = _Children(h)
    for _ in range(_Tally.FOLD_EVERY):
        tally.observe(children, ("x",), 0.001)
    assert not tally.obs
    assert h.labels("x")._sum.get() == pytest.approx(0.001 * _Tally.FOLD_EVERY)


async def test_a_burst_is_counted_timed_and_traced_request_by_request(base, v1):
    """64 concurrent one-sentence requests: each answer is its own text's vector (same as
    alone), each has its own x-request-id and trace chain, and /metrics counts every one."""
    n = 64
    texts = [f"Sentence number {i} about a quiet harbour." for i in range(n)]
    async with aiohttp.ClientSession() as s:
        async def scrape():
            async with s.get(base + "/metrics") as r:
                return metric_samples(await r.text())

        async def embed(i):
            async with s.post(v1 + "/embeddings", json={"model": "minilm", "input": texts[i]},
                              headers={"x-request-id": f"burst-{i}"}) as r:
                assert r.status == 200
                return r.headers["x-request-id"], (await r.json())["data"][0]["embedding"]

        async with s.post(v1 + "/embeddings", json={"model": "minilm",
                                                    "input": texts}) as r:
            together = [d["embedding"] for d in (await r.json())["data"]]
        before = await scrape()
        got = await asyncio.gather(*(embed(i) for i in range(n)))
        after = await scrape()
        assert [rid for rid, _ in got] == [f"burst-{i}" for i in range(n)]
        for (_, vec), want in zip(got, together):
            assert np.allclose(vec, want, atol=1e-5)

        def delta(name, **labels):
            return sample(after, name, **labels) - sample(before, name, **labels)

        route = "/v1/embeddings"
        assert delta("agile_rag_http_requests_total", route=route, model="minilm",
                     code="200") == n
        assert delta("agile_rag_http_request_duration_seconds_count", route=route,
                     model="minilm") == n
        assert delta("agile_rag_actor_messages_total", actor="minilm", msg="Embed",
                     outcome="ok") == n
        assert delta("agile_rag_actor_queue_wait_seconds_count", actor="minilm") == n
        assert sample(after, "agile_rag_http_requests_in_progress", route=route) == 0
        for i in (0, n - 1):
            async with s.get(base + f"/debug/traces?request_id=burst-{i}") as r:
                events = (await r.json())["events"]
            assert {e["actor"] for e in events} >= {"http", "minilm"}
            work = next(e for e in events if e["actor"] == "minilm")
            assert work["msg"] == "Embed" and work["outcome"] == "ok"
            assert work["detail"]["batch_texts"] >= 1


async def test_errors_keys_and_ids_come_from_one_middleware(base, v1):
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/embeddings", data=b"{not json",
                          headers={"x-request-id": "bad-json-1"}) as r:
            body = await r.json()
            assert r.status == 400 and r.headers["x-request-id"] == "bad-json-1"
            assert body["error"]["code"] == "invalid_json"
        async with s.get(base + "/no/such/route") as r:
            assert r.status == 404 and r.headers["x-request-id"].startswith("req-")
            assert (await r.json())["error"]["code"] == "unknown_url"
        async with s.get(base + "/health") as r:
            assert r.status == 200 and r.headers["x-request-id"].startswith("req-")


# ---- a burst on an idle GPU runs as two waves ----------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    from support import minilm_dir
    return SentenceTransformer(minilm_dir(), device="cpu", local_files_only=True)


@pytest.mark.parametrize("split", [8, 0])
async def test_a_burst_on_an_idle_gpu_runs_as_two_forwards_back_to_back(reference, split):
    """32 one-text requests that reach an idle (simulated) GPU together: with split_burst_rows
    8 the first forward takes half and the second half is queued behind it at once (two in
    flight), so the first half is answered while the second computes; with 0, one forward.
    Vectors equal encode's either way."""
    from test_encoder_batching import encode_alone, record_forwards, spec, started

    from agile_rag.actors.embedder_actor import EmbedderActor
    from agile_rag.actors.messages import Embed

    emb = EmbedderActor(spec("embedder", "emb", device="cuda"), {"split_burst_rows": split})
    system = await started(emb, arbiter_mb=4000, gpu="cuda")
    try:
        await emb.ask(Embed(texts=["warm up"]), timeout=60)
        forwards = record_forwards(emb)
        spied = emb._encode
        inflight = {"now": 0, "max": 0}

        def slow(batch):
            inflight["now"] += 1
            inflight["max"] = max(inflight["max"], inflight["now"])
            try:
                import time
                time.sleep(0.05)
                return spied(batch)
            finally:
                inflight["now"] -= 1
        emb._encode = slow
        texts = [f"query number {i} about the river" for i in range(32)]
        got = await asyncio.gather(*(emb.ask(Embed(texts=[t]), timeout=60) for t in texts))
        np.testing.assert_allclose(np.concatenate([g.vectors for g in got]),
                                   encode_alone(reference, texts), atol=2e-5)
        if split:
            assert [f["rows"] for f in forwards] == [16, 16], forwards
            assert inflight["max"] == 2
        else:
            assert [f["rows"] for f in forwards] == [32], forwards
        # a lone request still runs alone and at once; one request of many texts is not split
        forwards.clear()
        await emb.ask(Embed(texts=["alone"]), timeout=60)
        assert [f["rows"] for f in forwards] == [1]
        forwards.clear()
        res = await emb.ask(Embed(texts=texts), timeout=60)
        assert [f["rows"] for f in forwards] == [32]
        np.testing.assert_allclose(res.vectors, encode_alone(reference, texts), atol=2e-5)
    finally:
        await system.stop_all()
