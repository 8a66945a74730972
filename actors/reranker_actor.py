"""The reranker actor: scores (query, document) pairs, batched by tokens like the embedder
(actors/encoder_engine.py): pairs of concurrent requests share forwards within
``reranker_params.max_batch_tokens`` (and at most ``reranker_params.batch_size`` pairs, when set),
tokenized while the previous batch computes.

Backends, chosen by the entry's ``kind`` (ours) or from the model folder:
- ``cross-encoder``: sentence-transformers ``CrossEncoder`` (bge-reranker-v2-m3, bce-reranker,
  any ``*ForSequenceClassification`` folder); scores through a sigmoid, so in [0, 1].
- ``bi-encoder``: a sentence-transformers embedder; score = (cosine + 1) / 2, in [0, 1].
  Lets the default install rerank with all-MiniLM-L6-v2 (no cross-encoder ships on PyPI).
- ``flag``: FlagEmbedding's ``FlagReranker`` (optional extra ``flag``), normalised scores.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..runtime.actor import Envelope
from .encoder_engine import (
    Backend,
    CrossEncoderBackend,
    EncoderActor,
    FlagBackend,
    Pending,
    SentenceTransformerBackend,
)
from .messages import Rerank, RerankResult
from .model_base import st_dtype_kwargs
from .torch_util import module_bytes

#: what the load-time self-check scores with the fast path and with the library's own call
PROBE_QUERY = "What is the capital of France?"
PROBE_DOCS = ["Paris is the capital and largest city of France, on the Seine.", "Bananas.", ""]


def detect_backend(path: str) -> str:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        archs = []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "cross-encoder"
    if os.path.exists(os.path.join(path, "modules.json")):
        return "bi-encoder"
    return "cross-encoder"


class RerankerActor(EncoderActor):
    kind = "reranker"
    streamable = True
    batch_detail = "batch_pairs"

    def __init__(self, spec, params=None, **kw):
        super().__init__(spec, params, **kw)
        self.model = None
        self.backend = spec.backend
        self.tokenizer = None

    def load_blocking(self) -> None:
        backend = self.spec.backend
        if backend == "auto":
            backend = detect_backend(self.spec.path)
        trust = self.spec.trust_remote_code
        engine: Backend
        if backend == "cross-encoder":
            from sentence_transformers import CrossEncoder
            model = CrossEncoder(self.spec.path, device="cpu", max_length=self.spec.max_tokens,
                                 local_files_only=True, trust_remote_code=trust,
                                 **st_dtype_kwargs(self.spec.dtype))
            self.tokenizer = model.tokenizer
            self.weight_bytes = module_bytes(model)
            engine = CrossEncoderBackend(model)
        elif backend == "bi-encoder":
            from sentence_transformers import SentenceTransformer
            model = SentenceTransformer(self.spec.path, device="cpu", local_files_only=True,
                                        trust_remote_code=trust,
                                        **st_dtype_kwargs(self.spec.dtype))
            if self.spec.max_tokens:
                model.max_seq_length = self.spec.max_tokens
            self.tokenizer = model.tokenizer
            self.weight_bytes = module_bytes(model)
            engine = SentenceTransformerBackend(model)
        else:
            from FlagEmbedding import FlagReranker  # optional extra: pip install '.[flag]'
            model = FlagReranker(self.spec.path, use_fp16=self.spec.dtype == "float16",
                                 devices="cpu",
                                 max_length=self.spec.max_tokens or 512,
                                 trust_remote_code=trust)
            self.tokenizer = model.tokenizer
            self.weight_bytes = module_bytes(model.model)
            engine = FlagBackend(model, self.spec.max_tokens or 512)
        self.backend = backend
        self.model = model
        self.engine = engine
        if backend == "bi-encoder":
            self.engine_ready([PROBE_QUERY, *PROBE_DOCS])
        else:
            self.engine_ready([[PROBE_QUERY, d] for d in PROBE_DOCS])

    def torch_module(self):
        import torch
        return self.model if isinstance(self.model, torch.nn.Module) else self.model.model

    def unload_blocking(self) -> None:
        super().unload_blocking()
        self.model = None
        self.tokenizer = None

    def max_rows(self) -> int:
        """``reranker_params.batch_size``, when set: at most this many pairs per forward."""
        n = self.params.get("batch_size")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 4096

    def batch_units(self, pieces) -> int:
        if self.backend == "bi-encoder":        # the documents (a query is not a pair)
            return sum(1 for p in pieces if p.index > 0)
        return len(pieces)

    def admit(self, env: Envelope) -> Pending | BaseException:
        msg = env.msg
        if not isinstance(msg, Rerank):
            return TypeError(f"reranker cannot handle {type(msg).__name__}")
        if self.backend == "bi-encoder":
            return Pending(env, [msg.query, *msg.documents])
        return Pending(env, [[msg.query, d] for d in msg.documents])

    def usage(self, p: Pending, lengths, start: int) -> int:
        """Tokens the model reads: each pair as fed to it (the bi-encoder: the query once per
        document, plus the document; the query is input 0, tokenized first)."""
        if self.backend != "bi-encoder":
            return int(lengths.sum())
        if start == 0:
            p.extra = int(lengths[0])                # the query's length
            lengths = lengths[1:]
        return int(p.extra or 0) * len(lengths) + int(lengths.sum())

    def finish(self, p: Pending) -> RerankResult:
        out = p.out
        if self.backend == "bi-encoder":
            assert out is not None, "the query is always embedded"
            vecs = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
            flat = ((vecs[1:] @ vecs[0]).astype(np.float64) + 1.0) / 2.0
        else:
            flat = np.asarray(out if out is not None else [], dtype=np.float64).reshape(-1)
        scores = np.clip(flat, 0.0, 1.0).tolist()
        return RerankResult(scores=scores, tokens=p.tokens)
