"""What every model actor shares: loading off the loop, state, Describe, failure after load."""
from __future__ import annotations

import logging
import time
from typing import Any

from ..runtime.actor import Actor, Envelope
from ..runtime.errors import ModelFailed
from ..runtime.liveconfig import ModelSpec
from .messages import Describe, Drain, ModelState, UpdateModel

log = logging.getLogger("agile_rag.model")


class ModelActor(Actor):
    kind = "model"

    def __init__(self, spec: ModelSpec, params: dict[str, Any] | None = None, *,
                 actor_name: str | None = None):
        super().__init__(actor_name or spec.name)
        self.spec = spec
        self.params = dict(params or {})
        self.state = "loading"
        self.error: str | None = None
        self.device = "cpu"
        self.weight_bytes = 0
        self.load_seconds = 0.0

    # subclasses: blocking load in an executor thread; returns nothing, sets attributes
    def load_blocking(self) -> None:
        raise NotImplementedError

    def unload_blocking(self) -> None:
        """Drop references to the weights (subclasses clear their own attributes)."""

    async def on_start(self) -> None:
        t0 = time.monotonic()
        log.info("loading %s %s from %s", self.kind, self.name, self.spec.path)
        try:
            await self.system.executor.run_load(self.load_blocking)
        except Exception as exc:  # noqa: BLE001 - reported through state and every reply
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("%s %s failed to load: %s", self.kind, self.name, self.error)
            return
        self.load_seconds = time.monotonic() - t0
        self.state = "ready"
        log.info("%s %s ready in %.1fs (%.0f MB)", self.kind, self.name, self.load_seconds,
                 self.weight_bytes / 2**20)

    async def on_stop(self) -> None:
        self.state = "stopped"
        if self.system is not None:
            await self.system.executor.run(self.unload_blocking)

    def joinable(self, msg: Any) -> bool:
        return self.batching and self.state == "ready" and \
            not isinstance(msg, (Describe, Drain, UpdateModel))

    async def handle(self, msg: Any, env: Envelope) -> Any:
        if isinstance(msg, Describe):
            return self.describe()
        if isinstance(msg, Drain):
            return True
        if isinstance(msg, UpdateModel):
            return self.update(msg.spec, msg.params)
        if self.state != "ready":
            raise ModelFailed(f"{self.kind} {self.name!r} is not available: "
                              f"{self.error or self.state}")
        return await self.serve(msg, env)

    async def serve(self, msg: Any, env: Envelope) -> Any:
        raise NotImplementedError

    def update(self, spec: ModelSpec, params: dict[str, Any]) -> bool:
        """Settings that apply without reloading weights (the config actor checked that
        ``spec.load_key()`` is unchanged)."""
        self.spec = spec
        self.params = dict(params)
        return True

    def describe(self) -> ModelState:
        return ModelState(self.name, self.kind, self.state, self.device, self.spec.device,
                          self.weight_bytes if self.device == "cuda" else 0,
                          self.weight_bytes, self.queue_length(), self.error)


def module_bytes(module) -> int:
    """Bytes of a torch module's parameters and buffers, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total
