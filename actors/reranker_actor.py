"""The reranker actor: scores (query, document) pairs; queued requests share one forward pass.

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
from typing import Any

import numpy as np

from ..runtime.actor import Envelope
from .messages import Rerank, RerankResult
from .model_base import ModelActor, st_dtype_kwargs
from .torch_util import module_bytes

MAX_BATCH_PAIRS = 1024


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


class RerankerActor(ModelActor):
    kind = "reranker"
    batching = True

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
        if backend == "cross-encoder":
            from sentence_transformers import CrossEncoder
            model = CrossEncoder(self.spec.path, device="cpu", max_length=self.spec.max_tokens,
                                 local_files_only=True, trust_remote_code=trust,
                                 **st_dtype_kwargs(self.spec.dtype))
            self.tokenizer = model.tokenizer
            self.weight_bytes = module_bytes(model)
        elif backend == "bi-encoder":
            from sentence_transformers import SentenceTransformer
            model = SentenceTransformer(self.spec.path, device="cpu", local_files_only=True,
                                        trust_remote_code=trust,
                                        **st_dtype_kwargs(self.spec.dtype))
            if self.spec.max_tokens:
                model.max_seq_length = self.spec.max_tokens
            self.tokenizer = model.tokenizer
            self.weight_bytes = module_bytes(model)
        else:
            from FlagEmbedding import FlagReranker  # optional extra: pip install '.[flag]'
            model = FlagReranker(self.spec.path, use_fp16=self.spec.dtype == "float16",
                                 devices="cpu",
                                 max_length=self.spec.max_tokens or 512,
                                 trust_remote_code=trust)
            self.tokenizer = model.tokenizer
            self.weight_bytes = module_bytes(model.model)
        self.backend = backend
        self.model = model

    def torch_module(self):
        import torch
        return self.model if isinstance(self.model, torch.nn.Module) else self.model.model

    def unload_blocking(self) -> None:
        self.model = None
        self.tokenizer = None

    def batch_fits(self, batch: list[Envelope], nxt: Envelope) -> bool:
        total = sum(len(e.msg.documents) for e in batch) + len(nxt.msg.documents)
        return total <= MAX_BATCH_PAIRS

    async def serve(self, msg: Any, env: Envelope) -> Any:
        return (await self.handle_batch([env]))[0]

    async def handle_batch(self, envs: list[Envelope]) -> list[Any]:
        for env in envs:
            if not isinstance(env.msg, Rerank):
                raise TypeError(f"reranker cannot handle {type(env.msg).__name__}")
        jobs = [(e.msg.query, e.msg.documents) for e in envs]
        n_pairs = sum(len(d) for _, d in jobs)
        scored = await self.compute(n_pairs, envs[0], self._score, jobs)
        for env in envs:
            env.detail["batch_pairs"] = n_pairs
        return [RerankResult(scores=scores, tokens=tokens) for scores, tokens in scored]

    def _score(self, jobs: list[tuple[str, list[str]]]) -> list[tuple[list[float], int]]:
        import torch

        batch_size = int(self.params.get("batch_size", 32))
        with torch.inference_mode():
            if self.backend == "bi-encoder":
                texts = [t for q, docs in jobs for t in [q, *docs]]
                vecs = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                         normalize_embeddings=True, show_progress_bar=False)
                flat, k = [], 0
                for _q, docs in jobs:
                    qv, dv = vecs[k], vecs[k + 1:k + 1 + len(docs)]
                    k += 1 + len(docs)
                    flat.extend(((dv @ qv) + 1.0) / 2.0)
            else:
                pairs = [[q, d] for q, docs in jobs for d in docs]
                if self.backend == "cross-encoder":
                    flat = self.model.predict(pairs, batch_size=batch_size,
                                              show_progress_bar=False, convert_to_numpy=True)
                else:
                    flat = self.model.compute_score(pairs, batch_size=batch_size, normalize=True)
        clipped = np.clip(np.asarray(flat, dtype=np.float64).reshape(-1), 0.0, 1.0)
        out, k = [], 0
        for q, docs in jobs:
            scores = [float(s) for s in clipped[k:k + len(docs)]]
            k += len(docs)
            out.append((scores, self._count_tokens(q, docs)))
        return out

    def _count_tokens(self, query: str, docs: list[str]) -> int:
        if self.tokenizer is None:
            return sum(len(d) for d in docs) + len(query) * len(docs)
        q = len(self.tokenizer(query, add_special_tokens=False)["input_ids"])
        d = self.tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
        return sum(q + len(x) + 3 for x in d)
