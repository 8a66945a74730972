"""CUDA graphs of the chat decode step captured off the request path (issue 15), for real: a
``device: cuda`` LLM warms its graphs at load, before it says it is ready, so the first burst
captures nothing; a flex LLM evicted and admitted again serves the chats first and captures
the common buckets again when idle; graph and eager decoding say the same words."""
from __future__ import annotations

import asyncio

from test_model_actors_gpu import WORDS, build_tiny_llm

from agile_rag.actors.llm_actor import LLMActor
from agile_rag.actors.messages import Chat, Describe, Revoke
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.residency import WeightResidency
from agile_rag.runtime.system import ActorSystem

PROMPTS = [" ".join(WORDS[i:i + 4]) for i in range(8)]


def chat(prompt: str) -> Chat:
    return Chat(messages=[{"role": "user", "content": prompt}], max_tokens=12)


async def spawn(folder: str, device: str, params: dict | None = None,
                dtype: str | None = None, max_tokens: int = 512):
    system = ActorSystem()
    system.spawn(VRAMArbiter(2 << 30))
    llm = LLMActor(ModelSpec("llm", "tiny", folder, folder, device=device,
                             max_tokens=max_tokens, dtype=dtype), params)
    llm.residency_factory = WeightResidency
    system.spawn(llm)
    state = await llm.ask(Describe(), timeout=300)
    assert state.state == "ready", state
    return system, llm


async def half_burst(folder: str, params: dict, look):
    """A pinned half-precision LLM (cuDNN's attention takes no float32) with ``params`` answers
    a burst: its words, and what ``look(runner)`` saw after it."""
    system, llm = await spawn(folder, "cuda", params, dtype="float16")
    try:
        words = await burst(llm)
        return words, look(llm.engine.runner)
    finally:
        await system.stop_all()


def graph_kernels(runner) -> dict[str, int]:
    """The kernels (name: launches) the runner's largest captured decode graph replays (the
    loop is idle: a replay here writes only into free slots)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graph = runner.graphs.graphs[max(runner.graphs.graphs)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return {e.key: e.count for e in prof.key_averages()}


async def burst(llm) -> list[str]:
    outs = await asyncio.gather(*(llm.ask(chat(p), timeout=120) for p in PROMPTS))
    while llm._loop is not None:             # until the loop (and any warm-up) ended
        await asyncio.sleep(0.01)
    return [o.text for o in outs]


def test_a_pinned_llm_warms_its_graphs_at_load_and_the_first_burst_captures_none(tmp_path):
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)

    async def go():
        system, eager = await spawn(folder, "cuda", {"cuda_graphs": False})
        want = await burst(eager)
        eager_warmed = eager.engine.runner.prefill_warmed   # the engine goes at stop
        await system.stop_all()
        system, llm = await spawn(folder, "cuda")
        runner = llm.engine.runner
        assert runner.graphs is not None                   # warmed before "ready"
        assert sorted(runner.graphs.graphs) == sorted(runner.warm_buckets())
        assert runner.last_warm["graphs"] == len(runner.warm_buckets()) >= 4
        assert runner.prefill_warmed and not eager_warmed
        # and the throwaway chats down the first burst's path, which left no prefix
        assert llm.warm_chats_s is not None and not runner.prefixes.entries
        got = await burst(llm)
        stats = llm.engine.run_stats
        await system.stop_all()
        return want, got, stats, runner.last_warm

    want, got, stats, warm = asyncio.run(go())
    print("warm-up at load:", warm)
    assert got == want                     # graphs replay the words eager decoding says
    assert stats["captures"] == 0, stats   # nothing captured on the request path
    assert stats["steps"] > 0
    # the loop counts the allocator's new segments (actors/loop_timing.py), by admit too
    assert stats["device_allocs"] >= stats.get("admit_device_allocs", 0) >= 0, stats
    assert all(len(s) == 5 for s in stats.get("admit_alloc_shapes", [])), stats


def test_a_short_chat_after_a_long_one_that_grew_the_cache_captures_nothing(tmp_path):
    """(issue 15, s18) A prompt longer than the warmed cache makes the KV cache anew mid-loop
    (the old graphs go with the old addresses) and its step captures its own graph; when the
    loop is idle again it warms the new set, so the short chat that follows replays graphs
    and captures nothing on its request (before, it captured one: H200, 0.09-0.15 s to its
    first token, 0.011-0.013 s now)."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)
    long_prompt = " ".join(WORDS * 45)                        # ~720 tokens: past WARM_VIEW

    async def go():
        system, llm = await spawn(folder, "cuda", max_tokens=1024)
        runner = llm.engine.runner
        sets, length = runner.graph_sets, runner.cache.length
        await llm.ask(chat(long_prompt), timeout=120)
        while llm._loop is not None:
            await asyncio.sleep(0.01)
        grown = (runner.cache.length > length, runner.graph_sets > sets)
        warmed = llm.engine.run_stats.get("warm_captures", 0)
        short = await llm.ask(chat(PROMPTS[0]), timeout=120)
        while llm._loop is not None:
            await asyncio.sleep(0.01)
        stats = llm.engine.run_stats
        await system.stop_all()
        return grown, warmed, short, stats

    grown, warmed, short, stats = asyncio.run(go())
    assert grown == (True, True), grown
    assert warmed > 0                       # the new set warmed while idle, after the long chat
    assert short.completion_tokens > 0 and stats["steps"] > 0
    assert stats["captures"] == 0, stats


def test_after_an_evict_and_admit_the_chats_come_first_and_the_graphs_are_warmed_again(tmp_path):
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)

    async def go():
        system, llm = await spawn(folder, "flex")
        first = await burst(llm)
        runner = llm.engine.runner
        assert sorted(runner.graphs.graphs) == sorted(runner.warm_buckets())
        sets = runner.graph_sets
        await llm.ask(Revoke(model="tiny"), timeout=60)      # evicted: graphs dropped
        assert not llm.lease.on_gpu and runner.graphs is None
        again = await burst(llm)                              # admitted again
        stats = llm.engine.run_stats
        assert llm.lease.on_gpu
        # either a new set, warmed when idle, or (the weights came back at the same
        # addresses and the stable KV cache was taken back) the old set, still good
        restored = runner.graph_sets == sets
        assert restored or stats.get("warm_captures", 0) > 0, stats
        assert sorted(runner.graphs.graphs) == sorted(runner.warm_buckets())
        await system.stop_all()
        return first, again, restored

    first, again, restored = asyncio.run(go())
    print("graphs restored at the same addresses:", restored)
    assert again == first


def test_a_paged_cache_replays_warm_graphs_and_says_what_the_rectangle_says(tmp_path):
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)

    async def go():
        system, rect = await spawn(folder, "cuda")
        want = await burst(rect)
        await system.stop_all()
        system, llm = await spawn(folder, "cuda", {"kv_block_tokens": 16})
        cache = llm.engine.cache
        assert getattr(cache, "paged", False)
        got = await burst(llm)
        stats = llm.engine.run_stats
        used = llm.engine.cache.used_blocks()
        await system.stop_all()
        return want, got, stats, used

    want, got, stats, used = asyncio.run(go())
    assert got == want
    assert stats["captures"] == 0, stats        # warmed at load, over the block table
    assert used == 0                            # every block back


def test_gpu_lean_decode_captures_the_lean_step_with_fused_projections_and_says_the_same(
        tmp_path):
    """llm_params.gpu_lean_decode (on by default): q/k/v and gate/up laid end to end at load,
    the decode graphs capture the lean step (it agreed with transformers'), the layout survives
    an evict and an admit, and the words are those of transformers' graphs (the setting off)."""
    from agile_rag.actors.llm_lean_decode import LeanDecoder
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)

    async def go():
        system, plain = await spawn(folder, "flex", {"gpu_lean_decode": False})
        want = await burst(plain)
        assert plain.engine.runner.gpu_lean is False
        await system.stop_all()
        system, llm = await spawn(folder, "flex")
        got = await burst(llm)
        runner = llm.engine.runner
        lean = runner.gpu_lean
        assert isinstance(lean, LeanDecoder), lean
        assert all(c is not None for c in lean.linear)          # every layer fused
        await llm.ask(Revoke(model="tiny"), timeout=60)          # evicted, then admitted
        again = await burst(llm)
        lean2 = runner.gpu_lean
        assert llm.lease.on_gpu and isinstance(lean2, LeanDecoder)
        assert all(c is not None for c in lean2.linear)          # still laid end to end
        await system.stop_all()
        return want, got, again

    want, got, again = asyncio.run(go())
    assert got == want and again == want


def test_a_prompt_after_a_stored_prefix_allocates_one_slab_and_says_the_same(tmp_path):
    """(issue 15) A long prompt read in chunks after a stored prefix writes every layer's keys
    and values into one slab on the GPU (transformers' per-layer concatenation took new
    allocator segments: 18 for a 3B model's 1,000-token prefix), the store keeps views of it,
    its short chunks are read by the lean decoder, and the words are those of the same prompt
    computed whole by transformers' forward."""
    import torch

    import agile_rag.actors.batch_runner as runner_mod
    from agile_rag.actors.llm_lean_decode import LeanDecoder

    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)
    shared = " ".join(WORDS * 20)                            # ~320 tokens, chunks of 64
    questions = [shared + " " + " ".join(WORDS[i:i + 3]) for i in (0, 5)]
    params = {"prefill_chunk_tokens": 64}

    async def go():
        lean_tokens, runner_mod.LEAN_CHUNK_TOKENS = runner_mod.LEAN_CHUNK_TOKENS, 0
        try:
            system, plain = await spawn(folder, "cuda", params | {"prefix_cache_tokens": 0})
            want = [(await plain.ask(chat(q), timeout=120)).text for q in questions]
            assert plain.engine.runner.lean_chunks == 0
            await system.stop_all()
        finally:
            runner_mod.LEAN_CHUNK_TOKENS = lean_tokens
        system, llm = await spawn(folder, "cuda", params)
        runner = llm.engine.runner
        got = [(await llm.ask(chat(questions[0]), timeout=120)).text]
        assert runner.prefixes.entries                        # the first prompt's blocks kept
        before = torch.cuda.memory_stats().get("num_device_alloc", 0)
        hits = runner.prefixes.hits
        got.append((await llm.ask(chat(questions[1]), timeout=120)).text)
        new = torch.cuda.memory_stats().get("num_device_alloc", 0) - before
        hit = runner.prefixes.hits - hits
        newest = max(runner.prefixes.entries, key=lambda e: e.tokens).kv
        one_slab = newest[0][0].is_cuda and len({t.untyped_storage().data_ptr()
                                                 for pair in newest for t in pair}) == 1
        lean = isinstance(runner.gpu_lean, LeanDecoder)
        assert not lean or runner.lean_chunks > 0, runner.lean_chunks
        await system.stop_all()
        return want, got, new, hit, one_slab

    want, got, new, hit, one_slab = asyncio.run(go())
    print("new allocator segments for the prompt after the prefix:", new)
    assert hit == 1 and got == want
    assert one_slab                     # every layer's keys and values: views of one slab


def test_chunk_graphs_read_the_question_after_a_prefix_and_say_the_same(tmp_path):
    """llm_params.chunk_graphs: the short last chunk of a prompt that starts from a stored
    prefix replays a CUDA graph straight into its slot (actors/chunk_graphs.py), its first
    replay checked against the eager chunk; the words are those of transformers' chunks."""
    import agile_rag.actors.batch_runner as runner_mod

    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)
    shared = " ".join(WORDS * 20)
    questions = [shared + " " + " ".join(WORDS[i:i + 3]) for i in (0, 5, 9)]
    params = {"prefill_chunk_tokens": 512}

    async def go():
        lean_tokens, runner_mod.LEAN_CHUNK_TOKENS = runner_mod.LEAN_CHUNK_TOKENS, 0
        try:
            system, plain = await spawn(folder, "cuda", params)
            want = [(await plain.ask(chat(q), timeout=120)).text for q in questions]
            assert plain.engine.runner.graphed_chunks == 0
            await system.stop_all()
        finally:
            runner_mod.LEAN_CHUNK_TOKENS = lean_tokens
        system, llm = await spawn(folder, "cuda", params | {"chunk_graphs": True})
        runner = llm.engine.runner
        # (the warm-up chats at load may have read a prefix through a graph already)
        graphed0, hits0 = runner.graphed_chunks, runner.prefixes.hits
        got = [(await llm.ask(chat(q), timeout=120)).text for q in questions]
        graphs = runner.chunk_graphs
        stats = (runner.graphed_chunks - graphed0, runner.prefixes.hits - hits0,
                 graphs.off if graphs else "none", runner.warm_chunk_captures)
        await system.stop_all()
        return want, got, stats

    want, got, (graphed, hits, off, warmed) = asyncio.run(go())
    print("graphed chunks", graphed, "prefix hits", hits, off, "warmed", warmed)
    assert hits == 2 and graphed == 2 and off == "", (graphed, hits, off)
    assert warmed > 0                        # captured while idle, not only on requests
    assert got == want


def test_chunk_graphs_come_back_with_the_parked_cache_after_an_evict_and_admit(tmp_path):
    """(issue 15) An evicted LLM's stable cache is parked with its decode and chunk graphs; on
    the admit, when the weights came back at their addresses, both sets are taken back and no
    chunk graph is captured again (before: each burst after an admit waited for one, 0.19 s
    to the first token against 0.09 s on the H200). The words stay the same."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)
    shared = " ".join(WORDS * 20)
    questions = [shared + " " + " ".join(WORDS[i:i + 3]) for i in (0, 5, 9)]

    async def ask_all(llm):
        texts = [(await llm.ask(chat(q), timeout=120)).text for q in questions]
        while llm._loop is not None:             # until the loop (and its warm-up) ended
            await asyncio.sleep(0.01)
        return texts

    async def go():
        system, llm = await spawn(folder, "flex", {"chunk_graphs": True,
                                                   "prefill_chunk_tokens": 512})
        runner = llm.engine.runner
        first = await ask_all(llm)
        chunks, sets, warmed = runner.chunk_graphs, runner.graph_sets, \
            runner.warm_chunk_captures
        await llm.ask(Revoke(model="tiny"), timeout=60)
        assert not llm.lease.on_gpu and runner.chunk_graphs is None
        again = await ask_all(llm)
        restored = runner.graph_sets == sets
        after = (runner.chunk_graphs is chunks, runner.warm_chunk_captures - warmed)
        await system.stop_all()
        return first, again, restored, chunks, after

    first, again, restored, chunks, (same, captured) = asyncio.run(go())
    print("decode graphs restored:", restored, "chunk graphs kept:", same,
          "captured again:", captured)
    assert chunks is not None and not chunks.off
    if restored:                                 # the weights came back at their addresses
        assert same and captured == 0, (same, captured)
    assert again == first


def test_decoding_ahead_on_a_gpu_says_what_reading_each_step_says(tmp_path):
    """(issue 15) On a GPU the batch sends each greedy decode step ahead (BatchEngine.ahead:
    the next step starts from the tokens still on the device, read while it computes): the
    same words as reading each step's tokens first, and the steps did go ahead."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)

    async def go():
        system, llm = await spawn(folder, "cuda")
        llm.engine.ahead = False
        want = await burst(llm)
        assert llm.engine.run_stats.get("ahead_steps", 0) == 0
        llm.engine.ahead = None                          # the default: on, on a GPU
        got = await burst(llm)
        stats = llm.engine.run_stats
        alone = [(await llm.ask(chat(p), timeout=120)).text for p in PROMPTS[:2]]
        await system.stop_all()
        return want, got, stats, alone

    want, got, stats, alone = asyncio.run(go())
    assert got == want
    assert alone == want[:2]
    assert stats.get("ahead_steps", 0) > 5, stats


def test_decode_graphs_captured_with_cudnn_attention_say_the_same_words(tmp_path):
    """(issue 15) ``llm_params.decode_cudnn_attention`` (default on): the decode graphs are
    captured with cuDNN's attention allowed (the process keeps it off: CUDNN_ATTENTION), so
    their replays run cuDNN's kernels with no plan built on a request; the same words as
    without, and the process's switch is back off after the captures."""
    import torch

    from agile_rag.runtime.executor import set_cudnn_attention

    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=256, max_positions=1024,
                            words_only=True)

    def look(runner):
        return set(graph_kernels(runner)), runner.graph_cudnn

    set_cudnn_attention(False)                      # as the server starts
    want, (plain, off) = asyncio.run(half_burst(folder, {"decode_cudnn_attention": False}, look))
    got, (kernels, on) = asyncio.run(half_burst(folder, {}, look))     # the default: on
    assert (off, on) == (False, True)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    print("cudnn kernels:", sorted(k for k in kernels if "cudnn" in k.lower())[:4])
    assert not any("cudnn" in k.lower() and "sdpa" in k.lower() for k in plain)
    assert any("cudnn" in k.lower() and "sdpa" in k.lower() for k in kernels), sorted(kernels)
    assert got == want


def test_a_lean_prefill_on_a_gpu_says_what_transformers_prefill_says(tmp_path):
    """(issue 15) ``llm_params.lean_prefill`` (default on): a burst's prompts read in one
    right-padded pass of the lean decoder in the decode graphs (compared with transformers'
    once, at the warm-up's end): the same words as transformers' prefill (asked for with
    ``lean_prefill: false``), and the passes were lean."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=256, max_positions=1024,
                            words_only=True)

    def look(runner):
        return runner.lean_prefills, runner.lean_prefill_ok

    want, (plain, _) = asyncio.run(half_burst(folder, {"lean_prefill": False}, look))
    got, (lean, ok) = asyncio.run(half_burst(folder, {}, look))     # on by default
    assert plain == 0 and ok is True and lean >= 1, (plain, lean, ok)
    assert got == want


def test_gate_and_up_computed_each_way_say_the_same_words(tmp_path, monkeypatch):
    """``AGILE_RAG_GATE_UP`` (actors/llm_lean_decode.py, issue 15): the lean step's and the
    lean prefill's gate and up projections computed as one matmul split into strided views
    (``joint``), that matmul transposed (``across``), two matmuls (``apart``), or each pass as
    its rows suit (``auto``, the default): the same words every way, through the decode graphs
    and the lean prefill, and all of them lean."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=256, max_positions=1024,
                            words_only=True)

    def look(runner):
        lean = runner.gpu_lean              # laid end to end: gate and up as one matmul
        assert lean and all(c is not None for c in lean.linear)
        return runner.lean_prefills, runner.lean_prefill_ok, lean.gate_up

    monkeypatch.setenv("AGILE_RAG_GATE_UP", "joint")
    want, (_, _, joint) = asyncio.run(half_burst(folder, {}, look))
    assert joint == "joint"
    for form in ("across", "apart", "auto"):
        monkeypatch.setenv("AGILE_RAG_GATE_UP", form)
        got, (lean, ok, took) = asyncio.run(half_burst(folder, {}, look))
        assert took == form and ok is True and lean >= 1, (form, lean, ok)
        assert got == want, form


def test_prompts_encoded_on_prompt_threads_on_a_gpu_say_the_same_words(tmp_path):
    """(issue 15) A pinned LLM on a GPU whose prompts are encoded on its prompt threads as the
    chats arrive (llm_params.prompt_threads, actors/early_prompts.py; the default on a machine
    with 8 or more cores) says the same words as one whose loop encodes them, and the threads
    did encode them."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)

    async def go(threads: int):
        system, llm = await spawn(folder, "cuda", {"prompt_threads": threads})
        try:
            words = await burst(llm)
            await asyncio.sleep(0.2)              # the last loop's BatchIdle is traced
            return words, sum(e.detail.get("early_prompts", 0) for e in system.tracer.events
                              if e.msg_type == "BatchIdle")
        finally:
            await system.stop_all()

    loop_words, none = asyncio.run(go(0))
    thread_words, early = asyncio.run(go(4))
    assert thread_words == loop_words
    assert none == 0 and early > 0, (none, early)
