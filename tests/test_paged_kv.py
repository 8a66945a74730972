"""The KV cache by the block (issue 15, llm_params.kv_block_tokens): with the real SmolLM2 on
the CPU, a paged cache gives the same greedy words as the rectangle, admits more chats of mixed
lengths under the same batch_kv_tokens, gives every block back when the chats leave, and keeps
cancel and chunked prefill working."""
from __future__ import annotations

import asyncio

import pytest
from test_chat_batching import CASES, LONG_PROMPT, chat, start_llm

# two long prompts (~360 tokens) among short ones: under 2048 KV tokens the rectangle holds
# 4 rows of 512 while a long one is active; blocks hold them all
MIXED = ([(LONG_PROMPT, 60)] + [("Say hello.", 40)] * 7) * 2


async def run_cases(params: dict, cases, *, budget: int | None = None):
    actor, _, system = await start_llm(params)
    try:
        outs = await asyncio.gather(*(actor.ask(chat(p, n, stop), timeout=300)
                                      for p, n, stop in cases))
        stats = actor.engine.run_stats
        cache = actor.engine.cache
        return [(o.text, o.finish_reason) for o in outs], stats, cache
    finally:
        await system.stop_all()


@pytest.fixture(scope="module")
def rectangle():
    return asyncio.run(run_cases({}, CASES))


async def test_paged_and_rectangle_caches_say_the_same_words(rectangle):
    want = rectangle[0]
    got, stats, cache = await run_cases({"kv_block_tokens": 16}, CASES)
    assert getattr(cache, "paged", False) and cache.block == 16
    assert got == want
    assert stats["max_batch"] == len(CASES)
    assert cache.used_blocks() == 0 and not any(cache.owned)      # every block back


async def test_mixed_lengths_under_one_budget_more_decode_together_with_blocks():
    cases = [(p, n, []) for p, n in MIXED]
    params = {"batch_kv_tokens": 1024, "prefill_chunk_tokens": 0}
    rect, rstats, _ = await run_cases(params, cases)
    paged, pstats, cache = await run_cases({**params, "kv_block_tokens": 16}, cases)
    assert paged == rect                                          # same words
    print("rows decoding together: rectangle", rstats["max_batch"], "paged",
          pstats["max_batch"])
    assert pstats["max_batch"] >= 2 * rstats["max_batch"], (rstats, pstats)
    assert cache.used_blocks() == 0


async def test_cancel_and_chunked_prefill_with_blocks():
    actor, _, system = await start_llm({"kv_block_tokens": 16, "prefill_chunk_tokens": 32})
    try:
        long_alone = await actor.ask(chat(LONG_PROMPT, 8), timeout=300)
        a = chat("Write a long story about a dragon.", 200, stream=True)
        task_a = asyncio.ensure_future(actor.ask(a, timeout=300))
        await asyncio.wait_for(a.stream.get(), 120)
        task_l = asyncio.ensure_future(actor.ask(chat(LONG_PROMPT, 8), timeout=300))
        short = await actor.ask(chat(CASES[0][0], CASES[0][1]), timeout=300)
        a.cancel.set()
        res_a = await asyncio.wait_for(task_a, 120)
        res_l = await asyncio.wait_for(task_l, 300)
        assert res_a.finish_reason == "cancelled"
        assert res_l.text == long_alone.text
        alone = await actor.ask(chat(CASES[0][0], CASES[0][1]), timeout=300)
        assert short.text == alone.text
        assert actor.engine.cache.used_blocks() == 0
    finally:
        await system.stop_all()


@pytest.mark.parametrize("paged", [False, True], ids=["rectangle", "blocks"])
def test_a_dropped_kv_cache_is_freed_at_once_without_a_collection(paged):
    """The cache's layers hold a proxy of it, not a reference: no cycle, so its tensors go
    when it is dropped. A cycle waited for a full collection, which a CPU-only LLM ran after
    every batch: ~0.3 s with the GIL held, the next chat's tokens stalled behind it."""
    import gc
    import weakref

    import torch

    from agile_rag.actors.kv_paged import make_paged_cache
    from agile_rag.actors.kv_slots import make_slot_cache

    gc.disable()
    try:
        if paged:
            cache = make_paged_cache(2, 4, 2, 8, 16, 8, torch.float32, torch.device("cpu"))
        else:
            cache = make_slot_cache(2, 4, 2, 64, 8, torch.float32, torch.device("cpu"))
        assert cache.layers[1].get_max_length() == cache.length   # the layers read the cache
        dead = weakref.ref(cache)
        del cache
        assert dead() is None
    finally:
        gc.enable()


async def test_an_idle_cpu_llm_frees_its_kv_cache_without_a_collection():
    """A CPU-only LLM drops its idle batch's cache (actors.llm_loading.free_idle_cache) and
    runs no full collection for it; with the collector off, nothing of it is left alive."""
    import gc

    def caches() -> set[int]:
        return {id(o) for o in gc.get_objects()
                if type(o).__name__ in ("_SlotCache", "_PagedCache")}

    actor, _, system = await start_llm({}, grant_timeout=None)
    gc.collect()
    gc.disable()
    before = caches()                       # other tests' (a fixture may hold one)
    full: list[dict] = []

    def note(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(info)
    gc.callbacks.append(note)
    try:
        await actor.ask(chat("Say hello.", 8), timeout=300)
        for _ in range(500):
            if actor._loop is None and actor.engine.cache is None:
                break
            await asyncio.sleep(0.01)
        assert actor.engine.cache is None
        assert caches() - before == set() and full == []
    finally:
        gc.callbacks.remove(note)
        gc.enable()
        await system.stop_all()
