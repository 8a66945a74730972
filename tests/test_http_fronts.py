"""HTTP front processes (FRONT_PROCESSES, http/front_process.py): a real server with two fronts
on its port. Requests go over fresh connections, so the kernel spreads them over the main
process and the fronts; every answer must be the same whichever process wrote it, and the
ones a front wrote say so (x-agile-rag-front)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import urllib.request

import aiohttp
import numpy as np
import pytest

from support import MAX_BODY, running_server, server_folder

KEY = "sk-front-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
FRONT = "x-agile-rag-front"
TRIES = 24            # fresh connections per check: all of them missing every front is ~3^-24


def _health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=5) as r:
        return json.load(r)


def _wait_fronts(base: str, n: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = _health(base)
        if h["http_fronts"]["running"] == n:
            return h
        if time.monotonic() > deadline:
            raise TimeoutError(f"fronts: {h['http_fronts']}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fronted(tmp_path_factory, cross_encoder_dir):
    live, cfg, log = server_folder(tmp_path_factory, "fronted", cross_encoder_dir,
                                   f"MAX_BODY_BYTES = {MAX_BODY}\nFRONT_PROCESSES = 2\n"
                                   f"API_KEYS = [{KEY!r}]\nREQUEST_TIMEOUT = 300.0\n")
    with running_server(live, cfg, log, hang_fails=False) as (base, proc, _):
        health = _wait_fronts(base, 2)
        assert health["http_fronts"] == {"configured": 2, "running": 2}
        yield {"base": base, "proc": proc, "log": log}


async def _each(base: str, method: str, path: str, n: int = TRIES, *, resets: int = 0,
                **kw) -> list:
    """``n`` requests, each on its own connection: [(status, headers, body bytes)]; up to
    ``resets`` connections reset by the server are tried again."""
    out = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        while len(out) < n:
            try:
                async with s.request(method, base + path, **kw) as r:
                    out.append((r.status, r.headers, await r.read()))
            except aiohttp.ClientOSError:
                if resets <= 0:
                    raise
                resets -= 1
                await asyncio.sleep(0.2)
    return out


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _by_front(rows: list) -> tuple[list, list]:
    front = [r for r in rows if FRONT in r[1]]
    main = [r for r in rows if FRONT not in r[1]]
    return front, main


async def test_embeddings_are_the_same_from_a_front_and_from_the_main_process(fronted):
    from sentence_transformers import SentenceTransformer

    from support import minilm_dir

    text = "Fronts write the HTTP; the main process runs the model."
    rows = await _each(fronted["base"], "POST", "/v1/embeddings", headers=AUTH,
                       json={"input": [text, "a second input"], "model": "minilm"})
    front, main = _by_front(rows)
    assert front and all(r[0] == 200 for r in rows), [r[0] for r in rows]
    want = SentenceTransformer(minilm_dir(), device="cpu").encode([text, "a second input"])
    ids = set()
    for _status, headers, raw in rows:
        body = json.loads(raw)
        got = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
        assert [d["index"] for d in body["data"]] == [0, 1]
        np.testing.assert_allclose(got, want, atol=2e-4)
        assert body["model"] == "minilm" and body["usage"]["prompt_tokens"] > 0
        ids.add(headers["x-request-id"])
    assert len(ids) == len(rows)            # one request id each, made by the main process

    # base64 (what the openai client asks for) and a client's own x-request-id, via a front
    rows = await _each(fronted["base"], "POST", "/embeddings",
                       headers={**AUTH, "x-request-id": "my-id-7"},
                       json={"input": text, "encoding_format": "base64"})
    front, _ = _by_front(rows)
    assert front
    for status, headers, raw in front:
        assert status == 200 and headers["x-request-id"] == "my-id-7"
        b64 = json.loads(raw)["data"][0]["embedding"]
        vec = np.frombuffer(base64.b64decode(b64), dtype="<f4")
        np.testing.assert_allclose(vec, want[0], atol=2e-4)

    # the main process traced and counted the fronts' requests as its own
    async with aiohttp.ClientSession() as s:
        async with s.get(fronted["base"] + "/debug/traces?request_id=my-id-7",
                         headers=AUTH) as r:
            events = (await r.json())["events"]
        async with s.get(fronted["base"] + "/metrics", headers=AUTH) as r:
            metrics = await r.text()
    http = [e for e in events if e["actor"] == "http"]
    assert any(e.get("detail", {}).get("front") for e in http), http
    assert any(e["actor"] == "minilm" for e in events), events
    lines = [m for m in metrics.splitlines() if m.startswith("agile_rag_http_requests_total{")
             and 'code="200"' in m and 'model="minilm"' in m]
    count = {route: sum(float(m.rsplit(" ", 1)[1]) for m in lines if f'route="{route}"' in m)
             for route in ("/v1/embeddings", "/embeddings")}     # labelled as the main does
    assert count["/v1/embeddings"] >= TRIES and count["/embeddings"] >= TRIES, lines
    # and each one's in-progress count went up and back down
    busy = [m for m in metrics.splitlines()
            if m.startswith("agile_rag_http_requests_in_progress{") and "embeddings" in m]
    assert busy and all(float(m.rsplit(" ", 1)[1]) == 0 for m in busy), busy


async def test_a_front_answers_bad_requests_as_the_main_process_does(fronted):
    base = fronted["base"]
    cases = [
        ({"data": b"{not json", "headers": {**AUTH, "Content-Type": "application/json"}},
         400, "invalid_json", None),
        ({"json": {"input": "x", "encoding_format": "int8"}, "headers": AUTH},
         400, "invalid_value", "encoding_format"),
        ({"json": {"model": "minilm"}, "headers": AUTH},
         400, "missing_required_parameter", "input"),
        ({"json": {"input": "x"}, "headers": {"Authorization": "Bearer wrong"}},
         401, None, None),
        ({"data": b"x" * (MAX_BODY + 10), "headers": AUTH}, 413, "request_too_large", None),
    ]
    for kw, status, code, param in cases:
        rows = await _each(base, "POST", "/v1/embeddings", n=12, **kw)
        front, main = _by_front(rows)
        assert front, kw
        bodies = [json.loads(r[2]) for r in rows]
        assert all(r[0] == status for r in rows), ([r[0] for r in rows], bodies[0])
        for body in bodies:
            err = body["error"]
            assert err["message"] and err["type"]
            if code:
                assert err["code"] == code, err
            if param:
                assert err["param"] == param, err
        # the same error whichever process answered (a front's matches the main's)
        if main:
            assert {json.dumps(b, sort_keys=True) for b in bodies if "request id" not in
                    b["error"]["message"]} == {json.dumps(bodies[0], sort_keys=True)}
    # counted under the model the body names (the default here), as the main process counts
    # its own, whichever process answered
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/metrics", headers=AUTH) as r:
            metrics = await r.text()
    errors = [m for m in metrics.splitlines() if m.startswith("agile_rag_http_errors_total{")
              and 'route="/v1/embeddings"' in m]
    assert errors and all('model="minilm"' in m for m in errors), errors


async def test_other_routes_pass_through_a_front(fronted):
    base = fronted["base"]
    rows = await _each(base, "GET", "/v1/models", headers=AUTH)
    front, _ = _by_front(rows)
    assert front
    for status, _headers, raw in rows:
        assert status == 200 and {m["id"] for m in json.loads(raw)["data"]} >= {"minilm"}
    rows = await _each(base, "GET", "/v1/nowhere", n=8, headers=AUTH)
    assert all(r[0] == 404 and json.loads(r[2])["error"]["code"] == "unknown_url"
               for r in rows)

    # a chat stream, streamed through: events, then [DONE]
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 8, "temperature": 0, "stream": True}
    seen_front = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(10):
            async with s.post(base + "/v1/chat/completions", json=body, headers=AUTH) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith(
                    "text/event-stream")
                seen_front += FRONT in r.headers
                lines = [ln for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                           if c["choices"])
    assert seen_front


async def test_a_front_that_dies_is_started_again(fronted):
    base = fronted["base"]
    rows = await _each(base, "POST", "/v1/embeddings", headers=AUTH, json={"input": "x"})
    pids = {int(r[1][FRONT]) for r in rows if FRONT in r[1]}
    assert pids
    victim = pids.pop()
    os.kill(victim, signal.SIGKILL)
    # (a connection the kernel queued on the dying front's socket is reset, as with any
    # SO_REUSEPORT listener that dies; the kernel closes that socket a moment after the
    # process exits: the check starts once it is gone, and tries a reset connection again)
    deadline = time.monotonic() + 10
    while _alive(victim):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    # the others keep serving meanwhile, and the victim's place is filled
    rows = await _each(base, "POST", "/v1/embeddings", n=8, resets=2, headers=AUTH,
                       json={"input": "x"})
    assert all(r[0] == 200 for r in rows)
    deadline = time.monotonic() + 30
    while True:
        await asyncio.sleep(0.5)
        h = await asyncio.to_thread(_health, base)
        if h["http_fronts"]["running"] == 2:
            break
        assert time.monotonic() < deadline, h["http_fronts"]
    rows = await _each(base, "POST", "/v1/embeddings", headers=AUTH, json={"input": "x"})
    assert all(r[0] == 200 for r in rows)
    assert victim not in {int(r[1][FRONT]) for r in rows if FRONT in r[1]}
    with open(fronted["log"]) as f:
        assert "exited with" in f.read()


def test_how_many_fronts_auto_and_numbers_ask_for():
    from agile_rag.configs import front_processes

    assert front_processes("auto", cpus=16, cuda=True) == 8
    assert front_processes("auto", cpus=64, cuda=True) == 8
    assert front_processes("auto", cpus=8, cuda=True) == 4
    assert front_processes("auto", cpus=16, cuda=False) == 0      # the CPU computes: no fronts
    assert front_processes("auto", cpus=4, cuda=True) == 0
    assert front_processes(3) == 3 and front_processes("2") == 2 and front_processes(0) == 0
    for bad in (-1, "x", 1.5, True):
        with pytest.raises(ValueError, match="FRONT_PROCESSES"):
            front_processes(bad)
