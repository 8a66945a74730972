"""Shared fixtures: one real server process (started once per test session) with the real
small models, driven over loopback HTTP."""
from __future__ import annotations

import pytest

from support import MAX_BODY, build_cross_encoder, running_server, server_folder


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory) -> str:
    return build_cross_encoder(str(tmp_path_factory.mktemp("models") / "tiny-ce"))


@pytest.fixture(scope="session")
def server(tmp_path_factory, cross_encoder_dir):
    """One real `python -m agile_rag` process with the real small models."""
    live, cfg, log = server_folder(tmp_path_factory, "server", cross_encoder_dir,
                                   f"MAX_BODY_BYTES = {MAX_BODY}\nREQUEST_TIMEOUT = 300.0\n"
                                   "SERVICE_NUM_WORKERS = 4\n")
    # a server slow to stop (past SHUTDOWN_TIMEOUT) is killed quietly at the session's end
    with running_server(live, cfg, log, hang_fails=False) as (base, proc, health):
        assert health["status"] == "ok", health
        yield {"base": base, "v1": base + "/v1", "proc": proc, "log": log, "live": live}


@pytest.fixture
def base(server) -> str:
    return server["base"]


@pytest.fixture
def v1(server) -> str:
    return server["v1"]
