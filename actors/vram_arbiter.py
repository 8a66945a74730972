"""The VRAM arbiter: the only actor that decides which model holds GPU memory.

Decisions only, by message; it never touches torch. The protocol is drawn in
:mod:`agile_rag.actors.messages` (RequestGrant -> Granted, JobFinished, Trim -> Trimmed,
Revoke -> Released, Release, Yield, RevokeAllFlex, Describe); what it counts and how it
chooses what to take back is :mod:`agile_rag.actors.vram_policy`. The rules it keeps:

- A grant marks the holder busy until its JobFinished (a no-op when not busy, so actors send it
  in a ``finally``); a busy holder is never trimmed or revoked. A holder asking again is served
  at once when it fits what it holds or the extra is free. Grants shrink only by Trimmed,
  Released or Release (sent at CONTROL priority, so they never overtake the holder's own
  later RequestGrant); ``pinned`` (device: cuda) is sticky.
- Making room: free memory, then bytes on their way (revokes, trims), then idle holders'
  working memory (Trim), then whole idle models by expected cost (Revoke), a layer-streamed
  grant for an encoder when that avoids evictions or pauses, and last a Yield to a busy
  preemptible holder (the LLM's batch), asking for its cache only when that is enough
  (for the asker's smallest streamed grant, when it can stream: ``_ask_to_yield``).
- Serving order: one head at a time, by (holds memory and is blocked, priority, arrival); a
  holder that paused for a waiter queues behind it. A later waiter never overtakes the head. If
  the head can only be served by memory other blocked holders pin, the youngest of those is
  refused (:class:`GrantCancelled`, retryable): no deadlock. A request larger than the budget
  less what pinned models hold is refused at once (:class:`GrantTooLarge`: CPU). Every wait is
  bounded by ``grant_timeout`` and the asker's deadline (``DeadlineExceeded`` says why).
- ``RevokeAllFlex`` (reset_flags) fails every waiter and revokes every flex holder (busy ones
  at their JobFinished), nudging revokes that never answered.
- Several GPUs: one arbiter, one ledger per card (``budgets``; a holder and a waiter are each
  on one card, and every rule above holds per card); where a flex model goes is
  :mod:`agile_rag.actors.vram_devices`. Built with one number it is the one-GPU arbiter
  (``cuda:0``).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..runtime.actor import CONTROL, DEFER, Actor, Envelope
from ..runtime.errors import ActorStopped, DeadlineExceeded
from .messages import (
    ArbiterState,
    Describe,
    FinishJob,
    Granted,
    JobFinished,
    JobStarted,
    Release,
    Released,
    RequestGrant,
    Revoke,
    RevokeAllFlex,
    Trim,
    Trimmed,
    Yield,
)
from .vram_devices import CardLedgers, budgets_of, describe_devices, norm_device
from .vram_policy import (
    GrantCancelled,
    GrantRefused,
    GrantTooLarge,
    Holder,
    Room,
    WaitDeadline,
    Waiter,
    choose_room,
    default_budget,
    fmt,
    room_note,
    stream_need,
    stream_need_min,
    stream_total,
    weights_only,
)

log = logging.getLogger("agile_rag.arbiter")

__all__ = ["VRAMArbiter", "GrantRefused", "GrantTooLarge", "GrantCancelled", "default_budget"]


class VRAMArbiter(CardLedgers, Actor):
    def __init__(self, budget_bytes: int | Sequence[int] | Mapping[str, int], *,
                 name: str = "vram-arbiter", grant_timeout: float = 120.0,
                 deadline_grace: float = 0.05):
        super().__init__(name)
        self.budgets = budgets_of(budget_bytes)          # card -> bytes
        self.peaks = dict.fromkeys(self.budgets, 0)
        self.grant_timeout = float(grant_timeout)
        self.deadline_grace = deadline_grace     # let an asker give up before its timer fails it
        self.holders: dict[str, Holder] = {}
        # models holding nothing now: their grant rate and restore cost when they left
        self._usage: dict[str, tuple[float, float, float, float]] = {}
        self.waiters: list[Waiter] = []
        self.peak_used = 0
        self.granted_count = 0
        self.revoked_count = 0
        self.trimmed_count = 0
        self._clock = itertools.count(1)
        self._wids = itertools.count(1)
        self._current: Envelope | None = None    # the RequestGrant being handled right now
        self._current_result: Any = DEFER

    # ---- views -------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return sum(h.nbytes for h in self.holders.values())

    def state(self) -> ArbiterState:
        return ArbiterState(
            budget=self.budget, used=self.used,
            holders={m: h.nbytes for m, h in self.holders.items()},
            busy=tuple(m for m, h in self.holders.items() if h.busy),
            waiting=tuple(w.req.model for w in self._ordered()),
            devices=describe_devices(self.budgets, list(self.holders.values()), self.peaks),
            placement={m: h.device for m, h in self.holders.items()})

    # ---- messages ----------------------------------------------------------------------------
    async def handle(self, msg: Any, env: Envelope) -> Any:
        if isinstance(msg, RequestGrant):
            return self._on_request(msg, env)
        if isinstance(msg, JobFinished):
            return self._on_job_finished(msg, env)
        if isinstance(msg, Released):
            return self._on_gone(msg.model, env, reported=msg.nbytes, how="released")
        if isinstance(msg, Trimmed):
            return self._on_trimmed(msg, env)
        if isinstance(msg, Release):
            return self._on_gone(msg.model, env, reported=None, how="release")
        if isinstance(msg, WaitDeadline):
            return self._on_deadline(msg, env)
        if isinstance(msg, RevokeAllFlex):
            return self._on_revoke_all(msg, env)
        if isinstance(msg, Describe):
            return self.state()
        if isinstance(msg, JobStarted):     # not needed: a grant marks the holder busy
            return None
        return await super().handle(msg, env)

    def _on_request(self, req: RequestGrant, env: Envelope) -> Any:
        env.detail.update(model=req.model, nbytes=req.nbytes)
        if req.nbytes < 0:
            return GrantRefused(f"RequestGrant for {req.model!r} asks for a negative size "
                                f"({req.nbytes} bytes)", status=400)
        h = self.holders.get(req.model)
        if h is not None and (not req.device or norm_device(req.device) == h.device):
            h.pinned = h.pinned or req.pinned
            extra = req.nbytes - h.nbytes
            if extra <= 0 or extra <= self.free_on(h.device):
                # it holds the memory already (or the extra is free now): it is blocked while it
                # waits and pins what it holds, so serving it at once is what frees GPU soonest
                return self._grant(h.model, req, env, waited=0.0, evicted=(), actor=h.actor,
                                   device=h.device)
        w = Waiter(next(self._wids), env, req, time.monotonic())
        placed = self._place(w)
        if isinstance(placed, GrantTooLarge):
            return placed
        w.device = placed
        self.waiters.append(w)
        self._arm_timer(w, env)
        self._current, self._current_result = env, DEFER
        try:
            self._pump(env)
        finally:
            self._current = None
        result, self._current_result = self._current_result, DEFER
        if result is DEFER:
            order = [x for x in self._ordered() if x.device == w.device]
            env.detail["queued_behind"] = [x.req.model for x in order[:order.index(w)]][:8]
            env.detail["device"] = w.device
        return result

    def _on_job_finished(self, msg: JobFinished, env: Envelope) -> None:
        h = self.holders.get(msg.model)
        if h is None or not h.busy:
            env.detail["noop"] = True
            return None
        h.busy = False
        h.last_used = next(self._clock)
        env.detail["held_s"] = round(time.monotonic() - h.granted_at, 6)
        if h.revoke_when_idle:
            h.revoke_when_idle = False
            if not h.pinned and not h.revoking:
                self._revoke(h, "reset_flags: revoked after its job", env)
        self._pump(env)
        return None

    def _on_trimmed(self, msg: Trimmed, env: Envelope) -> None:
        h = self.holders.get(msg.model)
        if h is None or not h.trimming:
            env.detail["ignored"] = True
            return None
        h.trimming = False
        if not h.busy and not h.revoking:   # a busy holder keeps what its new grant counted
            env.detail["freed"] = max(0, h.nbytes - msg.nbytes)
            h.nbytes = min(h.nbytes, max(msg.nbytes, h.weights))
            h.weights = h.nbytes            # nothing left to trim until its next grant
        self._pump(env)
        return None

    def _on_gone(self, model: str, env: Envelope, *, reported: int | None, how: str) -> None:
        h = self.holders.pop(model, None)
        if h is None:
            log.info("%s: %s from %r, which holds no grant: ignored", self.name, how, model)
            env.detail["ignored"] = True
            return None
        self._usage[model] = (h.rate, h.rate_at, h.first_at, h.restore_s)
        if h.busy and not h.yield_sent:     # (a yielding batch gives it back mid-job)
            log.warning("%s: %r gave its GPU memory back while busy (%s)", self.name, model, how)
        env.detail.update(freed=h.nbytes, was_revoked=h.revoking)
        if reported is not None and reported != h.nbytes:
            env.detail["reported"] = reported
        self._pump(env)
        return None

    def _on_deadline(self, msg: WaitDeadline, env: Envelope) -> None:
        w = next((x for x in self.waiters if x.wid == msg.wid), None)
        if w is None:
            return None
        w.timer = None
        env.detail["model"] = w.req.model
        if w.env.abandoned:
            env.detail["abandoned"] = True
            self._remove_waiter(w)
        else:
            waited = time.monotonic() - w.since
            why = self._why_waiting(w)
            env.detail.update(timed_out=True, waited_s=round(waited, 3), why=why)
            self._answer(w, DeadlineExceeded(
                f"no GPU memory for {w.req.model!r} ({fmt(w.req.nbytes)}) after waiting "
                f"{waited:.1f}s (grant_timeout {self.grant_timeout:g}s): {why}"))
            # a revoked holder that never answered: ask again (each Revoke gets one Released;
            # a spare one is ignored), and forget holders whose actor is gone
            for h in [h for h in self.holders.values() if h.revoking and not h.busy]:
                env.detail.setdefault("nudged", []).append(h.model)
                self._send_revoke(h, "Revoke repeated: no Released came", env)
        self._pump(env)
        return None

    def _on_revoke_all(self, msg: RevokeAllFlex, env: Envelope) -> None:
        failed = []
        for w in list(self._ordered()):
            failed.append(w.req.model)
            self._answer(w, GrantCancelled(
                f"the wait for GPU memory for {w.req.model!r} was cancelled: {msg.reason}"))
        revoked, later, nudged = [], [], []
        for h in list(self.holders.values()):
            if h.pinned:
                continue
            if h.busy:
                h.revoke_when_idle = True
                later.append(h.model)
            elif h.revoking:
                nudged.append(h.model)     # a stuck Revoke: ask again (a holder answers each one)
                self._send_revoke(h, msg.reason, env)
            else:
                revoked.append(h.model)
                self._revoke(h, msg.reason, env)
        env.detail.update(failed_waiters=failed, revoked=revoked, revoke_after_job=later,
                          nudged=nudged)
        self._pump(env)
        return None

    # ---- the decision --------------------------------------------------------------------------
    def _ordered(self) -> list[Waiter]:
        # holders first (blocked while pinning memory), then priority, then arrival
        # (a holder that paused its job for a waiter queues behind it, like a newcomer)
        def behind(w: Waiter) -> bool:
            h = self.holders.get(w.req.model)
            return h is None or h.yielding
        return sorted(self.waiters, key=lambda w: (behind(w), w.req.priority, w.env.seq))

    def _pump(self, env: Envelope) -> None:
        """Serve each card's waiters in order until every card's head has to wait."""
        for w in [w for w in self.waiters if w.env.abandoned]:
            self._remove_waiter(w)            # the asker gave up: it blocks nobody any more
        for _ in range(10_000):           # each pass removes a waiter or changes a holder
            order = self._ordered()
            if not order:
                return
            for dev in dict.fromkeys(w.device for w in order):
                head = next(w for w in order if w.device == dev)
                if head.env.abandoned:
                    self._remove_waiter(head)
                    break
                if self._try_serve(head, order, env):
                    break
            else:
                return
        log.error("%s: _pump did not settle", self.name)   # pragma: no cover

    def _try_serve(self, w: Waiter, order: list[Waiter], env: Envelope) -> bool:
        """Serve or fail the head waiter of its card, or start making room. True: call
        again."""
        req = w.req
        mine = self.holders.get(req.model)
        if not w.committed and mine is None and req.device is None and len(self.budgets) > 1:
            placed = self._place(w)          # a card may have freed up since it asked
            if not isinstance(placed, GrantTooLarge) and placed != w.device:
                env.detail.setdefault("replaced", []).append(f"{req.model}->{placed}")
                w.device = placed
                return True
        dev = w.device
        too_big = self._too_big(req, dev)
        if too_big is not None:
            self._answer(w, too_big)
            return True
        if mine is not None and mine.device != dev:
            mine = None                      # moving cards: what it holds elsewhere is no help
        need = req.nbytes - (mine.nbytes if mine else 0)
        free = self.free_on(dev)
        if need <= free:
            self._serve(w, dev, mine.actor if mine else self._actor_name(req.model, w.env))
            return True
        blocked = {x.req.model for x in order}
        pending: list[Holder] = []
        idle: list[Holder] = []
        later: list[Holder] = []
        stuck: list[Holder] = []
        trimming: list[Holder] = []
        for h in self.holders.values():
            if h.model == req.model or h.pinned or h.device != dev:
                continue
            if h.model in blocked:
                stuck.append(h)         # waiting for our reply: cannot release until served
            elif h.revoking:
                pending.append(h)       # Released is on its way
            elif h.busy:
                later.append(h)         # revocable when its job ends (JobFinished)
            elif h.trimming:
                trimming.append(h)      # Trimmed is on its way (it may still be evicted)
                idle.append(h)
            else:
                idle.append(h)
        coming = sum(h.nbytes for h in pending) + sum(h.working for h in trimming)
        short = need - free - coming
        if short <= 0:
            return False                # wait for the Released / Trimmed already on their way
        now = time.monotonic()
        # a holder being trimmed has only its weights left to give
        offer = [h for h in idle if not h.trimming] + \
            [weights_only(h) for h in trimming]
        room = choose_room(offer, short, now)
        # an encoder that can run layer-streamed (a few layers' worth on the GPU) does so when
        # that costs less than the room a resident grant needs (evictions, a costly trim), and
        # rather than make the chats yield
        s_need = stream_need(req, mine)
        s_least = s_need                # the smallest streamed grant's bytes (None: resident)
        if s_need is not None or (room is not None and room.evictions):
            # what was weighed, in the trace (the last weighing before the answer stays)
            weighed: dict[str, Any] = {"free": free, "short": short,
                                       "resident": room_note(room, now)}
            w.env.detail["weighed"] = weighed
        if s_need is not None:
            s_short = s_need - free - coming
            s_room = choose_room(offer, s_short, now)
            weighed.update(stream_s=round(req.stream_s, 4), stream_need=s_need,
                           streamed=room_note(s_room, now))
            if s_room is not None and (room is None or
                                       s_room.cost(now) + req.stream_s < room.cost(now)):
                if s_need <= free:
                    self._serve(w, dev, self._actor_name(req.model, w.env), streamed=True)
                    return True
                if s_short <= 0:
                    return False        # what the streamed grant needs is on its way
                return self._make_room(w, s_room, env)
            # smaller streamed forwards in what is free now: more passes (copies), no wait
            s_min = stream_need_min(req, mine)
            s_least = s_min if s_min is not None else s_need
            full = stream_total(req) - req.stream_bytes
            if s_min is not None and s_min <= free:
                working = req.stream_working_min + (free - s_min)
                passes = -(-full // max(1, working))
                if room is None or req.stream_s * passes < room.cost(now):
                    self._serve(w, dev, self._actor_name(req.model, w.env), streamed=True,
                                stream_working=min(working, full))
                    return True
            # or in the room idle holders make for them (a 6 GiB card: the LLM's idle cache
            # goes, its weights stay), when that and the extra passes cost less than the
            # resident grant's room (the full streamed grant's room was not cheaper than it)
            if s_min is not None and s_min > free:
                m_short = s_min - free - coming
                if m_short <= 0 and w.committed:
                    return False        # the room it asked for is on its way
                m_room = choose_room(offer, m_short, now)
                weighed.update(stream_min_need=s_min, streamed_min=room_note(m_room, now))
                if m_room is not None and m_short > 0:
                    working = req.stream_working_min + (m_room.frees - m_short)
                    passes = -(-full // max(1, working))
                    weighed["streamed_min_passes"] = passes
                    if room is None or \
                            m_room.cost(now) + req.stream_s * passes < room.cost(now):
                        return self._make_room(w, m_room, env)
            if room is None and s_short <= sum(h.nbytes for h in idle) + \
                    sum(h.nbytes for h in later if not h.preemptible):
                self._finish_soon([h for h in later if not h.preemptible], req.model, env)
                return False            # busy encoders end on their own: no chat pauses
        if room is not None:
            return self._make_room(w, room, env)
        if sum(h.nbytes for h in idle) + sum(h.nbytes for h in later) >= short:
            least = max(1, s_least - free - coming) if s_least is not None else 0
            self._ask_to_yield(idle, later, short, req.model, env, least=least)
            # a chat pauses for it here: it stays (closing an encoder's job binds nothing)
            w.committed = any(h.yield_sent and h.preemptible for h in later)
            return False                # wait for busy holders to finish, then evict by LRU
        # the rest is pinned by holders that are themselves waiting (behind w): refuse the
        # youngest of them so they become evictable, instead of waiting for each other forever
        have = sum(h.nbytes for h in idle) + sum(h.nbytes for h in later)
        by_arrival = sorted((x for x in order if x is not w and x.req.model != req.model and
                             x.req.model in self.holders and
                             self.holders[x.req.model].device == dev),
                            key=lambda x: x.env.seq, reverse=True)
        refused = []
        for x in by_arrival:
            if have >= short:
                break
            if x.req.model in refused or x.req.model not in self.holders:
                continue
            refused.append(x.req.model)
            have += self.holders[x.req.model].nbytes
            for y in [y for y in self.waiters if y.req.model == x.req.model]:
                self._answer(y, GrantCancelled(
                    f"{y.req.model!r} holds {fmt(self.holders[y.req.model].nbytes)} of GPU "
                    f"memory that {req.model!r} (served first) needs, and cannot give it back "
                    f"while it waits for more: run this job without the GPU, or ask again"))
        env.detail.setdefault("refused_to_break_wait", []).extend(refused)
        if not refused:                   # cannot happen (see _too_big); never spin
            log.error("%s: no way to make %s for %r", self.name, fmt(short), req.model)
            return False
        return True

    def _serve(self, w: Waiter, dev: str, actor: str, **grant: Any) -> None:
        """Answer waiter ``w`` with a grant on card ``dev`` (``grant``: the streamed mode)."""
        waited = 0.0 if w.env is self._current else time.monotonic() - w.since
        self._answer(w, self._grant(w.req.model, w.req, w.env, waited=waited,
                                    evicted=tuple(w.evicted), actor=actor, device=dev, **grant))

    def _make_room(self, w: Waiter, room: Room, env: Envelope) -> bool:
        """Send the trims and revokes ``room`` says; True when bytes came free at once."""
        freed_now = False
        w.committed = True
        for h in room.trims:
            self._trim(h, f"making room for {w.req.model!r}", env)
        for h in sorted((self.holders[v.model] for v in room.evictions),
                        key=lambda h: h.last_used):
            w.evicted.append(h.model)
            freed_now |= self._revoke(h, f"making room for {w.req.model!r}", env)
        return freed_now                # an absent holder's bytes are free at once: go again

    def _ask_to_yield(self, idle: list[Holder], later: list[Holder], short: int,
                      model: str, env: Envelope, least: int = 0) -> None:
        """Busy holders that end on their own go first (asked to take no more requests into
        their job); if they and the idle ones are not enough, the preemptible busy ones (least
        recently granted first) are asked to yield. ``least``: the asker can also run
        layer-streamed with that many bytes freed: when the busy holders' caches cover that
        but not ``short``, they yield keeping their weights (a chat that just ended must not
        cost the LLM's weights a round trip for a 1-query embed that can stream)."""
        self._finish_soon([h for h in later if not h.preemptible], model, env)
        have = sum(h.nbytes for h in idle) + sum(h.nbytes for h in later if not h.preemptible)
        caches = have + sum(h.working for h in later if h.preemptible)
        if 0 < least < short and caches < short and caches >= least:
            short = least
        for h in sorted((h for h in later if h.preemptible), key=lambda h: h.granted_at):
            if have >= short:
                return
            keep = 0 < h.working and have + h.working >= short   # its cache is enough
            have += h.working if keep else h.nbytes
            if h.yield_sent:
                continue
            h.yield_sent = True
            if keep:                     # it answers Trimmed once paused
                h.trimming = h.yielding = True
            env.detail.setdefault("yield_asked", []).append(h.model)
            target = self._holder_actor(h)
            if target is not None:
                target.tell(Yield(model=h.model, reason=f"{model!r} waits for GPU memory",
                                  keep_weights=keep),
                            priority=CONTROL, sender=self.name, request_id=env.request_id)

    def _grant(self, model: str, req: RequestGrant, env: Envelope, *, waited: float,
               evicted: tuple[str, ...], actor: str, device: str,
               streamed: bool = False, stream_working: int | None = None) -> Granted:
        nbytes, weights = req.nbytes, req.weights
        if streamed:                # the streamed mode's bytes replace the weights
            nbytes, weights = stream_total(req), req.stream_bytes
            if stream_working is not None:      # smaller forwards than it asked for
                nbytes = req.stream_bytes + stream_working
        h = self.holders.get(model)
        if h is None:
            h = self.holders[model] = Holder(model, nbytes, req.pinned, actor, device=device)
            # how often it is used outlives its grants: a model evicted and admitted again
            # is as likely to be needed soon as before (else every return would make the
            # next eviction look cheap, and a 6 GiB card evicted the LLM every cycle)
            h.rate, h.rate_at, h.first_at, h.restore_s = self._usage.pop(model, (0.0,) * 4)
        elif h.device != device:            # it moved cards: its admit leaves the old one
            h.device, h.nbytes = device, nbytes
        h.nbytes = max(h.nbytes, nbytes)
        h.weights = weights if 0 < weights <= h.nbytes else 0
        h.streamed = streamed
        h.trimming = h.yielding = False     # a trim or yield in flight is moot now
        if req.restore_s > 0:
            h.restore_s = req.restore_s
        h.trim_s = req.trim_s
        h.used_now(time.monotonic())
        h.pinned = h.pinned or req.pinned
        h.preemptible = req.preemptible and not h.pinned
        h.yield_sent = False
        h.busy = True
        h.last_used = next(self._clock)
        h.granted_at = time.monotonic()
        used = self.used_on(device)
        self.peaks[device] = max(self.peaks.get(device, 0), used)
        self.peak_used = max(self.peak_used, self.used)
        if used > self.budgets.get(device, 0):   # never: every path checks; loud for the tests
            log.error("%s: INVARIANT BROKEN: %d bytes granted of a %d budget on %s",
                      self.name, used, self.budgets.get(device, 0), device)
        self.granted_count += 1
        env.detail.update(granted=h.nbytes, waited_s=round(waited, 6), used=used, device=device,
                          **({"evicted": list(evicted)} if evicted else {}),
                          **({"streamed": True} if streamed else {}),
                          **({"still_revoking": True} if h.revoking else {}))
        return Granted(model=model, nbytes=h.nbytes, waited_s=waited, evicted=evicted,
                       streamed=streamed, device=device)

    def _revoke(self, h: Holder, reason: str, env: Envelope) -> bool:
        """Ask ``h`` to give its memory back. True when its bytes are free at once."""
        h.revoking = True
        self.revoked_count += 1
        env.detail.setdefault("revoked", [])
        if h.model not in env.detail["revoked"]:
            env.detail["revoked"].append(h.model)
        return not self._send_revoke(h, reason, env)

    def _trim(self, h: Holder, reason: str, env: Envelope) -> None:
        """Ask idle ``h`` to drop its working memory and keep its weights."""
        target = self._holder_actor(h)
        if target is None:
            return
        h.trimming = True
        self.trimmed_count += 1
        env.detail.setdefault("trimmed", []).append(h.model)
        target.tell(Trim(model=h.model, keep=h.weights, reason=reason), priority=CONTROL,
                    sender=self.name, request_id=env.request_id)

    def _finish_soon(self, busy: list[Holder], model: str, env: Envelope) -> None:
        """Ask busy holders whose jobs end on their own to close their job to new requests
        (once a grant): an encoder that keeps taking requests in would hold the GPU for as
        long as they keep coming (FLEX_JOB_SLICE_S at most) while ``model`` waits."""
        for h in busy:
            if h.yield_sent:
                continue
            h.yield_sent = True
            env.detail.setdefault("finish_asked", []).append(h.model)
            target = self._holder_actor(h)
            if target is not None:
                target.tell(FinishJob(model=h.model, reason=f"{model!r} waits for GPU memory"),
                            priority=CONTROL, sender=self.name, request_id=env.request_id)

    def _holder_actor(self, h: Holder) -> Actor | None:
        """The running actor behind holder ``h`` (None: stopped or gone)."""
        actors = self.system.actors if self.system is not None else {}
        target = actors.get(h.actor)
        return None if target is None or target.stopped else target

    def _send_revoke(self, h: Holder, reason: str, env: Envelope) -> bool:
        """False: the holder's actor is gone, its bytes were treated as freed."""
        target = self._holder_actor(h)
        if target is None:
            log.warning("%s: holder %r has no running actor %r: its %s count as freed",
                        self.name, h.model, h.actor, fmt(h.nbytes))
            self.holders.pop(h.model, None)
            env.detail.setdefault("freed_absent", []).append(h.model)
            return False
        target.tell(Revoke(model=h.model, reason=reason), priority=CONTROL, sender=self.name,
                    request_id=env.request_id)
        return True

    # ---- waiters -----------------------------------------------------------------------------
    def _actor_name(self, model: str, env: Envelope) -> str:
        actors = self.system.actors if self.system is not None else {}
        if model not in actors and env.sender and env.sender in actors:
            return env.sender
        return model

    def _arm_timer(self, w: Waiter, env: Envelope) -> None:
        delay = self.grant_timeout
        if env.deadline is not None:       # the asker gives up first: drop it then
            delay = min(delay, env.deadline - time.monotonic() + self.deadline_grace)
        delay = max(delay, 0.0)
        w.timer = asyncio.get_running_loop().call_later(
            delay, self._timer_fired, w.wid)

    def _timer_fired(self, wid: int) -> None:
        if not self.stopped:
            self.tell(WaitDeadline(wid=wid), priority=CONTROL, sender=self.name)

    def _remove_waiter(self, w: Waiter) -> None:
        try:
            self.waiters.remove(w)
        except ValueError:
            return
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None

    def _answer(self, w: Waiter, result: Any) -> None:
        self._remove_waiter(w)
        if isinstance(result, BaseException):
            w.env.detail.update(refused=type(result).__name__,
                                waited_s=round(time.monotonic() - w.since, 6))
        if w.env is self._current:
            self._current_result = result
        else:
            self.reply_to(w.env, result)

    async def on_stop(self) -> None:
        for w in list(self.waiters):
            self._answer(w, ActorStopped(f"{self.name} was stopped while {w.req.model!r} "
                                         "waited for GPU memory"))
