"""Continuous batching for the LLM actor: concurrent chats share decode steps.

One :class:`BatchEngine` per LLM actor. Its :meth:`BatchEngine.run` loop runs in one
thread while any sequence is active: between decode steps it admits waiting requests (one
batched, left-padded prefill for all that fit), then steps every active sequence together, samples
each row with its own settings, streams each sequence's new text, and retires sequences that hit
EOS, a stop string, their max_tokens, or whose client went away. The loop returns as soon as
nothing is active and nothing waits; :meth:`BatchEngine.submit` (from the event loop) tells
whether a running loop took the request or a new loop must be started.

The KV cache is one rectangle per layer, ``[slots, kv_heads, length, head_dim]``: each active
sequence owns one slot (rows ``0..B-1``, compacted when one leaves) and its own position, so rows
of different lengths share a step through a per-row write position and an additive
``[B, 1, 1, L]`` attention mask. Admission keeps ``slots x longest reservation`` (prompt +
max_tokens) within ``kv_tokens``, so the cache never outgrows what the GPU grant counted.

On CUDA the decode step of each (batch bucket, length bucket) is captured once as a CUDA graph
(static input buffers, the KV rectangle at fixed addresses). Graphs are keyed on the address of
the weights and on the cache allocation: after the weights left the GPU and came back (evict /
admit), or after the cache grew, they are dropped and captured again on first use.
:meth:`release` frees the cache and the graphs; the actor calls it before the weights are evicted.
"""
from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .messages import Chat, ChatResult

log = logging.getLogger("agile_rag.llm")

#: model families whose decoder takes per-row position_ids, a ready 4D mask and any Cache
#: (full attention everywhere); others keep the plain ``generate`` path.
BATCHABLE_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
LEN_BUCKET = 256          # cache lengths and (on CUDA) attention views grow in these steps
RESERVE_NEW = 512         # new tokens admission reserves for a request without a smaller max_tokens


def batching_supported(model) -> str | None:
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


# ---- attention for the decode step -------------------------------------------------------------
DECODE_ATTN = "agile_grouped_decode"
_registered: bool | None = None


def grouped_decode_attention(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, **kwargs):
    """One new token per row against its rows' keys, without ``repeat_kv``: the query heads of
    each KV head attend as one group, so grouped-query models read each key once instead of
    materialising ``heads / kv_heads`` copies per layer per step. Anything else (prefill, no
    4D mask) goes to transformers' SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    b, h, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, h // hkv, d)            # head i uses KV head i // (h / hkv)
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale + attention_mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)                    # [B, kv_heads, group, D]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def _register_decode_attention() -> bool:
    global _registered
    if _registered is None:
        try:
            from transformers import AttentionInterface
            AttentionInterface.register(DECODE_ATTN, grouped_decode_attention)
            try:
                from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
                AttentionMaskInterface.register(DECODE_ATTN, sdpa_mask)
            except ImportError:
                pass
            _registered = True
        except Exception as exc:  # noqa: BLE001 - older transformers: keep SDPA
            log.info("grouped decode attention unavailable: %s", exc)
            _registered = False
    return _registered


# ---- text: incremental detokenisation, stop strings, streaming --------------------------------
class TextTail:
    """Turns one sequence's tokens into text as they come: decodes only a short window per token,
    cuts at the first stop string, holds back the characters a stop string could still claim,
    and pushes the safe text to the request's stream."""

    def __init__(self, tokenizer, stop: list[str], stream):
        self.tok = tokenizer
        self.stop = list(stop)
        self.stream = stream
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0              # window start (earlier tokens give decode its context)
        self.read = 0                # tokens already turned into text
        self.text = ""
        self.searched = 0            # text before this offset holds no stop string start
        self.emitted = 0
        self.hit_stop = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def windows(self) -> tuple[list[int], list[int]]:
        """The two token windows whose decoded difference is the new text."""
        return self.ids[self.prefix:self.read], self.ids[self.prefix:]

    def add(self, tid: int) -> bool:
        """Append one token; True once a stop string was seen."""
        self.ids.append(tid)
        prev, new = self.windows()
        return self.update(self._decode(prev), self._decode(new))

    def update(self, prev: str, new: str) -> bool:
        """Take the decoded :meth:`windows` after a token was appended to ``ids``."""
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self._extend(new[len(prev):])
            self.prefix, self.read = self.read, len(self.ids)
        if not self.hit_stop:
            self._push(final=False)
        return self.hit_stop

    def _extend(self, piece: str) -> None:
        self.text += piece
        if not self.stop:
            return
        start = max(0, self.searched - self.hold)
        cut = -1
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self.text = self.text[:cut]
            self.hit_stop = True
        self.searched = len(self.text)

    def _push(self, final: bool) -> None:
        safe = len(self.text) if (final or self.hit_stop) else len(self.text) - self.hold
        if safe > self.emitted:
            piece = self.text[self.emitted:safe]
            self.emitted = safe
            if self.stream is not None:
                self.stream.push_threadsafe(piece)

    def finish(self) -> str:
        if not self.hit_stop and self.read < len(self.ids):     # an unfinished character
            prev = self._decode(self.ids[self.prefix:self.read])
            new = self._decode(self.ids[self.prefix:])
            if len(new) > len(prev):
                self._extend(new[len(prev):])
        self._push(final=True)
        return self.text


# ---- one request in the batch ------------------------------------------------------------------
@dataclass(eq=False)
class SeqRequest:
    msg: Chat
    prompt: list[int] | None         # None until the engine's ``prepare`` hook encoded it
    max_new: int
    on_done: Callable[["SeqRequest", Any], None]     # called from the engine thread
    tail: TextTail
    generator: torch.Generator | None = None
    # state while active
    slot: int = -1
    pos: int = 0                  # tokens in the KV cache
    last: int = -1                # sampled token to feed next
    generated: int = 0
    reason: str | None = None
    # trace figures
    submitted: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    steps: int = 0
    max_batch: int = 0
    prefill_batch: int = 0
    prefill_s: float = 0.0
    prefill_chunks: int = 0
    preempted: int = 0

    def context(self) -> list[int]:
        """What a (re-)prefill feeds: the prompt and every token sampled so far."""
        return self.prompt + self.tail.ids

    def reserve(self) -> int:
        """Cache length admission counts for this sequence (it may grow past it: the engine
        then grows the cache, or preempts the newest sequence when the budget is spent)."""
        return len(self.prompt) + self.generated + min(self.max_new - self.generated, RESERVE_NEW)

    def detail(self) -> dict:
        d = {"batch_size": self.max_batch, "steps": self.steps,
             "prefill_batch": self.prefill_batch, "prefill_s": round(self.prefill_s, 4),
             "queue_s": round(max(0.0, (self.admitted or time.monotonic()) - self.submitted), 4)}
        if self.preempted:
            d["preempted"] = self.preempted
        if self.prefill_chunks:
            d["prefill_chunks"] = self.prefill_chunks
        return d


# ---- the KV cache the model writes into -------------------------------------------------------
class _SlotLayer:
    """Duck-typed cache layer (no transformers base class: its abstract API moves between
    versions); the model only calls ``update`` on the cache."""
    is_sliding = False
    is_compileable = True
    is_croppable = False
    supports_early_init = False
    is_initialized = True

    def __init__(self, cache: "SlotCache", idx: int):
        self.cache, self.idx = cache, idx

    def get_seq_length(self) -> int:
        return self.cache.view_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.view_len, 0

    def get_max_length(self) -> int:
        return self.cache.length


def _cache_base():
    from transformers.cache_utils import Cache
    return Cache


def make_slot_cache(n_layers: int, slots: int, kv_heads: int, length: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device):
    Cache = _cache_base()

    class _SlotCache(Cache):
        def __init__(self):
            layers = []
            try:
                Cache.__init__(self, layers=layers)
            except TypeError:                                  # other transformers versions
                self.layers = layers
            self.slots, self.length = slots, length
            shape = (slots, kv_heads, length, head_dim)
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.layers.extend(_SlotLayer(self, i) for i in range(n_layers))
            self.rows: torch.Tensor | None = None   # [B] slot of each row of the step
            self.pos: torch.Tensor | None = None    # [B] where each row writes its new token
            self.view_len = 0                       # keys/values the step attends over

        def bind(self, rows: torch.Tensor, pos: torch.Tensor, view_len: int) -> None:
            self.rows, self.pos, self.view_len = rows, pos, view_len

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *a, **kw):
            k, v = self.keys[layer_idx], self.values[layer_idx]
            b = key_states.shape[0]
            k[self.rows, :, self.pos] = key_states[:, :, 0]
            v[self.rows, :, self.pos] = value_states[:, :, 0]
            return k[:b, :, :self.view_len], v[:b, :, :self.view_len]

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.view_len

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *a) -> tuple[int, int]:
            return self.view_len, 0

        def get_max_cache_shape(self, layer_idx: int = 0) -> int:
            return self.length

        def get_max_length(self, layer_idx: int | None = None) -> int:
            return self.length

        def nbytes(self) -> int:
            return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    return _SlotCache()


# ---- the engine -------------------------------------------------------------------------------
class BatchEngine:
    def __init__(self, model, tokenizer, *, max_batch: int = 32, kv_tokens: int = 16384,
                 prefill_tokens: int = 4096, cuda_graphs: bool = True,
                 min_slice_s: float = 0.5, prefill_chunk: int = 512,
                 prepare: Callable[[SeqRequest], None] | None = None):
        self.model = model
        #: a yield (another model needs the GPU) is honoured once the loop has run this long
        self.min_slice_s = float(min_slice_s)
        #: called in the loop thread for each new request whose ``prompt`` is None: encodes and
        #: checks it (raising answers that request with the error)
        self.prepare = prepare
        self.tokenizer = tokenizer
        self.max_batch = max(1, int(max_batch))
        self.kv_tokens = int(kv_tokens)
        self.prefill_tokens = int(prefill_tokens)
        #: a context longer than this is prefilled alone, this many tokens per loop turn,
        #: with a decode step of the active rows after each chunk (0: in one forward)
        self.prefill_chunk = max(0, int(prefill_chunk))
        self.cuda_graphs = cuda_graphs
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        eos = set(_as_list(getattr(tokenizer, "eos_token_id", None)))
        gen_cfg = getattr(model, "generation_config", None)
        eos |= set(_as_list(getattr(gen_cfg, "eos_token_id", None)))
        self.eos = eos
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = pad if pad is not None else (min(eos) if eos else 0)
        # grouped-query models decode with grouped_decode_attention (no repeat_kv copies)
        self.decode_attn = DECODE_ATTN if (
            self.kv_heads < heads and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and _register_decode_attention()) else None
        params = inspect.signature(model.forward).parameters
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else \
            ("num_logits_to_keep" if "num_logits_to_keep" in params else None)

        self._lock = threading.Lock()
        self._inbox: list[SeqRequest] = []
        self.running = False
        self.hold = False                 # finish the active set, admit nobody (revoke)
        self._abort: BaseException | None = None
        self._yield_asked = False         # another model waits for the GPU: pause soon
        self.yielded = False              # the last loop paused for it (its requests wait)
        self.waiting: collections.deque[SeqRequest] = collections.deque()
        self.active: list[SeqRequest] = []
        self.partial: _Partial | None = None      # a long context being prefilled in chunks
        self.cache = None
        self.graphs: _Graphs | None = None
        # figures
        self.total_steps = 0
        self.run_stats: dict = {}

    # ---- called from the event loop ------------------------------------------------------
    def submit(self, req: SeqRequest) -> bool:
        """Hand a request to the running loop; False when no loop runs (start one)."""
        with self._lock:
            if not self.running:
                return False
            self._inbox.append(req)
            return True

    def start(self, reqs: list[SeqRequest]) -> None:
        """Mark the loop as running (before its thread starts) with these requests queued."""
        with self._lock:
            assert not self.running
            self._inbox.extend(reqs)
            self.running = True
            self._abort = None
            self._yield_asked = self.yielded = False

    def abort(self, exc: BaseException) -> None:
        """Finish every active and waiting request with ``exc`` at the next step; the loop
        then ends (a later ``start`` runs a new one)."""
        self._abort = exc

    def request_yield(self) -> bool:
        """Another model waits for the GPU: at a step boundary, once the loop has run
        ``min_slice_s``, every active sequence goes back to the queue (to be prefilled again
        with what it generated so far: its stream just pauses) and the loop ends with
        ``yielded`` set. False when no loop runs."""
        with self._lock:
            if not self.running:
                return False
            self._yield_asked = True
            return True

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self.waiting)

    # ---- the loop (one executor thread) ----------------------------------------------------
    def run(self) -> dict:
        t0 = time.monotonic()
        stats = {"steps": 0, "tokens": 0, "max_batch": 0, "prefills": 0, "captures": 0}
        self.run_stats = stats
        try:
            with torch.inference_mode():
                self._check_device()
                while True:
                    with self._lock:
                        new, self._inbox = self._inbox, []
                        if self._abort is not None:       # stopped: answer everyone, end
                            self.waiting.extend(new)
                            self._fail_all(self._abort)
                            self._abort = None
                            self.running = False
                            break
                        if not new and not self.active and self.partial is None and \
                                (not self.waiting or self.hold):
                            self.running = False
                            break
                        if self._yield_asked and time.monotonic() - t0 >= self.min_slice_s:
                            self._inbox = new             # prepared when the loop resumes
                            self._pause_all(stats)
                            stats["yielded"] = True
                            self.yielded = True
                            self.running = False
                            break
                    for req in new:
                        self._accept(req)
                    if not self.hold:
                        self._admit(stats)
                    else:                               # finish the active rows only
                        self._requeue_partial()
                    if self.partial is not None:
                        self._prefill_chunk(stats)
                    if self.active:
                        self._step(stats)
        except BaseException as exc:  # noqa: BLE001 - every request gets the error
            with self._lock:
                self.waiting.extend(self._inbox)
                self._inbox.clear()
                self._fail_all(exc)
                self.running = False
            self.release()
            raise
        stats["seconds"] = round(time.monotonic() - t0, 4)
        if self.graphs is not None:
            stats["graphs"] = len(self.graphs.graphs)
        return stats

    def _pause_all(self, stats: dict) -> None:
        """Every active sequence back to the head of the queue, oldest first (then the one
        being prefilled in chunks, which starts again)."""
        if self._requeue_partial():
            self.waiting[0].preempted += 1
        for req in reversed(self.active):
            req.preempted += 1
            self.waiting.appendleft(req)
        stats["yielded_seqs"] = len(self.active)
        self.active.clear()

    def _longest_active(self) -> int:
        """The cache length the active rows need: each one's reservation or position."""
        return max((max(r.reserve(), r.pos + 1) for r in self.active), default=0)

    def _requeue_partial(self) -> bool:
        """The prompt being prefilled in chunks back to the head of the queue (it starts
        again); False when there is none."""
        if self.partial is None:
            return False
        self.waiting.appendleft(self.partial.req)
        self.partial = None
        return True

    def _accept(self, req: SeqRequest) -> None:
        if req.prompt is None and self.prepare is not None:
            try:
                self.prepare(req)
            except Exception as exc:  # noqa: BLE001 - a bad prompt: answer it, go on
                req.reason = "error"
                _safe_done(req, exc)
                return
        self.waiting.append(req)

    def _fail_all(self, exc: BaseException) -> None:
        self._requeue_partial()
        for req in list(self.active) + list(self.waiting):
            req.reason = "error"
            _safe_done(req, exc)
        self.active.clear()
        self.waiting.clear()

    def _check_device(self) -> None:
        p = next(self.model.parameters())
        if self.cache is not None and self.cache.keys[0].device != p.device:
            self.release()
        if self.graphs is not None and not self.graphs.valid_for(self.model, self.cache):
            self.graphs = None

    # ---- admission and prefill -----------------------------------------------------------------
    def _admit(self, stats: dict) -> None:
        take: list[SeqRequest] = []
        longest = self._longest_active()
        held = len(self.active)               # rows the cache must keep (+ a chunked prefill)
        if self.partial is not None:
            longest, held = max(longest, self.partial.req.reserve()), held + 1
        pad_len = 0
        # while other chats stream, one prefill forward stays within a chunk (they stall
        # for it); with nobody streaming, up to prefill_tokens at once
        limit = self.prefill_tokens
        if held and self.prefill_chunk:
            limit = min(limit, self.prefill_chunk)
        while self.waiting and held + len(take) < self.max_batch:
            req = self.waiting[0]
            if req.msg.cancel.is_set():
                self.waiting.popleft()
                req.reason = "cancelled"
                self._finish(req)
                continue
            n = held + len(take) + 1
            lng = max(longest, req.reserve())
            if self.prefill_chunk and len(req.context()) > self.prefill_chunk:
                # a long context: prefilled alone, a chunk per loop turn (one at a time)
                if not take and self.partial is None and \
                        not (self.active and n * lng > self.kv_tokens):
                    self.waiting.popleft()
                    req.admitted = req.admitted or time.monotonic()
                    req.prefill_batch = max(req.prefill_batch, 1)
                    self.partial = _Partial(req, _new_dynamic_cache())
                break
            plen = max(pad_len, len(req.context()))
            if (held or take) and (n * lng > self.kv_tokens or
                                   plen * (len(take) + 1) > limit):
                break
            self.waiting.popleft()
            take.append(req)
            longest, pad_len = lng, plen
        if not take:
            return
        now = time.monotonic()
        for req in take:
            req.admitted = req.admitted or now
            req.prefill_batch = max(req.prefill_batch, len(take))
        self._ensure_cache(len(self.active) + len(take), longest)
        self._prefill(take)
        stats["prefills"] += 1
        for req in take:
            req.prefill_s += time.monotonic() - now

    def _prefill_chunk(self, stats: dict) -> None:
        """The next chunk of the long context being prefilled; after the last one the
        sequence takes a slot (its KV copied in) and its first token, like any prefill."""
        p = self.partial
        req = p.req
        if req.msg.cancel.is_set():
            self.partial = None
            req.reason = "cancelled"
            self._finish(req)
            return
        t0 = time.monotonic()
        ctx = req.context()
        start, end = p.done, min(len(ctx), p.done + self.prefill_chunk)
        dev = next(self.model.parameters()).device
        ids = torch.tensor([ctx[start:end]], dtype=torch.long, device=dev)
        mask = torch.ones((1, end), dtype=torch.long, device=dev)
        positions = torch.arange(start, end, dtype=torch.long, device=dev)[None]
        kwargs = {self._keep_kw: 1} if self._keep_kw else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=p.kv, use_cache=True, **kwargs)
        p.done = end
        stats["prefill_chunks"] = stats.get("prefill_chunks", 0) + 1
        req.prefill_chunks += 1
        if end < len(ctx):
            req.prefill_s += time.monotonic() - t0
            return
        self.partial = None
        longest = max(self._longest_active(), req.reserve())
        self._ensure_cache(len(self.active) + 1, longest)
        slot, n = len(self.active), len(ctx)
        for layer in range(self.n_layers):
            k, v = _dynamic_layer(p.kv, layer)
            self.cache.keys[layer][slot, :, :n] = k[0]
            self.cache.values[layer][slot, :, :n] = v[0]
        req.slot, req.pos = slot, n
        self.active.append(req)
        stats["prefills"] += 1
        tokens = self._sample(out.logits[:, -1, :], [req])
        req.prefill_s += time.monotonic() - t0
        self._take_tokens([req], tokens)

    def _ensure_cache(self, slots: int, length: int) -> None:
        """A cache with at least ``slots`` rows of ``length`` tokens; growing keeps the active
        rows. On CUDA the whole budget is taken at once (the grant counted it, and fewer
        re-allocations mean fewer graph captures); on the CPU rows grow by powers of two."""
        p = next(self.model.parameters())
        c = self.cache
        if c is not None and c.slots >= slots and c.length >= length:
            return
        length = _round_up(max(length, c.length if c is not None else 0), LEN_BUCKET)
        fit = max(1, self.kv_tokens // length)
        want = max(slots, c.slots if c is not None and c.slots * length <= self.kv_tokens else 0)
        spare = fit if p.device.type == "cuda" else _pow2(want)
        slots = max(want, min(self.max_batch, spare, fit))
        new = make_slot_cache(self.n_layers, slots, self.kv_heads, length, self.head_dim,
                              p.dtype, p.device)
        if c is not None:
            b = len(self.active)
            for i in range(self.n_layers):
                new.keys[i][:b, :, :c.length].copy_(c.keys[i][:b])
                new.values[i][:b, :, :c.length].copy_(c.values[i][:b])
        self.graphs = None                   # captured against the old addresses
        self.cache = new
        self.run_stats["cache_mb"] = round(new.nbytes() / 2**20, 1)
        log.debug("KV cache: %d slots x %d tokens (%.1f MB)", slots, length, new.nbytes() / 2**20)

    def _make_room(self) -> None:
        """Before a step: every row needs a place for its next token. Grow the cache; when the
        budget cannot hold every active row that long, the newest rows leave and wait to be
        prefilled again with what they generated so far (their streams just pause)."""
        need = max(r.pos for r in self.active) + 1
        if need <= self.cache.length:
            return
        length = _round_up(need, LEN_BUCKET)
        while len(self.active) > 1 and len(self.active) * length > self.kv_tokens:
            newest = max(self.active, key=lambda r: (r.admitted, r.slot))
            newest.reason = "preempt"
            self._retire()
        self._ensure_cache(len(self.active), length)

    def _prefill(self, reqs: list[SeqRequest]) -> None:
        from transformers import DynamicCache

        dev = self.cache.keys[0].device
        n = len(reqs)
        contexts = [r.context() for r in reqs]
        lp = max(len(c) for c in contexts)
        ids = torch.full((n, lp), self.pad, dtype=torch.long)
        mask = torch.zeros((n, lp), dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, lp - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[i, lp - len(c):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
        kv = DynamicCache()
        kwargs = {self._keep_kw: 1} if self._keep_kw else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=kv, use_cache=True, **kwargs)
        logits = out.logits[:, -1, :]
        first = len(self.active)
        slots = torch.arange(first, first + n, device=dev)
        lens = torch.tensor([len(c) for c in contexts], device=dev)
        # row i's tokens sit at the right end: shift them to the start of its slot
        src = (torch.arange(lp, device=dev)[None, :] + (lp - lens)[:, None]).clamp(max=lp - 1)
        for layer in range(self.n_layers):
            k, v = _dynamic_layer(kv, layer)
            idx = src[:, None, :, None].expand(n, k.shape[1], lp, k.shape[3])
            self.cache.keys[layer][slots, :, :lp] = k.gather(2, idx)
            self.cache.values[layer][slots, :, :lp] = v.gather(2, idx)
        del kv, out
        for i, r in enumerate(reqs):
            r.slot = first + i
            r.pos = len(contexts[i])
            self.active.append(r)
        tokens = self._sample(logits, reqs)
        self._take_tokens(reqs, tokens)

    # ---- decoding ----------------------------------------------------------------------------
    def _step(self, stats: dict) -> None:
        for req in self.active:
            if req.msg.cancel.is_set():
                req.reason = "cancelled"
        self._retire()
        if not self.active:
            return
        self._make_room()
        b = len(self.active)
        dev = self.cache.keys[0].device
        ids = torch.tensor([r.last for r in self.active], dtype=torch.long)
        pos = torch.tensor([r.pos for r in self.active], dtype=torch.long)
        view = max(r.pos for r in self.active) + 1
        logits = None
        if dev.type == "cuda" and self.cuda_graphs:
            if self.graphs is None:
                self.graphs = _Graphs(self)
            try:
                logits = self.graphs.run(ids, pos, view, stats)
            except Exception as exc:  # noqa: BLE001 - a model whose step cannot be captured
                if _is_oom(exc):
                    raise
                log.warning("CUDA graph capture of the decode step failed (%s): decoding "
                            "without graphs from now on", exc)
                self.cuda_graphs = False
                self.graphs = None
                stats["graph_error"] = repr(exc)[:300]
        if logits is None:
            logits = self._forward(ids.to(dev)[:, None], pos.to(dev),
                                   torch.arange(b, device=dev), view)
        for r in self.active:
            r.pos += 1
            r.steps += 1
            r.max_batch = max(r.max_batch, b)
        tokens = self._sample(logits, self.active)
        self._take_tokens(self.active, tokens)
        stats["steps"] += 1
        stats["max_batch"] = max(stats["max_batch"], b)
        self.total_steps += 1

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                 view: int) -> torch.Tensor:
        """One decode step of rows ``rows`` (ids [B, 1], pos [B]) -> logits [B, vocab]."""
        cache = self.cache
        cache.bind(rows, pos, view)
        dtype = cache.keys[0].dtype
        allowed = torch.arange(view, device=pos.device)[None, :] <= pos[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        kwargs = {self._keep_kw: 1} if self._keep_kw else {}
        cfg = self.model.config
        prev = cfg._attn_implementation
        if self.decode_attn:
            cfg._attn_implementation = self.decode_attn
        try:
            out = self.model(input_ids=ids, position_ids=pos[:, None],
                             attention_mask=mask[:, None, None, :], past_key_values=cache,
                             use_cache=True, **kwargs)
        finally:
            if self.decode_attn:
                cfg._attn_implementation = prev
        return out.logits[:, -1, :]

    def _sample(self, logits: torch.Tensor, reqs: list[SeqRequest]) -> list[int]:
        logits = logits.float()
        out = logits.argmax(dim=-1)
        rows = [i for i, r in enumerate(reqs) if r.msg.temperature > 0]
        if rows:
            dev = logits.device
            idx = torch.tensor(rows, device=dev)
            temps = torch.tensor([reqs[i].msg.temperature for i in rows], device=dev)
            probs = torch.softmax(logits[idx] / temps[:, None], dim=-1)
            top_p = [reqs[i].msg.top_p for i in rows]
            if any(p < 1.0 for p in top_p):
                probs = _top_p(probs, torch.tensor(top_p, device=dev))
            free = [j for j, i in enumerate(rows) if reqs[i].msg.seed is None]
            if free:
                picks = torch.multinomial(probs[free], 1)[:, 0]
                out[idx[free]] = picks
            for j, i in enumerate(rows):
                req = reqs[i]
                if req.msg.seed is None:
                    continue
                gen = req.generator
                if gen is None or gen.device.type != dev.type:
                    gen = req.generator = _generator(dev, req.msg.seed)
                out[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        return out.tolist()

    def _take_tokens(self, reqs: list[SeqRequest], tokens: list[int]) -> None:
        self.run_stats["tokens"] = self.run_stats.get("tokens", 0) + len(tokens)
        texts: list[SeqRequest] = []
        for req, tid in zip(reqs, tokens):
            req.last = tid
            if req.msg.cancel.is_set():
                req.reason = "cancelled"
            elif tid in self.eos:
                req.reason = "stop"
            else:
                req.generated += 1
                req.tail.ids.append(tid)
                texts.append(req)
        if texts:                         # one tokenizer call for every row's two windows
            windows = [w for req in texts for w in req.tail.windows()]
            decoded = self._batch_decode(windows)
            for i, req in enumerate(texts):
                if req.tail.update(decoded[2 * i], decoded[2 * i + 1]):
                    req.reason = "stop"
                elif req.generated >= req.max_new:
                    req.reason = "length"
        self._retire()

    def _batch_decode(self, windows: list[list[int]]) -> list[str]:
        batch = getattr(self.tokenizer, "batch_decode", None)
        if batch is not None:
            return batch(windows, skip_special_tokens=True)
        return [self.tokenizer.decode(w, skip_special_tokens=True) for w in windows]

    def _retire(self) -> None:
        """Finish sequences with a reason; the last row moves into each freed slot."""
        i = 0
        while i < len(self.active):
            req = self.active[i]
            if req.reason is None:
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:
                moved = self.active[last]
                for layer in range(self.n_layers):
                    self.cache.keys[layer][i].copy_(self.cache.keys[layer][last])
                    self.cache.values[layer][i].copy_(self.cache.values[layer][last])
                moved.slot = i
                self.active[i] = moved
            self.active.pop()
            if req.reason == "preempt":           # back to the head of the queue
                req.reason = None
                req.preempted += 1
                self.waiting.appendleft(req)
            else:
                self._finish(req)

    def _finish(self, req: SeqRequest) -> None:
        text = req.tail.finish()
        _safe_done(req, ChatResult(text, req.reason or "stop", len(req.prompt), req.generated))

    # ---- memory ------------------------------------------------------------------------------
    def release(self) -> None:
        """Drop the KV cache and the CUDA graphs (never while the loop runs)."""
        self.graphs = None
        self.cache = None

    def cache_bytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0


class _Graphs:
    """CUDA graphs of the decode step, one per (batch bucket, view-length bucket), sharing one
    memory pool; inputs go through static buffers, logits come out in one static buffer."""

    def __init__(self, engine: BatchEngine):
        self.engine = engine
        cache = engine.cache
        self.cache_id = id(cache)
        self.weights_ptr = next(engine.model.parameters()).data_ptr()
        dev = cache.keys[0].device
        s = cache.slots
        self.ids = torch.zeros((s, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((s,), dtype=torch.long, device=dev)
        self.rows = torch.arange(s, device=dev)
        self.logits: torch.Tensor | None = None
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def valid_for(self, model, cache) -> bool:
        return cache is not None and id(cache) == self.cache_id and \
            next(model.parameters()).data_ptr() == self.weights_ptr

    def run(self, ids: torch.Tensor, pos: torch.Tensor, view: int, stats: dict) -> torch.Tensor:
        e = self.engine
        b = ids.shape[0]
        bb = min(_pow2(b), e.cache.slots)
        vv = min(_round_up(view, LEN_BUCKET), e.cache.length)
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
        return self.logits[:b]

    def _body(self, bb: int, vv: int) -> torch.Tensor:
        return self.engine._forward(self.ids[:bb], self.pos[:bb], self.rows[:bb], vv)

    def _capture(self, bb: int, vv: int) -> torch.cuda.CUDAGraph:
        t0 = time.monotonic()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):                   # warm up kernels and the allocator
                out = self._body(bb, vv)
        torch.cuda.current_stream().wait_stream(side)
        if self.logits is None:
            self.logits = torch.empty((self.engine.cache.slots, out.shape[-1]), dtype=out.dtype,
                                      device=out.device)
        del out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._body(bb, vv)
            self.logits[:bb].copy_(out)
        del out
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(bb, vv)] = graph
        log.debug("captured decode graph batch=%d len=%d in %.3fs", bb, vv, time.monotonic() - t0)
        return graph


# ---- helpers ------------------------------------------------------------------------------------
def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass(eq=False)
class _Partial:
    """A long context being prefilled in chunks: its KV so far and how many tokens it holds."""
    req: SeqRequest
    kv: Any
    done: int = 0


def _new_dynamic_cache():
    from transformers import DynamicCache
    return DynamicCache()


def _dynamic_layer(kv, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(kv, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    return kv.key_cache[layer], kv.value_cache[layer]          # older transformers


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p          # mass of the tokens ranked higher
    sorted_p = sorted_p.masked_fill(before > top_p[:, None], 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


def _safe_done(req: SeqRequest, res: Any) -> None:
    try:
        req.on_done(req, res)
    except Exception:  # noqa: BLE001 - one bad callback must not stop the batch
        log.exception("reply callback failed")


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _as_list(v: Any) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple, set)) else [v]
