"""WeightResidency on a real GPU: admit/evict round trips, tied weights, memory back to baseline."""
import copy
import gc
import time

import pytest
import torch
from torch import nn

from agile_rag.runtime.residency import WeightResidency

from support import tiny_bert_cls, tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _tiny_llama(dtype=torch.float32):
    return tiny_llama(128, 512, dtype=dtype)


def _tiny_bert_cls():
    return tiny_bert_cls(64, 512)


def _tensors(m):
    return list(m.parameters()) + list(m.buffers())


def _no_cuda_left(m):
    return all(t.device.type == "cpu" for t in _tensors(m))


def _settle():
    gc.collect()
    torch.cuda.synchronize()


def test_llama_round_trip_identical_and_tied():
    m = _tiny_llama()
    twin = copy.deepcopy(m).to("cuda")          # the plain .to() path, for the reference GPU output
    with torch.inference_mode():
        _llama_round_trip(m, twin)


def _llama_round_trip(m, twin):
    x = torch.randint(0, 512, (2, 24))
    cpu_before = m(x).logits
    res = WeightResidency(m)
    assert res.pinned
    assert torch.equal(m(x).logits, cpu_before)

    # Warm cuBLAS etc. once, so its workspaces don't count against the baseline below.
    twin_out = twin(x.cuda()).logits
    _settle()
    base = torch.cuda.memory_allocated()

    for _ in range(3):
        info = res.admit("cuda")
        assert info["bytes"] == res.buffer_bytes and info["seconds"] > 0
        assert res.on_gpu and res.device.type == "cuda"
        assert all(t.is_cuda for t in _tensors(m))
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        assert torch.equal(m(x.cuda()).logits, twin_out)
        again = res.admit("cuda")                 # idempotent: no copy
        assert again["bytes"] == 0
        ev = res.evict()
        assert ev["bytes"] == res.buffer_bytes
        assert not res.on_gpu and _no_cuda_left(m)
        _settle()
        assert torch.cuda.memory_allocated() == base
        assert torch.equal(m(x).logits, cpu_before)
        assert m.lm_head.weight is m.model.embed_tokens.weight
    assert res.evict() == {"seconds": 0.0, "bytes": 0}


def test_llama_fp16_generate_same_tokens():
    m = _tiny_llama(torch.float16)
    twin = copy.deepcopy(m).to("cuda")
    with torch.inference_mode():
        _generate_same(m, twin)


def _generate_same(m, twin):
    res = WeightResidency(m)
    x = torch.randint(0, 512, (1, 16), device="cuda")
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    want = twin.generate(x, **kw)
    res.admit()
    got = m.generate(x, **kw)
    assert torch.equal(got, want)
    res.evict()
    res.admit()
    assert torch.equal(m.generate(x, **kw), want)
    res.evict()


def test_bert_cross_encoder_round_trip():
    m = _tiny_bert_cls()
    twin = copy.deepcopy(m).to("cuda")
    with torch.inference_mode():
        _bert_round_trip(m, twin)


def _bert_round_trip(m, twin):
    x = torch.randint(0, 512, (4, 32))
    cpu_before = m(x).logits
    res = WeightResidency(m)
    want = twin(x.cuda()).logits
    _settle()
    base = torch.cuda.memory_allocated()
    res.admit()
    assert torch.equal(m(x.cuda()).logits, want)
    assert torch.allclose(want.cpu(), cpu_before, atol=1e-4)
    res.evict()
    _settle()
    assert _no_cuda_left(m) and torch.cuda.memory_allocated() == base
    assert torch.equal(m(x).logits, cpu_before)


def test_module_built_on_gpu_moves_to_pinned_host():
    w = torch.randn(8, 8, device="cuda")
    torch.nn.functional.layer_norm(w @ w, (8,))   # cuBLAS workspace exists before the baseline
    del w
    _settle()
    base = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        m = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 8))
    x = torch.randn(5, 256, device="cuda")
    with torch.inference_mode():
        want = m(x)
    res = WeightResidency(m)
    _settle()
    assert _no_cuda_left(m) and res.pinned
    assert torch.cuda.memory_allocated() - base < 64 * 1024   # only x and want remain
    res.admit()
    with torch.inference_mode():
        assert torch.equal(m(x), want)
    res.evict()


class Odd(nn.Module):
    """Non-contiguous and storage-sharing parameters, None entries, mixed dtypes."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.randn(8, 6).t())
        shared = torch.randn(10, 4)
        self.a = nn.Parameter(shared[:5])
        self.b = nn.Parameter(shared[5:])
        self.h = nn.Parameter(torch.randn(3, 5).half())
        self.register_buffer("none_buf", None)
        self.register_buffer("idx", torch.arange(7))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("inv_freq", torch.rand(5), persistent=False)

    def forward(self):
        return (self.t.sum(0) @ torch.ones(8, device=self.t.device)) + self.a.sum() * self.b.sum() \
            + self.h.float().sum() + self.idx.sum() + self.mask.sum() + self.inv_freq.sum()


def test_odd_layouts_survive_gpu():
    m = Odd()
    ref = m().detach()
    res = WeightResidency(m)
    res.admit()
    assert m.t.is_cuda and not m.t.is_contiguous()
    assert m.a.untyped_storage().data_ptr() == m.b.untyped_storage().data_ptr()
    assert torch.allclose(m().cpu(), ref, rtol=1e-5)   # GPU sums round differently from the CPU's
    res.evict()
    assert _no_cuda_left(m) and torch.equal(m(), ref)


def test_module_built_in_inference_mode_admits():
    with torch.inference_mode():
        m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        x = torch.tensor([[1, 2, 3]])
        ref = m(x)
        res = WeightResidency(m)
        res.admit()
        assert m[0].weight.is_cuda and m[0].weight.is_inference()
        assert torch.allclose(m(x.cuda()).cpu(), ref, atol=1e-6)
        res.evict()
        assert torch.equal(m(x), ref)


def test_admit_throughput_sanity():
    # 512 MiB of fp16 weights: admit must run near the plain pinned copy rate.
    with torch.device("cuda"):
        m = nn.Sequential(*[nn.Linear(4096, 4096, bias=False, dtype=torch.float16)
                            for _ in range(16)])
    res = WeightResidency(m)
    host = res.host_buffer
    dst = torch.empty_like(host, device="cuda")
    s = torch.cuda.Stream()
    copies, admits = [], []
    for _ in range(4):
        t0 = time.perf_counter()
        with torch.cuda.stream(s):
            dst.copy_(host, non_blocking=True)
        s.synchronize()
        copies.append(time.perf_counter() - t0)
        admits.append(res.admit()["seconds"])
        res.evict()
    del dst
    copy_rate = host.numel() / sorted(copies)[1] / 1e9
    admit_rate = host.numel() / sorted(admits)[1] / 1e9
    print(f"pinned copy {copy_rate:.1f} GB/s, admit {admit_rate:.1f} GB/s")
    assert copy_rate > 5 and admit_rate > 0.7 * copy_rate


def test_admit_failure_leaves_module_on_host():
    m = _tiny_llama()
    res = WeightResidency(m)
    with pytest.raises(ValueError):
        res.admit("cpu")
    assert not res.on_gpu and _no_cuda_left(m)
