"""Prefill graphs on a GPU (``llm_params.prefill_graphs``, actors/prefill_graphs.py, issue 15):
a pinned LLM captures them while idle at load, before it says it is ready; lone chats and a
small burst are read through them with the words eager passes say; an evicted LLM's graphs come
back with its parked cache."""
from __future__ import annotations

import asyncio

from test_chat_graphs_gpu import PROMPTS, chat, spawn
from test_model_actors_gpu import WORDS, build_tiny_llm

from agile_rag.actors.messages import Revoke


async def lone_then_burst(llm) -> list[str]:
    """Each prompt alone (a pass of one row), then three at once."""
    texts = [(await llm.ask(chat(p), timeout=120)).text for p in PROMPTS]
    outs = await asyncio.gather(*(llm.ask(chat(p), timeout=120) for p in PROMPTS[:3]))
    while llm._loop is not None:             # until the loop (and any warm-up) ended
        await asyncio.sleep(0.01)
    return texts + [o.text for o in outs]


def test_lone_chats_replay_prefill_graphs_warmed_at_load_and_say_the_same(tmp_path):
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=256, max_positions=1024,
                            words_only=True)

    async def go(params: dict):
        system, llm = await spawn(folder, "cuda", params, dtype="float16")
        try:
            runner = llm.engine.runner
            warmed, graphed0 = runner.warm_prefill_captures, runner.graphed_prefills
            words = await lone_then_burst(llm)
            graphs = runner.prefill_graphs
            return words, (warmed, runner.graphed_prefills - graphed0,
                           runner.lean_prefills, graphs.off if graphs else "none",
                           runner.warm_prefill_captures - warmed)
        finally:
            await system.stop_all()

    want, (w0, graphed0, _, _, _) = asyncio.run(go({"prefill_graphs": False}))
    got, (warmed, graphed, lean, off, later) = asyncio.run(go({}))     # on by default
    print("prefill graphs warmed at load", warmed, "replayed", graphed, "lean passes", lean,
          "captured later", later)
    assert w0 == 0 and graphed0 == 0
    assert warmed > 0 and off == "", (warmed, off)
    assert graphed >= len(PROMPTS), graphed   # every lone prompt at least
    assert got == want


def test_prefill_graphs_come_back_with_the_parked_cache_after_an_evict_and_admit(tmp_path):
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)
    prompts = [" ".join(WORDS[i:i + 5]) for i in (0, 4, 8)]

    async def ask_all(llm):
        texts = [(await llm.ask(chat(p), timeout=120)).text for p in prompts]
        while llm._loop is not None:
            await asyncio.sleep(0.01)
        return texts

    async def go():
        system, llm = await spawn(folder, "flex")
        runner = llm.engine.runner
        first = await ask_all(llm)
        graphs, sets, warmed = runner.prefill_graphs, runner.graph_sets, \
            runner.warm_prefill_captures
        await llm.ask(Revoke(model="tiny"), timeout=60)
        assert not llm.lease.on_gpu and runner.prefill_graphs is None
        graphed = runner.graphed_prefills
        again = await ask_all(llm)
        restored = runner.graph_sets == sets
        after = (runner.prefill_graphs is graphs, runner.warm_prefill_captures - warmed,
                 runner.graphed_prefills - graphed)
        await system.stop_all()
        return first, again, restored, graphs, after

    first, again, restored, graphs, (same, captured, graphed) = asyncio.run(go())
    print("decode graphs restored:", restored, "prefill graphs kept:", same,
          "captured again:", captured, "replayed after the admit:", graphed)
    assert graphs is not None and not graphs.off
    if restored:                                 # the weights came back at their addresses
        assert same and captured == 0 and graphed >= len(prompts), (same, captured, graphed)
    assert again == first
