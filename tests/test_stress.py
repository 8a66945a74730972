"""Seeded stress: concurrent mixed clients while the live config changes and clients hang up.
Every reply must be complete and match its own request; none may be lost or pass its
deadline; afterwards the server is back at its baseline (actors, queues, threads: no pool past
its size)."""
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
    # no pool of threads grew past its size (pools start their workers as work comes: the
    # model pool, each encoder's forwards, the event loop's file reads); a replaced actor's
    # threads end once their last job has (they may still be winding down)
    groups = settled_threads(soak, before["thread_groups"])
    assert not grown(before["thread_groups"], groups), json.dumps(
        {"before": before["thread_groups"], "after": groups})


#: the most threads a pool that starts its workers lazily may have, by thread group
#: (GET /admin/models' runtime.thread_groups): the model pool (SERVICE_NUM_WORKERS), an
#: encoder's forwards (GPU_DEPTH), the event loop's default executor (aiofiles' reads)
POOLS = {"model-work": 4, "asyncio": min(32, (os.cpu_count() or 1) + 4)}


def grown(before: dict, after: dict) -> dict:
    """The thread groups past both their baseline count and their pool's size."""
    from agile_rag.actors.encoder_engine import GPU_DEPTH

    out = {}
    for group, n in after.items():
        size = POOLS.get(group, GPU_DEPTH if group.endswith("-forward") else 0)
        if n > max(before.get(group, 0), size):
            out[group] = n
    return out


def settled_threads(soak: Soak, before: dict, timeout: float = 20.0) -> dict:
    """The server's thread groups (the soak's snapshot of GET /admin/models) once none has
    grown past its pool (:func:`grown`), or the last ones seen after ``timeout`` seconds."""
    async def groups() -> dict:
        async with aiohttp.ClientSession() as s:
            return (await soak.snapshot(s))["thread_groups"]
    deadline = time.monotonic() + timeout
    while True:
        now = asyncio.run(groups())
        if not grown(before, now) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)
