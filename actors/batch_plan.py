"""The batch planner: pure bookkeeping of the continuous batch, no torch.

It decides which chats to admit (within ``max_batch`` and the KV budget), how much of a long
prompt to read this turn (chunked prefill), when the KV cache must grow, who is preempted when
the budget cannot hold every row, who pauses on a yield, and what retires. Each decision comes
back as a typed :class:`StepPlan`; the runner (actors/batch_runner.py) executes it on the model
and the engine (actors/llm_batching.py) tells the planner what came of it (tokens, reasons).
So the policy is tested on its own with fake token counts (tests/test_batch_plan.py).

The KV cache is one rectangle ``slots x length``. Each active sequence owns one slot: rows
``0..B-1``, compacted when one leaves (the last row moves into the freed slot: a ``move``).
Admission keeps ``slots x longest reservation`` (prompt + max_tokens, at most
``RESERVE_NEW`` new tokens counted ahead) within ``kv_tokens``, so the cache never outgrows what
the GPU grant counted.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .states import FinishReason, StrEnum

LEN_BUCKET = 256          # cache lengths grow in these steps
#: a lone request starts from a stored prefix when it covers at least this many tokens; on
#: a GPU also only when the prefix covers at least half the prompt or the rest is at most
#: PREFIX_GPU_REST tokens (a chunk graph reads it). A GPU's eager chunk after a prefix costs
#: more than the lean prefill of the whole prompt: on the H200 (3B) a 220-token prompt whose
#: first 16 tokens (the chat template's) were stored took 0.035-0.083 s to read that way against
#: 0.017-0.025 s in one prefill, a 900-token one 0.038-0.069 s against 0.019-0.032 s; a
#: 60-token one 0.006 s through a chunk graph against 0.037 s (gpu-h200-s18.md)
PREFIX_MIN_HIT = 16
PREFIX_GPU_REST = 64
RESERVE_NEW = 512         # new tokens admission reserves for a request without a smaller max_tokens


class StepKind(StrEnum):
    PREFILL = "prefill"       # new rows read together, left-padded, in one forward
    CHUNK = "chunk"           # the next chunk of one long context
    DECODE = "decode"         # one token for every active row


#: ``prefill_chunk`` by device when not set: a long prompt is read this many tokens a pass, and
#: on a CPU, while chats stream, new prompts are read at most this many a pass. On a CPU a pass
#: costs about its tokens (512 of a 135M model: ~0.3 s on 2 cores, the stall streaming chats
#: see); on a GPU an eager pass costs its kernel launches first and 512 tokens next to nothing,
#: so a long prompt is read 2048 tokens a pass.
PREFILL_CHUNK_CPU = 512
PREFILL_CHUNK_GPU = 2048


def chunk_tokens(settings: BatchSettings, on_gpu: bool) -> int:
    """``settings.prefill_chunk``, or by device when it is not set (0: a whole context in
    one pass)."""
    c = settings.prefill_chunk
    if c is None:
        return PREFILL_CHUNK_GPU if on_gpu else PREFILL_CHUNK_CPU
    return c


@dataclass(frozen=True, kw_only=True)
class BatchSettings:
    max_batch: int = 32
    kv_tokens: int = 16384
    prefill_tokens: int = 4096
    #: None: by device (PREFILL_CHUNK_CPU / PREFILL_CHUNK_GPU); 0: a long context is read in
    #: one forward
    prefill_chunk: int | None = None
    min_slice_s: float = 0.5
    #: > 0: a yield also waits until the batch has run this many times what its last pause
    #: cost (from the pause to its next decode step), at most MAX_SLICE_S; 0: min_slice_s only
    slice_cost_ratio: float = 0.0
    cuda_graphs: bool = True
    lean_decode: bool = True          # the CPU's lean decode step (actors/llm_lean_decode.py)
    warm_graphs: bool = True          # capture the common graphs after a load / an admit
    prefix_cache_tokens: int = 4096   # prompt prefixes kept for reuse (actors/kv_prefix.py)
    #: 0: the KV cache is one rectangle; else blocks of this many tokens (actors/kv_paged.py):
    #: admission counts the blocks each chat fills, the cache never changes shape
    kv_block: int = 0
    #: the batch loop computes on a CUDA stream of its own (BatchRunner.on_own_stream)
    own_stream: bool = True
    #: the GPU's decode graphs capture the lean step (BatchRunner.decode_body)
    gpu_lean: bool = False
    #: short final chunks (the question after a stored prefix) replay CUDA graphs of the lean
    #: chunk straight into their slot (actors/chunk_graphs.py); on by default (README)
    chunk_graphs: bool = True
    #: a lean prefill pass of a few short prompts replays a CUDA graph captured while idle
    #: (actors/prefill_graphs.py); on by default (README)
    prefill_graphs: bool = True
    #: a GPU's greedy decode steps go one ahead of the host (BatchEngine.ahead)
    decode_ahead: bool = True
    #: a GPU's decode graphs are captured with cuDNN's attention kernels allowed, first
    decode_cudnn: bool = True
    #: a burst's prompts are read by the decode step's lean decoder in one right-padded pass
    #: (BatchRunner._lean_prefill) instead of transformers' forward
    lean_prefill: bool = True
    #: the loop waits for a prompt still being encoded on a prompt thread (in order) even
    #: while it has other work (BatchEngine._still_encoding); off: it goes on without it
    wait_prompts: bool = False
    #: a burst's prefill passes go back to back, no decode step between them, while no row
    #: has decoded yet (BatchEngine._next_pass_first)
    burst_passes: bool = True
    #: a GPU's lean decode step rotates q and k and stores the new keys and values in one
    #: Triton kernel a layer (actors/llm_rope_kv.py) (default on; no Triton: three kernels)
    decode_rope_kv: bool = True


@dataclass(eq=False)
class SeqRequest:
    """One chat in the batch. ``msg`` is the Chat (the planner reads ``msg.cancel``), ``tail``
    its text (the planner reads ``tail.ids``, the tokens generated so far)."""
    msg: Any
    prompt: list[int] | None         # None until the engine's ``prepare`` hook encoded it
    max_new: int
    on_done: Callable[[SeqRequest, Any], object]   # called from the engine thread
    tail: Any
    generator: Any = None             # the runner's torch.Generator of a seeded chat
    owner: Any = None                 # the actor's handle on the request (its envelope)
    #: a grammar the text must follow (actors/llm_grammar.py): ``fill_mask(logits_row)``
    #: before each sample, ``accept(token_id)`` after, ``finished()`` once complete
    constraint: Any = None
    #: where sampling appends ``(token_id, logprob, [(id, logprob), ...])`` per token for a
    #: chat that asked for logprobs (the Chat's own list); None: not asked, nothing computed
    logprobs: list | None = None
    #: the prompt's encoding begun on a prompt thread as the actor took the chat in (a Future;
    #: actors/early_prompts.py): the loop takes its result before anything else reads the
    #: fields ``prepare`` sets
    early: Any = None
    # state while active
    slot: int = -1
    pos: int = 0                  # tokens in the KV cache
    last: int = -1                # sampled token to feed next
    generated: int = 0
    reason: FinishReason | None = None
    # trace figures
    submitted: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    steps: int = 0
    max_batch: int = 0
    prefill_batch: int = 0
    prefill_s: float = 0.0
    prefill_chunks: int = 0
    preempted: int = 0
    prefix_hit: int = 0           # prompt tokens read from a stored prefix (not computed)
    _greedy: bool | None = field(default=None, repr=False)

    @property
    def cancelled(self) -> bool:
        return bool(self.msg.cancel.is_set())

    def plain_greedy(self) -> bool:
        """Sampling is a plain argmax: temperature 0, no penalty, no grammar, no logprobs
        (fixed once the engine prepared the request; asked per row per step)."""
        g = self._greedy
        if g is None:
            if self.prompt is None:
                return False
            m = self.msg
            g = self._greedy = m.temperature <= 0 and \
                not getattr(m, "presence_penalty", 0.0) and \
                not getattr(m, "frequency_penalty", 0.0) and \
                self.constraint is None and self.logprobs is None
        return g

    def context(self) -> list[int]:
        """What a (re-)prefill feeds: the prompt and every token sampled so far."""
        assert self.prompt is not None
        return self.prompt + self.tail.ids

    def context_len(self) -> int:
        """``len(self.context())`` without building the list (the planner asks it of every
        waiting request each time the loop accepts one: ``BatchPlanner.pass_filled``)."""
        assert self.prompt is not None
        return len(self.prompt) + len(self.tail.ids)

    def reserve(self) -> int:
        """Cache length admission counts for this sequence (it may grow past it: the cache
        then grows, or the newest sequence is preempted when the budget is spent)."""
        assert self.prompt is not None
        return len(self.prompt) + self.generated + min(self.max_new - self.generated, RESERVE_NEW)

    def detail(self) -> dict:
        d: dict[str, Any] = {
            "batch_size": self.max_batch, "steps": self.steps,
            "prefill_batch": self.prefill_batch, "prefill_s": round(self.prefill_s, 4),
            "queue_s": round(max(0.0, (self.admitted or time.monotonic()) - self.submitted), 4)}
        if self.preempted:
            d["preempted"] = self.preempted
        if self.prefill_chunks:
            d["prefill_chunks"] = self.prefill_chunks
        if self.prefix_hit:
            d["prefix_hit_tokens"] = self.prefix_hit
        return d


@dataclass(eq=False)
class Partial:
    """A long context being prefilled in chunks: how many of its tokens are read."""
    req: SeqRequest
    done: int = 0


@dataclass(kw_only=True)
class StepPlan:
    """One forward for the runner, and what to do before it. Apply in order: ``moves`` (row
    copies ``src -> dst`` of the KV cache, from retirements), then ``cache`` (make the cache at
    least ``(slots, length)``, keeping the first ``keep`` rows), then the forward."""
    kind: StepKind
    rows: list[SeqRequest]
    moves: list[tuple[int, int]] = field(default_factory=list)
    cache: tuple[int, int] | None = None
    keep: int = 0
    first_slot: int = 0               # PREFILL: rows take slots first_slot.. in order
    start: int = 0                    # CHUNK: context[start:end]
    end: int = 0
    lands: bool = False               # CHUNK: the last one; the row then takes ``first_slot``
    view: int = 0                     # DECODE: keys each row attends over


@dataclass(kw_only=True)
class Retired:
    """Rows that left: ``finished`` get their answer, ``moves`` compact the cache."""
    finished: list[SeqRequest] = field(default_factory=list)
    moves: list[tuple[int, int]] = field(default_factory=list)

    def extend(self, other: Retired) -> None:
        self.finished += other.finished
        self.moves += other.moves


class BatchPlanner:
    def __init__(self, settings: BatchSettings, *, on_gpu: bool = False):
        self.settings = settings
        #: the loop runs on a GPU (set at each loop's start). There the cache takes the whole
        #: budget at once (the grant counted it, and fewer re-allocations mean fewer graph
        #: captures), where on the CPU rows grow by powers of two; and the default chunk is
        #: the GPU's (:meth:`chunk_tokens`)
        self.on_gpu = on_gpu
        self.waiting: collections.deque[SeqRequest] = collections.deque()
        self.active: list[SeqRequest] = []
        self.partial: Partial | None = None
        self.cache: tuple[int, int] | None = None        # (slots, length) the runner holds
        self.parked: tuple[int, int] | None = None       # a shape the runner can take back
        #: tokens of a request's context a stored prefix covers (the runner's prefix store;
        #: None: no store): a lone request with one is read from it (see :meth:`admit`)
        self.prefix_hit: Callable[[SeqRequest], int] | None = None

    # ---- queue -------------------------------------------------------------------------------
    def accept(self, req: SeqRequest) -> None:
        self.waiting.append(req)

    def idle(self, *, draining: bool = False) -> bool:
        """Nothing to compute (while draining, waiting requests do not count)."""
        return not self.active and self.partial is None and (draining or not self.waiting)

    def longest_active(self) -> int:
        """The cache length the active rows need: each one's reservation or position."""
        return max((max(r.reserve(), r.pos + 1) for r in self.active), default=0)

    def requeue_partial(self) -> SeqRequest | None:
        """The prompt being prefilled in chunks back to the head of the queue (it starts
        again); None when there is none."""
        if self.partial is None:
            return None
        req = self.partial.req
        self.waiting.appendleft(req)
        self.partial = None
        return req

    def pause_all(self) -> int:
        """Every active sequence back to the head of the queue, oldest first (then the one
        being prefilled in chunks, which starts again). The cache's rows are void after."""
        req = self.requeue_partial()
        if req is not None:
            req.preempted += 1
        paused = len(self.active)
        for r in reversed(self.active):
            r.preempted += 1
            self.waiting.appendleft(r)
        self.active.clear()
        return paused

    def take_all(self) -> list[SeqRequest]:
        """Every request the planner holds, oldest state first; the planner is empty after."""
        self.requeue_partial()
        out = list(self.active) + list(self.waiting)
        self.active.clear()
        self.waiting.clear()
        return out

    def cache_dropped(self, parked: tuple[int, int] | None = None) -> None:
        """The runner gave its cache back; ``parked``: the shape it can take back at the old
        addresses (its CUDA graphs still good), which the next cache reuses when it fits."""
        self.cache = None
        self.parked = parked

    # ---- paged cache: blocks ------------------------------------------------------------------
    @property
    def paged(self) -> bool:
        return self.settings.kv_block > 0

    def pool_blocks(self) -> int:
        b = self.settings.kv_block
        return -(-self.settings.kv_tokens // b)

    def _blocks(self, n: int) -> int:
        return -(-n // self.settings.kv_block)

    def _blocks_held(self, rows: list[SeqRequest]) -> int:
        """Blocks ``rows`` fill now (active rows) or will (their reservations)."""
        return sum(self._blocks(max(r.reserve(), r.pos + 1)) for r in rows)

    def _over_budget(self, rows: list[SeqRequest], n: int, longest: int) -> bool:
        """Would ``n`` rows (``rows`` among them), the longest ``longest``, exceed the KV
        budget? Paged: the blocks they fill; a rectangle: ``n x longest``."""
        if self.paged:
            return self._blocks_held(rows) > self.pool_blocks()
        return n * longest > self.settings.kv_tokens

    # ---- cache shape ---------------------------------------------------------------------------
    def _grow(self, slots: int, length: int) -> tuple[int, int] | None:
        """The cache shape to allocate so that ``slots`` rows of ``length`` fit, or None when
        the current one does (paged: one shape, made once: every row of the batch x the whole
        pool)."""
        s = self.settings
        c = self.cache
        if self.paged:
            if c is not None:
                return None
            self.cache = (s.max_batch, self.pool_blocks() * s.kv_block)
            return self.cache
        if c is not None and c[0] >= slots and c[1] >= length:
            return None
        p = self.parked
        if c is None and p is not None and p[0] >= slots and p[1] >= length and \
                p[0] * p[1] <= max(s.kv_tokens, p[1]):
            self.cache, self.parked = p, None
            return p
        length = round_up(max(length, c[1] if c is not None else 0), LEN_BUCKET)
        fit = max(1, s.kv_tokens // length)
        want = max(slots, c[0] if c is not None and c[0] * length <= s.kv_tokens else 0)
        spare = fit if self.on_gpu else pow2(want)
        shape = (max(want, min(s.max_batch, spare, fit)), length)
        self.cache = shape
        return shape

    def warm_shape(self) -> tuple[int, int]:
        """The cache a warm-up allocates when none is held: what a short chat's admission
        would make (its graphs are the ones to have ready)."""
        shape = self._grow(1, 2 * LEN_BUCKET)
        assert self.cache is not None
        return shape or self.cache

    # ---- admission -------------------------------------------------------------------------------
    def admit(self) -> tuple[StepPlan | None, list[SeqRequest]]:
        """Waiting requests that fit now: a PREFILL plan (or None), and the requests that were
        cancelled while they waited (to be answered). A long context that fits starts a
        chunked prefill instead (see :meth:`chunk`)."""
        s = self.settings
        take: list[SeqRequest] = []
        cancelled: list[SeqRequest] = []
        longest = self.longest_active()
        held = len(self.active)               # rows the cache must keep (+ a chunked prefill)
        if self.partial is not None:
            longest, held = max(longest, self.partial.req.reserve()), held + 1
        pad_len = 0
        limit, chunk = self.pass_limit(held), self.chunk_tokens()
        holders = list(self.active) + ([self.partial.req] if self.partial is not None else [])
        while self.waiting and held + len(take) < s.max_batch:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                req.reason = FinishReason.CANCELLED
                cancelled.append(req)
                continue
            n = held + len(take) + 1
            lng = max(longest, req.reserve())
            if chunk and req.context_len() > chunk or \
                    self._from_prefix(req, take):
                # a long context: prefilled alone, a chunk per loop turn (one at a time); a
                # lone request a stored prefix serves: from there, in one chunk
                if not take and self.partial is None and \
                        not (self.active and self._over_budget(holders + [req], n, lng)):
                    self.waiting.popleft()
                    req.admitted = req.admitted or time.monotonic()
                    req.prefill_batch = max(req.prefill_batch, 1)
                    self.partial = Partial(req)
                break
            plen = max(pad_len, req.context_len())
            if (held or take) and (self._over_budget(holders + take + [req], n, lng) or
                                   plen * (len(take) + 1) > limit):
                break
            self.waiting.popleft()
            take.append(req)
            longest, pad_len = lng, plen
        if not take:
            return None, cancelled
        now = time.monotonic()
        for req in take:
            req.admitted = req.admitted or now
            req.prefill_batch = max(req.prefill_batch, len(take))
        first = len(self.active)
        shape = self._grow(first + len(take), longest)
        return StepPlan(kind=StepKind.PREFILL, rows=take, cache=shape, keep=first,
                        first_slot=first), cancelled

    def pass_limit(self, held: int) -> int:
        """The most padded prompt tokens one prefill pass reads with ``held`` rows in the
        cache: with nobody streaming, up to ``prefill_tokens`` at once; while other chats
        stream (they stall for the pass), up to :meth:`stream_pass_tokens` too."""
        limit, stream = self.settings.prefill_tokens, self.stream_pass_tokens()
        return min(limit, stream) if held and stream else limit

    def pass_filled(self) -> bool:
        """The waiting requests already fill the next prefill pass (:meth:`admit`'s bounds on
        rows and padded tokens, or a long prompt that is read alone): a request behind them is
        not read in it, so the loop need not encode its prompt before the pass is launched
        (actors/llm_batching.py prepares the rest while the GPU reads it). A budget that stops
        the pass sooner is not looked at: then more are prepared than it reads, as before."""
        s = self.settings
        held = len(self.active) + (self.partial is not None)
        limit, chunk = self.pass_limit(held), self.chunk_tokens()
        longest = 0
        for n, req in enumerate(self.waiting, 1):
            length = req.context_len()
            if chunk and length > chunk:
                return True
            longest = max(longest, length)
            if held + n >= s.max_batch or longest * n >= limit:
                return True
        return False

    def _from_prefix(self, req: SeqRequest, take: list[SeqRequest]) -> bool:
        """``req`` waits alone (a burst is prefilled together, as before) and a stored prefix
        covers at least PREFIX_MIN_HIT of its tokens (on a GPU: and half of them, or all but
        PREFIX_GPU_REST): it goes the chunked way, which starts from the prefix and reads only
        the rest (issue 17: one chat asked again, or one that shares a system prompt, skips
        most of its prefill)."""
        if self.prefix_hit is None or take or self.partial is not None or \
                len(self.waiting) != 1:
            return False
        hit = self.prefix_hit(req)
        if hit < PREFIX_MIN_HIT:
            return False
        if not self.on_gpu:
            return True
        n = req.context_len()
        return 2 * hit >= n or n - hit <= PREFIX_GPU_REST

    def unadmit(self, rows: list[SeqRequest]) -> None:
        """A PREFILL that did not happen: its rows wait again at the head of the queue."""
        self.waiting.extendleft(reversed(rows))

    def seat(self, rows: list[SeqRequest], first_slot: int, lengths: list[int]) -> None:
        """The runner read ``rows`` into slots ``first_slot..``: they are active now."""
        for i, (r, n) in enumerate(zip(rows, lengths)):
            r.slot, r.pos = first_slot + i, n
            self.active.append(r)

    # ---- chunked prefill -----------------------------------------------------------------------
    def chunk_tokens(self) -> int:
        """Tokens a chunked prefill reads a pass (0: a whole context in one): the setting, or by
        device when it is not set."""
        return chunk_tokens(self.settings, self.on_gpu)

    def stream_pass_tokens(self) -> int:
        """The most prompt tokens a prefill pass reads while chats stream (0: no bound but
        ``prefill_tokens``): ``prefill_chunk`` when it is set; else on a CPU its default (a
        CPU's pass costs about its tokens, and the streaming chats stall for it), on a GPU no
        bound but ``prefill_tokens``. A GPU's pass costs its kernel launches and a read of the
        weights before its tokens, and a pass while chats stream also costs them a decode
        step: a burst of 32 prompts of ~220 tokens is read in two passes (17 with nobody
        streaming, then 15), not three (17, then 8 and 7 within 2048-token passes). The
        streaming chats stall as long for the burst's prompts either way (the same tokens are
        read); the burst ends a decode step and a pass sooner (H200, 3B model: 32 chats
        25.2x one chat's tokens/s against 24.9x, benchmarks/results/gpu-h200-s19.md)."""
        c = self.settings.prefill_chunk
        if c is None:
            return 0 if self.on_gpu else PREFILL_CHUNK_CPU
        return c

    def chunk(self) -> tuple[StepPlan | None, SeqRequest | None]:
        """The next chunk of the long context being prefilled (or None), and the request
        when it was cancelled instead. A ``prefill_chunk`` set to 0 while a context is
        half-read finishes it in one forward."""
        p = self.partial
        if p is None:
            return None, None
        req = p.req
        if req.cancelled:
            self.partial = None
            req.reason = FinishReason.CANCELLED
            return None, req
        ctx_len = req.context_len()
        step = self.chunk_tokens() or ctx_len
        start, end = p.done, min(ctx_len, p.done + step)
        plan = StepPlan(kind=StepKind.CHUNK, rows=[req], start=start, end=end)
        if end >= ctx_len:
            plan.lands = True
            plan.first_slot = plan.keep = len(self.active)
            plan.cache = self._grow(len(self.active) + 1,
                                    max(self.longest_active(), req.reserve()))
        return plan, None

    def chunk_done(self, plan: StepPlan) -> None:
        """The runner read ``plan``'s chunk; the last one seats the row."""
        assert self.partial is not None and plan.rows[0] is self.partial.req
        self.partial.done = plan.end
        req = self.partial.req
        req.prefill_chunks += 1
        if plan.lands:
            self.partial = None
            self.seat([req], plan.first_slot, [plan.end])

    # ---- decoding ------------------------------------------------------------------------------
    def decode(self) -> tuple[StepPlan | None, Retired]:
        """One token for every active row: cancelled rows retire first; when a row would
        outgrow the cache, it grows, and while the budget cannot hold every row that long the
        newest rows leave (preempted: back to the queue, to be prefilled again with what they
        generated so far; their streams just pause)."""
        for r in self.active:
            if r.cancelled:
                r.reason = FinishReason.CANCELLED
        gone = self.retire()
        if not self.active:
            return None, gone
        shape = None
        need = max(r.pos for r in self.active) + 1
        if self.paged:
            # every row's next token needs its block: the newest rows leave while the pool
            # cannot hold them all (and what a prompt being read in chunks will fill)
            pending = self._blocks(self.partial.req.reserve()) if self.partial else 0
            while len(self.active) > 1 and pending + sum(
                    self._blocks(r.pos + 1) for r in self.active) > self.pool_blocks():
                newest = max(self.active, key=lambda r: (r.admitted, r.slot))
                gone.moves += self._leave(newest)
                newest.preempted += 1
                self.waiting.appendleft(newest)
            shape = self._grow(len(self.active), need)
        elif self.cache is None or need > self.cache[1]:
            length = round_up(need, LEN_BUCKET)
            while len(self.active) > 1 and len(self.active) * length > self.settings.kv_tokens:
                newest = max(self.active, key=lambda r: (r.admitted, r.slot))
                gone.moves += self._leave(newest)
                newest.preempted += 1
                self.waiting.appendleft(newest)
            shape = self._grow(len(self.active), length)
        plan = StepPlan(kind=StepKind.DECODE, rows=list(self.active), moves=gone.moves,
                        cache=shape, keep=len(self.active), view=need)
        return plan, Retired(finished=gone.finished)

    def stepped(self, rows: list[SeqRequest]) -> None:
        b = len(rows)
        for r in rows:
            r.pos += 1
            r.steps += 1
            r.max_batch = max(r.max_batch, b)

    # ---- retirement ----------------------------------------------------------------------------
    def retire(self) -> Retired:
        """Active rows with a reason leave; the last row moves into each freed slot."""
        out = Retired()
        i = 0
        while i < len(self.active):
            req = self.active[i]
            if req.reason is None:
                i += 1
                continue
            out.moves += self._leave(req)
            out.finished.append(req)
        return out

    def _leave(self, req: SeqRequest) -> list[tuple[int, int]]:
        i = self.active.index(req)
        last = len(self.active) - 1
        moves = []
        if i != last:
            moved = self.active[last]
            moves.append((last, i))
            moved.slot = i
            self.active[i] = moved
        self.active.pop()
        return moves


def net_moves(moves: list[tuple[int, int]], active: int | None = None
              ) -> list[tuple[int, int]]:
    """Row moves (``src -> dst``, in the order a retire made them: a later move may read a
    slot an earlier one wrote) as one set of ``(src, dst)`` pairs, destinations distinct, to
    be read all before any is written: each destination gets what the moves in order would
    have left there. ``active``: only the destinations below it (the rows still in the
    batch; the slots from there on are free)."""
    origin: dict[int, int] = {}
    for src, dst in moves:
        origin[dst] = origin.get(src, src)
    return [(s, d) for d, s in origin.items() if s != d and (active is None or d < active)]


def pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k
