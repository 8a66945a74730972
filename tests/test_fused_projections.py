"""actors/llm_fused.py: q/k/v and gate/up weights laid end to end (views of one tensor each, so
nothing is held twice) compute what the separate modules compute, through transformers'
forward and through the lean step's one matmul per input; the weights' residency keeps the
layout; quantized projections are left alone. The batch runner's decode graph body
(``decode_body``, llm_params.gpu_lean_decode) runs the lean step only when its first step
agrees with transformers'. On the CPU here: the GPU's graphs are in tests/gpu."""
from __future__ import annotations

import pytest
import torch
from test_lean_decode import _runner, _tiny, same_steps

from agile_rag.actors.llm_fused import LinearCalls, laid_end_to_end, lay_end_to_end
from agile_rag.actors.llm_lean_decode import LeanDecoder, lean_decoder
from agile_rag.runtime.residency import WeightResidency

ARCHS = ["Llama", "Qwen2"]       # Qwen2: q/k/v biases, laid end to end too


def _groups(model):
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        yield [a.q_proj, a.k_proj, a.v_proj]
        yield [m.gate_proj, m.up_proj]


@pytest.mark.parametrize("arch", ARCHS)
def test_laid_end_to_end_the_model_computes_the_same_and_holds_nothing_twice(arch):
    model = _tiny(arch)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.inference_mode():
        want = model(ids).logits
    before = sum(p.numel() for p in model.parameters())
    assert lay_end_to_end(model) == 2 * model.config.num_hidden_layers
    for group in _groups(model):
        assert laid_end_to_end([lin.weight for lin in group])
        if group[0].bias is not None:
            assert laid_end_to_end([lin.bias for lin in group])
        assert LinearCalls.of(group) is not None
    # one storage per group: the parameters' own count is unchanged, their storages are shared
    assert sum(p.numel() for p in model.parameters()) == before
    q = model.model.layers[0].self_attn.q_proj.weight
    v = model.model.layers[0].self_attn.v_proj.weight
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    assert lay_end_to_end(model) == 2 * model.config.num_hidden_layers   # again: nothing moves
    assert model.model.layers[0].self_attn.q_proj.weight is q


@pytest.mark.parametrize("arch", ARCHS)
def test_across_gives_each_layers_output_transposed_as_a_contiguous_block(arch):
    """LinearCalls.across (``AGILE_RAG_GATE_UP=across``, a decode step's by default): the
    group's outputs for several rows, transposed, one layer's block after the other's, each
    block contiguous; biases (Qwen2's q/k/v) added; None for layers that are not laid end to
    end."""
    model = _tiny(arch)
    qkv = [model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj,
           model.model.layers[0].self_attn.v_proj]
    mlp = model.model.layers[1].mlp
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    lay_end_to_end(model)
    for group in (qkv, [mlp.gate_proj, mlp.up_proj]):
        calls = LinearCalls.of(group)
        assert calls is not None
        with torch.inference_mode():
            t = calls.across(x)
            assert t is not None and t.shape == (calls.rows, 5)
            start = 0
            for lin in group:
                block = t[start:start + lin.out_features]
                assert block.is_contiguous()
                torch.testing.assert_close(block, lin(x).t(), rtol=1e-5, atol=1e-5)
                start += lin.out_features
    apart = LinearCalls(qkv)
    with torch.no_grad():
        qkv[1].weight = torch.nn.Parameter(qkv[1].weight.clone())    # no longer laid
    assert apart.across(x) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_the_lean_step_runs_each_group_as_one_matmul_and_computes_the_same(arch):
    model = _tiny(arch)
    plain = lean_decoder(model)
    assert isinstance(plain, LeanDecoder) and plain.linear == [None] * 3   # not laid: modules
    lay_end_to_end(model)
    fused = lean_decoder(model)
    assert isinstance(fused, LeanDecoder) and all(c is not None for c in fused.linear)
    same_steps(model, fused, 6, 2, (4, 0, 11))


def test_the_residency_keeps_the_layout_and_quantized_projections_are_left_alone():
    model = _tiny("Qwen2")
    lay_end_to_end(model)
    res = WeightResidency(model, pin=False)
    assert res.num_tensors > 0
    for group in _groups(model):                 # views of the flat buffer, still end to end
        assert LinearCalls.of(group) is not None
        assert group[0].weight.untyped_storage().data_ptr() == \
            res.host_buffer.untyped_storage().data_ptr()
    from agile_rag.actors.llm_int8 import quantize_int8
    other = _tiny("Llama")
    assert quantize_int8(other, torch.float32) > 0
    assert lay_end_to_end(other) == 0                   # int8 layers keep their own layout
    assert lean_decoder(other).linear == [None] * 3


def test_the_decode_body_keeps_the_lean_step_only_when_it_agrees(caplog):
    model = _tiny("Llama")
    lay_end_to_end(model)
    r, ref = _runner(model), _runner(model)
    ids, pos, rows = torch.tensor([[7], [3]]), torch.tensor([0, 5]), torch.arange(2)
    with torch.inference_mode():
        want = ref.forward(ids, pos, rows, 8)
        assert r.gpu_lean is False                      # off by default: transformers' step
        torch.testing.assert_close(r.decode_body(ids, pos, rows, 8), want)
        r.gpu_lean = None                               # wanted: tried at the first call
        got = r.decode_body(ids, pos, rows, 8)
    assert isinstance(r.gpu_lean, LeanDecoder)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    from agile_rag.actors import batch_runner
    real = batch_runner.lean_decoder

    class Broken(LeanDecoder):
        def __call__(self, *a, **k):
            return super().__call__(*a, **k) * 1.5
    batch_runner.lean_decoder = lambda m, fused_ops=None, rope_kv=False: Broken(m, real(m).rope)
    try:
        r2 = _runner(model)
        r2.gpu_lean = None
        with torch.inference_mode():
            got = r2.decode_body(ids, pos, rows, 8)
    finally:
        batch_runner.lean_decoder = real
    assert r2.gpu_lean is False and "differs" in caplog.text
    torch.testing.assert_close(got, want)


def test_the_setting_reaches_the_runner_and_a_change_drops_the_graphs():
    from agile_rag.actors.llm_batching import BatchEngine

    model = _tiny("Llama")

    class Tok:
        eos_token_id = 2
        pad_token_id = 0
    eng = BatchEngine(model, Tok(), gpu_lean=True)
    assert eng.settings.gpu_lean is True and eng.runner.gpu_lean is None
    eng.runner.graphs = object()                        # stands for a captured set
    eng._apply({"gpu_lean": True})                      # unchanged: the graphs stay
    assert eng.runner.graphs is not None
    eng._apply({"gpu_lean": False})
    assert eng.runner.gpu_lean is False and eng.runner.graphs is None
    eng.runner.graphs = object()
    eng._apply({"gpu_lean": True})
    assert eng.runner.gpu_lean is None and eng.runner.graphs is None
    assert BatchEngine(model, Tok()).runner.gpu_lean is False      # the default
