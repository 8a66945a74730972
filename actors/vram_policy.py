"""What the VRAM arbiter counts and how it chooses what to take back: no actor, no torch.

A holder's grant has two parts that cost very differently to give back:

- **working memory** (``nbytes - weights``: an LLM's KV cache, activations): an idle holder
  drops it at once and allocates it again with its next job. Taking it costs next to nothing;
  the arbiter asks for it with ``Trim``.
- **weights**: giving them back means copying them to the GPU again later (the holder tells
  its measured ``restore_s``: the copy, plus what else it loses, e.g. an LLM's CUDA graphs),
  so the arbiter asks for them with ``Revoke`` only when trims cannot make the room.

The rule (:func:`choose_room`): to free ``short`` bytes from idle holders, take the evictions
plus trims with the least expected cost that make the room (for each set of evictions, the
cheapest trims of the others that cover the rest). The expected cost of evicting a model is
what bringing it back costs (``restore_s``) times how soon it is likely needed: its recent grant
rate (an exponentially decayed count of grants, time constant ``RATE_TAU_S``, over the part
of that window since the model was first used: a server up for seconds knows its rates),
never its age alone. The rate is the model's, not its grant's: it is kept while the model
holds nothing, so a model evicted and admitted again is as costly to evict as before. A trim
costs what the holder says it loses (``trim_s``: an LLM whose KV cache is not at a stable
address captures its CUDA graphs again), at least ``TRIM_SHARE`` of its restore cost, times
the same rate. Ties go to moving fewer bytes. With up to ``EXACT_MAX`` idle holders the best
set is found exactly; beyond that, evictions are chosen greedily by cost per byte.

A layer-streamed grant (an encoder's few layers' worth) is weighed against this room by the
arbiter: its own cost is the asker's ``stream_s`` (the copies its pass adds, or, once the
encoder has timed jobs of both modes, how much longer its streamed jobs measured) plus the room
it needs in turn. When that was not the cheaper, the asker's smallest streamed grant
(``stream_working_min``: smaller forwards, more passes) is weighed too, in the room idle holders
can make for it: it is taken when that room plus ``stream_s`` per pass costs less than the
resident grant's room (a 6 GiB card: the LLM's idle cache is trimmed, its weights are not
evicted; ``VRAMArbiter._try_serve``).
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ..runtime.errors import ServiceError
from .messages import RequestGrant

log = logging.getLogger("agile_rag.arbiter")

RATE_TAU_S = 30.0            # a model's grant rate forgets with this time constant
RATE_FLOOR = 1.0 / 600       # a model not used for long still costs something to bring back
RATE_MIN_SPAN_S = 3.0        # a model first used this recently counts as seen this long
COPY_BYTES_PER_S = 20e9      # restore estimate when a holder has not measured its own
EXACT_MAX = 12               # idle holders up to which the cheapest eviction set is exact
TRIM_SHARE = 0.01            # a trim's least cost, as a share of the holder's restore cost


# ---- errors a grant ask can end with (besides runtime.errors.DeadlineExceeded) ------------------
class GrantRefused(ServiceError):
    """No GPU memory for this request: the model actor runs the job on CPU instead."""
    status = 503
    type = "server_error"
    code = "gpu_grant_refused"


class GrantTooLarge(GrantRefused):
    """Even alone (with only the pinned models) the model does not fit the VRAM budget."""
    code = "gpu_budget_too_small"
    retryable = False


class GrantCancelled(GrantRefused):
    """The wait was cancelled: reset_flags, or the asker pinned memory another waiter needs."""
    code = "gpu_grant_cancelled"


def default_budget(total_mb: int = 0, redundancy: float = 0.15) -> int:
    """The arbiter's budget in bytes from the cold configs (TOTAL_CUDA_MEMORY, MEMORY_REDUNDANCY).

    ``total_mb`` > 0: that many MB; otherwise the card's free memory now (0 without CUDA, so
    every grant is refused and models stay on CPU). Then keep ``redundancy`` of it free.
    """
    if total_mb and total_mb > 0:
        base = int(total_mb) * 1024 * 1024
    else:
        base = 0
        try:
            import torch
            if torch.cuda.is_available():
                base, _total = torch.cuda.mem_get_info()
        except Exception:  # noqa: BLE001 - no torch / broken driver: no GPU budget
            log.warning("cannot read free CUDA memory; the VRAM budget is 0", exc_info=True)
            base = 0
    redundancy = min(max(float(redundancy), 0.0), 1.0)
    return int(base * (1.0 - redundancy))


def fmt(n: int) -> str:
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n} B"


@dataclass(eq=False)
class Holder:
    model: str
    nbytes: int
    pinned: bool
    actor: str                      # the actor name Revoke / Trim go to
    device: str = "cuda:0"          # the card its grant is on (vram_devices.py)
    weights: int = 0                # the part that is costly to give back (0: all of nbytes)
    restore_s: float = 0.0          # the holder's own figure for bringing its weights back
    busy: bool = False              # granted, JobFinished not yet in: never revoked, never free
    revoking: bool = False          # Revoke sent; its bytes count as used until Released
    trimming: bool = False          # Trim sent; its working bytes count until Trimmed
    revoke_when_idle: bool = False  # RevokeAllFlex reached it while busy
    last_used: int = 0              # LRU clock
    granted_at: float = 0.0
    preemptible: bool = False       # its job pauses on a Yield (asked for by its last grant)
    yield_sent: bool = False        # one Yield per grant
    rate: float = 0.0               # decayed count of grants / RATE_TAU_S (see rate_now)
    rate_at: float = 0.0
    first_at: float = 0.0           # its first grant (the span the rate is an average over)
    streamed: bool = False          # its last grant was for the layer-streamed mode
    yielding: bool = False          # paused its job for a waiter, keeping its weights
    trim_s: float = 0.0             # the holder's own figure for what a Trim costs it

    @property
    def working(self) -> int:
        """Bytes an idle holder gives back on a Trim."""
        return max(0, self.nbytes - self.weights) if self.weights else 0

    def used_now(self, now: float) -> None:
        """Count one grant in the decayed rate."""
        self.rate = self._decayed(now) + 1.0 / RATE_TAU_S
        self.rate_at = now
        self.first_at = self.first_at or now

    def _decayed(self, now: float) -> float:
        if not self.rate_at:
            return 0.0
        return self.rate * math.exp(-max(0.0, now - self.rate_at) / RATE_TAU_S)

    def rate_now(self, now: float) -> float:
        """Grants per second lately: the decayed count over the part of the last
        ``RATE_TAU_S`` the model was seen in (a model used twice a second since the server
        started 3 s ago has a rate of 2, not of the 0.2 a full window would give)."""
        decayed = self._decayed(now)
        if not decayed:
            return 0.0
        seen = max(now - self.first_at, RATE_MIN_SPAN_S) if self.first_at else RATE_TAU_S
        return decayed / -math.expm1(-seen / RATE_TAU_S)

    def restore_cost(self) -> float:
        """Seconds it takes this holder to have its weights on the GPU again."""
        if self.restore_s > 0:
            return self.restore_s
        return (self.weights or self.nbytes) / COPY_BYTES_PER_S

    def evict_cost(self, now: float) -> float:
        """Expected seconds lost by evicting it: restore cost x how soon it is needed."""
        return self.restore_cost() * (self.rate_now(now) + RATE_FLOOR)

    def trim_cost(self, now: float) -> float:
        """Working memory is allocated again with the next job: nearly free (a token cost so
        that among trims the least used holders go first), unless the holder says what else
        it loses with it (``trim_s``: an LLM's CUDA graphs are captured against its KV cache)."""
        return max(self.trim_s, TRIM_SHARE * self.restore_cost()) * \
            (self.rate_now(now) + RATE_FLOOR)


@dataclass(frozen=True, kw_only=True)
class WaitDeadline:
    """A waiter's deadline timer fired (the arbiter's self-tell, CONTROL priority)."""
    wid: int


@dataclass(eq=False)
class Waiter:
    """A RequestGrant the arbiter has not answered yet."""
    wid: int
    env: Any                        # runtime.actor.Envelope of the ask
    req: RequestGrant
    since: float
    timer: Any = None               # asyncio.TimerHandle of its deadline
    evicted: list[str] = field(default_factory=list)
    device: str = "cuda:0"          # the card it waits for (vram_devices.py)
    committed: bool = False         # room is being made for it there: it is placed for good


@dataclass(frozen=True, kw_only=True)
class Room:
    trims: tuple[Holder, ...] = ()
    evictions: tuple[Holder, ...] = ()

    @property
    def frees(self) -> int:
        return sum(h.nbytes for h in self.evictions) + sum(h.working for h in self.trims)

    def cost(self, now: float) -> float:
        """Expected seconds lost to its evictions and trims."""
        return sum(h.evict_cost(now) for h in self.evictions) + \
            sum(h.trim_cost(now) for h in self.trims)


def room_note(room: Room | None, now: float) -> dict[str, Any] | None:
    """A room for the trace: its expected cost, who it evicts and trims, and why (each
    holder's restore and trim seconds and its grant rate); None: no room."""
    if room is None:
        return None
    return {"cost_s": round(room.cost(now), 4),
            "evict": {h.model: [round(h.restore_cost(), 4), round(h.rate_now(now), 3)]
                      for h in room.evictions},
            "trim": {h.model: [round(h.trim_s, 4), round(h.rate_now(now), 3)]
                     for h in room.trims}}


def choose_room(idle: list[Holder], short: int, now: float) -> Room | None:
    """Which idle holders give what so that ``short`` bytes come free (see the module
    docstring); None when all of them together cannot."""
    if short <= 0:
        return Room()
    if sum(h.nbytes for h in idle) < short:
        return None
    if len(idle) <= EXACT_MAX:
        best: tuple[float, int, Room] | None = None
        for k in range(0, len(idle) + 1):
            for chosen in itertools.combinations(idle, k):
                room = _with_trims(idle, chosen, short, now)
                if room is None:
                    continue
                key = (room.cost(now), sum(h.weights or h.nbytes for h in chosen), room)
                if best is None or key[:2] < best[:2]:
                    best = key
        if best is not None:
            return best[2]
    return _with_trims(idle, tuple(_cheapest_evictions(idle, short, now)), short, now)


def _with_trims(idle: list[Holder], evictions: tuple[Holder, ...], short: int,
                now: float) -> Room | None:
    """``evictions`` plus the cheapest trims of the other holders that make ``short`` bytes;
    None when even every trim is not enough."""
    kept = [h for h in idle if h not in evictions]
    need = short - sum(h.nbytes for h in evictions)
    if need > sum(h.working for h in kept):
        return None
    trims: list[Holder] = []
    for h in sorted((h for h in kept if h.working > 0),
                    key=lambda h: (h.trim_cost(now) / h.working, -h.working)):
        if need <= 0:
            break
        trims.append(h)
        need -= h.working
    for h in sorted(trims, key=lambda h: -h.trim_cost(now)):    # drop needless trims
        if need + h.working <= 0:
            trims.remove(h)
            need += h.working
    return Room(trims=tuple(trims), evictions=tuple(evictions))


def _cheapest_evictions(idle: list[Holder], short: int, now: float) -> list[Holder]:
    trimmable = sum(h.working for h in idle)

    def covers(chosen: tuple[Holder, ...]) -> bool:
        return sum(h.nbytes for h in chosen) + trimmable - sum(h.working for h in chosen) \
            >= short

    if covers(()):
        return []
    if len(idle) <= EXACT_MAX:
        best: tuple[float, int, tuple[Holder, ...]] | None = None
        for k in range(1, len(idle) + 1):
            for chosen in itertools.combinations(idle, k):
                if not covers(chosen):
                    continue
                key = (sum(h.evict_cost(now) for h in chosen),
                       sum(h.weights or h.nbytes for h in chosen), chosen)
                if best is None or key[:2] < best[:2]:
                    best = key
        return list(best[2]) if best is not None else list(idle)
    chosen_list: list[Holder] = []
    for h in sorted(idle, key=lambda h: h.evict_cost(now) / max(1, h.weights or h.nbytes)):
        if covers(tuple(chosen_list)):
            break
        chosen_list.append(h)
    for h in sorted(chosen_list, key=lambda h: -h.evict_cost(now)):   # drop needless ones
        rest = tuple(x for x in chosen_list if x is not h)
        if covers(rest):
            chosen_list.remove(h)
    return chosen_list


def why_waiting(model: str, ahead: list[tuple[str, int]], holders: list[Holder],
                pinned: list[Holder], budget: int, now: float) -> str:
    """Why ``model``'s grant is not served yet, in words (for DeadlineExceeded and traces)."""
    parts = []
    if ahead:
        parts.append("queued behind " + ", ".join(f"{m} ({fmt(n)})" for m, n in ahead))
    busy = [h for h in holders if h.busy and not h.pinned and h.model != model]
    if busy:
        parts.append("waiting for busy holder(s) to finish their job: " + ", ".join(
            f"{h.model} ({fmt(h.nbytes)}, busy {now - h.granted_at:.1f}s)" for h in busy))
    revoking = [h for h in holders if h.revoking and not h.busy]
    if revoking:
        parts.append("revoked holder(s) never answered Released: " + ", ".join(
            f"{h.model} ({fmt(h.nbytes)})" for h in revoking))
    if pinned:
        parts.append("pinned: " + ", ".join(f"{h.model} ({fmt(h.nbytes)})" for h in pinned))
    used = sum(h.nbytes for h in holders)
    parts.append(f"budget {fmt(budget)}, used {fmt(used)}, free {fmt(budget - used)}")
    return "; ".join(parts)


def weights_only(h: Holder) -> Holder:
    """A holder being trimmed, as :func:`choose_room` sees it: only its weights left."""
    return Holder(h.model, h.weights or h.nbytes, h.pinned, h.actor, weights=0,
                  restore_s=h.restore_s, rate=h.rate, rate_at=h.rate_at,
                  first_at=h.first_at, trim_s=h.trim_s)


def stream_need(req: RequestGrant, mine: Holder | None) -> int | None:
    """Bytes still needed for a layer-streamed grant (None: the model cannot stream)."""
    if not req.stream_bytes or req.pinned or req.stream_bytes >= (req.weights or req.nbytes):
        return None
    return stream_total(req) - (mine.nbytes if mine else 0)


def stream_need_min(req: RequestGrant, mine: Holder | None) -> int | None:
    """Bytes still needed for the smallest streamed grant the asker can run with (smaller
    forwards: ``stream_working_min``); None: it cannot stream, or not with less."""
    full = stream_need(req, mine)
    if full is None or not req.stream_working_min:
        return None
    least = full - stream_total(req) + req.stream_bytes + req.stream_working_min
    return least if least < full else None


def stream_total(req: RequestGrant) -> int:
    """A streamed grant's bytes: the streamed mode's parts plus the job's streamed working
    memory (``stream_working``, or the resident job's when it gave none)."""
    working = req.stream_working or max(0, req.nbytes - (req.weights or req.nbytes))
    return req.stream_bytes + working
