"""The thread setting (issue 17): TORCH_THREADS / --torch-threads and SERVICE_NUM_WORKERS /
--workers reach torch and the executor, in the pool's threads and in a real server process."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from agile_rag.configs import load_settings
from agile_rag.runtime import executor as ex
from agile_rag.runtime.executor import ModelExecutor, torch_threads

from support import running_server


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_default_leaves_a_core_free(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ex, "usable_cores", lambda: 2)
    assert torch_threads(0) == 1
    assert torch_threads(None) == 1
    monkeypatch.setattr(ex, "usable_cores", lambda: 16)
    assert torch_threads(0) == 15
    monkeypatch.setattr(ex, "usable_cores", lambda: 1)
    assert torch_threads(0) == 1
    assert torch_threads(3) == 3                        # a number is taken as given
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert torch_threads(0) == 2                        # auto follows the environment
    assert torch_threads(4) == 4                        # the setting beats the environment


def test_the_executor_applies_it_in_its_threads(keep_threads):
    want = 1 if torch.get_num_threads() != 1 else 2
    pool = ModelExecutor(3, torch_threads=want)
    try:
        assert torch.get_num_threads() == want

        async def go():
            return await asyncio.gather(*(pool.run(_threads_and_name) for _ in range(6)))
        seen = asyncio.run(go())
        assert {n for n, _ in seen} == {want}
        assert all(name.startswith("model-work") for _, name in seen)
        assert pool.max_workers == 3
    finally:
        pool.shutdown(wait=True)


def _threads_and_name():
    x = torch.randn(64, 64)
    (x @ x).sum()                                      # a real op in this thread
    return torch.get_num_threads(), threading.current_thread().name


def test_settings_and_flags_carry_it(tmp_path):
    cfg = tmp_path / "configs.py"
    cfg.write_text("TORCH_THREADS = 3\nSERVICE_NUM_WORKERS = 5\n")
    s = load_settings(str(cfg))
    assert (s.TORCH_THREADS, s.SERVICE_NUM_WORKERS) == (3, 5)
    s = load_settings(str(cfg), TORCH_THREADS=1, SERVICE_NUM_WORKERS=None)   # a flag wins
    assert (s.TORCH_THREADS, s.SERVICE_NUM_WORKERS) == (1, 5)
    assert load_settings().TORCH_THREADS == 0


@pytest.mark.parametrize("flag", [["--workers", "0"], ["--torch-threads", "-1"]])
def test_bad_thread_flags_are_refused(flag, capsys):
    from agile_rag.cli import main
    with pytest.raises(SystemExit) as exc:
        main(flag)
    assert exc.value.code == 2 and "--workers must be at least 1" in capsys.readouterr().err


def test_a_server_started_with_the_flag_computes_with_it(tmp_path):
    """``python -m agile_rag --config`` with TORCH_THREADS = 1 and SERVICE_NUM_WORKERS = 2 and
    no models: the server says what it applied."""
    live = tmp_path / "liveconfigs.json"
    live.write_text('{"standby_llms": [], "standby_embedders": [], "standby_rerankers": []}')
    cfg = tmp_path / "configs.py"
    cfg.write_text("TORCH_THREADS = 1\nSERVICE_NUM_WORKERS = 2\nUSE_LLM = False\n"
                   "USE_EMBEDDER = False\nUSE_RERANKER = False\n")
    log = tmp_path / "server.log"
    with running_server(str(live), str(cfg), str(log)):
        pass
    text = log.read_text()
    assert "torch computes with 1 thread(s); 2 executor workers" in text, text[-2000:]
