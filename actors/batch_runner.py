"""The batch runner: executes the planner's :class:`~.batch_plan.StepPlan` on the model.

It owns everything torch: the KV cache (the rectangle of actors/kv_slots.py, or the block pool of
actors/kv_paged.py; a parked stable cache), the left-padded batched prefill, the chunked prefill of
one long context, the decode step (on CUDA captured once per (batch bucket, length bucket) as a
CUDA graph, actors/decode_graphs.py: static input buffers, the KV cache at fixed addresses); the
next tokens are picked from its logits in actors/sampling.py. Graphs are keyed on the address of
the weights and on the cache allocation: after the weights left the GPU and came back (evict /
admit), or after the cache grew, they are dropped. The engine captures the common buckets again
while it has nothing else to do (:meth:`BatchRunner.warm_one`, one graph per loop turn, right after
a load or an admit), so a burst finds them ready; a bucket nobody warmed is captured on first use.
Only the engine's loop thread calls it.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..runtime import stable_memory
from ..runtime.cuda_streams import new_stream
from ..runtime.executor import apply_torch_threads
from ..runtime.thread_tuner import ThreadTuner
from .batch_plan import LEN_BUCKET, SeqRequest, StepKind, StepPlan, net_moves, pow2, round_up
from .chunk_graphs import ChunkGraphs
from .decode_graphs import _Graphs
from .kv_chunk import chunk_cache, chunk_cache_from
from .kv_paged import make_paged_cache
from .kv_prefix import PrefixStore
from .kv_slots import (
    DECODE_ATTN,
    _register_decode_attention,
    into_slot,
    layers_stacked,
    make_slot_cache,
)
from .llm_lean_decode import LeanDecoder, agrees, close, lean_decoder
from .prefill_graphs import PrefillGraphs
from .torch_util import is_oom

log = logging.getLogger("agile_rag.llm")

#: a batched prefill of at most this many rows leaves their prompts' prefixes (two copies per
#: layer per row: a 32-row burst on the GPU would queue ~2,300 small copies on its path)
KEEP_PREFIX_ROWS = 4
#: lone prompts of these lengths read by the lean prefill at the warm-up's end, on a GPU
#: (:meth:`BatchRunner.check_lean_prefill`)
WARM_LONE_PROMPTS = (32, 128, 512, 2048)

#: model families whose decoder takes per-row position_ids, a ready 4D mask and any Cache
#: (full attention everywhere); others keep the plain ``generate`` path.
BATCHABLE_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def batching_supported(model: Any) -> str | None:
    """None when the step loop can drive ``model``, else the reason it cannot."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in BATCHABLE_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not on the batching list"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"      # our 4D mask would drop the window
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "mixed attention layer types"
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r}"
    return None


#: view lengths the warm-up captures (every batch bucket at 256 and 512 keys): what chats of a
#: few hundred tokens decode over; longer views are captured on first use
WARM_VIEW = 512
#: chunks of at most this many tokens (the question after a stored prefix) are read by the
#: lean decoder where the decode step uses it: ~20 calls a layer instead of transformers' ~40
#: (and on a CPU ~12,000 tensor calls a forward); longer ones are compute, not calls
LEAN_CHUNK_TOKENS = 64
#: without CUDA graphs, decode steps attend over the keys up to the next multiple of this
#: (LEN_BUCKET with graphs): a few matmul shapes per chat, each built once by oneDNN
VIEW_BUCKET = 64


# ---- the runner ---------------------------------------------------------------------------------
class BatchRunner:
    def __init__(self, model: Any, *, pad: int, cuda_graphs: bool = True, kv_block: int = 0):
        self.model = model
        self.kv_block = kv_block           # > 0: the cache is a pool of blocks (kv_paged.py)
        self.pad = pad
        self.cuda_graphs = cuda_graphs
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        # grouped-query models decode with grouped_decode_attention (no repeat_kv copies)
        self.decode_attn = DECODE_ATTN if (
            self.kv_heads < heads and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and _register_decode_attention()) else None
        params = inspect.signature(model.forward).parameters
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else \
            ("num_logits_to_keep" if "num_logits_to_keep" in params else None)
        self.cache: Any = None
        #: the CPU's lean decode step (actors/llm_lean_decode.py): None until the first CPU
        #: step tries it, False where it does not fit or did not agree with transformers'
        self.lean: LeanDecoder | None | bool = None
        #: the lean step captured in the GPU's decode graphs (llm_params.gpu_lean_decode):
        #: False: transformers' forward; None: tried at the next capture, kept only if its
        #: first step agrees with transformers'; a decoder: in use (made again for each new set
        #: of graphs, after the weights moved)
        self.gpu_lean: LeanDecoder | None | bool = False
        #: the lean step's fused small operations (LeanDecoder.fused_ops): None on a GPU
        self.lean_fused_ops: bool | None = None
        #: the lean step's one-kernel rotary embedding and KV write (LeanDecoder.rope_kv;
        #: llm_params.decode_rope_kv)
        self.rope_kv = False
        #: decode graphs are captured with cuDNN's attention allowed, first
        #: (llm_params.decode_cudnn_attention; runtime/cuda_graph.py)
        self.graph_cudnn = False
        #: the CPU decode step's torch thread count, chosen by timing (runtime/thread_tuner.py);
        #: None: whatever torch has
        self.tuner: ThreadTuner | None = None
        self.graphs: _Graphs | None = None
        #: where decode graphs warm up and are captured: this runner's alone (runtime/
        #: cuda_streams.py: a pool stream may be another thread's too, and that thread's work
        #: would be taken into the graph or fail the capture)
        self.capture_stream: Any = None
        #: where the batch loop computes when ``llm_params.own_stream`` is on: a stream of this
        #: runner's own (see :meth:`on_own_stream`)
        self.loop_stream: Any = None
        self.partial_kv: Any = None        # the DynamicCache of a context read in chunks
        #: short chunks read by the lean decoder (see _chunk_lean), and whether its chunk
        #: agreed with transformers' (None: not compared yet; once per runner: a decoder made
        #: again after the weights moved computes the same)
        self.lean_chunks = 0
        self.lean_chunk_ok: bool | None = None
        #: a burst's prompts are read by the lean decoder's prefill (llm_params.lean_prefill),
        #: where the decode step's lean decoder is in use; whether its prefill agreed with
        #: transformers' (None: not compared yet)
        self.lean_prefill_on = False
        self.lean_prefill_ok: bool | None = None
        self.lean_prefills = 0
        #: short last chunks replay CUDA graphs straight into their slot (chunk_graphs.py)
        self.chunk_graphs_on = False
        self.chunk_graphs: ChunkGraphs | None = None
        self.graphed_chunks = 0
        self.warm_chunk_captures = 0       # chunk graphs captured while idle, not on a request
        #: a lean prefill pass of a few short prompts replays a CUDA graph (prefill_graphs.py)
        self.prefill_graphs_on = False
        self.prefill_graphs: PrefillGraphs | None = None
        self.graphed_prefills = 0
        self.warm_prefill_captures = 0     # prefill graphs captured while idle
        #: long prompts' leading blocks, kept after their chunked prefill for the next prompt
        #: that starts the same way (per layer (keys, values) [1, kv_heads, n, head_dim])
        self.prefixes = PrefixStore()
        self._prefix_device: torch.device | None = None
        self.capture_s = 0.0               # seconds spent capturing graphs, all sets
        self.graph_sets = 0                # graph sets started (one per cache / admit)
        # a stable KV cache (runtime/stable_memory.py) given back with its decode, chunk and
        # prefill graphs: taken again when the next cache has its shape, graphs and all
        self.parked: tuple[Any, _Graphs | None, ChunkGraphs | None,
                           PrefillGraphs | None] | None = None
        self.unparks = 0                   # caches taken back at their old addresses
        self._stable: bool | None = None   # stable buffers work here (decided once)
        self.warm_keys: list[tuple[int, int]] = []   # warm-up captures still to do
        #: the prefill shapes' first-use costs were paid in a warm-up (see warm_prefill)
        self.prefill_warmed = False
        self.last_warm: dict = {}          # the last finished warm-up: graphs, seconds
        self._warm_t0 = 0.0
        self._warm_n = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def check_device(self) -> bool:
        """Before a run: drop a cache or graphs the weights' move made stale; True when the
        cache was dropped (the planner must forget its shape)."""
        dropped = False
        if self.cache is not None and self.cache.keys[0].device != self.device:
            self.release()
            dropped = True
        if self.graphs is not None and not self.graphs.valid_for(self.model, self.cache):
            self.graphs = None
        if self.prefixes.entries and self._prefix_device != self.device:
            self.prefixes.clear()
        return dropped

    @contextlib.contextmanager
    def on_own_stream(self, wanted: bool = True) -> Iterator[None]:
        """(the loop's thread) The batch loop's GPU work on a stream of this runner's own, at
        normal priority (runtime/cuda_streams.py), when ``wanted`` (``llm_params.own_stream``).
        The encoders compute on the legacy default stream; a decode step or prefill queued there
        waits for every forward queued before it (a layer-streamed one for its layers' copies),
        while on a stream of its own the LLM's kernels and the encoders' run side by side. (At
        the card's greatest priority the encoders starved: issue 13, fourth session.) The
        stream starts after whatever the legacy stream holds now (an admit's writes) and is
        synchronised when the loop ends, so whatever frees or moves the cache or the weights
        afterwards, on any thread, finds the loop's work done. Off, or on the CPU: nothing."""
        dev = self.device
        if not wanted or dev.type != "cuda":
            yield
            return
        if self.loop_stream is None:
            self.loop_stream = new_stream(dev)
        stream = self.loop_stream
        stream.wait_stream(torch.cuda.current_stream(dev))
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            try:
                stream.synchronize()
            except Exception as exc:  # noqa: BLE001 - the loop's own error is the one to raise
                log.warning("the batch loop's stream failed to synchronise: %s", exc)

    # ---- what comes before a forward ------------------------------------------------------------
    def prepare(self, plan: StepPlan) -> None:
        """Apply ``plan``'s row moves, then make its cache shape."""
        self.apply_moves(plan.moves, len(plan.rows) if plan.kind is StepKind.DECODE else None)
        if plan.cache is not None:
            self._ensure_cache(*plan.cache, keep=plan.keep)

    def apply_moves(self, moves: list[tuple[int, int]], active: int | None = None) -> None:
        """Rows leave: the last row moves into each freed slot (``src -> dst``); a paged
        cache also gives back the blocks of the rows from ``active`` on (the rows left)."""
        if self.cache is None:
            return
        if getattr(self.cache, "paged", False):
            for src, dst in moves:
                self.cache.move(src, dst)
            if active is not None:
                self.cache.free_from(active)
            return
        # one gather and one scatter a tensor for every moved row together: a copy a row and
        # tensor cost a 3B model 72 host calls per row (~22 us each under the H200 s17
        # profiler, whose host copies match the 15 and then 7 rows moved at a burst's end)
        net = net_moves(moves, active)
        if not net:
            return
        dev = self.cache.keys[0].device
        src = _h2d(torch.tensor([s for s, _ in net], dtype=torch.long), dev)
        dst = _h2d(torch.tensor([d for _, d in net], dtype=torch.long), dev)
        for t in self.cache.keys + self.cache.values:
            t.index_copy_(0, dst, t.index_select(0, src))

    def _ensure_cache(self, slots: int, length: int, *, keep: int) -> None:
        p = next(self.model.parameters())
        c = self.cache
        if self.kv_block:
            if c is None or not getattr(c, "paged", False):
                self.cache = make_paged_cache(self.n_layers, slots, self.kv_heads,
                                              length // self.kv_block, self.kv_block,
                                              self.head_dim, p.dtype, p.device)
                self.graphs = None
                self.chunk_graphs = None
                self.prefill_graphs = None
                log.debug("KV cache: %d rows over %d blocks of %d tokens (%.1f MB)", slots,
                          length // self.kv_block, self.kv_block,
                          self.cache.nbytes() / 2**20)
            return
        if c is None and self.parked is not None:
            pc, pg, pcg, ppg = self.parked
            self.parked = None
            if (pc.slots, pc.length) == (slots, length) and pc.keys[0].device == p.device \
                    and pc.keys[0].dtype == p.dtype:
                pc.unpark()                  # same addresses: its graphs are still good
                self.cache, self.unparks = pc, self.unparks + 1
                self.graphs = pg if pg is not None and pg.valid_for(self.model, pc) else None
                # the chunk graphs too, while the decode graphs' lean decoder is the one
                # they replay (a new decode set makes a new decoder: see _graph_set); else
                # they were captured again, one per idle loop turn, and a burst right after
                # an admit waited for the capture in progress (H200: 0.19 s to the first
                # token against 0.09 s, benchmarks/results/gpu-h200-s16.md)
                self.chunk_graphs = pcg if self.graphs is not None and pcg is not None and \
                    pcg.valid_for(self.gpu_lean, pc) else None
                self.prefill_graphs = ppg if self.graphs is not None and ppg is not None \
                    and ppg.valid_for(self.gpu_lean, pc) else None
                log.debug("KV cache taken back at its addresses (%d slots x %d tokens)",
                          slots, length)
                return
        new = make_slot_cache(self.n_layers, slots, self.kv_heads, length, self.head_dim,
                              p.dtype, p.device, stable=self._stable_here(p.device))
        if c is not None:
            for i in range(self.n_layers):
                new.keys[i][:keep, :, :c.length].copy_(c.keys[i][:keep])
                new.values[i][:keep, :, :c.length].copy_(c.values[i][:keep])
        self.graphs = None                   # captured against the old addresses
        self.chunk_graphs = None
        self.prefill_graphs = None
        self.cache = new
        log.debug("KV cache: %d slots x %d tokens (%.1f MB)", slots, length, new.nbytes() / 2**20)

    # ---- forwards -----------------------------------------------------------------------------
    def run(self, plan: StepPlan, stats: dict, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The plan's forward: logits ``[rows, vocab]`` of the rows' next tokens (a CHUNK
        that does not land yet returns an empty tensor). ``ids``: a decode step's input
        tokens where they are not the rows' ``last`` yet (the step before's greedy tokens,
        still on the device: :func:`.sampling.sample_ahead`)."""
        self.prepare(plan)
        if plan.kind is StepKind.PREFILL:
            return self._prefill(plan, stats)
        if plan.kind is StepKind.CHUNK:
            return self._chunk(plan)
        tuner = self.tuner
        if tuner is None or self.cache is None or self.cache.keys[0].device.type != "cpu":
            return self._decode(plan, stats, ids)
        # a CPU decode step: with the thread count its timings favour now
        rows = len(plan.rows)
        n = tuner.threads(rows)
        apply_torch_threads(n)
        t0 = time.perf_counter()
        out = self._decode(plan, stats, ids)
        tuner.observe(rows, time.perf_counter() - t0)
        stats["decode_threads"] = n
        return out

    def _prefill(self, plan: StepPlan, stats: dict) -> torch.Tensor:
        from transformers import DynamicCache

        reqs = plan.rows
        dev = self.cache.keys[0].device
        n = len(reqs)
        contexts = [r.context() for r in reqs]
        lean = self._prefill_lean() if not getattr(self.cache, "paged", False) else None
        if lean is not None:
            graphed = self.graphed_prefills
            logits = self._lean_prefill(lean, plan, contexts, dev)
            stats["lean_prefills"] = stats.get("lean_prefills", 0) + 1
            if self.graphed_prefills != graphed:
                stats["graphed_prefills"] = stats.get("graphed_prefills", 0) + 1
            self._keep_prefixes(plan, dev)
            return logits
        lp = max(len(c) for c in contexts)
        ids = torch.full((n, lp), self.pad, dtype=torch.long)
        mask = torch.zeros((n, lp), dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, lp - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[i, lp - len(c):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = _h2d(ids, dev), _h2d(mask, dev), _h2d(positions, dev)
        kv = DynamicCache()
        # rows of one length need no mask (plain causal attention); padded rows get ours
        padded = any(len(c) != lp for c in contexts)
        out = self.model(input_ids=ids, attention_mask=self._prefill_mask(mask) if padded
                         else None, position_ids=positions, past_key_values=kv,
                         use_cache=True, **self._keep())
        logits = out.logits[:, -1, :]
        slots = torch.arange(plan.first_slot, plan.first_slot + n, device=dev)
        lens = _h2d(torch.tensor([len(c) for c in contexts]), dev)
        # row i's tokens sit at the right end: shift them to the start of its slot
        src = (torch.arange(lp, device=dev)[None, :] + (lp - lens)[:, None]).clamp(max=lp - 1)
        if getattr(self.cache, "paged", False):
            self._prefill_paged(kv, plan.first_slot, [len(c) for c in contexts], src)
            del kv, out
            return logits
        for layer in range(self.n_layers):
            k, v = _dynamic_layer(kv, layer)
            idx = src[:, None, :, None].expand(n, k.shape[1], lp, k.shape[3])
            self.cache.keys[layer][slots, :, :lp] = k.gather(2, idx)
            self.cache.values[layer][slots, :, :lp] = v.gather(2, idx)
        del kv, out
        self._keep_prefixes(plan, dev)
        return logits

    def _keep_prefixes(self, plan: StepPlan, dev: torch.device) -> None:
        """The prompts' prefixes of a prefill of a few rows, from their slots."""
        if len(plan.rows) > KEEP_PREFIX_ROWS:
            return
        for i, req in enumerate(plan.rows):
            self._keep_slot_prefix(req, plan.first_slot + i, dev)

    def _keep_slot_prefix(self, req: SeqRequest, slot: int, dev: torch.device) -> None:
        """:meth:`_keep_prefix` of a prompt just read into ``slot`` of the KV rectangle (every
        layer's part in one copy through the cache's :attr:`stacked` view)."""
        cache = self.cache
        s = slice(slot, slot + 1)
        whole = getattr(cache, "stacked", None)
        self._keep_prefix(req, lambda layer: (cache.keys[layer][s], cache.values[layer][s]),
                          dev, whole=whole[:, :, s] if whole is not None else None)

    def _lean_prefill(self, lean: LeanDecoder, plan: StepPlan, contexts: list[list[int]],
                      dev: torch.device) -> torch.Tensor:
        """A PREFILL's prompts read by the lean decoder in one pass, right-padded: each row's
        keys and values go straight to its slot from position 0 (no copy of a padded cache,
        no mask: the padding follows a row's tokens); the logits of each row's last token.
        A pass of a few short prompts replays a CUDA graph of it where one was captured
        (:meth:`_graphed_prefill`)."""
        graphed = self._graphed_prefill(lean, contexts, plan.first_slot)
        if graphed is not None:
            return graphed
        n = len(contexts)
        lp = max(len(c) for c in contexts)
        ids = torch.full((n, lp), self.pad, dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        last = torch.tensor([len(c) - 1 for c in contexts], dtype=torch.long)
        cache, first = self.cache, plan.first_slot

        def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            cache.keys[layer][first:first + n, :, :lp].copy_(k)
            cache.values[layer][first:first + n, :, :lp].copy_(v)

        self.lean_prefills += 1
        return lean.prefill(_h2d(ids, dev), _h2d(last, dev), store)

    def _graphed_prefill(self, lean: LeanDecoder, contexts: list[list[int]],
                         first: int) -> torch.Tensor | None:
        """(``prefill_graphs``, a GPU's rectangle cache) The prompts' last logits from a
        prefill graph captured for this lean decoder and cache while idle
        (:meth:`warm_prefill_graph_one`); None: none fits (the pass runs eagerly)."""
        graphs = self.prefill_graphs
        if not self.prefill_graphs_on or not self.cuda_graphs or graphs is None or \
                self.cache is None or not graphs.valid_for(lean, self.cache):
            return None
        out = graphs.run(contexts, first)
        if out is not None:
            self.graphed_prefills += 1
        return out

    def warm_prefill_graph_one(self, active: int, stats: dict) -> bool:
        """(idle: nothing to admit, read or decode) Capture the next prefill graph
        (``prefill_graphs``) of the current cache into the free slots after the ``active``
        rows; False when none is left, none is wanted or too few slots are free. Called
        whenever the loop is idle, after the decode graphs' warm-up: a cache made anew (a
        burst or a long prompt grew it) has them again before the next short prompt."""
        cache = self.cache
        if not self.prefill_graphs_on or not self.lean_prefill_on or \
                not self.graphs_wanted() or cache is None or \
                getattr(cache, "paged", False) or active >= cache.slots or \
                not isinstance(self.gpu_lean, LeanDecoder) or self.lean_prefill_ok is False:
            return False
        graphs = self.prefill_graphs
        if graphs is not None and graphs.valid_for(self.gpu_lean, cache) and \
                (graphs.off or not graphs.to_warm):
            return False                   # (the common case: nothing left to warm)
        lean = self._prefill_lean()        # (compared with transformers' once)
        if lean is None:
            return False
        if graphs is None or not graphs.valid_for(lean, cache):
            graphs = self.prefill_graphs = self._new_graph_set(PrefillGraphs, lean, cache,
                                                               pad=self.pad)
        t0 = time.monotonic()
        if not graphs.warm(active):
            return False
        self.warm_prefill_captures += 1
        stats["warm_prefill_captures"] = stats.get("warm_prefill_captures", 0) + 1
        stats["warm_prefill_graph_s"] = round(stats.get("warm_prefill_graph_s", 0.0) +
                                              time.monotonic() - t0, 4)
        return True

    def _prefill_lean(self) -> LeanDecoder | None:
        """The lean decoder to read a PREFILL's prompts with (``llm_params.lean_prefill``), or
        None (transformers' forward): the decode step's lean decoder where one is in use (the
        CPU's, or the one in the GPU's decode graphs), once its prefill agreed with
        transformers' (:meth:`_lean_prefill_differs`)."""
        lean = self._lean_in_use() if self.lean_prefill_on else None
        if lean is None:
            return None
        if self.lean_prefill_ok is None:
            why = self._lean_prefill_differs(lean)
            self.lean_prefill_ok = why is None
            if why is not None:
                log.warning("the lean decoder's prefill differs from transformers' for %s (%s): "
                            "prompts are read through transformers", type(self.model).__name__,
                            why)
        return lean if self.lean_prefill_ok else None

    def check_lean_prefill(self, tokens: int = 512) -> None:
        """(idle, a warm-up's end) Compare the lean prefill with transformers' now, off the
        request path, rather than in the first burst's prefill; on a GPU, then one throwaway
        pass of 256-token rows, ``tokens`` in all (``prefill_batch_tokens``: the largest pass a
        burst makes), so its kernels are loaded and the allocator holds the memory such a
        pass takes before a burst needs them (the first burst after start took 3-4 new
        segments, 160-580 MB, on the H200 after a throwaway of two rows); nothing stored."""
        if self.lean_prefill_ok is not None:
            return
        lean = self._prefill_lean()
        if lean is None or not self.on_gpu():
            return
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 2)
        rows = max(2, tokens // 256)
        ids = torch.randint(0, vocab, (rows, 256), device=self.device)
        last = torch.full((rows,), 255, device=self.device)
        last[1] = 100                              # rows of two lengths, as a burst's
        try:
            with torch.inference_mode():
                lean.prefill(ids, last, lambda layer, k, v: None)
                # and one prompt alone, short to long: a pass of fewer tokens takes other
                # matmul kernels, loaded and chosen on their first use (a lone 220-token
                # prompt after a burst of 32 took 0.034-0.063 s to read in the server, 0.023-0.025
                # s after these passes, gpu-h200-s18.md)
                most = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
                for n in WARM_LONE_PROMPTS:
                    if n <= tokens and (not most or n <= most):
                        lean.prefill(ids[:1, :1].expand(1, n).contiguous(),
                                     torch.full((1,), n - 1, device=self.device),
                                     lambda layer, k, v: None)
        except Exception as exc:  # noqa: BLE001 - a warm-up only: the first burst pays instead
            log.warning("lean prefill warm-up failed (%s)", exc)

    def _lean_prefill_differs(self, lean: LeanDecoder) -> str | None:
        """Two prompts (6 and 11 random tokens) read by the lean prefill together and by
        transformers each alone: None when every row's last logits agree (:func:`agrees`) and
        its keys and values are close; else what differed, or the error."""
        from transformers import DynamicCache

        dev = self.device
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 2)
        gen = torch.Generator().manual_seed(0)
        lens = (6, 11)
        ids = torch.full((2, max(lens)), self.pad, dtype=torch.long)
        for i, n in enumerate(lens):
            ids[i, :n] = torch.randint(0, vocab, (n,), generator=gen)
        ids = ids.to(dev)
        stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            with torch.inference_mode():
                got = lean.prefill(ids, torch.tensor([n - 1 for n in lens], device=dev),
                                   lambda layer, k, v: stored.__setitem__(layer, (k, v)))
                for i, n in enumerate(lens):
                    kv = DynamicCache()
                    full = self.model(input_ids=ids[i:i + 1, :n], past_key_values=kv,
                                      use_cache=True, **self._keep()).logits[0, -1:]
                    if not agrees(got[i:i + 1], full):
                        return f"row {i}'s logits: " + _difference(got[i:i + 1], full)
                    why = _kv_difference(
                        self.n_layers,
                        lambda layer, i=i, n=n: tuple(t[i:i + 1, :, :n] for t in stored[layer]),
                        lambda layer, kv=kv: _dynamic_layer(kv, layer))
                    if why is not None:
                        return f"row {i}, {why}"
                return None
        except Exception as exc:  # noqa: BLE001 - transformers' forward reads the prompts
            return f"error: {exc!r}"[:300]

    def _keep_prefix(self, req: SeqRequest, layer_kv: Any, dev: torch.device, *,
                     owned: bool = False, whole: torch.Tensor | None = None) -> None:
        """A prompt just read leaves its leading blocks in the prefix store (unless one there
        covers them already); ``layer_kv(layer)``: its keys and values,
        ``[1, kv_heads, >= its length, head_dim]`` each: copied for the tokens stored (every
        layer's into one tensor), or, when ``owned`` (tensors nobody else keeps or writes: a
        chunked prefill's finished cache), kept as views of them (no allocation, no copy).
        ``whole``: the same as one view ``[layers, 2, 1, kv_heads, >= its length, head_dim]``
        (its slot of the cache's :attr:`stacked`), copied in one kernel."""
        if not self.prefixes.budget_tokens or req.prompt is None:
            return

        def prefix_kv(m: int) -> list:
            if whole is not None and not owned:
                slab = whole[:, :, :, :, :m].clone(memory_format=torch.contiguous_format)
                return [(slab[i, 0], slab[i, 1]) for i in range(self.n_layers)]
            parts = [t[:, :, :m] for layer in range(self.n_layers) for t in layer_kv(layer)]
            if owned:
                return [(parts[2 * i], parts[2 * i + 1]) for i in range(self.n_layers)]
            if any(t.shape != parts[0].shape for t in parts):      # (keys unlike values)
                return [(parts[2 * i].clone(), parts[2 * i + 1].clone())
                        for i in range(self.n_layers)]
            # one copy for every layer, in one allocation: per-layer clones were 2 x layers
            # small blocks a prompt, which on a GPU took new allocator segments (each waits
            # for the queued work) whenever a burst kept more prompts than the last one
            slab = torch.stack(parts)
            return [(slab[2 * i], slab[2 * i + 1]) for i in range(self.n_layers)]
        if self.prefixes.insert(req.prompt, prefix_kv) is not None:
            self._prefix_device = dev

    def _prefill_paged(self, kv: Any, first: int, lens: list[int], src: torch.Tensor) -> None:
        """A batched prefill's keys and values (left-padded rows) into the rows' blocks."""
        cache = self.cache
        cache.ensure([(first + i, n) for i, n in enumerate(lens)])
        dest = torch.cat([cache.dest(first + i, n) for i, n in enumerate(lens)])
        n, lp = src.shape
        # (row, position) pairs that hold tokens, as flat indices: found once, on the host
        sel = torch.cat([torch.arange(m) + i * lp for i, m in enumerate(lens)]).to(src.device)
        for layer in range(self.n_layers):
            k, v = _dynamic_layer(kv, layer)
            idx = src[:, None, :, None].expand(n, k.shape[1], lp, k.shape[3])
            kk = k.gather(2, idx).transpose(1, 2).reshape(n * lp, k.shape[1], k.shape[3])
            vv = v.gather(2, idx).transpose(1, 2).reshape(n * lp, v.shape[1], v.shape[3])
            cache.write(layer, dest, kk.index_select(0, sel), vv.index_select(0, sel))

    def _chunk(self, plan: StepPlan) -> torch.Tensor:
        req = plan.rows[0]
        ctx = req.context()
        if plan.start == 0 or self.partial_kv is None:
            self.partial_kv = chunk_cache(self.n_layers, len(ctx))
        dev = self.device
        ids = _h2d(torch.tensor([ctx[plan.start:plan.end]], dtype=torch.long), dev)
        positions = torch.arange(plan.start, plan.end, dtype=torch.long, device=dev)[None]
        lean = self._chunk_lean(plan.end - plan.start)
        if lean is not None and plan.lands:
            last = self._graphed_chunk(lean, req, ids, plan)
            if last is not None:
                return last
        if lean is not None:
            self.lean_chunks += 1
            last = lean.chunk(ids, positions[0], self.partial_kv, plan.lands)
            if last is None:
                return torch.empty((0, int(self.model.config.vocab_size)), device=dev)
        else:
            # no attention mask: one row without padding is plain causal attention, and a mask
            # of ones would make transformers check it on the host (a sync in the middle of the
            # forward, waiting for everything queued on the stream before it)
            out = self.model(input_ids=ids, attention_mask=None, position_ids=positions,
                             past_key_values=self.partial_kv, use_cache=True, **self._keep())
            if not plan.lands:
                return out.logits[:, :0, :].reshape(0, out.logits.shape[-1])
            last = out.logits[:, -1, :]
        kv, self.partial_kv = self.partial_kv, None
        slot, n = plan.first_slot, plan.end
        if getattr(self.cache, "paged", False):
            self.cache.ensure([(slot, n)])
            dest = self.cache.dest(slot, n)
            for layer in range(self.n_layers):
                k, v = _dynamic_layer(kv, layer)
                self.cache.write(layer, dest, k[0].transpose(0, 1), v[0].transpose(0, 1))
        else:
            self._into_slot(kv, slot, n)
        # the chunks' cache goes now: the store keeps views of its tensors
        self._keep_prefix(req, lambda layer: _dynamic_layer(kv, layer), dev, owned=True)
        return last

    def _into_slot(self, kv: Any, slot: int, n: int) -> None:
        """The first ``n`` keys and values a chunked prefill's cache holds, into ``slot`` of
        the KV rectangle (in one copy where both lie as one tensor each:
        :func:`~.kv_slots.layers_stacked`)."""
        whole = getattr(self.cache, "stacked", None)
        if whole is not None and into_slot(whole, slot, layers_stacked(
                [_dynamic_layer(kv, layer) for layer in range(self.n_layers)]), n):
            return
        for layer in range(self.n_layers):
            k, v = _dynamic_layer(kv, layer)
            self.cache.keys[layer][slot, :, :n] = k[0, :, :n]
            self.cache.values[layer][slot, :, :n] = v[0, :, :n]

    def _graphed_chunk(self, lean: LeanDecoder, req: SeqRequest, ids: torch.Tensor,
                       plan: StepPlan) -> torch.Tensor | None:
        """(``chunk_graphs``, a GPU's rectangle cache) The prompt's last chunk read straight
        into its slot from a CUDA graph: what the chunks before it (or a stored prefix) hold
        goes into the slot first, and the prompt's prefix is kept from the slot. None: the
        chunk is read the usual way."""
        cache = self.cache
        if not self.chunk_graphs_on or self.device.type != "cuda" or cache is None or \
                getattr(cache, "paged", False) or not self.cuda_graphs:
            return None
        graphs = self._chunk_graph_set(lean, cache)
        slot, start = plan.first_slot, plan.start
        if not graphs.fits(ids.shape[-1], start):
            return None
        if start:
            self._into_slot(self.partial_kv, slot, start)
        last = graphs.run(ids, start, slot)
        if last is None:
            return None
        self.partial_kv = None
        self.graphed_chunks += 1
        self._keep_slot_prefix(req, slot, self.device)
        return last

    def _chunk_graph_set(self, lean: LeanDecoder, cache: Any) -> ChunkGraphs:
        """The chunk graphs of this lean decoder and cache (made again when either changed or
        the weights moved)."""
        graphs = self.chunk_graphs
        if graphs is None or not graphs.valid_for(lean, cache):
            graphs = self.chunk_graphs = self._new_graph_set(ChunkGraphs, lean, cache)
        return graphs

    def _new_graph_set(self, kind: Any, lean: LeanDecoder, cache: Any, **extra: Any) -> Any:
        """A new set of chunk or prefill graphs (``kind``, actors/graph_set.py) of this lean
        decoder, cache and weights, captured on this runner's capture stream."""
        vocab = int(getattr(lean.head, "out_features", 0) or self.model.config.vocab_size)
        if self.capture_stream is None:
            self.capture_stream = new_stream(self.device)
        return kind(lean, cache, next(self.model.parameters()), vocab, self.capture_stream,
                    **extra)

    def warm_chunk_one(self, active: int, stats: dict) -> bool:
        """(idle: nothing to admit, read or decode) Capture the next chunk graph
        (``chunk_graphs``) of the current cache in a free slot, the one after the ``active``
        rows; False when none is left, none is wanted or no slot is free. The loop calls it
        whenever it is idle, so a cache that grew (a long prompt) has its chunk graphs again
        before the next prompt that starts from that prompt's prefix (the question after a
        stored prefix, issue 15), and it is cheap once they are all there. None are warmed
        while no prefix is kept (``prefix_cache_tokens`` 0): no prompt starts from one."""
        cache = self.cache
        if not self.chunk_graphs_on or self.prefixes.budget_tokens <= 0 or \
                not self.graphs_wanted() or cache is None or \
                getattr(cache, "paged", False) or active >= cache.slots or \
                not isinstance(self.gpu_lean, LeanDecoder) or self.lean_chunk_ok is False:
            return False
        graphs = self.chunk_graphs
        if graphs is not None and graphs.valid_for(self.gpu_lean, cache) and \
                (graphs.off or not graphs.to_warm):
            return False                   # (the common case: nothing left to warm)
        lean = self._chunk_lean(1)
        if lean is None:
            return False
        graphs = self._chunk_graph_set(lean, cache)
        t0 = time.monotonic()
        if not graphs.warm(active):
            return False
        self.warm_chunk_captures += 1
        stats["warm_chunk_captures"] = stats.get("warm_chunk_captures", 0) + 1
        stats["warm_chunk_s"] = round(stats.get("warm_chunk_s", 0.0) + time.monotonic() - t0, 4)
        return True

    def _chunk_lean(self, tokens: int) -> LeanDecoder | None:
        """The lean decoder to read a chunk of ``tokens`` with, or None (transformers'
        forward): a short chunk (the question after a stored prefix: a forward's cost there
        is its calls, ~1,400 kernel launches of a 3B model on a GPU, not its tokens), where
        the decode step's lean decoder is in use (the CPU's, or the one in the GPU's decode
        graphs) and its chunk agreed with transformers' once (:meth:`_lean_chunk_differs`)."""
        lean = self._lean_in_use() if tokens <= LEAN_CHUNK_TOKENS else None
        if lean is None:
            return None
        if self.lean_chunk_ok is None:
            why = self._lean_chunk_differs(lean)
            self.lean_chunk_ok = why is None
            if why is not None:
                log.warning("the lean decoder's chunk differs from transformers' for %s (%s): "
                            "chunks run through transformers", type(self.model).__name__, why)
        ok = self.lean_chunk_ok
        return lean if ok else None

    def _lean_in_use(self) -> LeanDecoder | None:
        """The decode step's lean decoder where one is in use: the CPU's, or the one in the
        GPU's decode graphs."""
        lean = self.lean if self.device.type == "cpu" else self.gpu_lean
        return lean if isinstance(lean, LeanDecoder) else None

    def check_lean_chunk(self) -> None:
        """(idle, a warm-up's end) Compare the lean decoder's chunk with transformers' now,
        off the request path, rather than in the first short chunk a prompt reads."""
        if self.lean_chunk_ok is None:
            self._chunk_lean(1)

    def _lean_chunk_differs(self, lean: LeanDecoder) -> str | None:
        """Read 6 tokens after 6 others both ways, into two chunk caches: None when they give
        the same last logits (:func:`agrees`) and the same keys and values; else what
        differed (the largest difference against the largest magnitude, or the error)."""
        dev = self.device
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 2)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, 12), generator=gen).to(dev)
        pos = torch.arange(12, device=dev)
        caches = [chunk_cache(self.n_layers, 12), chunk_cache(self.n_layers, 12)]
        try:
            with torch.inference_mode():
                for kv in caches:
                    self.model(input_ids=ids[:, :6], position_ids=pos[None, :6],
                               past_key_values=kv, use_cache=True, **self._keep())
                full = self.model(input_ids=ids[:, 6:], attention_mask=None,
                                  position_ids=pos[None, 6:], past_key_values=caches[0],
                                  use_cache=True, **self._keep()).logits[:, -1, :]
                got = lean.chunk(ids[:, 6:], pos[6:], caches[1])
                assert got is not None
                if not agrees(got, full):
                    return "logits: " + _difference(got, full)
                return _kv_difference(self.n_layers, lambda layer: _dynamic_layer(caches[1], layer),
                                      lambda layer: _dynamic_layer(caches[0], layer))
        except Exception as exc:  # noqa: BLE001 - transformers' forward reads the chunks
            return f"error: {exc!r}"[:300]

    def start_from_prefix(self, req: SeqRequest) -> int:
        """A chunked prefill is about to start: begin it after the longest stored prefix of
        the request's context (those tokens' keys and values are copied into the prefill's
        slab, not computed); how many tokens that covers (0: none stored)."""
        ctx = req.context()
        entry, n = self.prefixes.lookup(ctx)
        if entry is None or not n:
            return 0
        kv = chunk_cache_from(self.n_layers, len(ctx), layers_stacked(entry.kv), n)
        if kv is None:                  # not one view: a copy per layer's keys and values
            kv = chunk_cache(self.n_layers, len(ctx))
            for layer, (k, v) in enumerate(entry.kv):
                kv.update(k[:, :, :n], v[:, :, :n], layer)
        self.partial_kv = kv
        self.prefixes.acquire(entry)
        self.prefixes.release(entry)
        self.prefixes.count_hit(n)
        return n

    def capture_s_per_set(self) -> float:
        """What capturing a set of decode graphs has cost on average (0: never captured)."""
        return self.capture_s / self.graph_sets if self.graph_sets else 0.0

    def drop_partial(self) -> None:
        self.partial_kv = None

    def _decode(self, plan: StepPlan, stats: dict,
                ids: torch.Tensor | None = None) -> torch.Tensor:
        rows = plan.rows
        b = len(rows)
        dev = self.cache.keys[0].device
        if ids is None:
            ids = torch.tensor([r.last for r in rows], dtype=torch.long)
        pos = torch.tensor([r.pos for r in rows], dtype=torch.long)
        paged = getattr(self.cache, "paged", False)
        if paged:                                          # each row's next token's block
            self.cache.ensure([(i, r.pos + 1) for i, r in enumerate(rows)])
        if dev.type == "cuda" and self.cuda_graphs:
            self._graph_set()
            assert self.graphs is not None
            try:
                return self.graphs.run(ids, pos, plan.view, stats)
            except Exception as exc:  # noqa: BLE001 - a model whose step cannot be captured
                if is_oom(exc):
                    raise
                if self._without_one_kernel(exc, stats):
                    return self._decode(plan, stats, ids)
                log.warning("CUDA graph capture of the decode step failed (%s): decoding "
                            "without graphs from now on", exc)
                self.cuda_graphs = False
                self.graphs = None
                stats["graph_error"] = repr(exc)[:300]
        view = plan.view
        if not paged:
            # a handful of attention shapes, not one per step: each new shape of the bf16
            # matmuls makes oneDNN build (and keep) a kernel; masked keys cost little
            view = min(self.cache.length, round_up(view, VIEW_BUCKET))
            if dev.type == "cpu" and self.lean is not False:
                return self._lean_step(ids, pos, view, stats)
        return self.forward(ids.to(dev)[:, None], pos.to(dev), torch.arange(b, device=dev),
                            view)

    def _without_one_kernel(self, exc: BaseException, stats: dict) -> bool:
        """A decode graph's capture failed with ``exc``: if its lean step stored through the
        one-kernel rotary embedding and KV write (``rope_kv``, what is new in the step), the
        graphs are dropped and captured without it from now on (True); else False."""
        lean = self.gpu_lean
        if not (self.rope_kv and isinstance(lean, LeanDecoder) and lean.rope_kv):
            return False
        log.warning("CUDA graph capture of the decode step with the one-kernel rotary embedding "
                    "and KV write failed (%s): captured without it from now on", exc)
        stats["graph_error"] = repr(exc)[:300]
        self.rope_kv = False
        self.graphs = None
        return True

    def _lean_step(self, ids: torch.Tensor, pos: torch.Tensor, view: int,
                   stats: dict) -> torch.Tensor:
        """A CPU decode step through the lean decoder (actors/llm_lean_decode.py). The first
        one also runs transformers' step on the same input and keeps the lean decoder only if
        both agree; a model it does not fit decodes through transformers."""
        rows = torch.arange(len(ids))
        if self.lean is None:
            lean, out = self._checked_lean(ids[:, None], pos, rows, view)
            if lean is False:
                log.warning("the lean decode step differs from transformers' for %s: decoding "
                            "through transformers", type(self.model).__name__)
            if lean is not None:
                stats["lean_decode"] = "on" if lean else "off"
            self.lean = lean or False
            return out
        return self._lean_run(ids, pos, rows, view)

    def _lean_run(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                  view: int) -> torch.Tensor:
        lean = self.lean
        assert isinstance(lean, LeanDecoder)
        return self._run_lean(lean, ids[:, None], pos, rows, view)

    def _run_lean(self, lean: LeanDecoder, ids: torch.Tensor, pos: torch.Tensor,
                  rows: torch.Tensor, view: int) -> torch.Tensor:
        """One decode step of ``rows`` (ids [B, 1]) through ``lean``, over the KV cache."""
        cache = self.cache
        cache.bind(rows, pos, view)
        return lean(ids, pos, cache, self._mask(pos, view, cache.keys[0].dtype))

    def _checked_lean(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                      view: int) -> tuple[LeanDecoder | bool | None, torch.Tensor]:
        """A new lean decoder tried on one step (ids [B, 1]) against transformers' forward on
        the same input: (the decoder, its logits) when they agree; (False, transformers'
        logits) when they differ; (None, transformers' logits) for a model it does not fit."""
        lean = lean_decoder(self.model, self.lean_fused_ops, self.rope_kv)
        full = self.forward(ids, pos, rows, view)
        if lean is None:
            return None, full
        got = self._run_lean(lean, ids, pos, rows, view)
        return (lean, got) if agrees(got, full) else (False, full)

    def _prefill_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """The additive ``[n, 1, lp, lp]`` mask of a batched prefill of left-padded rows
        (``valid`` ``[n, lp]``: 1 where a token is), built on the rows' device: each token
        attends to the row's tokens up to itself; a padding position attends to itself only
        (a row with nothing to attend would give NaNs that its keys would carry into the
        real tokens' attention). Given 4D, transformers takes it as it is: its own mask
        building would check the padding on the host (a sync mid-forward on a GPU)."""
        lp = valid.shape[1]
        q = torch.arange(lp, device=valid.device)
        allowed = (q[None, :] <= q[:, None])[None] & valid.bool()[:, None, :]
        allowed |= (q[None, :] == q[:, None])[None]
        # the cache's dtype (made from the weights', _ensure_cache): a warm-up has no cache yet
        return _additive(allowed, next(self.model.parameters()).dtype)[:, None]

    @staticmethod
    def _mask(pos: torch.Tensor, view: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive [B, 1, 1, view] mask: each row attends up to its own position."""
        allowed = torch.arange(view, device=pos.device)[None, :] <= pos[:, None]
        return _additive(allowed, dtype)[:, None, None, :]

    def _graph_set(self) -> _Graphs:
        if self.graphs is None:
            self.graphs = _Graphs(self)
            self.graph_sets += 1
            if isinstance(self.gpu_lean, LeanDecoder):    # the weights may have moved
                self.gpu_lean = lean_decoder(self.model, self.lean_fused_ops, self.rope_kv) or False
        return self.graphs

    def decode_body(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                    view: int) -> torch.Tensor:
        """(a decode graph's body: ids [B, 1], pos [B]) One decode step of ``rows``: the lean
        step's (:attr:`gpu_lean`) or transformers' forward. The first call with the lean step
        wanted runs both, eagerly (a capture's warm-up, never inside the capture), and keeps
        the lean one only when they agree. The block cache (kv_block_tokens) keeps
        transformers' forward, as on the CPU."""
        if getattr(self.cache, "paged", False):
            return self.forward(ids, pos, rows, view)
        if self.gpu_lean is None:
            lean, out = self._checked_lean(ids, pos, rows, view)
            self.gpu_lean = lean or False
            name = type(self.model).__name__
            if isinstance(lean, LeanDecoder):
                log.info("%s: the GPU decode graphs capture the lean step (%d of %d layers' "
                         "projections as one matmul per input)", name,
                         sum(c is not None for c in lean.linear), len(lean.linear))
            elif lean is False:
                log.warning("the lean decode step differs from transformers' for %s on the "
                            "GPU: its decode graphs capture transformers' forward", name)
            else:
                log.info("no lean decode step for %s: its GPU decode graphs capture "
                         "transformers' forward", name)
            return out
        lean = self.gpu_lean
        if isinstance(lean, LeanDecoder):
            return self._run_lean(lean, ids, pos, rows, view)
        return self.forward(ids, pos, rows, view)

    # ---- warm-up: graphs captured while nothing else runs -------------------------------------
    def graphs_wanted(self) -> bool:
        """Decode steps here would replay CUDA graphs (on the GPU, graphs on)."""
        return self.cuda_graphs and self.on_gpu()

    def warm_buckets(self) -> list[tuple[int, int]]:
        """The (batch bucket, view bucket) keys a warm-up captures for the current cache:
        every batch bucket a decode can use, at views of up to :data:`WARM_VIEW` keys; the
        smallest views first (a burst of short chats starts there)."""
        c = self.cache
        if c is None:
            return []
        batches = sorted({min(pow2(b), c.slots) for b in range(1, c.slots + 1)})
        views = range(LEN_BUCKET, min(WARM_VIEW, c.length) + 1, LEN_BUCKET)
        return [(bb, vv) for vv in views for bb in batches]

    def plan_warmup(self) -> int:
        """Queue the warm-up captures that the current cache's graph set lacks; how many."""
        self.warm_keys = []
        if not self.graphs_wanted() or self.cache is None:
            return 0
        have = set(self.graphs.graphs) if self.graphs is not None else set()
        self.warm_keys = [k for k in self.warm_buckets() if k not in have]
        self._warm_t0, self._warm_n = time.monotonic(), 0
        return len(self.warm_keys)

    def warm_prefill(self, tokens: int, chunk: int, stats: dict) -> None:
        """(idle, on a GPU, once per runner) Throwaway prefills of the shapes a first burst
        uses: one row of ``tokens`` (an admission with nobody streaming), a ``chunk``-token
        chunk after it (a long prompt read while others stream), and two left-padded rows (an
        admission's mask path). A process's first forwards at new sizes pay for kernel
        selection, library workspaces and the allocator's first segments; without this the
        first burst of chats after start paid them on its requests (issue 15: 0.33 s to the
        first token against 0.10 s warm). Nothing is kept: no cache slot, no prefix."""
        if self.prefill_warmed or not self.on_gpu():
            return
        self.prefill_warmed = True
        dev = self.device
        t0 = time.monotonic()
        cfg = self.model.config
        vocab = int(getattr(cfg, "vocab_size", 0) or 0)
        tokens, chunk = max(1, tokens), max(1, min(chunk or tokens, tokens))
        most = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        if most and tokens + chunk > most:   # never a position the model has not got
            tokens = max(1, most - chunk)
            chunk = max(1, min(chunk, most - tokens))
        try:
            self._warm_prefill_forwards(dev, vocab, tokens, chunk)
        except Exception as exc:  # noqa: BLE001 - a warm-up only: the first burst pays instead
            log.warning("prefill warm-up failed (%s): the first chats pay its costs", exc)
            stats["warm_prefill_error"] = repr(exc)[:200]
            return
        stats["warm_prefill_s"] = round(time.monotonic() - t0, 4)

    def _warm_prefill_forwards(self, dev: torch.device, vocab: int, tokens: int,
                               chunk: int) -> None:
        from transformers import DynamicCache

        with torch.inference_mode():
            ids = torch.randint(0, max(vocab, 2), (1, tokens + chunk), device=dev)
            kv = DynamicCache()
            self.model(input_ids=ids[:, :tokens], position_ids=torch.arange(
                tokens, device=dev)[None], past_key_values=kv, use_cache=True, **self._keep())
            self.model(input_ids=ids[:, tokens:], position_ids=torch.arange(
                tokens, tokens + chunk, device=dev)[None], past_key_values=kv, use_cache=True,
                **self._keep())
            del kv
            rows = ids[:, :chunk].expand(2, chunk).contiguous()
            mask = torch.ones_like(rows)
            mask[1, :chunk // 2] = 0                      # the second row is left-padded
            self.model(input_ids=rows, attention_mask=self._prefill_mask(mask),
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       past_key_values=DynamicCache(), use_cache=True, **self._keep())
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()

    def warm_one(self, active: list[SeqRequest], stats: dict) -> bool:
        """Capture the next queued warm-up graph; False when none is left (or graphs went
        off). The capture's own forwards write each active row's next token where its next
        step writes it anyway (the same position, overwritten by that step) and the spare
        rows into free slots, so a batch in progress is not disturbed."""
        if not self.warm_keys or not self.graphs_wanted() or self.cache is None:
            self.warm_keys = []
            return False
        key = self.warm_keys.pop(0)
        graphs = self._graph_set()
        if key not in graphs.graphs:
            try:
                graphs.capture_at(key, active)
            except Exception as exc:  # noqa: BLE001 - a model whose step cannot be captured
                if is_oom(exc):
                    log.warning("warm-up capture ran out of GPU memory: graphs are captured "
                                "on first use instead")
                    self.warm_keys = []
                    return False
                if self._without_one_kernel(exc, stats):
                    return self.plan_warmup() > 0     # every bucket again, without it
                log.warning("CUDA graph capture of the decode step failed (%s): decoding "
                            "without graphs from now on", exc)
                self.cuda_graphs = False
                self.graphs = None
                self.warm_keys = []
                stats["graph_error"] = repr(exc)[:300]
                return False
            self._warm_n += 1
            stats["warm_captures"] = stats.get("warm_captures", 0) + 1
        if not self.warm_keys:
            self.last_warm = {"graphs": self._warm_n,
                              "seconds": round(time.monotonic() - self._warm_t0, 4)}
            stats["warm_s"] = self.last_warm["seconds"]
        return True

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                view: int) -> torch.Tensor:
        """One decode step of rows ``rows`` (ids [B, 1], pos [B]) -> logits [B, vocab]."""
        cache = self.cache
        cache.bind(rows, pos, view)
        mask = self._mask(pos, view, cache.keys[0].dtype)
        cfg = self.model.config
        prev = cfg._attn_implementation
        if self.decode_attn:
            cfg._attn_implementation = self.decode_attn
        try:
            out = self.model(input_ids=ids, position_ids=pos[:, None],
                             attention_mask=mask, past_key_values=cache,
                             use_cache=True, **self._keep())
        finally:
            if self.decode_attn:
                cfg._attn_implementation = prev
        return out.logits[:, -1, :]

    def _keep(self) -> dict:
        return {self._keep_kw: 1} if self._keep_kw else {}

    # ---- memory ------------------------------------------------------------------------------
    def release(self, keep_prefix_tokens: int = 0) -> None:
        """Drop the KV cache, a half-read context, the stored prefixes (but for the most
        recently used ``keep_prefix_tokens`` of them) and the CUDA graphs. A stable cache gives
        its pages back and is parked with its decode, chunk and prefill graphs (see
        :meth:`_ensure_cache`; their pools stay on the card, as the graphs' own buffers)."""
        c = self.cache
        if c is not None and getattr(c, "stable", None) is not None:
            c.park()
            self.parked = (c, self.graphs, self.chunk_graphs, self.prefill_graphs)
        self.graphs = None
        self.warm_keys = []
        self.prefixes.shrink(keep_prefix_tokens)
        self.cache = None
        self.partial_kv = None
        self.chunk_graphs = None
        self.prefill_graphs = None

    def _stable_here(self, device: torch.device) -> bool:
        if device.type != "cuda" or not self.cuda_graphs:
            return False
        if self._stable is None:
            self._stable = stable_memory.available(device.index or 0)
        return self._stable

    def forget_parked(self) -> None:
        """Drop a parked cache and its graphs (the buffer's finalizer frees the address
        range)."""
        self.parked = None

    def parked_shape(self) -> tuple[int, int] | None:
        """(slots, length) of the parked cache, if any."""
        return (self.parked[0].slots, self.parked[0].length) if self.parked else None

    @property
    def keeps_graphs(self) -> bool:
        """Giving the cache back (a trim) keeps the decode graphs good: the cache is stable."""
        return bool(self._stable)

    def cache_bytes(self) -> int:
        return int(self.cache.nbytes()) if self.cache is not None else 0


# ---- helpers ------------------------------------------------------------------------------------
def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask to add to the scores: 0 where ``allowed``, the dtype's lowest value
    elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def _h2d(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A small host tensor on ``dev`` without a host sync: a GPU gets it from pinned memory,
    copied asynchronously on the current stream (a pageable ``.to(dev)`` waits for the stream
    to drain first: on the legacy default stream, for every model's queued work). The pinned
    block is not reused before its copy ends (torch's host allocator records the copy)."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def _difference(mine: torch.Tensor, theirs: torch.Tensor) -> str:
    """How two tensors differ, for a log line: shapes, or the largest difference against the
    largest magnitude (and whether either holds a NaN or an infinity)."""
    if mine.shape != theirs.shape:
        return f"shape {tuple(mine.shape)} against {tuple(theirs.shape)}"
    a, b = mine.float(), theirs.float()
    bad = "" if bool(torch.isfinite(a).all() and torch.isfinite(b).all()) else \
        ", not all finite"
    return f"largest difference {float((a - b).abs().nan_to_num().max()):.4g} of " \
        f"{float(b.abs().nan_to_num().max()):.4g}{bad}"


def _kv_difference(n_layers: int, mine: Any, theirs: Any) -> str | None:
    """None when every layer's keys and values (``mine(layer)``, ``theirs(layer)``: (keys,
    values)) are close; else the first that is not, and by how much."""
    for layer in range(n_layers):
        for name, m, t in zip("kv", mine(layer), theirs(layer)):
            if not close(m, t):
                return f"layer {layer}'s {name}: " + _difference(m, t)
    return None


def _dynamic_layer(kv: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(kv, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    return kv.key_cache[layer], kv.value_cache[layer]          # older transformers
