"""Continuous batching of chats with the real SmolLM2 model (CPU), driven through the LLM actor:
concurrent streams share decode steps and still get exactly what they would get alone."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from agile_rag.actors import batch_plan, sampling
from agile_rag.actors.llm_actor import YIELD_COST_RATIO, LLMActor
from agile_rag.actors.messages import (
    Chat,
    ChatResult,
    Describe,
    JobFinished,
    RequestGrant,
    Revoke,
    TokenStream,
    UpdateModel,
)
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.errors import ActorStopped
from agile_rag.runtime.liveconfig import ModelSpec, resolve_path
from agile_rag.runtime.system import ActorSystem

from support import CACHE, ROOT, SMOLLM, FakeResidency

# (prompt, max_tokens, stop): different lengths, limits and stop strings in one batch
CASES = [
    ("What is the capital of France?", 12, []),
    ("Write a poem about the sea.", 9, []),
    ("Count from 1 to 20.", 16, ["3."]),
    ("Explain gravity in one sentence.", 6, []),
    ("Name three colours.", 14, [":", "\n"]),
]


def chat(prompt, max_tokens, stop=(), *, temperature=0.0, top_p=1.0, seed=None, stream=False):
    return Chat(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=temperature, top_p=top_p, stop=list(stop), seed=seed,
                stream=TokenStream() if stream else None)


async def drain(stream: TokenStream, result: ChatResult) -> str:
    pieces = []
    while not stream.queue.empty():
        pieces.append(stream.queue.get_nowait())
    return "".join(p for p in pieces if isinstance(p, str))


async def start_llm(params: dict, *, grant_timeout: float | None = 10):
    """A SmolLM2 actor (dequantised cache), ready; with ``grant_timeout`` behind a VRAM arbiter
    and a residency double, without it on the CPU alone."""
    system = ActorSystem()
    arbiter = None
    if grant_timeout is not None:
        arbiter = system.spawn(VRAMArbiter(8 << 30, grant_timeout=grant_timeout))
    path = resolve_path(SMOLLM, ROOT)
    actor = LLMActor(ModelSpec("llm", "smollm2", path, path, max_tokens=2048), params,
                     cache_dir=CACHE)
    if arbiter is not None:
        actor.residency_factory = FakeResidency
        actor.gpu_device = "cpu"
    system.spawn(actor)
    state = await actor.ask(Describe(), timeout=300)
    assert state.state == "ready", state
    assert actor.engine is not None, actor.batching_off
    return actor, arbiter, system


@pytest.fixture(scope="module")
async def llm():
    """One SmolLM2 actor behind a VRAM arbiter with a residency double."""
    actor, arbiter, system = await start_llm({"default_temp": 0.5})
    yield actor, arbiter, system
    await system.stop_all()


@pytest.fixture(scope="module")
async def alone(llm):
    """Each case asked on its own, one after the other (greedy)."""
    actor = llm[0]
    out = []
    for prompt, n, stop in CASES:
        out.append(await actor.ask(chat(prompt, n, stop), timeout=300))
    return out


def chat_events(system, since: float):
    return [e for e in system.tracer.events if e.msg_type == "Chat" and e.started >= since]


def held_run(engine, loop_run, burst: int):
    """``loop_run`` (the engine's own ``run``), started only once ``burst`` requests are queued:
    the loop sees the whole burst at once."""
    def run():
        for _ in range(400):
            if engine._commands.qsize() >= burst:
                break
            time.sleep(0.01)
        return loop_run()
    return run


async def idle_events(actor, since: float):
    """BatchIdle trace events (a loop reports after its last reply: wait until it did)."""
    for _ in range(200):
        if actor._loop is None and not actor.engine.running:
            break
        await asyncio.sleep(0.05)
    return [e for e in actor.system.tracer.events if e.msg_type == "BatchIdle" and
            e.started >= since]


async def test_concurrent_streams_get_what_they_get_alone(llm, alone):
    actor, _, system = llm
    for r, (_, n, _stop) in zip(alone, CASES):
        assert r.completion_tokens <= n
    assert alone[0].text.startswith("The capital of France is")
    assert alone[3].finish_reason == "length" and alone[3].completion_tokens == 6
    assert alone[2].finish_reason == "stop" and "3." not in alone[2].text
    await idle_events(actor, 0)                 # the loops of the sequential asks are over
    t0 = time.monotonic()
    msgs = [chat(p, n, stop, stream=True) for p, n, stop in CASES]
    results = await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs))
    for msg, got, want in zip(msgs, results, alone):
        assert (got.text, got.finish_reason, got.completion_tokens, got.prompt_tokens) == \
            (want.text, want.finish_reason, want.completion_tokens, want.prompt_tokens)
        assert await drain(msg.stream, got) == got.text      # streamed piece by piece
    events = chat_events(system, t0)
    assert len(events) == len(CASES) and all(e.outcome == "ok" for e in events)
    assert max(e.detail["batch_size"] for e in events) >= 3, [e.detail for e in events]
    idle = await idle_events(actor, t0)
    batched = max(idle, key=lambda e: e.detail["max_batch"])
    assert batched.detail["max_batch"] >= 3, [e.detail for e in idle]
    assert batched.detail["steps"] < sum(r.completion_tokens for r in results)  # shared steps
    # the loop's time in encoding prompts, before its first forward and after its last one
    d = batched.detail
    assert 0 < d["prepare_s"] < d["seconds"] and 0 < d["lead_s"] + d["tail_s"] < d["seconds"], d


async def test_a_cancelled_stream_leaves_and_the_others_finish(llm, alone):
    actor = llm[0]
    long = chat("Write a long story about a dragon.", 200, stream=True)
    others = [chat(p, n, stop) for p, n, stop in CASES[:3]]
    task = asyncio.ensure_future(actor.ask(long, timeout=300))
    rest = [asyncio.ensure_future(actor.ask(m, timeout=300)) for m in others]
    text = ""
    while len(text) < 10:                        # the long one streams: then its client leaves
        item = await asyncio.wait_for(long.stream.get(), 120)
        assert isinstance(item, str), item
        text += item
    long.cancel.set()
    got = await asyncio.wait_for(task, 120)
    assert got.finish_reason == "cancelled" and got.completion_tokens < 200
    for fut, want in zip(rest, alone[:3]):
        r = await fut
        assert (r.text, r.finish_reason) == (want.text, want.finish_reason)


async def test_describe_is_answered_while_a_batch_runs(llm):
    actor = llm[0]
    msgs = [chat("Write a long essay about rivers.", 40), chat("Tell me about mountains.", 40)]
    tasks = [asyncio.ensure_future(actor.ask(m, timeout=300)) for m in msgs]
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    state = await actor.ask(Describe(), timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert state.state == "ready"
    assert not all(t.done() for t in tasks), "the batch should still be running"
    assert actor.engine.running
    for m in msgs:
        m.cancel.set()
    for t in tasks:
        assert (await t).finish_reason in ("cancelled", "length", "stop")


async def test_cpu_decode_steps_attend_over_a_few_bucketed_lengths(llm):
    """Without CUDA graphs each decode step used to attend over exactly its longest row's
    keys: a new matmul shape every step, for which oneDNN built and kept a kernel (the heap
    grew ~35 MB for every new batch size and stayed: 925 MB after the CPU chat load test). The
    steps now attend over multiples of VIEW_BUCKET (masked keys), so a chat of 60 tokens uses
    one or two shapes, and the words are those of an unbucketed run."""
    from agile_rag.actors import batch_runner
    actor = llm[0]
    runner = actor.engine.runner
    views: list[int] = []
    real = runner._mask

    def spy(pos, view, dtype):                      # every decode step builds its mask
        views.append(view)
        return real(pos, view, dtype)
    prompts = ["Write a long essay about rivers.", "Tell me about mountains."]
    runner._mask = spy
    bucket = batch_runner.VIEW_BUCKET
    try:
        got = await asyncio.gather(*(actor.ask(chat(p, 60), timeout=300) for p in prompts))
        bucketed, views[:] = list(views), []
        batch_runner.VIEW_BUCKET = 1                   # every step its own length, as before
        exact = await asyncio.gather(*(actor.ask(chat(p, 60), timeout=300) for p in prompts))
    finally:
        batch_runner.VIEW_BUCKET = bucket
        runner._mask = real
    assert len(bucketed) >= 59 and len(set(bucketed)) <= 2, sorted(set(bucketed))
    assert all(v % bucket == 0 for v in set(bucketed) - {max(bucketed)}), set(bucketed)
    assert len(set(views)) > 10, sorted(set(views))    # the unbucketed run, for contrast
    assert [g.text for g in got] == [e.text for e in exact]


async def test_seeded_sampling_repeats_alone_and_in_a_batch(llm):
    actor = llm[0]
    req = dict(temperature=1.2, top_p=0.9, seed=11)
    a = await actor.ask(chat("Tell me a fun fact.", 10, **req), timeout=300)
    b = await actor.ask(chat("Tell me a fun fact.", 10, **req), timeout=300)
    assert a.text == b.text and a.text
    mixed = await asyncio.gather(
        actor.ask(chat("Tell me a fun fact.", 10, **req), timeout=300),
        actor.ask(chat("What is the capital of France?", 10), timeout=300),
        actor.ask(chat("Tell me a fun fact.", 10, temperature=1.2, top_p=0.9), timeout=300))
    assert mixed[0].text == a.text


async def test_the_batch_holds_one_grant_and_frees_its_cache_on_revoke(llm, alone):
    actor, arbiter, _ = llm
    before = arbiter.granted_count
    results = await asyncio.gather(*(actor.ask(chat(p, n, stop), timeout=300)
                                     for p, n, stop in CASES[:3]))
    assert [r.text for r in results] == [r.text for r in alone[:3]]
    assert arbiter.granted_count - before <= 2          # one grant per batch loop, not per chat
    for _ in range(50):                                  # BatchIdle finishes the job
        if not (await arbiter.ask(Describe())).busy:
            break
        await asyncio.sleep(0.05)
    state = await arbiter.ask(Describe())
    assert "smollm2" in state.holders and not state.busy
    assert actor.engine.cache is not None               # kept between batches
    await actor.ask(Revoke(model="smollm2", reason="test"), timeout=30)
    assert actor.engine.cache is None and actor.lease.residency.evicts >= 1
    assert "smollm2" not in (await arbiter.ask(Describe())).holders
    r = await actor.ask(chat(*CASES[0]), timeout=300)    # takes the GPU again
    assert r.text == alone[0].text and actor.lease.residency.on_gpu


async def test_a_tight_kv_budget_preempts_and_recomputes(llm, monkeypatch):
    """When the cache budget cannot hold every row as they grow, the newest row leaves and is
    prefilled again later with what it generated so far: its text is unchanged."""
    actor = llm[0]
    cases = [("Write a long story about a dragon.", 24), ("Write a poem about the sea.", 24)]
    alone = [await actor.ask(chat(p, n), timeout=300) for p, n in cases]
    monkeypatch.setattr(batch_plan, "LEN_BUCKET", 16)
    monkeypatch.setattr(batch_plan, "RESERVE_NEW", 4)
    engine = actor.engine
    old = engine.kv_tokens
    await actor.ask(Revoke(model="smollm2", reason="fresh cache"), timeout=30)
    engine.configure(kv_tokens=100)        # two rows of 48 tokens fit, two of 64 do not
    try:
        results = await asyncio.gather(*(actor.ask(chat(p, n), timeout=300) for p, n in cases))
    finally:
        engine.configure(kv_tokens=old)
        await actor.ask(Revoke(model="smollm2", reason="normal cache"), timeout=30)
    assert [(r.text, r.finish_reason) for r in results] == \
        [(r.text, r.finish_reason) for r in alone]
    assert all(r.completion_tokens == 24 for r in results)
    events = [e for e in actor.system.tracer.events if e.msg_type == "Chat"][-2:]
    assert any(e.detail.get("preempted") for e in events), [e.detail for e in events]


async def test_batching_off_falls_back_to_generate_with_the_same_words(llm, alone):
    """llm_params.continuous_batching=false: one plain generate() per chat, same greedy text."""
    actor = llm[0]
    params = dict(actor.params)
    await actor.ask(UpdateModel(spec=actor.spec, params={**params, "continuous_batching": False}),
                    timeout=60)
    try:
        assert actor.engine is None and "continuous_batching" in actor.batching_off
        plain = [await actor.ask(chat(p, n, stop), timeout=300) for p, n, stop in CASES[:2]]
    finally:
        await actor.ask(UpdateModel(spec=actor.spec, params=params), timeout=60)
    assert actor.engine is not None
    assert [(r.text, r.finish_reason, r.completion_tokens) for r in plain] == \
        [(r.text, r.finish_reason, r.completion_tokens) for r in alone[:2]]


async def test_stopping_the_actor_mid_batch_answers_the_streams_and_ends_the_loop():
    """SIGTERM's path: stop_all while a batch decodes. The loop used to spin forever after
    the abort (the abort flag was never cleared), so the server never exited."""
    actor, _, system = await start_llm({}, grant_timeout=None)
    msgs = [chat("Write a long story about a dragon.", 400, stream=True),
            chat("Write a long essay about rivers.", 400)]
    tasks = [asyncio.ensure_future(actor.ask(m, timeout=300)) for m in msgs]
    item = await asyncio.wait_for(msgs[0].stream.get(), 120)     # the batch is decoding
    assert isinstance(item, str)
    engine = actor.engine
    await asyncio.wait_for(system.stop_all(), 30)
    for task in tasks:
        with pytest.raises(ActorStopped):
            await asyncio.wait_for(task, 10)
    assert not engine.running and not engine.active and not engine.waiting


@pytest.mark.parametrize("cache_is_enough", [True, False])
async def test_a_busy_batch_yields_the_gpu_to_a_waiting_model_and_resumes(cache_is_enough):
    """Chats keep the batch loop (and its grant) busy; another model asks for memory that only
    the LLM's grant can give. The arbiter sends Yield: the loop pauses after its minimum slice,
    gives the memory back, the other model gets it at once (not after the grant deadline), and
    the chats resume and end with the words they would have had alone. When the LLM's KV cache
    alone makes the room, only the cache goes: the weights stay on the GPU (no 6 GB copy back
    on a real card); otherwise the whole grant goes."""
    actor, arbiter, system = await start_llm({"gpu_min_slice_ms": 300}, grant_timeout=60)
    try:
        prompts = [("Write a long story about a dragon.", 40),
                   ("Write a long essay about rivers.", 40)]
        alone = [await actor.ask(chat(p, n), timeout=300) for p, n in prompts]
        llm_need = actor.lease.residency.weight_bytes + actor.working_bytes(1)
        arbiter.budget = llm_need + (64 << 20)          # the LLM, or the other model: not both
        other = RequestGrant(model="other-model", nbytes=(128 << 20) if cache_is_enough else
                             actor.working_bytes(1) + (128 << 20))
        await actor.ask(Revoke(model="smollm2", reason="start from the CPU"), timeout=30)

        msgs = [chat(p, n, stream=True) for p, n in prompts]
        tasks = [asyncio.ensure_future(actor.ask(m, timeout=300)) for m in msgs]
        await asyncio.wait_for(msgs[0].stream.get(), 120)        # the batch holds the GPU
        assert "smollm2" in (await arbiter.ask(Describe())).busy
        evicts = actor.lease.residency.evicts
        t0 = time.monotonic()
        granted = await arbiter.ask(other, timeout=30, sender="test")
        waited = time.monotonic() - t0
        assert granted.model == "other-model" and waited < 10, waited
        assert actor.lease.residency.evicts == evicts + (0 if cache_is_enough else 1)
        assert not all(t.done() for t in tasks), "the chats should have paused, not ended"
        arbiter.tell(JobFinished(model="other-model"), sender="test")  # the other model is done
        results = [await asyncio.wait_for(t, 300) for t in tasks]
        assert [(r.text, r.finish_reason) for r in results] == \
            [(r.text, r.finish_reason) for r in alone]
        chats = [e for e in system.tracer.events if e.msg_type == "Chat"][-2:]
        assert all(e.detail.get("preempted") for e in chats), [e.detail for e in chats]
        idle = [e for e in system.tracer.events if e.msg_type == "BatchIdle"]
        assert any(e.detail.get("yielded") and
                   e.detail.get("kept_weights") == cache_is_enough for e in idle)
        assert [e.msg_type for e in system.tracer.events if e.msg_type == "Yield"]
    finally:
        await system.stop_all()


async def test_a_yield_waits_for_a_slice_worth_its_measured_pause():
    """With ``gpu_min_slice_ms`` unset, the batch measures what each pause cost it (from the
    pause to its next decode step) and pauses again only after YIELD_COST_RATIO times that
    (at least 0.5 s, at most MAX_SLICE_S): pausing never eats more than 1/7 of the chats' GPU
    time, however often other models want the card. An explicit gpu_min_slice_ms is the
    slice as it was (no cost factor)."""
    from agile_rag.actors.llm_batching import MAX_SLICE_S
    actor, arbiter, system = await start_llm({}, grant_timeout=60)
    try:
        engine = actor.engine
        assert engine.settings.slice_cost_ratio == YIELD_COST_RATIO
        assert engine.pause_s == 0 and engine.yield_after_s() == 0.5
        arbiter.budget = actor.lease.residency.weight_bytes + actor.working_bytes(1) + (64 << 20)
        await actor.ask(Revoke(model="smollm2", reason="start from the CPU"), timeout=30)
        msgs = [chat("Write a long story about a dragon.", 60, stream=True)]
        tasks = [asyncio.ensure_future(actor.ask(m, timeout=300)) for m in msgs]
        await asyncio.wait_for(msgs[0].stream.get(), 120)
        t0 = time.monotonic()
        await arbiter.ask(RequestGrant(model="other-model", nbytes=128 << 20), timeout=30,
                          sender="test")
        assert time.monotonic() - t0 < 10
        await asyncio.sleep(0.2)                       # the other model's job
        arbiter.tell(JobFinished(model="other-model"), sender="test")
        await asyncio.gather(*tasks)
        assert engine.pause_s >= 0.2, engine.pause_s   # measured: the pause and the resume
        assert engine.yield_after_s() == pytest.approx(
            max(0.5, min(MAX_SLICE_S, YIELD_COST_RATIO * engine.pause_s)))
        assert engine.yield_after_s() >= YIELD_COST_RATIO * 0.2
        for _ in range(100):                           # the loop ends after its answers
            idle = [e for e in system.tracer.events if e.msg_type == "BatchIdle"]
            if any("pause_s" in e.detail for e in idle):
                break
            await asyncio.sleep(0.1)
        assert any("pause_s" in e.detail for e in idle), [e.detail for e in idle]
        actor.tell(UpdateModel(spec=actor.spec, params={"gpu_min_slice_ms": 200}))
        state = await actor.ask(Describe(), timeout=60)
        assert state.state == "ready"
        assert actor.engine.settings.slice_cost_ratio == 0
        assert actor.engine.yield_after_s() == pytest.approx(0.2)
    finally:
        await system.stop_all()


LONG_PROMPT = ("Here are my notes about rivers, lakes and the sea. " * 30 +
               "Summarise them in one sentence.")


async def test_the_prefill_warm_up_keeps_nothing(llm, alone):
    """BatchRunner.warm_prefill (once, on a GPU, before the first chats): throwaway forwards
    of a first burst's shapes. The cache and the stored prefixes are untouched, and the same
    prompt gives the same words after it. (Run here on the CPU, as a GPU runner would.)"""
    actor = llm[0]
    runner = actor.engine.runner
    while actor._loop is not None:
        await asyncio.sleep(0.01)
    cache, prefixes = runner.cache, len(runner.prefixes.entries)
    stats: dict = {}
    runner.on_gpu = lambda: True
    try:
        runner.prefill_warmed = False
        await asyncio.to_thread(runner.warm_prefill, 96, 32, stats)
    finally:
        del runner.on_gpu
    assert runner.prefill_warmed and stats.get("warm_prefill_s", 0) > 0, stats
    assert runner.cache is cache and len(runner.prefixes.entries) == prefixes
    stats = {}
    await asyncio.to_thread(runner.warm_prefill, 96, 32, stats)      # once per runner
    assert stats == {}
    prompt, n, stop = CASES[0]
    again = await actor.ask(chat(prompt, n, stop), timeout=300)
    assert again.text == alone[0].text


async def test_a_too_long_prompt_in_a_burst_is_answered_alone_and_the_others_are_served(
        llm, alone):
    """A burst's chats are prepared in the loop's turn: one over the context length gets its
    400, the chats of the same turn get what they get alone."""
    from agile_rag.runtime.errors import InvalidRequest

    actor = llm[0]
    await idle_events(actor, 0)
    msgs = [chat(p, n, stop) for p, n, stop in CASES]
    msgs.insert(2, chat("word " * 2100, 8))
    results = await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs),
                                   return_exceptions=True)
    bad = results.pop(2)
    assert isinstance(bad, InvalidRequest) and bad.code == "context_length_exceeded", bad
    for got, want in zip(results, alone):
        assert isinstance(got, ChatResult), got
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)


async def test_a_long_prompt_prefilled_in_chunks_gives_the_same_words(llm):
    actor = llm[0]
    engine = actor.engine
    old = engine.prefill_chunk
    try:
        engine.configure(prefill_chunk=0)                         # one forward
        whole = await actor.ask(chat(LONG_PROMPT, 16), timeout=300)
        engine.configure(prefill_chunk=48)
        engine.runner.prefixes.clear()      # read in chunks, not from the prompt kept above
        chunked = await actor.ask(chat(LONG_PROMPT, 16), timeout=300)
    finally:
        engine.configure(prefill_chunk=old)
    assert whole.prompt_tokens > 300 and whole.text
    assert (chunked.text, chunked.finish_reason) == (whole.text, whole.finish_reason)
    detail = [e for e in actor.system.tracer.events if e.msg_type == "Chat"][-1].detail
    assert detail.get("prefill_chunks", 0) >= whole.prompt_tokens // 48, detail


async def test_other_streams_decode_between_the_chunks_of_a_long_prompt(llm):
    """A long prompt arriving while a chat streams: with chunked prefill the stream keeps
    getting tokens, one decode step after each chunk, instead of stalling for the whole
    prefill."""
    actor = llm[0]
    engine = actor.engine
    old = engine.prefill_chunk
    # every chunk computed (an earlier test stored this prompt's prefix: it would be reused)
    engine.configure(prefill_chunk=24, prefix_cache_tokens=0)
    try:
        a = chat("Write a long story about a dragon.", 200, stream=True)
        task_a = asyncio.ensure_future(actor.ask(a, timeout=300))
        got = 0
        while got < 3:                                   # A is decoding
            item = await asyncio.wait_for(a.stream.get(), 120)
            got += isinstance(item, str) and item != ""
        b = await actor.ask(chat(LONG_PROMPT, 2), timeout=300)   # returns after its prefill
        during = 0
        while not a.stream.queue.empty():                # A's tokens streamed meanwhile
            item = a.stream.queue.get_nowait()
            during += isinstance(item, str) and item != ""
        a.cancel.set()
        await asyncio.wait_for(task_a, 120)
    finally:
        engine.configure(prefill_chunk=old, prefix_cache_tokens=4096)
    chunks = b.prompt_tokens // 24
    assert chunks >= 10
    assert during >= chunks - 3, (during, chunks)


async def test_a_long_prompt_cancelled_or_paused_mid_prefill(llm):
    """Cancelled between chunks: it ends as cancelled, nothing else is disturbed. Paused
    between chunks (the GPU yielded to another model): it starts again and answers the same."""
    from agile_rag.actors.messages import Yield
    from agile_rag.runtime.actor import CONTROL

    actor = llm[0]
    engine = actor.engine
    old = engine.prefill_chunk, engine.min_slice_s
    engine.configure(prefill_chunk=16, min_slice_s=0.0)
    try:
        whole = await actor.ask(chat(LONG_PROMPT, 8), timeout=300)
        msg = chat(LONG_PROMPT, 8)
        task = asyncio.ensure_future(actor.ask(msg, timeout=300))
        while engine.partial is None:
            await asyncio.sleep(0.005)
        msg.cancel.set()
        cancelled = await asyncio.wait_for(task, 120)
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 0

        evicts = actor.lease.residency.evicts
        task = asyncio.ensure_future(actor.ask(chat(LONG_PROMPT, 8), timeout=300))
        while engine.partial is None or engine.partial.done == 0:
            await asyncio.sleep(0.005)
        actor.tell(Yield(model="smollm2", reason="test"), priority=CONTROL, sender="test")
        again = await asyncio.wait_for(task, 300)
    finally:
        engine.configure(prefill_chunk=old[0], min_slice_s=old[1])
    assert actor.lease.residency.evicts == evicts + 1          # it did give the GPU back
    assert (again.text, again.finish_reason) == (whole.text, whole.finish_reason)
    detail = [e for e in actor.system.tracer.events if e.msg_type == "Chat"][-1].detail
    assert detail.get("preempted") == 1, detail


async def test_while_a_chat_streams_new_prompts_are_prefilled_a_chunk_at_a_time(llm):
    """Prompts that each fit a chunk but not together: with a chat streaming they are read
    one forward per chunk's worth (the stream stalls for no more than that); with nothing
    streaming they are read together."""
    actor = llm[0]
    engine = actor.engine
    old = engine.prefill_chunk
    prompts = [f"Question {i}: " + "tell me about the tides of the sea and the moon. " * 8
               for i in range(3)]
    engine.configure(prefill_chunk=160)                 # each prompt fits, two do not

    async def batch_sizes():
        ids = [f"chunk-at-a-time-{time.monotonic()}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(*(actor.ask(chat(p, 2), timeout=300, request_id=r)
                                         for p, r in zip(prompts, ids)))
        assert all(r.prompt_tokens <= 160 < 2 * r.prompt_tokens for r in results)
        by_id = {e.request_id: e.detail for e in actor.system.tracer.events
                 if e.msg_type == "Chat" and e.request_id in ids}
        return [by_id[r].get("prefill_batch") for r in ids]
    try:
        alone = await batch_sizes()
        a = chat("Write a long story about a dragon.", 300, stream=True)
        task_a = asyncio.ensure_future(actor.ask(a, timeout=300))
        got = 0
        while got < 2:
            item = await asyncio.wait_for(a.stream.get(), 120)
            got += isinstance(item, str) and item != ""
        streaming = await batch_sizes()
        a.cancel.set()
        await asyncio.wait_for(task_a, 120)
    finally:
        engine.configure(prefill_chunk=old)
    assert alone == [3, 3, 3], alone
    assert streaming == [1, 1, 1], streaming


async def test_llm_params_own_stream_is_read_and_changes_nothing_on_the_cpu():
    """``own_stream`` (default true) reaches the engine's settings, a live edit turns it off,
    and on the CPU the loop runs the same either way (the stream is a GPU's; tests/gpu checks
    it there)."""
    actor, _, system = await start_llm({}, grant_timeout=None)
    try:
        assert actor.engine.settings.own_stream is True
        before = await actor.ask(chat("What is the capital of France?", 8), timeout=120)
        actor.tell(UpdateModel(spec=actor.spec, params={"own_stream": False}))
        state = await actor.ask(Describe(), timeout=60)
        assert state.state == "ready"
        assert actor.engine.settings.own_stream is False
        after = await actor.ask(chat("What is the capital of France?", 8), timeout=120)
        assert after.text == before.text and "Paris" in after.text
        assert actor.engine.runner.loop_stream is None
    finally:
        await system.stop_all()


async def test_a_bursts_prompts_past_its_first_pass_are_encoded_while_the_pass_computes(
        llm, alone, monkeypatch):
    """(issue 15) The loop encodes the prompts its next prefill pass reads, launches the pass,
    and encodes the others while it computes (on a GPU the GPU reads the pass meanwhile; the
    32 prompts of a burst were encoded before its first forward, ~0.02 s with the GPU idle).
    Every chat still gets what it gets alone."""
    actor = llm[0]
    engine = actor.engine
    await idle_events(actor, 0)
    before = engine.settings
    events: list[str] = []
    prepare, run, sample = engine.prepare, engine.runner.run, sampling.sample
    loop_run, drain_queue = engine.run, engine._drain_queue
    loop = asyncio.get_running_loop()
    wake = loop.call_soon_threadsafe
    wakeups = []

    def counted_wake(*a, **k):       # the batch thread waking the event loop
        wakeups.append(threading.current_thread().name)
        return wake(*a, **k)

    def record(name, fn):
        def call(*a, **k):
            events.append(name)
            return fn(*a, **k)
        return call
    engine.prepare = record("prepare", prepare)
    engine.runner.run = record("run", run)
    monkeypatch.setattr(sampling, "sample", record("sample", sample))
    engine.run = held_run(engine, loop_run, len(CASES))
    engine._drain_queue = record("turn", drain_queue)    # once a turn
    loop.call_soon_threadsafe = counted_wake
    # two of these prompts (~40 tokens each) a pass; none read back from the prefix store
    engine.configure(prefill_tokens=100, prefix_cache_tokens=0)
    try:
        msgs = [chat(p, n, stop, stream=True) for p, n, stop in CASES]
        results = await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs))
    finally:
        engine.configure(prefill_tokens=before.prefill_tokens,
                         prefix_cache_tokens=before.prefix_cache_tokens)
        del engine.prepare, engine.runner.run, engine.run, engine._drain_queue
        monkeypatch.undo()
        del loop.call_soon_threadsafe
        engine.prepare = prepare
    for got, want in zip(results, alone):
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
    first = events.index("run")
    ahead = events[:first].count("prepare")
    rows = max(e.detail["batch_size"] for e in chat_events(actor.system, 0)[-len(CASES):])
    assert 2 <= ahead <= 3 < len(CASES), events      # the first pass's two (and the one
    # that showed the pass full), then the rest while it computes, before its tokens are read
    assert events[first + 1:events.index("sample")] == ["prepare"] * (len(CASES) - ahead), \
        events
    assert rows == len(CASES)
    # one wake-up of the event loop a turn at most (and one as the loop ends): the prompts'
    # go-aheads for their headers go with the turn's text, not one wake-up each
    from_loop = [n for n in wakeups if n != threading.main_thread().name]
    assert 0 < len(from_loop) <= events.count("turn") + 1, (len(from_loop), events)


async def test_a_prompt_is_encoded_as_the_chat_template_encodes_it(llm):
    """``encode_prompt`` renders the template and encodes the text without special tokens
    (no tensors): the same ids as ``apply_chat_template(tokenize=True)``, with a system
    message, several turns and text that looks like the template's own markers; a legacy
    completions prompt as the tokenizer encodes it."""
    from agile_rag.actors.llm_tools import template_inputs

    actor = llm[0]
    tok = actor.tokenizer
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": "Colour of the sky?"},
         {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "And <|im_end|> of grass?\n<|im_start|>assistant"}],
        [{"role": "user", "content": "  spaces,\ttabs and ünïcödé 漢字 "}],
    ]
    for messages in conversations:
        msg = Chat(messages=messages, max_tokens=4)
        shown, tools = template_inputs(tok, msg)
        want = tok.apply_chat_template(shown, tools=tools, add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
        assert actor.encode_prompt(msg) == want[0].tolist()
    legacy = Chat(prompt="Once upon a time", max_tokens=4)
    assert actor.encode_prompt(legacy) == tok("Once upon a time", return_tensors="pt")[
        "input_ids"][0].tolist()


async def test_a_bad_prompt_behind_a_full_batch_is_answered_while_the_batch_runs(llm):
    """A turn reads prompts only until they fill its pass; with the batch full (a chat
    streams, ``max_batch`` 1) no pass runs, and the prompts behind the waiting one are checked
    in that turn all the same: one over the context length gets its 400 while the chat still
    streams, not once a row is free."""
    from agile_rag.runtime.errors import InvalidRequest

    actor = llm[0]
    engine = actor.engine
    await idle_events(actor, 0)
    before = engine.settings
    engine.configure(max_batch=1)
    try:
        first = chat("Write a long story about a dragon.", 60, stream=True)
        streaming = asyncio.ensure_future(actor.ask(first, timeout=300))
        got = 0
        while got < 2:                                 # it streams: the batch is full
            item = await asyncio.wait_for(first.stream.get(), 120)
            got += isinstance(item, str) and item != ""
        waiting = asyncio.ensure_future(actor.ask(chat("Name three colours.", 4), timeout=300))
        bad = asyncio.ensure_future(actor.ask(chat("word " * 2100, 4), timeout=300))
        done, _ = await asyncio.wait([streaming, waiting, bad], timeout=300,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert done == {bad}, done                     # the chat still streams
        assert isinstance(bad.exception(), InvalidRequest)
        assert bad.exception().code == "context_length_exceeded"
        assert (await streaming).completion_tokens == 60
        assert (await waiting).text
    finally:
        engine.configure(max_batch=before.max_batch)


@pytest.mark.parametrize("burst", [True, False])
async def test_a_bursts_prefill_passes_go_back_to_back_before_any_decode_step(
        llm, alone, burst):
    """(issue 15) A burst read in several prefill passes: with ``burst_prefill`` (the default)
    the passes go back to back and the first decode step comes after the last (a step between
    them costs its whole time and only the first rows gain a token; on an H100 a served burst of
    32 chats took 129 steps for 128 tokens a chat); with it off a decode step follows each
    pass, as before. Every chat gets what it gets alone either way."""
    actor = llm[0]
    engine = actor.engine
    await idle_events(actor, 0)
    before = engine.settings
    kinds: list[str] = []
    run, loop_run = engine.runner.run, engine.run

    def recorded(plan, *a, **k):
        kinds.append(str(plan.kind))
        return run(plan, *a, **k)
    params = actor.params
    if not burst:                    # as a user turns it off
        await actor.ask(UpdateModel(spec=actor.spec, params={**params, "burst_prefill": False}),
                        timeout=60)
    assert engine.settings.burst_passes is burst
    engine.runner.run, engine.run = recorded, held_run(engine, loop_run, len(CASES))
    # two of these prompts (~40 tokens each) a pass, three passes; none from the prefix store
    engine.configure(prefill_tokens=100, prefix_cache_tokens=0)
    try:
        msgs = [chat(p, n, stop) for p, n, stop in CASES]
        results = await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs))
    finally:
        engine.configure(prefill_tokens=before.prefill_tokens,
                         prefix_cache_tokens=before.prefix_cache_tokens)
        del engine.runner.run, engine.run
        await actor.ask(UpdateModel(spec=actor.spec, params=params), timeout=60)
    assert engine.settings.burst_passes
    for got, want in zip(results, alone):
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
    passes = [i for i, k in enumerate(kinds) if k == "prefill"]
    assert len(passes) == 3, kinds
    if burst:
        assert passes == [0, 1, 2], kinds
    else:
        assert kinds[:5] == ["prefill", "decode", "prefill", "decode", "prefill"], kinds
    assert set(kinds) == {"prefill", "decode"}, kinds

