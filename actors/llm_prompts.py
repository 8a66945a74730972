"""Chats' prompts as token ids, a turn's prompts at once (issue 15).

The batch loop hands every new chat of a turn to the LLM actor's ``prepare`` together
(actors/llm_batching.py): their prompts are rendered (the chat template, in Python) and then
encoded in one go. One by one, the 32 prompts of a burst (~220 tokens each) held the loop's
thread ~0.6 ms each on the H200's host, ~0.03 s of the burst with the GPU idle
(benchmarks/results/gpu-h200-s19.md). The server turns the tokenizers' own thread pool off
(``TOKENIZERS_PARALLELISM=false``: for many small embedding requests it cost 3.5x the CPU,
benchmarks/results/embed-gpu-fronts-h200-s9.md), so :class:`PromptEncoder` splits a turn's
texts over a few threads of its own instead: the Rust backend's ``encode_batch`` lets go of the
GIL, so they encode side by side.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any

from . import llm_tools

#: texts per thread, at least, before a turn's prompts are split over threads
TEXTS_PER_THREAD = 4
#: threads that encode a turn's prompts (the loop's own among them), at most
MAX_THREADS = 8


def prompt_text(tok: Any, msg: Any) -> tuple[str, bool]:
    """``msg``'s prompt as text, and whether encoding it adds the tokenizer's special tokens:
    a chat through the model's chat template (which writes its own; what
    ``apply_chat_template(tokenize=True)`` encodes is this text without them), a chat without a
    template or a completions prompt as plain text (with them)."""
    if msg.messages is not None:
        messages, tools = llm_tools.template_inputs(tok, msg)
        if tok.chat_template is None:
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + \
                "\nassistant:", True
        return str(tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                           tokenize=False)), False
    return msg.prompt if msg.prompt is not None else "", True


def default_threads() -> int:
    """Half the usable cores, at most :data:`MAX_THREADS` (1: no threads of its own)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores // 2))


class PromptEncoder:
    """``encoder(tokenizer, msgs) -> per chat its prompt's token ids, or the error its prompt
    met``. Owned by one LLM actor; :meth:`close` ends its threads."""

    def __init__(self, threads: int | None = None):
        self.threads = default_threads() if threads is None else max(1, threads)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __call__(self, tok: Any, msgs: list[Any]) -> list[list[int] | Exception]:
        out: list[list[int] | Exception] = [[] for _ in msgs]
        texts: dict[bool, list[tuple[int, str]]] = {False: [], True: []}
        for i, msg in enumerate(msgs):
            try:
                text, special = prompt_text(tok, msg)
                texts[special].append((i, text))
            except Exception as exc:  # noqa: BLE001 - a template that fails on this chat
                out[i] = exc
        for special, group in texts.items():
            if not group:
                continue
            try:
                found = self._encode(tok, [t for _, t in group], special)
            except Exception:  # noqa: BLE001 - a text the tokenizer refuses: each on its own
                found = [_encode_one(tok, t, special) for _, t in group]
            for (i, _), ids in zip(group, found):
                out[i] = ids
        return out

    def _encode(self, tok: Any, texts: list[str], special: bool) -> list[list[int] | Exception]:
        backend = _plain_backend(tok)
        if backend is None:                   # transformers' own call, in one go
            return [list(ids) for ids in tok(texts, add_special_tokens=special)["input_ids"]]
        parts = min(self.threads, len(texts) // TEXTS_PER_THREAD)
        if parts <= 1:
            return _backend_ids(backend, texts, special)
        size = -(-len(texts) // parts)
        chunks = [texts[k:k + size] for k in range(0, len(texts), size)]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.threads - 1, thread_name_prefix="llm-prompts")
        futures = [self._pool.submit(_backend_ids, backend, c, special) for c in chunks[1:]]
        first = _backend_ids(backend, chunks[0], special)     # this thread takes a share
        return first + [ids for f in futures for ids in f.result()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def _plain_backend(tok: Any) -> Any:
    """A fast tokenizer's Rust backend when encoding through it gives what ``tok(...)`` gives
    (it truncates and pads nothing), else None."""
    backend = getattr(tok, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    if getattr(backend, "truncation", None) is not None or \
            getattr(backend, "padding", None) is not None:
        return None
    return backend


def _backend_ids(backend: Any, texts: list[str], special: bool) -> list[list[int] | Exception]:
    return [list(e.ids) for e in backend.encode_batch(texts, add_special_tokens=special)]


def _encode_one(tok: Any, text: str, special: bool) -> list[int] | Exception:
    try:
        return list(tok(text, add_special_tokens=special)["input_ids"])
    except Exception as exc:  # noqa: BLE001 - this chat's error
        return exc
