"""Encoder backends: how one model (an embedder, a reranker) tokenizes and runs one forward.

The model-specific parts of the encoder engine (actors/encoder_engine.py) are :class:`Backend`\\ s.
One forward per batch: the model is called on the padded batch directly, not through ``encode`` /
``predict``, which would split it again. At load a backend checks itself against the library's
own call (``encode`` / ``predict``) on a few inputs; if it does not match (a sentence-transformers
version or model layout we do not know) it falls back to calling the library once per batch,
which is slower but still batched by tokens. Where it can, a backend tokenizes with a private
copy of the fast tokenizer's Rust core (:meth:`Backend.enable_rust`).
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import numpy as np

from ..runtime.layer_group import one_by_one
from ..runtime.layer_stream import host_twins
from .encoder_graphs import GRAPH_MAX_TOKENS, EncoderGraphs
from .encoder_tokens import Piece, Tokens, collate, split_features

log = logging.getLogger("agile_rag.encoder")


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
        #: one forward's kernels are queued at a time: two forward threads (a GPU job's two
        #: forwards in flight) would otherwise interleave their launches on the one stream,
        #: and the first forward would end only when most of the second had run
        self.launch = threading.Lock()
        #: CUDA graphs of small forwards (actors/encoder_graphs.py), while the actor wants them
        self.graphs: EncoderGraphs | None = None
        self._graphed = threading.local()       # this thread's last forward was replayed

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
        graphs = self.graphs
        self._graphed.on = False
        if graphs is not None and dev.type == "cuda":
            got = graphs.forward(arrays, consts, dev, self.launch)
            if got is not None:
                self._graphed.on = True
                return got
        with self.launch:                     # queue this forward's work, then wait
            out = self._run_arrays(arrays, consts, dev)
        with torch.inference_mode():
            return out.cpu().numpy()

    def _run_arrays(self, arrays: dict, consts: dict, dev: Any) -> Any:
        """The model on a collated batch: its arrays moved to ``dev``, float outputs."""
        import torch

        cuda = dev.type == "cuda"
        with torch.inference_mode():
            hosts = {k: torch.from_numpy(v) for k, v in arrays.items()}
            feats: dict[str, Any] = {k: h.to(dev, non_blocking=cuda) for k, h in hosts.items()}
            # a layer-streamed model's host embedding lookup reads its ids from the host
            # arrays, not back from the device (no sync with the forward queued before)
            twins = host_twins([(feats[k], h) for k, h in hosts.items()])
            feats.update(consts)
            with twins:
                return self.run(feats).float()

    def graphed(self) -> bool:
        """Whether this thread's last :meth:`forward` was replayed from a CUDA graph."""
        return getattr(self._graphed, "on", False)

    def graphs_wanted(self) -> str:
        """Why this model's forwards cannot be replayed from CUDA graphs ("" : they can)."""
        if not self.fast:
            return "the library's own call runs the batches"
        if self.left:
            return "the tokenizer pads on the left"
        return ""

    def start_graphs(self, max_tokens: int) -> EncoderGraphs:
        """This model's graphs (made now if it has none), for batches of up to
        ``max_tokens`` rows x width."""
        graphs = self.graphs
        if graphs is None:
            weight = next(iter(self.module().parameters()))
            graphs = self.graphs = EncoderGraphs(
                lambda feats: self.run(feats), self.pads, weight, max_tokens=max_tokens,
                max_len=self.max_len)
        graphs.max_tokens = min(GRAPH_MAX_TOKENS, max_tokens)
        return graphs

    def capture_graphs(self, max_tokens: int, probe: list) -> int:
        """Blocking: capture every graph bucket of batches of up to ``max_tokens`` now (the
        model pinned and resident), a batch of ``probe`` giving the features' names and
        dtypes. Returns how many graphs were made."""
        graphs = self.start_graphs(max_tokens)
        arrays, consts = collate(self._pieces(probe), self.pads, self.left)
        return graphs.capture_all(arrays, consts, self.device(), self.launch)

    def _pieces(self, inputs: list) -> list[Piece]:
        """``inputs`` tokenized as the pool's pieces, one per input, in order."""
        tokens = split_features(self.features(inputs))
        return [Piece(int(n), i, tokens, i, x, None, i)     # type: ignore[arg-type]
                for i, (n, x) in enumerate(zip(tokens.lengths, inputs))]

    def stop_graphs(self) -> None:
        graphs, self.graphs = self.graphs, None
        if graphs is not None:
            graphs.close()

    def forward_group(self, batches: list[list[Piece]], run_group: Any) -> list[Any]:
        """Several forwards as one layer-streamed group (runtime/layer_group.py):
        ``run_group(fns)`` runs the fns (one forward each) layer-major, sharing each layer's
        copy. Returns each batch's outputs, or the exception its forward raised. The slow path
        (the library's own call) runs the batches one after another."""
        import torch

        if not self.fast:
            return one_by_one([functools.partial(self.forward, pieces) for pieces in batches])
        dev = self.device()
        prepared = [collate(pieces, self.pads, self.left) for pieces in batches]
        with self.launch:                     # the group is one launch (its members interleave)
            outs = run_group([functools.partial(self._run_arrays, a, c, dev)
                              for a, c in prepared])
        with torch.inference_mode():
            return [o if isinstance(o, BaseException) else o.cpu().numpy() for o in outs]

    def keep_bytes_per_token(self) -> int:
        """GPU memory one token of a grouped forward holds between layers (its hidden states,
        twice for the residual, and a row of the attention mask), in the weights' dtype."""
        hidden = self._config_int("hidden_size", 1024)
        return self._elem() * (2 * hidden + min(self.max_len, 1024))

    def _config_int(self, name: str, default: int) -> int:
        """An int setting of the model's config (the first module config with a hidden
        size), or ``default``."""
        for m in self.module().modules():
            c = getattr(m, "config", None)
            if c is not None and getattr(c, "hidden_size", None):
                return int(getattr(c, name, default) or default)
        return default

    def _elem(self) -> int:
        for p in self.module().parameters():
            return p.element_size()
        return 4

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
            pieces = self._pieces(probe)
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
        hidden = self._config_int("hidden_size", 1024)
        inter = self._config_int("intermediate_size", 4 * hidden)
        heads = self._config_int("num_attention_heads", 16)
        return self._elem() * (10 * hidden + 2 * inter + heads * min(self.max_len, 1024))


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
