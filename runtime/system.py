"""The actor system: spawns actors, supervises them, and owns the shared executor and tracer."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback

from .actor import Actor
from .errors import ActorStopped
from .executor import ModelExecutor
from .tracing import Tracer

log = logging.getLogger("agile_rag.system")


def _drop_frames(task: asyncio.Task) -> None:
    """A stopped actor's task keeps the exception it ended with (CancelledError: asyncio keeps
    it to re-raise), and its traceback keeps the frames it ran through, with their locals:
    whatever a handler held when the stop came (an LLM's batch engine, and through it the
    model's weights: seen in the chaos run, a removed LLM alive for good). Clear them."""
    if not task.done():
        return
    try:
        exc = task.exception()
    except asyncio.CancelledError as cancelled:
        exc = cancelled
    if exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None


class ActorSystem:
    def __init__(self, *, executor: ModelExecutor | None = None, tracer: Tracer | None = None,
                 max_restarts: int = 5, restart_window_s: float = 60.0):
        self.executor = executor or ModelExecutor()
        self.tracer = tracer or Tracer()
        self.actors: dict[str, Actor] = {}
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self._background: set[asyncio.Task] = set()

    def background(self, coro, name: str) -> asyncio.Task:
        """Run ``coro`` beside the actors (work a stopped actor leaves behind, such as freeing
        weights that an in-flight job still held). The task is kept until it ends and cancelled
        by :meth:`stop_all`."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def spawn(self, actor: Actor) -> Actor:
        if actor.name in self.actors and not self.actors[actor.name].stopped:
            raise ValueError(f"an actor named {actor.name!r} is already running")
        actor.system = self
        self.actors[actor.name] = actor
        self._run(actor)
        return actor

    def _run(self, actor: Actor) -> None:
        actor._task = asyncio.get_running_loop().create_task(actor._main(), name=actor.name)
        actor._task.add_done_callback(functools.partial(self._on_exit, actor))

    def _on_exit(self, actor: Actor, task: asyncio.Task) -> None:
        if actor.stopped or task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        now = time.monotonic()
        actor.restarts = [t for t in actor.restarts if now - t < self.restart_window_s] + [now]
        log.error("actor %s crashed: %r", actor.name, exc, exc_info=exc)
        actor._crashed(exc)
        if len(actor.restarts) > self.max_restarts:
            log.error("actor %s crashed %d times in %.0fs: stopping it", actor.name,
                      len(actor.restarts), self.restart_window_s)
            actor.stopped = True
            actor.stop_reason = (f"{actor.name} crashed {len(actor.restarts)} times in a row "
                                 f"and was stopped; last error: {exc!r}")
            actor._fail_all(ActorStopped(actor.stop_reason))
            return
        self._run(actor)

    async def stop(self, name: str, timeout: float = 10.0) -> None:
        actor = self.actors.pop(name, None)
        if actor is None:
            return
        actor.stopped = True
        if actor._task is not None:
            actor._task.cancel()
            try:
                await asyncio.wait_for(asyncio.gather(actor._task, return_exceptions=True),
                                       timeout)
            except asyncio.TimeoutError:
                log.warning("actor %s did not stop within %ss", name, timeout)
            _drop_frames(actor._task)
        actor._fail_all(ActorStopped(f"{name} was stopped"))
        try:
            await actor.on_stop()
        except Exception:  # noqa: BLE001
            log.exception("on_stop of %s failed", name)

    async def stop_all(self) -> None:
        # newest first: models (which give GPU grants back on stop) before the arbiter
        for name in reversed(list(self.actors)):
            await self.stop(name)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.executor.shutdown()
