"""The lean decoder's elementwise steps in fewer kernels (actors/llm_elementwise.py, issue 15):
the rotary embedding in three kernels gives transformers' rotation; SiLU and product gives
torch's off a CUDA device (the one-kernel form is checked in tests/gpu)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from agile_rag.actors.llm_elementwise import rotate_signed, signed_sine, silu_mul, warm_silu_mul


def test_three_kernel_rotation_is_transformers_rotary_embedding():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 4, 1, 16, generator=g)          # 7 tokens, 4 heads
    k = torch.randn(7, 2, 1, 16, generator=g)
    angle = torch.randn(7, 1, 8, generator=g)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    signed = signed_sine(sin)
    assert torch.equal(signed[..., :8], -sin[..., :8])
    assert torch.equal(signed[..., 8:], sin[..., 8:])
    both = torch.cat([q, k], 1).squeeze(2)              # q's and k's heads side by side
    got = rotate_signed(both, cos, signed)
    torch.testing.assert_close(got[:, :4], want_q.squeeze(2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[:, 4:], want_k.squeeze(2), rtol=1e-6, atol=1e-6)
    assert torch.equal(both, torch.cat([q, k], 1).squeeze(2))   # the input untouched


def test_silu_and_product_off_a_gpu_is_torchs_and_leaves_its_inputs():
    g = torch.randn(5, 12)
    u = torch.randn(5, 12)
    g0, u0 = g.clone(), u.clone()
    torch.testing.assert_close(silu_mul(g, u), F.silu(g) * u)
    joint = torch.randn(5, 24)                           # strided views of one output
    torch.testing.assert_close(silu_mul(joint[:, :12], joint[:, 12:]),
                               F.silu(joint[:, :12]) * joint[:, 12:])
    assert torch.equal(g, g0) and torch.equal(u, u0)
    assert warm_silu_mul(torch.device("cpu"), torch.float32) is False   # nothing to compile


def test_the_lean_decoder_knows_a_silu_mlp_from_another():
    from transformers import LlamaConfig, LlamaForCausalLM

    from agile_rag.actors.llm_lean_decode import lean_decoder

    def lean(act: str):
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          hidden_act=act)
        return lean_decoder(LlamaForCausalLM(cfg).eval())

    assert lean("silu").act_silu is True            # transformers' SiLUActivation
    assert lean("gelu").act_silu is False
