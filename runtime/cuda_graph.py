"""Capturing a CUDA graph the way every graph here is captured (the decode step's, an encoder's
forward, a short prompt chunk's).

``torch.cuda.graph`` starts every capture by waiting for the whole device
(``torch.cuda.synchronize``) and emptying torch's caches of device and pinned host memory
(``empty_cache``, ``_host_emptyCache``). A server captures while it serves. On the H200
(issue 15, ``benchmarks/results/gpu-h200-s16.md``) with chunk graphs being captured between
bursts after an admit, each burst's prefill took its ~460 MB again from the driver (14 new
segments), not from torch's cache; and the first burst after start takes 38 new segments
although the prefill warm-up allocated the same shapes before the decode graphs' captures
(what these captures' emptying explains). So by default a capture is begun and ended on the
capture stream directly (``CUDAGraph.capture_begin`` / ``capture_end``), as torch's context
does but without those three calls; the caches stay (torch's allocator still frees cached
blocks and retries before it reports running out of memory), and a capture does not wait for
the encoders' work on other streams. Measured on the H200 (``gpu-h200-s17.md``, 3 runs each,
one machine): the first burst of 32 chats after start at 0.949 of a warm one (0.118 s to the
first token) against 0.924 (0.130 s) through ``torch.cuda.graph``, after an evict + admit 1.02
(0.096 s) against 0.98 (0.106 s); RAG cycles under a 6 GiB cap unchanged (0.88 of uncapped).
``AGILE_RAG_CAPTURE_KEEPS_CACHES=0`` captures through ``torch.cuda.graph`` again."""
from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["capture_graph", "cudnn_attention_allowed", "keeps_caches"]


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
        if keeps_caches():
            out = _capture_keeping_caches(graph, fn, pool, stream)
        else:
            with torch.cuda.graph(graph, pool=pool, stream=stream,
                                  capture_error_mode="thread_local"):
                out = fn()
    finally:
        if collecting:
            gc.enable()
    return graph, out


def keeps_caches() -> bool:
    """Whether captures leave torch's memory caches alone: yes unless
    ``AGILE_RAG_CAPTURE_KEEPS_CACHES`` is ``0`` (see the module's doc)."""
    return os.environ.get("AGILE_RAG_CAPTURE_KEEPS_CACHES", "1").strip() != "0"


def _capture_keeping_caches(graph: Any, fn: Callable[[], Any], pool: Any,
                            stream: Any) -> Any:
    """``fn()`` captured into ``graph`` on ``stream`` (torch's default capture stream for
    None), in ``pool``: ``torch.cuda.graph``'s own steps but for its synchronize and cache
    emptying. A failed ``fn`` ends the capture and raises its own error."""
    import torch

    if stream is None:                   # the stream torch.cuda.graph would capture on
        if torch.cuda.graph.default_capture_stream is None:
            torch.cuda.graph.default_capture_stream = torch.cuda.Stream()
        stream = torch.cuda.graph.default_capture_stream
    with torch.cuda.stream(stream):
        if pool is None:
            graph.capture_begin(capture_error_mode="thread_local")
        else:
            graph.capture_begin(pool, capture_error_mode="thread_local")
        try:
            out = fn()
        except BaseException:
            with contextlib.suppress(Exception):   # the first error says what went wrong
                graph.capture_end()
            raise
        graph.capture_end()
    return out


@contextlib.contextmanager
def cudnn_attention_allowed(on: bool) -> Iterator[None]:
    """While ``on``: torch's ``scaled_dot_product_attention`` may pick cuDNN's kernels, first
    (``CUDNN_ATTENTION`` may keep them off for the process: cuDNN builds a plan on the CPU for
    each new shape). A graph captured inside keeps the kernels it captured, so a decode graph
    captured here replays cuDNN's attention with no plan to build again
    (``llm_params.decode_cudnn_attention``). The switch is torch's and process-wide: on exit it
    goes back to the process's setting (:func:`~agile_rag.runtime.executor.set_cudnn_attention`),
    not to what it was on entry, so two loops capturing at once (two LLMs warming their graphs)
    cannot leave it on (a priority order left with cuDNN first is moot while it is off).
    Off: nothing changes."""
    if not on:
        yield
        return
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from . import executor

    switch = torch.backends.cuda
    setting = executor.cudnn_attention_setting
    back = setting if setting is not None else switch.cudnn_sdp_enabled()
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
            yield
    finally:
        switch.enable_cudnn_sdp(back)
