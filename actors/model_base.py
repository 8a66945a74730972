"""What every model actor shares: loading off the loop, state, Describe, failure after load."""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..runtime.actor import CONTROL, Actor, Envelope
from ..runtime.errors import ModelFailed, Overloaded, ServiceError
from ..runtime.heap import collect, trim_heap
from ..runtime.holders import holder_chains
from ..runtime.liveconfig import ModelSpec
from .gpu_lease import GpuLease
from .messages import (
    Describe,
    Drain,
    FinishJob,
    ModelState,
    Released,
    Revoke,
    Trim,
    Trimmed,
    UpdateModel,
    Yield,
)
from .states import Device, DeviceMode, ModelStatus
from .torch_util import empty_cache, empty_host_cache, is_oom, torch_dtype

#: Messages that never join a batch of requests (see ModelActor.joinable).
CONTROL_MESSAGES = (Describe, Drain, UpdateModel, Revoke, Trim, FinishJob, Yield)

log = logging.getLogger("agile_rag.model")


ARBITER = "vram-arbiter"
#: how long a stopped model's weights are looked for again, should a job still hold them
LATE_UNLOAD_S = 30.0
BATCH_LINGER_S = 0.05      # see ModelActor.batch_linger_s


def linger_seconds(params: dict, default: float = BATCH_LINGER_S) -> float:
    """The batch linger window: ``batch_linger_ms`` in the model kind's params (0 turns it
    off; at most 1000), else ``default``. A bad value keeps the default."""
    ms = params.get("batch_linger_ms")
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and 0 <= ms <= 1000:
        return ms / 1000
    return default


# ---- weights that must die with their actor ----------------------------------------------------
# Every loaded model's torch module (and, on a GPU machine, its pinned host copy) is watched by a
# weak reference under its actor's name, so that "is a removed model really gone?" is a question
# the server can answer (GET /admin/models: runtime.weights_alive) and the unload path can check.
_watched: dict[int, tuple[str, str, weakref.ref]] = {}
_watch_ids = itertools.count()

#: instance attributes that hold weights or things built on them; dropped on unload
WEIGHT_ATTRS = ("model", "tokenizer", "engine")


def watch_weights(owner: str, what: str, obj: Any) -> None:
    """Watch ``obj`` (a module, a tensor) by a weak reference under the actor name ``owner``."""
    if obj is None:
        return
    key = next(_watch_ids)
    try:
        ref = weakref.ref(obj, functools.partial(_forget, key))
    except TypeError:
        return
    _watched[key] = (owner, what, ref)


def _forget(key: int, _ref: object) -> None:
    _watched.pop(key, None)


def live_weights(owner: str | None = None) -> list[dict]:
    """The watched weights still alive: ``[{"actor", "what"}]`` (of one actor with ``owner``)."""
    return [{"actor": o, "what": w} for o, w, r in list(_watched.values())
            if r() is not None and (owner is None or o == owner)]


def weight_holders(owner: str) -> str:
    """What still refers to ``owner``'s watched weights, for the log (runtime.holders)."""
    lines = []
    for o, w, r in list(_watched.values()):
        obj = r() if o == owner else None
        if obj is not None:
            lines.append(f"{w} <- " + "; ".join(holder_chains(obj) or ["nothing visible"]))
        del obj
    return " | ".join(lines)


def break_cycles(model: Any) -> None:
    """Cut the reference cycles a model object is known to keep, so that dropping the last
    outside reference frees it at once instead of at the next full garbage collection.
    sentence-transformers: ``model.model_card_data.model`` points back at the model
    (SentenceTransformer and CrossEncoder)."""
    card = getattr(model, "model_card_data", None) if model is not None else None
    if card is not None and getattr(card, "model", None) is model:
        try:
            card.model = None
        except Exception:  # noqa: BLE001 - best effort: gc.collect() catches the cycle anyway
            pass


class ModelActor(Actor):
    kind = "model"
    #: builds the weights' residency (runtime.residency.WeightResidency on CUDA machines);
    #: None = no GPU: the model always computes on the CPU. Tests may set a double.
    residency_factory: Callable[[Any], Any] | None = None
    #: the weights can also run layer-streamed on the GPU (encoders: a stack of layers)
    streamable = False
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
    def batch_linger_s(self) -> float:  # type: ignore[override]  # read from params, per model
        """Batching models (embedders, rerankers): an HTTP burst reaches the actor one request
        at a time (~0.2 ms apart on 2 cores); without a linger its first request ran alone
        while the rest were still being parsed. Collecting the burst (a quiet 1 ms gap ends
        the window) measured 0.76 s -> 0.63 s for 256 concurrent one-sentence embeddings."""
        return linger_seconds(self.params)

    def cpu_thread_range(self) -> tuple[int, int] | None:
        """(low, high) torch thread counts CPU work chooses between by timing
        (runtime/thread_tuner.py) when TORCH_THREADS is auto; None: the count set."""
        threads = getattr(self.system.executor, "decode_threads", None) \
            if self.system is not None else None
        return tuple(threads) if threads else None

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
        watch_weights(self.name, "module", self.torch_module())
        await self._attach_gpu()
        self.system.executor.freeze_when_idle()     # see runtime.heap.collect
        self.state = ModelStatus.READY
        log.info("%s %s ready in %.1fs (%.0f MB)", self.kind, self.name, self.load_seconds,
                 self.weight_bytes / 2**20)

    async def _attach_gpu(self) -> None:
        arbiter = self.system.actors.get(ARBITER)
        factory = self.residency_factory
        if arbiter is None or factory is None or self.spec.device == DeviceMode.CPU:
            return
        factory = self._streamable(factory)
        residency = await self.system.executor.run_load(factory, self.torch_module())
        self.weight_bytes = residency.weight_bytes
        host = getattr(residency, "host_buffer", None)
        if host is not None:                 # its storage: alive while any weight views it
            watch_weights(self.name, "host copy", host.untyped_storage())
        self.lease = GpuLease(self, residency, arbiter, device=self.gpu_device)
        if self.spec.device == DeviceMode.CUDA:
            await self._pin_on_gpu()

    def _streamable(self, factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Encoders (``streamable``) get a residency that can also run layer-streamed, unless
        their params say ``"layer_streaming": false``; a test double stays as it is."""
        if not self.streamable or self.params.get("layer_streaming", True) is False:
            return factory
        from ..runtime.residency import WeightResidency
        if factory is not WeightResidency:
            return factory
        from ..runtime.streamed_residency import StreamableResidency
        return StreamableResidency

    async def _pin_on_gpu(self) -> None:
        lease = self.lease
        assert lease is not None, "_pin_on_gpu runs after _attach_gpu made the lease"
        where = await lease.acquire(0, self.working_bytes(1), None)
        try:
            if lease.on_gpu:
                await self.on_pinned()
        finally:
            await lease.finish()
        self.device = Device.CUDA if lease.on_gpu else Device.CPU
        if where == Device.CPU:
            log.warning("%s is set to device %s but did not get the GPU; it runs on CPU",
                        self.name, self.spec.placement)

    async def on_pinned(self) -> None:
        """Work to do once the model is pinned on the GPU, under the pinning grant and before
        it is ready (an encoder captures its CUDA graphs here); nothing by default."""

    async def compute(self, items: int, env: Envelope | None, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` in the executor, on the GPU when a grant comes, else on the CPU.
        A GPU out-of-memory gives the GPU back, asks again for more (the arbiter evicts
        others) and retries once; a second one answers 503 with the reason."""
        try:
            return await self._compute(items, env, fn, *args)
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the asker gets the reason, not a traceback
            rid = env.request_id if env is not None else None
            log.exception("%s %s failed on a job (request %s)", self.kind, self.name, rid)
            raise ModelFailed(f"{self.kind} {self.spec.name!r} failed on this request"
                              f"{f' (request id {rid})' if rid else ''}; the server log has "
                              "the details.") from exc

    async def _compute(self, items: int, env: Envelope | None, fn: Callable, *args: Any) -> Any:
        run = self.system.executor.run
        if self.lease is None:
            return await run(fn, *args)
        lease = self.lease
        working = self.working_bytes(items)
        try:
            self.device = await lease.acquire(items, working, env)
            try:
                return await run(lease.bound(fn), *args)
            except Exception as exc:  # noqa: BLE001
                if not lease.on_gpu or not is_oom(exc):
                    raise
            await lease.give_back(env)
            await run(empty_cache)
            self.device = await lease.acquire(items, 2 * working + 256 * 2**20, env)
            try:
                return await run(lease.bound(fn), *args)
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
        """Unload: give the GPU back, then drop every reference to the weights (the lease's
        residency with its pinned host copy, the model, tokenizer and engine), cut the cycles
        the libraries keep and, if something is still alive, collect the garbage: the memory
        is freed now, not at the next full collection. A weight still referenced afterwards is
        logged (and listed by /admin/models as runtime.weights_alive)."""
        self.state = ModelStatus.STOPPED
        lease, self.lease = self.lease, None
        if lease is not None:
            await lease.close()
        del lease
        if self.system is None:
            self._unload_all()
            return
        try:
            await self.system.executor.run(self._unload_all)
        except RuntimeError:                # the pool is already shut down (server exit)
            self._unload_all()
        self.system.executor.freeze_when_idle()     # the unload thawed the heap
        if live_weights(self.name):
            # a job that was still running (a generation thread the stop aborted, a request's
            # traceback) may hold them a while longer, and a heap freeze in between would hide
            # them from every later collection (issue 11: a removed LLM stayed alive for
            # good): look again until it let go
            self.system.background(self._collect_late(), f"{self.name}-unload")

    async def _collect_late(self) -> None:
        """Collect again, at growing intervals for ``LATE_UNLOAD_S``, until this actor's
        weights are gone; if they outlive that, log what still holds them."""
        waited, delay = 0.0, 0.1
        while live_weights(self.name) and waited < LATE_UNLOAD_S:
            await asyncio.sleep(delay)
            waited += delay
            delay = min(2 * delay, 2.0)
            try:
                await self.system.executor.run(collect)
            except RuntimeError:            # the pool is shut down (server exit)
                return
        alive = live_weights(self.name)
        if alive:
            log.warning("%s %s: weights still referenced %.0fs after unload: %s", self.kind,
                        self.name, waited, weight_holders(self.name))
        else:
            log.info("%s %s: weights freed %.1fs after unload (a job held them)", self.kind,
                     self.name, waited)

    def _unload_all(self) -> None:
        """Blocking (executor thread): drop the weights and free their memory."""
        break_cycles(getattr(self, "model", None))
        try:
            self.unload_blocking()
        except Exception:  # noqa: BLE001 - go on dropping what we can
            log.exception("%s %s: unload failed", self.kind, self.name)
        self.drop_weight_refs()
        if live_weights(self.name) or self.error:
            collect()           # cycles the libraries keep, a failed load's frames: frozen
        empty_host_cache()                  # the pinned master copy's blocks, now
        trim_heap()

    def drop_weight_refs(self) -> None:
        """Set every instance attribute that holds weights to None: the ones named in
        WEIGHT_ATTRS and any other torch module, and forget an instance-level
        residency_factory (a quantized LLM's wraps its model)."""
        import torch

        for attr, value in list(vars(self).items()):
            if attr in WEIGHT_ATTRS or isinstance(value, torch.nn.Module):
                setattr(self, attr, None)
        self.__dict__.pop("residency_factory", None)

    def joinable(self, msg: Any) -> bool:
        """A request that may join a running batch: never a control message (an arbiter's
        FinishJob, Yield, Revoke or Trim, a Describe, Drain or UpdateModel), which ends the
        job and is handled after it."""
        return self.batching and self.state == ModelStatus.READY and \
            not isinstance(msg, CONTROL_MESSAGES)

    async def handle(self, msg: Any, env: Envelope) -> Any:
        if isinstance(msg, Describe):
            return self.describe()
        if isinstance(msg, Drain):
            return True
        if isinstance(msg, (FinishJob, Yield)):  # its arrival closed the job it was sent to
            return None
        if isinstance(msg, UpdateModel):
            return await self._update(msg.spec, msg.params, env)
        if isinstance(msg, Revoke):
            if self.lease is None:
                self.system.actors[ARBITER].tell(Released(model=self.name, nbytes=0),
                                                 sender=self.name)
                return None
            await self.lease.revoked(env)
            self.device = Device.CPU
            return None
        if isinstance(msg, Trim):
            await self.trim_working(env)
            return None
        if self.state != ModelStatus.READY:
            raise ModelFailed(f"{self.kind} {self.name!r} is not available: "
                              f"{self.error or self.state}")
        return await self.serve(msg, env)

    async def trim_working(self, env: Envelope | None) -> None:
        """The arbiter wants this idle model's working memory: keep the weights resident.
        (Encoders allocate theirs per job, so there is nothing to free here; the LLM frees
        its KV cache.)"""
        if self.lease is None:
            self.system.actors[ARBITER].tell(Trimmed(model=self.name, nbytes=0),
                                             priority=CONTROL, sender=self.name)
            return
        self.lease.trimmed(env)

    async def serve(self, msg: Any, env: Envelope) -> Any:
        raise NotImplementedError

    async def _update(self, spec: ModelSpec, params: dict[str, Any], env: Envelope) -> bool:
        old, old_card = self.spec.device, self.spec.placement
        self.update(spec, params)
        if self.lease is not None and old_card != spec.placement:
            # to cpu, cuda -> flex (unpin), or cuda:0 -> cuda:1 (another card): give it back
            if self.lease.granted or self.lease.on_gpu:
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
                          error=self.error, gpu_mode=self.gpu_mode(), gpu=self.gpu_card())

    def gpu_card(self) -> str | None:
        """The card the weights are on now (cuda:0, cuda:1, ...), or None (not on a GPU)."""
        lease = self.lease
        if lease is None or lease.residency is None or not lease.on_gpu:
            return None
        return lease.at

    def gpu_mode(self) -> str | None:
        """How the weights are on the GPU now: resident, streamed, or None (not there)."""
        lease = self.lease
        if lease is None or lease.residency is None or not lease.on_gpu:
            return None
        return "streamed" if getattr(lease.residency, "streamed", False) else "resident"


def st_dtype_kwargs(dtype: str | None) -> dict:
    """sentence-transformers keyword arguments that load the weights in an entry's ``dtype``
    (none for ``auto`` or no dtype: the checkpoint's own)."""
    if dtype in (None, "auto"):
        return {}
    return {"model_kwargs": {"dtype": torch_dtype(dtype)}}
