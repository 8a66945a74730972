"""Tokenized inputs of the encoder engine (actors/encoder_engine.py): pieces and their pool.

A request's texts (or query-document pairs) become *pieces*: one tokenized input each, with its
token count. Pieces wait in a :class:`TokenPool` sorted by length; each forward takes one batch
from it within the model's token budget (``max_batch_tokens``: rows x the longest row, padding
included), its rows of similar length so that little is padding, always with the oldest waiting
piece in it (no request starves). :func:`collate` pads a batch's rows into the arrays of one
forward; :func:`split_features` turns a tokenizer's output into :class:`Tokens`.
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .encoder_jobs import Pending

#: batches never hold pieces whose padding would make less than this fraction real tokens
#: (a lone long text does not drag short ones up to its length)
MIN_FILL = 0.5


class Tokens:
    """One tokenizer call's output: per feature a padded int array [n, width] (as the tokenizer
    padded it), each row's real length, and the features that are not per-row arrays (passed
    to the model as they are, e.g. sentence-transformers' ``modality``)."""
    __slots__ = ("arrays", "lengths", "consts", "width")

    def __init__(self, arrays: dict[str, np.ndarray], lengths: np.ndarray, consts: dict):
        self.arrays = arrays
        self.lengths = lengths
        self.consts = consts
        self.width = next(iter(arrays.values())).shape[1] if arrays else 0


class Piece:
    """One input of a request (a text, or a query-document pair) waiting for a forward."""
    __slots__ = ("length", "seq", "tokens", "row", "raw", "owner", "index", "taken")

    def __init__(self, length: int, seq: int, tokens: Tokens | None, row: int, raw: Any,
                 owner: Pending, index: int):
        self.length = length
        self.seq = seq
        self.tokens = tokens
        self.row = row
        self.raw = raw
        self.owner = owner
        self.index = index
        self.taken = False


def input_chars(x: Any) -> int:
    """Characters of an input (a text, or a pair), to size tokenizer calls."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, (list, tuple)):
        return sum(len(y) for y in x if isinstance(y, str))
    return 1


def _piece_key(p: Piece) -> tuple[int, int]:
    return (p.length, p.seq)


class TokenPool:
    """Pieces waiting for a forward, kept sorted by length. :meth:`take` returns one batch:
    everything when it all fits the budget, else a run of similar lengths around the oldest
    waiting piece, grown while the padded size (rows x longest) stays within the budget and at
    least ``MIN_FILL`` of it is real tokens."""

    def __init__(self) -> None:
        self._sorted: list[Piece] = []
        self._order: deque[Piece] = deque()     # arrival order (taken ones skipped lazily)
        self.tokens = 0                         # real tokens waiting

    def __len__(self) -> int:
        return len(self._sorted)

    def add(self, pieces: list[Piece]) -> None:
        if not pieces:
            return
        self._order.extend(pieces)
        self.tokens += sum(p.length for p in pieces)
        if len(pieces) * 8 >= len(self._sorted):
            self._sorted.extend(pieces)
            self._sorted.sort(key=_piece_key)       # timsort: runs of sorted data are cheap
        else:
            for p in pieces:
                bisect.insort(self._sorted, p, key=_piece_key)

    def padded(self) -> int:
        """Padded size of one batch holding everything that waits."""
        return len(self._sorted) * self._sorted[-1].length if self._sorted else 0

    def take(self, budget: int, max_rows: int) -> list[Piece]:
        s = self._sorted
        n = len(s)
        if n == 0:
            return []
        if n <= max_rows and n * s[-1].length <= budget:
            batch, self._sorted = s, []
            self._order.clear()
            self.tokens = 0
            for p in batch:
                p.taken = True
            return batch
        order = self._order
        while order[0].taken:
            order.popleft()
        anchor = order[0]
        k = bisect.bisect_left(s, _piece_key(anchor), key=_piece_key)
        lo = hi = k
        real = anchor.length
        while hi - lo + 1 < max_rows:
            size = hi - lo + 1
            top = s[hi].length
            best = None                              # (waste, direction)
            if lo > 0 and (size + 1) * top <= budget:
                best = (top - s[lo - 1].length, -1)
            if hi + 1 < n and (size + 1) * s[hi + 1].length <= budget:
                up = (size * (s[hi + 1].length - top), 1)
                if best is None or up[0] < best[0]:
                    best = up
            if best is None:
                break
            if best[1] < 0:
                new_real, new_top = real + s[lo - 1].length, top
            else:
                new_real, new_top = real + s[hi + 1].length, s[hi + 1].length
            if new_real < MIN_FILL * (size + 1) * new_top:
                break
            real = new_real
            if best[1] < 0:
                lo -= 1
            else:
                hi += 1
        batch = s[lo:hi + 1]
        del s[lo:hi + 1]
        self.tokens -= real
        for p in batch:
            p.taken = True
        return batch


def collate(pieces: list[Piece], pads: dict[str, int], left: bool) -> tuple[dict, dict]:
    """The padded int arrays [rows, longest] of a batch, copied per tokenizer call with numpy
    fancy indexing (rows keep the tokenizer's own values; padding uses ``pads``)."""
    width = max(p.length for p in pieces)
    n = len(pieces)
    groups: dict[int, tuple[Tokens, list[int], list[int]]] = {}
    for j, p in enumerate(pieces):
        g = groups.get(id(p.tokens))
        if g is None:
            assert p.tokens is not None, "a piece of the fast path has its tokens"
            g = groups[id(p.tokens)] = (p.tokens, [], [])
        g[1].append(j)
        g[2].append(p.row)
    first = groups[id(pieces[0].tokens)][0]
    out = {k: np.full((n, width), pads.get(k, 0), dtype=a.dtype) for k, a in first.arrays.items()}
    for tokens, js, rows in groups.values():
        w = min(width, tokens.width)
        ji = np.asarray(js)
        ri = np.asarray(rows)
        for k, a in tokens.arrays.items():
            if left:
                out[k][ji, width - w:] = a[ri, tokens.width - w:]
            else:
                out[k][ji, :w] = a[ri, :w]
    return out, first.consts


def rust_probe(probe: list) -> list:
    """Inputs that tell a tokenizer's edge cases apart: blanks around, case, accents and CJK,
    one too long for any model (truncation), the empty text."""
    extra = ["  spaces around  ", "UPPER lower MiXeD Case.", "ünïcödé, naïve café; 中文文本 ok",
             " ".join(["overflow"] * 700), "", "tab\tand\nnewline"]
    if probe and isinstance(probe[0], (list, tuple)):
        q = probe[0][0]
        return list(probe) + [[q, x] for x in extra] + [[x, probe[0][1]] for x in extra[:3]]
    return list(probe) + extra


def split_features(features: dict) -> Tokens:
    """A tokenizer's padded output (torch tensors [n, L]) as numpy arrays plus row lengths."""
    import torch

    arrays: dict[str, np.ndarray] = {}
    consts: dict[str, Any] = {}
    shape: tuple[int, ...] = ()
    for k, v in features.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point():
            shape = shape or tuple(v.shape)
            if tuple(v.shape) != shape:
                raise ValueError(f"feature {k!r} has shape {tuple(v.shape)}, not {shape}")
            arrays[k] = v.detach().cpu().numpy()
        elif isinstance(v, torch.Tensor):
            raise ValueError(f"feature {k!r} ({tuple(v.shape)}) is not one row per input")
        else:
            consts[k] = v
    if "attention_mask" in arrays:
        lengths = arrays["attention_mask"].sum(axis=1)
    elif "input_ids" in arrays and shape:
        lengths = np.full(shape[0], shape[1])
    else:
        raise ValueError("the tokenizer gave no input_ids")
    return Tokens(arrays, lengths.astype(np.int64), consts)
