"""Prompts encoded on the LLM actor's prompt threads as chats arrive (llm_params.prompt_threads,
actors/early_prompts.py): the same words as prompts the batch loop encodes, bad prompts still
answered with their error, and the loop taking, waiting for or doing each prompt's encoding."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from test_chat_batching import CASES, chat, drain, idle_events, start_llm

from agile_rag.actors.early_prompts import EarlyPrompts, auto_threads, prepared
from agile_rag.actors.messages import UpdateModel
from agile_rag.runtime.errors import InvalidRequest


def _req():
    return SimpleNamespace(prompt=None, early=None)


def test_the_loop_takes_an_encoded_prompt_waits_for_one_being_encoded_or_encodes_it_itself():
    where: dict[int, str] = {}
    gate = threading.Event()

    def prepare(req):
        if req.n == 0:
            assert gate.wait(10)                 # the only thread is busy with this one
        if req.n == 3:
            raise InvalidRequest("too long", code="context_length_exceeded")
        where[req.n] = threading.current_thread().name
        req.prompt = [req.n]

    prompts = EarlyPrompts(prepare, 1, "t")
    try:
        reqs = [SimpleNamespace(prompt=None, early=None, n=i) for i in range(4)]
        for r in reqs[:3]:
            prompts.start(r)
        # 1 and 2 wait behind 0: the loop takes 1 from the queue and encodes it itself
        assert prepared(reqs[1], prepare) is False and reqs[1].early is None
        assert reqs[1].prompt == [1] and where[1] == threading.current_thread().name
        threading.Timer(0.2, gate.set).start()
        t = time.monotonic()
        assert prepared(reqs[0], prepare) is True            # waited for the thread
        assert time.monotonic() - t >= 0.1 and reqs[0].prompt == [0]
        assert where[0].startswith("llm-prompts-t")
        assert prepared(reqs[2], prepare) in (True, False) and reqs[2].prompt == [2]
        prompts.start(reqs[3])                                # its error comes to the loop
        with pytest.raises(InvalidRequest):
            prepared(reqs[3], prepare)
        done = _req()
        done.prompt = [7]                                     # nothing to do: no call
        assert prepared(done, lambda r: pytest.fail("prepared twice")) is False
        prompts.start(done)
        assert done.early is None                             # an encoded prompt stays as is
    finally:
        gate.set()
        prompts.close()


def test_prompt_threads_by_default_only_beside_a_gpu_on_eight_cores_or_more():
    assert auto_threads(False, 64) == 0
    assert auto_threads(True, 2) == 0 and auto_threads(True, 4) == 0
    assert auto_threads(True, 8) == 2 and auto_threads(True, 16) == 4
    assert auto_threads(True, 128) == 4


@pytest.fixture(scope="module")
async def llm():
    """A greedy SmolLM2 actor behind a VRAM arbiter (its loop asks for a grant, as on a GPU)
    whose prompts are encoded on two prompt threads."""
    params = {"default_temp": 0.0, "prompt_threads": 2}
    actor, arbiter, system = await start_llm(params)
    yield actor, params
    await system.stop_all()


def _threads_of(actor) -> list[str]:
    """Records which thread encodes each prompt from now on."""
    names: list[str] = []
    encode = type(actor).encode_prompt

    def recording(msg):
        names.append(threading.current_thread().name)
        return encode(actor, msg)
    actor.encode_prompt = recording
    return names


async def _burst(actor, cases):
    msgs = [chat(p, n, stop, stream=True) for p, n, stop in cases]
    results = await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs),
                                   return_exceptions=True)
    return msgs, results


async def test_prompts_encoded_as_chats_arrive_give_the_words_the_loop_gives(llm):
    actor, params = llm
    names = _threads_of(actor)
    loop = asyncio.get_running_loop()
    wake = loop.call_soon_threadsafe
    wakers: list[str] = []

    def counted_wake(*a, **k):
        wakers.append(threading.current_thread().name)
        return wake(*a, **k)
    try:
        await idle_events(actor, 0)
        t0 = time.monotonic()
        loop.call_soon_threadsafe = counted_wake
        try:
            msgs, early = await _burst(actor, CASES)
        finally:
            del loop.call_soon_threadsafe
        idle = await idle_events(actor, t0)
        on_threads = [n for n in names if n.startswith("llm-prompts-")]
        assert on_threads, names                      # the prompt threads encoded prompts
        # the streams' go-aheads for their headers come from the batch loop's turns (one
        # wake-up a turn), not one wake-up of the event loop per prompt from the prompt threads
        assert wakers and not any(n.startswith("llm-prompts-") for n in wakers), wakers
        assert sum(e.detail.get("early_prompts", 0) for e in idle) == len(on_threads)
        for msg, got in zip(msgs, early):
            assert await drain(msg.stream, got) == got.text       # streamed as before
        # the same burst with the loop encoding every prompt: the same words
        await actor.ask(UpdateModel(spec=actor.spec, params={**params, "prompt_threads": 0}),
                        timeout=60)
        names.clear()
        t1 = time.monotonic()
        _, loop = await _burst(actor, CASES)
        assert names and not any(n.startswith("llm-prompts-") for n in names), names
        assert not any(e.detail.get("early_prompts") for e in await idle_events(actor, t1))
        for a, b in zip(early, loop):
            assert (a.text, a.finish_reason, a.completion_tokens, a.prompt_tokens) == \
                (b.text, b.finish_reason, b.completion_tokens, b.prompt_tokens)
        assert early[0].text.startswith("The capital of France is")
    finally:
        await actor.ask(UpdateModel(spec=actor.spec, params=params), timeout=60)
        del actor.encode_prompt


async def test_a_bad_prompt_encoded_early_is_answered_and_the_rest_are_served(llm):
    actor, _ = llm
    cases = [CASES[0], ("word " * 2100, 4, []), CASES[3]]
    msgs, results = await _burst(actor, cases)
    bad = results[1]
    assert isinstance(bad, InvalidRequest) and bad.code == "context_length_exceeded", bad
    assert results[0].text.startswith("The capital of France is")
    assert results[2].finish_reason == "length" and results[2].completion_tokens == 6
    assert actor._unanswered == 0


def test_prompt_threads_in_liveconfigs_is_a_count_up_to_16_or_auto():
    from agile_rag.runtime.liveconfig import LiveConfigError, validate

    for ok in (0, 4, 16, "auto"):
        assert validate({"llm_params": {"prompt_threads": ok}}).llm_params[
            "prompt_threads"] == ok
    for bad in (-1, 17, "many", 2.5, True):
        with pytest.raises(LiveConfigError) as err:
            validate({"llm_params": {"prompt_threads": bad}})
        assert any("prompt_threads" in p and '"auto"' in p for p in err.value.problems), bad


async def test_a_new_engine_takes_the_waiting_chats_with_their_prompts_encoded_early(llm):
    """A live edit that makes a new engine (kv_block_tokens) while chats wait behind a full
    batch: the new engine adopts them, prompts encoded on the prompt threads or not yet, and
    every chat gets the words it gets alone."""
    actor, params = llm
    prompts = [f"Tell me fact number {i} about the sea." for i in range(6)]
    alone = [await actor.ask(chat(p, 8), timeout=300) for p in prompts]
    one = {**params, "max_batch_size": 1}
    await actor.ask(UpdateModel(spec=actor.spec, params=one), timeout=60)
    old = actor.engine
    try:
        msgs = [chat(p, 8, stream=i == 0) for i, p in enumerate(prompts)]
        tasks = [asyncio.ensure_future(actor.ask(m, timeout=300)) for m in msgs]
        await asyncio.wait_for(msgs[0].stream.get(), 120)      # one row runs, five wait
        await actor.ask(UpdateModel(spec=actor.spec, params={**one, "kv_block_tokens": 16}),
                        timeout=300)
        assert actor.engine is not old
        results = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        assert [(r.text, r.finish_reason) for r in results] == \
            [(r.text, r.finish_reason) for r in alone]
        assert actor.queue_length() == 0
    finally:
        await actor.ask(UpdateModel(spec=actor.spec, params=params), timeout=300)
    assert actor.engine.settings.kv_block == 0


def _hold_prompt(actor, held) -> threading.Event:
    """``held``'s prompt, encoded on a prompt thread, is held there until the returned gate is
    set (``actor.encode_prompt`` patched: the caller deletes it when done)."""
    gate = threading.Event()
    encode = type(actor).encode_prompt

    def gated_encode(msg):
        if msg is held and threading.current_thread().name.startswith("llm-prompts-"):
            assert gate.wait(60)
        return encode(actor, msg)
    actor.encode_prompt = gated_encode
    return gate


async def _gated_burst(actor, cases, gated: int, release_after: float | None):
    """``cases`` asked at once, the prompt of ``cases[gated]`` held on its prompt thread until
    the test sets the gate (or ``release_after`` seconds, by a timer). Returns the gate, the
    tasks and when the burst was sent."""
    msgs = [chat(p, n, stop) for p, n, stop in cases]
    gate = _hold_prompt(actor, msgs[gated])
    if release_after is not None:
        threading.Timer(release_after, gate.set).start()
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(actor.ask(m, timeout=300)) for m in msgs]
    return gate, tasks, t0


@pytest.mark.parametrize("burst", [True, False])
async def test_a_bursts_pass_waits_briefly_for_a_prompt_still_being_encoded(
        llm, monkeypatch, burst):
    """(issue 15) A burst's first pass with the second chat's prompt still on its prompt
    thread: with ``burst_prefill`` (the default) the loop waits for it, at most
    ``BURST_ENCODE_WAIT_S``, and reads both in one pass (passes of a few rows launched while
    the rest were encoded cost a GPU their ~700 kernel launches each); with it off the first
    pass goes without it, as before. The same words either way."""
    from agile_rag.actors import llm_batching

    actor, params = llm
    cases = CASES[:2]
    alone = [await actor.ask(chat(p, n, stop), timeout=300) for p, n, stop in cases]
    monkeypatch.setattr(llm_batching, "BURST_ENCODE_WAIT_S", 30.0)   # (held 0.3 s below)
    if not burst:
        await actor.ask(UpdateModel(spec=actor.spec, params={**params, "burst_prefill": False}),
                        timeout=60)
    try:
        await idle_events(actor, 0)
        since = time.monotonic()
        gate, tasks, _ = await _gated_burst(actor, cases, 1, 0.3)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        assert [(r.text, r.finish_reason) for r in results] == \
            [(a.text, a.finish_reason) for a in alone]
        idle = [e.detail for e in await idle_events(actor, since)]
        assert sum(d.get("prefills", 0) for d in idle) == (1 if burst else 2), idle
        if burst:
            assert [p[0] for d in idle for p in d.get("admit_passes", [])] == [2], idle
    finally:
        del actor.encode_prompt
        await actor.ask(UpdateModel(spec=actor.spec, params=params), timeout=60)
    assert actor.engine.settings.burst_passes


async def test_the_loop_goes_on_without_a_prompt_still_being_encoded(llm):
    """A chat whose prompt is still on a prompt thread does not hold back the chats before it:
    the first chat is read, decoded and answered while the second's prompt is held (issue 15:
    a served burst's first pass waited for the prompt threads with the GPU idle). With
    ``wait_for_prompts`` the loop waits for it, as before. Every chat says what it says
    alone."""
    actor, params = llm
    cases = CASES[:3]
    alone = [await actor.ask(chat(p, n, stop), timeout=300) for p, n, stop in cases]
    try:
        await idle_events(actor, 0)
        since = time.monotonic()
        gate, tasks, _ = await _gated_burst(actor, cases, 1, None)
        try:
            first = await asyncio.wait_for(tasks[0], 60)      # answered, the gate still shut
        finally:
            gate.set()
        rest = await asyncio.wait_for(asyncio.gather(*tasks[1:]), 300)
        assert [(r.text, r.finish_reason) for r in [first, *rest]] == \
            [(a.text, a.finish_reason) for a in alone]
        idle = [e.detail for e in await idle_events(actor, since)]
        assert sum(d.get("prefills", 0) for d in idle) >= 2, idle

        await actor.ask(UpdateModel(spec=actor.spec, params={**params, "wait_for_prompts": True}),
                        timeout=60)
        assert actor.engine.settings.wait_prompts
        gate, tasks, t0 = await _gated_burst(actor, cases, 1, 1.0)
        answered: list[float] = []
        tasks[0].add_done_callback(lambda _: answered.append(time.monotonic()))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        assert answered[0] - t0 >= 1.0          # the first chat waited for the second's prompt
        assert [(r.text, r.finish_reason) for r in results] == \
            [(a.text, a.finish_reason) for a in alone]
    finally:
        del actor.encode_prompt
        await actor.ask(UpdateModel(spec=actor.spec, params=params), timeout=60)
    assert not actor.engine.settings.wait_prompts


async def test_rows_decoding_go_on_while_a_new_chats_prompt_is_still_being_encoded(llm):
    """A chat that arrives while rows decode, its prompt still on a prompt thread: the rows
    decode to their end meanwhile (before, the loop waited for that prompt, the rows stalled),
    then the new chat is read and says what it says alone."""
    actor, _ = llm
    long_case, new_case = ("Count from 1 to 20.", 40), CASES[0][:2]
    alone_long = await actor.ask(chat(*long_case), timeout=300)
    alone_new = await actor.ask(chat(*new_case), timeout=300)
    long_msg, new_msg = chat(*long_case, stream=True), chat(*new_case)
    gate = _hold_prompt(actor, new_msg)
    try:
        long_task = asyncio.ensure_future(actor.ask(long_msg, timeout=300))
        while True:                                   # the long chat is decoding
            piece = await asyncio.wait_for(long_msg.stream.get(), 120)
            if isinstance(piece, str) and piece:
                break
        new_task = asyncio.ensure_future(actor.ask(new_msg, timeout=300))
        try:
            got_long = await asyncio.wait_for(long_task, 60)   # the new prompt still held
        finally:
            gate.set()
        got_new = await asyncio.wait_for(new_task, 300)
    finally:
        del actor.encode_prompt
    assert (got_long.text, got_long.finish_reason) == (alone_long.text, alone_long.finish_reason)
    assert (got_new.text, got_new.finish_reason) == (alone_new.text, alone_new.finish_reason)
    assert got_long.completion_tokens > 10


@pytest.mark.parametrize("key", ["wait_for_prompts", "burst_prefill", "decode_rope_kv"])
def test_the_loops_switches_in_liveconfigs_are_true_or_false(key):
    from agile_rag.runtime.liveconfig import LiveConfigError, validate

    for ok in (True, False):
        assert validate({"llm_params": {key: ok}}).llm_params[key] is ok
    with pytest.raises(LiveConfigError) as err:
        validate({"llm_params": {key: "yes"}})
    assert any(key in p for p in err.value.problems)
