"""Calls from a worker thread into event loops, one wake-up per loop per batch of calls.

The LLM's batch thread streams every row's new text to its HTTP handler after each decode step.
One ``loop.call_soon_threadsafe`` per row wakes the event loop once per row (a write to its
self-pipe, a pass of the loop, and the GIL handed back and forth each time): 32 chats made 32
wake-ups a step. Inside :func:`held_calls`, :func:`call_threadsafe` only records the call; at
the end of the block the calls go to each loop as one callback that runs them in order. Outside
the block it is ``loop.call_soon_threadsafe``. The calls keep their order: per loop, those of a
block run in the order they were made, and after every call made before the block.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["call_threadsafe", "held_calls"]

log = logging.getLogger(__name__)

_held = threading.local()


def call_threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[[Any], Any], arg: Any) -> None:
    """``fn(arg)`` on ``loop``, from any thread (held until the end of a :func:`held_calls`
    block of this thread)."""
    pending = getattr(_held, "calls", None)
    if pending is None:
        loop.call_soon_threadsafe(fn, arg)
    else:
        pending.append((loop, fn, arg))


@contextlib.contextmanager
def held_calls() -> Iterator[None]:
    """Hold this thread's :func:`call_threadsafe` calls until the block ends, then send them,
    one callback per loop. Nested blocks are part of the outermost one."""
    if getattr(_held, "calls", None) is not None:
        yield
        return
    calls: list[tuple[asyncio.AbstractEventLoop, Callable[[Any], Any], Any]] = []
    _held.calls = calls
    try:
        yield
    finally:
        _held.calls = None
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[Any], Any], Any]]] = {}
        for loop, fn, arg in calls:
            by_loop.setdefault(loop, []).append((fn, arg))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_run_all, items)
            except RuntimeError:          # the loop is closed: nobody is listening any more
                log.debug("dropped %d call(s) for a closed event loop", len(items))


def _run_all(items: list[tuple[Callable[[Any], Any], Any]]) -> None:
    for fn, arg in items:
        try:
            fn(arg)
        except Exception:  # noqa: BLE001 - one failing call must not stop the others
            log.exception("a call from a worker thread failed")
