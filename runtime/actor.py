"""The actor core on plain asyncio.

An :class:`Actor` owns a mailbox and handles one message (or one batch of messages) at a time,
so its state needs no locks. Others talk to it only with :meth:`Actor.tell` (fire and forget)
and :meth:`Actor.ask` (a reply future with a deadline). Control messages (priority 0) overtake
queued requests (priority 1) but never interrupt the message being handled.

Actors that set ``batching = True`` receive runs of compatible queued messages together in
:meth:`Actor.handle_batch`; this is how embedders and rerankers share one forward pass.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ActorCrashed, ActorStopped, DeadlineExceeded, ServiceError
from .tracing import TraceEvent

if TYPE_CHECKING:
    from .system import ActorSystem

log = logging.getLogger("agile_rag.actor")

CONTROL = 0
NORMAL = 1
_seq = itertools.count()


class _Deadlines:
    """The deadlines of asks with a long timeout (a request's: minutes), kept in buckets of
    ``GRAIN`` seconds with one timer per bucket instead of one per ask: every request asks,
    and a timer is a heap push with Python-level comparisons. A deadline fires at most
    ``GRAIN`` late. Asks with a short timeout use their own timer."""
    GRAIN = 0.125
    SHORTEST = 2.0                    # shorter timeouts: a timer of their own, exact

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.buckets: dict[int, dict[int, tuple]] = {}

    def add(self, actor: Actor, env: Envelope, timeout: float) -> int:
        slot = math.ceil((self.loop.time() + timeout) / self.GRAIN)
        bucket = self.buckets.get(slot)
        if bucket is None:
            bucket = self.buckets[slot] = {}
            self.loop.call_at(slot * self.GRAIN, self._fire, slot)
        bucket[id(env)] = (actor, env, timeout)
        return slot

    def remove(self, slot: int, env: Envelope) -> None:
        bucket = self.buckets.get(slot)
        if bucket is not None:
            bucket.pop(id(env), None)

    def _fire(self, slot: int) -> None:
        for actor, env, timeout in self.buckets.pop(slot, {}).values():
            actor._expire(env, timeout)


_deadlines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: the last loop's _Deadlines (weakly): every ask looks it up, nearly always for the same loop
_last: list = [lambda: None]


def _deadlines_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    d = _last[0]()
    if d is not None and d.loop is loop:
        return d
    d = _deadlines.get(loop)
    if d is None:
        d = _deadlines[loop] = _Deadlines(loop)
    _last[0] = weakref.ref(d)
    return d


class _Deferred:
    def __repr__(self) -> str:
        return "DEFER"


#: Returned by ``handle`` to answer later with :meth:`Actor.reply_to` (e.g. an arbiter that
#: waits for a holder's ``Released`` without blocking its mailbox).
DEFER = _Deferred()


@dataclass(eq=False)
class Envelope:
    msg: Any
    reply: asyncio.Future | None
    request_id: str | None
    sender: str | None
    priority: int = NORMAL
    enqueued: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    seq: int = field(default_factory=lambda: next(_seq))
    started: float = 0.0
    detail: dict = field(default_factory=dict)   # handlers add trace details (bytes moved, ...)

    def __lt__(self, other: Envelope) -> bool:  # PriorityQueue order: priority, then FIFO
        if self.priority != other.priority:
            return self.priority < other.priority
        return self.seq < other.seq

    @property
    def abandoned(self) -> bool:
        """The asker gave up (deadline, cancelled client): skip the work."""
        return self.reply is not None and self.reply.done()


class Actor:
    batching = False          # True: handle_batch() gets runs of joinable messages
    max_batch = 64
    #: Batching actors only. When a joinable message finds the actor idle (nothing queued),
    #: keep collecting while more keep arriving, each within ``batch_linger_gap_s`` of the last,
    #: for at most ``batch_linger_s`` in all: requests that reach the server one by one (an
    #: HTTP burst is parsed one request at a time) then share the first forward instead of the
    #: first one running alone. A lone request waits one gap. 0 = take only what is queued.
    batch_linger_s = 0.0
    batch_linger_gap_s = 0.001

    def __init__(self, name: str):
        self.name = name
        #: set by ActorSystem.spawn before the first message; None only until then
        self.system: ActorSystem = None  # type: ignore[assignment]
        self.mailbox: asyncio.PriorityQueue[Envelope] = asyncio.PriorityQueue()
        self._held: Envelope | None = None
        self._inflight: list[Envelope] = []
        self._task: asyncio.Task | None = None
        self._started_once = False
        self.stopped = False
        self.stop_reason: str | None = None
        self.restarts: list[float] = []

    # ---- what subclasses write -------------------------------------------------------------
    async def on_start(self) -> None:
        """Runs once, before the first message (model actors load weights here)."""

    async def on_stop(self) -> None:
        """Runs when the actor is stopped (free memory here)."""

    async def handle(self, msg: Any, env: Envelope) -> Any:
        raise NotImplementedError(f"{type(self).__name__} cannot handle {type(msg).__name__}")

    def joinable(self, msg: Any) -> bool:
        """May this message share a batch with others? (only when ``batching``)"""
        return False

    def batch_fits(self, batch: list[Envelope], nxt: Envelope) -> bool:
        return len(batch) < self.max_batch

    async def handle_batch(self, envs: list[Envelope]) -> list[Any]:
        """Handle several joinable messages at once; return one result (or exception) each."""
        return [await self.handle(e.msg, e) for e in envs]

    # ---- talking to the actor ---------------------------------------------------------------
    def tell(self, msg: Any, *, request_id: str | None = None, sender: str | None = None,
             priority: int = NORMAL) -> None:
        self._put(Envelope(msg, None, request_id, sender, priority))

    async def ask(self, msg: Any, *, timeout: float | None = None, request_id: str | None = None,
                  sender: str | None = None, priority: int = NORMAL) -> Any:
        """Send ``msg`` and wait for the reply, at most ``timeout`` seconds.

        Every HTTP request passes here, so it costs one future and a deadline: the deadline
        sets :class:`DeadlineExceeded` on the reply future itself (no ``wait_for`` task, no
        ``shield``); a long one shares a timer with the others due about then (_Deadlines).
        A cancelled asker cancels the reply future, which marks the envelope abandoned: the
        actor skips it."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        env = Envelope(msg, fut, request_id, sender, priority)
        timer = None
        slot = 0
        deadlines = None
        if timeout is not None:
            env.deadline = env.enqueued + timeout
            if timeout >= _Deadlines.SHORTEST:
                deadlines = _deadlines_of(loop)
                slot = deadlines.add(self, env, timeout)
            else:
                timer = loop.call_later(timeout, self._expire, env, timeout)
        self._put(env)
        try:
            return await fut
        except asyncio.CancelledError:
            if not fut.done():
                fut.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            elif deadlines is not None:
                deadlines.remove(slot, env)

    def _expire(self, env: Envelope, timeout: float) -> None:
        """An ask's deadline passed: its reply future fails (the actor then skips the
        envelope, or ignores the late result)."""
        fut = env.reply
        if fut is None or fut.done():
            return
        where = "queued" if env.started == 0.0 else "running"
        fut.set_exception(DeadlineExceeded(
            f"{self.name} did not answer {type(env.msg).__name__} within {timeout:g}s "
            f"(it was {where}; {self.queue_length()} message(s) waiting)"))

    def queue_length(self) -> int:
        return self.mailbox.qsize() + (1 if self._held else 0)

    def _put(self, env: Envelope) -> None:
        if self.stopped:
            self._fail(env, ActorStopped(self.stop_reason or f"{self.name} is stopped"))
            return
        self.mailbox.put_nowait(env)

    # ---- the loop ------------------------------------------------------------------------------
    async def _main(self) -> None:
        if not self._started_once:
            self._started_once = True
            t0 = time.monotonic()
            outcome = "ok"
            try:
                await self.on_start()
            except Exception:
                outcome = "error"
                raise
            finally:
                self._trace_plain("Start", t0, outcome)
        while True:
            batch = await self._take()
            await self._process(batch)

    async def _take(self) -> list[Envelope]:
        while True:
            idle = self._held is None and self.mailbox.empty()
            first = self._held or await self.mailbox.get()
            self._held = None
            if not first.abandoned:
                break
            self._trace_env(first, "dropped", started=time.monotonic())
        if not (self.batching and self.joinable(first.msg)):
            return [first]
        batch = [first]
        self._drain_into(batch)
        if idle and self.batch_linger_s > 0 and self._held is None:
            await self._linger(batch)
        return batch

    def _drain_into(self, batch: list[Envelope]) -> None:
        """Move queued joinable messages into ``batch`` until one does not fit (held)."""
        while self._held is None and not self.mailbox.empty():
            nxt = self.mailbox.get_nowait()
            if nxt.abandoned:
                self._trace_env(nxt, "dropped", started=time.monotonic())
                continue
            if not self.joinable(nxt.msg) or not self.batch_fits(batch, nxt):
                self._held = nxt
                break
            batch.append(nxt)

    async def _linger(self, batch: list[Envelope]) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.batch_linger_s
        try:
            while self._held is None:
                left = end - loop.time()
                if left <= 0:
                    break
                before = len(batch)
                await asyncio.sleep(min(self.batch_linger_gap_s, left))
                self._drain_into(batch)
                if len(batch) == before:
                    break                         # a quiet gap: the burst is over
        except asyncio.CancelledError:            # stopped while waiting: nothing is lost
            for env in batch:
                self.mailbox.put_nowait(env)
            raise
        for env in batch:
            env.detail["linger_s"] = round(self.batch_linger_s - max(0.0, end - loop.time()), 6)

    async def _process(self, batch: list[Envelope]) -> None:
        now = time.monotonic()
        for env in batch:
            env.started = now
        self._inflight = batch
        if len(batch) == 1:
            try:
                results = [await self.handle(batch[0].msg, batch[0])]
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - delivered to asker
                if isinstance(exc, asyncio.CancelledError) and self._task is not None \
                        and self._task.cancelling():
                    raise
                results = [exc]
        else:
            try:
                results = await self.handle_batch(batch)
            except Exception:  # noqa: BLE001 - one bad request must not fail its batch-mates
                log.warning("%s: a batch of %d failed; retrying its requests one by one",
                            self.name, len(batch))
                results = []
                for env in batch:
                    try:
                        results.append((await self.handle_batch([env]))[0])
                    except Exception as exc:  # noqa: BLE001 - delivered to that asker
                        results.append(exc)
        self._inflight = []
        for env, res in zip(batch, results):
            self._deliver(env, res)

    def reply_to(self, env: Envelope, res: Any) -> None:
        """Answer an envelope whose ``handle`` returned ``DEFER``."""
        env.detail.pop("deferred", None)
        self._deliver(env, res)

    def _deliver(self, env: Envelope, res: Any) -> None:
        if res is DEFER:
            env.detail["deferred"] = True
            return
        failed = isinstance(res, BaseException)
        if failed and not isinstance(res, ServiceError):
            log.exception("%s failed on %s", self.name, type(env.msg).__name__, exc_info=res)
        self._trace_env(env, "error" if failed else "ok", error=res if failed else None)
        fut = env.reply
        if fut is None or fut.done():
            return
        if failed:
            fut.set_exception(res)
        else:
            fut.set_result(res)

    def _fail(self, env: Envelope, err: BaseException) -> None:
        if env.reply is not None and not env.reply.done():
            env.reply.set_exception(err)
        self._trace_env(env, "error", started=env.started or time.monotonic(), error=err)

    # ---- supervision hooks (called by ActorSystem) -----------------------------------------
    def _crashed(self, exc: BaseException) -> None:
        """Fail what was in flight; queued messages stay for the restarted actor."""
        err = ActorCrashed(f"{self.name} crashed while handling this request: {exc!r}; "
                           "it has been restarted")
        for env in self._inflight:
            self._fail(env, err)
        self._inflight = []

    def _fail_all(self, err: BaseException) -> None:
        for env in self._inflight:
            self._fail(env, err)
        self._inflight = []
        if self._held:
            self._fail(self._held, err)
            self._held = None
        while not self.mailbox.empty():
            self._fail(self.mailbox.get_nowait(), err)

    # ---- tracing -------------------------------------------------------------------------------
    def _trace_env(self, env: Envelope, outcome: str, *, started: float | None = None,
                   error: BaseException | None = None) -> None:
        if self.system is None:
            return
        detail = dict(env.detail)
        if error is not None:
            detail["error"] = str(error)[:300]
        self.system.tracer.record(TraceEvent(
            self.name, type(env.msg).__name__, env.request_id, env.sender, env.enqueued,
            started if started is not None else env.started, time.monotonic(), outcome, detail))

    def _trace_plain(self, what: str, t0: float, outcome: str, **detail: Any) -> None:
        if self.system is not None:
            self.system.tracer.record(TraceEvent(self.name, what, None, None, t0, t0,
                                                 time.monotonic(), outcome, detail))
