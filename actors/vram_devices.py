"""Several GPUs under one VRAM arbiter: the cards' budgets and where a flex model goes.

The design: **one arbiter, one ledger per card**. Every holder is on exactly one card
(``Holder.device``), every waiter waits for one card (``Waiter.device``), and each card keeps
the one-GPU rules on its own: its budget, its queue (one head at a time), its evictions, trims
and yields, its deadlock breaking. One actor keeps the decision in one place: placing a flex
model compares the cards' states as they are now, with no messages between arbiters that
could race (a card's room changing while another arbiter is asked about it).

Placement (:func:`placement_key`, lowest wins):

- a model that names its card (``device: "cuda:1"``; ``cuda`` is ``cuda:0``) goes there, and
  a model that already holds memory on a card stays on it;
- a flex model goes, first, to a card where it fits in free memory now with nobody queued
  ahead of it (the one with the most memory left after it);
- else to the card where making room costs least, by the cost rule of
  :mod:`agile_rag.actors.vram_policy` (idle working memory first, then whole idle models by
  the expected cost of bringing them back), ties to fewer bytes moved, then more free memory;
- else (only busy holders or a queue stand in the way) to the card with the fewest waiters
  ahead, then the most memory that is free or held by flex holders;
- until room is being made for it (a revoke, trim or yield sent on its behalf) a waiting flex
  model that holds nothing is placed again each time its turn comes, so a card that frees up
  meanwhile takes it.

A card the model cannot fit on even alone (its budget less what pinned models hold there) is
never chosen; when it fits on none, the grant is refused (:class:`GrantTooLarge`: CPU).
On a one-GPU server there is one card, ``cuda:0``, and every rule above is the one-GPU rule.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .messages import RequestGrant
from .vram_policy import (
    GrantTooLarge,
    Holder,
    Waiter,
    choose_room,
    default_budget,
    fmt,
    stream_need,
    weights_only,
    why_waiting,
)

log = logging.getLogger("agile_rag.arbiter")

DEFAULT_DEVICE = "cuda:0"


def budgets_of(budget: int | Sequence[int] | Mapping[str, int]) -> dict[str, int]:
    """The arbiter's per-card budgets from what it was built with: one number (one card,
    ``cuda:0``), a list (``cuda:0``, ``cuda:1``, ...) or a mapping of card name to bytes."""
    if isinstance(budget, Mapping):
        return {str(norm_device(d)): max(int(b), 0) for d, b in budget.items()}
    if isinstance(budget, (int, float)):
        return {DEFAULT_DEVICE: max(int(budget), 0)}
    return {f"cuda:{i}": max(int(b), 0) for i, b in enumerate(budget)}


def norm_device(device: Any) -> str:
    """``cuda`` is ``cuda:0``; ``cuda:N`` stays."""
    text = str(device)
    return DEFAULT_DEVICE if text == "cuda" else text


def device_budgets(total: int | Sequence[int], redundancy: float = 0.15,
                   count: int | None = None) -> dict[str, int]:
    """Per-card budgets in bytes from the cold configs.

    ``TOTAL_CUDA_MEMORY`` is MB per card: one number for every card (0: each card's free
    memory now), or a list, one entry per card in index order (0: that card's free memory);
    cards past the end of a list get no budget (the server leaves them alone). Each budget
    then keeps ``MEMORY_REDUNDANCY`` of itself free. No CUDA: ``{"cuda:0": 0}`` (every grant
    refused, every model on the CPU)."""
    if count is None:
        count = _cuda_count()
    if isinstance(total, int):
        per = [total] * max(count, 1)
    else:
        per = [int(x or 0) for x in total][:max(count, 1)]
    out = {}
    for i, mb in enumerate(per):
        out[f"cuda:{i}"] = _budget_of_card(i, mb, redundancy) if count else 0
    return out


def _cuda_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch / broken driver: no GPU
        log.warning("cannot count CUDA devices; no GPU budget", exc_info=True)
        return 0


def _budget_of_card(index: int, mb: int, redundancy: float) -> int:
    return default_budget(mb, redundancy) if mb > 0 else _free_budget(index, redundancy)


def _free_budget(index: int, redundancy: float) -> int:
    try:
        import torch
        free, _total = torch.cuda.mem_get_info(index)
    except Exception:  # noqa: BLE001
        log.warning("cannot read free memory of cuda:%d; its budget is 0", index, exc_info=True)
        return 0
    return int(free * (1.0 - min(max(float(redundancy), 0.0), 1.0)))


def placement_key(need: int, free: int, ahead: int, idle: list[Holder], busy: list[Holder],
                  now: float) -> tuple:
    """How much it costs to admit ``need`` bytes on one card (lower is better; see the module
    docstring). ``free``: the card's free bytes; ``ahead``: waiters queued there before this
    one; ``idle``: idle flex holders there (the ones :func:`choose_room` may take from);
    ``busy``: busy flex holders there."""
    if ahead == 0 and need <= free:
        return (0, 0.0, 0, -(free - need))
    short = need - free
    room = choose_room(idle, short, now) if ahead == 0 else None
    if room is not None:
        moved = sum(h.weights or h.nbytes for h in room.evictions)
        return (1, room.cost(now), moved, -free)
    could = free + sum(h.nbytes for h in idle) + sum(h.nbytes for h in busy)
    return (2, ahead, 0.0, -could)


def describe_devices(budgets: Mapping[str, int], holders: list[Holder],
                     peaks: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Per card: budget, used, free and peak bytes (for Describe, /health, /metrics)."""
    out = {}
    for d, b in budgets.items():
        used = sum(h.nbytes for h in holders if h.device == d)
        out[d] = {"budget": b, "used": used, "free": b - used, "peak": int(peaks.get(d, 0))}
    return out


class CardLedgers:
    """The VRAM arbiter's per-card views and placement (a mixin: the arbiter keeps
    ``budgets``, ``holders`` and ``waiters``; this reads them)."""

    budgets: dict[str, int]
    holders: dict[str, Holder]
    waiters: list[Waiter]

    def _ordered(self) -> list[Waiter]:
        raise NotImplementedError

    @property
    def budget(self) -> int:
        """All cards' budgets together (the one card's on a one-GPU server)."""
        return sum(self.budgets.values())

    @budget.setter
    def budget(self, value: int) -> None:
        if len(self.budgets) != 1:
            raise ValueError("several cards: set budgets[card] instead")
        self.budgets[next(iter(self.budgets))] = max(int(value), 0)

    def used_on(self, dev: str) -> int:
        return sum(h.nbytes for h in self.holders.values() if h.device == dev)

    def free_on(self, dev: str) -> int:
        return self.budgets.get(dev, 0) - self.used_on(dev)

    def _pinned_others(self, model: str, dev: str) -> list[Holder]:
        return [h for h in self.holders.values()
                if h.pinned and h.model != model and h.device == dev]

    def _too_big(self, req: RequestGrant, dev: str) -> GrantTooLarge | None:
        if dev not in self.budgets:
            return GrantTooLarge(
                f"{req.model!r} asks for GPU {dev}, which this server does not have (cards: "
                f"{', '.join(self.budgets)}): it runs on CPU")
        budget = self.budgets[dev]
        pinned = self._pinned_others(req.model, dev)
        room = budget - sum(h.nbytes for h in pinned)
        streamed = stream_need(req, None)
        if req.nbytes <= room or (streamed is not None and streamed <= room):
            return None
        names = ", ".join(f"{h.model} {fmt(h.nbytes)}" for h in pinned) or "none"
        card = f" of {dev}" if len(self.budgets) > 1 else ""
        return GrantTooLarge(
            f"{req.model!r} needs {fmt(req.nbytes)} of GPU memory but the VRAM budget{card} is "
            f"{fmt(budget)} and pinned (device: cuda) models hold "
            f"{fmt(budget - room)} ({names}): it cannot fit even after evicting every flex "
            f"model, so it runs on CPU")

    def _place(self, w: Waiter) -> str | GrantTooLarge:
        """The card ``w`` waits for (see vram_devices.py), or why it fits on none."""
        req = w.req
        mine = self.holders.get(req.model)
        fixed = norm_device(req.device) if req.device else (mine.device if mine else None)
        if fixed is not None or len(self.budgets) == 1:
            dev = fixed or next(iter(self.budgets))
            return self._too_big(req, dev) or dev
        fits = [d for d in self.budgets if self._too_big(req, d) is None]
        if not fits:
            refusal = self._too_big(req, max(self.budgets, key=lambda d: self.budgets[d]))
            assert refusal is not None
            return refusal
        if len(fits) == 1:
            return fits[0]
        now = time.monotonic()
        blocked = {x.req.model for x in self.waiters}

        def key(d: str) -> tuple:
            here = [h for h in self.holders.values() if h.device == d and not h.pinned and
                    h.model not in blocked and not h.revoking]
            idle = [weights_only(h) if h.trimming else h for h in here if not h.busy]
            busy = [h for h in here if h.busy]
            ahead = sum(1 for x in self.waiters if x is not w and x.device == d)
            return placement_key(req.nbytes, self.free_on(d), ahead, idle, busy, now) + \
                (d != w.device,)                # ties: stay where it is
        return min(fits, key=key)

    def _why_waiting(self, w: Waiter) -> str:
        dev = w.device
        order = [x for x in self._ordered() if x.device == dev]
        ahead = order[:order.index(w)] if w in order else []
        why = why_waiting(w.req.model, [(x.req.model, x.req.nbytes) for x in ahead],
                          [h for h in self.holders.values() if h.device == dev],
                          self._pinned_others(w.req.model, dev), self.budgets.get(dev, 0),
                          time.monotonic())
        return f"on {dev}: {why}" if len(self.budgets) > 1 else why
