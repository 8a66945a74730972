"""CUDA graphs of a short chunk read straight into one slot of the KV rectangle (issue 15).

The question after a stored prefix is a few dozen tokens. Read eagerly, its cost is not its
arithmetic but its kernel launches: ~1,400 for a 3B model through transformers' forward (25-47
ms on an H200), ~970 through the lean decoder's chunk. Replayed from a CUDA graph it is a
handful of calls, like a decode step.

A graph per (token bucket, view bucket): 16, 32 or 64 tokens (``TOKEN_BUCKETS``), attending
over the slot's first ``view`` keys: ``LEN_BUCKET`` times a power of two, or the cache's whole
length (:func:`view_bucket`; a 4,096-token cache has 5 views, 15 graphs). Its inputs are static
buffers: the tokens, their positions and the slot. Its body is
:meth:`~.llm_lean_decode.LeanDecoder.chunk` over a :class:`SlotView`, which writes the
tokens' keys and values into the slot at their positions and returns the slot's keys to attend
over. Its output is every token's logits; the runner takes the last real token's row.

- The spare tokens of a bucket take the positions right after the real ones. Causal attention
  hides them from the real tokens, and the decode steps that follow overwrite them before they
  are read. A chunk whose spare positions would pass the cache's length runs eagerly.
- Keys are the weights' address and the cache's identity, as for the decode graphs
  (actors/decode_graphs.py): if either changed, every graph is dropped.
- Every graph is captured ahead of use, in the idle warm-up after the decode graphs'
  (:meth:`ChunkGraphs.warm`, into a free slot), not on a prompt's request: a capture and its
  check cost a 3B model ~60 ms (session 11, H200).
- Each graph's first replay is compared with the eager chunk on the same input. They must
  agree (:func:`~.llm_lean_decode.agrees`), or chunk graphs are turned off for the runner.

On unless ``llm_params.chunk_graphs`` is false. Only the batch runner's loop thread uses
them.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from .batch_plan import LEN_BUCKET
from .graph_set import GraphSet

log = logging.getLogger("agile_rag.llm")

#: the token counts a graph is captured for; a longer chunk runs eagerly
TOKEN_BUCKETS = (16, 32, 64)


class SlotView:
    """One slot of a KV rectangle (actors/kv_slots.py) as the cache of a chunk of tokens at
    positions ``pos`` [m]: ``update`` writes their keys and values into slot ``slot`` (a
    one-element long tensor) at those positions and returns the slot's first ``view`` keys
    and values, ``[1, kv heads, view, head dim]``."""

    def __init__(self, cache: Any, slot: torch.Tensor, pos: torch.Tensor, view: int):
        self.cache, self.slot, self.pos, self.view = cache, slot, pos, view

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cache.keys[layer], self.cache.values[layer]
        # [1, kv heads, m, D] -> [m, kv heads, D]: the positions' rows of the slot
        k[self.slot, :, self.pos] = key_states[0].transpose(0, 1)
        v[self.slot, :, self.pos] = value_states[0].transpose(0, 1)
        return (k[:, :, :self.view].index_select(0, self.slot),
                v[:, :, :self.view].index_select(0, self.slot))


def view_bucket(need: int, length: int) -> int:
    """The view a graph attends over to see ``need`` keys of a cache of ``length``: the
    smallest ``LEN_BUCKET`` times a power of two that holds them, at most ``length``."""
    view = LEN_BUCKET
    while view < need:
        view *= 2
    return min(view, length)


def view_buckets(length: int) -> list[int]:
    """Every view :func:`view_bucket` gives for a cache of ``length``, smallest first."""
    views = [min(LEN_BUCKET, length)]
    while views[-1] < length:
        views.append(min(views[-1] * 2, length))
    return views


def token_bucket(m: int) -> int | None:
    for b in TOKEN_BUCKETS:
        if m <= b:
            return b
    return None


class ChunkGraphs(GraphSet):
    """The graphs of one runner's cache and weights (see the module docstring)."""

    what = "chunks"

    def __init__(self, lean: Any, cache: Any, weights: torch.Tensor, vocab: int,
                 stream: Any):
        super().__init__(lean, cache, weights, stream)
        dev = cache.keys[0].device
        top = TOKEN_BUCKETS[-1]
        self.ids = torch.zeros((1, top), dtype=torch.long, device=dev)
        self.pos = torch.zeros((top,), dtype=torch.long, device=dev)
        self.slot = torch.zeros((1,), dtype=torch.long, device=dev)
        self.logits = torch.empty((top, vocab), dtype=cache.keys[0].dtype, device=dev)
        self.checked: set[tuple[int, int]] = set()
        #: the keys the idle warm-up still has to capture (see :meth:`warm`)
        self.to_warm = [(tb, view) for view in view_buckets(cache.length)
                        for tb in TOKEN_BUCKETS if tb <= view]

    def body(self, tb: int, view: int) -> torch.Tensor:
        """The chunk of the static inputs' first ``tb`` tokens: every token's logits."""
        out = self.lean.chunk(self.ids[:, :tb], self.pos[:tb],
                              SlotView(self.cache, self.slot, self.pos[:tb], view),
                              every_row=True)
        assert out is not None
        return out

    def fits(self, m: int, start: int) -> bool:
        """Whether ``m`` tokens at positions ``start``.. can run in a graph."""
        tb = token_bucket(m)
        return not self.off and tb is not None and start + tb <= self.cache.length

    def run(self, ids: torch.Tensor, start: int, slot: int) -> torch.Tensor | None:
        """The last token's logits [1, vocab] of ``ids`` [1, m] read into slot ``slot`` at
        positions ``start``..; None: not through a graph (the caller reads it eagerly)."""
        m = ids.shape[-1]
        tb = token_bucket(m)
        if tb is None or not self.fits(m, start):
            return None
        view = self.fill(ids, start, slot, tb)
        key = (tb, view)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(tb, view)
            if graph is None:
                return None
        graph.replay()
        self.replays += 1
        got = self.logits[m - 1:m]
        if key not in self.checked:      # the first replay: the eager chunk must agree
            want = self._check(key, m)
            if want is not None:
                return want.clone()
        return got.clone()

    def _check(self, key: tuple[int, int], m: int) -> torch.Tensor | None:
        """Graph ``key`` was just replayed on the static inputs: None when its logits of token
        ``m - 1`` agree with the eager chunk's; else those (graphs are then turned off)."""
        from .llm_lean_decode import agrees

        self.checked.add(key)
        want = self.body(*key)[m - 1:m]
        if agrees(self.logits[m - 1:m], want):
            return None
        self.off = f"graph {key} differs from the eager chunk"
        log.warning("chunk CUDA graphs turned off: %s", self.off)
        self.graphs.clear()
        self.to_warm = []
        return want

    def warm(self, slot: int) -> bool:
        """(idle) Capture the next graph the warm-up still lacks, on throwaway tokens at the
        last positions of its view in the free slot ``slot`` (nothing reads a free slot: a
        row seated there later writes its own keys first), replay it and check it; False
        when none is left (or graphs are off)."""
        while self.to_warm and not self.off:
            key = self.to_warm.pop(0)
            if key in self.graphs:
                continue
            tb, view = key
            self.ids.zero_()
            torch.arange(view - tb, view, out=self.pos[:tb])
            self.slot.fill_(slot)
            graph = self._capture(tb, view)
            if graph is None:
                return False
            graph.replay()
            self._check(key, tb)
            return True
        return False

    def fill(self, ids: torch.Tensor, start: int, slot: int, tb: int) -> int:
        """The static inputs of ``ids`` [1, m] at positions ``start``.. in slot ``slot``,
        padded to ``tb`` tokens (the spare ones next, token 0); the view to attend over."""
        m = ids.shape[-1]
        self.ids[0, :m].copy_(ids[0], non_blocking=True)
        self.ids[0, m:tb].zero_()
        torch.arange(start, start + tb, out=self.pos[:tb])
        self.slot.fill_(slot)
        return view_bucket(start + tb, self.cache.length)

    def _capture(self, tb: int, view: int) -> torch.cuda.CUDAGraph | None:
        return self.capture((tb, view),
                            lambda: self.logits[:tb].copy_(self.body(tb, view)))
