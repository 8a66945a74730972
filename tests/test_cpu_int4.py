"""Int4 weight-only layers (issue 17, actors/llm_int4.py): the packed layout read back exactly,
the CPU kernel and the unpacked matmul (any other device, a prefill) computing the same, a
Q4_1-like weight kept exactly, only the layers a GGUF keeps in 4 bits made int4, and SmolLM2
answering through them and through a residency."""
from __future__ import annotations

import pytest
import torch
from test_cpu_weights import NATIVE_BF16, layer_bytes, paris, start, through_a_residency

from agile_rag.actors.llm_int4 import (
    GROUP,
    INT4_ROWS,
    LAYOUTS,
    Int4Linear,
    gguf_four_bit,
    int4_layers,
    kernel_layout,
    quantize_int4,
    unpack,
)
from agile_rag.actors.llm_int8 import int8_layers
from agile_rag.runtime.liveconfig import resolve_path

from support import ROOT, SMOLLM, tiny_llama


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (1536, 576), (576, 1536)])
def test_unpack_reads_back_what_the_kernel_packer_packed(shape):
    """torch packs by the CPU's vector width (64-row blocks on AVX-512, 32 on AVX2: CI's
    machines have had both); the layout found on this one reads every shape back."""
    assert kernel_layout() in LAYOUTS
    q = torch.randint(0, 16, shape, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack(packed).to(torch.int32), q)


def q4_1_weight(n: int, k: int) -> torch.Tensor:
    """A weight as a Q4_1 file holds it: per 32 inputs, 16 levels d * q + m, each group using
    its lowest and highest level."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(n, k // GROUP, 1, generator=g) * 0.01 + 0.001
    m = torch.randn(n, k // GROUP, 1, generator=g) * 0.05
    return (q * d + m).reshape(n, k)


def test_a_q4_1_weight_is_kept_exactly_and_both_paths_agree():
    lin = torch.nn.Linear(576, 1536, bias=True)
    with torch.no_grad():
        lin.weight.copy_(q4_1_weight(1536, 576))
    lay = Int4Linear.from_linear(lin)
    assert lay.packed.numel() == 1536 * 576 // 2              # half a byte per weight
    w = lay.dequantized(torch.float32)
    # the grid comes back up to the scales' bfloat16 rounding
    assert (w - lin.weight).abs().max() < 0.01 * lin.weight.abs().max()
    x = torch.randn(3, 576)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    kernel = lay(x.to(torch.bfloat16)).float()                 # few rows: the CPU kernel
    unpacked = lay(x.expand(INT4_ROWS + 1, 3, 576)).float()[0]  # many rows: unpack + matmul
    scale = want.abs().max()
    assert (kernel - want).abs().max() < 0.03 * scale
    assert (unpacked - want).abs().max() < 0.03 * scale
    assert (kernel - unpacked).abs().max() < 0.03 * scale


def test_quantize_int4_leaves_the_head_and_what_does_not_fit():
    model = tiny_llama(hidden=64, vocab=300, tie=True)
    n = quantize_int4(model)
    fours = int4_layers(model)
    assert n == len(fours) > 0
    assert isinstance(model.lm_head, torch.nn.Linear)          # the head is never int4
    for lay in fours:
        assert lay.out_features % kernel_layout()[0] == 0 and lay.in_features % GROUP == 0
    only = quantize_int4(tiny_llama(hidden=64, vocab=300), only={"up_proj"})
    assert only == 2                                            # one per layer, two layers


def test_the_shipped_gguf_keeps_its_decoder_layers_in_four_bits():
    assert gguf_four_bit(resolve_path(SMOLLM, ROOT)) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert gguf_four_bit("/nonexistent.gguf") == set()


async def test_int4_weights_go_through_a_residency_and_answer_the_same():
    """weight_quant int4 on a model that may move (a residency: the double that keeps them on
    the CPU): the packed layers are buffers the residency moves; Paris, twice the same."""
    names = await through_a_residency("int4", int4=210, int8=1)
    assert "model.layers.0.mlp.up_proj.packed" in names


@pytest.mark.skipif(not NATIVE_BF16, reason="the default is int4 only with native bfloat16")
async def test_the_default_decoder_layers_take_about_half_the_int8_bytes():
    four, s4 = await start({})
    try:
        bytes4 = layer_bytes(int4_layers(four.model))
        assert "Paris" in (await four.ask(paris(), timeout=300)).text
    finally:
        await s4.stop_all()
    eight, s8 = await start({"weight_quant": "int8"})
    try:
        bytes8 = layer_bytes(lay for lay in int8_layers(eight.model)
                             if lay is not eight.model.lm_head)
        # half a byte per weight and a bfloat16 scale and offset per 32: 0.625 of int8's
        assert bytes4 < 0.65 * bytes8, (bytes4, bytes8)
        assert eight.weight_bytes - four.weight_bytes > 35 * 2**20        # ~38 MiB
    finally:
        await s8.stop_all()
