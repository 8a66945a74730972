"""Unique ids for requests, completions and tool calls: this process's random prefix and a
counter. Unique like uuid4's, and nearly free: uuid4 is a system call each (``os.urandom``),
and on a busy server every system call of the event loop hands the GIL to a model thread and
waits to take it back."""
from __future__ import annotations

import itertools
import os

_PREFIX = os.urandom(6).hex()
_COUNT = itertools.count(int.from_bytes(os.urandom(3), "big"))


def unique_hex() -> str:
    """24 hex digits, never the same twice in this process (nor, but by a 2^-48 chance, in
    another)."""
    return f"{_PREFIX}{next(_COUNT) & 0xFFFFFFFFFFFF:012x}"
