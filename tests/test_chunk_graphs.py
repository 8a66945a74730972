"""actors/chunk_graphs.py on the CPU: the body a chunk graph captures (the lean chunk over one
slot of the KV rectangle, padded to its token bucket) gives transformers' logits for the real
tokens and writes their keys and values into the slot; padding changes nothing they see. The
graphs themselves are tested on a GPU (tests/gpu/test_chat_graphs_gpu.py)."""
from __future__ import annotations

import pytest
import torch
from test_lean_decode import _tiny

from agile_rag.actors.batch_runner import _dynamic_layer
from agile_rag.actors.chunk_graphs import TOKEN_BUCKETS, ChunkGraphs, token_bucket
from agile_rag.actors.kv_chunk import chunk_cache
from agile_rag.actors.kv_slots import make_slot_cache
from agile_rag.actors.llm_lean_decode import lean_decoder


def test_token_buckets():
    assert [token_bucket(m) for m in (1, 16, 17, 64)] == [16, 16, 32, 64]
    assert token_bucket(TOKEN_BUCKETS[-1] + 1) is None


@pytest.mark.parametrize("arch,m", [("Llama", 13), ("Qwen2", 16), ("Qwen2", 5)])
def test_the_graph_body_reads_a_chunk_into_its_slot_as_transformers_would(arch, m):
    model = _tiny(arch)
    lean = lean_decoder(model)
    start, slot = 27, 2
    ids = torch.randint(0, 300, (1, start + m), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(start + m)
    kv = chunk_cache(3, start + m)
    cache = make_slot_cache(3, 4, 2, 256, 8, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        model(input_ids=ids[:, :start], position_ids=pos[None, :start], past_key_values=kv,
              use_cache=True)
        for layer in range(3):                 # the prefix, in the slot (as the runner does)
            k, v = _dynamic_layer(kv, layer)
            cache.keys[layer][slot, :, :start] = k[0]
            cache.values[layer][slot, :, :start] = v[0]
        want = model(input_ids=ids[:, start:], position_ids=pos[None, start:],
                     past_key_values=kv, use_cache=True).logits[0]
        graphs = ChunkGraphs(lean, cache, next(model.parameters()), 300, None)
        assert graphs.fits(m, start) and not graphs.fits(m, 250)
        tb = token_bucket(m)
        view = graphs.fill(ids[:, start:], start, slot, tb)
        assert view == 256 and graphs.pos[:tb].tolist() == list(range(start, start + tb))
        got = graphs.body(tb, view)
    assert got.shape == (tb, 300)
    assert torch.allclose(got[:m], want, rtol=1e-4, atol=1e-5), (got[:m] - want).abs().max()
    for layer in range(3):                     # the real tokens' keys and values, in the slot
        k, v = _dynamic_layer(kv, layer)
        assert torch.allclose(cache.keys[layer][slot, :, :start + m], k[0], atol=1e-5)
        assert torch.allclose(cache.values[layer][slot, :, :start + m], v[0], atol=1e-5)
        assert not cache.keys[layer][1].any()            # other slots untouched


def test_llm_params_chunk_graphs_reach_the_runner():
    """On by default; ``chunk_graphs: false`` turns them off (a live edit too, at the loop's
    next look, dropping the graphs made so far)."""
    from agile_rag.actors.llm_batching import BatchEngine

    class Tok:
        eos_token_id = 0
        pad_token_id = 0

    model = _tiny("Llama")
    from support import llm_batch_settings
    assert llm_batch_settings({})["chunk_graphs"] is True
    assert llm_batch_settings({"chunk_graphs": False})["chunk_graphs"] is False
    # a flex LLM that gives the GPU back whenever it is idle: no idle captures (its weights
    # leave, the graphs with them), as for its decode graphs (warm_graphs)
    leaves = llm_batch_settings({"chunk_graphs": True}, device="flex", idle_on_cpu=True)
    assert leaves["chunk_graphs"] is False and leaves["warm_graphs"] is False
    assert llm_batch_settings({}, device="cuda", idle_on_cpu=True)["chunk_graphs"] is True
    assert BatchEngine(model, Tok()).runner.chunk_graphs_on is True
    assert BatchEngine(model, Tok(), chunk_graphs=False).runner.chunk_graphs_on is False
    eng = BatchEngine(model, Tok())
    assert eng.runner.chunk_graphs_on is True
    eng.runner.chunk_graphs = object()                 # type: ignore[assignment]
    eng._apply({"chunk_graphs": False})
    assert eng.runner.chunk_graphs_on is False and eng.runner.chunk_graphs is None


def test_no_chunk_graphs_are_warmed_while_no_prefix_is_kept(monkeypatch):
    """With ``prefix_cache_tokens`` 0 no prompt starts from a stored prefix, so the idle loop
    captures no chunk graphs (under a VRAM cap they would be captured again after every
    admit, beside the encoders' jobs, for nothing); with prefixes kept it goes on to the
    graph set (made here, on a CPU, without capturing)."""
    from agile_rag.actors.batch_runner import BatchRunner
    from agile_rag.actors.kv_slots import make_slot_cache
    from agile_rag.actors.llm_lean_decode import lean_decoder

    model = _tiny("Llama")
    runner = BatchRunner(model, pad=0)
    runner.cache = make_slot_cache(model.config.num_hidden_layers, 4, runner.kv_heads, 64,
                                   runner.head_dim, torch.float32, torch.device("cpu"))
    runner.chunk_graphs_on = True
    runner.gpu_lean = runner.lean = lean_decoder(model, True)     # (on a CPU: the CPU's)
    runner.lean_chunk_ok = True
    monkeypatch.setattr(BatchRunner, "graphs_wanted", lambda self: True)
    made = []
    monkeypatch.setattr(BatchRunner, "_chunk_graph_set",
                        lambda self, lean, cache: made.append(1) or
                        type("G", (), {"warm": lambda self, active: False})())
    runner.prefixes.budget_tokens = 0
    assert runner.warm_chunk_one(1, {}) is False and made == []
    runner.prefixes.budget_tokens = 4096
    assert runner.warm_chunk_one(1, {}) is False and made == [1]


def test_view_buckets_double_up_to_the_cache_length():
    """A chunk graph attends over LEN_BUCKET times a power of two keys, at most the cache's
    length: a few graphs per token bucket, all of them captured in the idle warm-up."""
    from agile_rag.actors.batch_plan import LEN_BUCKET
    from agile_rag.actors.chunk_graphs import view_bucket, view_buckets

    assert view_buckets(LEN_BUCKET) == [LEN_BUCKET]
    assert view_buckets(16 * LEN_BUCKET) == [LEN_BUCKET << k for k in range(5)]
    assert view_buckets(3 * LEN_BUCKET) == [LEN_BUCKET, 2 * LEN_BUCKET, 3 * LEN_BUCKET]
    for length in (LEN_BUCKET, 3 * LEN_BUCKET, 16 * LEN_BUCKET):
        for need in range(1, length + 1, 37):
            v = view_bucket(need, length)
            assert need <= v <= length and v in view_buckets(length)
