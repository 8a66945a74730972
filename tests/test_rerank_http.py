"""Rerank over real HTTP: the Jina/Cohere shape, the TEI shape, bi- and cross-encoders."""
from __future__ import annotations

import aiohttp

QUERY = "What is the capital of France?"
DOCS = ["Berlin is the capital of Germany.", "Bananas are rich in potassium.",
        "Paris is the capital and largest city of France.", "The Eiffel Tower is tall."]


async def post(url, body):
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            return r.status, await r.json()


async def test_paris_first_sorted_scores_in_unit_range(v1):
    status, body = await post(v1 + "/rerank", {"model": "minilm-rerank", "query": QUERY,
                                               "documents": DOCS})
    assert status == 200 and body["model"] == "minilm-rerank"
    res = body["results"]
    assert res[0]["index"] == 2 and res[0]["document"]["text"] == DOCS[2]
    scores = [r["relevance_score"] for r in res]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= s <= 1 for s in scores) and sorted(r["index"] for r in res) == [0, 1, 2, 3]
    assert body["meta"]["tokens"]["input_tokens"] == body["usage"]["total_tokens"] > 0


async def test_fastgpt_and_dify_routes_top_n_and_n(base, v1):
    status, body = await post(base + "/rerank", {"model": "x", "query": QUERY, "documents": DOCS,
                                                 "top_n": 2})
    assert status == 200 and [r["index"] for r in body["results"]][:1] == [2]
    assert len(body["results"]) == 2
    _, body = await post(v1 + "/rerank", {"query": QUERY, "documents": DOCS, "n": 1,
                                          "return_documents": "false"})
    assert len(body["results"]) == 1 and "document" not in body["results"][0]
    _, body = await post(v1 + "/rerank", {"query": QUERY, "top_n": None,
                                          "documents": [{"text": d} for d in DOCS]})
    assert body["results"][0]["index"] == 2 and len(body["results"]) == 4


async def test_tei_shape_answers_a_bare_array(base):
    status, body = await post(base + "/rerank", {"query": QUERY, "texts": DOCS,
                                                 "return_text": True, "raw_scores": False})
    assert status == 200 and isinstance(body, list)
    assert body[0]["index"] == 2 and body[0]["text"] == DOCS[2]
    assert [b["score"] for b in body] == sorted((b["score"] for b in body), reverse=True)


async def test_cross_encoder_path_scores_every_pair(v1):
    status, body = await post(v1 + "/rerank", {"model": "tiny-ce", "query": QUERY,
                                               "documents": DOCS})
    assert status == 200 and body["model"] == "tiny-ce"
    scores = [r["relevance_score"] for r in body["results"]]
    assert len(scores) == 4 and all(0 <= s <= 1 for s in scores)
    assert len({round(s, 4) for s in scores}) > 1      # a real model, not a constant


async def test_empty_documents_give_empty_results(v1):
    status, body = await post(v1 + "/rerank", {"query": QUERY, "documents": []})
    assert status == 200 and body["results"] == []
