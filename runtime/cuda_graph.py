"""Capturing a CUDA graph the way every graph here is captured (the decode step's, an encoder's
forward, a short prompt chunk's)."""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["capture_graph", "cudnn_attention_allowed"]


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
