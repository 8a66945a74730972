"""The embedder actor: sentence-transformers models, batched by tokens (actors/encoder_engine.py):
concurrent requests share forwards within ``embedder_params.max_batch_tokens``, tokenized while
the previous batch computes; a lone request starts at once."""
from __future__ import annotations

import re

import numpy as np

from ..runtime.actor import Envelope
from ..runtime.errors import InvalidRequest
from .encoder_engine import EncoderActor, Pending, SentenceTransformerBackend
from .messages import Embed, EmbedResult
from .model_base import st_dtype_kwargs
from .torch_util import module_bytes

_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)
#: texts the load-time self-check embeds with the fast path and with ``encode`` (different
#: lengths, so that padding is exercised; and the empty string)
PROBE = ["A cat sits on the mat.",
         "A much longer sentence, with several clauses and words, so that the shorter ones in "
         "the same batch are padded to its length.", ""]


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


class EmbedderActor(EncoderActor):
    kind = "embedder"
    streamable = True

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
        self.engine = SentenceTransformerBackend(model)
        self.engine_ready(PROBE)

    def unload_blocking(self) -> None:
        super().unload_blocking()
        self.model = None

    def update(self, spec, params) -> bool:
        super().update(spec, params)
        if self.model is not None and spec.max_tokens:
            self.model.max_seq_length = spec.max_tokens
            if self.engine is not None:
                self.engine.set_max_len(spec.max_tokens)
        return True

    def out_dim(self) -> int:
        return self.params.get("resize") or self.dim

    def admit(self, env: Envelope) -> Pending | BaseException:
        msg = env.msg
        if not isinstance(msg, Embed):
            return TypeError(f"embedder cannot handle {type(msg).__name__}")
        if msg.dimensions is not None and not 1 <= msg.dimensions <= self.out_dim():
            return InvalidRequest(
                f"dimensions must be between 1 and {self.out_dim()} for model "
                f"{self.name!r}; got {msg.dimensions}", param="dimensions")
        return Pending(env, msg.texts)

    def usage(self, p: Pending, lengths, start: int) -> int:
        texts = p.inputs[start:start + len(lengths)]
        return estimate_tokens(texts, self.params.get("token_estimation", "len"))

    def finish(self, p: Pending) -> EmbedResult:
        vectors = p.out
        if vectors is None:                                  # no texts (not sent by HTTP)
            vectors = np.zeros((0, self.out_dim()), dtype=np.float32)
        resize = self.params.get("resize") or 0
        if resize:
            vectors = resize_vectors(vectors, resize)
        dims = p.env.msg.dimensions
        if dims is not None and dims < vectors.shape[1]:
            vectors = vectors[:, :dims]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return EmbedResult(vectors=np.ascontiguousarray(vectors, dtype=np.float32),
                           prompt_tokens=p.tokens)
