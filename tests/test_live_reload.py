"""Hot liveconfigs.json: edits while requests stream are applied without a restart, bad files
change nothing and say why, in-flight requests never fail."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import time

import aiohttp
import pytest

from support import CACHE, MINILM, running_server, write_live_config

ADMIN = "admin-secret"


def save(path: str, cfg: dict | str) -> None:
    """Save like an editor that writes a temp file and renames it over the old one."""
    tmp = path + ".swp"
    with open(tmp, "w") as f:
        f.write(cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def live(tmp_path_factory, cross_encoder_dir):
    d = tmp_path_factory.mktemp("live")
    path = str(d / "liveconfigs.json")
    cfg = write_live_config(path, cross_encoder_dir, standby_embedders=["e1"],
                            embedders={"e1": {"path": MINILM, "device": "flex"}},
                            standby_rerankers=["minilm-rerank"])
    conf = d / "configs.py"
    conf.write_text(f"MODEL_CACHE_DIR = {CACHE!r}\nDEBOUNCE_TIME = 0.2\n"
                    f"ADMIN_KEY = {ADMIN!r}\nMODELS_DIR = {str(d / 'models')!r}\n")
    with running_server(path, conf, str(d / "server.log")) as (base, _, _):
        yield {"base": base, "path": path, "cfg": cfg, "ce": cross_encoder_dir}


async def get(s, url):
    async with s.get(url) as r:
        return await r.json()


async def post(s, url, body):
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


async def wait_for(check, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the change was not applied in time")


async def model_ids(s, base):
    return {m["id"] for m in (await get(s, base + "/v1/models"))["data"]}


async def test_edits_apply_while_a_chat_streams(live):
    base, path = live["base"], live["path"]
    cfg = copy.deepcopy(live["cfg"])
    async with aiohttp.ClientSession() as s:
        async def stream():
            async with s.post(base + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Write a long poem about the sea."}],
                    "temperature": 0, "max_tokens": 200, "stream": True}) as r:
                assert r.status == 200
                return (await r.read()).decode()
        chat = asyncio.create_task(stream())
        embeds = []

        async def embed_forever():
            while not chat.done():
                status, body = await post(s, base + "/v1/embeddings", {"input": "steady"})
                embeds.append(status)
                await asyncio.sleep(0.05)
        background = asyncio.create_task(embed_forever())

        # add an embedder: it answers within seconds
        cfg["standby_embedders"] = ["e1", "e2"]
        cfg["embedders"]["e2"] = {"path": MINILM, "device": "flex", "max_tokens": 64}
        save(path, cfg)

        async def has_e2():
            return "e2" in await model_ids(s, base)
        t0 = time.monotonic()
        await wait_for(has_e2)
        status, body = await post(s, base + "/v1/embeddings", {"model": "e2", "input": "hi"})
        assert status == 200 and body["model"] == "e2"
        assert time.monotonic() - t0 < 30

        # delete e1: its name falls back to the first standby model (now e2)
        cfg["standby_embedders"] = ["e2"]
        save(path, cfg)

        async def e1_gone():
            return "e1" not in await model_ids(s, base)
        await wait_for(e1_gone)
        status, body = await post(s, base + "/v1/embeddings", {"model": "e1", "input": "hi"})
        assert status == 200 and body["model"] == "e2"

        # flip a device, change top_n and default_temp
        cfg["embedders"]["e2"]["device"] = "cpu"
        cfg["reranker_params"]["top_n"] = 2
        cfg["llm_params"]["default_temp"] = 0.0
        save(path, cfg)

        async def applied():
            h = await get(s, base + "/health")
            return h["models"]["e2"]["config_device"] == "cpu"
        await wait_for(applied)
        status, body = await post(s, base + "/v1/rerank", {"query": "capital of France",
                                                            "documents": ["a", "b", "Paris"]})
        assert len(body["results"]) == 2
        q = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8}
        _, implicit = await post(s, base + "/v1/chat/completions", q)
        _, greedy = await post(s, base + "/v1/chat/completions", {**q, "temperature": 0})
        assert implicit["choices"][0]["message"]["content"] == \
            greedy["choices"][0]["message"]["content"]

        text = await chat
        await background
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    assert embeds and set(embeds) == {200}


@pytest.mark.parametrize("breakage,needle", [
    ("{ not json", "not valid JSON"),
    ({"standby_embedders": ["ghost"]}, "no entry"),
    ({"embedders": {"e2": {"path": "/no/such/folder"}}}, "does not exist"),
    ({"embedders": {"e2": {"path": MINILM, "device": "tpu"}}}, "device is 'tpu'"),
])
async def test_invalid_files_change_nothing_and_say_why(live, breakage, needle):
    base, path = live["base"], live["path"]
    async with aiohttp.ClientSession() as s:
        before = await model_ids(s, base)
        good = json.load(open(path))
        if isinstance(breakage, str):
            save(path, breakage)
        else:
            bad = copy.deepcopy(good)
            for k, v in breakage.items():
                bad[k] = {**bad[k], **v} if isinstance(v, dict) else v
            save(path, bad)

        async def reported():
            return needle in ((await get(s, base + "/health"))["config_error"] or "")
        await wait_for(reported, 10)
        assert await model_ids(s, base) == before
        status, _ = await post(s, base + "/v1/embeddings", {"input": "still serving"})
        assert status == 200
        save(path, good)

        async def cleared():
            return (await get(s, base + "/health"))["config_error"] is None
        await wait_for(cleared, 10)


async def test_reload_of_a_new_path_and_a_failed_load_keeps_the_old_version(live, tmp_path):
    base, path = live["base"], live["path"]
    async with aiohttp.ClientSession() as s:
        cfg = json.load(open(path))
        broken = tmp_path / "broken-model"
        broken.mkdir()
        (broken / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
        cfg["rerankers"]["minilm-rerank"]["path"] = str(broken)
        cfg["rerankers"]["minilm-rerank"]["kind"] = "cross-encoder"
        save(path, cfg)

        async def failed():
            return "failed to load" in ((await get(s, base + "/health"))["config_error"] or "")
        await wait_for(failed, 60)
        status, body = await post(s, base + "/v1/rerank", {
            "query": "capital of France", "documents": ["Bananas.", "Paris is in France."]})
        assert status == 200 and body["results"][0]["index"] == 1     # old bi-encoder serves

        cfg["rerankers"]["minilm-rerank"]["path"] = live["ce"]       # a real new version
        save(path, cfg)

        async def swapped():
            h = await get(s, base + "/health")
            return h["config_error"] is None
        await wait_for(swapped, 60)
        _, ce = await post(s, base + "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
        _, direct = await post(s, base + "/v1/rerank", {"query": "q", "documents": ["a", "b"],
                                                        "model": "minilm-rerank"})
        assert ce["results"] == direct["results"]
        assert ce["model"] == "minilm-rerank"


# ---- the admin API ---------------------------------------------------------------------------
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def tar_of(folder: str, extra: dict | None = None, link: bool = False) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname="model")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("model/escape.json")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


async def test_admin_needs_its_key(live):
    async with aiohttp.ClientSession() as s:
        async with s.get(live["base"] + "/admin/models") as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_admin_key"
        async with s.get(live["base"] + "/admin/models",
                         headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401


async def test_admin_upload_add_device_delete_round_trip(live):
    from support import minilm_dir

    base, path = live["base"], live["path"]
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(base + "/admin/upload?name=up-minilm", data=tar_of(minilm_dir())) as r:
            up = await r.json()
            assert r.status == 201, up
        assert "model.safetensors" in up["files"][-1] or any(
            f.endswith("model.safetensors") for f in up["files"])
        async with s.post(base + "/admin/models", json={
                "kind": "embedder", "name": "up", "entry": {"path": up["path"]}}) as r:
            body = await r.json()
            assert r.status == 200 and body["applied"] == ["added embedder up"], body
        assert "up" in json.load(open(path))["standby_embedders"]       # the file is the truth
        status, emb = await post(s, base + "/v1/embeddings", {"model": "up", "input": "hi"})
        assert status == 200 and emb["model"] == "up" and len(emb["data"][0]["embedding"]) == 384

        async with s.post(base + "/admin/models/up/device", json={"device": "cpu"}) as r:
            assert r.status == 200 and "device='cpu'" in (await r.json())["applied"][0]
        async with s.get(base + "/admin/models") as r:
            listing = await r.json()
        (mine,) = [m for m in listing["models"] if m["name"] == "up"]
        assert mine["config_device"] == "cpu" and mine["state"] == "ready"
        assert mine["queue_length"] == 0 and mine["weight_bytes"] > 0
        groups = listing["runtime"]["thread_groups"]      # threads by pool, less worker numbers
        assert groups["MainThread"] == 1 and sum(groups.values()) >= listing["runtime"][
            "threads"] - 1 and not any(k.endswith(("_0", "_1")) for k in groups), groups

        async with s.delete(base + "/admin/models/up") as r:
            assert r.status == 200 and (await r.json())["applied"] == ["removed embedder up"]
        assert "up" not in json.load(open(path))["embedders"]
        assert os.path.exists(path + ".bak")


@pytest.mark.parametrize("extra,link,needle", [
    ({"../evil.json": b"{}"}, False, "outside the model folder"),
    ({}, True, "link"),
    ({"model/pytorch_model.bin": b"x"}, False, "pickle"),
    ({"model/run.sh": b"x"}, False, "not a model file type"),
])
async def test_admin_upload_refuses_dangerous_archives(live, tmp_path, extra, link, needle):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(live["base"] + "/admin/upload?name=bad", data=tar_of(
                str(folder), extra, link)) as r:
            body = await r.json()
            assert r.status == 400 and needle in body["error"]["message"], body
    assert not os.path.exists(os.path.join(os.path.dirname(live["path"]), "models", "bad"))


async def test_admin_refuses_a_change_that_breaks_the_file(live):
    before = open(live["path"]).read()
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(live["base"] + "/admin/models", json={
                "kind": "embedder", "name": "ghost", "entry": {"path": "/no/such"}}) as r:
            body = await r.json()
            assert r.status == 400 and "does not exist" in body["error"]["message"]
    assert open(live["path"]).read() == before
