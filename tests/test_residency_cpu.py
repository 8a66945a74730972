"""WeightResidency on the CPU: one flat master copy, views into it, tied weights kept tied."""
import copy

import pytest
import torch
from torch import nn

from agile_rag.runtime.residency import ALIGN, WeightResidency

from support import tiny_bert_cls as _tiny_bert_cls
from support import tiny_llama as _tiny_llama


def _unique_bytes(module):
    seen = {}
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _inside(res, t):
    base = res.host_buffer.data_ptr()
    return base <= t.data_ptr() < base + res.host_buffer.numel()


class Odd(nn.Module):
    """Non-contiguous and storage-sharing parameters, None entries, mixed dtypes, a
    non-persistent buffer."""

    def __init__(self):
        super().__init__()
        base = torch.randn(8, 6)
        self.t = nn.Parameter(base.t())                     # non-contiguous (transposed)
        shared = torch.randn(10, 4)
        self.a = nn.Parameter(shared[:5])                   # two parameters on one storage
        self.b = nn.Parameter(shared[5:])
        self.h = nn.Parameter(torch.randn(3, 5).half())     # odd-sized fp16
        self.register_parameter("none_param", None)
        self.register_buffer("none_buf", None)
        self.register_buffer("idx", torch.arange(7))        # int64
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("inv_freq", torch.rand(5), persistent=False)
        self.empty = nn.Parameter(torch.empty(0, 3))

    def forward(self):
        return (self.t.sum(0) @ torch.ones(8)) + self.a.sum() * self.b.sum() \
            + self.h.float().sum() \
            + self.idx.sum() + self.mask.sum() + self.inv_freq.sum()


def test_llm_output_identical_and_tied():
    m = _tiny_llama()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = m(x).logits
    want = _unique_bytes(m)
    res = WeightResidency(m)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert res.weight_bytes == want                      # the tied matrix counted once
    assert res.buffer_bytes >= want and res.buffer_bytes % ALIGN == 0
    assert not res.on_gpu and res.device == torch.device("cpu")
    for t in list(m.parameters()) + list(m.buffers()):
        assert _inside(res, t)
        assert t.data_ptr() % 64 == 0 or t.storage_offset() != 0
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref)
    # Non-persistent rotary buffers are part of the master copy too.
    assert _inside(res, m.model.rotary_emb.inv_freq)


def test_untied_llm_counts_both():
    m = _tiny_llama(tie=False)
    want = _unique_bytes(m)
    res = WeightResidency(m)
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert res.weight_bytes == want


def test_bert_cross_encoder_identical():
    m = _tiny_bert_cls()
    x = torch.randint(0, 300, (3, 10))
    with torch.no_grad():
        ref = m(x).logits
    res = WeightResidency(m)
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref)
    assert res.num_tensors == len({id(t) for t in list(m.parameters()) + list(m.buffers())})


def test_odd_module_layouts_preserved():
    m = Odd()
    want = _unique_bytes(m)
    ref = m().detach().clone()
    before = {n: (t.detach().clone(), t.shape, t.stride()) for n, t in
              list(m.named_parameters()) + list(m.named_buffers())}
    res = WeightResidency(m)
    for n, t in list(m.named_parameters()) + list(m.named_buffers()):
        val, shape, stride = before[n]
        assert t.shape == shape and t.stride() == stride, n
        assert torch.equal(t, val), n
    assert not m.t.is_contiguous()
    assert m.a.untyped_storage().data_ptr() == m.b.untyped_storage().data_ptr()
    assert m.b.data_ptr() - m.a.data_ptr() == 5 * 4 * 4
    assert m.none_param is None and m.none_buf is None
    assert "inv_freq" not in m.state_dict()
    assert torch.equal(m(), ref)
    assert res.weight_bytes == want


def test_state_dict_round_trip_writes_through_master():
    m = _tiny_llama()
    sd = copy.deepcopy(m.state_dict())
    res = WeightResidency(m)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    m.load_state_dict(sd)
    assert torch.equal(m.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    assert _inside(res, m.model.embed_tokens.weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_only_admit_raises_evict_noop():
    m = _tiny_llama()
    res = WeightResidency(m)  # pin=True, but no CUDA: pageable, no error
    assert not res.pinned
    with pytest.raises(RuntimeError, match="CUDA"):
        res.admit()
    assert res.evict() == {"seconds": 0.0, "bytes": 0}
    assert not res.on_gpu


def test_wrapped_inside_inference_mode_stays_ordinary():
    m = nn.Linear(4, 4)
    with torch.inference_mode():
        WeightResidency(m)
    assert not m.weight.is_inference()
    m(torch.randn(2, 4)).sum().backward()          # still trainable: an ordinary tensor
    assert m.weight.grad is not None


def test_module_built_in_inference_mode_still_runs():
    with torch.inference_mode():
        m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        x = torch.tensor([[1, 2, 3]])
        ref = m(x)
        WeightResidency(m)
        assert m[0].weight.is_inference()
        assert torch.equal(m(x), ref)
