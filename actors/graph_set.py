"""What the chunk graphs (actors/chunk_graphs.py) and the prefill graphs
(actors/prefill_graphs.py) share: a set of CUDA graphs of the lean decoder's passes over one KV
cache, keyed on that decoder, the cache's identity and the weights' address (if one changed,
the runner makes the set anew), captured on the runner's own capture stream into one memory
pool, each after one eager run of its body off the capture (kernels chosen, memory allocated).
Only the batch runner's loop thread uses a set."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..runtime.cuda_graph import capture_graph

log = logging.getLogger("agile_rag.llm")


class GraphSet:
    """The graphs of one lean decoder, cache and weights; ``what`` names their passes in the
    log ("chunks", "prefills")."""

    what = "passes"

    def __init__(self, lean: Any, cache: Any, weights: torch.Tensor, stream: Any):
        self.lean = lean
        self.cache = cache
        self.cache_id = id(cache)
        self.weights = weights
        self.weights_ptr = weights.data_ptr()
        self.graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        #: where captures run: the runner's own capture stream (runtime/cuda_streams.py: a
        #: pool stream may be another thread's too)
        self.stream = stream
        self.off = ""                    # why graphs were turned off ("" while on)
        self.replays = 0
        self.capture_s = 0.0
        #: the keys the idle warm-up still has to capture
        self.to_warm: list = []

    def valid_for(self, lean: Any, cache: Any) -> bool:
        return lean is self.lean and id(cache) == self.cache_id and \
            self.weights.data_ptr() == self.weights_ptr

    def capture(self, key: Hashable, fn: Callable[[], Any]) -> torch.cuda.CUDAGraph | None:
        """``fn`` (a body writing into the static outputs) run once on the capture stream,
        then captured as graph ``key``; None when that failed (graphs are then off: the
        passes run eagerly)."""
        t0 = time.monotonic()
        dev = self.cache.keys[0].device
        side = self.stream
        try:
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):        # warm up off the capture
                fn()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph, _ = capture_graph(fn, pool=self.pool, stream=side)
        except Exception as exc:  # noqa: BLE001 - the passes run eagerly from now on
            self.off = f"{type(exc).__name__}: {exc}"[:300]
            self.to_warm = []
            log.warning("%s CUDA graph capture failed (%s): %s run eagerly",
                        self.what[:-1], self.off, self.what)
            return None
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = graph
        self.capture_s += time.monotonic() - t0
        return graph
