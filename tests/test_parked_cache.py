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


def test_release_keeps_the_parked_shape_and_close_forgets_the_cache():
    model = tiny_llama()
    eng = BatchEngine(model, Tok(), max_batch=8, kv_tokens=4096)
    cache = ParkedCache()
    eng.runner.parked = (cache, None)
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
