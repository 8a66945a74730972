"""The top-level http/ folder must never shadow the standard library's http package."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_stdlib_http_wins_from_the_repo_root():
    r = run("-c", "import http, http.cookies, http.client, aiohttp, sys;"
                  "import agile_rag.http.app as a;"
                  "assert http.__file__.startswith(sys.base_prefix), http.__file__;"
                  "print(a.__name__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "agile_rag.http.app"
    assert not os.path.exists(os.path.join(ROOT, "http", "__init__.py"))


def test_module_entry_point_and_flags():
    r = run("-m", "agile_rag", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--host", "--port", "--live-config", "--config"):
        assert flag in r.stdout
    r = run("-m", "agile_rag", "trace", "--help")
    assert r.returncode == 0 and "--request-id" in r.stdout and "--chrome" in r.stdout


def test_bad_live_config_is_refused_with_reasons(tmp_path):
    bad = tmp_path / "live.json"
    bad.write_text('{"standby_llms": ["ghost"], "llms": {}}')
    r = run("-m", "agile_rag", "--live-config", str(bad), "--port", "1")
    assert r.returncode == 2
    assert "ghost" in r.stderr and "no entry" in r.stderr
