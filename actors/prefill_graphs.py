"""CUDA graphs of a prefill pass of a few short prompts, read straight into their slots (issue 15).

The lean prefill (:meth:`~.llm_lean_decode.LeanDecoder.prefill`) launches ~20 kernels a layer,
~700 for a 3B model, and the host takes 17-19 ms to launch them whatever the pass's size (H100,
``benchmarks/results/gpu-h100-s24.md``). A lone 220-token prompt is ~5 ms of GPU work, so its
first token waited for the launch: 17.2 ms eager against 5.5 ms replayed from a CUDA graph; 4
rows 16.8 against 10.9 ms; from ~11 rows on a pass is the GPU's. In a served burst the launching
thread also shares Python's lock with the event loop taking the burst's requests in.

A graph per (rows, length): 1 to :data:`ROWS` rows, exactly (a spare row would write into a slot
another chat holds), right-padded to a :data:`LENGTHS` bucket, at most :data:`GRAPH_TOKENS`
tokens in all (:func:`graph_keys`). Its inputs are static buffers: the tokens, each row's last
index and the rows' slots. Its body is the lean prefill with each layer's keys and values copied
into those slots over the bucket's positions (``index_copy_`` along the slots): the padding's
too, past a row's end, as the eager pass writes them (never attended, overwritten as the row
decodes). Its output is each row's last token's logits.

- Keys are the lean decoder, the weights' address and the cache's identity, as for the chunk
  graphs (actors/chunk_graphs.py): if one changed, the set is made anew. A set is parked with
  a stable KV cache and its decode graphs across an evict + admit.
- Every graph is captured ahead of use, while the loop is idle (:meth:`PrefillGraphs.warm`,
  into free slots, on throwaway tokens), never on a prompt's request: a pass with no graph yet
  is read eagerly. Each graph's first replay is compared with the eager pass on the same input;
  they must agree (:func:`~.llm_lean_decode.agrees`), or prefill graphs are turned off for the
  set.

On unless ``llm_params.prefill_graphs`` is false. Only the batch runner's loop thread uses
them.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from .graph_set import GraphSet

log = logging.getLogger("agile_rag.llm")

#: the most rows a graph reads (a pass of more is the GPU's anyway; each count is a graph)
ROWS = 4
#: the lengths a pass's rows are right-padded to
LENGTHS = (64, 128, 256, 512, 1024)
#: the most tokens (rows x length) a graph reads
GRAPH_TOKENS = 1024


def length_bucket(n: int) -> int | None:
    """The smallest of :data:`LENGTHS` that holds ``n`` tokens; None: none does."""
    for b in LENGTHS:
        if n <= b:
            return b
    return None


def graph_keys(slots: int, length: int) -> list[tuple[int, int]]:
    """The (rows, length) keys of a cache of ``slots`` x ``length``: one row first, short
    lengths first (a lone chat's prompt is the common pass)."""
    return [(n, b) for n in range(1, min(ROWS, slots) + 1) for b in LENGTHS
            if b <= length and n * b <= GRAPH_TOKENS]


class PrefillGraphs(GraphSet):
    """The prefill graphs of one runner's cache and weights (see the module docstring)."""

    what = "prefills"

    def __init__(self, lean: Any, cache: Any, weights: torch.Tensor, vocab: int, stream: Any,
                 pad: int = 0):
        super().__init__(lean, cache, weights, stream)
        self.pad = pad
        dev = cache.keys[0].device
        self.ids = torch.full((GRAPH_TOKENS,), pad, dtype=torch.long, device=dev)
        self.last = torch.zeros((ROWS,), dtype=torch.long, device=dev)
        self.slots = torch.zeros((ROWS,), dtype=torch.long, device=dev)
        self.logits = torch.empty((ROWS, vocab), dtype=cache.keys[0].dtype, device=dev)
        #: the keys the idle warm-up still has to capture (see :meth:`warm`)
        self.to_warm = graph_keys(cache.slots, cache.length)

    def key(self, lens: list[int]) -> tuple[int, int] | None:
        """The key of a pass of prompts of ``lens`` tokens, or None: no graph fits it."""
        n, b = len(lens), length_bucket(max(lens, default=0))
        if self.off or not 1 <= n <= ROWS or b is None or n * b > GRAPH_TOKENS or \
                b > self.cache.length:
            return None
        return n, b

    def body(self, n: int, length: int) -> torch.Tensor:
        """The lean prefill of the static inputs' ``n`` rows of ``length`` tokens, their keys
        and values into their slots: each row's last logits [n, vocab]."""
        keys, values, slots = self.cache.keys, self.cache.values, self.slots[:n]

        def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            keys[layer][:, :, :length].index_copy_(0, slots, k)
            values[layer][:, :, :length].index_copy_(0, slots, v)

        return self.lean.prefill(self.ids[:n * length].view(n, length), self.last[:n], store)

    def fill(self, contexts: list[list[int]], first: int, length: int) -> None:
        """The static inputs of ``contexts``, right-padded to ``length``, for the slots
        ``first``.. onwards."""
        n = len(contexts)
        host = torch.full((n * length + n,), self.pad, dtype=torch.long)
        for i, c in enumerate(contexts):
            host[i * length:i * length + len(c)] = torch.tensor(c, dtype=torch.long)
            host[n * length + i] = len(c) - 1
        if self.ids.is_cuda:             # asynchronous copies from one pinned buffer
            host = host.pin_memory()
        self.ids[:n * length].copy_(host[:n * length], non_blocking=True)
        self.last[:n].copy_(host[n * length:], non_blocking=True)
        torch.arange(first, first + n, out=self.slots[:n])

    def run(self, contexts: list[list[int]], first: int) -> torch.Tensor | None:
        """Each prompt's last logits [n, vocab], the prompts read into the slots ``first``..
        from a graph; None: no captured graph fits (the caller reads them eagerly)."""
        key = self.key([len(c) for c in contexts])
        graph = self.graphs.get(key) if key is not None else None
        if key is None or graph is None:
            return None
        n, length = key
        self.fill(contexts, first, length)
        graph.replay()
        self.replays += 1
        return self.logits[:n].clone()

    def warm(self, first_free: int) -> bool:
        """(idle) Capture the next graph the warm-up still lacks, on throwaway tokens into the
        free slots from ``first_free`` on (nothing reads a free slot: a row seated there later
        writes its own keys first), replay it and compare it with the eager pass; False when
        none is left, graphs are off or too few slots are free now."""
        while self.to_warm and not self.off:
            n, length = key = self.to_warm[0]
            if key in self.graphs:
                self.to_warm.pop(0)
                continue
            if first_free + n > self.cache.slots:
                return False
            self.to_warm.pop(0)
            self.ids.fill_(self.pad)
            self.last[:n].fill_(length - 1)
            torch.arange(first_free, first_free + n, out=self.slots[:n])
            graph = self._capture(n, length)
            if graph is None:
                return False
            graph.replay()
            self._check(key)
            return True
        return False

    def _check(self, key: tuple[int, int]) -> None:
        """Graph ``key`` was just replayed on the static inputs: keep it when its logits agree
        with the eager pass's; else turn the graphs off."""
        from .llm_lean_decode import agrees

        n = key[0]
        got = self.logits[:n].clone()
        if agrees(got, self.body(*key)):
            return
        self.off = f"graph {key} differs from the eager pass"
        log.warning("prefill CUDA graphs turned off: %s", self.off)
        self.graphs.clear()
        self.to_warm = []

    def _capture(self, n: int, length: int) -> torch.cuda.CUDAGraph | None:
        return self.capture((n, length), lambda: self.logits[:n].copy_(self.body(n, length)))
