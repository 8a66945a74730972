"""A prompt's text as token ids, as ``tokenizer(text)["input_ids"]`` gives them, for less of
Python's lock (issue 15).

transformers' call on a Rust ("fast") tokenizer checks its arguments, sets the truncation and
padding it was asked for, runs the Rust tokenizer's ``encode_batch`` on a one-text batch (which
lets go of Python's lock while it encodes) and then builds a ``BatchEncoding`` of Python lists
(ids, attention mask, token types) under the lock. For a ~230-token chat prompt that wrapping is
about a tenth of the encode on one thread, and on the LLM's prompt threads (actors/
early_prompts.py), where the lock is shared with the event loop taking a burst in and with the
batch loop, 32 prompts took ~45% longer than calling ``encode_batch`` directly
(``benchmarks/prompt_encode.py``).

:func:`text_ids` calls the Rust tokenizer directly only where transformers' call does exactly
that: the tokenizer is transformers' own Rust-backed class (its ``_encode_plus`` not replaced
by a subclass), no truncation or padding is set on the backend (a tokenizer.json may set
them; transformers' first call clears them), and the backend's
``encode_special_tokens`` is what the call would set it to (``split_special_tokens``). Anything
else takes transformers' call, as before.
"""
from __future__ import annotations

from typing import Any

__all__ = ["text_ids", "direct_backend"]


def _base_encode_plus() -> Any:
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:                      # other transformers versions: their own call
        return None
    return TokenizersBackend.__dict__.get("_encode_plus")


_BASE = _base_encode_plus()


def direct_backend(tok: Any) -> Any:
    """``tok``'s Rust tokenizer when ``tok(text)`` is exactly its ``encode_batch([text])``,
    else None."""
    if _BASE is None or getattr(type(tok), "_encode_plus", None) is not _BASE:
        return None
    backend = getattr(tok, "_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    if bool(getattr(tok, "split_special_tokens", False)) != bool(backend.encode_special_tokens):
        return None
    return backend


def text_ids(tok: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """``list(tok(text, add_special_tokens=...)["input_ids"])``, from the Rust tokenizer
    straight where that is what the call computes (:func:`direct_backend`)."""
    backend = direct_backend(tok)
    if backend is None:
        return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
    return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
