"""Chaos (issue 11): a real server under concurrent mixed traffic while liveconfigs.json is
edited under it, a burst past the queue limit, then SIGTERM with requests in flight.

Traffic (benchmarks/soak.py, chaos mode): streamed and plain chats at temperature 0 (some
with a long prompt read in chunks, some to an LLM that comes and goes), streams that hang up
mid-way, clients that time out, embeddings, and reranks in both shapes on both routes. Live
edits, every ~1.5 s from a seeded deck (soak.ChaosEditor): models of every kind added, removed
and reloaded from a new path; devices flipped cpu <-> flex; continuous_batching flipped in the
same save as the LLM's device; prefill_chunk_tokens 0; max_batch_size 2; other params changed
and removed; reset_flags; broken and half-written files; saves by rename and in place.

Asserted: every successful reply equals its uncontended reference (chats exactly; vectors and
rerank scores within float tolerance); every failure is an OpenAI-shaped 4xx / 503 (with
Retry-After) / 504 without internal exception text, and none says its model stopped (a model
removed or reloaded finishes what it had accepted first); nothing waits past its deadline; the
burst is refused in part with 503s, on the embedder and on the LLM (whose queue counts the
chats waiting for a batch slot); afterwards /health is ok, the queue and in-progress gauges
are 0, no removed model's weights are alive, RSS (heap and mapped files each) is within 1.2x of
the warm-up's high-water mark;
SIGTERM finishes the requests in flight and exits within SHUTDOWN_TIMEOUT + 5 s.

Seeded: CHAOS_SEED (default 1; the seed is printed). CHAOS_SECONDS sets the traffic phase
(default 40 s: one deck of edits; the whole test takes about 1.5 minutes on 2 cores).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from support import CACHE, ROOT, free_port, wait_ready, write_live_config

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from soak import PROMPTS, SENTENCES, ChaosEditor, Failure, Soak, error_problem  # noqa: E402

SEED = int(os.environ.get("CHAOS_SEED", "1"))
SECONDS = float(os.environ.get("CHAOS_SECONDS", "40"))
ADMIN = "chaos-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
SHUTDOWN_TIMEOUT = 10
MAX_QUEUED = 6
REQUEST_TIMEOUT = 180          # the server's own limit...
DEADLINE_S = 90                # ...and the clients': a request lost until REQUEST_TIMEOUT fails
LLM, EMBEDDER, RERANKER = "smollm2", "minilm", "minilm-rerank"
KV_TOKENS = 4096               # the LLM batch's KV budget: at most 180 MB of cache
RSS_WATCH_S = 5.0              # see lowest_rss
PREFIX_TOKENS = 512            # prompt prefixes kept for reuse: at most 23 MB


@pytest.fixture
def chaos_server(tmp_path, cross_encoder_dir):
    live = str(tmp_path / "liveconfigs.json")
    # the LLM's batch keeps its KV cache between batches (up to batch_kv_tokens: 720 MB for
    # SmolLM2 at the default 16384), and long prompts' prefixes beside it (prefix_cache_tokens:
    # 188 MB at the default 4096, per LLM version, filled only as the chaos' prompts come);
    # smaller budgets keep both well inside the RSS margin
    write_live_config(live, cross_encoder_dir, llm_params={
        "default_temp": 0.5, "force_0_temp": False, "batch_kv_tokens": KV_TOKENS,
        "prefix_cache_tokens": PREFIX_TOKENS})
    conf = tmp_path / "configs.py"
    conf.write_text(f"MODEL_CACHE_DIR = {CACHE!r}\nDEBOUNCE_TIME = 0.3\nADMIN_KEY = {ADMIN!r}\n"
                    f"MAX_QUEUED_PER_MODEL = {MAX_QUEUED}\nSHUTDOWN_TIMEOUT = {SHUTDOWN_TIMEOUT}\n"
                    f"REQUEST_TIMEOUT = {REQUEST_TIMEOUT}\nSERVICE_NUM_WORKERS = 4\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = str(tmp_path / "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agile_rag", "--port", str(port),
                                 "--live-config", live, "--config", str(conf)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(base, proc)
        yield {"base": base, "live": live, "proc": proc, "log": log_path}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def get_json(s, url, **kw):
    async with s.get(url, **kw) as r:
        return await r.json()


async def metrics(s, base) -> dict[str, list[tuple[dict, float]]]:
    """The Prometheus text as {metric: [(labels, value)]}."""
    async with s.get(base + "/metrics") as r:
        text = await r.text()
    out: dict[str, list] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        pairs = dict(p.split("=", 1) for p in labels.rstrip("}").split(",") if "=" in p)
        out.setdefault(name, []).append(({k: v.strip('"') for k, v in pairs.items()},
                                         float(value)))
    return out


async def reload_now(s, base) -> list[str]:
    async with s.post(base + "/admin/reload", headers=AUTH) as r:
        return (await r.json()).get("applied", [])


def memory(snap: dict) -> dict:
    """RSS split into the heap (anonymous memory: what a leak grows) and mapped files (shared
    libraries, memory-mapped safetensors weights: the kernel's page cache, which a model that
    loads or goes moves by hundreds of MB)."""
    return {"rss": snap["rss_mb"], "file": snap["rss_file_mb"],
            "anon": round(snap["rss_mb"] - snap["rss_file_mb"], 1)}


async def lowest_rss(soak: Soak, s, first: dict) -> dict:
    """The lowest memory over RSS_WATCH_S after the run settled: the server gives free heap
    pages back once its model pool has been idle IDLE_TRIM_S (1 s); a leak does not go away.
    Seen: the last burst's 2.0-2.4 GB back to 1.3 GB within that second (CI had failed on a
    snapshot taken before it, 2344 MB against a 1924 MB baseline)."""
    low = memory(first)
    for _ in range(int(RSS_WATCH_S / 0.5)):
        await asyncio.sleep(0.5)
        now = memory(await soak.snapshot(s))
        low = {k: min(low[k], now[k]) for k in low}
    return low


async def warm_up(soak: Soak, editor: ChaosEditor, s, base) -> dict:
    """What the baseline RSS is measured over: every model kind added, used and removed
    once; both LLM paths (batch engine and one generate() at a time) run; then the largest
    shapes of the run once (long prompts together, a mixed crowd, the bursts, long prompts
    with prefill_chunk_tokens 0 and through generate()), since the allocators keep their
    high-water marks (measured: a 16-chat burst +95 MB, four long prompts at once +200 MB,
    long prompts prefilled together +100 MB, through generate() +200 MB; once each, repeating
    them adds nothing). Returns the highest memory (see :func:`memory`) seen after each of
    those steps: the baseline.
    The settled RSS after the warm-up is no longer that mark (a CPU-only LLM frees its KV
    cache when its batch goes idle, issue 17): seen settled 1.2 GB, marks 1.8 GB, and after
    the run, which ends with a burst, 1.2-2.1 GB (with two malloc arenas,
    cli.limit_malloc_arenas; 1.4-2.5 GB with glibc's default)."""
    high = {"rss": 0.0, "file": 0.0, "anon": 0.0}

    async def mark() -> None:
        now = memory(await soak.snapshot(s))
        for k in high:
            high[k] = max(high[k], now[k])

    for kind in ("embedder", "reranker", "llm"):
        editor._toggle_extra(kind)
    await reload_now(s, base)
    for kind in ("embed", "rerank", "tei", "chat", "stream", "long", "embed", "chat"):
        assert await soak.one(s, kind) == "ok", soak.failures
    await mark()
    editor.good["llm_params"]["continuous_batching"] = False
    editor.write(editor.text(), "rename")
    await reload_now(s, base)
    assert await soak.one(s, "chat") == "ok", soak.failures
    editor.good["llm_params"]["continuous_batching"] = True
    for kind in ("embedder", "reranker", "llm"):
        editor._toggle_extra(kind)
    editor.write(editor.text(), "rename")
    await reload_now(s, base)
    outcomes = await asyncio.gather(*(soak.one(s, k) for k in ("chat", "stream", "chat")))
    assert outcomes == ["ok"] * 3, soak.failures           # a batch of three: its KV cache
    crowd = ["long"] * 4 + ["chat", "stream"] * 3 + ["embed"] * 6 + ["rerank", "tei"] * 2
    await asyncio.gather(*(soak.one(s, k) for k in crowd))
    await mark()
    out = await burst(soak, s, base)
    await mark()
    # the LLM's two other big shapes: long prompts prefilled together (prefill_chunk_tokens
    # 0) and a long prompt through generate() (continuous_batching false)
    llm_params = editor.good["llm_params"]
    llm_params["prefill_chunk_tokens"] = 0
    await editor.settle_good(base, s, AUTH)
    await asyncio.gather(*(soak.one(s, "long") for _ in range(4)))
    await mark()
    del llm_params["prefill_chunk_tokens"]
    llm_params["continuous_batching"] = False
    await editor.settle_good(base, s, AUTH)
    await asyncio.gather(soak.one(s, "long"), soak.one(s, "chat"))
    await mark()
    llm_params["continuous_batching"] = True
    await editor.settle_good(base, s, AUTH)
    assert not soak.failures and not out["failures"], (soak.failures, out["failures"])
    return high


async def burst(soak: Soak, s, base) -> dict:
    """Past the queue limit: 24 concurrent 48-text embeddings, then 16 chats 100 ms apart
    with max_batch_size 2 while /health is polled for the LLM's queue length."""
    rng = random.Random(soak.seed)
    out = {"embed": {}, "chat": {}, "failures": [], "max_llm_queue": 0}

    async def embed_one():
        texts = [rng.choice(SENTENCES) for _ in range(48)]
        status, h, b = await soak._post(s, "/v1/embeddings", {"model": EMBEDDER,
                                                              "input": texts})
        if status == 200:
            soak.check_embeddings(texts, b)
        else:
            problem = error_problem(status, h, b)
            if problem:
                raise Failure(problem)
        return status

    async def chat_one(i):
        await asyncio.sleep(0.1 * i)
        p = PROMPTS[i % len(PROMPTS)]
        status, h, b = await soak._post(s, "/v1/chat/completions", soak._chat_body(p, 8))
        if status == 200:
            soak.check_chat(p, 8, b["choices"][0]["message"]["content"])
        else:
            problem = error_problem(status, h, b)
            if problem:
                raise Failure(problem)
        return status

    async def count(what, coros):
        results = await asyncio.gather(*coros, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                out["failures"].append(f"burst {what}: {type(r).__name__}: {r}")
            else:
                out[what][r] = out[what].get(r, 0) + 1

    await count("embed", [asyncio.wait_for(embed_one(), DEADLINE_S) for _ in range(24)])
    done = asyncio.Event()

    async def poll_queue():
        while not done.is_set():
            h = await get_json(s, base + "/health")
            q = h["models"].get(LLM, {}).get("queue_length", 0)
            out["max_llm_queue"] = max(out["max_llm_queue"], q)
            await asyncio.sleep(0.1)
    poller = asyncio.create_task(poll_queue())
    await count("chat", [asyncio.wait_for(chat_one(i), DEADLINE_S) for i in range(16)])
    done.set()
    await poller
    return out


async def sigterm_with_requests_in_flight(soak: Soak, s, proc) -> dict:
    async def stream():
        await soak._stream(s, PROMPTS[0], 24, False, {})
        return "ok"

    async def embed():
        return await soak.one(s, "embed")

    async def rerank():
        return await soak.one(s, "rerank")

    tasks = [asyncio.create_task(c()) for c in (stream, stream, embed, rerank, embed)]
    await asyncio.sleep(1.0)                  # all of them reached the server
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    code = await asyncio.to_thread(proc.wait, SHUTDOWN_TIMEOUT + 30)
    return {"exit_s": round(time.monotonic() - t0, 2), "returncode": code,
            "in_flight": [r if isinstance(r, str) else f"{type(r).__name__}: {r}"
                          for r in results]}


async def chaos_run(server: dict) -> dict:
    base, live, proc = server["base"], server["live"], server["proc"]
    soak = Soak(base, live, ADMIN, seed=SEED, clients=8, seconds=SECONDS,
                deadline_s=DEADLINE_S, llm=LLM, embedder=EMBEDDER, reranker=RERANKER,
                change_every_s=1.5, chaos=True, sample_every_s=2.0,
                log=lambda m: print(m, flush=True))
    report: dict = {"seed": SEED}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
        await soak.references(s)
        before = await soak.snapshot(s)
        editor = soak.editor = ChaosEditor(live, soak.rng, kinds={
            "llm": LLM, "embedder": EMBEDDER, "reranker": RERANKER})
        try:
            high = await warm_up(soak, editor, s, base)
            warm = await soak.settle(s, before)
            report["baseline"] = {k: max(v, memory(warm)[k]) for k, v in high.items()}
            report["baseline_rss_mb"] = report["baseline"]["rss"]
            report["settled_rss_mb"] = warm["rss_mb"]
            report["rss_after_references_mb"] = before["rss_mb"]
            soak.t0 = time.monotonic()
            stop = asyncio.Event()
            changer = asyncio.create_task(soak.changer(stop))
            sampler = asyncio.create_task(soak.sampler(s, stop))
            try:
                await soak.traffic(s, SECONDS)
            finally:
                stop.set()
                await changer
                await sampler
            # the burst, on a known config: max_batch_size 2, batching on, nothing broken
            editor.good["llm_params"].update(max_batch_size=2, continuous_batching=True)
            editor.good["llm_params"].pop("prefill_chunk_tokens", None)
            await editor.settle_good(base, s, AUTH)
            report["burst"] = await burst(soak, s, base)
        finally:
            editor.cleanup()                      # the original file back
        report["restore"] = await reload_now(s, base)
        after = await soak.settle(s, before)
        report["end"] = await lowest_rss(soak, s, after)
        await soak.traced()
        report["soak"] = soak.result(before, after)
        report["health"] = await get_json(s, base + "/health")
        report["metrics"] = await metrics(s, base)
        report["sigterm"] = await sigterm_with_requests_in_flight(soak, s, proc)
        report["removed"] = sorted(editor.added)
    return report


def problems_of(report: dict) -> list[str]:
    bad = []
    soak, after = report["soak"], report["soak"]["after"]
    before = soak["before"]
    if soak["failed"]:
        bad.append(f"{soak['failed']} failed replies: {soak['failures']}")
    if soak["lost"]:
        bad.append(f"{soak['lost']} requests neither answered nor refused")
    if soak["ok"] < 40:
        bad.append(f"only {soak['ok']} good replies")
    if soak["config_changes"] < 10:
        bad.append(f"only {soak['config_changes']} live edits")
    edits = "\n".join(soak["edits"])
    for needed in ("continuous_batching", "then 0", "max_batch_size 2",
                   "added llm", "removed llm", "removed embedder", "removed reranker",
                   "reloaded embedder", "device", "broken:",
                   "half-written", "reset_flags"):
        if needed not in edits:
            bad.append(f"no {needed!r} edit in the run: {soak['edits']}")
    b = report["burst"]
    bad += b["failures"]
    if not b["embed"].get(503):
        bad.append(f"the embedding burst was never refused with 503: {b['embed']}")
    if not b["chat"].get(503):
        bad.append(f"the chat burst past MAX_QUEUED_PER_MODEL={MAX_QUEUED} was never refused "
                   f"(issue 11 defect 4): {b['chat']}, largest LLM queue seen "
                   f"{b['max_llm_queue']}")
    h = report["health"]
    if h["status"] != "ok" or h["config_error"] is not None:
        bad.append(f"/health after the run: {h['status']}, {h['config_error']}")
    for labels, v in report["metrics"].get("agile_rag_model_queue_length", []):
        if v:
            bad.append(f"queue gauge {labels} = {v} after the run")
    for labels, v in report["metrics"].get("agile_rag_http_requests_in_progress", []):
        if v and labels.get("route") != "/metrics":
            bad.append(f"in-progress gauge {labels} = {v} after the run")
    if after["actors"] != before["actors"]:
        bad.append(f"actors after the run {after['actors']} != before {before['actors']}")
    alive = set(after["weights_alive"])
    models = set(before["actors"]) - {"config", "vram-arbiter"}
    if alive != models:
        bad.append(f"weights alive after the run: {sorted(alive)}; running models: "
                   f"{sorted(models)} (removed: {report['removed']})")
    for part in ("anon", "file"):
        end, base = report["end"][part], report["baseline"][part]
        if end > 1.2 * base:
            bad.append(f"RSS ({part}) {end} MB, the lowest in {RSS_WATCH_S} s after the run, "
                       f"> 1.2 x the warmed-up {base} MB")
    sig = report["sigterm"]
    if sig["exit_s"] > SHUTDOWN_TIMEOUT + 5 or sig["returncode"] != 0:
        bad.append(f"SIGTERM: exit after {sig['exit_s']} s with {sig['returncode']}")
    if any(r != "ok" for r in sig["in_flight"]):
        bad.append(f"requests in flight at SIGTERM: {sig['in_flight']}")
    return bad


def test_chaos_nothing_lost_under_live_edits_and_load(chaos_server):
    print(f"\nchaos seed {SEED} (CHAOS_SEED={SEED} repeats this run)", flush=True)
    report = asyncio.run(chaos_run(chaos_server))
    summary = {k: v for k, v in report["soak"].items() if k not in ("samples", "before")}
    summary.update(burst=report["burst"], sigterm=report["sigterm"], seed=SEED,
                   rss_after_references_mb=report["rss_after_references_mb"],
                   memory_end_mb=report["end"], memory_baseline_mb=report["baseline"],
                   baseline_rss_mb=report["baseline_rss_mb"])
    print(json.dumps(summary, indent=1, default=str))
    saved = os.path.join(os.path.dirname(chaos_server["log"]), "chaos-report.json")
    with open(saved, "w") as f:
        json.dump(report, f, indent=1, default=str)
    bad = problems_of(report)
    assert not bad, f"seed {SEED}; server log {chaos_server['log']}, report {saved}:\n- " + \
        "\n- ".join(bad)
