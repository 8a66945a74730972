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

log = logging.getLogger("agile_rag.executor")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def torch_threads(setting: int | None) -> int:
    """Torch intra-op threads for a ``TORCH_THREADS`` setting: a positive number as given;
    0 (auto): ``OMP_NUM_THREADS`` when the environment sets it, else one less than the usable
    cores (at least 1). Torch's own default, one per core, falls ~3x when another process
    takes a core (its threads wait for each other at every op); one core left free keeps
    ~0.7 of the quiet speed (2-core figures in the README, "Threads")."""
    if isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        return setting
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cores() - 1)


def apply_torch_threads(n: int) -> None:
    """Set torch's intra-op thread count (process-wide: every thread's ops use it)."""
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
    """

    def __init__(self, max_workers: int = 4, torch_threads: int | None = None):
        self.max_workers = max_workers
        self.torch_threads = torch_threads
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
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, functools.partial(fn, *args))

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._loader.shutdown(wait=wait, cancel_futures=True)
