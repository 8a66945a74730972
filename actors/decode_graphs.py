"""CUDA graphs of the batch runner's decode step (actors/batch_runner.py): one per (batch bucket,
view-length bucket), sharing one memory pool; inputs go through static buffers, logits come out
in one static buffer. Keyed on the address of the weights and on the cache allocation (a cache
parked at stable addresses keeps them good across a trim)."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from ..runtime.cuda_graph import capture_graph, cudnn_attention_allowed
from ..runtime.cuda_streams import new_stream
from .batch_plan import LEN_BUCKET, SeqRequest, pow2, round_up

if TYPE_CHECKING:
    from .batch_runner import BatchRunner

log = logging.getLogger("agile_rag.llm")


_captured_before = False      # some graph was captured in this process


class _Graphs:
    """CUDA graphs of the decode step, one per (batch bucket, view-length bucket), sharing one
    memory pool; inputs go through static buffers, logits come out in one static buffer."""

    def __init__(self, runner: BatchRunner):
        self.runner = runner
        cache = runner.cache
        self.cache_id = id(cache)
        self.weights_ptr = next(runner.model.parameters()).data_ptr()
        dev = cache.keys[0].device
        s = cache.slots
        self.ids = torch.zeros((s, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((s,), dtype=torch.long, device=dev)
        self.rows = torch.arange(s, device=dev)
        self.logits: torch.Tensor | None = None
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool: Any = None

    def valid_for(self, model: Any, cache: Any) -> bool:
        return cache is not None and id(cache) == self.cache_id and \
            next(model.parameters()).data_ptr() == self.weights_ptr

    def run(self, ids: torch.Tensor, pos: torch.Tensor, view: int, stats: dict) -> torch.Tensor:
        cache = self.runner.cache
        b = ids.shape[0]
        bb = min(pow2(b), cache.slots)
        vv = min(round_up(view, LEN_BUCKET), cache.length)
        self.ids[:b, 0].copy_(ids, non_blocking=True)
        self.pos[:b].copy_(pos, non_blocking=True)
        if bb > b:
            self.ids[b:bb].zero_()
            self.pos[b:bb].zero_()          # spare rows write into free slots only
        key = (bb, vv)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(bb, vv)
            stats["captures"] += 1
        graph.replay()
        assert self.logits is not None
        return self.logits[:b]

    def capture_at(self, key: tuple[int, int], active: list[SeqRequest]) -> None:
        """Capture ``key`` ahead of use: inputs are the active rows' next tokens at their
        next positions (see :meth:`BatchRunner.warm_one`), zeros for the free slots."""
        cache = self.runner.cache
        b = min(len(active), cache.slots)
        self.ids.zero_()
        self.pos.zero_()
        if b:
            self.ids[:b, 0].copy_(torch.tensor([r.last for r in active[:b]], dtype=torch.long))
            self.pos[:b].copy_(torch.tensor([r.pos for r in active[:b]], dtype=torch.long))
        self._capture(*key)

    def _body(self, bb: int, vv: int) -> torch.Tensor:
        return self.runner.decode_body(self.ids[:bb], self.pos[:bb], self.rows[:bb], vv)

    def _capture(self, bb: int, vv: int) -> torch.cuda.CUDAGraph:
        t0 = time.monotonic()
        side = self.runner.capture_stream
        if side is None:
            side = self.runner.capture_stream = new_stream(self.ids.device)
        side.wait_stream(torch.cuda.current_stream())
        global _captured_before
        # llm_params.decode_cudnn_attention: the attention kernels the graph keeps are cuDNN's
        with cudnn_attention_allowed(self.runner.graph_cudnn):
            with torch.cuda.stream(side):
                # warm up kernels and the allocator: twice the first time in this process,
                # once after that (the kernels are loaded; only this shape's buffers are new)
                for _ in range(1 if _captured_before else 2):
                    out = self._body(bb, vv)
            torch.cuda.current_stream().wait_stream(side)
            if self.logits is None:
                self.logits = torch.empty((self.runner.cache.slots, out.shape[-1]),
                                          dtype=out.dtype, device=out.device)
            del out
            logits = self.logits
            graph, _ = capture_graph(lambda: logits[:bb].copy_(self._body(bb, vv)),
                                     pool=self.pool, stream=side)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(bb, vv)] = graph
        _captured_before = True
        took = time.monotonic() - t0
        self.runner.capture_s += took
        log.debug("captured decode graph batch=%d len=%d in %.3fs", bb, vv, took)
        return graph
