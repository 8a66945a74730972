"""How many torch threads CPU work runs with, chosen by timing (issue 17): the LLM's decode
steps, and the encoders' forwards (one tuner per size of forward, actors/encoder_jobs.py).

On a 2-core machine one decode stream is ~1.4x faster with 2 torch threads than with 1 while
the machine is quiet, and ~2x slower as soon as another process takes a core (each operation's
threads wait for each other). The server's default (``TORCH_THREADS`` 0) is one less than the
cores, safe on a shared machine. With that default, the LLM's decode loop runs a
:class:`ThreadTuner` between ``low`` (the default) and ``high`` (every core) and keeps
whichever count its steps measure faster now:

- it starts at ``low``; after the first two steps at a batch size, and then every
  ``probe_every`` steps, it runs ``probe_steps`` with the other count (the first of them
  not counted: the threads wake up) and switches when their median is under ``margin`` times
  the median of the current count's steps just before (a step slowed by something else on
  the machine decides nothing);
- a probe that confirms the current count doubles the steps to the next one, up to
  ``max_every`` (a probe runs the slower count: every 48 steps it cost one stream ~6% of its
  speed on a quiet 2-core machine); a switch, a new batch size or a pause starts again at
  ``probe_every``;
- a step of the current count that takes over ``jump`` times its recent mean, twice in a row
  (something else took a core), starts a probe at once;
- steps are compared only at the same batch size (rows), which sets most of their cost;
  a new batch size, or steps again after a pause of over ``idle_s`` (the machine may be
  busier or quieter now), starts the comparison afresh.

It is plain bookkeeping, called from the one thread that decodes, which sets the count it
gives with ``runtime.executor.apply_torch_threads`` (OpenMP's count is per thread).
"""
from __future__ import annotations

import statistics
import time
from collections import deque

__all__ = ["ThreadTuner"]


class ThreadTuner:
    def __init__(self, low: int, high: int, *, probe_every: int = 48, probe_steps: int = 6,
                 margin: float = 0.92, jump: float = 1.6, window: int = 6,
                 idle_s: float = 0.5, max_every: int = 384):
        if not 0 < low < high:
            raise ValueError(f"ThreadTuner needs 0 < low < high, got {low}, {high}")
        self.low, self.high = low, high
        self.current = low
        self.probe_every, self.probe_steps = probe_every, probe_steps
        self.max_every = max(max_every, probe_every)
        self._every = probe_every          # steps between probes now (see the docstring)
        self.margin, self.jump = margin, jump
        self.idle_s = idle_s
        self._last = -1e18                 # when the last step ended (monotonic seconds)
        self._recent: deque[float] = deque(maxlen=window)   # current count, rows _rows
        self._rows = -1
        self._since_probe = 0
        self._probing = 0                  # steps left in a probe (0: none)
        self._probe: list[float] = []
        self._slow = 0                     # consecutive slow steps of the current count
        self.switches = 0
        self.probes = 0

    @property
    def other(self) -> int:
        return self.high if self.current == self.low else self.low

    def threads(self, rows: int, now: float | None = None) -> int:
        """The count the next step (of ``rows`` rows) runs with."""
        now = time.monotonic() if now is None else now
        if rows != self._rows or now - self._last > self.idle_s:
            # a new batch size, or the first step after a pause: measure afresh, and
            # compare the counts after two steps
            self._rows = rows
            self._recent.clear()
            self._probing = 0
            self._probe = []
            self._every = self.probe_every
            self._since_probe = self._every
        if self._probing == 0 and len(self._recent) >= 2 and \
                self._since_probe >= self._every:
            self._start_probe()
        return self.other if self._probing else self.current

    def observe(self, rows: int, seconds: float, now: float | None = None) -> None:
        """A step of ``rows`` rows took ``seconds`` with the count :meth:`threads` gave."""
        self._last = time.monotonic() if now is None else now
        if rows != self._rows:
            return
        if self._probing:
            self._probing -= 1
            if self._probing < self.probe_steps - 1:      # the first probe step: warm-up
                self._probe.append(seconds)
            if self._probing == 0:
                self._end_probe()
            return
        self._since_probe += 1
        if len(self._recent) >= 2:
            mean = sum(self._recent) / len(self._recent)
            self._slow = self._slow + 1 if seconds > self.jump * mean else 0
            if self._slow >= 2:             # something else took a core: look now,
                self._slow = 0              # against the slow steps (they are the news)
                first = self._recent[-1]
                self._recent.clear()
                self._recent.extend([first, seconds])
                self._start_probe()
                return
        self._recent.append(seconds)

    def _start_probe(self) -> None:
        self._probing = self.probe_steps
        self._probe = []
        self._since_probe = 0
        self.probes += 1

    def _end_probe(self) -> None:
        if not self._probe or not self._recent:
            return
        # medians: one step slowed by something else on the machine decides nothing
        probe = statistics.median(self._probe)
        # the current count's latest steps (after a jump: its slow steps only)
        now = statistics.median(list(self._recent)[-5:])
        if probe < self.margin * now:
            self.current = self.other
            self.switches += 1
            self._recent.clear()
            self._recent.extend(self._probe)
            self._every = self.probe_every
        else:
            self._every = min(2 * self._every, self.max_every)
        self._slow = 0
