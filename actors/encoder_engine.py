"""Encoder models (embedders, rerankers) at the model's own speed.

A request's texts (or query-document pairs) become *pieces*: one tokenized input each, with its
token count. Pieces wait in a pool sorted by length; each forward takes one batch from it within
the model's token budget (``max_batch_tokens``: rows x the longest row, padding included), its
rows of similar length so that little is padding, always with the oldest waiting piece in it (no
request starves). One forward per batch: the model is called on the padded batch directly, not
through ``encode`` / ``predict``, which would split it again.

The work runs in a *job* on the actor's task: a job starts when a request finds the model idle
and keeps taking the requests that arrive while it runs (one GPU grant for all of them), until
nothing is left or another kind of message (Describe, Revoke, a config update) waits. Inside a
job three things overlap:

- the tokenizer thread tokenizes whatever arrived, in one fast-tokenizer batch call (the
  tokenizer's own work releases the GIL);
- the forward thread(s) run batches back to back: on a GPU two batches are in flight, so the
  next one's kernels are queued while the current one computes and the GPU does not wait for
  Python between batches; on the CPU one (torch already uses every core);
- the event loop only moves requests in and answers out.

A lone request on an idle model starts at once: its tokenization is the only wait. A burst shares
forwards: what arrives while one batch computes is tokenized meanwhile and forms the next. On the
CPU, where a forward holds the cores and a small first forward slows everything arriving behind
it, the first batch of a job also takes the requests that keep arriving while the previous ones
are tokenized (within ``batch_linger_ms``); a lone request finds nothing more and starts.

The model-specific parts (how to tokenize, how to run one forward) are :class:`Backend`\\ s. At
load a backend checks itself against the library's own call (``encode`` / ``predict``) on a few
inputs; if it does not match (a sentence-transformers version or model layout we do not know) it
falls back to calling the library once per batch, which is slower but still batched by tokens.
"""
from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from ..runtime.actor import Envelope
from ..runtime.errors import ModelFailed, Overloaded, ServiceError
from .model_base import ARBITER, ModelActor, linger_seconds
from .states import Device, DeviceMode
from .torch_util import empty_cache, is_oom

log = logging.getLogger("agile_rag.encoder")

#: default ``max_batch_tokens``: rows x longest row per forward (32 pairs of 512 tokens)
DEFAULT_BATCH_TOKENS = 16384
#: the budget never goes below this (a smaller configured value is raised to it)
MIN_BATCH_TOKENS = 64
#: one tokenizer call takes inputs until about this much text: about one forward's worth
#: (4 characters a token, at least this much), so that the first forward of a big request
#: starts while the rest of it is still being tokenized
TOKENIZE_CHUNK_CHARS = 16 * 1024
TOKENIZE_CHUNK_INPUTS = 2048
#: a flex model's job stops taking new requests after this long, so that the arbiter can lend
#: the GPU to another model between jobs
FLEX_JOB_SLICE_S = 1.0
#: forwards in flight on a GPU (the next one queued while the current one computes)
GPU_DEPTH = 2
#: batches never hold pieces whose padding would make less than this fraction real tokens
#: (a lone long text does not drag short ones up to its length)
MIN_FILL = 0.5
_BASE_WORKING = 64 * 2**20
#: how fast a flex model forgets how big its recent forwards wanted to be (see job_tokens)
DEMAND_HALF_LIFE_S = 60.0


def batch_tokens_param(params: dict, default: int = DEFAULT_BATCH_TOKENS) -> int:
    """``max_batch_tokens`` from a model kind's params (a bad value keeps the default)."""
    v = params.get("max_batch_tokens")
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return max(v, MIN_BATCH_TOKENS)
    return default


# ---- tokens and pieces ---------------------------------------------------------------------------
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


def _chars(x: Any) -> int:
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


# ---- backends: how one model tokenizes and runs one forward --------------------------------------
class Backend:
    """Tokenize (tokenizer thread) and run one forward (forward thread) for one model.

    ``fast``: forwards run the model on our own padded batch; else (the self-check at load
    failed, or the model needs something we do not reproduce) ``reference`` (the library's own
    call) runs on each batch's raw inputs, and tokenization only counts tokens."""
    outputs = "vectors"                 # or "scores"

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.fast = True
        self.why_slow = ""
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pads = {"input_ids": pad if isinstance(pad, int) else 0}
        self.max_len = 512
        #: the tokenizer is used by one thread at a time (fast tokenizers refuse concurrent
        #: use while their truncation settings change); only the slow path needs it
        self.lock = threading.Lock()

    # -- the parts a subclass writes
    def features(self, inputs: list) -> dict:
        raise NotImplementedError

    def run(self, features: dict) -> Any:
        """The model on a batch of features already on its device; a torch tensor back."""
        raise NotImplementedError

    def reference(self, inputs: list) -> np.ndarray:
        raise NotImplementedError

    def module(self):
        return self.model

    # -- shared
    def device(self):
        import torch
        for p in self.module().parameters():
            return p.device
        return torch.device("cpu")

    def tokenize(self, inputs: list) -> Tokens | np.ndarray:
        """Fast: the features (rows unpadded later). Slow: just each input's token count."""
        if self.fast:
            if self._rust is not None:
                return self._rust_tokens(self._rust, inputs)
            return split_features(self.features(inputs))
        with self.lock:
            return np.asarray([len(x) for x in self._count(inputs)], dtype=np.int64)

    # -- the tokenizer's Rust core, called directly
    _rust: Any = None
    _rust_names: tuple[str, ...] = ()
    _rust_strip = False
    _rust_consts: dict = {}
    _RUST_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask",
                    "token_type_ids": "type_ids"}

    def enable_rust(self, probe: list) -> bool:
        """Tokenize with a private copy of the fast tokenizer's Rust core: one
        ``encode_batch`` call (truncation and padding done in Rust, the GIL released) and
        the arrays built straight from its encodings, instead of the library's Python layers
        (about 10x less Python per text). Used only when it gives exactly the library's own
        features on ``probe`` (with or without stripping the texts, as the library may)."""
        core = getattr(self.tokenizer, "_tokenizer", None)
        names = tuple(getattr(self.tokenizer, "model_input_names", ()) or ())
        if not self.fast or core is None or not names or \
                any(n not in self._RUST_FIELDS for n in names) or "input_ids" not in names:
            return False
        try:
            from tokenizers import Tokenizer

            want = split_features(self.features(probe))
            if set(want.arrays) != set(names):
                return False
            rt = self._rust_core(Tokenizer, core)
            for strip in (False, True):
                self._rust_names, self._rust_strip = names, strip
                got = self._rust_tokens(rt, probe)
                if got.arrays.keys() == want.arrays.keys() and all(
                        got.arrays[k].shape == want.arrays[k].shape and
                        np.array_equal(got.arrays[k], want.arrays[k]) for k in names):
                    self._rust, self._rust_consts = rt, dict(want.consts)
                    return True
        except Exception as exc:  # noqa: BLE001 - keep the library's own tokenization
            log.info("tokenizing through the library (its Rust core alone failed: %s)", exc)
        self._rust = None
        return False

    def _rust_core(self, tokenizer_cls: Any, core: Any) -> Any:
        """A private copy of the Rust tokenizer, truncating at ``max_len`` and padding to the
        longest input of each call, as the library's call does."""
        tok = self.tokenizer
        rt = tokenizer_cls.from_str(core.to_str())
        rt.no_truncation()
        rt.no_padding()
        side = getattr(tok, "truncation_side", "right") or "right"
        rt.enable_truncation(self.max_len, strategy="longest_first", direction=side)
        rt.enable_padding(direction="left" if self.left else "right",
                          pad_id=self.pads["input_ids"],
                          pad_type_id=int(getattr(tok, "pad_token_type_id", 0) or 0),
                          pad_token=str(getattr(tok, "pad_token", None) or "[PAD]"))
        return rt

    def set_max_len(self, n: int) -> None:
        """A new longest input (a live ``max_tokens`` edit): the Rust copy is replaced, not
        changed (the tokenizer thread may be using the old one right now)."""
        self.max_len = n
        if self._rust is not None:
            from tokenizers import Tokenizer
            self._rust = self._rust_core(Tokenizer, self.tokenizer._tokenizer)

    def _rust_tokens(self, rt: Any, inputs: list) -> Tokens:
        if inputs and isinstance(inputs[0], (list, tuple)):
            batch: list = [(a.strip(), b.strip()) if self._rust_strip else (a, b)
                           for a, b in inputs]
        else:
            batch = [x.strip() for x in inputs] if self._rust_strip else list(inputs)
        encs = rt.encode_batch(batch)
        arrays = {}
        for name in self._rust_names:
            field = self._RUST_FIELDS[name]
            arrays[name] = np.array([getattr(e, field) for e in encs], dtype=np.int64)
        mask = arrays.get("attention_mask")
        if mask is None:
            mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return Tokens(arrays, mask.sum(axis=1).astype(np.int64), dict(self._rust_consts))

    def _count(self, inputs: list) -> list:
        tok = self.tokenizer
        if inputs and isinstance(inputs[0], (list, tuple)):
            enc = tok([x[0] for x in inputs], [x[1] for x in inputs], truncation=True,
                      max_length=self.max_len)
        else:
            enc = tok(list(inputs), truncation=True, max_length=self.max_len)
        return enc["input_ids"]

    def forward(self, pieces: list[Piece]) -> np.ndarray:
        import torch

        if not self.fast:
            with self.lock:
                return self.reference([p.raw for p in pieces])
        arrays, consts = collate(pieces, self.pads, self.left)
        dev = self.device()
        cuda = dev.type == "cuda"
        feats: dict[str, Any] = {k: torch.from_numpy(v).to(dev, non_blocking=cuda)
                                 for k, v in arrays.items()}
        feats.update(consts)
        with torch.inference_mode():
            out = self.run(feats)
            return out.float().cpu().numpy()

    def self_check(self, probe: list) -> bool:
        """Compare the fast path with the library's own call on ``probe`` (where the weights
        are now: the CPU, at load); switch to the slow path if ours fails or differs. When the
        library's call itself fails here (e.g. half precision on a CPU without it), nothing
        can be compared: the fast path stays, unchecked. Returns whether it was checked."""
        if not self.fast:
            return False
        try:
            want = np.asarray(self.reference(probe), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - cannot check here
            log.warning("could not check the fast path against the library's call (%s: %s)",
                        type(exc).__name__, exc)
            return False
        try:
            tokens = split_features(self.features(probe))
            pieces = [Piece(int(n), i, tokens, i, x, None, i)     # type: ignore[arg-type]
                      for i, (n, x) in enumerate(zip(tokens.lengths, probe))]
            # in two batches of different widths, as the pool would make them
            got = np.concatenate([self.forward(pieces[:1]), self.forward(pieces[1:])])
        except Exception as exc:  # noqa: BLE001 - ours fails where the library's works
            self.fast, self.why_slow = False, f"{type(exc).__name__}: {exc}"
            return True
        tol = 1e-4 if self._full_precision() else 5e-2
        if got.shape != want.shape or not np.allclose(got, want, atol=tol, rtol=tol):
            diff = float(np.abs(got - want).max()) if got.shape == want.shape else None
            self.fast, self.why_slow = False, f"differs from the library's own call ({diff})"
        return True

    def _full_precision(self) -> bool:
        import torch
        for p in self.module().parameters():
            return p.dtype == torch.float32
        return True

    def per_token_bytes(self) -> int:
        """GPU working memory one token of a batch needs, from the model's config: hidden
        states and the feed-forward's intermediate (in the weights' dtype) and one row of
        attention scores per head."""
        cfg = None
        for m in self.module().modules():
            c = getattr(m, "config", None)
            if c is not None and getattr(c, "hidden_size", None):
                cfg = c
                break
        elem = 4
        for p in self.module().parameters():
            elem = p.element_size()
            break
        hidden = int(getattr(cfg, "hidden_size", 1024) or 1024)
        inter = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
        heads = int(getattr(cfg, "num_attention_heads", 16) or 16)
        return elem * (10 * hidden + 2 * inter + heads * min(self.max_len, 1024))


class SentenceTransformerBackend(Backend):
    """A sentence-transformers embedding model: ``preprocess`` (``tokenize`` before v6) and
    the model's own forward over all its modules (transformer, pooling, normalize, dense)."""

    def __init__(self, model: Any):
        super().__init__(model, model.tokenizer)
        self.max_len = int(getattr(model, "max_seq_length", None) or 512)
        self.truncate_dim = getattr(model, "truncate_dim", None)
        self._pre = getattr(model, "preprocess", None) or model.tokenize
        prompt = None
        try:
            if hasattr(model, "_resolve_prompt"):
                prompt = model._resolve_prompt(None, None)
            elif getattr(model, "default_prompt_name", None):
                prompt = model.prompts.get(model.default_prompt_name)
        except Exception:  # noqa: BLE001
            prompt = None
        if prompt:
            self.fast, self.why_slow = False, "the model has a default prompt"

    def features(self, inputs: list) -> dict:
        return self._pre(inputs)

    def run(self, features: dict) -> Any:
        out = self.model(features)["sentence_embedding"]
        if self.truncate_dim:
            out = out[..., :self.truncate_dim]
        return out

    def reference(self, inputs: list) -> np.ndarray:
        import torch
        with torch.inference_mode():
            v = self.model.encode(list(inputs), batch_size=max(len(inputs), 1),
                                  convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(v, dtype=np.float32)


class CrossEncoderBackend(Backend):
    """A sentence-transformers ``CrossEncoder`` with one label: v6 (``preprocess`` and a
    forward that gives ``scores``) or earlier (its Hugging Face tokenizer and model); the
    model's activation (a sigmoid) applied like ``predict`` does."""
    outputs = "scores"

    def __init__(self, model: Any):
        super().__init__(model, model.tokenizer)
        self.max_len = int(getattr(model, "max_seq_length", None) or
                           getattr(model, "max_length", None) or 512)
        self.act = getattr(model, "activation_fn", None) or \
            getattr(model, "default_activation_function", None)
        labels = getattr(model, "num_labels", None)
        if labels is None:
            labels = getattr(getattr(model, "config", None), "num_labels", 1)
        self.v6 = callable(getattr(model, "preprocess", None)) and \
            not hasattr(model, "activation_fct")
        if self.v6:
            prompt = None
            try:
                prompt = model._resolve_prompt(None, None)
            except Exception:  # noqa: BLE001
                prompt = None
            if prompt:
                self.fast, self.why_slow = False, "the model has a default prompt"
        if labels != 1:
            self.fast, self.why_slow = False, f"{labels} labels"

    def module(self):
        import torch
        return self.model if isinstance(self.model, torch.nn.Module) else self.model.model

    def features(self, inputs: list) -> dict:
        if self.v6:
            return self.model.preprocess([list(x) for x in inputs])
        return self.tokenizer([x[0] for x in inputs], [x[1] for x in inputs], padding=True,
                              truncation=True, return_tensors="pt", max_length=self.max_len)

    def run(self, features: dict) -> Any:
        if self.v6:
            scores = self.model(features)["scores"]
        else:
            scores = self.model.model(**features, return_dict=True).logits
        scores = scores.float()
        if self.act is not None:
            scores = self.act(scores)
        return scores.reshape(-1)

    def reference(self, inputs: list) -> np.ndarray:
        import torch
        with torch.inference_mode():
            v = self.model.predict([list(x) for x in inputs], batch_size=max(len(inputs), 1),
                                   show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(v, dtype=np.float32).reshape(-1)


class FlagBackend(Backend):
    """FlagEmbedding's ``FlagReranker``: its own call on each batch (normalised scores)."""
    outputs = "scores"

    def __init__(self, model: Any, max_len: int):
        super().__init__(model, model.tokenizer)
        self.max_len = max_len
        self.fast, self.why_slow = False, "FlagReranker runs its own forward"

    def module(self):
        return self.model.model

    def reference(self, inputs: list) -> np.ndarray:
        v = self.model.compute_score([list(x) for x in inputs], batch_size=max(len(inputs), 1),
                                     normalize=True)
        return np.asarray(v, dtype=np.float32).reshape(-1)


# ---- the actor side ------------------------------------------------------------------------------
class Pending:
    """One request inside a job: its inputs, the outputs filled in as forwards finish."""
    __slots__ = ("env", "inputs", "left", "out", "tokens", "batches", "widest", "padded",
                 "failed", "extra")

    def __init__(self, env: Envelope, inputs: list, extra: Any = None):
        self.env = env
        self.inputs = inputs
        self.left = len(inputs)
        self.out: np.ndarray | None = None
        self.tokens = 0                 # usage (prompt tokens)
        self.batches = 0
        self.widest = 0                 # largest forward (rows) its inputs ran in
        self.padded = 0                 # largest forward (rows x longest row) it ran in
        self.failed: BaseException | None = None
        self.extra = extra


class Batch(list):
    """One forward: the list of its inputs (texts, or [query, document] pairs, as the
    library's own call would take them), with the tokenized pieces they came from."""

    def __init__(self, pieces: list[Piece], *, solo: bool = False, retry: bool = False):
        super().__init__(p.raw for p in pieces)
        self.pieces = pieces
        self.solo = solo                # one request's pieces: a failure fails only it
        self.retry = retry              # already retried after a GPU out-of-memory
        self.padded = 0                 # rows x longest row

    def keep(self, pieces: list[Piece]) -> None:
        self.pieces = pieces
        self[:] = [p.raw for p in pieces]



class _Job:
    def __init__(self, actor: EncoderActor, env0: Envelope):
        self.actor = actor
        self.env0 = env0
        self.t0 = time.monotonic()
        self.wake = asyncio.Event()
        self.live: dict[Envelope, Pending] = {}
        self.untokenized: deque[list] = deque()  # [request, first input not yet tokenized]
        self.tok_fut: asyncio.Future | None = None
        self.tok_batch: list[tuple[Pending, int, int]] = []
        self.pool = TokenPool()
        self.ready: deque[Batch] = deque()     # batches to run before the pool (retries)
        self.running: dict[asyncio.Future, Batch] = {}
        self.out: list[tuple[Envelope, Any]] = []    # answers ready to send
        self.oom: list[Batch] = []
        self.give_up = False                    # out of GPU memory twice: back to the CPU
        self.open = True                        # still taking requests from the mailbox
        self.collecting = False                 # the first batch waits for a burst (CPU)
        self.arrived = 0                        # requests taken in since the last look
        self.device: str = Device.CPU
        self.pinned = False                     # a pinned grant already covers the job
        self.depth = 1
        self.budget = DEFAULT_BATCH_TOKENS
        self.max_rows = 4096
        self.items = 0
        self.seq = itertools.count()
        self.forwards = 0

    def poke(self, _fut: Any = None) -> None:
        self.wake.set()


class EncoderActor(ModelActor):
    """What embedders and rerankers share: jobs of token-budget batches (see the module
    docstring). Subclasses build :attr:`engine` (a :class:`Backend`) at load and say how a
    message becomes inputs (:meth:`admit`) and outputs become a reply (:meth:`finish`)."""
    batching = True
    #: the trace detail each request gets: the largest forward its inputs ran in (rows)
    batch_detail = "batch_texts"

    def __init__(self, spec, params=None, **kw):
        super().__init__(spec, params, **kw)
        self.engine: Backend | None = None
        self._job: _Job | None = None
        self._tok_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._fwd_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._per_token = 0
        self._out_lock = threading.Lock()
        self._demand: tuple[int, float] = (0, 0.0)      # (tokens, when): see job_tokens

    # -- what subclasses write
    def admit(self, env: Envelope) -> Pending | BaseException:
        raise NotImplementedError

    def usage(self, p: Pending, lengths: np.ndarray, start: int) -> int:
        """Prompt tokens to report for inputs ``start:start + len(lengths)`` of a request (they
        are added up; tokenizer thread, in order)."""
        return int(lengths.sum())

    def finish(self, p: Pending) -> Any:
        raise NotImplementedError

    def max_rows(self) -> int:
        return 4096

    def batch_units(self, pieces: list[Piece]) -> int:
        """What a forward's size is reported in (``batch_detail``): texts, or pairs."""
        return len(pieces)

    # -- settings
    def batch_tokens(self) -> int:
        """The token budget of one forward: ``max_batch_tokens``, lowered when the GPU budget
        could not hold the weights plus twice its working memory (the second half is headroom
        for the retry after an out-of-memory)."""
        tokens = batch_tokens_param(self.params)
        arbiter = self.system.actors.get(ARBITER) if self.system is not None else None
        budget = getattr(arbiter, "budget", None)
        per = self._per_token * GPU_DEPTH
        if isinstance(budget, int) and per > 0:
            room = (budget - self.weight_bytes) // 2 - _BASE_WORKING
            tokens = min(tokens, max(MIN_BATCH_TOKENS, room // per))
        return tokens

    def job_tokens(self, items: int) -> int:
        """The token budget of a GPU job's forwards, which its working memory is asked for:
        the whole ``batch_tokens()`` for a pinned (device: cuda) model; for a flex one no more
        than its ``items`` inputs can hold (a query asks for little, so it fits beside the
        LLM), unless this model's recent jobs had more waiting than that (a burst that began
        with one request: the next job asks for room for it)."""
        tokens = self.batch_tokens()
        if self.spec.device == DeviceMode.CUDA:
            return tokens
        max_len = getattr(self.engine, "max_len", 0) if self.engine is not None else 0
        if items > 0 and max_len:          # a job never holds more tokens than its inputs can
            tokens = min(tokens, max(items * max_len, self._recent_demand()))
        return max(tokens, MIN_BATCH_TOKENS)

    def working_bytes(self, items: int) -> int:
        """GPU memory beyond the weights: the forwards in flight at the job's token budget."""
        per = self._per_token or 32 * 1024
        return _BASE_WORKING + GPU_DEPTH * self.job_tokens(items) * per

    def _recent_demand(self) -> int:
        """The largest forward recent jobs wanted (tokens), halving every DEMAND_HALF_LIFE_S."""
        tokens, t = self._demand
        return int(tokens * 0.5 ** ((time.monotonic() - t) / DEMAND_HALF_LIFE_S))

    def _note_demand(self, tokens: int) -> None:
        if tokens > self._recent_demand():
            self._demand = (tokens, time.monotonic())

    @property
    def batch_linger_s(self) -> float:  # type: ignore[override]
        return linger_seconds(self.params)

    # -- load / unload
    def engine_ready(self, probe: list) -> None:
        """Blocking (load thread): self-check the backend, size its working memory."""
        engine = self.engine
        assert engine is not None
        t0 = time.monotonic()
        checked = engine.self_check(probe)
        rust = engine.enable_rust(rust_probe(probe))
        if not engine.fast:
            log.warning("%s %s: batches run through the library's own call (%s)", self.kind,
                        self.name, engine.why_slow)
        else:
            log.info("%s %s: own forward per token-budget batch (%s in %.2fs), tokenized "
                     "by %s", self.kind, self.name, "checked" if checked else "not checked",
                     time.monotonic() - t0, "the Rust core" if rust else "the library")
        self._per_token = engine.per_token_bytes()

    def unload_blocking(self) -> None:
        self.engine = None

    async def on_stop(self) -> None:
        await super().on_stop()
        for pool in (self._tok_pool, self._fwd_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._tok_pool = self._fwd_pool = None

    def _pools(self) -> tuple[concurrent.futures.ThreadPoolExecutor,
                              concurrent.futures.ThreadPoolExecutor]:
        if self._tok_pool is None:
            self._tok_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"{self.name}-tokenize")
        if self._fwd_pool is None:
            self._fwd_pool = concurrent.futures.ThreadPoolExecutor(
                GPU_DEPTH, thread_name_prefix=f"{self.name}-forward")
        return self._tok_pool, self._fwd_pool

    # -- the actor core's hooks
    def queue_length(self) -> int:
        job = self._job
        return super().queue_length() + (len(job.live) if job is not None else 0)

    def batch_fits(self, batch: list[Envelope], nxt: Envelope) -> bool:
        return True                          # the job sizes forwards itself

    async def _linger(self, batch: list[Envelope]) -> None:
        return None                          # the job collects bursts itself (see _launch)

    def _put(self, env: Envelope) -> None:
        super()._put(env)
        job = self._job
        if job is not None and job.open:
            job.wake.set()

    async def serve(self, msg: Any, env: Envelope) -> Any:
        raise TypeError(f"{self.kind} cannot handle {type(msg).__name__}")

    async def _process(self, batch: list[Envelope]) -> None:
        if not (self.batching and self.joinable(batch[0].msg)):
            await super()._process(batch)
            return
        await self._run_job(batch)

    # -- a job
    async def _run_job(self, envs: list[Envelope]) -> None:
        loop = asyncio.get_running_loop()
        job = _Job(self, envs[0])
        self._job = job
        self._inflight = job.live            # type: ignore[assignment]  # failed on a crash
        now = time.monotonic()
        for env in envs:
            env.started = now
            self._admit(job, env)
        self._tokenize(job, loop)
        job.items = sum(len(p.inputs) for p in job.live.values())
        try:
            await self._acquire(job)
            await self._loop(job, loop)
        except asyncio.CancelledError:
            self._job = None
            self._flush(job)
            raise
        except BaseException:
            self._job = None
            self._flush(job)
            await self._release(job)
            raise
        self._job = None
        self._inflight = []
        # the last answers go out after the lease is released (idle_on_cpu: the GPU is free
        # by the time the client has its answer)
        await self._release(job)
        self._flush(job)

    async def _acquire(self, job: _Job) -> None:
        lease = self.lease
        job.budget = self.batch_tokens()
        job.max_rows = self.max_rows()
        if lease is not None:
            working = self.working_bytes(job.items)
            if self.spec.device == DeviceMode.CUDA and lease.on_gpu and not lease.busy and \
                    lease.granted >= lease.residency.weight_bytes + working:
                # pinned and resident with room for the job: never revoked, so nothing to ask
                # the arbiter (no round trip per job)
                job.device, job.pinned = lease.device, True
            else:
                job.device = await lease.acquire(job.items, working, job.env0)
            self.device = job.device
        gpu = lease is not None and lease.on_gpu and str(job.device).startswith("cuda")
        job.depth = GPU_DEPTH if gpu else 1
        if lease is not None and lease.on_gpu:
            # forwards within what the working memory was asked for (the CPU has no such limit)
            job.budget = min(job.budget, self.job_tokens(job.items))
        job.collecting = job.depth == 1 and self.batch_linger_s > 0

    async def _release(self, job: _Job) -> None:
        lease = self.lease
        if lease is not None:
            if not job.pinned:
                await lease.finish(job.env0)
            self.device = Device.CUDA if lease.on_gpu else Device.CPU

    async def _loop(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            self._absorb(job)
            self._tokenize(job, loop)
            if job.oom and not job.running:
                await self._recover(job)
            if job.give_up and not job.running:
                await self._give_up_gpu(job)
            self._launch(job, loop)
            if not job.live and job.tok_fut is None and not job.running:
                return
            self._flush(job)
            await job.wake.wait()
            job.wake.clear()
            self._harvest(job)

    def _absorb(self, job: _Job) -> None:
        """Take the requests waiting in the mailbox into the job (until another kind of
        message waits: it ends the job, and is handled after it)."""
        if not job.open:
            return
        if self.lease is not None and self.spec.device == DeviceMode.FLEX and \
                time.monotonic() - job.t0 > FLEX_JOB_SLICE_S:
            job.open = False
            return
        mailbox = self.mailbox
        while self._held is None and not mailbox.empty():
            env = mailbox.get_nowait()
            if env.abandoned:
                self._trace_env(env, "dropped", started=time.monotonic())
                continue
            if not self.joinable(env.msg):
                self._held = env
                job.open = False
                return
            env.started = time.monotonic()
            self._admit(job, env)
            job.arrived += 1
        if self._held is not None:
            job.open = False

    def _admit(self, job: _Job, env: Envelope) -> None:
        try:
            p = self.admit(env)
        except Exception as exc:  # noqa: BLE001 - delivered to its asker
            p = exc
        if isinstance(p, BaseException):
            self._deliver(env, p)
            return
        job.live[env] = p
        if p.left == 0:
            self._done(job, p)
            return
        job.untokenized.append([p, 0])

    def _tokenize(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        """Hand what arrived to the tokenizer thread (one call), if it is free."""
        if job.tok_fut is not None or not job.untokenized:
            return
        take: list[tuple[Pending, int, int]] = []
        chars = inputs = 0
        limit = max(TOKENIZE_CHUNK_CHARS, 4 * job.budget)
        queue = job.untokenized
        while queue and (not take or (chars < limit and inputs < TOKENIZE_CHUNK_INPUTS)):
            seg = queue[0]
            p, i = seg
            n = len(p.inputs)
            if p.env.abandoned or p.failed is not None:
                queue.popleft()
                if p.failed is None:
                    p.left -= n - i
                    if p.left <= 0:
                        self._drop(job, p)
                continue
            j = i
            while j < n and (j == i or (chars < limit and inputs < TOKENIZE_CHUNK_INPUTS)):
                chars += _chars(p.inputs[j])
                inputs += 1
                j += 1
            take.append((p, i, j))
            if j >= n:
                queue.popleft()
            else:
                seg[1] = j
        if not take:
            return
        tok_pool, _ = self._pools()
        job.tok_batch = take
        fut = loop.run_in_executor(tok_pool, self._tokenize_blocking, take, job.seq)
        fut.add_done_callback(job.poke)
        job.tok_fut = fut

    def _tokenize_blocking(self, segs: list[tuple[Pending, int, int]], seq) -> list[Piece]:
        """Tokenizer thread: one call for the inputs ``i:j`` of each request; pieces back. A
        call that fails is retried per request, so a bad input fails only its own request."""
        engine = self.engine
        assert engine is not None
        flat = [x for p, i, j in segs for x in p.inputs[i:j]]
        try:
            groups = [(segs, engine.tokenize(flat))]
        except Exception:  # noqa: BLE001 - find the request that fails
            groups = []
            for seg in segs:
                p, i, j = seg
                try:
                    groups.append(([seg], engine.tokenize(p.inputs[i:j])))
                except Exception as exc:  # noqa: BLE001
                    p.failed = ModelFailed(f"{self.kind} {self.spec.name!r} could not tokenize "
                                           f"this request: {type(exc).__name__}: {exc}")
        pieces: list[Piece] = []
        for group, tokens in groups:
            arr = tokens if isinstance(tokens, Tokens) else None
            lengths = tokens.lengths if isinstance(tokens, Tokens) else tokens
            row = 0
            for p, i, j in group:
                mine = lengths[row:row + j - i]
                p.tokens += self.usage(p, mine, i)
                inputs = p.inputs
                for k in range(j - i):
                    pieces.append(Piece(int(mine[k]), next(seq), arr, row + k, inputs[i + k],
                                        p, i + k))
                row += j - i
        return pieces

    def _launch(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        """Start forwards while a slot is free (depth: 2 on a GPU, 1 on the CPU)."""
        if job.oom:
            return
        if job.collecting:
            # CPU: the first batch takes the burst that keeps arriving while it is tokenized
            waiting = job.tok_fut is not None or job.untokenized
            if job.arrived and time.monotonic() - job.t0 < self.batch_linger_s:
                job.arrived = 0
                loop.call_soon(job.poke)          # look again next turn
                return
            if waiting and time.monotonic() - job.t0 < self.batch_linger_s:
                return
            job.collecting = False
            job.env0.detail["linger_s"] = round(time.monotonic() - job.t0, 6)
        job.arrived = 0
        _, fwd_pool = self._pools()
        while len(job.running) < job.depth:
            if job.ready:
                batch = job.ready.popleft()
            else:
                if not len(job.pool):
                    return
                want = job.pool.padded()
                self._note_demand(min(want, self.batch_tokens()))
                if job.running and want < min(job.budget // 4, self._running_tokens(job)):
                    return              # a slot is free but little waits: let it gather
                pieces = job.pool.take(job.budget, job.max_rows)
                batch = Batch(pieces)
            live = [p for p in batch.pieces if not p.owner.env.abandoned]
            if len(live) < len(batch.pieces):
                for p in batch.pieces:
                    if p.owner.env.abandoned:
                        p.owner.left -= 1
                        if p.owner.left == 0:
                            self._drop(job, p.owner)
                if not live:
                    continue
                batch.keep(live)
            batch.padded = len(batch.pieces) * max(p.length for p in batch.pieces)
            fut = loop.run_in_executor(fwd_pool, self._forward_blocking, batch)
            fut.add_done_callback(job.poke)
            job.running[fut] = batch
            job.forwards += 1

    @staticmethod
    def _running_tokens(job: _Job) -> int:
        return max((b.padded for b in job.running.values()), default=0)

    def _forward_blocking(self, batch: Batch) -> None:
        """Forward thread: one forward, its outputs written into each request's array (rows
        of one request may come from two forward threads: each writes only its own)."""
        out = self._encode(batch)
        for j, piece in enumerate(batch.pieces):
            p = piece.owner
            if p.out is None:
                with self._out_lock:
                    if p.out is None:
                        p.out = np.empty((len(p.inputs),) + out.shape[1:], dtype=np.float32)
            p.out[piece.index] = out[j]

    def _encode(self, batch: Batch) -> np.ndarray:
        engine = self.engine
        assert engine is not None
        return engine.forward(batch.pieces)

    def _harvest(self, job: _Job) -> None:
        fut = job.tok_fut
        if fut is not None and fut.done():
            job.tok_fut = None
            taken, job.tok_batch = job.tok_batch, []
            try:
                pieces = fut.result()
            except Exception as exc:  # noqa: BLE001 - should not happen: failures are per request
                err = ModelFailed(f"{self.kind} {self.spec.name!r} could not tokenize: {exc}")
                for p, _i, _j in taken:
                    p.failed = err
                pieces = []
            job.pool.add([pc for pc in pieces if pc.owner.failed is None])
            for p, _i, _j in taken:
                if p.failed is not None:
                    self._done(job, p)
        for fut in [f for f in job.running if f.done()]:
            batch = job.running.pop(fut)
            error = fut.exception()
            if error is None:
                rows = self.batch_units(batch.pieces)
                per: dict[int, list] = {}
                for pc in batch.pieces:
                    e = per.get(id(pc.owner))
                    if e is None:
                        per[id(pc.owner)] = [pc.owner, 1]
                    else:
                        e[1] += 1
                for p, k in per.values():
                    p.left -= k
                    p.batches += 1
                    if p.widest < rows:
                        p.widest = rows
                    if p.padded < batch.padded:
                        p.padded = batch.padded
                    if p.left == 0:
                        self._done(job, p)
            else:
                self._failed(job, batch, error)

    def _failed(self, job: _Job, batch: Batch, exc: BaseException) -> None:
        """A forward raised: out of GPU memory -> give back, ask for more, retry once; other
        errors fail only the request they belong to (a mixed batch reruns per request)."""
        lease = self.lease
        if lease is not None and lease.on_gpu and is_oom(exc) and not batch.retry:
            job.oom.append(batch)
            return
        if is_oom(exc) and batch.retry:
            job.give_up = lease is not None and lease.on_gpu
            err: BaseException = Overloaded(
                f"{self.kind} {self.spec.name!r} ran out of GPU memory twice for a batch of "
                f"{len(batch.pieces)} input(s); retry with a smaller request.")
        elif isinstance(exc, ServiceError):
            err = exc
        else:
            owners = {id(p.owner): p.owner for p in batch.pieces}
            if len(owners) > 1 and not batch.solo:
                for owner in owners.values():
                    mine = [p for p in batch.pieces if p.owner is owner]
                    job.ready.append(Batch(mine, solo=True, retry=batch.retry))
                return
            log.error("%s %s failed on a batch: %r", self.kind, self.name, exc)
            err = ModelFailed(f"{self.kind} {self.spec.name!r} failed on this request: "
                              f"{type(exc).__name__}: {exc}")
        for owner in {id(p.owner): p.owner for p in batch.pieces}.values():
            owner.failed = owner.failed or err
            self._done(job, owner)

    async def _recover(self, job: _Job) -> None:
        """After a GPU out-of-memory (nothing else in flight): give the GPU back, ask for
        twice the working memory (the arbiter evicts others), retry the batches once."""
        lease = self.lease
        assert lease is not None
        batches, job.oom = job.oom, []
        env = job.env0
        job.pinned = False                  # asked again below: finish() at the end
        await lease.give_back(env)
        await self.system.executor.run(empty_cache)
        working = self.working_bytes(job.items)
        arbiter = self.system.actors.get(ARBITER)
        budget = getattr(arbiter, "budget", None)
        more = 2 * working + 256 * 2**20
        if isinstance(budget, int):
            more = min(more, max(working, budget - self.weight_bytes))
        job.device = await lease.acquire(job.items, more, env)
        self.device = job.device
        for b in batches:
            b.retry = True
        job.ready.extendleft(reversed(batches))
        if not lease.on_gpu:
            job.depth = 1

    async def _give_up_gpu(self, job: _Job) -> None:
        """Out of GPU memory twice: give the GPU back; the job goes on on the CPU."""
        job.give_up = False
        lease = self.lease
        if lease is not None and lease.on_gpu:
            await lease.give_back(job.env0)
            await self.system.executor.run(empty_cache)
        job.device = self.device = Device.CPU
        job.depth = 1

    def _drop(self, job: _Job, p: Pending) -> None:
        """The asker went away: forget the request (traced as dropped)."""
        if job.live.pop(p.env, None) is not None:
            self._trace_env(p.env, "dropped", started=p.env.started or time.monotonic())

    def _done(self, job: _Job, p: Pending) -> None:
        """A request is complete (or failed): its answer is sent at the next flush."""
        if job.live.pop(p.env, None) is None:
            return
        if p.failed is not None:
            job.out.append((p.env, p.failed))
            return
        d = p.env.detail
        d[self.batch_detail] = p.widest
        d["batch_tokens"] = p.padded
        d["forwards"] = p.batches
        try:
            result = self.finish(p)
        except Exception as exc:  # noqa: BLE001 - delivered to its asker
            result = exc
        job.out.append((p.env, result))

    def _flush(self, job: _Job) -> None:
        out, job.out = job.out, []
        for env, result in out:
            self._deliver(env, result)
