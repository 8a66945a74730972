"""The chunked prefill's cache (actors/kv_chunk.py, issue 15): every layer writes into one slab
allocated once, and a prompt read in chunks, or after a stored prefix, gives the logits of the
same prompt read whole; a context longer than the slab, or more than one row, falls back to
transformers' concatenation and still gives them."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from agile_rag.actors.kv_chunk import chunk_cache, chunk_cache_from, slab_of
from agile_rag.actors.kv_slots import into_slot, layers_stacked, make_slot_cache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def read(model, ids: torch.Tensor, kv, start: int, end: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids[:, start:end], position_ids=torch.arange(start, end)[None],
                    past_key_values=kv, use_cache=True)
    return out.logits[:, -1]


def whole(model, ids: torch.Tensor) -> torch.Tensor:
    return read(model, ids, DynamicCache(), 0, ids.shape[1])


def test_chunks_write_into_one_slab_and_give_the_whole_prompts_logits(model):
    ids = torch.randint(0, 97, (1, 40))
    kv = chunk_cache(3, 40)
    assert slab_of(kv) is None                            # allocated at the first write
    read(model, ids, kv, 0, 16)
    slab = slab_of(kv)
    assert slab is not None and tuple(slab.shape) == (3, 2, 1, 2, 40, 16)
    ptr = slab.data_ptr()
    read(model, ids, kv, 16, 32)
    last = read(model, ids, kv, 32, 40)
    assert slab_of(kv).data_ptr() == ptr                  # no new allocation after the first
    for layer in kv.layers:                               # every layer: a view of the slab
        assert layer.keys.shape[-2] == 40 and layer.values.shape[-2] == 40
        assert layer.keys.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
    assert kv.get_seq_length() == 40
    torch.testing.assert_close(last, whole(model, ids), rtol=1e-4, atol=1e-4)


def test_a_stored_prefix_copied_in_then_the_rest_read_gives_the_same_logits(model):
    ids = torch.randint(0, 97, (1, 30))
    first = DynamicCache()
    read(model, ids, first, 0, 20)
    stored = [(layer.keys.clone(), layer.values.clone()) for layer in first.layers]
    kv = chunk_cache(3, 30)
    for i, (k, v) in enumerate(stored):
        kv.update(k, v, i)
    last = read(model, ids, kv, 20, 30)
    torch.testing.assert_close(last, whole(model, ids), rtol=1e-4, atol=1e-4)
    # the store's tensors were read, not written
    assert all(torch.equal(k, layer.keys[:, :, :20]) for (k, _), layer in zip(stored, kv.layers))


def test_a_context_longer_than_the_slab_falls_back_and_says_the_same(model):
    ids = torch.randint(0, 97, (1, 40))
    kv = chunk_cache(3, 24)
    read(model, ids, kv, 0, 16)
    last = read(model, ids, kv, 16, 40)                   # 40 > 24: concatenated from here
    assert kv.layers[0].used is None and kv.get_seq_length() == 40
    torch.testing.assert_close(last, whole(model, ids), rtol=1e-4, atol=1e-4)


def test_two_rows_fall_back_to_concatenation(model):
    ids = torch.randint(0, 97, (2, 12))
    kv = chunk_cache(3, 12)
    with torch.inference_mode():
        got = model(input_ids=ids, past_key_values=kv, use_cache=True).logits[:, -1]
        want = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).logits[:, -1]
    assert slab_of(kv) is None and kv.get_seq_length() == 12
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_stored_prefix_copied_in_one_go_gives_the_same_logits_and_can_grow(model):
    ids = torch.randint(0, 97, (1, 30))
    first = chunk_cache(3, 30)
    read(model, ids, first, 0, 20)
    src = layers_stacked([(layer.keys, layer.values) for layer in first.layers])
    assert src is not None and tuple(src.shape) == (3, 2, 1, 2, 20, 16)
    assert torch.equal(src[2, 1], first.layers[2].values)
    assert chunk_cache_from(3, 30, src, 21) is None       # more than it holds
    assert chunk_cache_from(3, 30, None, 5) is None
    assert chunk_cache_from(4, 30, src, 5) is None        # another layer count
    kv = chunk_cache_from(3, 30, src, 17)                 # a prefix of 17 of its 20 tokens
    assert kv.get_seq_length() == 17
    assert slab_of(kv).untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
    last = read(model, ids, kv, 17, 30)                   # the rest written into the slab
    assert kv.layers[0].used == 30
    torch.testing.assert_close(last, whole(model, ids), rtol=1e-4, atol=1e-4)
    assert torch.equal(first.layers[0].keys, src[0, 0])   # the stored prefix untouched


def test_every_layer_as_one_view_only_where_the_tensors_lie_regularly():
    cache = make_slot_cache(3, 4, 2, 8, 16, torch.float32, torch.device("cpu"))
    whole_kv = cache.stacked
    assert whole_kv is not None and tuple(whole_kv.shape) == (3, 2, 4, 2, 8, 16)
    whole_kv[1, 1, 2, :, 5].fill_(7.0)                   # one view over every layer's tensors
    assert bool((cache.values[1][2, :, 5] == 7.0).all())
    assert float(cache.keys[1].abs().sum()) == 0.0 and float(cache.values[0].abs().sum()) == 0.0
    cache.zero()
    assert float(cache.values[1].abs().sum()) == 0.0
    parts = torch.stack([torch.randn(1, 2, 5, 16) for _ in range(6)])     # k0, v0, k1, v1, ...
    got = layers_stacked([(parts[2 * i], parts[2 * i + 1]) for i in range(3)])
    assert got is not None and torch.equal(got[2, 0], parts[4])
    apart = [(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)) for _ in range(3)]
    assert layers_stacked(apart) is None                  # separate allocations
    assert layers_stacked([(parts[0], parts[1]), (parts[2], parts[4])]) is None  # irregular
    assert layers_stacked([(parts[0], parts[1][:, :, :4])]) is None            # other shape


def test_a_rows_every_layer_goes_into_its_slot_in_one_copy():
    cache = make_slot_cache(3, 4, 2, 8, 16, torch.float32, torch.device("cpu"))
    kv = chunk_cache(3, 10)
    for layer in range(3):                                # a chunked prefill's 6 tokens
        kv.update(torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16), layer)
    src = layers_stacked([(layer.keys, layer.values) for layer in kv.layers])
    assert into_slot(cache.stacked, 2, src, 5)
    for layer in range(3):
        assert torch.equal(cache.keys[layer][2, :, :5], kv.layers[layer].keys[0, :, :5])
        assert torch.equal(cache.values[layer][2, :, :5], kv.layers[layer].values[0, :, :5])
        assert float(cache.keys[layer][2, :, 5:].abs().sum()) == 0.0     # nothing past n
        assert float(cache.keys[layer][1].abs().sum()) == 0.0            # other slots kept
    assert not into_slot(cache.stacked, 2, src, 7)        # more than it holds
    assert not into_slot(cache.stacked, 2, None, 5)
    assert not into_slot(cache.stacked, 2, src[:2], 5)    # another layer count
