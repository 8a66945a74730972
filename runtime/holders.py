"""What keeps an object alive, for the log: chains of referrers up from it.

Used when a removed model's weights outlive its unload (actors.model_base): each chain reads
``module <- BatchEngine <- tuple <- frame run:104 <- traceback <- CancelledError <- ...``,
the shape of the leak it was written to find (a stopped actor's task kept the exception it
ended with, and its traceback the frames that held the engine)."""
from __future__ import annotations

import gc
import sys
import types
from typing import Any


def _name(x: Any) -> str:
    if isinstance(x, types.FrameType):
        return f"frame {x.f_code.co_name}:{x.f_lineno}"
    if isinstance(x, (types.CoroutineType, types.FunctionType)):
        return f"{type(x).__name__} {x.__qualname__}"
    if isinstance(x, types.ModuleType):
        return f"module {x.__name__}"
    return type(x).__name__


def holder_chains(obj: Any, *, chains: int = 4, depth: int = 10) -> list[str]:
    """Up to ``chains`` chains of what refers to ``obj``, each followed up ``depth`` steps (an
    instance's ``__dict__`` is shown as its owner). Blocking; slow on a big heap: for logs."""
    mine: set[int] = {id(sys._getframe())}

    def up(x: Any) -> list[Any]:
        found = gc.get_referrers(x)
        mine.add(id(found))
        out = []
        for r in found:
            if id(r) in mine:
                continue
            if isinstance(r, dict):          # an instance's attributes: name the instance
                owners = [o for o in gc.get_referrers(r) if getattr(o, "__dict__", None) is r]
                r = owners[0] if owners else r
            out.append(r)
        mine.add(id(out))
        return out

    lines = []
    for first in up(obj)[:chains]:
        chain = [first]
        mine.add(id(chain))
        cur = first
        for _ in range(depth):
            nxt = up(cur)
            if not nxt or isinstance(cur, types.ModuleType):
                break
            cur = nxt[0]
            chain.append(cur)
        lines.append(" <- ".join(_name(c) for c in chain))
    return lines
