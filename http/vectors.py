"""An embeddings response's body from its vectors: JSON floats or base64 rows.

Imports neither torch nor the server: the HTTP front processes (http/front_process.py) write
the same bodies as the main process's own handler (http/embeddings.py)."""
from __future__ import annotations

import binascii

import numpy as np
import orjson


def base64_rows(vecs: np.ndarray) -> list[str]:
    """Each row as base64 of its little-endian float32 bytes (what the openai client decodes),
    read straight from the array's memory."""
    le = np.ascontiguousarray(vecs, dtype="<f4")
    if le.ndim != 2 or not le.size:
        return ["" for _ in range(len(le))]
    raw = memoryview(le).cast("B")
    row = le.shape[1] * 4
    b2a = binascii.b2a_base64
    return [b2a(raw[i:i + row], newline=False).decode("ascii")
            for i in range(0, len(raw), row)]


def embeddings_body(model: str, fmt: str, vecs: np.ndarray, prompt_tokens: int) -> bytes:
    """The OpenAI ``/v1/embeddings`` answer, as JSON bytes."""
    if fmt == "base64":
        data = [{"object": "embedding", "index": i, "embedding": b64}
                for i, b64 in enumerate(base64_rows(vecs))]
    else:      # rows as numpy views: orjson writes float32 arrays natively (OPT_SERIALIZE_NUMPY)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage},
                        option=orjson.OPT_SERIALIZE_NUMPY)
