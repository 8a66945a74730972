"""Chat and legacy completions over real HTTP against the real SmolLM2 model."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from openai import OpenAI

from support import sse_events

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def test_chat_answers_with_the_models_own_words(v1):
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/chat/completions", json={
                "model": "smollm2", "messages": QUESTION, "temperature": 0,
                "max_tokens": 30}) as r:
            assert r.status == 200
            assert r.headers["x-request-id"].startswith("req-")
            body = await r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "smollm2"
    choice = body["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    u = body["usage"]
    assert u["prompt_tokens"] > 10 and 0 < u["completion_tokens"] <= 30
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


async def test_stream_matches_non_stream_and_reports_usage_last(v1):
    req = {"model": "anything-else", "messages": QUESTION, "temperature": 0, "max_tokens": 20}
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/chat/completions", json=req) as r:
            whole = (await r.json())["choices"][0]["message"]["content"]
        async with s.post(v1 + "/chat/completions", json={
                **req, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("choices" in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole and "Paris" in text
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_max_tokens_cuts_with_length_and_stop_strings_end_early(v1):
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "temperature": 0, "max_completion_tokens": 5}) as r:
            body = await r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5
        async with s.post(v1 + "/chat/completions", json={
                "messages": QUESTION, "temperature": 0, "max_tokens": 30, "stop": [" Paris"]}) as r:
            body = await r.json()
    text = body["choices"][0]["message"]["content"]
    assert "Paris" not in text and text.startswith("The capital of France is")
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_seeded_sampling_repeats_and_temperature_changes_words(v1):
    req = {"messages": [{"role": "user", "content": "Tell me a fun fact."}],
           "temperature": 1.5, "top_p": 0.95, "seed": 7, "max_tokens": 12}
    async with aiohttp.ClientSession() as s:
        outs = []
        for _ in range(2):
            async with s.post(v1 + "/chat/completions", json=req) as r:
                outs.append((await r.json())["choices"][0]["message"]["content"])
    assert outs[0] == outs[1] and outs[0]


def test_official_openai_client_chat_stream_and_models(v1):
    client = OpenAI(base_url=v1, api_key="EMPTY")
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                       max_tokens=20)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.total_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True}) if c.choices]
    assert "Paris" in "".join(pieces)
    ids = {m.id for m in client.models.list()}
    assert {"smollm2", "minilm", "minilm-rerank", "tiny-ce"} <= ids


def test_legacy_completions_for_llamaindex(v1):
    client = OpenAI(base_url=v1, api_key="sk-anything")
    r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                  max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert "Paris" in r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0,
        stream=True) if c.choices)
    assert streamed == r.choices[0].text


@pytest.mark.parametrize("content", [[{"type": "text", "text": "What is the capital of "},
                                      {"type": "text", "text": "France?"}]])
async def test_content_parts_are_joined(v1, content):
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/chat/completions", json={
                "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": 20, "stop": None, "user": "x", "drop_params": True}) as r:
            assert r.status == 200
            assert "Paris" in (await r.json())["choices"][0]["message"]["content"]


async def test_a_client_that_hangs_up_mid_stream_leaves_no_traceback(server, v1):
    """A streaming client that goes away: its chat is cancelled, the server logs no error
    (aiohttp's ClientConnectionResetError used to escape the handler as a traceback) and
    serves the next request."""
    with open(server["log"], "rb") as f:
        start = len(f.read())
    async with aiohttp.ClientSession() as s:
        resp = await s.post(v1 + "/chat/completions", json={
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "temperature": 0, "max_tokens": 400, "stream": True})
        assert resp.status == 200
        got = 0
        async for line in resp.content:
            if line.startswith(b"data: "):
                got += 1
                if got >= 3:
                    break
        resp.close()                                   # hang up mid-stream
        await asyncio.sleep(1.5)
        async with s.post(v1 + "/chat/completions", json={
                "messages": QUESTION, "temperature": 0, "max_tokens": 20}) as r:
            assert r.status == 200
            assert "Paris" in (await r.json())["choices"][0]["message"]["content"]
    with open(server["log"], "rb") as f:
        new = f.read()[start:].decode(errors="replace")
    assert "Traceback" not in new and "Error handling request" not in new, new[-2000:]
