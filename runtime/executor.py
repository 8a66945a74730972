"""The pool model work runs in, so the event loop never blocks on a forward pass; and how many
threads torch computes with (``TORCH_THREADS``)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from .heap import collect, trim_heap

log = logging.getLogger("agile_rag.executor")

#: seconds the pool stays idle before the heap is trimmed (see ModelExecutor)
IDLE_TRIM_S = 1.0


def _idle_work(freeze: bool) -> float:
    if freeze:
        collect(freeze=True)
    return trim_heap()


def _log_trim(fut: concurrent.futures.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        log.debug("idle: heap trimmed in %.1f ms", 1000 * fut.result())


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _given_threads(setting: int | None) -> int | None:
    """A thread count the user gave: ``TORCH_THREADS`` > 0, else ``OMP_NUM_THREADS`` when
    the environment sets it; None: auto."""
    if isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        return setting
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return None


#: the process's ``CUDNN_ATTENTION`` as :func:`set_cudnn_attention` last set it (None: never
#: set; torch's own default stands)
cudnn_attention_setting: bool | None = None


def set_cudnn_attention(on: bool) -> bool:
    """Whether torch's ``scaled_dot_product_attention`` may pick cuDNN's kernels
    (``CUDNN_ATTENTION``; process-wide). Off by default: cuDNN builds an execution plan for
    each new shape on the CPU, and a server's shapes are new all the time (every prompt
    length, every chunk after a stored prefix, every encoder batch width). On an H200, with
    it off a 1,000-token prompt's first token came in 0.055 s instead of 0.12 s and a first
    burst of 32 chats' in 0.075 s instead of 0.15 s (engine alone), and served ingest rose
    from 0.85 to 1.50 of a direct ``encode`` (benchmarks/results/gpu-h200-s10.md); flash and
    memory-efficient attention need no plan. The LLM's decode graphs, whose shapes are fixed,
    are captured with cuDNN allowed all the same (runtime/cuda_graph.py:
    ``cudnn_attention_allowed``). Returns whether torch has the switch."""
    import torch

    global cudnn_attention_setting
    switch = getattr(torch.backends.cuda, "enable_cudnn_sdp", None)
    if switch is None:
        return False
    switch(bool(on))
    cudnn_attention_setting = bool(on)
    return True


def torch_threads(setting: int | None) -> int:
    """Torch intra-op threads for a ``TORCH_THREADS`` setting: a positive number as given;
    0 (auto): ``OMP_NUM_THREADS`` when the environment sets it, else one less than the usable
    cores (at least 1). Torch's own default, one per core, falls ~3x when another process
    takes a core (its threads wait for each other at every op); one core left free keeps
    ~0.7 of the quiet speed (2-core figures in the README, "Threads")."""
    return _given_threads(setting) or max(1, usable_cores() - 1)


def decode_thread_range(setting: int | None) -> tuple[int, int] | None:
    """(the default count, every core) for the LLM's CPU decode loop to choose between by
    timing (runtime/thread_tuner.py), when ``TORCH_THREADS`` is auto (0), ``OMP_NUM_THREADS``
    is not set and there is a core more than the default uses; None otherwise (a count
    given is kept as given)."""
    if _given_threads(setting) is not None:
        return None
    low, high = torch_threads(setting), usable_cores()
    return (low, high) if high > low else None


def apply_torch_threads(n: int) -> None:
    """Set torch's intra-op thread count for the calling thread (OpenMP keeps one per thread)
    and for threads that start computing later."""
    import torch
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class ModelExecutor:
    """``run`` for inference (a pool); ``run_load`` for loading weights, one at a time.

    Loads are serialised on their own thread: transformers patches module-level torch
    functions while it builds a model (empty-weight init), so two loads in parallel threads
    corrupt each other (seen: tied lm_head left on the meta device).

    ``torch_threads`` (None: leave torch as it is) is applied at construction and again in
    each pool thread as it starts.

    When no job has run for ``idle_trim_s`` (None: never) after some did, the heap's free
    pages go back to the OS (:func:`runtime.heap.trim_heap`): a burst's forward passes leave
    hundreds of MB in glibc's arenas otherwise, and RSS stays at the burst's high-water mark.
    A heap freeze asked for (:meth:`freeze_when_idle`, after a model loads or unloads) runs
    at that moment too, first.
    """

    def __init__(self, max_workers: int = 4, torch_threads: int | None = None,
                 idle_trim_s: float | None = IDLE_TRIM_S,
                 decode_threads: tuple[int, int] | None = None):
        self.max_workers = max_workers
        self.torch_threads = torch_threads
        #: (low, high): the LLM's CPU decode loop picks between them by timing; None: it
        #: keeps torch_threads (see decode_thread_range)
        self.decode_threads = decode_threads
        self.idle_trim_s = idle_trim_s
        self._busy = 0              # jobs under way (counted on the event loop only)
        self._ran = 0               # jobs ended: a trim is due when this moved since the last
        self._trimmed_at = 0
        self.trims = 0
        self._freeze_due = False
        self.freezes = 0
        init: Callable[[], None] | None = None
        if torch_threads is not None:
            apply_torch_threads(torch_threads)
            init = functools.partial(apply_torch_threads, torch_threads)
            log.info("torch computes with %d thread(s); %d executor workers", torch_threads,
                     max_workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="model-work", initializer=init)
        self._loader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model-load", initializer=init)

    async def run_load(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.run_in(self._loader, functools.partial(fn, *args))

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self.run_in(self._pool, functools.partial(fn, *args, **kwargs))

    def run_in(self, pool: concurrent.futures.Executor, job: Callable[[], Any]) -> asyncio.Future:
        """(event loop) Run ``job`` in ``pool`` (this one's or another, such as an LLM's own
        batch thread) and count it as work: no heap trim or freeze runs while it does."""
        loop = asyncio.get_running_loop()
        self._busy += 1
        fut = loop.run_in_executor(pool, job)
        fut.add_done_callback(self._job_done)
        return fut

    def _job_done(self, _fut: asyncio.Future) -> None:
        self._busy -= 1
        self._ran += 1
        self._check_when_idle()

    def freeze_when_idle(self) -> None:
        """(event loop) Collect and freeze the heap (:func:`runtime.heap.collect`) once no job
        has run for ``idle_trim_s`` (counted from now when none runs now; never when None)."""
        if self.idle_trim_s is None:
            return
        self._freeze_due = True
        self._check_when_idle()

    def _check_when_idle(self) -> None:
        """(event loop) Nothing runs now: look again in ``idle_trim_s``."""
        if not self._busy and self.idle_trim_s is not None:
            asyncio.get_running_loop().call_later(self.idle_trim_s, self._trim_if_idle,
                                                  self._ran)

    def _trim_if_idle(self, ran: int) -> None:
        """(event loop) Nothing ran since the job that scheduled this: trim (freeze first when
        asked), in the pool."""
        if self._busy or ran != self._ran or (self._trimmed_at == ran and not self._freeze_due):
            return
        self._trimmed_at = ran
        freeze, self._freeze_due = self._freeze_due, False
        self.trims += 1
        self.freezes += freeze
        try:
            fut = self._pool.submit(_idle_work, freeze)
        except RuntimeError:        # shut down
            return
        fut.add_done_callback(_log_trim)

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._loader.shutdown(wait=wait, cancel_futures=True)
