"""The trace hook every message passes through.

Each message an actor handles becomes one :class:`TraceEvent` with its enqueue, start and end
times. Events go to a ring buffer in memory (cheap enough to stay on) and to any listeners
(a JSONL writer, metrics) registered with :meth:`Tracer.subscribe`.

This module also turns events into what a person reads: one request's timeline
(:func:`request_timeline`: queue wait, grant wait, swap, compute, reply) and the Chrome
trace-event format that Perfetto and chrome://tracing open (:func:`chrome_trace`).
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("agile_rag.tracing")

#: the pseudo-actor name of the HTTP span each request gets (recorded by the metrics middleware)
HTTP_ACTOR = "http"


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
        self.capacity = capacity
        self.events: collections.deque[TraceEvent] = collections.deque(maxlen=capacity)
        self._listeners: list[Callable[[TraceEvent], None]] = []
        self._always: list[Callable[[TraceEvent], None]] = []
        self._closers: list[Callable[[], None]] = []
        self._failed: set[int] = set()
        # wall-clock anchor so monotonic times can be shown as dates
        self.wall_offset = time.time() - time.monotonic()

    @classmethod
    def from_settings(cls, settings: Any) -> Tracer:
        """The ring buffer, plus the JSONL file when ``TRACE_FILE`` is set."""
        tracer = cls(settings.TRACE_BUFFER, settings.TRACE_ENABLED)
        path = getattr(settings, "TRACE_FILE", "")
        if settings.TRACE_ENABLED and path:
            writer = JsonlTraceWriter(path, getattr(settings, "TRACE_FILE_MAX_BYTES", 64 << 20),
                                      getattr(settings, "TRACE_FILE_BACKUPS", 5),
                                      wall_offset=tracer.wall_offset)
            tracer.subscribe(writer)
            tracer._closers.append(writer.close)
        return tracer

    def subscribe(self, fn: Callable[[TraceEvent], None], *, always: bool = False) -> None:
        """``fn(event)`` for each event, on the event loop: keep it cheap. ``always``: called
        even when tracing is off (metrics that count swaps and grants)."""
        (self._always if always else self._listeners).append(fn)

    def record(self, event: TraceEvent) -> None:
        for fn in self._always:
            self._call(fn, event)
        if not self.enabled:
            return
        self.events.append(event)
        for fn in self._listeners:
            self._call(fn, event)

    def _call(self, fn: Callable[[TraceEvent], None], event: TraceEvent) -> None:
        try:
            fn(event)
        except Exception:  # noqa: BLE001 - a listener must never break an actor
            if id(fn) not in self._failed:
                self._failed.add(id(fn))
                log.exception("trace listener %r failed (logged once)", fn)

    def close(self) -> None:
        """Flush and close the JSONL file (if any)."""
        for fn in self._closers:
            fn()
        self._closers.clear()

    def for_request(self, request_id: str) -> list[TraceEvent]:
        return sorted((e for e in self.events if e.request_id == request_id),
                      key=lambda e: e.enqueued)

    def window(self, since_s: float, now: float | None = None) -> list[TraceEvent]:
        """Events that ended in the last ``since_s`` seconds, oldest first."""
        cutoff = (time.monotonic() if now is None else now) - since_s
        return sorted((e for e in self.events if e.ended >= cutoff), key=lambda e: e.enqueued)


# ---- JSONL file with rotation ----------------------------------------------------------------
_STOP = object()


class JsonlTraceWriter:
    """A tracer listener that appends one JSON line per event to ``path``.

    The event loop only puts the event on a queue; a background thread serialises, writes and
    flushes in batches. Like ``logging.handlers.RotatingFileHandler``: when a line would take the
    file past ``max_bytes``, ``path`` becomes ``path.1`` (``path.1`` becomes ``path.2``, ...,
    keeping ``backups`` old files); ``backups=0`` starts the one file afresh instead.
    """

    def __init__(self, path: str, max_bytes: int = 64 << 20, backups: int = 5, *,
                 wall_offset: float | None = None, flush_interval: float = 0.05):
        self.path = os.path.abspath(path)
        self.max_bytes = int(max_bytes)
        self.backups = max(int(backups), 0)
        self.wall_offset = time.time() - time.monotonic() if wall_offset is None else wall_offset
        self.flush_interval = flush_interval
        self.written = 0
        self.rotations = 0
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._f = open(self.path, "ab")
        self._size = self._f.tell()
        self._thread = threading.Thread(target=self._run, name="trace-jsonl", daemon=True)
        self._thread.start()

    def __call__(self, event: TraceEvent) -> None:
        self._q.put(event)

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)

    def line(self, event: TraceEvent) -> bytes:
        import orjson

        row = event.as_dict()
        row["ts"] = round(event.enqueued + self.wall_offset, 6)   # epoch seconds
        return orjson.dumps(row, default=str, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._q.get()]
            while True:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                for item in batch:
                    if item is _STOP:
                        stop = True
                        continue
                    self._write(self.line(item))
                self._f.flush()
            except Exception:  # noqa: BLE001 - a full disk must not stop the server
                log.exception("could not write trace file %s", self.path)
            if not stop and self.flush_interval:
                time.sleep(self.flush_interval)      # let events gather: fewer, larger writes
        self._f.close()

    def _write(self, data: bytes) -> None:
        if self.max_bytes > 0 and self._size > 0 and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._f.write(data)
        self._size += len(data)
        self.written += 1

    def _rotate(self) -> None:
        self._f.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
            self._f = open(self.path, "ab")
        else:
            self._f = open(self.path, "wb")
        self._size = 0
        self.rotations += 1


# ---- what a person reads ------------------------------------------------------------------------
def kind_of(e: TraceEvent) -> str:
    """What an event is, for colours and timelines: http, compute, grant, evict, load, control."""
    if e.actor == HTTP_ACTOR:
        return "http"
    if e.msg_type == "Revoke":
        return "evict"
    if e.msg_type == "RequestGrant":
        return "grant"
    if e.msg_type == "Start":
        return "load"
    if e.sender == HTTP_ACTOR:
        return "compute"
    return "control"


def _num(detail: dict, key: str) -> float:
    value = detail.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def phases(e: TraceEvent) -> list[tuple[str, float]]:
    """How the time an actor spent on an event divides, in order: for a model job, the wait
    for a GPU grant, the host->device copy (admit), the compute and any drop of its GPU copy
    afterwards (idle_on_cpu). Durations in seconds; the lease records the first three in the
    event's detail, compute is the rest."""
    run = max(e.ended - e.started, 0.0)
    kind = kind_of(e)
    if kind == "evict":
        return [("evict", run)]
    if kind != "compute":
        return [(kind, run)]
    d = e.detail
    grant, admit, evict = _num(d, "grant_wait_s"), _num(d, "admit_s"), _num(d, "evict_s")
    out = []
    if grant:
        out.append(("grant", grant))
    if admit:
        out.append(("admit", admit))
    out.append(("compute", max(run - grant - admit - evict, 0.0)))
    if evict:
        out.append(("evict", evict))
    return out


def event_view(e: TraceEvent, t0: float, wall_offset: float) -> dict:
    """One event with readable times: offsets from the request's start and phase durations."""
    row = e.as_dict()
    row["kind"] = kind_of(e)
    row["wall"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(e.enqueued + wall_offset)) \
        + f".{int(((e.enqueued + wall_offset) % 1) * 1000):03d}"
    row["at_s"] = round(e.enqueued - t0, 6)
    row["start_at_s"] = round(e.started - t0, 6)
    row["end_at_s"] = round(e.ended - t0, 6)
    row["phases"] = {name: round(s, 6) for name, s in phases(e)}
    return row


def request_timeline(events: list[TraceEvent]) -> dict:
    """Where one request's time went: queue wait (in its model's mailbox), GPU grant wait,
    swap (weights copied in, others evicted for it), compute, and reply (serialising or
    streaming after the model finished). Seconds."""
    http = [e for e in events if e.actor == HTTP_ACTOR]
    work = [e for e in events if kind_of(e) == "compute"]
    start = min((e.enqueued for e in events), default=0.0)
    end = max((e.ended for e in events), default=0.0)
    out: dict[str, Any] = {
        "total_s": round((http[0].ended - http[0].enqueued) if http else end - start, 6),
        "queue_s": round(sum(e.started - e.enqueued for e in work), 6),
        "grant_wait_s": round(sum(_num(e.detail, "grant_wait_s") for e in work), 6),
        "swap_in_s": round(sum(_num(e.detail, "admit_s") for e in work), 6),
        "swap_in_bytes": int(sum(_num(e.detail, "admit_bytes") for e in work)),
        "evict_s": round(sum(_num(e.detail, "evict_s") for e in events), 6),
        "compute_s": round(sum(s for e in work for name, s in phases(e) if name == "compute"),
                           6),
        "reply_s": round(max(http[0].ended - max(e.ended for e in work), 0.0), 6)
        if http and work else 0.0,
    }
    evicted = [e.actor for e in events if e.msg_type == "Revoke"]
    for e in work:
        evicted += [m for m in e.detail.get("evicted") or () if m not in evicted]
    out["evicted"] = evicted
    # a chat that paused mid-generation (its batch yielded the GPU, or the KV budget was
    # full) and went on by reading its text again; a long prompt read in chunks
    out["paused"] = int(sum(_num(e.detail, "preempted") for e in work))
    out["prefill_chunks"] = int(sum(_num(e.detail, "prefill_chunks") for e in work))
    out["models"] = sorted({e.actor for e in work})
    out["devices"] = sorted({str(e.detail["gpu"]) for e in work if "gpu" in e.detail})
    if http:
        out["route"] = http[0].msg_type
        out["status"] = http[0].detail.get("status")
    out["outcome"] = "error" if any(e.outcome != "ok" for e in events) else "ok"
    return out


_PHASE_KEYS = {"grant": ("grant_wait_s", "evicted"), "admit": ("admit_bytes", "admit_s"),
               "compute": ("gpu", "batch_texts", "batch_pairs"), "evict": ("evict_s",)}


def chrome_trace(events: Iterable[TraceEvent], wall_offset: float, *,
                 process: str = "agile-rag-server") -> dict:
    """The Chrome trace-event format (JSON object form) that Perfetto and chrome://tracing open.

    One track (``tid``) per actor, named by ``thread_name`` metadata. Each message is a
    complete event (``ph: "X"``, ``ts``/``dur`` in microseconds) on its actor's track, with its
    phases (grant wait, admit, compute, evict) as nested slices; its wait in the mailbox is an
    async slice (``ph: "b"/"e"``, category ``queue``), and each HTTP request is an async slice
    (category ``http``), since both overlap others freely. ``args`` carry the request id,
    sender, outcome and the event's details."""
    events = sorted(events, key=lambda e: e.enqueued)
    t0 = events[0].enqueued if events else 0.0

    def ns(t: float) -> int:          # whole nanoseconds: nested slices stay nested exactly
        return int(round((t - t0) * 1e9))

    def us(t: float) -> float:
        return ns(t) / 1000

    def dur(b: float, end: float) -> float:
        return (ns(end) - ns(b)) / 1000

    pid = 1
    out: list[dict] = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                        "args": {"name": process}}]
    tids: dict[str, int] = {}
    first: dict[str, float] = {}
    for e in events:
        if e.actor != HTTP_ACTOR:
            first.setdefault(e.actor, e.started)
    # the arbiter first, then actors in order of their first event
    for name in sorted(first, key=lambda a: (a != "vram-arbiter", first[a], a)):
        tid = tids[name] = len(tids) + 1
        out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                    "args": {"name": name}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                    "args": {"sort_index": tid}})
    if any(e.actor == HTTP_ACTOR for e in events):
        tid = tids[HTTP_ACTOR] = len(tids) + 1
        out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                    "args": {"name": HTTP_ACTOR}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                    "args": {"sort_index": tid}})

    open_ends: dict[str, list[float]] = collections.defaultdict(list)
    nid = 0

    def async_pair(name: str, cat: str, tid: int, b: float, end: float, args: dict) -> None:
        nonlocal nid
        nid += 1
        ident = f"0x{nid:x}"
        out.append({"ph": "b", "cat": cat, "name": name, "id": ident, "pid": pid, "tid": tid,
                    "ts": us(b), "args": args})
        out.append({"ph": "e", "cat": cat, "name": name, "id": ident, "pid": pid, "tid": tid,
                    "ts": us(end)})

    by_start = sorted(events, key=lambda e: (e.started, -(e.ended - e.started)))
    for e in by_start:
        kind = kind_of(e)
        args = {"actor": e.actor, "msg": e.msg_type, "request_id": e.request_id,
                "sender": e.sender, "outcome": e.outcome, "kind": kind,
                "queue_s": round(e.started - e.enqueued, 6),
                "run_s": round(e.ended - e.started, 6), **e.detail}
        tid = tids[e.actor]
        if kind == "http":
            async_pair(e.msg_type, "http", tid, e.enqueued, e.ended, args)
            continue
        if e.started - e.enqueued > 1e-6:
            async_pair(f"{e.msg_type} queued", "queue", tid, e.enqueued, e.started,
                       {"actor": e.actor, "request_id": e.request_id, "kind": "queue"})
        stack = open_ends[e.actor]
        while stack and stack[-1] <= ns(e.started):
            stack.pop()
        if stack and ns(e.ended) > stack[-1]:
            # overlaps a slice without nesting in it (a deferred reply): an async slice instead
            async_pair(e.msg_type, kind, tid, e.started, e.ended, args)
            continue
        stack.append(ns(e.ended))
        name = e.msg_type if not e.request_id else f"{e.msg_type} {e.request_id}"
        out.append({"ph": "X", "cat": kind, "name": name, "pid": pid, "tid": tid,
                    "ts": us(e.started), "dur": dur(e.started, e.ended),
                    "args": args})
        parts = phases(e)
        if len(parts) > 1:
            t = e.started
            for part, secs in parts:
                b, end = t, min(t + secs, e.ended)
                t = end
                if end > b:
                    out.append({"ph": "X", "cat": part, "name": part, "pid": pid, "tid": tid,
                                "ts": us(b), "dur": dur(b, end),
                                "args": {"request_id": e.request_id, "kind": part,
                                         **{k: e.detail[k] for k in _PHASE_KEYS[part]
                                            if k in e.detail}}})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"process": process, "t0_epoch_s": round(t0 + wall_offset, 6),
                          "events": len(events)}}
