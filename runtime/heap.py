"""Giving freed memory back: garbage cycles, and the heap's free pages.

glibc keeps what Python and torch free in its arenas (the CPU tensors of a forward pass, a KV
cache, a load's temporaries) and reuses it, but RSS stays at the high-water mark until
``malloc_trim`` hands the free pages back. The server trims after a load, an unload, an idle
LLM batch, and whenever no model work has run for a moment
(:class:`runtime.executor.ModelExecutor`)."""
from __future__ import annotations

import ctypes
import gc
import sys
import time

_libc: ctypes.CDLL | None = None


def trim_heap() -> float:
    """Blocking: give the heap's free pages back to the OS (Linux/glibc; elsewhere nothing).
    Returns the seconds it took."""
    global _libc
    if not sys.platform.startswith("linux"):
        return 0.0
    t0 = time.perf_counter()
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return time.perf_counter() - t0


def collect(freeze: bool = False) -> None:
    """Blocking: a full garbage collection that sees frozen objects too; with ``freeze``,
    every object still alive is then frozen: taken out of the collector's sight.

    Why freeze: the models and the ~10^6 objects torch and transformers keep make a full
    collection walk ~0.3 s with the GIL held, every few thousand requests: it stalled the
    event loop and the threads that feed the GPU (issue 14: gen-2 collections were ~70 us per
    request of a one-sentence burst). Why only when the model pool is idle
    (:meth:`runtime.executor.ModelExecutor.freeze_when_idle`): a freeze takes in whatever is
    alive, and what a running job holds (a batch's KV cache, whose layers point back at it)
    would, once the job drops it, be a frozen cycle that no collection ever frees (issue 11:
    adding and removing an LLM under load grew the heap by ~400 MB a round, for good)."""
    gc.unfreeze()
    gc.collect()
    if freeze:
        gc.freeze()
