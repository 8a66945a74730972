"""Bad input gets a 4xx in OpenAI's error shape, and the server keeps serving everyone else."""
from __future__ import annotations

import aiohttp
import pytest

from support import MAX_BODY

MSG = [{"role": "user", "content": "hi"}]


def assert_openai_error(body, status, expect_status, param=None):
    assert status == expect_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


async def raw_post(url, data: bytes, ctype="application/json"):
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=data, headers={"Content-Type": ctype}) as r:
            return r.status, await r.json(), r.headers


@pytest.mark.parametrize("route", ["/chat/completions", "/embeddings", "/rerank",
                                   "/completions"])
async def test_malformed_json(v1, route):
    status, body, headers = await raw_post(v1 + route, b'{"model": "x", ')
    assert_openai_error(body, status, 400)
    assert "JSON" in body["error"]["message"]
    assert headers["x-should-retry"] == "false"


@pytest.mark.parametrize("route,body,param", [
    ("/chat/completions", {"model": "x"}, "messages"),
    ("/chat/completions", {"messages": "hello"}, "messages"),
    ("/chat/completions", {"messages": []}, "messages"),
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/chat/completions", {"messages": MSG, "temperature": "hot"}, "temperature"),
    ("/chat/completions", {"messages": MSG, "temperature": 3}, "temperature"),
    ("/chat/completions", {"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ("/chat/completions", {"messages": MSG, "max_tokens": "ten"}, "max_tokens"),
    ("/chat/completions", {"messages": MSG, "stop": [1, 2]}, "stop"),
    ("/chat/completions", {"messages": MSG, "n": 9}, "n"),
    ("/chat/completions", {"messages": MSG, "stream": "maybe"}, "stream"),
    ("/embeddings", {"model": "minilm"}, "input"),
    ("/embeddings", {"input": []}, "input"),
    ("/embeddings", {"input": 42}, "input"),
    ("/embeddings", {"input": ["ok", 3]}, "input"),
    ("/embeddings", {"input": [[1, 2], "x"]}, "input"),
    ("/embeddings", {"input": [[10**9]]}, "input"),
    ("/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/rerank", {"documents": ["a"]}, "query"),
    ("/rerank", {"query": "q"}, "documents"),
    ("/rerank", {"query": "q", "documents": "abc"}, "documents"),
    ("/rerank", {"query": "q", "documents": [1]}, "documents[0]"),
    ("/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
])
async def test_missing_fields_and_wrong_types(v1, route, body, param):
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + route, json=body) as r:
            assert_openai_error(await r.json(), r.status, 400, param)


async def test_an_empty_completions_prompt_starts_from_the_first_token(v1):
    """(found by the fuzz test) ``"prompt": ""`` encodes to no token; the model starts from
    the tokenizer's BOS (or EOS), as OpenAI's completions start from <|endoftext|>."""
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/completions", json={"prompt": "", "max_tokens": 3}) as r:
            body = await r.json()
            assert r.status == 200, body
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] == 1


async def test_not_an_object_and_empty_body(v1):
    status, body, _ = await raw_post(v1 + "/embeddings", b"[1, 2, 3]")
    assert_openai_error(body, status, 400)
    status, body, _ = await raw_post(v1 + "/embeddings", b"")
    assert_openai_error(body, status, 400)


async def test_body_over_the_size_limit_gets_413(v1):
    big = b'{"input": "' + b"a" * (MAX_BODY + 10) + b'"}'
    status, body, _ = await raw_post(v1 + "/embeddings", big)
    assert_openai_error(body, status, 413)
    assert str(MAX_BODY) in body["error"]["message"]


async def test_multipart_is_refused_and_curl_form_type_is_read_as_json(v1):
    status, body, _ = await raw_post(v1 + "/embeddings", b"--x\r\n",
                                     "multipart/form-data; boundary=x")
    assert_openai_error(body, status, 415)
    status, body, _ = await raw_post(v1 + "/embeddings", b'{"input": "hi"}',
                                     "application/x-www-form-urlencoded")
    assert status == 200 and len(body["data"]) == 1


async def test_unknown_route_and_model(v1, base):
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/v1/nothing-here") as r:
            assert_openai_error(await r.json(), r.status, 404)
        async with s.get(v1 + "/models/no-such-model") as r:
            body = await r.json()
            assert r.status == 404 and body["error"]["code"] == "model_not_found"


async def test_too_long_prompt_is_a_400_before_streaming(v1):
    long_text = "word " * 3000
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/chat/completions", json={
                "messages": [{"role": "user", "content": long_text}], "stream": True}) as r:
            body = await r.json()
            assert_openai_error(body, r.status, 400)
            assert body["error"]["code"] == "context_length_exceeded"


async def test_server_keeps_serving_after_bad_input(v1):
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(v1 + "/embeddings", data=b"{{{") as r:
                assert r.status == 400
        async with s.post(v1 + "/embeddings", json={"input": "still here"}) as r:
            assert r.status == 200 and len((await r.json())["data"][0]["embedding"]) == 384


async def test_an_unknown_route_names_every_route_served(base):
    """The 404 lists what the server serves, /v2/rerank (Cohere v2, LiteLLM) included, and
    the index page lists the same routes."""
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/v1/rerankx", json={}) as r:
            body, status = await r.json(), r.status
        async with s.get(base + "/") as r:
            index = await r.json()
    assert_openai_error(body, status, 404)
    msg = body["error"]["message"]
    for route in ("/v1/chat/completions", "/v1/embeddings", "/v1/rerank", "/v2/rerank",
                  "/v1/models", "/health", "/metrics"):
        assert route in msg, (route, msg)
    assert "POST /v2/rerank" in index["endpoints"] and "GET /metrics" in index["endpoints"]
