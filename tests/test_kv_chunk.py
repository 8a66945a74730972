"""The chunked prefill's cache (actors/kv_chunk.py, issue 15): every layer writes into one slab
allocated once, and a prompt read in chunks, or after a stored prefix, gives the logits of the
same prompt read whole; a context longer than the slab, or more than one row, falls back to
transformers' concatenation and still gives them."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from agile_rag.actors.kv_chunk import chunk_cache, slab_of


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
