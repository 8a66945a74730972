"""A parked KV cache (runtime/stable_memory.py: a trim gives the pages back, the addresses and
the decode graphs stay) on the CPU side: the engine tells the planner the parked shape on a
release, and forgets the parked cache when it is closed for good (unload, replacement): its
graphs and the runner refer to each other, so a parked cache left behind kept an unloaded
model alive (seen on the H200 in tests/gpu/test_unload_gpu.py). CUDA is not here: the parked
cache is a stand-in with the shape a real one has."""
from __future__ import annotations

import gc
import weakref

from agile_rag.actors.llm_batching import BatchEngine

from support import tiny_llama


class Tok:
    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return ""


class ParkedCache:
    slots, length = 8, 512


class StableCache:
    """A stable cache's stand-in: its shape, keys on the model's device, park and unpark."""
    slots, length, stable = 2, 64, object()

    def __init__(self, model):
        p = next(model.parameters())
        self.keys = [p.new_zeros(1)]
        self.parks = self.unparks = 0

    def park(self):
        self.parks += 1

    def unpark(self):
        self.unparks += 1


class GraphSet:
    """A decode or chunk graph set's stand-in: valid for what it was made for."""

    def __init__(self, good=True):
        self.good = good

    def valid_for(self, _owner, _cache):
        return self.good


def test_release_keeps_the_parked_shape_and_close_forgets_the_cache():
    model = tiny_llama()
    eng = BatchEngine(model, Tok(), max_batch=8, kv_tokens=4096)
    cache = ParkedCache()
    eng.runner.parked = (cache, None, None)
    eng.release()
    assert eng.planner.parked == (8, 512)          # the next cache of that shape takes it back
    ref = weakref.ref(cache)
    del cache
    gc.disable()
    try:
        eng.close()
        assert eng.runner.parked is None and eng.planner.parked is None
        assert ref() is None                        # freed now, not at a full collection
    finally:
        gc.enable()


def test_a_stable_buffer_dropped_while_its_thread_captures_a_graph_closes_on_another_thread(
        monkeypatch):
    """Found on the H200: a dropped KV cache's finalizer ran on the LLM's thread while it
    captured a decode graph; its close waits for the thread's stream, which invalidated the
    capture (the LLM then decoded without graphs). While capturing, the close runs on a thread
    of its own; otherwise right here."""
    import threading

    import torch

    from agile_rag.runtime import stable_memory

    class Fake:
        closed_on: list = []

        def close(self):
            self.closed_on.append(threading.current_thread())
    fake = Fake()
    for capturing in (True, False):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda c=capturing: c)
        stable_memory.StableBuffer.close_soon(fake)     # type: ignore[arg-type]
    for _ in range(200):
        if len(Fake.closed_on) == 2:
            break
        threading.Event().wait(0.01)
    assert len(Fake.closed_on) == 2
    assert {Fake.closed_on[0].name, Fake.closed_on[1].name} == \
        {"stable-buffer-close", threading.current_thread().name}


def test_an_unparked_cache_takes_its_decode_chunk_and_prefill_graphs_back():
    """An evict + admit (or a trim) parks a stable cache with its graphs; the next cache of
    its shape takes it back at its addresses, the decode graphs and, while those are good,
    the chunk and prefill graphs (llm_params.chunk_graphs, prefill_graphs): before, the
    chunk graphs were dropped and captured again one per idle turn, and each burst after an
    admit waited for a capture
    (H200: 0.19 s to the first token against 0.09 s, benchmarks/results/gpu-h200-s16.md)."""
    model = tiny_llama()
    eng = BatchEngine(model, Tok(), max_batch=8, kv_tokens=4096)
    runner = eng.runner
    for decode_good, want_chunk in ((True, True), (False, False)):
        cache, graphs, chunks = StableCache(model), GraphSet(decode_good), GraphSet()
        prefills = GraphSet()
        runner.cache, runner.graphs, runner.chunk_graphs = cache, graphs, chunks
        runner.prefill_graphs = prefills
        runner.release()
        assert runner.parked == (cache, graphs, chunks, prefills) and cache.parks == 1
        assert runner.cache is None and runner.chunk_graphs is None
        assert runner.prefill_graphs is None
        runner._ensure_cache(cache.slots, cache.length, keep=0)
        assert runner.cache is cache and cache.unparks == 1
        assert (runner.graphs is graphs) is decode_good
        # with a new decode set comes a new lean decoder: the old chunk graphs cannot stay
        assert (runner.chunk_graphs is chunks) is want_chunk
        assert (runner.prefill_graphs is prefills) is want_chunk
    runner.cache = runner.graphs = runner.chunk_graphs = runner.prefill_graphs = None
    eng.close()
