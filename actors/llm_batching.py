"""Continuous batching for the LLM actor: concurrent chats share decode steps.

One :class:`BatchEngine` per LLM actor, made of three parts:

- the planner (actors/batch_plan.py, no torch): who is admitted, how much of a long prompt is
  read this turn, when the cache grows, who is preempted, who pauses, what retires;
- the runner (actors/batch_runner.py): executes each plan on the model (forwards, KV cache,
  CUDA graphs, sampling);
- the text side (actors/text_stream.py): tokens to streamed text, stop strings.

:meth:`BatchEngine.run` runs in the actor's batch thread while there is work. Each turn is
*commands -> plan -> run -> update*: it drains the command queue, then admits waiting requests
(one batched, left-padded prefill), reads the next chunk of a long prompt, and steps every
active sequence together, streaming each one's new text and retiring those that hit EOS, a stop
string, their max_tokens, or whose client went away. It returns when nothing is left to do,
except right after the weights came to the GPU (a load, an admit): then, with CUDA graphs on, it
first captures the decode graphs of the common buckets, one per turn while nothing else is to
be done, so a request that arrives meanwhile waits at most one capture and later bursts find
them ready (a drain, a stop or a waiting model's yield ends the warm-up at once).

On a GPU a decode step's new text is read while the next step computes (``defer_text``): the
tokens' EOS, length and grammar ends are known at once, but the tokenizer's decoding, stop
strings and the streamed pieces of step *t* run after step *t + 1* is launched, so that per-row
Python work hides behind the GPU's instead of adding to each step. A row whose text held a stop
string has computed one more token by then: it is dropped unread (no text, no count, no
logprob). A prompt's first token's text is read at once (time to first token is unchanged), and
a pause or the loop's end reads what is held first.

On a GPU whose decode step replays a CUDA graph, the loop also decodes one step ahead
(``ahead``): when every row samples greedily (no temperature, penalty, grammar or logprobs)
a step's tokens stay on the GPU as the next step's input, the next step is launched before
the host reads them (a pinned copy and an event, no wait), and the host takes step *t*'s
tokens (EOS, lengths, text) while step *t + 1* computes. The step's host work (sampling's
copy, the planner, the launch) then no longer leaves the GPU idle between steps. A row whose
token at *t* ended it (EOS) has computed one more token at *t + 1*, dropped unread like the
stop strings' one; a step is not sent ahead past a row's max_tokens, nor when the batch
changes (an admit, a chunk, a cancel, a cache that must grow): then the tokens are read
first, as without it.

A turn encodes only the new prompts its prefill pass will read (``BatchPlanner.pass_filled``);
the others are encoded after that pass is launched, while the GPU reads it, and before its
tokens are taken (in a turn without a pass, at once: every prompt is checked in the turn that
takes it, so a bad one is answered as soon as before). A prompt the LLM actor's prompt threads
began encoding as the chat arrived (``llm_params.prompt_threads``, actors/early_prompts.py) is
taken from them at the same place; one still being encoded is waited for only when the loop has
nothing else to do (else the pass goes with the prompts before it, and the rows decode on:
:meth:`BatchEngine._still_encoding`; ``llm_params.wait_for_prompts`` waits, as before). Each
turn's calls to the event loop (every row's new text, each accepted prompt's go-ahead for its
headers) go in one wake-up (runtime/loop_calls.py).

The event loop steers the loop only through one queue of commands (:class:`Submit`,
:class:`YieldGpu`, :class:`Drain`, :class:`Stop`, :class:`Configure`), drained between steps.
No attribute of the engine is written from two threads: ``running``, ``settings`` (the
event loop's view) and the requests submitted while no loop ran belong to the event loop; the
planner, the runner, ``yielded`` and the run's figures belong to the loop. While no loop runs
(after the loop's thread returned, which the event loop learns from its future) the event loop
may hand requests over with :meth:`take_unanswered` / :meth:`adopt` or fail them with
:meth:`fail_all`. A chat's own ``cancel`` event (set by its HTTP handler) is read at step
boundaries.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..runtime.loop_calls import held_calls
from . import sampling
from .batch_plan import BatchPlanner, BatchSettings, SeqRequest, chunk_tokens
from .batch_runner import BatchRunner, batching_supported
from .early_prompts import prepared
from .loop_timing import LoopTiming
from .messages import ChatResult
from .states import FinishReason
from .text_stream import TextTail, advance
from .torch_util import as_list

__all__ = ["BatchEngine", "BatchSettings", "SeqRequest", "TextTail", "batching_supported"]

log = logging.getLogger("agile_rag.llm")


#: the longest slice a cost-aware yield waits for (``slice_cost_ratio``)
MAX_SLICE_S = 5.0
#: a pause longer than this is not a yield's cost (the chats left and others came later)
PAUSE_SAMPLE_MAX_S = 30.0


# ---- commands (event loop -> loop thread) ----------------------------------------------------
@dataclass(frozen=True)
class Submit:
    req: SeqRequest


@dataclass(frozen=True)
class YieldGpu:
    """Another model waits for the GPU: once the loop has run its slice (``yield_after_s``),
    every active sequence goes back to the queue and the loop ends with ``yielded`` set."""


@dataclass(frozen=True)
class Drain:
    """Finish the active rows, admit nobody, then end (the weights are about to move)."""


@dataclass(frozen=True)
class Stop:
    """Answer every request with ``error`` and end."""
    error: BaseException


@dataclass(frozen=True)
class Configure:
    """New settings, applied between steps; what is half done keeps working (a prompt being
    read in chunks finishes with the new chunk size, or in one forward when it is 0)."""
    values: dict


Command = Submit | YieldGpu | Drain | Stop | Configure


#: admits that took new GPU allocator segments, listed in a loop's stats (the first ones)
ALLOC_SHAPES_KEPT = 8
#: the longest a burst's next pass waits for a prompt still being encoded on a prompt thread
#: (BatchEngine._bursting; a 220-token prompt takes well under a millisecond)
BURST_ENCODE_WAIT_S = 0.005


@dataclass(eq=False)
class _Ahead:
    """A decode step launched, its tokens not read yet (see ``BatchEngine.ahead``): its rows in
    the step's order, its greedy tokens on the device (the next step's ids), their host copy
    and the event that says the copy is done, and the step's timing mark."""
    rows: list[SeqRequest]
    tokens: torch.Tensor
    host: torch.Tensor
    ready: Any
    mark: Any


class BatchEngine:
    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 32,
                 kv_tokens: int = 16384, prefill_tokens: int = 4096, cuda_graphs: bool = True,
                 min_slice_s: float = 0.5, prefill_chunk: int | None = None,
                 warm_graphs: bool = True, prefix_cache_tokens: int = 4096, kv_block: int = 0,
                 slice_cost_ratio: float = 0.0, lean_decode: bool = True,
                 own_stream: bool = True, gpu_lean: bool = False, chunk_graphs: bool = True,
                 prefill_graphs: bool = True, decode_ahead: bool = True, decode_cudnn: bool = True,
                 lean_prefill: bool = True, wait_prompts: bool = False,
                 burst_passes: bool = True, decode_rope_kv: bool = True,
                 prepare: Callable[[SeqRequest], None] | None = None,
                 accepted: Callable[[SeqRequest], None] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        #: called in the loop thread (inside its turn's held calls) for each request whose
        #: prompt this loop prepared or took from a prompt thread: the prompt is accepted
        self.accepted = accepted
        #: called in the loop thread for each new request whose ``prompt`` is None: encodes and
        #: checks it (raising answers that request with the error)
        self.prepare = prepare
        self.settings = _settings(BatchSettings(), dict(
            max_batch=max_batch, kv_tokens=kv_tokens, prefill_tokens=prefill_tokens,
            cuda_graphs=cuda_graphs, min_slice_s=min_slice_s, prefill_chunk=prefill_chunk,
            warm_graphs=warm_graphs, prefix_cache_tokens=prefix_cache_tokens,
            kv_block=kv_block, slice_cost_ratio=slice_cost_ratio, lean_decode=lean_decode,
            own_stream=own_stream, gpu_lean=gpu_lean, chunk_graphs=chunk_graphs,
            prefill_graphs=prefill_graphs, decode_ahead=decode_ahead,
            decode_cudnn=decode_cudnn, lean_prefill=lean_prefill, wait_prompts=wait_prompts,
            burst_passes=burst_passes, decode_rope_kv=decode_rope_kv))
        #: what a yield cost the chats: from the pause to the next loop's first decode step
        #: (the GPU given back and taken again, graphs, the paused text read again), averaged
        self.pause_s = 0.0
        self._paused_at: float | None = None
        eos = set(as_list(getattr(tokenizer, "eos_token_id", None)))
        gen_cfg = getattr(model, "generation_config", None)
        eos |= set(as_list(getattr(gen_cfg, "eos_token_id", None)))
        self.eos = eos
        pad = getattr(tokenizer, "pad_token_id", None)
        self.planner = BatchPlanner(self.settings)
        self.runner = BatchRunner(model, pad=pad if pad is not None else (min(eos) if eos else 0),
                                  cuda_graphs=self.settings.cuda_graphs,
                                  kv_block=self.settings.kv_block)
        self.runner.prefixes.budget_tokens = self.settings.prefix_cache_tokens
        prefixes = self.runner.prefixes
        self.planner.prefix_hit = lambda req: prefixes.lookup(req.context())[1]
        if not self.settings.lean_decode:
            self.runner.lean = False
        if self.settings.gpu_lean:
            self.runner.gpu_lean = None               # tried at the first capture
        self.runner.chunk_graphs_on = self.settings.chunk_graphs
        self.runner.prefill_graphs_on = self.settings.prefill_graphs
        self.runner.graph_cudnn = self.settings.decode_cudnn
        self.runner.rope_kv = self.settings.decode_rope_kv
        self.runner.lean_prefill_on = self.settings.lean_prefill
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._unprepared: list[SeqRequest] = []      # submitted while no loop ran
        #: (the loop's) submitted to the running loop, prompts not yet prepared (in order)
        self._arrived: list[SeqRequest] = []
        self.timing = LoopTiming(False)              # the running loop's (actors/loop_timing)
        self.running = False          # event loop only: a loop was started and has not ended
        self.yielded = False          # the last loop paused for a waiting model
        self.warming = False          # (the loop's) the graphs of this grant are being warmed
        self._warm_planned = False    # (the loop's) the warm-up's captures are queued
        #: (the loop's) the runner's graph set (its ``graph_sets`` count) the last warm-up
        #: finished for: a set started since (a cache made anew mid-loop, its first graph
        #: captured by a step) is warmed when the loop is next idle
        self._warmed_set = -1
        #: a decode step's new text is read while the next step computes (the tokens' stop
        #: strings, the streamed pieces: the loop's per-row Python work in the GPU's shadow);
        #: None: on a GPU only (a CPU computes the step in the loop's own thread: nothing to
        #: overlap)
        self.defer_text: bool | None = None
        self._deferring = False
        self._pending: list[SeqRequest] = []    # (the loop's) rows whose last text is unread
        #: decode one step ahead (module docstring): None: on a GPU whose step replays a CUDA
        #: graph, unless ``llm_params.decode_ahead`` is false; True: wherever the rows sample
        #: greedily (tests); False: never
        self.ahead: bool | None = None
        self._ahead: _Ahead | None = None       # (the loop's) the step whose tokens are unread
        self._ahead_read_at = 0.0               # (the loop's) when the last one was read
        # figures
        self.total_steps = 0
        self.run_stats: dict = {}
        self._run_t0 = 0.0                   # monotonic start of the running loop

    # ---- read-only views (tests, /admin) ----------------------------------------------------
    @property
    def active(self) -> list[SeqRequest]:
        return self.planner.active

    @property
    def waiting(self) -> Any:
        return self.planner.waiting

    @property
    def partial(self) -> Any:
        return self.planner.partial

    @property
    def cache(self) -> Any:
        return self.runner.cache

    @property
    def kv_tokens(self) -> int:
        return self.settings.kv_tokens

    @property
    def prefill_chunk(self) -> int:
        """A long prompt's tokens a pass, as the event loop last set it. (Not the planner's
        copy: that is the loop's and changes only when a loop applies the setting; a test
        that saved it from there just after another test's restore saved the stale value,
        16, and restored that.)"""
        return chunk_tokens(self.settings, self.planner.on_gpu)

    @property
    def prefill_tokens(self) -> int:
        return self.settings.prefill_tokens

    @property
    def min_slice_s(self) -> float:
        return self.settings.min_slice_s

    def yield_after_s(self) -> float:
        """How long a loop runs before it pauses for a waiting model: ``min_slice_s``, or,
        with ``slice_cost_ratio``, that many times what the last pauses cost (at most
        MAX_SLICE_S), so that pausing never takes more than 1 / (1 + ratio) of the chats'
        GPU time however often other models want the card."""
        s = self.settings
        return max(s.min_slice_s, min(MAX_SLICE_S, s.slice_cost_ratio * self.pause_s))

    # ---- called from the event loop ------------------------------------------------------
    def submit(self, req: SeqRequest) -> bool:
        """Queue a request; False when no loop runs (the caller starts one)."""
        self._commands.put(Submit(req))
        return self.running

    def request_yield(self) -> bool:
        """Ask a running loop to pause for a waiting model; False when none runs."""
        if not self.running:
            return False
        self._commands.put(YieldGpu())
        return True

    def drain(self) -> None:
        self._commands.put(Drain())

    def abort(self, exc: BaseException) -> None:
        self._commands.put(Stop(exc))

    def configure(self, **values: Any) -> None:
        """New settings: at the next step boundary of a running loop, or at once when none
        runs."""
        self.settings = _settings(self.settings, values)
        self._commands.put(Configure(values))

    def start(self) -> None:
        """Mark a loop as started (before its thread runs :meth:`run`): the requests that
        waited for it go to its queue."""
        assert not self.running
        self.running = True
        for req in self._unprepared:
            self._commands.put(Submit(req))
        self._unprepared = []

    def ended(self) -> None:
        """The loop's thread returned (its result was seen on the event loop)."""
        self.running = False

    def apply_idle_commands(self) -> None:
        """(no loop runs) Take what was sent after the last loop looked: settings apply,
        requests wait for the next loop, a stop fails everything, a yield is moot."""
        assert not self.running
        for cmd in self._drain_queue():
            if isinstance(cmd, Submit):
                self._unprepared.append(cmd.req)
            elif isinstance(cmd, Configure):
                self._apply(cmd.values)
            elif isinstance(cmd, Stop):
                self.fail_all(cmd.error)

    @property
    def pending(self) -> int:
        """(no loop runs) Requests that wait for a loop."""
        assert not self.running
        self.apply_idle_commands()
        return len(self._unprepared) + len(self.planner.waiting)

    def take_unanswered(self) -> list[SeqRequest]:
        """(no loop runs) Every request not answered yet, oldest first, for a successor;
        this engine holds none after."""
        self.apply_idle_commands()
        self.runner.drop_partial()
        out = self.planner.take_all() + self._unprepared
        self._unprepared = []
        return out

    def adopt(self, reqs: list[SeqRequest]) -> None:
        """(no loop runs) Requests a predecessor did not answer: they wait here, in order."""
        for r in reqs:
            (self._unprepared if r.prompt is None or r.early is not None
             else self.planner.waiting).append(r)

    def fail_all(self, exc: BaseException) -> None:
        """(no loop runs) Answer every request this engine holds with ``exc``."""
        reqs, self._unprepared = self._unprepared, []
        self._fail(exc, reqs)

    def _fail(self, exc: BaseException, reqs: list[SeqRequest]) -> None:
        """``reqs``, every request of the planner and every queued submit get ``exc``."""
        reqs = reqs + self.planner.take_all()
        reqs += [c.req for c in self._drain_queue() if isinstance(c, Submit)]
        self.runner.drop_partial()
        for req in reqs:
            if req.early is not None:          # its prompt is not wanted now
                req.early.cancel()
            req.reason = FinishReason.ERROR
            _safe_done(req, exc)

    # ---- the loop (one executor thread) ----------------------------------------------------
    def run(self) -> dict:
        t0 = time.monotonic()
        stats: dict[str, Any] = {"steps": 0, "tokens": 0, "max_batch": 0, "prefills": 0,
                                 "captures": 0}
        self.run_stats = stats
        self._run_t0 = t0
        planner, runner = self.planner, self.runner
        yield_asked = draining = False
        self.yielded = False
        self._arrived = []
        self._pending = []
        self._ahead = None
        self._deferring = self.defer_text if self.defer_text is not None else \
            runner.device.type == "cuda"
        try:
            with torch.inference_mode(), runner.on_own_stream(planner.settings.own_stream):
                if runner.check_device():
                    planner.cache_dropped(runner.parked_shape())
                planner.on_gpu = runner.on_gpu()
                self.timing = LoopTiming(runner.device.type == "cuda")
                self._warm_if_unwarmed()          # fresh weights or cache: warm the graphs
                while True:
                    stop: BaseException | None = None
                    for cmd in self._drain_queue():
                        if isinstance(cmd, Submit):
                            self._arrived.append(cmd.req)
                        elif isinstance(cmd, Configure):
                            self._apply(cmd.values)
                        elif isinstance(cmd, YieldGpu):
                            yield_asked = True
                        elif isinstance(cmd, Drain):
                            draining = True
                        elif isinstance(cmd, Stop):
                            stop = cmd.error
                    # every row's new text, and each accepted prompt's go-ahead for its
                    # headers, reach the event loop in one wake-up a turn (a burst's 32
                    # prompts woke it 32 times while the loop encoded them, each wake-up
                    # taking the GIL from the loop's thread)
                    with held_calls():
                        # the prompts the next pass reads; the rest while it computes (_admit)
                        going = not (draining or yield_asked or stop is not None)
                        self._accept_arrived(fill_only=going, ready_only=going)
                        if stop is not None:              # stopped: answer everyone, end
                            self._fail(stop, [])
                            break
                        if planner.idle(draining=draining):
                            self._warm_if_unwarmed()
                            if not (draining or yield_asked) and (
                                    self.warming and self._warm_step(stats) or
                                    runner.warm_prefill_graph_one(len(planner.active), stats)
                                    or runner.warm_chunk_one(len(planner.active), stats)):
                                continue              # one graph, then look at the queue
                            self._settle()            # (draining: rows a preemption sent back)
                            break
                        if yield_asked and time.monotonic() - t0 >= self.yield_after_s():
                            self._settle()
                            self._paused_at = time.monotonic()
                            runner.drop_partial()
                            stats["yielded_seqs"] = planner.pause_all()
                            stats["yielded"] = True
                            self.yielded = True
                            break
                        if draining:                      # finish the active rows only
                            if planner.requeue_partial() is not None:
                                runner.drop_partial()
                        elif self._admit(stats) and self._next_pass_first():
                            continue      # the burst's next pass before any decode step
                        self._chunk(stats)
                        self._decode(stats)
        except BaseException as exc:  # noqa: BLE001 - every request gets the error
            self._pending = []
            self._ahead = None
            arrived, self._arrived = self._arrived, []
            self._fail(exc, arrived)
            self.release()
            raise
        self._accept_arrived()           # (none are left: each way out accepted them all)
        stats["seconds"] = round(time.monotonic() - t0, 4)
        self.timing.finish(stats)
        if runner.graphs is not None:
            stats["graphs"] = len(runner.graphs.graphs)
        if runner.cache is not None:
            stats["cache_mb"] = round(runner.cache_bytes() / 2**20, 1)
        return stats

    def _warm_if_unwarmed(self) -> None:
        """Start a warm-up (captures while idle, :meth:`_warm_step`) unless one runs or the
        runner's graph set is the one the last warm-up finished for. Before, only a loop that
        started without graphs warmed them: a cache made anew mid-loop (a long prompt) got one
        graph captured by its step, and the next short chat captured its own on its request
        (H200: 0.09-0.15 s to its first token, 0.011-0.013 s now, gpu-h200-s18.md)."""
        runner = self.runner
        if self.warming or not self.planner.settings.warm_graphs or \
                not runner.graphs_wanted():
            return
        if runner.graphs is None or runner.graph_sets != self._warmed_set:
            self.warming = True
            self._warm_planned = False

    def _warm_step(self, stats: dict) -> bool:
        """(idle) Capture one warm-up graph; False once the warm-up is over. The first one
        on a GPU also warms the prefill shapes (:meth:`BatchRunner.warm_prefill`)."""
        runner = self.runner
        if not runner.prefill_warmed and runner.device.type == "cuda":
            settings = self.planner.settings
            runner.warm_prefill(settings.prefill_tokens, self.planner.chunk_tokens(), stats)
            return True
        if runner.cache is None:           # a cache of the planner's first shape to warm
            shape = self.planner.warm_shape()
            runner._ensure_cache(*shape, keep=0)
        if not self._warm_planned or runner.graphs is None:
            # (again after a cache that grew dropped the graphs): what this set lacks
            runner.plan_warmup()
            self._warm_planned = True
        if runner.warm_one(self.planner.active, stats):
            return True
        # the lean decoder's chunk is compared with transformers' here, not in a prompt's
        # first short chunk (~0.1 s of a 3B model's eager forwards on its request)
        runner.check_lean_chunk()
        runner.check_lean_prefill(self.planner.settings.prefill_tokens)
        self.warming = False
        self._warmed_set = runner.graph_sets
        return False

    def _drain_queue(self) -> list[Command]:
        out: list[Command] = []
        while True:
            try:
                out.append(self._commands.get_nowait())
            except queue.Empty:
                return out

    def _apply(self, values: dict) -> None:
        """(the loop's side) New settings reach the planner and the runner."""
        before = self.planner.settings
        settings = self.planner.settings = _settings(before, values)
        if settings.gpu_lean != before.gpu_lean:      # the graphs capture the other step
            self.runner.gpu_lean = None if settings.gpu_lean else False
            self.runner.graphs = None
        if "cuda_graphs" in values:
            self.runner.cuda_graphs = settings.cuda_graphs
            if not settings.cuda_graphs:
                self.runner.graphs = None
        if "lean_decode" in values:
            self.runner.lean = None if settings.lean_decode else False   # None: try it again
        self.runner.lean_prefill_on = settings.lean_prefill
        if settings.decode_cudnn != before.decode_cudnn:   # the graphs capture other kernels
            self.runner.graph_cudnn = settings.decode_cudnn
            self.runner.graphs = None
        if settings.decode_rope_kv != before.decode_rope_kv:   # the graphs capture other kernels
            self.runner.rope_kv = settings.decode_rope_kv
            self.runner.graphs = None       # (a new set makes its lean step again)
        if settings.chunk_graphs != before.chunk_graphs:
            self.runner.chunk_graphs_on = settings.chunk_graphs
            self.runner.chunk_graphs = None
        if settings.prefill_graphs != before.prefill_graphs:
            self.runner.prefill_graphs_on = settings.prefill_graphs
            self.runner.prefill_graphs = None
        if not settings.warm_graphs:
            self.warming = False
        if "prefix_cache_tokens" in values:
            self.runner.prefixes.budget_tokens = settings.prefix_cache_tokens
            if not settings.prefix_cache_tokens:
                self.runner.prefixes.clear()

    def _accept_arrived(self, fill_only: bool = False, ready_only: bool = False) -> None:
        """Prepare the arrived requests (their prompts encoded, in order) for the planner;
        ``fill_only``: only until the waiting ones fill the next prefill pass. A burst's prompts
        past its first pass are then encoded while the GPU reads that pass (:meth:`_admit`),
        not before it with the GPU idle (H200: 32 chats' prompts held the loop's first forward
        ~0.02 s). ``ready_only``: not past a prompt still being encoded on a prompt thread
        while the loop has other work (:meth:`_still_encoding`)."""
        while self._arrived and not (fill_only and self.planner.pass_filled()) and \
                not (ready_only and self._still_encoding()):
            self._accept(self._arrived.pop(0))

    def _next_pass_first(self) -> bool:
        """After a prefill pass: the loop's next turn (the queue read again, the arrived
        prompts taken in) goes before any decode step while more chats wait or arrive and no
        active row has decoded yet: a burst's passes go back to back. A decode step between
        them costs each its whole time (a 3B model's 32-row step ~4 ms on an H100) and gives
        only the first pass's rows a token: the burst ends when its last pass's rows have
        their tokens, so a step before that pass makes it end a step later (H100, a served
        burst of 32 chats arriving over ~10 ms: three passes and 129 steps for 128 tokens a
        chat). The first rows wait for their second token at most until the batch is full
        (``max_batch_size``), as vLLM's default scheduler does them (prefills first);
        ``llm_params.burst_prefill`` false: a decode step after each pass, as before."""
        return self._bursting() and \
            bool(self.planner.waiting or self._arrived or not self._commands.empty())

    def _still_encoding(self) -> bool:
        """The next arrived prompt is still being encoded on a prompt thread
        (actors/early_prompts.py) while the loop has other work: chats waiting for a pass, rows
        decoding, a prompt being read in chunks. The loop then goes on with that work and takes
        the prompt in a later turn, not waiting for it with the GPU idle (H100: a served burst
        of 32 chats' first pass launched 0.005-0.023 s into the loop, the loop waiting for the
        prompt threads, which share Python's lock with the event loop taking the burst in);
        ``llm_params.wait_for_prompts`` waits, as before. With nothing else to do the loop
        waits for it (no turn without work); while a burst is read (:meth:`_bursting`) it
        waits for it a short while."""
        early = self._arrived[0].early
        planner = self.planner
        if early is None or early.done() or planner.settings.wait_prompts or \
                not (planner.waiting or planner.active or planner.partial is not None):
            return False
        if self._bursting():      # a burst's next pass: worth a short wait to fill it
            t = time.monotonic()
            concurrent.futures.wait([early], timeout=BURST_ENCODE_WAIT_S)
            stats = self.run_stats
            stats["burst_wait_s"] = stats.get("burst_wait_s", 0.0) + time.monotonic() - t
            return not early.done()
        return True

    def _bursting(self) -> bool:
        """A burst is being read (``burst_prefill``): no row has decoded yet and none will
        before the burst's passes are read (:meth:`_next_pass_first`), so the loop has no
        other work than its next pass; it waits for the prompts still being encoded to fill
        that pass rather than launch it with the few encoded so far (each at most
        :data:`BURST_ENCODE_WAIT_S`: a prompt that takes longer, a very long one, does not
        hold back the chats before it). A pass of 5-12 of a 3B model's 220-token prompts is
        ~12-30 ms of GPU work, and its eager launch (~700 kernels) took 20-80 ms beside the
        event loop taking the burst in (H100, served bursts of 32 read as 1, 5, 17 and 9
        rows, or 1, 17 and 14); the prompt threads encode a prompt in well under a
        millisecond. With the wait the bursts were read as 17 and 15 rows (H100, H200:
        benchmarks/results/gpu-s27.md)."""
        planner = self.planner
        return planner.settings.burst_passes and planner.partial is None and \
            len(planner.active) < planner.settings.max_batch and \
            all(r.steps == 0 for r in planner.active)

    def _accept(self, req: SeqRequest) -> None:
        if req.early is not None or (req.prompt is None and self.prepare is not None):
            t = time.monotonic()
            stats = self.run_stats
            try:       # encoded on a prompt thread (actors/early_prompts.py), or here
                if prepared(req, self.prepare):
                    stats["early_prompts"] = stats.get("early_prompts", 0) + 1
            except Exception as exc:  # noqa: BLE001 - a bad prompt: answer it, go on
                req.reason = FinishReason.ERROR
                _safe_done(req, exc)
                return
            finally:       # this loop's time encoding and checking prompts, or waiting for them
                stats["prepare_s"] = stats.get("prepare_s", 0.0) + time.monotonic() - t
            if self.accepted is not None:
                self.accepted(req)
        self.planner.accept(req)

    # ---- one turn ---------------------------------------------------------------------------
    def _admit(self, stats: dict) -> bool:
        """The next prefill pass, if one is due: True when one was read."""
        plan, cancelled = self.planner.admit()
        for req in cancelled:
            self._finish(req)
        part = self.planner.partial
        if part is not None and part.done == 0 and self.runner.partial_kv is None:
            # a long prompt starts its chunked prefill: after a stored prefix, if it has one
            n = self.runner.start_from_prefix(part.req)
            if n:
                part.done = part.req.prefix_hit = n
                self.run_stats["prefix_hits"] = self.run_stats.get("prefix_hits", 0) + 1
                self.run_stats["prefix_hit_tokens"] = \
                    self.run_stats.get("prefix_hit_tokens", 0) + n
        if plan is None:                 # no pass to hide them behind: the rest now (a bad
            self._accept_arrived(ready_only=True)    # prompt among them is answered this
            return False                             # turn), bar those still being encoded
        mark = self.timing.start(allocs=True)
        try:
            logits = self.runner.run(plan, stats)
        except BaseException:
            self.planner.unadmit(plan.rows)        # answered with the error, not lost
            raise
        self.timing.launched(stats, "admit", mark)
        lengths = [r.context_len() for r in plan.rows]
        passes = stats.setdefault("admit_passes", [])
        if len(passes) < ALLOC_SHAPES_KEPT:  # how a burst was read: rows, longest, when, launch
            passes.append([len(plan.rows), max(lengths),
                           round(1e3 * (mark[0] - self._run_t0), 1),
                           round(1e3 * (time.monotonic() - mark[0]), 1)])
        self.planner.seat(plan.rows, plan.first_slot, lengths)
        self._accept_arrived(ready_only=True)    # while the GPU reads the pass
        stats["prefills"] += 1
        self._take_tokens(plan.rows, sampling.sample(logits, plan.rows))
        took = self.timing.done(stats, "admit", mark)
        if self.timing.last_allocs:          # which prefill shapes a warm-up missed
            shapes = stats.setdefault("admit_alloc_shapes", [])
            if len(shapes) < ALLOC_SHAPES_KEPT:
                shapes.append([len(plan.rows), max(lengths), self.timing.last_allocs,
                               *self.timing.last_alloc_detail])
        for req in plan.rows:
            req.prefill_s += took
        return True

    def _chunk(self, stats: dict) -> None:
        plan, cancelled = self.planner.chunk()
        if cancelled is not None:
            self.runner.drop_partial()
            self._finish(cancelled)
        if plan is None:
            return
        mark = self.timing.start(allocs=True)
        t0 = mark[0]
        req = plan.rows[0]
        logits = self.runner.run(plan, stats)
        self.timing.launched(stats, "chunk", mark)
        self.planner.chunk_done(plan)
        stats["prefill_chunks"] = stats.get("prefill_chunks", 0) + 1
        if plan.lands:
            stats["prefills"] += 1
            tokens = sampling.sample(logits, [req])
            req.prefill_s += time.monotonic() - t0
            self._take_tokens([req], tokens)
        else:
            req.prefill_s += time.monotonic() - t0
        self.timing.done(stats, "chunk", mark)

    def _decode(self, stats: dict) -> None:
        ahead = self._ahead
        if ahead is not None and not self._chains(ahead):
            self._resolve(stats)             # its tokens first: rows may end, the batch changes
            ahead = None
        plan, gone = self.planner.decode()
        if plan is None:
            self.runner.apply_moves(gone.moves, 0)
        for req in gone.finished:
            self._finish(req)
        if plan is None:
            self._resolve(stats)             # (rows cancelled since the check: nobody reads)
            return
        if ahead is not None and plan.rows != ahead.rows:
            # a row was cancelled since the check: the step runs the plan's rows, after the
            # tokens of the one ahead (a row they end computes one token nobody reads)
            self._resolve(stats, retire=False)
            ahead = None
        mark = self.timing.start()
        logits = self.runner.run(plan, stats, ids=ahead.tokens if ahead is not None else None)
        self.timing.launched(stats, "decode", mark)
        self._read_pending()                 # the last step's text while this one computes
        if self._paused_at is not None:      # the first step since a pause: what it cost
            cost = time.monotonic() - self._paused_at
            self._paused_at = None
            if cost <= PAUSE_SAMPLE_MAX_S:   # (not chats that came back much later)
                self.pause_s = cost if not self.pause_s else 0.5 * (self.pause_s + cost)
                stats["pause_s"] = round(cost, 4)
        self.planner.stepped(plan.rows)
        b = len(plan.rows)
        if self._goes_ahead(plan.rows):
            tokens, host, ready = sampling.sample_ahead(logits)
            self._ahead = _Ahead(plan.rows, tokens, host, ready, mark)
            if ahead is not None:            # the last step's tokens while this one computes
                self._take_ahead(ahead, stats, retire=True)
            stats["ahead_steps"] = stats.get("ahead_steps", 0) + 1
        else:
            self._resolve(stats, retire=False)
            self._take_tokens(plan.rows, sampling.sample(logits, plan.rows),
                              defer=self._deferring)
            self.timing.done(stats, "decode", mark)
        stats["steps"] += 1
        stats["step_rows"] = stats.get("step_rows", 0) + b
        stats["max_batch"] = max(stats["max_batch"], b)
        self.total_steps += 1

    def _goes_ahead(self, rows: list[SeqRequest]) -> bool:
        """This step's tokens may stay on the device as the next step's input (``ahead``)."""
        on = self.ahead
        if on is None:
            on = self.planner.settings.decode_ahead and self.runner.graphs is not None and \
                self.runner.device.type == "cuda"
        return bool(on) and not getattr(self.runner.cache, "paged", False) and \
            all(r.plain_greedy() for r in rows)

    def _chains(self, ahead: _Ahead) -> bool:
        """The next step may start from ``ahead``'s tokens before they are read: the same rows
        (nothing admitted, retired or cancelled since), none at its max_tokens with them, and
        a cache long enough for the next position (no growth, no preemption)."""
        rows = ahead.rows
        if rows != self.planner.active or self.planner.cache is None:
            return False
        need = max(r.pos for r in rows) + 1
        return need <= self.planner.cache[1] and all(
            r.reason is None and not r.cancelled and r.generated + 1 < r.max_new and
            r.plain_greedy() for r in rows)

    def _resolve(self, stats: dict, retire: bool = True) -> None:
        """The tokens of the step sent ahead, if any, read and taken now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._take_ahead(ahead, stats, retire)

    def _take_ahead(self, ahead: _Ahead, stats: dict, retire: bool) -> None:
        tokens = sampling.read_ahead(ahead.host, ahead.ready)
        self._take_tokens(ahead.rows, tokens, defer=self._deferring, retire=retire)
        # steps sent ahead overlap: each counts its host seconds from its start or the last
        # step's tokens, whichever came later (``decode_s`` stays the loop's time in steps)
        start = max(ahead.mark[0], self._ahead_read_at)
        self._ahead_read_at = time.monotonic()
        self.timing.done(stats, "decode", (start, *ahead.mark[1:]))

    def _take_tokens(self, reqs: list[SeqRequest], tokens: list[int], *,
                     defer: bool = False, retire: bool = True) -> None:
        """Sampled tokens back into the sequences: reasons set, text streamed (with ``defer``:
        while the next step computes, see :meth:`_read_pending`), rows retired (unless not
        ``retire``: a step already planned over these rows runs next)."""
        self.run_stats["tokens"] = self.run_stats.get("tokens", 0) + len(tokens)
        texts: list[SeqRequest] = []
        for req, tid in zip(reqs, tokens):
            if req.reason is not None:    # its last text held a stop string (read while
                continue                  # this step computed): this token is past the end
            req.last = tid
            if req.constraint is not None:
                req.constraint.accept(tid)
            if req.cancelled:
                req.reason = FinishReason.CANCELLED
            elif tid in self.eos:
                req.reason = FinishReason.STOP
            else:
                req.generated += 1
                req.tail.ids.append(tid)
                texts.append(req)
                if req.constraint is not None and req.constraint.finished():
                    req.reason = FinishReason.STOP
                elif req.generated >= req.max_new:
                    req.reason = FinishReason.LENGTH
        if defer:                         # a row that ends now reads its text as it finishes
            held = {id(r): r for r in self._pending}
            held.update((id(r), r) for r in texts if r.reason is None)
            self._pending = list(held.values())
        elif texts:
            self._read_texts(texts)
        if retire:
            self._retire()

    def _retire(self) -> None:
        """Rows with a reason leave the batch (the cache's rows move up) and are answered."""
        gone = self.planner.retire()
        self.runner.apply_moves(gone.moves, len(self.planner.active))
        for req in gone.finished:
            self._finish(req)

    def _read_texts(self, reqs: list[SeqRequest]) -> None:
        """The new tokens' text, in one tokenizer call for every row's two windows: streamed,
        and a row whose text holds a stop string stops."""
        hits = advance(self.tokenizer, [r.tail for r in reqs])
        for req, hit in zip(reqs, hits):
            if hit:
                req.reason = FinishReason.STOP

    def _read_pending(self) -> None:
        """The text of the last decode step's tokens (deferred, see ``defer_text``) of the rows
        that have not ended since."""
        pending, self._pending = self._pending, []
        live = [r for r in pending if r.reason is None]
        if live:
            self._read_texts(live)

    def _settle(self) -> None:
        """The step sent ahead taken and the deferred text read now (the loop pauses or
        ends), and the rows they ended retired."""
        self._resolve(self.run_stats)
        if self._pending:
            self._read_pending()
            self._retire()

    def _finish(self, req: SeqRequest) -> None:
        text = req.tail.finish()
        assert req.prompt is not None
        if req.reason == FinishReason.LENGTH and req.tail.hit_stop:
            req.reason = FinishReason.STOP   # its last token's text, read here, held a stop
        _safe_done(req, ChatResult(text=text, finish_reason=req.reason or FinishReason.STOP,
                                   prompt_tokens=len(req.prompt),
                                   completion_tokens=req.generated))

    # ---- memory ------------------------------------------------------------------------------
    def release(self, keep_prefix_tokens: int = 0) -> None:
        """Drop the KV cache and the CUDA graphs (never while the loop runs); the stored
        prompt prefixes too, but for the most recent ``keep_prefix_tokens`` of them."""
        self.warming = False
        self.runner.release(keep_prefix_tokens)
        self.planner.cache_dropped(self.runner.parked_shape())

    def close(self) -> None:
        """The engine is done for good (unload, replaced): drop the cache and graphs, a parked
        stable cache included (its graphs and the runner refer to each other: left parked,
        the model would live until a full garbage collection)."""
        self.release()
        self.runner.forget_parked()
        self.planner.cache_dropped()

    def cache_bytes(self) -> int:
        return self.runner.cache_bytes()


# ---- helpers ------------------------------------------------------------------------------------
_FIELDS = {f.name for f in dataclasses.fields(BatchSettings)}


def _settings(base: BatchSettings, values: dict) -> BatchSettings:
    """``base`` with ``values`` applied, each clamped to what the loop can run with."""
    kw = {k: v for k, v in values.items() if k in _FIELDS}
    if "max_batch" in kw:
        kw["max_batch"] = max(1, int(kw["max_batch"]))
    if "kv_block" in kw:
        kw["kv_block"] = max(0, int(kw["kv_block"]))
    if "prefix_cache_tokens" in kw:
        kw["prefix_cache_tokens"] = max(0, int(kw["prefix_cache_tokens"]))
    for k in ("kv_tokens", "prefill_tokens"):
        if k in kw:
            kw[k] = max(1, int(kw[k]))
    if kw.get("prefill_chunk") is not None:                  # None: by device
        kw["prefill_chunk"] = max(0, int(kw["prefill_chunk"]))
    for k in ("min_slice_s", "slice_cost_ratio"):
        if k in kw:
            kw[k] = max(0.0, float(kw[k]))
    for k in ("cuda_graphs", "warm_graphs", "lean_decode", "own_stream", "gpu_lean",
              "chunk_graphs", "prefill_graphs", "decode_ahead", "decode_cudnn", "lean_prefill",
              "wait_prompts", "burst_passes", "decode_rope_kv"):
        if k in kw:
            kw[k] = bool(kw[k])
    return dataclasses.replace(base, **kw)


def _safe_done(req: SeqRequest, res: Any) -> None:
    try:
        req.on_done(req, res)
    except Exception:  # noqa: BLE001 - one bad callback must not stop the batch
        log.exception("reply callback failed")
