"""Prompt prefixes computed once (issues 15, 17): a prompt's leading 16-token blocks are kept after
its prefill (chunked or batched), and the next prompt that starts with the same tokens reads only
the rest; the words are those of a prompt computed whole. The store finds the longest shared prefix
by hash chain, keeps what a prefill uses, drops the least recently used idle entries past its
budget, and lets go of every tensor when cleared."""
from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest
import torch
from test_chat_batching import chat, start_llm

from agile_rag.actors.batch_plan import LEN_BUCKET
from agile_rag.actors.kv_chunk import slab_of
from agile_rag.actors.kv_prefix import BLOCK, PrefixStore, chain_hashes
from agile_rag.actors.messages import UpdateModel


class KV:
    """Stands for a prefix's tensors (weakref-able)."""

    def __init__(self, n):
        self.n = n


def test_the_longest_shared_prefix_is_found_in_whole_blocks():
    a = list(range(1000, 1000 + 5 * BLOCK + 10))
    assert len(chain_hashes(a)) == 5
    assert chain_hashes(a)[:3] == chain_hashes(a[:3 * BLOCK])
    store = PrefixStore(budget_tokens=16 * BLOCK)
    made = []
    entry = store.insert(a, lambda n: made.append(n) or KV(n))
    assert made == [5 * BLOCK + 9] and entry.tokens == 5 * BLOCK + 9     # all but one token
    assert store.insert(a[:4 * BLOCK + 3], KV) is None          # already held, as a part
    b = a[:3 * BLOCK] + [7] * (2 * BLOCK)                         # shares three blocks
    got, n = store.lookup(b)
    assert got is entry and n == 3 * BLOCK
    assert store.lookup(a)[1] == 5 * BLOCK + 9                    # blocks, then the tail
    assert store.lookup(a[:5 * BLOCK + 4])[1] == 5 * BLOCK + 3    # as much tail as shared
    assert store.lookup(a[:5 * BLOCK])[1] == 4 * BLOCK            # one token is always left
    assert store.lookup([9] + a)[1] == 0                          # a prefix, not a substring
    assert PrefixStore(budget_tokens=0).insert(a, KV) is None     # off


def test_idle_entries_go_least_recently_used_first_and_used_ones_stay():
    store = PrefixStore(budget_tokens=4 * BLOCK)
    p = [[i * 100_000 + j for j in range(2 * BLOCK + 1)] for i in range(3)]
    e0 = store.insert(p[0], KV)
    e1 = store.insert(p[1], KV)
    store.acquire(e0)                         # a prefill reads from e0
    store.release(e0)
    store.acquire(e0)                         # ... and another one still does
    e2 = store.insert(p[2], KV)               # over budget: e1 (idle, oldest) goes
    assert e1 not in store.entries and e1.kv is None
    assert store.lookup(p[1])[0] is None
    assert {id(e) for e in store.entries} == {id(e0), id(e2)}
    store.clear()                             # e0 is in use: it stays until released
    assert store.entries == [e0]
    ref = weakref.ref(e0.kv)
    store.release(e0)
    store.clear()
    gc.collect()
    assert store.entries == [] and store.index == {} and ref() is None


def test_a_shorter_part_stays_findable_when_the_longer_entry_goes():
    store = PrefixStore(budget_tokens=7 * BLOCK)
    base = list(range(5000, 5000 + 2 * BLOCK))
    short = store.insert(base + [1], KV)                          # 2 blocks
    long = store.insert(base + list(range(9000, 9000 + 3 * BLOCK)), KV)   # 5 blocks
    assert store.lookup(base + [2])[0] is long                    # the newest holds it too
    store.acquire(short)
    store.insert(list(range(20000, 20000 + 3 * BLOCK + 1)), KV)   # over budget: long goes
    assert long not in store.entries
    assert store.lookup(base + [2]) == (short, 2 * BLOCK)


SHARED = ("You answer questions about the notes below. Notes: rivers flow to the sea, lakes "
          "hold fresh water, the tide rises twice a day, and salt marshes shelter birds. " * 6)


async def test_a_second_prompt_with_the_same_start_reads_only_the_rest_and_says_the_same(
        monkeypatch):
    """... and the rest (a short chunk) is read by the lean decoder, with the words that
    transformers' forward gives (the prompts computed whole, every chunk through it)."""
    import agile_rag.actors.batch_runner as runner_mod

    actor, _, system = await start_llm({"prefill_chunk_tokens": 48, "prefix_cache_tokens": 0})
    try:
        questions = ["What do rivers do?", "Which birds live in marshes?"]
        monkeypatch.setattr(runner_mod, "LEAN_CHUNK_TOKENS", 0)      # transformers' chunks
        whole = [await actor.ask(chat(SHARED + q, 10), timeout=300) for q in questions]
        assert actor.engine.runner.lean_chunks == 0
        monkeypatch.undo()
        assert not actor.engine.runner.prefixes.entries                  # off: nothing kept
        await actor.ask(UpdateModel(spec=actor.spec, params={"prefill_chunk_tokens": 48}),
                        timeout=60)                                       # on (4096 tokens)
        first = await actor.ask(chat(SHARED + questions[0], 10), timeout=300)
        store = actor.engine.runner.prefixes
        assert len(store.entries) == 1 and store.hits == 0
        stored = store.entries[0].kv           # (its entry may be replaced by a longer tail)
        # the chunked prefill's own tensors (the whole prompt's), not a copy of the part kept
        assert all(t.untyped_storage().nbytes() > t.numel() * t.element_size()
                   for pair in stored for t in pair)
        kept = [(k.clone(), v.clone()) for k, v in stored]
        runner = actor.engine.runner
        start, shared = runner.start_from_prefix, []

        def spy(req):                    # the chunked prefill copies the entry into its slab
            n = start(req)
            kv, slab = runner.partial_kv, slab_of(runner.partial_kv)
            shared.append(slab is not None and slab.shape[4] >= len(req.context()) and all(
                layer.keys.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
                for layer in kv.layers) and torch.equal(kv.layers[0].keys, stored[0][0][:, :, :n]))
            return n

        runner.start_from_prefix = spy
        t0 = time.monotonic()
        lean_before = runner.lean_chunks
        second = await actor.ask(chat(SHARED + questions[1], 10), timeout=300)
        runner.start_from_prefix = start
        assert runner.lean_chunks == lean_before + 1      # the rest after the prefix: lean
        assert shared == [True]          # one allocation for the whole prompt, every layer ...
        assert all(torch.equal(k, k0) and torch.equal(v, v0)   # ... and never written
                   for (k, v), (k0, v0) in zip(stored, kept))
        events = [e for e in system.tracer.events if e.msg_type == "Chat" and
                  e.started >= t0]
        hit = events[-1].detail.get("prefix_hit_tokens", 0)
        # the shared text, to the token (blocks, then the first prompt's tail where it agrees)
        assert hit >= 2 * 64 and store.hits == 1
        # the same words as the prompts computed whole
        assert (first.text, second.text) == (whole[0].text, whole[1].text)
        again = await actor.ask(chat(SHARED + questions[0], 10), timeout=300)
        assert again.text == whole[0].text and store.hits == 2
        # prefix_cache_tokens 0 drops what is kept
        await actor.ask(UpdateModel(spec=actor.spec, params={"prefill_chunk_tokens": 48,
                                                             "prefix_cache_tokens": 0}),
                        timeout=60)
        for _ in range(100):
            if not store.entries:
                break
            await actor.ask(chat("Hi.", 1), timeout=60)               # a loop applies it
        assert store.entries == [] and store.index == {}
    finally:
        await system.stop_all()


@pytest.mark.parametrize("arbiter", [True, False], ids=["flex", "cpu-only"])
async def test_a_short_prompt_asked_again_reads_only_its_last_block_and_says_the_same(arbiter):
    """(issue 17) A prompt shorter than a chunk, read in a batched prefill, leaves its leading
    blocks too; asked again alone, it starts from them and computes at most a block and a
    token (llama.cpp's server reuses a repeated prompt's keys the same way). A CPU-only LLM
    frees its idle KV cache after each batch and keeps the recent prefixes."""
    actor, _, system = await start_llm({"prefix_cache_tokens": 0},
                                       grant_timeout=10 if arbiter else None)
    try:
        q = "What is the capital of France?"
        want = await actor.ask(chat(q, 12), timeout=300)
        await actor.ask(UpdateModel(spec=actor.spec, params={}), timeout=60)    # on (4096)
        first = await actor.ask(chat(q, 12), timeout=300)
        store = actor.engine.runner.prefixes
        assert len(store.entries) == 1 and store.hits == 0
        # every layer's keys and values copied into one tensor (one allocation, not two a
        # layer), not views of the batch's cache
        kept = store.entries[0].kv
        storages = {t.untyped_storage().data_ptr() for pair in kept for t in pair}
        cache = actor.engine.runner.cache
        assert len(storages) == 1 and (cache is None or
                                       cache.keys[0].untyped_storage().data_ptr() not in storages)
        t0 = time.monotonic()
        second = await actor.ask(chat(q, 12), timeout=300)
        ev = [e for e in system.tracer.events if e.msg_type == "Chat" and e.started >= t0][-1]
        hit, prompt = ev.detail.get("prefix_hit_tokens", 0), ev.detail["prompt_tokens"]
        assert hit == prompt - 1, (hit, prompt)        # all of it but the token to compute
        assert store.hits == 1
        assert first.text == second.text == want.text, (want.text, first.text, second.text)
        if not arbiter:                     # the idle cache goes; the prefix stays
            for _ in range(100):
                if actor.engine.cache_bytes() == 0:
                    break
                await asyncio.sleep(0.05)
            assert actor.engine.cache_bytes() == 0 and len(store.entries) == 1
        assert "Paris" in want.text
    finally:
        await system.stop_all()


def test_metrics_count_prefix_hits_from_the_chats_trace_events():
    from agile_rag.configs import Settings
    from agile_rag.http.app import build_app
    from agile_rag.http.metrics import METRICS
    from agile_rag.runtime.tracing import TraceEvent
    from agile_rag.server import Server

    m = build_app(Server(Settings()))[METRICS]
    for n in (128, 0, 192):
        detail = {"prompt_tokens": 300, **({"prefix_hit_tokens": n} if n else {})}
        m.server.system.tracer.record(TraceEvent("llm", "Chat", "r", "http", 1.0, 1.0, 2.0,
                                                 "ok", detail))
    # the batch loop's own event sums the same hits: not counted again
    m.server.system.tracer.record(TraceEvent("llm", "BatchIdle", "r", "llm", 1.0, 1.0, 2.0, "ok",
                                             {"prefix_hits": 2, "prefix_hit_tokens": 320}))
    get = m.registry.get_sample_value
    assert get("agile_rag_llm_prefix_hits_total", {"model": "llm"}) == 2
    assert get("agile_rag_llm_prefix_hit_tokens_total", {"model": "llm"}) == 320


async def test_the_warm_up_chats_take_a_first_bursts_path_and_leave_nothing_behind():
    """(issue 15) The throwaway chats a CUDA load runs before "ready" (here run by the actor on
    the CPU, where a load skips them): a padded batch of two prompts, then one that starts from
    the prefix they left, then eight longer prompts at once; nobody is answered, no chat is
    traced or counted, the prefixes go, and the next chat says what it said before. Each fits
    the cache the graphs' warm-up captured for (2 x LEN_BUCKET long): a longer warm-up prompt
    grew the cache, so the first burst's graphs were captured on its requests (H200, session
    10: 6 captures and 91 new allocator segments in the first burst of 32, against none)."""
    actor, _, system = await start_llm({})      # behind an arbiter, as a CUDA load is
    real = actor.handle
    submitted = []
    submit = actor.engine.submit

    def noting(req):
        submitted.append(req)
        return submit(req)

    actor.engine.submit = noting

    async def handle(msg, env):                    # run by the actor, as at load: its
        if msg == "warm up":                       # mailbox waits meanwhile
            return await actor._warm_chats()
        return await real(msg, env)

    actor.handle = handle
    try:
        q = "What is the capital of France?"
        want = await actor.ask(chat(q, 12), timeout=300)
        while actor._loop is not None:       # as at load: no batch loop runs
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await actor.ask("warm up", timeout=600)
        for _ in range(500):                  # the loops' BatchIdle reach the actor's mailbox
            events = [e for e in system.tracer.events if e.started >= t0]
            loops = [e.detail for e in events if e.msg_type == "BatchIdle"]
            if len(loops) >= 3:
                break
            await asyncio.sleep(0.01)
        assert [e for e in events if e.msg_type == "Chat"] == []
        assert len(loops) == 3, loops
        assert loops[0]["prefills"] == 1 and loops[0]["max_batch"] == 2, loops[0]  # together
        assert loops[1].get("prefix_hits") == 1, loops[1]     # from the first round's prefix
        # a burst's eight rows, read together (no prefix stored: the store was emptied)
        assert loops[2]["max_batch"] == 8 and loops[2]["prefills"] <= 2, loops[2]
        assert not loops[2].get("prefix_hits"), loops[2]
        assert actor.engine.runner.prefixes.entries == [] and actor.queue_length() == 0
        assert actor.warm_chats_s is not None
        warm = [r for r in submitted if r.msg is not None and r.msg.max_tokens == 3]
        assert len(warm) == 11 and max(r.reserve() for r in warm) <= 2 * LEN_BUCKET
        again = await actor.ask(chat(q, 12), timeout=300)
        assert again.text == want.text
    finally:
        await system.stop_all()
