"""The pool model work runs in, so the event loop never blocks on a forward pass."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import Any, Callable


class ModelExecutor:
    def __init__(self, max_workers: int = 4):
        self.max_workers = max_workers
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="model-work")

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
