"""The text side of generation: sampled token ids in, streamed text out.

One implementation for both ways the LLM actor generates (the continuous batch and the plain
``generate`` path): :class:`TextTail` turns one sequence's tokens into text as they come
(decoding only a short window per token), cuts at the first stop string, holds back the
characters a stop string could still claim, and pushes the safe text to the request's stream.
No torch here: the tokenizer is anything with ``decode`` (and, for batches, ``batch_decode``).
"""
from __future__ import annotations

from typing import Any, Protocol


class PieceSink(Protocol):
    def push_threadsafe(self, item: Any) -> None: ...


class TextTail:
    """One sequence's generated tokens and the text made of them so far."""

    def __init__(self, tokenizer: Any, stop: list[str], stream: PieceSink | None):
        self.tok = tokenizer
        self.stop = list(stop)
        self.stream = stream
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0              # window start (earlier tokens give decode its context)
        self.read = 0                # tokens already turned into text
        self.text = ""
        self.searched = 0            # text before this offset holds no stop string start
        self.emitted = 0
        self.hit_stop = False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def windows(self) -> tuple[list[int], list[int]]:
        """The two token windows whose decoded difference is the new text."""
        return self.ids[self.prefix:self.read], self.ids[self.prefix:]

    def add(self, tid: int) -> bool:
        """Append one token; True once a stop string was seen."""
        self.ids.append(tid)
        prev, new = self.windows()
        return self.update(self._decode(prev), self._decode(new))

    def update(self, prev: str, new: str) -> bool:
        """Take the decoded :meth:`windows` after a token was appended to ``ids``."""
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self._extend(new[len(prev):])
            self.prefix, self.read = self.read, len(self.ids)
        if not self.hit_stop:
            self._push(final=False)
        return self.hit_stop

    def _extend(self, piece: str) -> None:
        self.text += piece
        if not self.stop:
            return
        start = max(0, self.searched - self.hold)
        cut = -1
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self.text = self.text[:cut]
            self.hit_stop = True
        self.searched = len(self.text)

    def _push(self, final: bool) -> None:
        safe = len(self.text) if (final or self.hit_stop) else len(self.text) - self.hold
        if safe > self.emitted:
            piece = self.text[self.emitted:safe]
            self.emitted = safe
            if self.stream is not None:
                self.stream.push_threadsafe(piece)

    def finish(self) -> str:
        """Flush what is held back (and an unfinished character); the whole text."""
        if not self.hit_stop and self.read < len(self.ids):
            prev = self._decode(self.ids[self.prefix:self.read])
            new = self._decode(self.ids[self.prefix:])
            if len(new) > len(prev):
                self._extend(new[len(prev):])
        self._push(final=True)
        return self.text


def decode_windows(tokenizer: Any, windows: list[list[int]]) -> list[str]:
    """``[tokenizer.decode(w, skip_special_tokens=True) for w in windows]`` in one call: the
    Rust backend's ``decode_batch`` for a fast tokenizer that cleans nothing up after decoding
    (what ``decode`` then returns is exactly that), else ``batch_decode``, else one ``decode``
    per window. (transformers' ``batch_decode`` walks each window in Python first: ~10 us a
    window, two windows per row per step.)"""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch") and \
            getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return list(backend.decode_batch(windows, skip_special_tokens=True))
    batch = getattr(tokenizer, "batch_decode", None)
    if batch is not None:
        return list(batch(windows, skip_special_tokens=True))
    return [tokenizer.decode(w, skip_special_tokens=True) for w in windows]


def advance(tokenizer: Any, tails: list[TextTail]) -> list[bool]:
    """Each tail just had a token appended to ``ids``: decode every tail's two windows in one
    tokenizer call and update them. Per tail, True once it hit a stop string."""
    windows = [w for tail in tails for w in tail.windows()]
    decoded = decode_windows(tokenizer, windows)
    return [tail.update(decoded[2 * i], decoded[2 * i + 1]) for i, tail in enumerate(tails)]


class TailStreamer:
    """A transformers streamer (``put``/``end``) for ``generate``: feeds a :class:`TextTail`.
    ``generate`` first hands over the prompt, which is skipped; EOS tokens end the text."""

    def __init__(self, tail: TextTail, eos: set[int]):
        self.tail = tail
        self.eos = eos
        self.prompt_seen = False
        self.hit_eos = False
        self.n_tokens = 0

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for tid in value.reshape(-1).tolist():
            if self.tail.hit_stop or self.hit_eos:
                return
            if tid in self.eos:
                self.hit_eos = True
                return
            self.n_tokens += 1
            self.tail.add(int(tid))

    def end(self) -> None:
        """Nothing to do: the caller finishes the tail (so a later continuation can resume)."""
