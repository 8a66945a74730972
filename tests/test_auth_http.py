"""Optional API keys: with keys configured, model routes need one; /health stays open."""
from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestServer

from agile_rag.configs import load_settings
from agile_rag.server import create_app


async def test_api_keys_guard_model_routes(tmp_path):
    live = tmp_path / "live.json"
    live.write_text("{}")
    app = create_app(load_settings(LIVECONFIGS_PATH=str(live), API_KEYS=["sk-right"]))
    async with TestServer(app) as srv, aiohttp.ClientSession() as s:
        url = str(srv.make_url("/v1/models"))
        async with s.get(url) as r:
            body = await r.json()
            assert r.status == 401 and body["error"]["type"] == "authentication_error"
        async with s.get(url, headers={"Authorization": "Bearer sk-wrong"}) as r:
            assert r.status == 401
        async with s.get(url, headers={"Authorization": "Bearer sk-right"}) as r:
            assert r.status == 200 and (await r.json())["data"] == []
        async with s.get(str(srv.make_url("/health"))) as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with s.post(str(srv.make_url("/v1/embeddings")), json={"input": "x"},
                          headers={"Authorization": "Bearer sk-right"}) as r:
            body = await r.json()
            assert r.status == 404 and body["error"]["code"] == "model_not_found"
