"""Where the server's threads spend their time, sampled from inside the process.

``sample(seconds, hz)`` (blocking: run it on a thread of its own) reads every thread's Python
stack ``hz`` times a second for ``seconds`` and returns, per thread name: how many samples saw
it, its CPU seconds over the window (Linux: ``/proc/self/task/<tid>/stat``; None elsewhere),
and its most frequent stacks (innermost frame first, a few frames deep) and innermost lines.

It is what ``GET /debug/stacks`` returns: a profile of a running server where an outside
profiler cannot attach (py-spy needs ptrace, which containers often forbid). Sampling takes the
GIL, so a thread that holds it for long is seen when it lets go (C work done with the GIL held
is under-counted: its CPU seconds still show it); a thread waiting for the GIL shows the line it
waits at. CPU seconds per thread say whether a thread computes (near one core)
or waits (GPU, GIL, queue). Costs the sampled threads nothing between samples.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Any

__all__ = ["sample", "MAX_SECONDS", "MAX_HZ"]

MAX_SECONDS = 120.0
MAX_HZ = 1000.0
#: frames kept per stack (innermost first)
DEPTH = 8
#: stacks and lines reported per thread
TOP = 15


def _where(frame: Any) -> str:
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"


def _cpu_s(native_id: int | None) -> float | None:
    """A thread's user + system CPU seconds (Linux); None where it cannot be read."""
    if native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # after the command name: state is field 3, utime 14 and stime 15 (1-based, man proc)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(seconds: float, hz: float = 200.0) -> dict:
    """Sample every other thread's stack for ``seconds`` at ``hz``; see the module docstring."""
    seconds = min(max(seconds, 0.01), MAX_SECONDS)
    hz = min(max(hz, 1.0), MAX_HZ)
    me = threading.get_ident()
    threads = {t.ident: t for t in threading.enumerate()}
    cpu0 = {ident: _cpu_s(getattr(t, "native_id", None)) for ident, t in threads.items()}
    stacks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lines: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    counts: collections.Counter = collections.Counter()
    names: dict[int, str] = {}
    t0 = time.monotonic()
    period = 1.0 / hz
    n = 0
    next_at = t0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            name = names.get(ident)
            if name is None:
                t = threads.get(ident)
                name = t.name if t is not None else f"thread-{ident}"
                if name in names.values():            # two threads of one name: both kept
                    name = f"{name}#{ident}"
                names[ident] = name
            chain: list[str] = []
            f: Any = frame
            while f is not None and len(chain) < DEPTH:
                chain.append(_where(f))
                f = f.f_back
            counts[name] += 1
            stacks[name][" <- ".join(chain)] += 1
            lines[name][chain[0]] += 1
        n += 1
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))
    elapsed = time.monotonic() - t0
    out: dict[str, Any] = {"seconds": round(elapsed, 3), "hz": hz, "samples": n, "threads": {}}
    for ident, name in names.items():
        t = threads.get(ident)
        c0 = cpu0.get(ident)
        c1 = _cpu_s(getattr(t, "native_id", None)) if t is not None else None
        total = counts[name]
        out["threads"][name] = {
            "samples": total,
            "cpu_s": round(c1 - c0, 3) if c0 is not None and c1 is not None else None,
            "cpu_fraction": round((c1 - c0) / elapsed, 3)
            if c0 is not None and c1 is not None and elapsed > 0 else None,
            "stacks": [[s, k] for s, k in stacks[name].most_common(TOP)],
            "lines": [[s, k] for s, k in lines[name].most_common(TOP)],
        }
    return out
