"""The jobs of the encoder engine (actors/encoder_engine.py): requests in, forwards, answers out.

The work runs in a *job* on the actor's task: a job starts when a request finds the model idle
and keeps taking the requests that arrive while it runs (one GPU grant for all of them), until
nothing is left or another kind of message (Describe, Revoke, a config update) waits. Inside a
job three things overlap:

- the tokenizer thread tokenizes whatever arrived, in one fast-tokenizer batch call (the
  tokenizer's own work releases the GIL);
- the forward thread(s) run batches back to back: on a GPU two batches are in flight, so the
  next one's kernels are queued while the current one computes and the GPU does not wait for
  Python between batches; on the CPU one (torch already uses every core);
- the event loop only moves requests in and answers out.

A lone request on an idle model starts at once: its tokenization is the only wait. A burst shares
forwards: what arrives while one batch computes is tokenized meanwhile and forms the next. On the
CPU, where a forward holds the cores and a small first forward slows everything arriving behind
it, the first batch of a job also takes the requests that keep arriving while the previous ones
are tokenized (within ``batch_linger_ms``); a lone request finds nothing more and starts.

:class:`EncoderJobs` holds the steps of a job's loop; it is not an actor of its own, only the
base of :class:`~.encoder_engine.EncoderActor`, which starts and ends the jobs and holds the
settings.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from ..runtime.actor import Envelope
from ..runtime.errors import ModelFailed, Overloaded, ServiceError
from ..runtime.executor import apply_torch_threads
from ..runtime.layer_group import one_by_one
from ..runtime.thread_tuner import ThreadTuner
from .batch_plan import pow2
from .encoder_tokens import Piece, TokenPool, Tokens, input_chars
from .model_base import ARBITER, ModelActor
from .states import Device, DeviceMode
from .torch_util import empty_cache, is_oom

if TYPE_CHECKING:
    import concurrent.futures

    from .encoder_backends import Backend

log = logging.getLogger("agile_rag.encoder")

#: default ``max_batch_tokens``: rows x longest row per forward (32 pairs of 512 tokens)
DEFAULT_BATCH_TOKENS = 16384
#: one tokenizer call takes inputs until about this much text: about one forward's worth
#: (4 characters a token, at least this much), so that the first forward of a big request
#: starts while the rest of it is still being tokenized
TOKENIZE_CHUNK_CHARS = 16 * 1024
TOKENIZE_CHUNK_INPUTS = 2048
#: a flex model's job stops taking new requests after this long, so that the arbiter can lend
#: the GPU to another model between jobs
FLEX_JOB_SLICE_S = 1.0
#: default ``split_burst_rows`` (embedder_params / reranker_params): on a GPU, a burst of at
#: least this many inputs from several requests that starts a job (an idle model) and fits
#: one forward runs as two forwards queued back to back, so that the first half's answers go
#: out (and its clients' next requests come in) while the second half computes; 0 = one
#: forward
SPLIT_BURST_ROWS = 64


class Pending:
    """One request inside a job: its inputs, the outputs filled in as forwards finish."""
    __slots__ = ("env", "inputs", "left", "out", "tokens", "batches", "widest", "padded",
                 "grouped", "graphed", "failed", "extra", "tokenized_at", "launched_at",
                 "forward_end")

    def __init__(self, env: Envelope, inputs: list, extra: Any = None):
        self.env = env
        self.inputs = inputs
        self.left = len(inputs)
        self.out: np.ndarray | None = None
        self.tokens = 0                 # usage (prompt tokens)
        self.batches = 0
        self.widest = 0                 # largest forward (rows) its inputs ran in
        self.padded = 0                 # largest forward (rows x longest row) it ran in
        self.grouped = 0                # largest layer-streamed group its forwards ran in
        self.graphed = 0                # forwards of its inputs replayed from a CUDA graph
        # where its time in the job went (monotonic seconds; 0: not yet): its last inputs
        # tokenized (seen by the job), its last forward launched, that forward's end (on the
        # forward thread, before the event loop saw it)
        self.tokenized_at = 0.0
        self.launched_at = 0.0
        self.forward_end = 0.0
        self.failed: BaseException | None = None
        self.extra = extra


class Batch(list):
    """One forward: the list of its inputs (texts, or [query, document] pairs, as the
    library's own call would take them), with the tokenized pieces they came from."""

    def __init__(self, pieces: list[Piece], *, solo: bool = False, retry: bool = False):
        super().__init__(p.raw for p in pieces)
        self.pieces = pieces
        self.solo = solo                # one request's pieces: a failure fails only it
        self.retry = retry              # already retried after a GPU out-of-memory
        self.padded = 0                 # rows x longest row
        self.graphed = False            # replayed from a CUDA graph (actors/encoder_graphs.py)
        self.launched_at = 0.0          # handed to a forward thread (event loop's clock)
        self.ended = 0.0                # its outputs written (forward thread's clock)

    def keep(self, pieces: list[Piece]) -> None:
        self.pieces = pieces
        self[:] = [p.raw for p in pieces]


class Group(list):
    """Forwards run as one layer-streamed group (a list of :class:`Batch`)."""

    @property
    def padded(self) -> int:
        return sum(b.padded for b in self)


class Job:
    """One job's state: the requests it took in, what waits to be tokenized and to run, the
    forwards in flight, the answers ready to send."""

    def __init__(self, actor: EncoderJobs, env0: Envelope):
        self.actor = actor
        self.env0 = env0
        self.t0 = time.monotonic()
        self.wake = asyncio.Event()
        self.live: dict[Envelope, Pending] = {}
        self.untokenized: deque[list] = deque()  # [request, first input not yet tokenized]
        self.tok_fut: asyncio.Future | None = None
        self.tok_batch: list[tuple[Pending, int, int]] = []
        self.pool = TokenPool()
        self.ready: deque[Batch] = deque()     # batches to run before the pool (retries)
        self.running: dict[asyncio.Future, Batch | Group] = {}
        self.out: list[tuple[Envelope, Any]] = []    # answers ready to send
        self.oom: list[Batch] = []
        self.give_up = False                    # out of GPU memory twice: back to the CPU
        self.open = True                        # still taking requests from the mailbox
        self.collecting = False                 # the first batch waits for a burst (CPU)
        self.arrived = 0                        # requests taken in since the last look
        self.device: str = Device.CPU
        self.pinned = False                     # a pinned grant already covers the job
        self.depth = 1
        self.budget = DEFAULT_BATCH_TOKENS
        self.max_rows = 4096
        self.items = 0
        self.seq = itertools.count()
        self.forwards = 0
        self.group = 1                          # streamed: forwards per layer-major group
        self.group_tokens = 0                   # ... and the tokens such a group may hold
        self.groups = 0                         # groups run (passes shared by >1 forward)
        # how fast the forwards ran: padded tokens and rows, and the time any forward ran
        self.tokens_run = 0
        self.rows_run = 0
        self.busy_s = 0.0
        self.busy_since: float | None = None
        self.gpu_mode = ""                      # resident | streamed: a GPU job's mode
        self.requests = 0                       # requests taken in (the job summary's count)
        self.acquire_s = 0.0                    # waiting for the GPU grant
        self.split = False                      # the pool holds the second half of a burst

    def poke(self, _fut: Any = None) -> None:
        self.wake.set()


class EncoderJobs(ModelActor):
    """The steps of a job's loop (see the module docstring), for
    :class:`~.encoder_engine.EncoderActor`, which writes what is declared here."""
    #: the torch thread count of CPU forwards, chosen by timing (issue 17; see
    #: _forward_blocking): a ThreadTuner per forward size, made at the first CPU forward when
    #: TORCH_THREADS is auto, else False
    cpu_tuner: Any = None
    engine: Backend | None
    batch_detail: str
    _out_lock: threading.Lock

    if TYPE_CHECKING:
        def admit(self, env: Envelope) -> Pending | BaseException:
            raise NotImplementedError

        def usage(self, p: Pending, lengths: np.ndarray, start: int) -> int:
            raise NotImplementedError

        def finish(self, p: Pending) -> Any:
            raise NotImplementedError

        def batch_units(self, pieces: list[Piece]) -> int:
            raise NotImplementedError

        def batch_tokens(self) -> int:
            raise NotImplementedError

        def _note_demand(self, tokens: int) -> None:
            raise NotImplementedError

        def _pools(self) -> tuple[concurrent.futures.ThreadPoolExecutor,
                                  concurrent.futures.ThreadPoolExecutor]:
            raise NotImplementedError

    async def _loop(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            self._absorb(job)
            self._tokenize(job, loop)
            if job.oom and not job.running:
                await self._recover(job)
            if job.give_up and not job.running:
                await self._give_up_gpu(job)
            self._launch(job, loop)
            if not job.live and job.tok_fut is None and not job.running:
                return
            self._flush(job)
            await job.wake.wait()
            job.wake.clear()
            self._harvest(job)

    def _absorb(self, job: Job) -> None:
        """Take the requests waiting in the mailbox into the job (until another kind of
        message waits: it ends the job, and is handled after it)."""
        if not job.open:
            return
        if self.lease is not None and self.spec.device == DeviceMode.FLEX and \
                time.monotonic() - job.t0 > FLEX_JOB_SLICE_S:
            job.open = False
            return
        mailbox = self.mailbox
        while self._held is None and not mailbox.empty():
            env = mailbox.get_nowait()
            if env.abandoned:
                self._trace_env(env, "dropped", started=time.monotonic())
                continue
            if not self.joinable(env.msg):
                self._held = env
                job.open = False
                return
            env.started = time.monotonic()
            self._admit(job, env)
            job.arrived += 1
        if self._held is not None:
            job.open = False

    def _admit(self, job: Job, env: Envelope) -> None:
        try:
            p = self.admit(env)
        except Exception as exc:  # noqa: BLE001 - delivered to its asker
            p = exc
        if isinstance(p, BaseException):
            self._deliver(env, p)
            return
        job.live[env] = p
        job.requests += 1
        if p.left == 0:
            self._done(job, p)
            return
        job.untokenized.append([p, 0])

    def _tokenize(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """Hand what arrived to the tokenizer thread (one call), if it is free."""
        if job.tok_fut is not None or not job.untokenized:
            return
        take: list[tuple[Pending, int, int]] = []
        chars = inputs = 0
        limit = max(TOKENIZE_CHUNK_CHARS, 4 * max(job.budget, job.group_tokens))
        queue = job.untokenized
        while queue and (not take or (chars < limit and inputs < TOKENIZE_CHUNK_INPUTS)):
            seg = queue[0]
            p, i = seg
            n = len(p.inputs)
            if p.env.abandoned or p.failed is not None:
                queue.popleft()
                if p.failed is None:
                    p.left -= n - i
                    if p.left <= 0:
                        self._drop(job, p)
                continue
            j = i
            while j < n and (j == i or (chars < limit and inputs < TOKENIZE_CHUNK_INPUTS)):
                chars += input_chars(p.inputs[j])
                inputs += 1
                j += 1
            take.append((p, i, j))
            if j >= n:
                queue.popleft()
            else:
                seg[1] = j
        if not take:
            return
        tok_pool, _ = self._pools()
        job.tok_batch = take
        fut = self.system.executor.run_in(      # counted: no heap trim while it runs
            tok_pool, functools.partial(self._tokenize_blocking, take, job.seq))
        fut.add_done_callback(job.poke)
        job.tok_fut = fut

    def _tokenize_blocking(self, segs: list[tuple[Pending, int, int]], seq) -> list[Piece]:
        """Tokenizer thread: one call for the inputs ``i:j`` of each request; pieces back. A
        call that fails is retried per request, so a bad input fails only its own request."""
        engine = self.engine
        assert engine is not None
        flat = [x for p, i, j in segs for x in p.inputs[i:j]]
        try:
            groups = [(segs, engine.tokenize(flat))]
        except Exception:  # noqa: BLE001 - find the request that fails
            groups = []
            for seg in segs:
                p, i, j = seg
                try:
                    groups.append(([seg], engine.tokenize(p.inputs[i:j])))
                except Exception as exc:  # noqa: BLE001
                    log.warning("%s %s could not tokenize a request: %r", self.kind, self.name,
                                exc)
                    p.failed = ModelFailed(f"{self.kind} {self.spec.name!r} could not tokenize "
                                           "this request; the server log has the details.")
        pieces: list[Piece] = []
        for group, tokens in groups:
            arr = tokens if isinstance(tokens, Tokens) else None
            lengths = tokens.lengths if isinstance(tokens, Tokens) else tokens
            row = 0
            for p, i, j in group:
                mine = lengths[row:row + j - i]
                p.tokens += self.usage(p, mine, i)
                inputs = p.inputs
                for k in range(j - i):
                    pieces.append(Piece(int(mine[k]), next(seq), arr, row + k, inputs[i + k],
                                        p, i + k))
                row += j - i
        return pieces

    def _launch(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """Start forwards while a slot is free (depth: 2 on a GPU, 1 on the CPU)."""
        if job.oom:
            return
        if job.collecting:
            # CPU: the first batch takes the burst that keeps arriving while it is tokenized
            waiting = job.tok_fut is not None or job.untokenized
            if job.arrived and time.monotonic() - job.t0 < self.batch_linger_s:
                job.arrived = 0
                loop.call_soon(job.poke)          # look again next turn
                return
            if waiting and time.monotonic() - job.t0 < self.batch_linger_s:
                return
            job.collecting = False
            job.env0.detail["linger_s"] = round(time.monotonic() - job.t0, 6)
        job.arrived = 0
        _, fwd_pool = self._pools()
        while len(job.running) < job.depth:
            if job.ready:
                batch = job.ready.popleft()
            else:
                if not len(job.pool):
                    job.split = False
                    return
                want = job.pool.padded()
                self._note_demand(min(want, self.batch_tokens()))
                if job.running and not job.split and \
                        want < min(job.budget // 4, self._running_tokens(job)):
                    return              # a slot is free but little waits: let it gather
                if job.group > 1:
                    if self._launch_group(job, fwd_pool):
                        continue
                    return
                pieces = job.pool.take(job.budget, self._wave_rows(job, want))
                batch = Batch(pieces)
            if not self._live_only(job, batch):
                continue
            batch.launched_at = time.monotonic()
            fut = self.system.executor.run_in(
                fwd_pool, functools.partial(self._forward_blocking, batch))
            fut.add_done_callback(job.poke)
            self._started(job, batch.padded, len(batch.pieces))
            job.running[fut] = batch
            job.forwards += 1

    @staticmethod
    def _started(job: Job, tokens: int, rows: int) -> None:
        if not job.running:
            job.busy_since = time.monotonic()
        job.tokens_run += tokens
        job.rows_run += rows

    def _live_only(self, job: Job, batch: Batch) -> bool:
        """Drop the pieces of requests whose askers went away; False: none is left."""
        live = [p for p in batch.pieces if not p.owner.env.abandoned]
        if len(live) < len(batch.pieces):
            for p in batch.pieces:
                if p.owner.env.abandoned:
                    p.owner.left -= 1
                    if p.owner.left == 0:
                        self._drop(job, p.owner)
            if not live:
                return False
            batch.keep(live)
        batch.padded = len(batch.pieces) * max(p.length for p in batch.pieces)
        return True

    def _launch_group(self, job: Job, fwd_pool: Any) -> bool:
        """Layer-streamed: what waits, up to ``job.group`` forwards of ``job.budget`` tokens
        and ``job.group_tokens`` in all, as one layer-major group (one copy of each layer for
        all of them). False: nothing was left to run."""
        batches: list[Batch] = []
        total = 0
        while len(job.pool) and len(batches) < job.group and total < job.group_tokens:
            batch = Batch(job.pool.take(min(job.budget, job.group_tokens - total),
                                        job.max_rows))
            if self._live_only(job, batch):
                batches.append(batch)
                total += batch.padded
        if not batches:
            return False
        group = Group(batches)
        now = time.monotonic()
        for b in batches:
            b.launched_at = now
        fut = self.system.executor.run_in(
            fwd_pool, functools.partial(self._forward_group_blocking, group))
        fut.add_done_callback(job.poke)
        self._started(job, group.padded, sum(len(b.pieces) for b in batches))
        job.running[fut] = group
        job.forwards += len(batches)
        job.groups += len(batches) > 1
        return True

    def _wave_rows(self, job: Job, want: int) -> int:
        """Rows the next forward may take: ``max_rows``; half of a burst that starts a GPU job
        and fits one forward (``split_burst_rows``, see SPLIT_BURST_ROWS); its other half goes
        next, without waiting to gather."""
        n = len(job.pool)
        split = self.params.get("split_burst_rows", SPLIT_BURST_ROWS)
        if isinstance(split, bool):
            split = 0
        job.split = False
        # only a job's first forward: later, the waves it started keep themselves apart (each
        # gathers while the other computes); splitting again would only make them smaller
        if job.running or job.forwards or job.depth < 2 or not isinstance(split, int) or \
                split <= 0 or n < max(split, 2) or want > job.budget or n > job.max_rows or \
                len(job.live) < 2:          # one request's answer needs both halves anyway
            return job.max_rows
        job.split = True
        return (n + 1) // 2

    @staticmethod
    def _running_tokens(job: Job) -> int:
        return max((b.padded for b in job.running.values()), default=0)

    def _forward_blocking(self, batch: Batch) -> None:
        """Forward thread: one forward, its outputs written into each request's array (rows
        of one request may come from two forward threads: each writes only its own).

        On the CPU, with ``TORCH_THREADS`` auto, the forward runs with the torch thread count
        a :class:`~..runtime.thread_tuner.ThreadTuner` finds faster now, as the LLM's decode
        steps do: every core on a quiet machine, one less once another process takes a core.
        One tuner per power-of-two bucket of padded tokens (forwards of a size are compared
        with each other); a forward with more than one thread runs on a short-lived thread
        of its own (see :func:`_on_a_thread_of_its_own`). A CPU job runs one forward at a
        time, so one thread uses the tuners at once. Measured in
        benchmarks/results/cpu-peers-s3.md."""
        tuners = self._cpu_tuners()
        if tuners is None:
            self._write(batch, self._encode(batch))
            return
        tuner = tuners[pow2(max(1, batch.padded))]
        n = tuner.threads(1)
        t0 = time.perf_counter()
        if n > 1:
            out = _on_a_thread_of_its_own(n, self._encode, batch)
        else:
            apply_torch_threads(n)
            out = self._encode(batch)
        tuner.observe(1, time.perf_counter() - t0)
        self._write(batch, out)

    def _cpu_tuners(self) -> dict | None:
        """The CPU forwards' ThreadTuners by padded-token bucket, or None (a GPU forward;
        TORCH_THREADS set)."""
        if self.cpu_tuner is False:
            return None
        engine = self.engine
        if engine is None or engine.device().type != "cpu":
            return None
        if self.cpu_tuner is None:
            threads = self.cpu_thread_range()
            self.cpu_tuner = collections.defaultdict(
                functools.partial(ThreadTuner, *threads, probe_every=ENCODER_PROBE_EVERY,
                                  probe_steps=ENCODER_PROBE_STEPS, idle_s=ENCODER_IDLE_S)) \
                if threads else False
        return self.cpu_tuner if self.cpu_tuner is not False else None

    def _forward_group_blocking(self, group: Group) -> list[BaseException | None]:
        """Forward thread: a group's forwards, layer-major (its members on their own
        threads); each batch's outputs written as in :meth:`_forward_blocking`. Returns each
        batch's error (None: done)."""
        engine = self.engine
        assert engine is not None
        lease = self.lease
        runner = getattr(lease.residency, "run_group", None) if lease is not None else None
        if runner is None:
            runner = one_by_one
        outs = engine.forward_group([b.pieces for b in group], runner)
        errors: list[BaseException | None] = []
        for batch, out in zip(group, outs):
            if isinstance(out, BaseException):
                errors.append(out)
                continue
            self._write(batch, out)
            errors.append(None)
        return errors

    def _write(self, batch: Batch, out: np.ndarray) -> None:
        """(forward thread) A forward's rows into their requests' arrays; the batch ends."""
        for j, piece in enumerate(batch.pieces):
            p = piece.owner
            if p.out is None:
                with self._out_lock:
                    if p.out is None:
                        p.out = np.empty((len(p.inputs),) + out.shape[1:], dtype=np.float32)
            p.out[piece.index] = out[j]
        batch.ended = time.monotonic()

    def _encode(self, batch: Batch) -> np.ndarray:
        engine = self.engine
        assert engine is not None
        out = engine.forward(batch.pieces)
        batch.graphed = engine.graphed()
        return out

    def _harvest(self, job: Job) -> None:
        fut = job.tok_fut
        if fut is not None and fut.done():
            job.tok_fut = None
            taken, job.tok_batch = job.tok_batch, []
            try:
                pieces = fut.result()
            except Exception as exc:  # noqa: BLE001 - should not happen: failures are per request
                err = ModelFailed(f"{self.kind} {self.spec.name!r} could not tokenize: {exc}")
                for p, _i, _j in taken:
                    p.failed = err
                pieces = []
            job.pool.add([pc for pc in pieces if pc.owner.failed is None])
            now = time.monotonic()
            for p, _i, _j in taken:
                p.tokenized_at = now
                if p.failed is not None:
                    self._done(job, p)
        for fut in [f for f in job.running if f.done()]:
            entry = job.running.pop(fut)
            error = fut.exception()
            if isinstance(entry, Group):
                if error is not None:
                    errors: list = [error] * len(entry)
                else:
                    errors = fut.result()
                for batch, err in zip(entry, errors):
                    self._batch_done(job, batch, err, len(entry))
            else:
                self._batch_done(job, entry, error)
        if not job.running and job.busy_since is not None:
            job.busy_s += time.monotonic() - job.busy_since
            job.busy_since = None

    def _batch_done(self, job: Job, batch: Batch, error: BaseException | None,
                    group: int = 1) -> None:
        """A forward (alone or in a group) ended: count its rows into their requests."""
        if error is None:
            rows = self.batch_units(batch.pieces)
            per: dict[int, list] = {}
            for pc in batch.pieces:
                e = per.get(id(pc.owner))
                if e is None:
                    per[id(pc.owner)] = [pc.owner, 1]
                else:
                    e[1] += 1
            for p, k in per.values():
                p.left -= k
                p.batches += 1
                if p.widest < rows:
                    p.widest = rows
                if p.padded < batch.padded:
                    p.padded = batch.padded
                if p.grouped < group:
                    p.grouped = group
                p.graphed += batch.graphed
                if batch.launched_at > p.launched_at:
                    p.launched_at = batch.launched_at
                    p.forward_end = batch.ended
                if p.left == 0:
                    self._done(job, p)
        else:
            self._failed(job, batch, error)

    def _failed(self, job: Job, batch: Batch, exc: BaseException) -> None:
        """A forward raised: out of GPU memory -> give back, ask for more, retry once; other
        errors fail only the request they belong to (a mixed batch reruns per request)."""
        lease = self.lease
        if lease is not None and lease.on_gpu and is_oom(exc) and not batch.retry:
            job.oom.append(batch)
            return
        if is_oom(exc) and batch.retry:
            job.give_up = lease is not None and lease.on_gpu
            err: BaseException = Overloaded(
                f"{self.kind} {self.spec.name!r} ran out of GPU memory twice for a batch of "
                f"{len(batch.pieces)} input(s); retry with a smaller request.")
        elif isinstance(exc, ServiceError):
            err = exc
        else:
            owners = {id(p.owner): p.owner for p in batch.pieces}
            if len(owners) > 1 and not batch.solo:
                for owner in owners.values():
                    mine = [p for p in batch.pieces if p.owner is owner]
                    job.ready.append(Batch(mine, solo=True, retry=batch.retry))
                return
            log.error("%s %s failed on a batch: %r", self.kind, self.name, exc)
            err = ModelFailed(f"{self.kind} {self.spec.name!r} failed on this request; the "
                              "server log has the details.")
        for owner in {id(p.owner): p.owner for p in batch.pieces}.values():
            owner.failed = owner.failed or err
            self._done(job, owner)

    async def _recover(self, job: Job) -> None:
        """After a GPU out-of-memory (nothing else in flight): give the GPU back, ask for
        twice the working memory (the arbiter evicts others), retry the batches once."""
        lease = self.lease
        assert lease is not None
        job.gpu_mode = ""                   # not a measure of either GPU mode
        batches, job.oom = job.oom, []
        env = job.env0
        job.pinned = False                  # asked again below: finish() at the end
        await lease.give_back(env)
        await self.system.executor.run(empty_cache)
        working = self.working_bytes(job.items)
        arbiter = self.system.actors.get(ARBITER)
        budget = getattr(arbiter, "budget", None)
        more = 2 * working + 256 * 2**20
        if isinstance(budget, int):
            more = min(more, max(working, budget - self.weight_bytes))
        job.device = await lease.acquire(job.items, more, env)
        self.device = job.device
        for b in batches:
            b.retry = True
        job.ready.extendleft(reversed(batches))
        if not lease.on_gpu:
            job.depth = 1

    async def _give_up_gpu(self, job: Job) -> None:
        """Out of GPU memory twice: give the GPU back; the job goes on on the CPU."""
        job.give_up = False
        job.gpu_mode = ""                   # not a measure of either GPU mode
        lease = self.lease
        if lease is not None and lease.on_gpu:
            await lease.give_back(job.env0)
            await self.system.executor.run(empty_cache)
        job.device = self.device = Device.CPU
        job.depth = 1

    def _drop(self, job: Job, p: Pending) -> None:
        """The asker went away: forget the request (traced as dropped)."""
        if job.live.pop(p.env, None) is not None:
            self._trace_env(p.env, "dropped", started=p.env.started or time.monotonic())

    def _done(self, job: Job, p: Pending) -> None:
        """A request is complete (or failed): its answer is sent at the next flush."""
        if job.live.pop(p.env, None) is None:
            return
        if p.failed is not None:
            job.out.append((p.env, p.failed))
            return
        d = p.env.detail
        d[self.batch_detail] = p.widest
        d["batch_tokens"] = p.padded
        d["forwards"] = p.batches
        if p.grouped > 1:               # its forwards shared their layer copies with others
            d["layer_group"] = p.grouped
        if p.graphed:                   # forwards replayed from CUDA graphs
            d["cuda_graph_forwards"] = p.graphed
        _job_phases(d, p)
        try:
            result = self.finish(p)
        except Exception as exc:  # noqa: BLE001 - delivered to its asker
            result = exc
        job.out.append((p.env, result))

    def _flush(self, job: Job) -> None:
        out, job.out = job.out, []
        for env, result in out:
            self._deliver(env, result)


def _on_a_thread_of_its_own(threads: int, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with ``threads`` torch threads, on a thread that ends with it. OpenMP
    (GNU libgomp) keeps a team of worker threads for every thread that ran a parallel region
    with more than one, for that thread's life; with more of them than cores it shortens the
    spin-waits of every team, and the LLM's decode step (hundreds of parallel regions) slows
    by ~20%. A forward's own short-lived thread takes its team with it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            apply_torch_threads(threads)
            box["out"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            box["error"] = exc

    t = threading.Thread(target=run, name="encoder-forward", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["out"]


#: the encoders' ThreadTuner settings (runtime/thread_tuner.py): forwards come in bursts, a
#: few per size each, with pauses between: a pause of up to ``idle_s`` does not restart the
#: comparison, and a probe is three forwards (two counted), so the choice is made within a
#: burst or two (with the LLM decode loop's settings, a probe of six forwards never completed
#: and one-sentence bursts ran on one thread of two: benchmarks/embed_throughput.py fell
#: from 0.83 to 0.41 of a direct encode)
ENCODER_PROBE_EVERY = 8
ENCODER_PROBE_STEPS = 3
ENCODER_IDLE_S = 10.0


def _job_phases(d: dict, p: Pending) -> None:
    """Where a request's time in the job went, into its trace detail (seconds): ``tokenize_s``
    (from the job taking it to its last inputs tokenized), ``pool_s`` (then until its last
    forward was handed to a forward thread), ``forward_s`` (that forward, the wait for the one
    queued before it included), ``noticed_s`` (from the forward's end on its thread to the
    event loop answering: the loop's or the GIL's delay). Absent when a step did not happen
    (a request that failed before it was tokenized or run)."""
    started = p.env.started
    if not (started and p.tokenized_at):
        return
    d["tokenize_s"] = round(p.tokenized_at - started, 6)
    if p.launched_at:
        d["pool_s"] = round(max(0.0, p.launched_at - p.tokenized_at), 6)
        if p.forward_end:
            d["forward_s"] = round(p.forward_end - p.launched_at, 6)
            d["noticed_s"] = round(time.monotonic() - p.forward_end, 6)
