"""A chat's prompt encoded as the LLM actor takes it in, on a few threads of the actor's own,
before the batch loop reaches it (``llm_params.prompt_threads``).

The batch loop encodes each prompt it accepts (the chat template rendered, the text tokenized, the
length and grammar checked: the LLM actor's ``_prepare``). A burst of 32 chats' prompts, one by one
in the loop's thread, held its first forward back (~0.5 ms each for a ~230-token prompt on this
project's CPU, benchmarks/prompt_encode.py; the prompts past the first pass's are encoded while
that pass computes, but the first pass's ~18 still lie before it). Started here as each chat
arrives, they are encoded while the rest of the burst is taken in and while the loop's GPU grant is
asked for, several at a time: the Rust tokenizer lets go of the GIL while it encodes
(``tokenizer(text)`` calls its ``encode_batch``). The loop then takes each prompt as encoded
(:func:`prepared`), waiting for one still being encoded, or encodes it itself if no thread has
begun it.

Which prompts are encoded where changes no token: ``_prepare`` is the same code on either thread.
Its errors (a prompt past the context, a schema that cannot be enforced) answer the chat from the
loop, as before, in its turn.
"""
from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from typing import Any

__all__ = ["EarlyPrompts", "prepared", "auto_threads", "MAX_THREADS"]

#: the most threads ``prompt_threads`` may ask for
MAX_THREADS = 16


def auto_threads(on_gpu: bool, cpus: int | None = None) -> int:
    """``prompt_threads`` unset: on a GPU, a thread per four cores up to 4 (none on fewer than
    8 cores); an LLM that computes on the CPU encodes in its loop (its forwards keep the cores
    busy, and its prompts' encoding is small beside its prefill)."""
    cpus = os.cpu_count() or 1 if cpus is None else cpus
    return min(4, cpus // 4) if on_gpu and cpus >= 8 else 0


class EarlyPrompts:
    """``threads`` threads that run ``prepare(req)`` for requests handed to :meth:`start`."""

    def __init__(self, prepare: Callable[[Any], None], threads: int, name: str = "llm"):
        self.threads = threads
        self._prepare = prepare
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix=f"llm-prompts-{name}")

    def start(self, req: Any) -> None:
        """Begin encoding ``req``'s prompt (from the event loop, as the actor takes it in)."""
        if req.prompt is None and req.early is None:
            req.early = self._pool.submit(self._run, req)

    def _run(self, req: Any) -> BaseException | None:
        try:
            self._prepare(req)
        except Exception as exc:  # noqa: BLE001 - the loop answers the chat with it
            return exc
        return None

    def close(self) -> None:
        """No more prompts; those begun finish (the loop still takes them), the rest are
        dropped (the loop encodes them itself)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def prepared(req: Any, prepare: Callable[[Any], None] | None) -> bool:
    """Make sure ``req``'s prompt is prepared: take what its early encoding did (waiting for it
    if a thread is still at it: the wait lets go of the GIL), or call ``prepare`` here (none
    was begun, or it was still queued). Raises what preparing raised. True when a prompt
    thread had prepared it."""
    early, req.early = req.early, None
    if early is not None and not early.cancel():
        exc = early.result()
        if exc is not None:
            raise exc
        return True
    if req.prompt is None and prepare is not None:
        prepare(req)
    return False
