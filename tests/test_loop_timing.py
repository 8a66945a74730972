"""The batch loop's timers (actors/loop_timing.py) on a GPU, with the CUDA calls they make
replaced by doubles (this machine has no GPU; tests/gpu runs them for real): GPU seconds from
the events, the caching allocator's new segments per loop and per admit or chunk, and what an
admit that took some says about them."""
from __future__ import annotations

import torch

from agile_rag.actors import loop_timing
from agile_rag.actors.loop_timing import LoopTiming


class Event:
    """torch.cuda.Event's double: the time it was recorded, done at once."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False):
        self.t = None

    def record(self):
        Event.clock += 0.004
        self.t = Event.clock

    def query(self):
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class Allocator:
    """memory_stats_as_nested_dict's double: segments taken so far, small ones, bytes."""

    def __init__(self):
        self.segments = self.small = self.nbytes = 0

    def take(self, n: int, small: int, mb: int) -> None:
        self.segments += n
        self.small += small
        self.nbytes += mb * 2**20

    def stats(self, device=None):
        return {"num_device_alloc": self.segments,
                "segment": {"small_pool": {"allocated": self.small}},
                "reserved_bytes": {"all": {"allocated": self.nbytes}}}


def test_new_segments_are_counted_per_loop_and_per_admit(monkeypatch):
    alloc = Allocator()
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", alloc.stats)
    alloc.take(5, 1, 40)                                # before the loop: not its own
    timing, stats = LoopTiming(True), {}
    mark = timing.start(allocs=True)
    alloc.take(3, 2, 24)                                # the admit's forward takes three
    timing.launched(stats, "admit", mark)
    timing.done(stats, "admit", mark)
    assert timing.last_allocs == 3 and timing.last_alloc_detail == (2, 24.0)
    mark = timing.start(allocs=True)
    timing.launched(stats, "admit", mark)
    timing.done(stats, "admit", mark)                   # the next one takes none
    assert timing.last_allocs == 0
    mark = timing.start()                               # a decode step: not counted
    alloc.take(1, 0, 2)
    timing.launched(stats, "decode", mark)
    timing.done(stats, "decode", mark)
    assert timing.last_allocs == 0
    timing.finish(stats)
    assert stats["admit_device_allocs"] == 3 and "decode_device_allocs" not in stats
    assert stats["device_allocs"] == 4                  # the loop's: admits and the step
    assert stats["admit_gpu_s"] > 0 and stats["decode_gpu_s"] > 0


def test_on_the_cpu_nothing_is_read(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no CUDA call on the CPU")

    monkeypatch.setattr(loop_timing, "device_allocs", boom)
    monkeypatch.setattr(loop_timing, "_allocator_counts", boom)
    timing, stats = LoopTiming(False), {}
    mark = timing.start(allocs=True)
    timing.launched(stats, "admit", mark)
    timing.done(stats, "admit", mark)
    timing.finish(stats)
    assert "device_allocs" not in stats and "admit_device_allocs" not in stats
    assert timing.last_allocs == 0 and stats["admit_s"] >= 0


def test_the_gaps_between_forwards_on_the_stream_are_summed_by_the_next_ones_kind(monkeypatch):
    """``<kind>_gap_s``: from the previous forward's end event to this one's start event (what
    ran between them, and the GPU waiting for the host): a served burst's GPU idle."""
    times = iter([0.000, 0.040,             # the admit's forward
                  0.041, 0.045,             # a step 1 ms after it (sampling, or idle)
                  0.045, 0.049,             # the next step queued behind it: no gap
                  0.052, 0.060])            # a chunk 3 ms later

    class Scripted(Event):
        def record(self):
            self.t = next(times)

    monkeypatch.setattr(torch.cuda, "Event", Scripted)
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", Allocator().stats)
    timing, stats = LoopTiming(True), {}
    for kind in ("admit", "decode", "decode", "chunk"):
        mark = timing.start()
        timing.launched(stats, kind, mark)
        timing.done(stats, kind, mark)
    timing.finish(stats)
    assert "admit_gap_s" not in stats                   # the loop's first forward
    assert stats["decode_gap_s"] == 0.001 and stats["chunk_gap_s"] == 0.003
    assert (stats["admit_gpu_s"], stats["decode_gpu_s"], stats["chunk_gpu_s"]) == \
        (0.04, 0.008, 0.008)


def test_the_loops_lead_and_tail_are_the_host_time_before_its_first_forward_and_after_its_last(
        monkeypatch):
    """``lead_s``: from the loop's start to its first forward (prompts encoded, the GPU idle);
    ``tail_s``: from its last forward's tokens to its end. A loop without forwards has
    neither."""
    clock = iter([10.0,                     # the loop's timing starts
                  10.025,                   # the first forward starts 25 ms later
                  10.065,                   # its tokens
                  10.070, 10.074,           # a decode step
                  10.080])                  # the loop ends 6 ms after the last tokens
    monkeypatch.setattr(loop_timing.time, "monotonic", lambda: next(clock))
    timing, stats = LoopTiming(False), {}
    for kind in ("admit", "decode"):
        mark = timing.start()
        timing.done(stats, kind, mark)
    timing.finish(stats)
    assert (stats["lead_s"], stats["tail_s"]) == (0.025, 0.006)
    assert (stats["admit_s"], stats["decode_s"]) == (0.04, 0.004)
    monkeypatch.setattr(loop_timing.time, "monotonic", lambda: 20.0)
    idle, stats = LoopTiming(False), {}
    idle.finish(stats)
    assert "lead_s" not in stats and "tail_s" not in stats
