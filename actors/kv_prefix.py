"""Prompt prefixes computed once (issues 15, 17): the keys and values of a prompt's leading
blocks, kept after its prefill and shared by the next prompts that start with the same tokens
(a system prompt, the same retrieved passages, the same question asked again).

A prefix is addressed by the hash chain of its ``BLOCK``-token blocks (block i's hash covers
blocks 0..i), so a prompt finds the longest stored prefix it shares in one dictionary lookup per
block, whatever entry holds it. An entry holds one prompt's first ``n`` tokens' keys and values
(opaque here: whatever the runner stores, e.g. per layer ``[1, kv_heads, n, head_dim]``); any
block-aligned part of it serves. An entry also keeps the tokens after its last whole block (its
``tail``, up to the prompt's last token but one): a prompt that shares all of the entry's blocks
reuses as much of the tail as it shares too, token by token (the same prompt asked again
recomputes one token, not up to a block; llama.cpp's server reuses a repeated prompt so).
Entries in use (``acquire`` .. ``release``: a chunked prefill
that starts from it) are never dropped; the others go least recently used first when the
store's token budget is spent, and ``clear`` drops them all (the weights left the GPU). When an
entry goes, the store lets go of its tensors: the memory is freed as soon as no prefill holds
them any more. No torch here.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# tokens per block: a prefix is reused in whole blocks. 16 (vLLM's block size too): a chat
# template's system prompt (~30 tokens) is reused, and a prompt asked again recomputes at most
# 16 tokens; a 4,096-token prompt is 256 dictionary lookups
BLOCK = 16


def chain_hashes(tokens: list[int], block: int = BLOCK) -> list[int]:
    """Hash of each whole block of ``tokens`` chained with the blocks before it."""
    out: list[int] = []
    h = 0
    for i in range(0, len(tokens) - block + 1, block):
        h = hash((h, tuple(tokens[i:i + block])))
        out.append(h)
    return out


@dataclass(eq=False)
class PrefixEntry:
    hashes: list[int]
    kv: Any                       # the runner's keys and values of the first ``tokens`` tokens
    users: int = 0                # prefills started from it and not finished
    last_used: int = 0
    hits: int = 0
    tail: tuple[int, ...] = ()    # the tokens after the whole blocks that ``kv`` holds too

    @property
    def tokens(self) -> int:
        return len(self.hashes) * BLOCK + len(self.tail)


@dataclass
class PrefixStore:
    budget_tokens: int = 4096     # 0: off
    #: chain hash -> (the entry that holds that prefix, its length in blocks)
    index: dict[int, tuple[PrefixEntry, int]] = field(default_factory=dict)
    entries: list[PrefixEntry] = field(default_factory=list)
    hits: int = 0
    hit_tokens: int = 0
    _clock: Any = field(default_factory=itertools.count)

    @property
    def tokens(self) -> int:
        return sum(e.tokens for e in self.entries)

    def lookup(self, tokens: list[int], *, keep: int = 1) -> tuple[PrefixEntry | None, int]:
        """The entry holding the longest stored prefix of ``tokens`` and its length in tokens
        (at least ``keep`` tokens are left over: the forward that follows needs one)."""
        if not self.budget_tokens or not self.entries:
            return None, 0
        usable = tokens[:max(0, len(tokens) - keep)]
        best: tuple[PrefixEntry | None, int] = (None, 0)
        for i, h in enumerate(chain_hashes(usable)):
            hit = self.index.get(h)
            if hit is None:
                break
            best = (hit[0], (i + 1) * BLOCK)
        entry, n = best
        if entry is not None and entry.tail and n == len(entry.hashes) * BLOCK:
            n += _common(entry.tail, usable[n:])          # its tail, as far as both agree
        return entry, n

    def acquire(self, entry: PrefixEntry) -> None:
        entry.users += 1
        entry.hits += 1
        entry.last_used = next(self._clock)

    def release(self, entry: PrefixEntry) -> None:
        entry.users = max(0, entry.users - 1)
        self._fit()

    def count_hit(self, n: int) -> None:
        self.hits += 1
        self.hit_tokens += n

    def insert(self, tokens: list[int], make_kv: Callable[[int], Any], *, keep: int = 1) -> \
            PrefixEntry | None:
        """Store ``tokens`` but the last ``keep`` (its whole blocks and the tail after them),
        unless a stored entry already covers it. An entry of the same blocks whose tail this
        one extends further (and that no prefill uses now) is replaced. ``make_kv(n)`` gives
        the keys and values of the first ``n`` tokens (called only when something is stored).
        The entry, or None."""
        if not self.budget_tokens:
            return None
        usable = tokens[:max(0, len(tokens) - keep)]
        hashes = chain_hashes(usable)
        tail = tuple(usable[len(hashes) * BLOCK:])
        if not hashes or len(usable) > self.budget_tokens:
            return None
        have = self.index.get(hashes[-1])
        if have is not None:                     # already there (as a whole or a part)
            old, blocks = have
            old.last_used = next(self._clock)
            if blocks < len(old.hashes) or old.users or \
                    _common(old.tail, tail) >= len(tail):
                return None
            # the same blocks, a tail this prompt extends further: it replaces the old one
            self._drop(old)
        entry = PrefixEntry(hashes, make_kv(len(usable)), last_used=next(self._clock),
                            tail=tail)
        self.entries.append(entry)
        for i, h in enumerate(hashes):
            self.index[h] = (entry, i + 1)
        self._fit()
        return entry

    def clear(self) -> None:
        """Drop every entry nobody uses (all of them when the weights leave the GPU: the
        runner has no prefill running then)."""
        for e in list(self.entries):
            if not e.users:
                self._drop(e)

    def shrink(self, tokens: int) -> None:
        """Keep at most ``tokens`` (the most recently used entries nobody uses; 0: as
        :meth:`clear`)."""
        if not tokens:
            self.clear()
            return
        self._fit(tokens)

    def _fit(self, limit: int | None = None) -> None:
        limit = self.budget_tokens if limit is None else min(limit, self.budget_tokens)
        while self.tokens > limit:
            idle = [e for e in self.entries if not e.users]
            if not idle:
                return
            self._drop(min(idle, key=lambda e: e.last_used))

    def _drop(self, entry: PrefixEntry) -> None:
        self.entries.remove(entry)
        for i, h in enumerate(entry.hashes):
            if self.index.get(h, (None, 0))[0] is entry:
                # a shorter part another entry also holds stays findable through it
                other = next((e for e in self.entries if len(e.hashes) > i and
                              e.hashes[i] == h), None)
                if other is None:
                    del self.index[h]
                else:
                    self.index[h] = (other, i + 1)
        entry.kv = None


def _common(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
