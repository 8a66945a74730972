"""Seeded stress: concurrent mixed clients while the live config changes and clients hang up.
Every reply must be complete and match its own request; none may be lost or pass its
deadline; afterwards the server is back at its baseline (actors, queues, threads)."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import aiohttp
import pytest

from support import ROOT, running_server, server_folder

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from soak import Soak  # noqa: E402

ADMIN = "stress-admin"


@pytest.fixture(scope="module")
def stress_server(tmp_path_factory, cross_encoder_dir):
    live, conf, log = server_folder(tmp_path_factory, "stress", cross_encoder_dir,
                                    f"DEBOUNCE_TIME = 0.1\nADMIN_KEY = {ADMIN!r}\n")
    with running_server(live, conf, log) as (base, _, _):
        yield {"base": base, "live": live, "log": log}


@pytest.mark.parametrize("seed", [1, 2])
def test_stress_nothing_lost_nothing_mixed_up(stress_server, seed):
    soak = Soak(stress_server["base"], stress_server["live"], ADMIN, seed=seed, clients=12,
                seconds=12, deadline_s=90, llm="smollm2", embedder="minilm",
                reranker="minilm-rerank", change_every_s=1.0)
    result = asyncio.run(soak.run())
    summary = json.dumps({k: v for k, v in result.items() if k != "before"}, indent=1)
    assert result["failed"] == 0, summary
    assert result["lost"] == 0 and result["requests"] > 50, summary
    assert result["config_changes"] >= 5, summary
    before, after = result["before"], result["after"]
    assert after["actors"] == before["actors"], summary
    assert after["queued"] == 0 and after["states"] == ["ready"], summary
    assert after["config_error"] is None, summary
    # the model pool (4 threads) may start workers during the run: growth beyond it is a leak;
    # a replaced actor's threads end once their last job has (they may still be winding down)
    after = settled_threads(stress_server["base"], before["threads"] + 4) or after
    assert after["threads"] <= before["threads"] + 4, json.dumps(
        {"before": before.get("thread_groups"), "after": after.get("thread_groups")})


def settled_threads(base: str, most: int, timeout: float = 20.0) -> dict | None:
    """The server's runtime (GET /admin/models) once it runs at most ``most`` threads, or the
    last one seen after ``timeout`` seconds."""
    async def runtime() -> dict:
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/admin/models",
                             headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                return (await r.json())["runtime"]
    deadline = time.monotonic() + timeout
    while True:
        rt = asyncio.run(runtime())
        if rt["threads"] <= most or time.monotonic() > deadline:
            return rt
        time.sleep(0.5)
