"""Graph captures that leave torch's memory caches alone (``AGILE_RAG_CAPTURE_KEEPS_CACHES``,
runtime/cuda_graph.py; issue 15): ``torch.cuda.graph`` empties the device and pinned host
caches and waits for the whole device at every capture, so a capture between two bursts made
the next burst's prefill allocate its memory again (H200, benchmarks/results/gpu-h200-s16.md).
No CUDA here: torch's graph and stream are stand-ins that record what the capture called; the
capture on a real GPU is tests/gpu/test_cuda_streams_gpu.py's."""
from __future__ import annotations

import contextlib

import pytest
import torch

from agile_rag.runtime import cuda_graph


class Graph:
    def __init__(self, calls):
        self.calls = calls

    def capture_begin(self, *pool, capture_error_mode="global"):
        self.calls.append(("begin", pool, capture_error_mode))

    def capture_end(self):
        self.calls.append(("end",))


@pytest.fixture
def calls(monkeypatch):
    calls: list = []

    def forbidden(name):
        def call(*_a, **_k):
            calls.append((name,))
        return call

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: Graph(calls))
    monkeypatch.setattr(torch.cuda, "stream",
                        lambda s: (calls.append(("stream", s)), contextlib.nullcontext())[1])
    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    monkeypatch.setattr(torch._C, "_host_emptyCache", forbidden("_host_emptyCache"),
                        raising=False)          # (a CPU build may lack it)
    monkeypatch.setattr(torch.cuda.graph, "default_capture_stream", "torch's stream")
    return calls


def test_a_capture_keeping_the_caches_begins_and_ends_on_its_stream_and_empties_nothing(
        calls, monkeypatch):
    monkeypatch.setenv("AGILE_RAG_CAPTURE_KEEPS_CACHES", "1")
    graph, out = cuda_graph.capture_graph(lambda: calls.append(("fn",)) or 7, pool="pool",
                                          stream="side")
    assert out == 7 and isinstance(graph, Graph)
    assert calls == [("stream", "side"), ("begin", ("pool",), "thread_local"), ("fn",),
                     ("end",)]
    calls.clear()
    cuda_graph.capture_graph(lambda: None)             # torch's stream, a pool of its own
    assert calls == [("stream", "torch's stream"), ("begin", (), "thread_local"), ("end",)]


def test_a_failed_capture_ends_and_raises_its_own_error(calls, monkeypatch):
    monkeypatch.setenv("AGILE_RAG_CAPTURE_KEEPS_CACHES", "1")

    def broken():
        raise ValueError("a kernel that cannot be captured")
    with pytest.raises(ValueError, match="cannot be captured"):
        cuda_graph.capture_graph(broken, stream="side")
    assert calls[-1] == ("end",)
    assert cuda_graph.gc.isenabled()                   # garbage collection back on


def test_captures_keep_the_caches_by_default_and_zero_goes_through_torch_cuda_graph(
        calls, monkeypatch):
    monkeypatch.delenv("AGILE_RAG_CAPTURE_KEEPS_CACHES", raising=False)
    assert cuda_graph.keeps_caches()
    monkeypatch.setenv("AGILE_RAG_CAPTURE_KEEPS_CACHES", "0")
    assert not cuda_graph.keeps_caches()
    seen = []

    class Context:
        def __init__(self, graph, **kw):
            seen.append(kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.cuda, "graph", Context)
    cuda_graph.capture_graph(lambda: None, pool="pool", stream="side")
    assert seen == [{"pool": "pool", "stream": "side", "capture_error_mode": "thread_local"}]
