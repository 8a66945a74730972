"""The event loop never runs model work: /health answers while a long generation runs."""
from __future__ import annotations

import asyncio
import time

import aiohttp


async def test_health_answers_during_a_long_generation(v1, base):
    async with aiohttp.ClientSession() as s:
        async def long_chat():
            async with s.post(v1 + "/chat/completions", json={
                    "messages": [{"role": "user", "content": "Write a long essay about rivers."}],
                    "temperature": 0, "max_tokens": 120, "stream": True}) as r:
                pieces = 0
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        pieces += 1
                return pieces

        task = asyncio.create_task(long_chat())
        await asyncio.sleep(1.0)                      # generation under way
        latencies = []
        for _ in range(5):
            t0 = time.monotonic()
            async with s.get(base + "/health") as r:
                assert r.status == 200
                body = await r.json()
            latencies.append(time.monotonic() - t0)
            assert body["models"]["smollm2"]["state"] == "ready"
            await asyncio.sleep(0.2)
        assert not task.done(), "the generation should still be running"
        async with s.post(v1 + "/embeddings", json={"input": "served meanwhile"}) as r:
            assert r.status == 200
        pieces = await task
    assert max(latencies) < 0.5, latencies
    assert pieces > 50


async def test_client_disconnect_cancels_the_generation(v1, server):
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/chat/completions", json={
                "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
                "temperature": 0, "max_tokens": 1500, "stream": True}) as r:
            async for line in r.content:
                if b'"content":"' in line and b'"content":""' not in line:
                    break                                # first real token: hang up
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:             # the model is free again quickly
        async with s.post(v1 + "/chat/completions", json={
                "messages": [{"role": "user", "content": "Say hi"}], "temperature": 0,
                "max_tokens": 3}) as r:
            assert r.status == 200
    assert time.monotonic() - t0 < 15
