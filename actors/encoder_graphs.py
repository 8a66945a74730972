"""CUDA graphs of an encoder's forward (embedders, rerankers) for small batches.

On a GPU a small forward of a 24-layer encoder (a burst of one-sentence queries) is not the
GPU's work but Python's: some 700 kernel launches, each a PyTorch call that lets go of the GIL
and takes it back. Beside an event loop busy with hundreds of requests, each take-back can wait
for the loop's switch interval, so a forward that computes in a few milliseconds takes tens to
launch, and the loop waits for the GPU thread as much as the other way round. A forward
replayed from a CUDA graph is a handful of calls.

One graph per *bucket* (rows, width): a batch runs in the smallest bucket that holds it, its
features copied into the bucket's static input tensors (the spare rows and columns padded; the
padding is masked out, as it is for the padding a batch has anyway), and its rows of the
graph's output copied back. Buckets cover small forwards only (``GRAPH_WIDTHS`` and at most
``max_tokens`` rows x width): a big forward's compute hides its launches.

When the model is pinned on the GPU, every bucket is captured then, before the model says it is
ready (:meth:`EncoderGraphs.capture_all`; 76 buckets at 8,192 tokens, a few seconds), so no
request waits for a capture. A bucket still without a graph (its capture was undone by the
weights moving, or the budget grew) is captured the first time it is used, on the forward
thread, under the backend's launch lock.

Rules:

- Graphs are made only for a model pinned on the GPU (``device: cuda``), resident, with a
  tokenizer that pads on the right (the positions of the real tokens then do not depend on the
  padding); the actor drops them when that ends (:meth:`EncoderGraphs.close`).
- A graph holds the weights' device addresses: if the weights moved (evicted and admitted
  again elsewhere) every graph is dropped and captured again.
- The captured batch's non-array features (e.g. sentence-transformers' ``modality``) must be
  equal at replay; otherwise the forward runs eagerly.
- A capture that fails turns graphs off for the model (logged once); forwards run eagerly.
- Results equal the eager forward's within the dtype's rounding (the padded width changes how
  attention sums, not what it sums): tests/gpu/test_encoder_graphs_gpu.py.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..runtime.cuda_graph import capture_graph

log = logging.getLogger("agile_rag.encoder")

#: the padded widths (tokens) graphs are made for; a wider batch runs eagerly
GRAPH_WIDTHS = (16, 32, 64, 128)
#: rows x width of the largest graph (its activations stay in the graphs' memory pool)
GRAPH_MAX_TOKENS = 8192
#: row buckets: powers of two up to 16, then steps of 16 (a 129-row batch does not run 256)
_ROW_STEP = 16


def row_bucket(rows: int) -> int:
    """The rows a batch of ``rows`` runs as in a graph."""
    if rows <= _ROW_STEP:
        n = 1
        while n < rows:
            n *= 2
        return n
    return -(-rows // _ROW_STEP) * _ROW_STEP


def bucket(rows: int, width: int, max_tokens: int, max_len: int) -> tuple[int, int] | None:
    """The (rows, width) graph a batch runs in, or None (it runs eagerly)."""
    for w in GRAPH_WIDTHS:
        if w >= width:
            if w > max_len and width <= max_len:
                w = max_len                  # never wider than the model takes
            r = row_bucket(rows)
            return (r, w) if r * w <= max_tokens else None
    return None


class _Graph:
    __slots__ = ("graph", "inputs", "output", "consts")

    def __init__(self, graph: Any, inputs: dict, output: Any, consts: dict):
        self.graph = graph
        self.inputs = inputs
        self.output = output
        self.consts = consts


class EncoderGraphs:
    """The graphs of one encoder (see the module docstring). ``run(features)`` is the model on
    features already on the device (the backend's ``run``); ``pads`` the padding value of
    each feature; ``weight`` a tensor of the model whose address says the weights moved."""

    def __init__(self, run: Callable[[dict], Any], pads: dict[str, int], weight: Any, *,
                 max_tokens: int = GRAPH_MAX_TOKENS, max_len: int = 512):
        self._run = run
        self._pads = pads
        self._weight = weight
        self._where = weight.data_ptr()
        self.max_tokens = max_tokens
        self.max_len = max_len
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None
        self._failed: set[tuple[int, int]] = set()
        self.off = ""                    # why graphs were turned off ("" while on)
        self.replays = 0
        self.captures = 0
        self._lock = threading.Lock()    # captures and replays, one at a time

    def __len__(self) -> int:
        return len(self._graphs)

    def close(self) -> None:
        """Drop every graph and the memory pool they share (the allocator gets it back)."""
        self._graphs.clear()
        self._pool = None

    def _follow_weights(self) -> None:
        """(under the lock) The weights moved (evicted and admitted again elsewhere): every
        graph is dropped, to be captured again at their new address."""
        if self._weight.data_ptr() != self._where:
            self.close()
            self._where = self._weight.data_ptr()

    def forward(self, arrays: dict[str, np.ndarray], consts: dict, dev: Any,
                launch: threading.Lock) -> np.ndarray | None:
        """The batch's output as float32 rows, replayed from a graph (captured now if its
        bucket has none); None: run it eagerly (no bucket holds it, or graphs are off)."""
        if self.off:
            return None
        first = next(iter(arrays.values()))
        rows, width = first.shape
        key = bucket(rows, width, self.max_tokens, self.max_len)
        if key is None or key in self._failed:
            return None
        import torch

        with launch, self._lock:
            self._follow_weights()
            g = self._graphs.get(key)
            if g is None:
                g = self._capture(key, arrays, consts, dev)
                if g is None:
                    return None
            if set(g.inputs) != set(arrays) or not _same(g.consts, consts):
                return None
            with torch.inference_mode():
                for name, static in g.inputs.items():
                    # through pinned memory: a copy from pageable memory would wait for the
                    # forward queued before this one
                    host = torch.empty(key, dtype=static.dtype, pin_memory=True)
                    fill(host.numpy(), arrays[name], self._pads.get(name, 0), name)
                    static.copy_(host, non_blocking=True)
                g.graph.replay()
                out = torch.empty((rows,) + tuple(g.output.shape[1:]), dtype=g.output.dtype,
                                  pin_memory=True)
                out.copy_(g.output[:rows], non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            self.replays += 1
        done.synchronize()                 # this forward's rows only (not the one queued next)
        return out.numpy()

    def buckets(self) -> list[tuple[int, int]]:
        """Every (rows, width) bucket a batch can run in, the most tokens first."""
        keys = set()
        for w in GRAPH_WIDTHS:
            width = min(w, self.max_len)
            for rows in range(1, self.max_tokens // max(width, 1) + 1):
                key = bucket(rows, width, self.max_tokens, self.max_len)
                if key is not None:
                    keys.add(key)
        return sorted(keys, key=lambda k: (-k[0] * k[1], k))

    def capture_all(self, arrays: dict[str, np.ndarray], consts: dict, dev: Any,
                    launch: threading.Lock) -> int:
        """Capture every bucket that has no graph yet (blocking; between captures forwards
        may run). ``arrays`` and ``consts`` are a batch like the ones to come (only the
        arrays' names and dtypes are used). Returns how many graphs were made."""
        made = 0
        for key in self.buckets():
            if self.off:
                break
            with launch, self._lock:
                self._follow_weights()
                if key in self._graphs or key in self._failed:
                    continue
                if self._capture(key, arrays, consts, dev) is not None:
                    made += 1
        return made

    def _capture(self, key: tuple[int, int], arrays: dict, consts: dict,
                 dev: Any) -> _Graph | None:
        import torch

        rows, width = key
        try:
            with torch.inference_mode():
                inputs = {}
                for name, a in arrays.items():
                    t = torch.full((rows, width), self._pads.get(name, 0), dtype=torch.from_numpy(
                        a[:0]).dtype, device=dev)
                    if name == "attention_mask":
                        t.fill_(1)
                    inputs[name] = t
                feats = {**inputs, **consts}
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):          # warm up off the capture
                    for _ in range(2):
                        self._run(dict(feats))      # (the model may add its outputs to it)
                torch.cuda.current_stream(dev).wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph, output = capture_graph(lambda: self._run(dict(feats)).float(),
                                              pool=self._pool)
        except Exception as exc:  # noqa: BLE001 - the eager forward still works
            self._failed.add(key)
            if not self._graphs:
                self.off = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("CUDA graphs of the encoder's forward failed (%s): forwards run "
                            "eagerly", self.off)
            return None
        g = _Graph(graph, inputs, output, dict(consts))
        self._graphs[key] = g
        self.captures += 1
        return g


def fill(out: np.ndarray, a: np.ndarray, pad: int, name: str) -> None:
    """``out`` [bucket rows, bucket width] = ``a`` [rows, width] padded on the right and
    below; a padded row attends to its first position only (a row with nothing to attend to
    would compute NaNs)."""
    rows, width = a.shape
    out.fill(pad)
    out[:rows, :width] = a
    if name == "attention_mask":
        out[rows:, 0] = 1


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    try:
        return all(bool(a[k] == b[k]) for k in a)
    except Exception:  # noqa: BLE001 - values that do not compare: not the same
        return False
