"""actors/prefill_graphs.py on the CPU (issue 15): the body a prefill graph captures (the lean
prefill of a few prompts right-padded to a length bucket, keys and values copied into their
slots by index) gives transformers' logits for each prompt and leaves each prompt's keys and
values in its slot, no other slot touched; the keys a cache gets; the setting reaching the
runner. The graphs themselves are tested on a GPU (tests/gpu/test_chat_graphs_gpu.py)."""
from __future__ import annotations

import pytest
import torch
from test_lean_decode import _tiny

from agile_rag.actors.kv_slots import make_slot_cache
from agile_rag.actors.llm_lean_decode import lean_decoder
from agile_rag.actors.prefill_graphs import (
    GRAPH_TOKENS,
    LENGTHS,
    ROWS,
    PrefillGraphs,
    graph_keys,
    length_bucket,
)


def test_length_buckets_and_the_keys_a_cache_gets():
    assert [length_bucket(n) for n in (1, 64, 65, 220, 1024)] == [64, 64, 128, 256, 1024]
    assert length_bucket(LENGTHS[-1] + 1) is None
    keys = graph_keys(32, 512)
    assert keys[0] == (1, 64) and (1, 256) in keys and (4, 256) in keys
    assert all(n <= ROWS and b <= 512 and n * b <= GRAPH_TOKENS for n, b in keys)
    assert (1, 1024) not in keys and (3, 512) not in keys          # past the cache, too many
    assert graph_keys(2, 4096) == [(1, b) for b in LENGTHS] + [(2, b) for b in LENGTHS[:-1]]


@pytest.mark.parametrize("arch,lens", [("Llama", [13]), ("Qwen2", [5, 30, 17]),
                                       ("Qwen2", [64, 1, 9, 40])])
def test_the_graph_body_reads_each_prompt_into_its_slot_as_transformers_would(arch, lens):
    model = _tiny(arch)
    lean = lean_decoder(model, True)
    layers = model.config.num_hidden_layers
    kv_heads, head_dim = model.config.num_key_value_heads, lean.head_dim
    cache = make_slot_cache(layers, 8, kv_heads, 256, head_dim, torch.float32,
                            torch.device("cpu"))
    g = torch.Generator().manual_seed(len(lens))
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lens]
    graphs = PrefillGraphs(lean, cache, next(model.parameters()), 300, None, pad=7)
    key = graphs.key(lens)
    assert key == (len(lens), 64)
    first = 3
    graphs.fill(prompts, first, key[1])
    assert graphs.slots[:len(lens)].tolist() == list(range(first, first + len(lens)))
    with torch.inference_mode():
        got = graphs.body(*key)
        assert got.shape == (len(lens), 300)
        for i, p in enumerate(prompts):
            out = model(input_ids=torch.tensor([p]), use_cache=True)
            torch.testing.assert_close(got[i], out.logits[0, -1], rtol=1e-4, atol=1e-4)
            for layer in range(layers):
                want = out.past_key_values.layers[layer]
                torch.testing.assert_close(cache.keys[layer][first + i, :, :len(p)],
                                           want.keys[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(cache.values[layer][first + i, :, :len(p)],
                                           want.values[0], rtol=1e-4, atol=1e-4)
    for layer in range(layers):                  # the slots before and after: untouched
        assert not cache.keys[layer][:first].any()
        assert not cache.values[layer][first + len(lens):].any()


def test_a_pass_no_graph_fits_is_read_eagerly():
    model = _tiny("Llama")
    lean = lean_decoder(model, True)
    cache = make_slot_cache(model.config.num_hidden_layers, 8, model.config.num_key_value_heads,
                            128, lean.head_dim, torch.float32, torch.device("cpu"))
    graphs = PrefillGraphs(lean, cache, next(model.parameters()), 300, None)
    assert graphs.key([200]) is None                     # past the cache's length
    assert graphs.key([10] * (ROWS + 1)) is None         # too many rows
    assert graphs.key([]) is None
    assert graphs.key([100, 3]) == (2, 128)
    assert graphs.run([[1, 2, 3]], 0) is None            # none captured: eager, no capture
    graphs.off = "turned off"
    assert graphs.key([3]) is None
    assert graphs.to_warm == graph_keys(8, 128)


def test_llm_params_prefill_graphs_reach_the_runner():
    """On by default; ``prefill_graphs: false`` turns them off (a live edit too, dropping the
    graphs made so far); off by itself for a flex LLM whose weights leave when it is idle."""
    from agile_rag.actors.llm_batching import BatchEngine
    from agile_rag.runtime.liveconfig import LiveConfigError, validate

    from support import llm_batch_settings

    class Tok:
        eos_token_id = 0
        pad_token_id = 0

    assert llm_batch_settings({})["prefill_graphs"] is True
    assert llm_batch_settings({"prefill_graphs": False})["prefill_graphs"] is False
    leaves = llm_batch_settings({}, device="flex", idle_on_cpu=True)
    assert leaves["prefill_graphs"] is False
    with pytest.raises(LiveConfigError) as bad:
        validate({"llm_params": {"prefill_graphs": "yes"}})
    assert any("prefill_graphs" in p for p in bad.value.problems)
    model = _tiny("Llama")
    assert BatchEngine(model, Tok(), prefill_graphs=False).runner.prefill_graphs_on is False
    eng = BatchEngine(model, Tok())
    assert eng.runner.prefill_graphs_on is True
    eng.runner.prefill_graphs = object()                 # type: ignore[assignment]
    eng._apply({"prefill_graphs": False})
    assert eng.runner.prefill_graphs_on is False and eng.runner.prefill_graphs is None


def test_no_prefill_graphs_are_warmed_off_the_gpu_or_when_off(monkeypatch):
    """The idle loop asks the runner for a prefill graph each turn: none without decode
    graphs (a CPU), with the setting off, or before the lean prefill agreed; else the set is
    made for the lean decoder and cache (here on a CPU, without capturing)."""
    from agile_rag.actors.batch_runner import BatchRunner

    model = _tiny("Llama")
    runner = BatchRunner(model, pad=0)
    runner.cache = make_slot_cache(model.config.num_hidden_layers, 4, runner.kv_heads, 128,
                                   runner.head_dim, torch.float32, torch.device("cpu"))
    runner.prefill_graphs_on = runner.lean_prefill_on = True
    runner.gpu_lean = runner.lean = lean_decoder(model, True)
    runner.capture_stream = object()                   # (no CUDA stream on a CPU)
    assert runner.warm_prefill_graph_one(0, {}) is False           # no decode graphs here
    monkeypatch.setattr(BatchRunner, "graphs_wanted", lambda self: True)
    runner.lean_prefill_ok = False
    assert runner.warm_prefill_graph_one(0, {}) is False and runner.prefill_graphs is None
    runner.lean_prefill_ok = True
    monkeypatch.setattr(PrefillGraphs, "warm", lambda self, first_free: False)
    runner.prefill_graphs_on = False
    assert runner.warm_prefill_graph_one(0, {}) is False and runner.prefill_graphs is None
    runner.prefill_graphs_on = True
    assert runner.warm_prefill_graph_one(0, {}) is False
    assert isinstance(runner.prefill_graphs, PrefillGraphs)
    assert runner.prefill_graphs.valid_for(runner.gpu_lean, runner.cache)


async def test_the_gpu_grant_counts_the_prefill_graphs_pool():
    """An LLM's working memory (what it asks the VRAM arbiter for beyond its weights) holds
    the prefill graphs' pool, one pass of GRAPH_TOKENS tokens' activations, while the graphs
    are on; a live edit turning them off gives it back."""
    from test_chat_batching import start_llm

    actor, _, system = await start_llm({})
    try:
        assert actor.gpu_device == "cpu"              # a simulated GPU: no graphs, no pool
        off_card = actor.working_bytes(1)
        actor.gpu_device = "cuda:0"
        cfg = actor.model.config
        size = next(actor.model.parameters()).element_size()
        pool = GRAPH_TOKENS * (3 * cfg.intermediate_size + 4 * cfg.hidden_size) * size
        on = actor.working_bytes(1)
        actor.engine.configure(prefill_graphs=False)
        assert on - actor.working_bytes(1) == pool and actor.working_bytes(1) == off_card
    finally:
        await system.stop_all()
