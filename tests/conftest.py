"""Shared fixtures: one real server process (started once per test session) with the real
small models, driven over loopback HTTP."""
from __future__ import annotations

import subprocess
import sys

import pytest

from support import CACHE, MAX_BODY, ROOT, build_cross_encoder, free_port, wait_ready, \
    write_live_config


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory) -> str:
    return build_cross_encoder(str(tmp_path_factory.mktemp("models") / "tiny-ce"))


@pytest.fixture(scope="session")
def server(tmp_path_factory, cross_encoder_dir):
    """One real `python -m agile_rag` process with the real small models."""
    d = tmp_path_factory.mktemp("server")
    live = str(d / "liveconfigs.json")
    write_live_config(live, cross_encoder_dir)
    cfg = d / "configs.py"
    cfg.write_text(f"MODEL_CACHE_DIR = {CACHE!r}\nMAX_BODY_BYTES = {MAX_BODY}\n"
                   "REQUEST_TIMEOUT = 300.0\nSERVICE_NUM_WORKERS = 4\n")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "agile_rag", "--port", str(port),
                             "--live-config", live, "--config", str(cfg)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_ready(base, proc)
        assert health["status"] == "ok", health
        yield {"base": base, "v1": base + "/v1", "proc": proc, "log": str(d / "server.log"),
               "live": live}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def base(server) -> str:
    return server["base"]


@pytest.fixture
def v1(server) -> str:
    return server["v1"]
