"""The embedder actor: sentence-transformers models; queued requests share one forward pass."""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..runtime.actor import Envelope
from ..runtime.errors import InvalidRequest
from .messages import Embed, EmbedResult
from .model_base import ModelActor, st_dtype_kwargs
from .torch_util import module_bytes

_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)
MAX_BATCH_TEXTS = 512


def estimate_tokens(texts: list[str], method: str) -> int:
    """The seed's token_estimation: "len" counts characters (good for Chinese), "re" counts
    words and punctuation (good for English)."""
    if method == "re":
        return sum(len(_WORDS.findall(t)) for t in texts)
    return sum(len(t) for t in texts)


def resize_vectors(vectors: np.ndarray, size: int) -> np.ndarray:
    """The seed's ``resize``: linear interpolation of each vector to ``size`` values,
    then L2 normalisation (to force-match another embedding's width; not recommended)."""
    n = vectors.shape[1]
    if size == n:
        return vectors
    xs = np.linspace(0, n - 1, size)
    out = np.stack([np.interp(xs, np.arange(n), v) for v in vectors]).astype(np.float32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class EmbedderActor(ModelActor):
    kind = "embedder"
    batching = True

    def __init__(self, spec, params=None, **kw):
        super().__init__(spec, params, **kw)
        self.model = None
        self.dim = 0

    def load_blocking(self) -> None:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(self.spec.path, device="cpu", local_files_only=True,
                                    trust_remote_code=self.spec.trust_remote_code,
                                    **st_dtype_kwargs(self.spec.dtype))
        if self.spec.max_tokens:
            model.max_seq_length = self.spec.max_tokens
        model.eval()
        self.model = model
        dimension = getattr(model, "get_embedding_dimension", None) or \
            model.get_sentence_embedding_dimension
        self.dim = dimension() or 0
        self.weight_bytes = module_bytes(model)

    def unload_blocking(self) -> None:
        self.model = None

    def update(self, spec, params) -> bool:
        super().update(spec, params)
        if self.model is not None and spec.max_tokens:
            self.model.max_seq_length = spec.max_tokens
        return True

    def batch_fits(self, batch: list[Envelope], nxt: Envelope) -> bool:
        total = sum(len(e.msg.texts) for e in batch) + len(nxt.msg.texts)
        return total <= MAX_BATCH_TEXTS

    def out_dim(self) -> int:
        return self.params.get("resize") or self.dim

    async def serve(self, msg: Any, env: Envelope) -> Any:
        return (await self.handle_batch([env]))[0]

    async def handle_batch(self, envs: list[Envelope]) -> list[Any]:
        results: list[Any] = [None] * len(envs)
        good = []
        for i, env in enumerate(envs):
            msg = env.msg
            if not isinstance(msg, Embed):
                results[i] = TypeError(f"embedder cannot handle {type(msg).__name__}")
            elif msg.dimensions is not None and not 1 <= msg.dimensions <= self.out_dim():
                results[i] = InvalidRequest(
                    f"dimensions must be between 1 and {self.out_dim()} for model "
                    f"{self.name!r}; got {msg.dimensions}", param="dimensions")
            else:
                good.append(i)
        if good:
            texts = [t for i in good for t in envs[i].msg.texts]
            vectors = await self.compute(len(texts), envs[good[0]], self._encode, texts)
            start = 0
            method = self.params.get("token_estimation", "len")
            for i in good:
                msg = envs[i].msg
                part = vectors[start:start + len(msg.texts)]
                start += len(msg.texts)
                if msg.dimensions is not None and msg.dimensions < part.shape[1]:
                    part = part[:, :msg.dimensions]
                    part = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
                envs[i].detail["batch_texts"] = len(texts)
                results[i] = EmbedResult(
                    vectors=np.ascontiguousarray(part, dtype=np.float32),
                    prompt_tokens=estimate_tokens(msg.texts, method))
        return results

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            vectors = self.model.encode(texts, batch_size=64, convert_to_numpy=True,
                                        show_progress_bar=False)
        vectors = np.asarray(vectors, dtype=np.float32)
        resize = self.params.get("resize") or 0
        if resize:
            vectors = resize_vectors(vectors, resize)
        return vectors
