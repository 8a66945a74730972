"""Streams of our own (runtime/cuda_streams.py): torch's pool hands the same 32 streams out
round-robin, so a decode graph captured on a pool stream could take in another thread's copies
queued on the same stream (an admit's, a layer stream's) or fail on them. A stream from
``new_stream`` is no pool stream, never waits for the legacy default stream, and is where the
LLM's decode graphs warm up and are captured."""
from __future__ import annotations

import asyncio
import time

import torch
from test_chat_graphs_gpu import burst, spawn
from test_model_actors_gpu import build_tiny_llm

from agile_rag.runtime.cuda_streams import new_stream

# ~0.5 s of one GPU thread spinning (torch.cuda._sleep counts clock cycles; ~2 GHz)
HOLD_CYCLES = 1_000_000_000


def _pool_streams() -> set[int]:
    return {torch.cuda.Stream().cuda_stream for _ in range(70)}    # every pool stream, twice


def test_a_new_stream_is_no_pool_stream_and_does_not_wait_for_the_default_stream():
    own = [new_stream("cuda:0"), new_stream(0)]
    pool = _pool_streams()
    assert len({s.cuda_stream for s in own}) == 2
    assert not {s.cuda_stream for s in own} & pool
    x = torch.ones(4, device="cuda")
    with torch.cuda.stream(own[0]):             # the allocator's blocks for own[0]: a first
        warm = (x + 1).sum()                    # cudaMalloc may wait for the whole device
    del warm
    torch.cuda.synchronize()
    torch.cuda._sleep(HOLD_CYCLES)              # the legacy default stream, busy ~0.5 s
    t0 = time.perf_counter()
    with torch.cuda.stream(own[0]):
        y = (x + 1).sum()
    own[0].synchronize()                        # waits for own[0] only
    took = time.perf_counter() - t0
    torch.cuda.synchronize()
    held = time.perf_counter() - t0
    assert y.item() == 8.0
    assert took < 0.15 < held, (took, held)


def test_the_llm_captures_its_decode_graphs_on_a_stream_of_its_own(tmp_path):
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)
    pool = _pool_streams()

    async def go():
        system, llm = await spawn(folder, "cuda")
        runner = llm.engine.runner
        assert runner.graphs is not None and runner.graphs.graphs      # warmed at load
        side = runner.capture_stream
        got = await burst(llm)
        await system.stop_all()
        return side, got

    side, got = asyncio.run(go())
    assert side is not None and side.cuda_stream not in pool
    assert all(isinstance(t, str) for t in got) and any(got)


def test_llm_params_own_stream_runs_the_batch_loop_on_a_stream_of_its_own(tmp_path):
    """``own_stream`` (on by default): every prefill and decode step is queued on the runner's
    own stream (not the legacy default stream the encoders use, nor a pool stream), at normal
    priority, and the text is the default stream's."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)
    pool = _pool_streams()

    async def go(params):
        system, llm = await spawn(folder, "cuda", params)
        runner = llm.engine.runner
        step = runner.run
        seen: list[int] = []

        def spy(*a, **kw):                      # every prefill and decode step
            seen.append(torch.cuda.current_stream().cuda_stream)
            return step(*a, **kw)

        runner.run = spy
        got = await burst(llm)
        await system.stop_all()
        return runner.loop_stream, seen, got

    loop_stream, seen, got = asyncio.run(go(None))              # the default
    assert loop_stream is not None and loop_stream.cuda_stream not in pool
    assert loop_stream.priority == 0
    assert seen and set(seen) == {loop_stream.cuda_stream}
    none, seen_default, ref = asyncio.run(go({"own_stream": False}))
    assert none is None and set(seen_default) == {0}        # off: the legacy default stream
    assert got == ref and any(got)


def test_a_capture_keeping_the_caches_frees_nothing_and_replays_right(monkeypatch):
    """``AGILE_RAG_CAPTURE_KEEPS_CACHES=1`` (runtime/cuda_graph.py, issue 15): a capture leaves
    the allocator's cached blocks where they are (torch.cuda.graph gives them back to the
    driver: the next burst's prefill took them again, H200 s16) and the graph replays what the
    eager code computes; torch's own capture, for contrast, frees the cached block."""
    from agile_rag.runtime.cuda_graph import capture_graph

    side = new_stream("cuda:0")
    x = torch.arange(8, dtype=torch.float32, device="cuda")
    out = torch.empty_like(x)

    def freed_by_a_capture(keep: bool) -> int:
        monkeypatch.setenv("AGILE_RAG_CAPTURE_KEEPS_CACHES", "1" if keep else "0")
        del_me = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")   # a cached block
        del del_me
        before = torch.cuda.memory_stats()["num_device_free"]
        side.wait_stream(torch.cuda.current_stream())
        graph, _ = capture_graph(lambda: out.copy_(x * 2 + 1), stream=side)
        torch.cuda.current_stream().wait_stream(side)
        freed = torch.cuda.memory_stats()["num_device_free"] - before
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, x * 2 + 1)
        return freed

    assert freed_by_a_capture(keep=True) == 0
    assert freed_by_a_capture(keep=False) >= 1
