"""Decoding one step ahead (``BatchEngine.ahead``, on by itself on a GPU whose decode step
replays a CUDA graph): a step's greedy tokens stay on the device as the next step's input and
are read while that step computes. Forced on here, with the real SmolLM2 model on the CPU
(text deferred too, as on a GPU), every chat must end exactly as when each step's tokens are
read before the next starts: the same words, finish reasons, token counts and streamed
pieces, with EOS, stop strings, length limits, rows that join and leave mid-batch, cancels,
a pause for another model, and rows that do not sample greedily in the same batch."""
from __future__ import annotations

import asyncio

import pytest
from test_chat_batching import CASES, chat, drain, idle_events, start_llm
from test_deferred_text import cancel_and_pause, extras, outcome, same_outcomes, together

#: a short answer in a long allowance: ends by EOS, one step after which was sent ahead
SHORT = [("Say hello.", 40), ("Reply with one word: yes or no?", 30)]


@pytest.fixture(scope="module")
async def llm():
    actor, arbiter, system = await start_llm({})
    yield actor, arbiter, system
    await system.stop_all()


def _set(actor, ahead):
    actor.engine.ahead = ahead
    actor.engine.defer_text = True if ahead else None


async def _set_idle(actor, ahead):
    """:func:`_set` once no loop runs (a loop reads defer_text as it starts)."""
    await idle_events(actor, 0)
    _set(actor, ahead)


async def test_decoding_ahead_ends_every_chat_as_reading_each_step(llm):
    actor = llm[0]
    results, steps = {}, {}
    try:
        for ahead in (False, True):
            await _set_idle(actor, ahead)
            # all greedy: steps go ahead
            msgs = [chat(p, n, stop, stream=True) for p, n, stop in CASES] + \
                [chat(p, n, stream=True) for p, n in SHORT]
            got = await together(actor, msgs)
            steps[ahead] = actor.engine.run_stats.get("ahead_steps", 0)
            for m, r in zip(msgs, got):
                assert await drain(m.stream, r) == r.text      # streamed once, in order
            # with rows that sample otherwise (logprobs, a JSON schema) in the batch
            mixed = [chat(p, n, stop) for p, n, stop in CASES[:2]] + extras()
            got2 = await together(actor, mixed)
            results[ahead] = [outcome(m, r) for m, r in zip(msgs + mixed, got + got2)]
    finally:
        await _set_idle(actor, None)
    assert steps[False] == 0 and steps[True] > 10
    same_outcomes(results[True], results[False])
    reasons = [o[1] for o in results[True][:len(CASES) + len(SHORT)]]
    assert "stop" in reasons and "length" in reasons
    # the short answers end by EOS (no stop string given) before their max_tokens
    for (text, reason, n, *_), (_, limit) in zip(results[True][len(CASES):], SHORT):
        assert reason == "stop" and n < limit and text


async def test_rows_that_join_and_leave_a_batch_decoding_ahead(llm):
    """Chats admitted while steps go ahead, and chats that end at different steps: each ends
    with the words it has alone."""
    actor = llm[0]
    prompts = [("Write a long story about a dragon.", 48), ("Count from 1 to 20.", 20),
               ("Name three colours.", 10), ("Say hello.", 40)]
    alone = [await actor.ask(chat(p, n), timeout=300) for p, n in prompts]
    await _set_idle(actor, True)
    try:
        first = chat(*prompts[0], stream=True)
        task = asyncio.ensure_future(actor.ask(first, timeout=300))
        for _ in range(3):                                   # decoding, steps going ahead
            await asyncio.wait_for(first.stream.get(), 120)
        later = [chat(p, n) for p, n in prompts[1:]]
        got = await together(actor, later)
        res = await asyncio.wait_for(task, 300)
    finally:
        await _set_idle(actor, None)
    assert [(r.text, r.finish_reason, r.completion_tokens) for r in [res] + got] == \
        [(r.text, r.finish_reason, r.completion_tokens) for r in alone]


async def test_a_cancel_and_a_pause_while_decoding_ahead(llm):
    """A stream cancelled mid-batch leaves, a pause for another model (Yield) takes the step
    sent ahead first, and the chats resume with the words they have alone."""
    await cancel_and_pause(llm, _set)


def test_llm_params_decode_ahead_reaches_the_engine():
    """``llm_params.decode_ahead`` (default true) is the setting the loop reads on a GPU: false
    keeps every step's tokens read before the next starts (a live edit too); a non-boolean is
    a bad liveconfigs.json."""
    from agile_rag.actors.llm_batching import _settings
    from agile_rag.runtime.liveconfig import LiveConfigError, validate

    from support import llm_batch_settings

    assert llm_batch_settings({})["decode_ahead"] is True
    assert llm_batch_settings({"decode_ahead": False})["decode_ahead"] is False
    from agile_rag.actors.batch_plan import BatchSettings
    assert _settings(BatchSettings(), {"decode_ahead": False}).decode_ahead is False
    assert validate({"llm_params": {"decode_ahead": False}}).llm_params["decode_ahead"] is False
    with pytest.raises(LiveConfigError) as bad:
        validate({"llm_params": {"decode_ahead": 1}})
    assert any("decode_ahead" in p for p in bad.value.problems)


async def test_chats_asked_over_http_decode_ahead(tmp_path):
    """What a RAG app sends (``temperature`` 0, streamed, usage asked for, as
    benchmarks/chat_http.py does) is a plain greedy chat: with steps going ahead (a GPU's
    default), the served burst's steps go ahead too, and every chat streams the words it gets
    with them off."""
    import json

    import aiohttp
    from aiohttp.test_utils import TestServer

    from agile_rag.configs import load_settings
    from agile_rag.http.keys import SERVER
    from agile_rag.server import create_app

    from support import CACHE, SMOLLM, sse_events

    live = tmp_path / "live.json"
    live.write_text(json.dumps({"standby_llms": ["smollm2"], "llms": {"smollm2": {
        "llm_path": SMOLLM, "max_tokens": 2048, "dtype": "float32"}}}))
    app = create_app(load_settings(LIVECONFIGS_PATH=str(live), MODEL_CACHE_DIR=CACHE))
    async with TestServer(app) as srv:
        actor = app[SERVER].registry.resolve("llm", None)
        for _ in range(1200):
            if actor.state == "ready" and actor.engine is not None:
                break
            await asyncio.sleep(0.1)
        assert actor.engine is not None, actor.state
        url = str(srv.make_url("/v1/chat/completions"))

        async def burst(session) -> list[tuple[str, str]]:
            async def one(prompt, n):
                async with session.post(url, json={
                        "model": "smollm2", "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": n, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}) as r:
                    assert r.status == 200
                    events = await sse_events(r)
                chunks = [c for c in events[:-1] if c["choices"]]
                return ("".join(c["choices"][0]["delta"].get("content", "") for c in chunks),
                        chunks[-1]["choices"][0]["finish_reason"])
            return await asyncio.gather(*(one(p, n) for p, n, _ in CASES))

        got = {}
        async with aiohttp.ClientSession() as s:
            try:
                for ahead in (False, True):
                    await _set_idle(actor, ahead)
                    got[ahead] = await burst(s)
                    steps = actor.engine.run_stats.get("ahead_steps", 0)
                    assert steps > 5 if ahead else steps == 0, steps
            finally:
                await _set_idle(actor, None)
    assert got[True] == got[False] and got[True][0][0].startswith("The capital of France")
