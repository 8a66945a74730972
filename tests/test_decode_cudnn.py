"""``llm_params.decode_cudnn_attention`` (issue 15): a GPU's decode graphs may be captured with
cuDNN's attention kernels allowed while the process keeps them off; here, on a CPU, the setting's
path from liveconfigs.json to the batch runner, a live edit, and the switch coming back."""
from __future__ import annotations

import pytest
import torch
from test_graph_warmup import CharTokenizer

from agile_rag.actors.batch_plan import BatchSettings
from agile_rag.actors.llm_batching import _settings
from agile_rag.runtime.cuda_graph import cudnn_attention_allowed
from agile_rag.runtime.liveconfig import LiveConfigError, validate

from support import llm_batch_settings, tiny_llama


def test_llm_params_decode_cudnn_attention_reaches_the_runner():
    assert llm_batch_settings({})["decode_cudnn"] is True                   # the default: on
    assert llm_batch_settings({"decode_cudnn_attention": False})["decode_cudnn"] is False
    assert _settings(BatchSettings(), {"decode_cudnn": False}).decode_cudnn is False
    ok = validate({"llm_params": {"decode_cudnn_attention": True}})
    assert ok.llm_params["decode_cudnn_attention"] is True
    with pytest.raises(LiveConfigError) as bad:
        validate({"llm_params": {"decode_cudnn_attention": "yes"}})
    assert any("decode_cudnn_attention" in p for p in bad.value.problems)


def test_the_engine_hands_the_setting_to_its_runner_and_a_live_edit_drops_the_graphs():
    from agile_rag.actors.llm_batching import BatchEngine

    eng = BatchEngine(tiny_llama(), CharTokenizer())
    assert eng.runner.graph_cudnn is True
    eng.runner.graphs = object()                       # graphs captured the other way
    eng._apply({"decode_cudnn": False})
    assert eng.runner.graph_cudnn is False and eng.runner.graphs is None
    eng.runner.graphs = marker = object()
    eng._apply({"max_batch": 8})                       # another setting: the graphs stay
    assert eng.runner.graphs is marker


@pytest.fixture
def process_off():
    """The process's CUDNN_ATTENTION set off, as the server starts; put back after."""
    from agile_rag.runtime import executor

    switch = torch.backends.cuda
    before = (switch.cudnn_sdp_enabled(), executor.cudnn_attention_setting)
    executor.set_cudnn_attention(False)
    yield switch
    switch.enable_cudnn_sdp(before[0])
    executor.cudnn_attention_setting = before[1]


def test_cudnn_attention_allowed_only_inside_and_the_switch_comes_back(process_off):
    switch = process_off
    with cudnn_attention_allowed(True):
        assert switch.cudnn_sdp_enabled()
        assert switch.flash_sdp_enabled() and switch.mem_efficient_sdp_enabled()
    assert not switch.cudnn_sdp_enabled()
    with cudnn_attention_allowed(False):
        assert not switch.cudnn_sdp_enabled()
    assert not switch.cudnn_sdp_enabled()


def test_two_loops_capturing_at_once_leave_the_switch_as_the_process_set_it(process_off):
    """Two LLMs warming their graphs at the same time: their windows interleave (one enters,
    the other enters, the first leaves, then the second); the switch ends as
    ``CUDNN_ATTENTION`` set it, off, not as the second found it on entry (on)."""
    switch = process_off
    first, second = cudnn_attention_allowed(True), cudnn_attention_allowed(True)
    first.__enter__()
    second.__enter__()                           # finds it on (the first's window)
    first.__exit__(None, None, None)
    assert not switch.cudnn_sdp_enabled()        # the rest of the second's captures: off
    second.__exit__(None, None, None)
    assert not switch.cudnn_sdp_enabled()

