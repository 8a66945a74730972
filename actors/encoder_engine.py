"""Encoder models (embedders, rerankers) at the model's own speed.

A request's texts (or query-document pairs) become *pieces*: one tokenized input each, batched
by tokens. Each forward takes one batch within the model's token budget (``max_batch_tokens``:
rows x the longest row, padding included), its rows of similar length so that little is
padding, always with the oldest waiting piece in it (no request starves). One forward per batch:
the model is called on the padded batch directly, not through ``encode`` / ``predict``, which
would split it again.

The work runs in *jobs* on the actor's task (one GPU grant for all the requests a job takes in);
inside a job tokenization, forwards and the event loop overlap. The parts:

- actors/encoder_tokens.py: pieces, the pool they wait in, padding a batch (:class:`TokenPool`,
  :func:`collate`);
- actors/encoder_backends.py: how one model tokenizes and runs one forward (:class:`Backend`),
  checked at load against the library's own call, else falling back to it;
- actors/encoder_jobs.py: a job's loop (tokenizer thread, forward threads, answers);
- here: :class:`EncoderActor`, its settings (the token budget, the GPU working memory it asks
  for), load and unload, and the start and end of each job.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

import numpy as np

from ..runtime.actor import Envelope
from .encoder_backends import (
    Backend,
    CrossEncoderBackend,
    FlagBackend,
    SentenceTransformerBackend,
)
from .encoder_graphs import GRAPH_MAX_TOKENS
from .encoder_jobs import DEFAULT_BATCH_TOKENS, EncoderJobs, Job, Pending
from .encoder_tokens import MIN_FILL, Piece, TokenPool, rust_probe
from .model_base import ARBITER, linger_seconds
from .states import Device, DeviceMode

log = logging.getLogger("agile_rag.encoder")

#: the names importers take from here (they live in the modules above)
__all__ = ["DEFAULT_BATCH_TOKENS", "MIN_FILL", "Backend", "CrossEncoderBackend", "EncoderActor",
           "FlagBackend", "Pending", "Piece", "SentenceTransformerBackend", "TokenPool",
           "batch_tokens_param"]

#: the budget never goes below this (a smaller configured value is raised to it)
MIN_BATCH_TOKENS = 64
#: forwards in flight on a GPU (the next one queued while the current one computes)
GPU_DEPTH = 2
_BASE_WORKING = 64 * 2**20
#: a GPU job counts toward the measured speed of its mode from this many padded tokens
RATE_MIN_TOKENS = 2048
#: most forwards in one layer-streamed group (see _plan_groups)
MAX_GROUP = 32
#: a streamed job groups its forwards only when one forward would hold fewer tokens than this:
#: a bigger forward's compute hides its pass's copies (XLM-R large on the H200: ~11 ms of
#: copies a pass; 100 pairs x 512 tokens in forwards of 4 rows took 380 ms one pass each,
#: 303 ms in groups, 225 ms resident), and a group's forwards answer only when all are done
GROUP_BELOW_TOKENS = 4096
#: how fast a flex model forgets how big its recent forwards wanted to be (see job_tokens)
DEMAND_HALF_LIFE_S = 60.0


def batch_tokens_param(params: dict, default: int = DEFAULT_BATCH_TOKENS) -> int:
    """``max_batch_tokens`` from a model kind's params (a bad value keeps the default)."""
    v = params.get("max_batch_tokens")
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return max(v, MIN_BATCH_TOKENS)
    return default


class EncoderActor(EncoderJobs):
    """What embedders and rerankers share: jobs of token-budget batches (see the module
    docstring). Subclasses build :attr:`engine` (a :class:`Backend`) at load and say how a
    message becomes inputs (:meth:`admit`) and outputs become a reply (:meth:`finish`)."""
    batching = True
    #: the trace detail each request gets: the largest forward its inputs ran in (rows)
    batch_detail = "batch_texts"

    def __init__(self, spec, params=None, **kw):
        super().__init__(spec, params, **kw)
        self.engine: Backend | None = None
        self._job: Job | None = None
        self._tok_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._fwd_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._per_token = 0
        self._out_lock = threading.Lock()
        self._demand: tuple[int, float] = (0, 0.0)      # (tokens, when): see job_tokens
        #: seconds per padded token of GPU jobs by mode (resident / streamed): _note_speed
        self._rates: dict[str, float] = {}
        self._tokens_per_input = 0.0
        self._probe: list = []          # the load's probe inputs (engine_ready)

    # -- what subclasses write
    def admit(self, env: Envelope) -> Pending | BaseException:
        raise NotImplementedError

    def usage(self, p: Pending, lengths: np.ndarray, start: int) -> int:
        """Prompt tokens to report for inputs ``start:start + len(lengths)`` of a request (they
        are added up; tokenizer thread, in order)."""
        return int(lengths.sum())

    def finish(self, p: Pending) -> Any:
        raise NotImplementedError

    def max_rows(self) -> int:
        return 4096

    def batch_units(self, pieces: list[Piece]) -> int:
        """What a forward's size is reported in (``batch_detail``): texts, or pairs."""
        return len(pieces)

    # -- settings
    def batch_tokens(self) -> int:
        """The token budget of one forward: ``max_batch_tokens``, lowered when the GPU budget
        could not hold the weights plus twice its working memory (the second half is headroom
        for the retry after an out-of-memory)."""
        tokens = batch_tokens_param(self.params)
        arbiter = self.system.actors.get(ARBITER) if self.system is not None else None
        budget = getattr(arbiter, "budget", None)
        per = self._per_token * GPU_DEPTH
        if isinstance(budget, int) and per > 0:
            room = (budget - self.weight_bytes) // 2 - _BASE_WORKING
            tokens = min(tokens, max(MIN_BATCH_TOKENS, room // per))
        return tokens

    def job_tokens(self, items: int) -> int:
        """The token budget of a GPU job's forwards, which its working memory is asked for:
        the whole ``batch_tokens()`` for a pinned (device: cuda) model; for a flex one no more
        than its ``items`` inputs can hold (a query asks for little, so it fits beside the
        LLM), unless this model's recent jobs had more waiting than that (a burst that began
        with one request: the next job asks for room for it)."""
        tokens = self.batch_tokens()
        if self.spec.device == DeviceMode.CUDA:
            return tokens
        max_len = getattr(self.engine, "max_len", 0) if self.engine is not None else 0
        if items > 0 and max_len:          # a job never holds more tokens than its inputs can
            tokens = min(tokens, max(items * max_len, self._recent_demand()))
        return max(tokens, MIN_BATCH_TOKENS)

    @property
    def _token_bytes(self) -> int:
        """Working memory of one token in a forward (measured at load; a guess before)."""
        return self._per_token or 32 * 1024

    def working_bytes(self, items: int, depth: int = GPU_DEPTH) -> int:
        """GPU memory beyond the weights: the forwards in flight at the job's token budget
        (``depth`` of them; a streamed grant may hold fewer: _plan_groups), and for a model
        whose small forwards replay CUDA graphs, the graphs' memory pool (one forward of the
        largest graph)."""
        tokens = self.job_tokens(items)
        graphs = min(GRAPH_MAX_TOKENS, tokens) if self._graphs_planned() else 0
        return _BASE_WORKING + (depth * tokens + graphs) * self._token_bytes

    def _stream_working_min(self) -> int:
        """The least working memory a streamed job can run with: one forward of the longest
        input (smaller forwards, more passes)."""
        max_len = getattr(self.engine, "max_len", 0) if self.engine is not None else 0
        return _BASE_WORKING + max(MIN_BATCH_TOKENS, max_len or 512) * self._token_bytes

    def _recent_demand(self) -> int:
        """The largest forward recent jobs wanted (tokens), halving every DEMAND_HALF_LIFE_S."""
        tokens, t = self._demand
        return int(tokens * 0.5 ** ((time.monotonic() - t) / DEMAND_HALF_LIFE_S))

    def _note_demand(self, tokens: int) -> None:
        if tokens > self._recent_demand():
            self._demand = (tokens, time.monotonic())

    @property
    def batch_linger_s(self) -> float:  # type: ignore[override]
        return linger_seconds(self.params)

    # -- load / unload
    def engine_ready(self, probe: list) -> None:
        """Blocking (load thread): self-check the backend, size its working memory."""
        engine = self.engine
        assert engine is not None
        t0 = time.monotonic()
        checked = engine.self_check(probe)
        rust = engine.enable_rust(rust_probe(probe))
        if not engine.fast:
            log.warning("%s %s: batches run through the library's own call (%s)", self.kind,
                        self.name, engine.why_slow)
        else:
            log.info("%s %s: own forward per token-budget batch (%s in %.2fs), tokenized "
                     "by %s", self.kind, self.name, "checked" if checked else "not checked",
                     time.monotonic() - t0, "the Rust core" if rust else "the library")
        self._per_token = engine.per_token_bytes()
        self._probe = probe

    async def on_pinned(self) -> None:
        """Pinned on the GPU: capture the CUDA graphs of every small-forward bucket now, so
        that no request waits for a capture (actors/encoder_graphs.py)."""
        engine = self.engine
        if engine is None or not self._graphs_planned() or engine.graphs_wanted() or \
                not self._probe or engine.device().type != "cuda":
            return
        t0 = time.monotonic()
        try:
            made = await self.system.executor.run_load(engine.capture_graphs,
                                                       self.batch_tokens(), self._probe)
        except Exception as exc:  # noqa: BLE001 - buckets are then captured on first use
            log.warning("%s %s: capturing CUDA graphs at pin failed (%s: %s)", self.kind,
                        self.name, type(exc).__name__, exc)
            return
        graphs = engine.graphs
        log.info("%s %s: %d CUDA graph(s) of small forwards captured in %.2fs%s", self.kind,
                 self.name, made, time.monotonic() - t0,
                 f" (then turned off: {graphs.off})" if graphs is not None and graphs.off
                 else "")

    def unload_blocking(self) -> None:
        if self.engine is not None:
            self.engine.stop_graphs()
        self.engine = None

    def update(self, spec, params) -> bool:
        super().update(spec, params)
        # unpinned, or graphs turned off: their memory goes back now, not at the next job
        if self.engine is not None and self.engine.graphs is not None and \
                not self._graphs_planned():
            self.engine.stop_graphs()
        return True

    async def on_stop(self) -> None:
        await super().on_stop()
        for pool in (self._tok_pool, self._fwd_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._tok_pool = self._fwd_pool = None

    def _pools(self) -> tuple[concurrent.futures.ThreadPoolExecutor,
                              concurrent.futures.ThreadPoolExecutor]:
        if self._tok_pool is None:
            self._tok_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"{self.name}-tokenize")
        if self._fwd_pool is None:
            self._fwd_pool = concurrent.futures.ThreadPoolExecutor(
                GPU_DEPTH, thread_name_prefix=f"{self.name}-forward")
        return self._tok_pool, self._fwd_pool

    # -- the actor core's hooks
    def queue_length(self) -> int:
        job = self._job
        return super().queue_length() + (len(job.live) if job is not None else 0)

    def batch_fits(self, batch: list[Envelope], nxt: Envelope) -> bool:
        return True                          # the job sizes forwards itself

    async def _linger(self, batch: list[Envelope]) -> None:
        return None                          # the job collects bursts itself (see _launch)

    def _put(self, env: Envelope) -> None:
        super()._put(env)
        job = self._job
        if job is not None and job.open:
            job.wake.set()

    async def serve(self, msg: Any, env: Envelope) -> Any:
        raise TypeError(f"{self.kind} cannot handle {type(msg).__name__}")

    async def _process(self, batch: list[Envelope]) -> None:
        if not (self.batching and self.joinable(batch[0].msg)):
            await super()._process(batch)
            return
        await self._run_job(batch)

    # -- a job
    async def _run_job(self, envs: list[Envelope]) -> None:
        loop = asyncio.get_running_loop()
        job = Job(self, envs[0])
        self._job = job
        self._inflight = job.live            # type: ignore[assignment]  # failed on a crash
        now = time.monotonic()
        for env in envs:
            env.started = now
            self._admit(job, env)
        self._tokenize(job, loop)
        job.items = sum(len(p.inputs) for p in job.live.values())
        try:
            t_acq = time.monotonic()
            await self._acquire(job)
            job.acquire_s = time.monotonic() - t_acq
            await self._loop(job, loop)
        except asyncio.CancelledError:
            self._job = None
            self._flush(job)
            raise
        except BaseException:
            self._job = None
            self._flush(job)
            await self._release(job)
            raise
        self._job = None
        self._inflight = []
        # the last answers go out after the lease is released (idle_on_cpu: the GPU is free
        # by the time the client has its answer)
        await self._release(job)
        self._flush(job)

    async def _acquire(self, job: Job) -> None:
        lease = self.lease
        job.budget = self.batch_tokens()
        job.max_rows = self.max_rows()
        if lease is not None:
            working = self.working_bytes(job.items)
            if self.spec.device == DeviceMode.CUDA and lease.on_gpu and not lease.busy and \
                    lease.granted >= lease.residency.weight_bytes + working:
                # pinned and resident with room for the job: never revoked, so nothing to ask
                # the arbiter (no round trip per job)
                job.device, job.pinned = lease.device, True
            else:
                job.device = await lease.acquire(
                    job.items, working, job.env0,
                    stream_working=self.working_bytes(job.items),
                    stream_working_min=self._stream_working_min(),
                    stream_s=self.stream_extra_s(job.items))
            self.device = job.device
        gpu = lease is not None and lease.on_gpu and str(job.device).startswith("cuda")
        job.gpu_mode = ("streamed" if lease is not None and lease.streamed else "resident") \
            if gpu else ""
        # streamed: one forward in flight unless the grant holds two big ones (_plan_groups)
        job.depth = GPU_DEPTH if gpu and lease is not None and not lease.streamed else 1
        if lease is not None and lease.on_gpu:
            # forwards within what the working memory was asked for (the CPU has no such limit)
            job.budget = min(job.budget, self.job_tokens(job.items))
            if lease.streamed and lease.stream_working:
                self._plan_groups(job, lease.stream_working - _BASE_WORKING)
        job.collecting = job.depth == 1 and self.batch_linger_s > 0
        self._graphs_for(job)

    def _graphs_for(self, job: Job) -> None:
        """CUDA graphs of small forwards (actors/encoder_graphs.py) for a model pinned on the
        GPU and resident (``cuda_graphs``, default true); dropped when that ends."""
        engine = self.engine
        if engine is None:
            return
        if self._graphs_planned() and job.gpu_mode == "resident" and \
                not engine.graphs_wanted():
            engine.start_graphs(job.budget)
        elif engine.graphs is not None:
            engine.stop_graphs()

    def _graphs_planned(self) -> bool:
        """Whether this model's GPU forwards may replay graphs: pinned (``device: cuda``) and
        ``cuda_graphs`` not false."""
        return self.spec.device == DeviceMode.CUDA and \
            self.params.get("cuda_graphs", True) is not False

    def _plan_groups(self, job: Job, room: int) -> None:
        """A streamed job, maybe granted less than it asked: its forwards fit ``room`` bytes.
        When two forwards of at least ``GROUP_BELOW_TOKENS`` fit, two run in flight.
        Otherwise one runs at a time; when even one must be small (under
        ``GROUP_BELOW_TOKENS``), the small ones run in layer-major
        groups (runtime/layer_group.py: the layers are copied once per group, not once per
        forward): half the room for one forward's working memory, the other half for the
        hidden states the group's forwards keep between layers.
        ``stream_groups: false`` (embedder_params / reranker_params): one forward per pass;
        ``stream_group_below_tokens`` (default ``GROUP_BELOW_TOKENS``) moves the line between
        forwards big enough to run alone and those grouped (a huge value groups every
        streamed job's forwards: one copy of each layer per group)."""
        per = self._token_bytes
        below = self.params.get("stream_group_below_tokens", GROUP_BELOW_TOKENS)
        two = min(job.budget, room // (GPU_DEPTH * per))
        if two >= below:
            # room for two big forwards: two in flight, as a resident job runs (the next
            # forward's host work and launches overlap the running one's compute; its layer
            # copies queue behind the running pass)
            job.depth, job.budget = GPU_DEPTH, two
            return
        alone = max(MIN_BATCH_TOKENS, min(job.budget, room // per))
        engine = self.engine
        keep = engine.keep_bytes_per_token() if engine is not None and engine.fast else 0
        job.group, job.group_tokens = 1, alone
        if keep <= 0 or alone >= below or \
                self.params.get("stream_groups", True) is False:
            job.budget = alone           # forwards big enough to hide their pass's copies
            return
        fwd = max(MIN_BATCH_TOKENS, min(job.budget, room // (2 * per)))
        span = max(fwd, (room - fwd * per) // keep)
        members = min(MAX_GROUP, span // fwd)
        if members < 2:
            job.budget = alone
            return
        job.budget, job.group, job.group_tokens = fwd, members, span

    # -- measured speed of GPU jobs, resident and layer-streamed
    def _note_speed(self, job: Job) -> None:
        """A GPU job's seconds per padded token (the time any of its forwards ran), averaged per
        mode; and the padded tokens per input. Jobs of fewer than RATE_MIN_TOKENS tokens are
        mostly overhead: not counted."""
        if not job.gpu_mode or job.tokens_run < RATE_MIN_TOKENS or job.busy_s <= 0:
            return
        rate = job.busy_s / job.tokens_run
        old = self._rates.get(job.gpu_mode)
        self._rates[job.gpu_mode] = rate if old is None else 0.7 * old + 0.3 * rate
        per = job.tokens_run / max(1, job.rows_run)
        self._tokens_per_input = per if not self._tokens_per_input else \
            0.7 * self._tokens_per_input + 0.3 * per

    def stream_extra_s(self, items: int) -> float:
        """How much longer a job of ``items`` inputs is measured to take layer-streamed than
        resident (0 until both modes have run big enough jobs: the arbiter then uses the copy
        estimate). Measured under real load it includes what the copies' estimate does not:
        the streamed pass's own overheads and the host embedding lookups."""
        streamed, resident = self._rates.get("streamed"), self._rates.get("resident")
        if streamed is None or resident is None or not self._tokens_per_input:
            return 0.0
        return max(0.0, items * self._tokens_per_input * (streamed - resident))

    async def _release(self, job: Job) -> None:
        self._note_speed(job)
        if job.gpu_mode:
            # one line per GPU job: where a slow job's time went (server log, INFO)
            log.info("%s job: mode=%s requests=%d items=%d forwards=%d groups=%d tokens=%d "
                     "budget=%d group=%d busy_s=%.3f acquire_s=%.3f wall_s=%.3f "
                     "cuda_graphs=%d", self.spec.name, job.gpu_mode, job.requests, job.items,
                     job.forwards, job.groups, job.tokens_run, job.budget, job.group,
                     job.busy_s, job.acquire_s, time.monotonic() - job.t0,
                     len(self.engine.graphs or ()) if self.engine is not None else 0)
        lease = self.lease
        if lease is not None:
            if not job.pinned:
                await lease.finish(job.env0)
            self.device = Device.CUDA if lease.on_gpu else Device.CPU

