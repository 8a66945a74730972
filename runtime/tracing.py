"""The trace hook every message passes through.

Each message an actor handles becomes one :class:`TraceEvent` with its enqueue, start and end
times. Events go to a ring buffer in memory (cheap enough to stay on) and to any listeners
(a JSONL writer, metrics) registered with :meth:`Tracer.subscribe`.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(slots=True)
class TraceEvent:
    actor: str
    msg_type: str
    request_id: str | None
    sender: str | None
    enqueued: float          # time.monotonic() seconds
    started: float
    ended: float
    outcome: str = "ok"      # ok | error | dropped | crashed
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"actor": self.actor, "msg": self.msg_type, "request_id": self.request_id,
                "sender": self.sender, "enqueued": self.enqueued, "started": self.started,
                "ended": self.ended, "queue_s": round(self.started - self.enqueued, 6),
                "run_s": round(self.ended - self.started, 6), "outcome": self.outcome,
                **({"detail": self.detail} if self.detail else {})}


class Tracer:
    def __init__(self, capacity: int = 20000, enabled: bool = True):
        self.enabled = enabled
        self.events: collections.deque[TraceEvent] = collections.deque(maxlen=capacity)
        self._listeners: list[Callable[[TraceEvent], None]] = []
        # wall-clock anchor so monotonic times can be shown as dates
        self.wall_offset = time.time() - time.monotonic()

    def subscribe(self, fn: Callable[[TraceEvent], None]) -> None:
        self._listeners.append(fn)

    def record(self, event: TraceEvent) -> None:
        if not self.enabled:
            return
        self.events.append(event)
        for fn in self._listeners:
            fn(event)

    def for_request(self, request_id: str) -> list[TraceEvent]:
        return sorted((e for e in self.events if e.request_id == request_id),
                      key=lambda e: e.enqueued)
