"""POST /v1/rerank, /rerank and /v2/rerank.

Two shapes on the same routes, told apart by the request's fields:
- Jina / Cohere / FastGPT / Dify: ``{model, query, documents, top_n | n, return_documents}``
  -> ``{results: [{index, relevance_score, document: {text}}], meta, usage}``, best first.
- HF text-embeddings-inference (Open WebUI): ``{query, texts, return_text}``
  -> a bare array ``[{index, score, text?}]``, best first.
- Cohere v2 (``POST /v2/rerank``, LiteLLM's Cohere client; vLLM serves it too): the same
  request -> ``{id, results: [{index, relevance_score}], meta}`` (documents only when
  ``return_documents`` is true).
"""
from __future__ import annotations

from aiohttp import web

from agile_rag.actors.messages import Rerank, RerankResult
from agile_rag.runtime.errors import InvalidRequest
from agile_rag.runtime.ids import unique_hex

from .common import ask_model, resolve_model
from .errors import json_response
from .keys import SERVER
from .parsing import Fields, read_json

MAX_DOCUMENTS = 4096


def parse_documents(value, key: str) -> list[str]:
    if not isinstance(value, list):
        raise InvalidRequest(f"'{key}' must be an array of strings (or {{\"text\": ...}} objects).",
                             param=key, code="invalid_type")
    if len(value) > MAX_DOCUMENTS:
        raise InvalidRequest(f"'{key}' has {len(value)} items; at most {MAX_DOCUMENTS}.",
                             param=key)
    docs = []
    for i, d in enumerate(value):
        if isinstance(d, dict) and isinstance(d.get("text"), str):
            d = d["text"]
        if not isinstance(d, str):
            raise InvalidRequest(f"{key}[{i}] must be a string or an object with a 'text' string.",
                                 param=f"{key}[{i}]", code="invalid_type")
        docs.append(d)
    return docs


async def rerank(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    body = await read_json(request)
    f = Fields(body)
    tei = "texts" in body and "documents" not in body
    actor = resolve_model(server, "reranker", f.string("model"))
    query = f.string("query", required=True)
    docs = parse_documents(f.required("texts" if tei else "documents"),
                           "texts" if tei else "documents")
    top_n = f.integer("top_n", None, lo=1)
    if top_n is None:
        top_n = f.integer("n", None, lo=1)
    if top_n is None:
        top_n = int(actor.params.get("top_n", 9999))
    if docs:
        result: RerankResult = await ask_model(server, actor,
                                               Rerank(query=query, documents=docs), request)
        scores, tokens = result.scores, result.tokens
    else:
        scores, tokens = [], 0
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n]
    if tei:
        with_text = f.boolean("return_text", False)
        out = [{"index": i, "score": scores[i], **({"text": docs[i]} if with_text else {})}
               for i in order]
        return json_response(out, request=request)
    v2 = request.path.startswith("/v2/")          # Cohere v2: no documents unless asked
    with_docs = f.boolean("return_documents", not v2)
    results = [{"index": i, "relevance_score": scores[i],
                **({"document": {"text": docs[i]}} if with_docs else {})} for i in order]
    if v2:
        return json_response({
            "id": "rerank-" + unique_hex(), "results": results,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                     "tokens": {"input_tokens": tokens, "output_tokens": 0}}}, request=request)
    return json_response({
        "id": "rerank-" + unique_hex(), "object": "list", "model": actor.spec.name,
        "results": results,
        "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1},
                 "tokens": {"input_tokens": tokens, "output_tokens": 0}},
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, request=request)
