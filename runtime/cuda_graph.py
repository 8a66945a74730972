"""Capturing a CUDA graph the way every graph here is captured (the decode step's, an encoder's
forward, a short prompt chunk's)."""
from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

__all__ = ["capture_graph"]


def capture_graph(fn: Callable[[], Any], *, pool: Any = None,
                  stream: Any = None) -> tuple[Any, Any]:
    """``(graph, fn())``: ``fn`` captured into a new CUDA graph (in memory pool ``pool``, on
    ``stream``; torch's defaults for None), capture errors raised on this thread only. No
    garbage collection runs on this thread meanwhile: a finalizer it would run (a dropped
    buffer waiting for its stream) would invalidate the capture."""
    import torch

    graph = torch.cuda.CUDAGraph()
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream,
                              capture_error_mode="thread_local"):
            out = fn()
    finally:
        if collecting:
            gc.enable()
    return graph, out
