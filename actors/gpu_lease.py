"""A model actor's side of the VRAM arbiter's protocol (not an actor: owned by one model actor
and used only from its own handler, so it needs no locks).

Before each job the model actor calls :meth:`GpuLease.acquire`; it answers where to compute:

- ``device: cpu`` never asks; ``device: cuda`` holds a pinned grant from load on;
- ``device: flex``: a job with fewer items than ``cuda_thres`` runs on the CPU without asking
  (unless the weights are already on the GPU); otherwise the lease asks the arbiter for the
  weights plus the job's working memory, admits the weights (one host-to-device copy) once
  granted, and falls back to the CPU, with the reason traced, when the grant is refused or
  does not come in time.

After the job :meth:`finish` tells the arbiter ``JobFinished`` and, with ``idle_on_cpu``,
drops the GPU copy and ``Release``s the grant. A ``Revoke`` (handled between jobs, never
during one) drops the GPU copy and answers ``Released``.

Several GPUs: a pinned model asks for its card (``device: cuda:N``; ``cuda`` is ``cuda:0``),
a flex one for none, and the arbiter's ``Granted.device`` says where the weights go;
:attr:`GpuLease.at` is that card while they are there, and :meth:`bound` runs a job's
function with it as the thread's current CUDA device (streams, graphs, cuBLAS handles).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..runtime.actor import CONTROL, Envelope
from ..runtime.errors import ServiceError
from .messages import JobFinished, Release, Released, RequestGrant, Trimmed
from .states import DeviceMode

log = logging.getLogger("agile_rag.gpu")
GRANT_WAIT_S = 60.0


class GpuLease:
    def __init__(self, owner, residency, arbiter, *, device: str = "cuda"):
        self.owner = owner              # the model actor
        self.residency = residency      # runtime.residency.WeightResidency (or a test double)
        self.arbiter = arbiter          # the VRAMArbiter actor
        self.device = device            # where admitted weights live ("cuda")
        self.granted = 0                # bytes the arbiter counts for us
        self.busy = False
        self.admit_s = 0.0              # how long our last admit took (the arbiter's cost)
        self.kept = 0                   # the weights part of our grant (what a Trim keeps)
        self.stream_working = 0         # a streamed grant's bytes for the job's forwards
        self.at: str | None = None      # the card our grant (and our weights) are on

    @property
    def on_gpu(self) -> bool:
        return self.residency is not None and self.residency.on_gpu

    @property
    def spec(self):
        return self.owner.spec

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await self.owner.system.executor.run(fn)

    async def acquire(self, items: int, working_bytes: int, env: Envelope | None, *,
                      preemptible: bool = False, stream_working: int = 0,
                      stream_working_min: int = 0, stream_s: float = 0.0) -> str:
        """Where this job computes: ``self.device`` or ``"cpu"``. ``preemptible``: the job
        pauses when the arbiter sends ``Yield`` (the owner handles it). ``stream_working``:
        the job's working memory if it runs layer-streamed (the arbiter may grant that mode;
        ``streamed`` says afterwards); ``stream_s``: the owner's measure of how much longer
        the job takes streamed (the copies' estimate when that is more)."""
        mode = self.spec.device
        if mode == DeviceMode.CPU:
            return "cpu"
        if mode == DeviceMode.FLEX and not self.on_gpu and self.spec.cuda_thres and \
                items < self.spec.cuda_thres:
            _note(env, gpu="below cuda_thres")
            return "cpu"
        need = self.residency.weight_bytes + working_bytes
        t0 = time.monotonic()
        card = f"cuda:{getattr(self.spec, 'gpu', None) or 0}" if mode == DeviceMode.CUDA else None
        try:
            granted = await self.arbiter.ask(
                RequestGrant(model=self.owner.name, nbytes=need, pinned=(mode == DeviceMode.CUDA),
                             device=card,
                             preemptible=preemptible, weights=self.residency.weight_bytes,
                             restore_s=self.restore_s(), trim_s=self.trim_s(),
                             **self._stream_terms(stream_working, stream_working_min,
                                                  stream_s)),
                timeout=GRANT_WAIT_S, sender=self.owner.name,
                request_id=env.request_id if env else None)
        except ServiceError as exc:
            self.arbiter.tell(JobFinished(model=self.owner.name), priority=CONTROL,
                              sender=self.owner.name)
            _note(env, gpu=f"refused: {exc.message}")
            log.info("%s runs on CPU: %s", self.owner.name, exc.message)
            return "cpu"
        self.granted = max(self.granted, granted.nbytes)
        self.kept = granted.nbytes - (need - self.residency.weight_bytes)   # the weights part
        self.busy = True
        _note(env, grant_wait_s=round(time.monotonic() - t0, 4), evicted=list(granted.evicted))
        streamed = bool(granted.streamed)
        # a streamed job's forwards fit what was granted beyond the streamed parts
        self.stream_working = granted.nbytes - self._stream_bytes() if streamed else 0
        _note(env, gpu_mode="streamed" if streamed else "resident", gpu_device=granted.device)
        moved = self.at is not None and self.at != granted.device
        if not self.on_gpu or moved or \
                streamed != bool(getattr(self.residency, "streamed", False)):
            # the card the grant is on ("cuda" machines); a test double's own device otherwise
            where = granted.device if str(self.device).startswith("cuda") else self.device
            try:
                if streamed:
                    stats = await self._run(lambda: self.residency.admit(where, streamed=True))
                else:
                    stats = await self._run(lambda: self.residency.admit(where))
            except Exception as exc:  # noqa: BLE001 - fall back to CPU, give the grant back
                log.error("%s could not move to the GPU: %s", self.owner.name, exc)
                await self.give_back()
                _note(env, gpu=f"admit failed: {exc}")
                return "cpu"
            if not streamed:                     # the whole model's copy: the restore cost
                self.admit_s = float(stats.get("seconds", 0.0))
            _note(env, admit_bytes=stats.get("bytes", 0),
                  admit_s=round(float(stats.get("seconds", 0.0)), 4))
        self.at = granted.device
        return self.device

    def bound(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` run with our card as the calling thread's current CUDA device (a card other
        than cuda:0 only: the default needs nothing)."""
        at = self.at
        if at is None or at == "cuda:0" or not str(self.device).startswith("cuda"):
            return fn

        def on_card(*args: Any, **kwargs: Any) -> Any:
            import torch
            with torch.cuda.device(at):
                return fn(*args, **kwargs)
        return on_card

    async def finish(self, env: Envelope | None = None) -> None:
        """The job is over: idle (still resident), or gone at once with idle_on_cpu."""
        if not self.busy:
            return
        self.busy = False
        if self.spec.idle_on_cpu and self.spec.device == DeviceMode.FLEX:
            await self.give_back(env)
        else:
            self.arbiter.tell(JobFinished(model=self.owner.name), priority=CONTROL,
                              sender=self.owner.name)

    @property
    def streamed(self) -> bool:
        """The weights are on the GPU layer-streamed (the grant was for that mode)."""
        return bool(getattr(self.residency, "streamed", False))

    def _stream_bytes(self) -> int:
        return int(getattr(self.residency, "stream_bytes", 0) or 0)

    def _stream_terms(self, stream_working: int, stream_working_min: int,
                      measured_s: float = 0.0) -> dict[str, Any]:
        stream_bytes = self._stream_bytes()
        if not stream_bytes:
            return {}
        copies_s = getattr(self.residency, "stream_s", None)
        estimate = float(copies_s()) if callable(copies_s) else 0.0
        return {"stream_bytes": stream_bytes, "stream_working": int(stream_working),
                "stream_working_min": int(stream_working_min),
                "stream_s": max(estimate, float(measured_s))}

    def trim_s(self) -> float:
        """What giving back our working memory costs us when the next job comes (an LLM
        captures its CUDA graphs again); 0: next to nothing."""
        return float(getattr(self.owner, "trim_extra_s", 0.0))

    def restore_s(self) -> float:
        """What bringing our weights back costs: the measured admit, plus what the owner
        loses besides (an LLM's CUDA graphs); 0 before the first admit (the arbiter
        estimates from the bytes)."""
        if not self.admit_s:
            return 0.0
        return self.admit_s + float(getattr(self.owner, "restore_extra_s", 0.0))

    def trimmed(self, env: Envelope | None = None) -> None:
        """The arbiter asked for our working memory (the owner freed what it had): from now
        on only the weights count. Busy, we keep everything and say so."""
        if not self.busy and self.granted:
            keep = min(self.granted, self.kept or self.residency.weight_bytes)
            _note(env, trimmed=self.granted - keep)
            self.granted = keep
        self.arbiter.tell(Trimmed(model=self.owner.name, nbytes=self.granted),
                          priority=CONTROL, sender=self.owner.name)

    def paused_keeping_weights(self, env: Envelope | None = None) -> None:
        """Our job paused for a waiter and freed its working memory (a Yield that asked for
        the cache only): the job is over for the arbiter, and only the weights stay."""
        self.busy = False
        self.arbiter.tell(JobFinished(model=self.owner.name), priority=CONTROL,
                          sender=self.owner.name)
        self.trimmed(env)                 # then only the weights count

    async def revoked(self, env: Envelope | None = None) -> None:
        """The arbiter wants our memory (we are between jobs): drop the GPU copy, say so."""
        stats = await self._run(self.residency.evict)
        _note(env, evict_s=round(stats.get("seconds", 0.0), 5), freed=self.granted)
        self.arbiter.tell(Released(model=self.owner.name, nbytes=self.granted), priority=CONTROL,
                          sender=self.owner.name)
        self.granted = 0
        self.busy = False
        self.at = None

    async def give_back(self, env: Envelope | None = None) -> None:
        """Release on our own: idle_on_cpu, device change, delete, GPU out of memory."""
        stats = await self._run(self.residency.evict)
        _note(env, evict_s=round(stats.get("seconds", 0.0), 5))
        self.arbiter.tell(Release(model=self.owner.name), priority=CONTROL, sender=self.owner.name)
        self.granted = 0
        self.busy = False
        self.at = None

    async def close(self) -> None:
        """The model is unloaded: give the grant back if we still hold one, then let go of the
        residency (its module, host master copy and GPU copy) and of the owner, so that nothing
        here keeps the weights alive. The lease cannot be used afterwards."""
        residency = self.residency
        if residency is None:
            return
        if self.granted or self.busy or residency.on_gpu:
            await self.give_back()
        release = getattr(residency, "release", None)
        if release is not None:
            await self._run(release)
        self.residency = None
        self.owner = None
        self.arbiter = None


def _note(env: Envelope | None, **detail: Any) -> None:
    if env is not None:
        env.detail.update(detail)
