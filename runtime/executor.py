"""The pool model work runs in, so the event loop never blocks on a forward pass."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any


class ModelExecutor:
    """``run`` for inference (a pool); ``run_load`` for loading weights, one at a time.

    Loads are serialised on their own thread: transformers patches module-level torch
    functions while it builds a model (empty-weight init), so two loads in parallel threads
    corrupt each other (seen: tied lm_head left on the meta device).
    """

    def __init__(self, max_workers: int = 4):
        self.max_workers = max_workers
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="model-work")
        self._loader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model-load")

    async def run_load(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, functools.partial(fn, *args))

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._loader.shutdown(wait=wait, cancel_futures=True)
