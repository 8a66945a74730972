"""Turn-taking for a group of forwards run layer-major through one LayerStream (issue 13).

A layer-streamed encoder copies every layer from host memory once per pass. A job split into
many small forwards (a small working grant, many concurrent requests) would copy the whole model
once per forward. Run as a *group*, the forwards of a job share each copy: every member runs
layer 0, then every member runs layer 1, and so on, so the layers are copied once per group.

Each member is one forward on its own thread (the model's code is called as usual; the group only
decides when each member may enter a layer). :class:`LayerTurns` keeps the turns:

- member ``k`` may run layer ``i`` once every live member before it has run layer ``i`` and
  every live member has run layer ``i - 1`` (members take each layer in index order);
- the first member to enter layer ``i`` runs ``on_start(i)`` (the stream makes the layer's copy
  ready in its slot, points the layer at it and starts the copy of a later layer); when the last
  live member has run layer ``i``, ``on_end(i)`` runs (the slot may be overwritten after what
  was queued so far);
- a member that ends (its forward returned or raised, anywhere) leaves the group: nobody waits
  for it again. So a failing member never blocks the others.

Between layers each member holds only its hidden states (a few KB a token), so a group holds
many more tokens than one forward's working memory allows, and its layers' transient memory is
one member's at a time (the members' layers run one after another on one stream).

Waits are bounded (``timeout_s``): a member that waits that long raises instead of hanging.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["LayerTurns"]


class LayerTurns:
    """The turns of ``n`` members over ``layers`` layers (see the module docstring)."""

    def __init__(self, n: int, layers: int, on_start: Callable[[int], None],
                 on_end: Callable[[int], None], *, timeout_s: float = 600.0):
        self.n = n
        self.layers = layers
        self._on_start = on_start
        self._on_end = on_end
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._live = list(range(n))          # members still running, in index order
        self._done = [-1] * n                # the last layer each member has run
        self.layer = 0                       # the layer the group is on
        self._turn: int | None = 0 if n else None
        self._started = -1                   # the last layer on_start ran for
        self._members: dict[int, int] = {}   # thread id -> member index
        self.failed: BaseException | None = None   # a callback raised: the group is broken

    # -- membership
    def join(self, k: int) -> None:
        """The calling thread is member ``k`` from now on."""
        with self._cond:
            self._members[threading.get_ident()] = k

    def member(self) -> int | None:
        """The calling thread's member index, or None (not a member)."""
        return self._members.get(threading.get_ident())

    def leave(self, k: int) -> None:
        """Member ``k`` ended (returned or raised): the others stop waiting for it."""
        with self._cond:
            self._members = {t: m for t, m in self._members.items() if m != k}
            if k not in self._live:
                return
            self._live.remove(k)
            if self._turn == k:
                self._advance(k)
            self._cond.notify_all()

    # -- layers
    def enter(self, k: int, i: int) -> None:
        """Member ``k`` is about to run layer ``i``: wait for its turn (RuntimeError if layers
        come out of order, the wait times out, or the group broke)."""
        with self._cond:
            if self._done[k] != i - 1:
                raise RuntimeError(f"layer {i} ran out of order in a grouped pass (member {k} "
                                   f"last ran layer {self._done[k]})")
            ok = self._cond.wait_for(
                lambda: self.failed is not None or (self.layer == i and self._turn == k),
                timeout=self.timeout_s)
            if self.failed is not None:
                raise RuntimeError("the grouped pass broke") from self.failed
            if not ok:
                raise RuntimeError(f"member {k} waited {self.timeout_s:g}s for layer {i}")
            if self._started < i:
                self._started = i
                self._call(self._on_start, i)
                if self.failed is not None:
                    raise RuntimeError("the grouped pass broke") from self.failed

    def exit(self, k: int, i: int) -> None:
        """Member ``k`` has run (launched) layer ``i``: the turn passes on."""
        with self._cond:
            self._done[k] = i
            if self._turn == k:
                self._advance(k)
            self._cond.notify_all()

    def _advance(self, k: int) -> None:
        """The turn after member ``k``: the next live member on this layer, else the layer
        ends and the first live member starts the next one."""
        nxt = next((m for m in self._live if m > k and self._done[m] < self.layer), None)
        if nxt is not None:
            self._turn = nxt
            return
        # every live member has run this layer (or none is left)
        if self._started >= self.layer:      # somebody ran it: its slot may be reused
            self._call(self._on_end, self.layer)
        self.layer += 1
        self._turn = self._live[0] if self._live and self.layer < self.layers else None

    def _call(self, fn: Callable[[int], None], i: int) -> None:
        """A callback; if it raises, the group is broken: every member's next `enter` raises
        (never here: `leave` runs in a member's `finally`)."""
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported by enter
            self.failed = exc
            self._cond.notify_all()
