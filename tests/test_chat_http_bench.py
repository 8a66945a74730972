"""benchmarks/chat_http.py's own bookkeeping (a benchmark is not a test; what it reports is)."""
from __future__ import annotations

import importlib.util
import os
import time


def chat_http_bench():
    """benchmarks/chat_http.py as a module (it is a script, not in the package)."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "chat_http.py")
    spec = importlib.util.spec_from_file_location("chat_http_bench", path)
    bench = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(bench)
    return bench


def test_a_warm_up_reads_its_own_run_not_the_runners_last_one():
    """The re-capture after a drop reported the runner's last finished warm-up (the load's)
    in every results file up to s28: a re-capture that captured nothing (its cache came back
    parked with its graphs) read as the load's 1.35 s. Each idle run now reads its own."""
    bench = chat_http_bench()
    t = time.perf_counter() - 0.25
    load = bench.warmed({"warm_captures": 12, "loop": {"warm_s": 0.9}}, t)
    assert load["graphs"] == 12 and load["graphs_s"] == 0.9 and 0.25 <= load["seconds"] < 5
    again = bench.warmed({"warm_captures": 0, "loop": {}}, time.perf_counter())
    assert again["graphs"] == 0 and again["graphs_s"] is None and again["seconds"] < 0.25
