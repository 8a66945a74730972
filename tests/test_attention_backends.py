"""``CUDNN_ATTENTION`` (configs.py): the server turns torch's cuDNN attention off unless asked
(cuDNN plans every new shape on the CPU: benchmarks/results/gpu-h200-s10.md)."""
from __future__ import annotations

import pytest
import torch

from agile_rag.configs import load_settings
from agile_rag.runtime.executor import set_cudnn_attention
from agile_rag.server import Server


@pytest.fixture
def keep_switch():
    was = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(was)


def test_the_switch_sets_torchs_backend(keep_switch):
    assert set_cudnn_attention(True) is True
    assert torch.backends.cuda.cudnn_sdp_enabled()
    set_cudnn_attention(False)
    assert not torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("text,want", [("", False), ("CUDNN_ATTENTION = True\n", True)])
def test_a_server_applies_the_setting_at_start(keep_switch, tmp_path, text, want):
    cfg = tmp_path / "configs.py"
    cfg.write_text(text)
    torch.backends.cuda.enable_cudnn_sdp(not want)
    settings = load_settings(str(cfg))
    assert settings.CUDNN_ATTENTION is want
    server = Server(settings)
    try:
        assert torch.backends.cuda.cudnn_sdp_enabled() is want
    finally:
        server.system.executor.shutdown()
