"""A burst's first prefill pass waits for the rest of the burst (``llm_params.burst_linger_ms``,
issue 15): with the GPU idle, while chats keep coming less than BURST_GAP_S apart, the loop
waits for them (at most the linger after the first), so a burst that comes over a few
milliseconds is read as if it had come at once, not as the few the loop found first and more
passes after. A lone chat never waits; a stop while waiting answers everyone; every chat says
what it says alone. Through the real SmolLM2 actor (on this CPU the default is no waiting: the
tests set it; measured on an H100 it never waited and gave no gain, so it is off by default on a
GPU too since session 23)."""
from __future__ import annotations

import asyncio
import time

import pytest
from test_chat_batching import CASES, chat, idle_events, start_llm

from agile_rag.actors import llm_batching
from agile_rag.actors.batch_plan import BURST_LINGER_GPU_S, BatchSettings, linger_s
from agile_rag.actors.messages import UpdateModel
from agile_rag.runtime.errors import ActorStopped
from agile_rag.runtime.liveconfig import LiveConfigError, validate

PARAMS = {"default_temp": 0.0, "prefix_cache_tokens": 0, "prefill_batch_tokens": 4096}


@pytest.fixture(scope="module")
async def llm():
    actor, arbiter, system = await start_llm(PARAMS)
    alone = [await actor.ask(chat(p, n, stop), timeout=300) for p, n, stop in CASES]
    yield actor, alone
    await system.stop_all()


async def _linger(actor, ms):
    await actor.ask(UpdateModel(spec=actor.spec, params={**PARAMS, "burst_linger_ms": ms}),
                    timeout=60)


async def _in_waves(actor, gap_s: float):
    """CASES sent two at a time, ``gap_s`` apart: what each said, and the loop's figures."""
    since = time.monotonic()
    tasks = []
    for i in range(0, len(CASES), 2):
        tasks += [asyncio.ensure_future(actor.ask(chat(p, n, stop), timeout=300))
                  for p, n, stop in CASES[i:i + 2]]
        await asyncio.sleep(gap_s)
    results = await asyncio.gather(*tasks)
    idle = [e.detail for e in await idle_events(actor, since)]
    return results, idle


async def test_a_bursts_first_pass_waits_for_the_chats_still_coming(llm, monkeypatch):
    actor, alone = llm
    monkeypatch.setattr(llm_batching, "BURST_GAP_S", 0.5)   # this CPU's waves: 0.05 s apart
    await _linger(actor, 0)                                  # first without: several passes
    results, idle = await _in_waves(actor, 0.05)
    assert [(r.text, r.finish_reason) for r in results] == \
        [(a.text, a.finish_reason) for a in alone]
    assert sum(d.get("prefills", 0) for d in idle) >= 2, idle
    assert not any(d.get("linger_s") for d in idle), idle
    await _linger(actor, 3000)
    results, idle = await _in_waves(actor, 0.05)
    assert [(r.text, r.finish_reason) for r in results] == \
        [(a.text, a.finish_reason) for a in alone]
    # the five in one pass, the loop having waited for the waves after the first
    assert sum(d.get("prefills", 0) for d in idle) == 1, idle
    waited = sum(d.get("linger_s", 0) for d in idle)
    assert 0.05 <= waited < 3, idle


async def test_a_lone_chat_never_waits(llm, monkeypatch):
    actor, alone = llm
    monkeypatch.setattr(llm_batching, "BURST_GAP_S", 5.0)
    await _linger(actor, 3000)
    since = time.monotonic()
    got = await actor.ask(chat(*CASES[0][:2], CASES[0][2]), timeout=300)
    idle = [e.detail for e in await idle_events(actor, since)]
    assert (got.text, got.finish_reason) == (alone[0].text, alone[0].finish_reason)
    assert not any(d.get("linger_s") for d in idle), idle
    assert time.monotonic() - since < 3


async def test_a_burst_waits_no_longer_than_the_linger(llm, monkeypatch):
    """Chats that keep coming (the gap wide open here) wait at most the linger after the
    first one, then are read."""
    actor, alone = llm
    monkeypatch.setattr(llm_batching, "BURST_GAP_S", 30.0)
    await _linger(actor, 300)
    since = time.monotonic()
    results = await asyncio.gather(*(actor.ask(chat(p, n, stop), timeout=300)
                                     for p, n, stop in CASES[:2]))
    idle = [e.detail for e in await idle_events(actor, since)]
    assert [r.text for r in results] == [a.text for a in alone[:2]]
    waited = sum(d.get("linger_s", 0) for d in idle)
    assert 0.2 <= waited <= 1.5, idle
    assert sum(d.get("prefills", 0) for d in idle) == 1, idle


async def test_a_stop_while_the_first_pass_waits_answers_everyone(llm, monkeypatch):
    """A stop (or a drain, a yield, new settings) that comes while the pass waits is taken at
    once, not after the linger: here the chats are answered with the stop's error long before
    the linger's 30 s, and the next chats are served."""
    actor, alone = llm
    monkeypatch.setattr(llm_batching, "BURST_GAP_S", 30.0)
    await _linger(actor, 30000)
    engine = actor.engine
    since = time.monotonic()
    tasks = [asyncio.ensure_future(actor.ask(chat(p, n, stop), timeout=300))
             for p, n, stop in CASES[:2]]
    for _ in range(200):                       # the loop waits for the rest of the burst
        if len(engine.planner.waiting) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(engine.planner.waiting) == 2
    engine.abort(ActorStopped("stopped while the pass waited"))
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(d, ActorStopped) for d in done), done
    assert time.monotonic() - since < 10
    await idle_events(actor, since)
    await _linger(actor, 0)
    got = await actor.ask(chat(*CASES[1][:2], CASES[1][2]), timeout=300)
    assert got.text == alone[1].text


def test_burst_linger_ms_sets_the_wait_and_none_is_the_default():
    assert linger_s(BatchSettings(), on_gpu=True) == BURST_LINGER_GPU_S == 0
    assert linger_s(BatchSettings(), on_gpu=False) == 0
    assert linger_s(BatchSettings(burst_linger_s=0.0), on_gpu=True) == 0
    assert linger_s(BatchSettings(burst_linger_s=0.02), on_gpu=False) == 0.02
    for ok in (0, 2.5, 8, 1000):
        assert validate({"llm_params": {"burst_linger_ms": ok}}).llm_params[
            "burst_linger_ms"] == ok
    for bad in (-1, 1001, "8", True, None):
        with pytest.raises(LiveConfigError) as err:
            validate({"llm_params": {"burst_linger_ms": bad}})
        assert any("burst_linger_ms" in p for p in err.value.problems), bad
