"""What every model actor shares: loading off the loop, state, Describe, failure after load."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ..runtime.actor import Actor, Envelope
from ..runtime.errors import ModelFailed, Overloaded, ServiceError
from ..runtime.liveconfig import ModelSpec
from .gpu_lease import GpuLease
from .messages import Describe, Drain, ModelState, Released, Revoke, UpdateModel
from .states import Device, DeviceMode, ModelStatus
from .torch_util import empty_cache, is_oom, torch_dtype

log = logging.getLogger("agile_rag.model")


ARBITER = "vram-arbiter"
BATCH_LINGER_S = 0.05      # see ModelActor.batch_linger_s


def linger_seconds(params: dict, default: float = BATCH_LINGER_S) -> float:
    """The batch linger window: ``batch_linger_ms`` in the model kind's params (0 turns it
    off; at most 1000), else ``default``. A bad value keeps the default."""
    ms = params.get("batch_linger_ms")
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and 0 <= ms <= 1000:
        return ms / 1000
    return default


class ModelActor(Actor):
    kind = "model"
    #: builds the weights' residency (runtime.residency.WeightResidency on CUDA machines);
    #: None = no GPU: the model always computes on the CPU. Tests may set a double.
    residency_factory: Callable[[Any], Any] | None = None
    gpu_device = "cuda"

    def __init__(self, spec: ModelSpec, params: dict[str, Any] | None = None, *,
                 actor_name: str | None = None):
        super().__init__(actor_name or spec.name)
        self.spec = spec
        self.params = dict(params or {})
        self.state = ModelStatus.LOADING
        self.error: str | None = None
        self.device: str = Device.CPU   # where the weights are (gpu_device while resident)
        self.weight_bytes = 0
        self.load_seconds = 0.0
        self.lease: GpuLease | None = None

    @property
    def batch_linger_s(self) -> float:
        """Batching models (embedders, rerankers): an HTTP burst reaches the actor one request
        at a time (~0.2 ms apart on 2 cores); without a linger its first request ran alone
        while the rest were still being parsed. Collecting the burst (a quiet 1 ms gap ends
        the window) measured 0.76 s -> 0.63 s for 256 concurrent one-sentence embeddings."""
        return linger_seconds(self.params)

    def torch_module(self):
        """The nn.Module whose weights move between host and GPU."""
        return self.model

    def working_bytes(self, items: int) -> int:
        """GPU memory a job of ``items`` needs beyond the weights (activations, KV cache)."""
        return 64 * 2**20 + items * 4 * 2**20

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
            self.state = ModelStatus.FAILED
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("%s %s failed to load: %s", self.kind, self.name, self.error)
            return
        self.load_seconds = time.monotonic() - t0
        await self._attach_gpu()
        self.state = ModelStatus.READY
        log.info("%s %s ready in %.1fs (%.0f MB)", self.kind, self.name, self.load_seconds,
                 self.weight_bytes / 2**20)

    async def _attach_gpu(self) -> None:
        arbiter = self.system.actors.get(ARBITER)
        factory = self.residency_factory
        if arbiter is None or factory is None or self.spec.device == DeviceMode.CPU:
            return
        residency = await self.system.executor.run_load(factory, self.torch_module())
        self.weight_bytes = residency.weight_bytes
        self.lease = GpuLease(self, residency, arbiter, device=self.gpu_device)
        if self.spec.device == DeviceMode.CUDA:
            await self._pin_on_gpu()

    async def _pin_on_gpu(self) -> None:
        where = await self.lease.acquire(0, self.working_bytes(1), None)
        await self.lease.finish()
        self.device = Device.CUDA if self.lease.on_gpu else Device.CPU
        if where == Device.CPU:
            log.warning("%s is set to device cuda but did not get the GPU; it runs on CPU",
                        self.name)

    async def compute(self, items: int, env: Envelope | None, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` in the executor, on the GPU when a grant comes, else on the CPU.
        A GPU out-of-memory gives the GPU back, asks again for more (the arbiter evicts
        others) and retries once; a second one answers 503 with the reason."""
        try:
            return await self._compute(items, env, fn, *args)
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the asker gets the reason, not a traceback
            log.exception("%s %s failed on a job", self.kind, self.name)
            raise ModelFailed(f"{self.kind} {self.spec.name!r} failed on this request: "
                              f"{type(exc).__name__}: {exc}") from exc

    async def _compute(self, items: int, env: Envelope | None, fn: Callable, *args: Any) -> Any:
        run = self.system.executor.run
        if self.lease is None:
            return await run(fn, *args)
        lease = self.lease
        working = self.working_bytes(items)
        try:
            self.device = await lease.acquire(items, working, env)
            try:
                return await run(fn, *args)
            except Exception as exc:  # noqa: BLE001
                if not lease.on_gpu or not is_oom(exc):
                    raise
            await lease.give_back(env)
            await run(empty_cache)
            self.device = await lease.acquire(items, 2 * working + 256 * 2**20, env)
            try:
                return await run(fn, *args)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                await lease.give_back(env)
                raise Overloaded(f"{self.kind} {self.spec.name!r} ran out of GPU memory twice "
                                 f"for a job of {items} item(s); retry with a smaller job.") \
                    from None
        finally:
            await lease.finish(env)
            self.device = Device.CUDA if lease.on_gpu else Device.CPU

    async def on_stop(self) -> None:
        self.state = ModelStatus.STOPPED
        if self.lease is not None and self.lease.granted:
            await self.lease.give_back()
        if self.system is not None:
            await self.system.executor.run(self.unload_blocking)

    def joinable(self, msg: Any) -> bool:
        return self.batching and self.state == ModelStatus.READY and \
            not isinstance(msg, (Describe, Drain, UpdateModel, Revoke))

    async def handle(self, msg: Any, env: Envelope) -> Any:
        if isinstance(msg, Describe):
            return self.describe()
        if isinstance(msg, Drain):
            return True
        if isinstance(msg, UpdateModel):
            return await self._update(msg.spec, msg.params, env)
        if isinstance(msg, Revoke):
            if self.lease is None:
                self.system.actors[ARBITER].tell(Released(model=self.name, nbytes=0), sender=self.name)
                return None
            await self.lease.revoked(env)
            self.device = Device.CPU
            return None
        if self.state != ModelStatus.READY:
            raise ModelFailed(f"{self.kind} {self.name!r} is not available: "
                              f"{self.error or self.state}")
        return await self.serve(msg, env)

    async def serve(self, msg: Any, env: Envelope) -> Any:
        raise NotImplementedError

    async def _update(self, spec: ModelSpec, params: dict[str, Any], env: Envelope) -> bool:
        old = self.spec.device
        self.update(spec, params)
        if self.lease is not None and old != spec.device:
            if self.lease.granted:          # to cpu, or cuda -> flex (unpin): give it back
                await self.lease.give_back(env)
                self.device = Device.CPU
            if spec.device == DeviceMode.CUDA:
                await self._pin_on_gpu()
        elif self.lease is None and spec.device != DeviceMode.CPU and old == DeviceMode.CPU and \
                self.state == ModelStatus.READY:
            await self._attach_gpu()
        return True

    def update(self, spec: ModelSpec, params: dict[str, Any]) -> bool:
        """Settings that apply without reloading weights (the config actor checked that
        ``spec.load_key()`` is unchanged)."""
        self.spec = spec
        self.params = dict(params)
        return True

    def describe(self) -> ModelState:
        return ModelState(name=self.name, kind=self.kind, state=self.state, device=self.device,
                          config_device=self.spec.device,
                          resident_bytes=self.weight_bytes if self.device == Device.CUDA else 0,
                          weight_bytes=self.weight_bytes, queue_length=self.queue_length(),
                          error=self.error)


def st_dtype_kwargs(dtype: str | None) -> dict:
    """sentence-transformers keyword arguments that load the weights in an entry's ``dtype``
    (none for ``auto`` or no dtype: the checkpoint's own)."""
    if dtype in (None, "auto"):
        return {}
    return {"model_kwargs": {"dtype": torch_dtype(dtype)}}
