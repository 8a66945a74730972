"""Traces a person can read, and metrics: /debug/traces (one request's chain, Chrome export),
the JSONL file with rotation, the agile-rag-trace command and /metrics."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agile_rag.runtime.tracing import (
    JsonlTraceWriter,
    TraceEvent,
    Tracer,
    chrome_trace,
    request_timeline,
)

from support import ROOT

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 6, "temperature": 0}


def rid(kind: str) -> str:
    return f"trace-{kind}-{uuid.uuid4().hex[:10]}"


# ---- helpers -------------------------------------------------------------------------------------
def check_chrome(data: dict) -> dict[str, int]:
    """Valid Chrome trace-event JSON (object form): returns actor name -> tid."""
    assert isinstance(data, dict) and isinstance(data["traceEvents"], list)
    json.loads(json.dumps(data))                       # plain JSON all the way down
    names: dict[int, str] = {}
    for e in data["traceEvents"]:
        assert e["ph"] in ("X", "M", "b", "e"), e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name", "thread_sort_index")
            if e["name"] == "thread_name":
                assert e["tid"] not in names, "two names for one track"
                names[e["tid"]] = e["args"]["name"]
            continue
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
    assert len(set(names.values())) == len(names), "one track per actor"
    used = {e["tid"] for e in data["traceEvents"] if e["ph"] != "M"}
    assert used <= set(names), "every event is on a named track"
    # complete events nest properly on each track (what Perfetto needs to draw them)
    by_tid: dict[int, list] = {}
    for e in data["traceEvents"]:
        if e["ph"] == "X":
            by_tid.setdefault(e["tid"], []).append(e)
    for slices in by_tid.values():
        stack: list[float] = []
        for e in sorted(slices, key=lambda s: (s["ts"], -s["dur"])):
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            end = e["ts"] + e["dur"]
            assert not stack or end <= stack[-1] + 1e-3, f"slice not nested: {e}"
            stack.append(end)
    # async begin/end pairs match
    opened = {}
    for e in data["traceEvents"]:
        key = (e.get("cat"), e.get("name"), e.get("id"))
        if e["ph"] == "b":
            assert key not in opened
            opened[key] = e["ts"]
        elif e["ph"] == "e":
            assert e["ts"] >= opened.pop(key)
    assert not opened
    return {name: tid for tid, name in names.items()}


async def get_trace(session: aiohttp.ClientSession, base: str, request_id: str) -> dict:
    """The request's trace; its HTTP span is recorded as the handler returns, so a reader
    that is very quick after a stream may have to look twice."""
    for _ in range(40):
        async with session.get(base + "/debug/traces", params={"request_id": request_id}) as r:
            body = await r.json()
            if r.status == 200 and any(e["actor"] == "http" for e in body["events"]):
                return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"no complete trace for {request_id}: {body}")


def metric_samples(text: str) -> dict:
    out: dict = {"families": set()}
    for fam in text_string_to_metric_families(text):
        out["families"].add(fam.name)
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ---- over real HTTP ------------------------------------------------------------------------------
async def test_concurrent_requests_each_have_their_full_chain_in_order(base, v1):
    ids = {"chat": rid("chat"), "stream": rid("stream"), "embed": rid("embed"),
           "rerank": rid("rerank"), "bi": rid("bi")}
    jobs = {
        "chat": ("/chat/completions", CHAT, "smollm2", "Chat"),
        "stream": ("/chat/completions", {**CHAT, "stream": True}, "smollm2", "Chat"),
        "embed": ("/embeddings", {"model": "minilm", "input": ["a cat", "a dog"]}, "minilm",
                  "Embed"),
        "rerank": ("/rerank", {"model": "tiny-ce", "query": "cats",
                               "documents": ["a cat sat", "stocks fell", "kittens"]},
                   "tiny-ce", "Rerank"),
        "bi": ("/rerank", {"model": "minilm-rerank", "query": "cats",
                           "documents": ["a cat sat", "stocks fell"]}, "minilm-rerank",
               "Rerank"),
    }
    async with aiohttp.ClientSession() as s:
        async def send(key):
            path, body, _, _ = jobs[key]
            async with s.post(v1 + path, json=body, headers={"x-request-id": ids[key]}) as r:
                await r.read()
                return r.status, r.headers.get("x-request-id")

        answers = await asyncio.gather(*(send(k) for k in jobs))
        assert answers == [(200, ids[k]) for k in jobs]

        spans = {}
        for key, (path, _, model, msg) in jobs.items():
            body = await get_trace(s, base, ids[key])
            assert body["request_id"] == ids[key]
            events = body["events"]
            assert all(e["request_id"] == ids[key] for e in events)
            # in order, each with sane times
            assert [e["enqueued"] for e in events] == sorted(e["enqueued"] for e in events)
            for e in events:
                assert e["enqueued"] <= e["started"] <= e["ended"], e
                assert e["queue_s"] >= 0 and e["run_s"] >= 0 and e["outcome"] == "ok"
            # the chain: HTTP request -> the model's message (-> GPU grant, swaps on CUDA)
            http = events[0]
            assert http["actor"] == "http" and http["msg"] == f"POST /v1{path}"
            assert http["detail"]["status"] == 200 and http["detail"]["model"] == model
            work = [e for e in events if e["actor"] == model and e["msg"] == msg]
            assert len(work) == 1 and work[0]["sender"] == "http" and work[0]["kind"] == "compute"
            w = work[0]
            assert http["enqueued"] <= w["enqueued"] <= w["started"] <= w["ended"] \
                <= http["ended"]
            for e in events[1:]:        # everything it caused happens within the request
                assert http["enqueued"] <= e["enqueued"] and e["ended"] <= http["ended"]
            assert w["start_at_s"] >= w["at_s"] >= 0 and w["end_at_s"] >= w["start_at_s"]
            t = body["timeline"]
            assert t["route"] == http["msg"] and t["status"] == 200 and t["models"] == [model]
            assert t["total_s"] == pytest.approx(http["run_s"], abs=1e-5)
            assert t["queue_s"] == pytest.approx(w["queue_s"], abs=1e-5)
            assert t["compute_s"] > 0
            parts = t["queue_s"] + t["grant_wait_s"] + t["swap_in_s"] + t["compute_s"] \
                + t["reply_s"]
            assert parts <= t["total_s"] + 1e-3
            spans[key] = (http["enqueued"], http["ended"])
        # they really ran concurrently: every request was in flight at one moment
        assert max(a for a, _ in spans.values()) < min(b for _, b in spans.values())


async def test_chrome_export_is_valid_with_one_track_per_actor(base, v1):
    mine = rid("chrome")
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/embeddings", json={"model": "minilm", "input": "x"},
                          headers={"x-request-id": mine}) as r:
            assert r.status == 200
        async with s.get(base + "/debug/traces",
                         params={"since": "300", "format": "chrome"}) as r:
            assert r.status == 200 and r.headers["x-request-id"]
            data = await r.json()
        tracks = check_chrome(data)
        assert {"minilm", "tiny-ce", "smollm2", "http"} <= set(tracks)
        # the request's message is a complete event on its actor's track, with its id
        mine_x = [e for e in data["traceEvents"] if e["ph"] == "X"
                  and (e.get("args") or {}).get("request_id") == mine and "actor" in e["args"]]
        assert [e["tid"] for e in mine_x] == [tracks["minilm"]]
        assert mine_x[0]["args"]["msg"] == "Embed" and mine_x[0]["args"]["sender"] == "http"
        http = [e for e in data["traceEvents"] if e["ph"] == "b" and e["cat"] == "http"
                and e["args"]["request_id"] == mine]
        assert len(http) == 1 and http[0]["tid"] == tracks["http"]
        # one request alone
        async with s.get(base + "/debug/traces",
                         params={"request_id": mine, "format": "chrome"}) as r:
            one = await r.json()
        assert set(check_chrome(one)) == {"minilm", "http"}


async def test_debug_traces_refusals_and_plain_window(base, v1):
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/debug/traces", params={"request_id": "never-seen-1"}) as r:
            assert r.status == 404 and r.headers["x-request-id"]
            assert (await r.json())["error"]["code"] == "trace_not_found"
        for bad in ({"since": "-1"}, {"since": "abc"}, {"format": "svg"}):
            async with s.get(base + "/debug/traces", params=bad) as r:
                assert r.status == 400, bad
        async with s.get(base + "/debug/traces", params={"since": "600"}) as r:
            body = await r.json()
        assert r.status == 200 and body["count"] == len(body["events"]) > 0
        # reading traces does not trace itself
        assert not any(e["actor"] == "http" and "/debug" in e["msg"] for e in body["events"])


async def test_debug_stacks_samples_the_threads_that_work(base, v1):
    """GET /debug/stacks: per thread its CPU seconds and most frequent stacks; the encoder's
    threads are seen while embeddings run."""
    async with aiohttp.ClientSession() as s:
        for bad in ({"seconds": "-1"}, {"seconds": "abc"}, {"hz": "0"}, {"seconds": "9999"}):
            async with s.get(base + "/debug/stacks", params=bad) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] in bad, (bad, body)

        async def embed_for(seconds: float) -> int:
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                async with s.post(v1 + "/embeddings", json={"model": "minilm", "input": [
                        f"sentence {n} about rivers and the sea"] * 16}) as r:
                    assert r.status == 200
                n += 1
            return n

        async with s.get(base + "/debug/stacks", params={"seconds": "0.01"}):
            pass
        stacks_task = asyncio.ensure_future(s.get(base + "/debug/stacks",
                                                  params={"seconds": "1.5", "hz": "300"}))
        done = await embed_for(1.5)
        r = await stacks_task
        body = await r.json()
    assert r.status == 200 and body["object"] == "stacks" and done > 0
    assert 1.4 <= body["seconds"] < 3 and body["samples"] > 50
    threads = body["threads"]
    main = threads["MainThread"]
    assert main["samples"] == body["samples"] and main["stacks"] and main["lines"]
    assert main["cpu_s"] is None or main["cpu_s"] >= 0
    # the model's threads (tokenizer, forwards: whichever the encoder ran on) were seen working
    work = [name for name, t in threads.items() if any(
        "encoder" in st or "forward" in st or "tokeni" in st for st, _ in t["stacks"])]
    assert work, {n: t["stacks"][:2] for n, t in threads.items()}


def test_trace_command_prints_a_timeline_and_exports(base, v1, tmp_path):
    mine = rid("cli")
    import urllib.request
    req = urllib.request.Request(v1 + "/rerank", data=json.dumps(
        {"model": "tiny-ce", "query": "q", "documents": ["a", "b"]}).encode(),
        headers={"Content-Type": "application/json", "x-request-id": mine})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["x-request-id"] == mine
    run = [sys.executable, "-m", "agile_rag.tracecli", "--url", base]
    out = subprocess.run(run + ["--request-id", mine], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for words in (mine, "POST /v1/rerank", "queue wait", "grant wait", "swap in", "compute",
                  "reply/stream", "tiny-ce", "Rerank"):
        assert words in out.stdout, (words, out.stdout)
    path = tmp_path / "trace.json"
    out = subprocess.run(run + ["--chrome", str(path), "--since", "120"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tiny-ce" in check_chrome(json.loads(path.read_text()))
    out = subprocess.run(run + ["--request-id", "never-seen-2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "404" in out.stderr


async def test_metrics_count_requests_errors_latency_and_models(base, v1):
    async with aiohttp.ClientSession() as s:
        async def scrape():
            async with s.get(base + "/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                return metric_samples(await r.text())

        before = await scrape()
        for i in range(3):
            async with s.post(v1 + "/embeddings", json={"model": "minilm", "input": f"m{i}"}) as r:
                assert r.status == 200
        async with s.post(v1 + "/embeddings", json={"model": "minilm"}) as r:   # no input
            assert r.status == 400
        async with s.post(v1 + "/rerank", json={"model": "tiny-ce", "query": "q",
                                                "documents": ["a"]}) as r:
            assert r.status == 200
        after = await scrape()

    route, model = "/v1/embeddings", "minilm"

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("agile_rag_http_requests_total", route=route, model=model, code="200") == 3
    assert delta("agile_rag_http_requests_total", route=route, model=model, code="400") == 1
    assert delta("agile_rag_http_errors_total", route=route, model=model, code="400") == 1
    assert delta("agile_rag_http_errors_total", route=route, model=model, code="200") == 0
    assert delta("agile_rag_http_request_duration_seconds_count", route=route, model=model) == 4
    assert delta("agile_rag_http_request_duration_seconds_sum", route=route, model=model) > 0
    assert delta("agile_rag_http_requests_total", route="/v1/rerank", model="tiny-ce",
                 code="200") == 1
    assert delta("agile_rag_actor_messages_total", actor="minilm", msg="Embed",
                 outcome="ok") >= 3
    for m, kind in (("smollm2", "llm"), ("minilm", "embedder"), ("tiny-ce", "reranker"),
                    ("minilm-rerank", "reranker")):
        assert ("agile_rag_model_queue_length", (("kind", kind), ("model", m))) in after
        assert sample(after, "agile_rag_model_gpu_resident_bytes", model=m, kind=kind) >= 0
        assert ("agile_rag_model_gpu_resident_bytes", (("kind", kind), ("model", m))) in after
    # swaps, grants and evictions are declared (samples come with the first GPU swap: see
    # test_metrics_from_trace_events_count_swaps_grants_and_evictions)
    assert {"agile_rag_swap_in_bytes", "agile_rag_swap_seconds", "agile_rag_gpu_grants",
            "agile_rag_gpu_evictions", "agile_rag_gpu_grant_wait_seconds",
            "agile_rag_model_weight_bytes", "agile_rag_model_state"} <= after["families"]


# ---- units ---------------------------------------------------------------------------------------
def ev(actor, msg, rid_, sender, enq, start, end, outcome="ok", **detail) -> TraceEvent:
    return TraceEvent(actor, msg, rid_, sender, enq, start, end, outcome, detail)


def gpu_swap_events() -> list[TraceEvent]:
    """A rerank that waited for the LLM to be evicted, then swapped in (what a CUDA machine
    records)."""
    r = "req-swap"
    return [
        ev("http", "POST /v1/rerank", r, None, 10.0, 10.0, 10.9, status=200, model="rr"),
        ev("rr", "Rerank", r, "http", 10.001, 10.05, 10.85, grant_wait_s=0.2, admit_s=0.12,
           admit_bytes=1_100_000_000, evicted=["llm"]),
        ev("vram-arbiter", "RequestGrant", r, "rr", 10.051, 10.052, 10.25, model="rr",
           nbytes=1_200_000_000, granted=1_200_000_000, waited_s=0.19, evicted=["llm"]),
        ev("llm", "Revoke", r, "vram-arbiter", 10.06, 10.2, 10.215, evict_s=0.015,
           freed=7_000_000_000),
        ev("vram-arbiter", "Released", None, "llm", 10.216, 10.22, 10.221, freed=7_000_000_000),
        # a second grant deferred across the first one's end: not nestable on the track
        ev("vram-arbiter", "RequestGrant", "req-2", "emb", 10.1, 10.2, 10.5, model="emb",
           granted=1, waited_s=0.3),
        ev("llm", "Chat", "req-3", "http", 9.0, 9.0, 10.05),
    ]


def test_request_timeline_splits_grant_wait_swap_and_compute():
    events = [e for e in gpu_swap_events() if e.request_id == "req-swap"]
    t = request_timeline(sorted(events, key=lambda e: e.enqueued))
    assert t["total_s"] == pytest.approx(0.9)
    assert t["queue_s"] == pytest.approx(0.049)
    assert t["grant_wait_s"] == pytest.approx(0.2)
    assert t["swap_in_s"] == pytest.approx(0.12) and t["swap_in_bytes"] == 1_100_000_000
    assert t["evict_s"] == pytest.approx(0.015) and t["evicted"] == ["llm"]
    assert t["compute_s"] == pytest.approx(0.8 - 0.2 - 0.12)
    assert t["reply_s"] == pytest.approx(0.05)
    assert t["models"] == ["rr"] and t["status"] == 200


def test_timeline_of_a_chat_that_paused_and_read_its_prompt_in_chunks():
    from agile_rag.tracecli import format_timeline

    r = "req-chat"
    events = [ev("http", "POST /v1/chat/completions", r, None, 1.0, 1.0, 4.0, status=200),
              ev("llm", "Chat", r, "http", 1.001, 1.01, 3.9, preempted=2, prefill_chunks=5,
                 grant_wait_s=0.3)]
    t = request_timeline(events)
    assert t["paused"] == 2 and t["prefill_chunks"] == 5
    text = format_timeline({"request_id": r, "timeline": t, "events": []})
    assert "paused       2 time(s)" in text and "prompt read in 5 chunks" in text
    plain = request_timeline(events[:1] + [ev("llm", "Chat", r, "http", 1.0, 1.0, 2.0)])
    assert plain["paused"] == 0
    assert "paused" not in format_timeline({"request_id": r, "timeline": plain, "events": []})


def test_chrome_trace_of_a_swap_nests_phases_and_keeps_overlaps_async():
    data = chrome_trace(gpu_swap_events(), wall_offset=1.7e9)
    tracks = check_chrome(data)
    assert set(tracks) == {"vram-arbiter", "llm", "rr", "http"}
    assert tracks["vram-arbiter"] == 1                  # the arbiter's track comes first
    xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
    phases = [e["cat"] for e in xs if e["tid"] == tracks["rr"] and "actor" not in e["args"]]
    assert phases == ["grant", "admit", "compute"]
    admit = next(e for e in xs if e["cat"] == "admit")
    assert admit["dur"] == pytest.approx(120_000) and admit["args"]["admit_bytes"] == 1_100_000_000
    assert any(e["cat"] == "evict" and e["tid"] == tracks["llm"] for e in xs)
    # the deferred grant overlaps the first one without nesting: an async slice instead
    assert any(e["ph"] == "b" and e["cat"] == "grant" and e["args"]["request_id"] == "req-2"
               for e in data["traceEvents"])
    queued = [e for e in data["traceEvents"] if e["ph"] == "b" and e["cat"] == "queue"]
    assert {e["args"]["request_id"] for e in queued} >= {"req-swap"}
    assert min(e["ts"] for e in data["traceEvents"] if "ts" in e) == 0


def test_metrics_from_trace_events_count_swaps_grants_and_evictions():
    from agile_rag.configs import Settings
    from agile_rag.http.app import build_app
    from agile_rag.http.metrics import METRICS
    from agile_rag.server import Server

    apps = [build_app(Server(Settings())) for _ in range(2)]      # per-app registries
    m = apps[0][METRICS]
    assert m.registry is not apps[1][METRICS].registry
    tracer = m.server.system.tracer
    tracer.enabled = False                  # metrics still count with tracing off
    for e in gpu_swap_events():
        tracer.record(e)
    # the chat batch paused for a waiting model and gave the GPU back
    tracer.record(ev("llm", "Yield", None, "vram-arbiter", 11.0, 11.0, 11.0, pausing=True))
    tracer.record(ev("llm", "BatchIdle", None, "llm", 11.5, 11.5, 11.6, yielded=True,
                     evict_s=0.002, kv_freed_bytes=10))
    assert not tracer.events
    get = m.registry.get_sample_value
    assert get("agile_rag_swap_in_bytes_total", {"model": "rr"}) == 1_100_000_000
    assert get("agile_rag_swap_seconds_sum", {"model": "rr", "direction": "in"}) == \
        pytest.approx(0.12)
    assert get("agile_rag_swap_seconds_count", {"model": "llm", "direction": "out"}) == 2
    assert get("agile_rag_gpu_grants_total", {"model": "rr"}) == 1
    assert get("agile_rag_gpu_evictions_total", {"model": "llm", "reason": "revoked"}) == 1
    assert get("agile_rag_gpu_evictions_total", {"model": "llm", "reason": "yielded"}) == 1
    assert get("agile_rag_gpu_yields_total", {"model": "llm"}) == 1
    assert get("agile_rag_gpu_grant_wait_seconds_count", {"model": "rr"}) == 1
    assert apps[1][METRICS].registry.get_sample_value(
        "agile_rag_swap_in_bytes_total", {"model": "rr"}) is None


def test_jsonl_file_rotates_by_size_and_keeps_every_recent_line(tmp_path):
    path = tmp_path / "sub" / "trace.jsonl"
    w = JsonlTraceWriter(str(path), max_bytes=4000, backups=2, flush_interval=0)
    for i in range(300):
        w(ev("a", "M", f"r{i}", "http", i, i + 0.5, i + 1.0, n=i))
    w.close()
    assert w.rotations > 2
    files = [path.parent / f"trace.jsonl{s}" for s in (".2", ".1", "")]
    assert all(f.exists() for f in files) and not (path.parent / "trace.jsonl.3").exists()
    numbers = []
    for f in files:
        assert 0 < f.stat().st_size <= 4000
        for line in f.read_text().splitlines():
            row = json.loads(line)
            assert {"actor", "msg", "request_id", "enqueued", "started", "ended", "ts"} <= set(row)
            numbers.append(row["detail"]["n"])
    assert numbers == list(range(numbers[0], 300))       # oldest file first, nothing lost

    solo = tmp_path / "solo.jsonl"
    w = JsonlTraceWriter(str(solo), max_bytes=1000, backups=0, flush_interval=0)
    for i in range(100):
        w(ev("a", "M", None, None, i, i, i))
    w.close()
    assert solo.stat().st_size <= 1000 and not (tmp_path / "solo.jsonl.1").exists()


def test_tracer_from_settings_writes_the_file_and_close_flushes(tmp_path):
    from agile_rag.configs import Settings

    path = tmp_path / "t.jsonl"
    tracer = Tracer.from_settings(Settings(TRACE_FILE=str(path), TRACE_BUFFER=5))
    seen = []
    tracer.subscribe(seen.append, always=True)
    for i in range(12):
        tracer.record(ev("a", "M", f"r{i}", None, i, i, i + 1))
    tracer.close()
    assert len(tracer.events) == 5 and len(seen) == 12
    assert len(path.read_text().splitlines()) == 12
    assert [e.request_id for e in tracer.window(2.5, now=12.0)] == ["r9", "r10", "r11"]
    off = Tracer.from_settings(Settings(TRACE_FILE=str(tmp_path / "no.jsonl"),
                                        TRACE_ENABLED=False))
    off.record(ev("a", "M", None, None, 0, 0, 0))
    off.close()
    assert not off.events and not (tmp_path / "no.jsonl").exists()


async def test_metrics_and_traces_need_a_key_when_api_keys_are_set():
    from aiohttp.test_utils import TestClient, TestServer

    from agile_rag.configs import Settings
    from agile_rag.http.app import build_app
    from agile_rag.server import Server

    server = Server(Settings(API_KEYS=["sk-right"]))
    async with TestClient(TestServer(build_app(server))) as client:
        for path in ("/metrics", "/debug/traces?since=5", "/debug/stacks?seconds=0.1"):
            r = await client.get(path)
            assert r.status == 401 and r.headers["x-request-id"], path
            r = await client.get(path, headers={"Authorization": "Bearer sk-right"})
            assert r.status == 200, path
        r = await client.get("/health")                 # still open
        assert r.status == 200
        text = await (await client.get("/metrics", headers={
            "Authorization": "Bearer sk-right"})).text()
    got = metric_samples(text)
    assert sample(got, "agile_rag_http_requests_total", route="/metrics", model="",
                  code="401") == 1
    assert sample(got, "agile_rag_http_errors_total", route="/debug/traces", model="",
                  code="401") == 1
    server.system.executor.shutdown()
