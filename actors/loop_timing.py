"""Where the batch loop's time goes, by kind of work (admits, prefill chunks, decode steps),
for the ``BatchIdle`` trace detail (actors/llm_batching.py):

- ``<kind>_s``: host seconds from the forward's start to its sampled tokens (a chunk that does
  not land yet: to its last launch);
- ``<kind>_launch_s``: host seconds until the forward's kernels were queued;
- ``<kind>_gpu_s`` (on a GPU): seconds between two CUDA events recorded around the forward on
  its stream. Read once the end event is done, never by a sync of its own;
- ``<kind>_gap_s`` (on a GPU): seconds on the stream between the previous forward's end event
  and this one's start event: the small work queued between them (sampling, rows moved, inputs
  copied) and the time the GPU had nothing queued, waiting for the host. Next to the engine
  alone, a served burst's larger gaps are its GPU idle (the loop's time not in ``_gpu_s``);
- ``device_allocs`` (on a GPU): new segments the caching allocator took from the driver during
  the loop (each a ``cudaMalloc``, milliseconds on the forward's path), and
  ``<kind>_device_allocs`` those taken from an admit's or a chunk's start to its tokens
  (decode steps replay graphs and are not counted, to keep the read off every step);
  ``admit_alloc_shapes``: ``[rows, longest prompt, new segments, of them small-pool ones,
  MB]`` of the first admits that took any (which prefill shapes a warm-up missed);
- ``admit_passes`` (in actors/llm_batching.py): ``[rows, longest prompt, ms from the loop's
  start to the pass's launch, ms its launch took]`` of the loop's first prefill passes (how a
  burst was read), and ``burst_wait_s`` the loop's waits for prompts still being encoded while
  a burst was read (``BatchEngine._bursting``);
- ``lead_s``: host seconds from the loop's start to its first forward's start (prompts encoded,
  the first plan made; with the GPU idle), and ``tail_s`` from its last forward's tokens to the
  loop's end (the last text read, the rows retired).

Read together: launch close to the total means the host's Python sets the pace; GPU time close
to the total with a short launch means the GPU does (the model's compute, or kernels that share
the card); a total well above both means the forward waited for work queued before it.
"""
from __future__ import annotations

import time
from typing import Any

import torch

#: a forward's start: (monotonic seconds, its CUDA start event or None, the allocator's
#: (segments, small-pool segments, bytes) then, when counted)
Mark = tuple[float, Any, tuple[int, int, int] | None]


def add_time(stats: dict, key: str, seconds: float) -> None:
    stats[key] = stats.get(key, 0.0) + seconds


class LoopTiming:
    """One loop's timers (its thread only)."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        #: (stats key, first event, second event): GPU seconds to add once the second is done
        self._pending: list[tuple[str, Any, Any]] = []
        #: the end event of the last forward launched (gaps are measured from it)
        self._last_end: Any = None
        self._allocs0 = device_allocs() if on_gpu else None
        #: new segments the last forward counted by :meth:`done` took (0 when not counted),
        #: and of them (small-pool segments, MB)
        self.last_allocs = 0
        self.last_alloc_detail = (0, 0.0)
        #: the loop's start, its first forward's start and its last forward's end (host)
        self.t0 = time.monotonic()
        self._first: float | None = None
        self._last_done = self.t0

    def start(self, allocs: bool = False) -> Mark:
        """Marks a forward's start; ``allocs``: count the allocator's new segments too."""
        ev = None
        if self.on_gpu:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        counted = _allocator_counts() if allocs and self.on_gpu else None
        now = time.monotonic()
        if self._first is None:
            self._first = now
        return now, ev, counted

    def launched(self, stats: dict, kind: str, mark: Mark) -> None:
        """The forward's kernels are queued (``runner.run`` returned)."""
        add_time(stats, kind + "_launch_s", time.monotonic() - mark[0])
        if mark[1] is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if self._last_end is not None:
                self._pending.append((kind + "_gap_s", self._last_end, mark[1]))
            self._pending.append((kind + "_gpu_s", mark[1], end))
            self._last_end = end

    def done(self, stats: dict, kind: str, mark: Mark) -> float:
        """The forward's tokens are on the host (or, for a chunk, its work is queued):
        adds and returns its host seconds; reads the GPU times that are ready."""
        self._last_done = time.monotonic()
        took = self._last_done - mark[0]
        add_time(stats, kind + "_s", took)
        self.last_allocs = 0
        if mark[2] is not None:
            key = kind + "_device_allocs"
            segments, small, nbytes = _allocator_counts()
            segments0, small0, nbytes0 = mark[2]
            self.last_allocs = segments - segments0
            stats[key] = stats.get(key, 0) + self.last_allocs
            self.last_alloc_detail = (small - small0, round((nbytes - nbytes0) / 2**20, 1))
        self.collect(stats)
        return took

    def collect(self, stats: dict, wait: bool = False) -> None:
        keep = []
        for key, a, b in self._pending:
            if wait or b.query():
                if wait:
                    b.synchronize()
                add_time(stats, key, a.elapsed_time(b) / 1e3)
            else:
                keep.append((key, a, b))
        self._pending = keep

    def finish(self, stats: dict) -> None:
        """The loop ended: the GPU times still out, then every total rounded."""
        if self._first is not None:
            stats["lead_s"] = self._first - self.t0
            stats["tail_s"] = time.monotonic() - self._last_done
        try:
            self.collect(stats, wait=bool(self._pending))
        except Exception:  # noqa: BLE001 - a failed loop's events may never complete
            self._pending = []
        if self._allocs0 is not None:
            stats["device_allocs"] = device_allocs() - self._allocs0
        for key, v in list(stats.items()):
            if key.endswith("_s") and isinstance(v, float):
                stats[key] = round(v, 4)


def device_allocs() -> int:
    """Segments the current CUDA device's caching allocator has taken from the driver so far."""
    return _allocator_counts()[0]


def _allocator_counts() -> tuple[int, int, int]:
    """(segments, of them small-pool ones, bytes of segments) the current CUDA device's caching
    allocator has taken from the driver so far: one read of its statistics."""
    s = torch.cuda.memory_stats_as_nested_dict()
    small = (s.get("segment") or {}).get("small_pool") or {}
    reserved = (s.get("reserved_bytes") or {}).get("all") or {}
    return (int(s.get("num_device_alloc", 0)), int(small.get("allocated", 0)),
            int(reserved.get("allocated", 0)))
