"""Admin edits keep liveconfigs.json's comments: only what changed is rewritten
(runtime/config_edit.py), and the result always parses to exactly the edited data."""
from __future__ import annotations

import asyncio
import copy
import os

import aiohttp
import json5
import pytest
from aiohttp.test_utils import TestServer

from agile_rag.configs import load_settings
from agile_rag.http.keys import SERVER
from agile_rag.runtime import config_edit
from agile_rag.server import create_app

from support import MINILM, ROOT

SEED = os.path.join(ROOT, "tests", "data", "seed_liveconfigs.json")


@pytest.fixture(scope="module")
def seed():
    with open(SEED, encoding="utf-8") as f:
        text = f.read()
    return text, json5.loads(text)


def comment_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("//")]


def edited(text: str, new) -> str:
    out, kept = config_edit.rewrite(text, new)
    assert kept, out
    assert json5.loads(out) == new
    return out


def test_a_changed_value_is_replaced_in_its_line(seed):
    text, data = seed
    new = copy.deepcopy(data)
    new["llms"]["qwen7b"]["device"] = "cpu"
    new["reranker_params"]["top_n"] = 5
    out = edited(text, new)
    changed = [(a, b) for a, b in zip(text.splitlines(), out.splitlines()) if a != b]
    assert len(changed) == 2 and len(out.splitlines()) == len(text.splitlines())
    before, after = changed[0]
    assert after == before.replace('"device":"flex"', '"device":"cpu"')
    assert "//必填，flex、cuda或cpu" in after                    # its comment stays


def test_standby_lists_and_added_entries_keep_every_comment(seed):
    text, data = seed
    new = copy.deepcopy(data)
    new["embedders"]["new-emb"] = {"path": "/models/new", "device": "flex", "cuda_thres": 4}
    new["standby_embedders"].append("new-emb")
    new["standby_rerankers"].remove("bce")
    out = edited(text, new)
    assert comment_lines(out) == comment_lines(text)
    assert '"reset_flags": 0, //如果整个程序出bug卡住了' in out
    # the new entry is indented like its siblings, each key on its own line
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if '"new-emb": {' in line)
    sibling = next(line for line in lines if '"bge-m3":{' in line)
    indent = len(sibling) - len(sibling.lstrip())
    assert lines[i].startswith(" " * indent + '"new-emb"')
    assert lines[i + 1].startswith(" " * (indent + 4) + '"path": "/models/new"')


@pytest.mark.parametrize("which", ["qwen7b", "qwen7bgptq"])
def test_a_deleted_entry_leaves_with_its_lines_only(seed, which):
    text, data = seed
    new = copy.deepcopy(data)
    del new["llms"][which]
    out = edited(text, new)
    assert which not in json5.loads(out)["llms"]
    other = ({"qwen7b", "qwen7bgptq"} - {which}).pop()
    assert f'"{other}"' in out
    assert "//可添加更多模型" in out and '"llm_params":{ //LLM通用参数' in out
    removed = len(text.splitlines()) - len(out.splitlines())
    assert removed == 9                                         # the entry's lines, no more


def test_one_line_and_empty_objects_and_new_sections():
    text = ('{\n  "a": {"x": 1}, // one line\n  "b": {},\n  "c": [1, 2], /* block */\n'
            '  "d": "last" // end\n}\n')
    new = {"a": {"x": 1, "y": [3]}, "b": {"k": True}, "c": [2], "e": {"f": None}}
    out = edited(text, new)
    assert "// one line" in out and "/* block */" in out
    assert config_edit.rewrite(out, json5.loads(out)) == (out, True)    # no change: same text


def test_an_edit_it_cannot_reproduce_falls_back_to_plain_json(seed, monkeypatch):
    text, data = seed
    new = copy.deepcopy(data)
    new["llms"]["qwen7b"]["max_tokens"] = 4096
    monkeypatch.setattr(config_edit, "_dump", lambda value, indent: "1234")
    out, kept = config_edit.rewrite(text, new)
    assert not kept and json5.loads(out) == new and "//" not in out


async def test_admin_api_edits_keep_the_users_comments(tmp_path):
    live = tmp_path / "liveconfigs.json"
    original = (
        '{\n'
        '    // my embedders\n'
        '    "standby_embedders": ["minilm"], // the first one answers unknown names\n'
        '    "embedders": {\n'
        f'        "minilm": {{"path": "{MINILM}", "device": "flex"}}, // small and fast\n'
        '    },\n'
        '    "embedder_params": {"token_estimation": "re"}, // English\n'
        '}\n')
    live.write_text(original, encoding="utf-8")
    app = create_app(load_settings(LIVECONFIGS_PATH=str(live), ADMIN_KEY="adm"))
    auth = {"Authorization": "Bearer adm"}
    async with TestServer(app) as srv, aiohttp.ClientSession(headers=auth) as s:
        server = app[SERVER]
        for _ in range(600):
            if all(a.state != "loading" for a in server.models()):
                break
            await asyncio.sleep(0.1)
        async with s.post(srv.make_url("/admin/models/minilm/device"),
                          json={"device": "cpu"}) as r:
            assert r.status == 200, await r.text()
        async with s.post(srv.make_url("/admin/models"), json={
                "kind": "embedder", "name": "second", "entry": {"path": MINILM}}) as r:
            assert r.status == 200, await r.text()
        text = live.read_text(encoding="utf-8")
        for comment in ("// my embedders", "// the first one answers unknown names",
                        "// small and fast", "// English"):
            assert comment in text, text
        data = json5.loads(text)
        assert data["embedders"]["minilm"]["device"] == "cpu"
        assert data["standby_embedders"] == ["minilm", "second"]
        assert (tmp_path / "liveconfigs.json.bak").read_text(encoding="utf-8") != text
        async with s.post(srv.make_url("/v1/embeddings"),
                          json={"model": "second", "input": "hello"}) as r:
            body = await r.json()
            assert r.status == 200 and len(body["data"][0]["embedding"]) == 384
