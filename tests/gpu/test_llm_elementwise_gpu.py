"""SiLU and product as one jiterator kernel on a GPU (actors/llm_elementwise.py, issue 15): it
compiles for every layout the lean decoder gives it, matches torch's two kernels, and a lean
prefill pass with it (and the three-kernel rotation) agrees with transformers' forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from agile_rag.actors.llm_elementwise import silu_mul, warm_silu_mul
from agile_rag.actors.llm_fused import lay_end_to_end
from agile_rag.actors.llm_lean_decode import agrees, lean_decoder


def test_one_kernel_silu_and_product_matches_torchs_on_every_layout():
    dev = torch.device("cuda")
    assert warm_silu_mul(dev, torch.float16)
    assert warm_silu_mul(dev, torch.bfloat16)
    y = torch.randn(300, 2 * 1000, device=dev, dtype=torch.float16)
    for g, u in [(y[:, :1000], y[:, 1000:]),                     # strided views
                 (y[:150].contiguous(), y[150:].contiguous()),    # contiguous
                 (y.view(-1)[3:9003], y.view(-1)[10001:19001])]:  # unaligned
        got = silu_mul(g, u)
        want = F.silu(g.float()) * u.float()
        assert got.dtype == torch.float16 and got.shape == g.shape
        torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def test_a_lean_prefill_pass_with_the_fused_kernels_agrees_with_transformers():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704,
                      num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)
    assert lay_end_to_end(model) == 6                  # q/k/v and gate/up of each layer
    lean = lean_decoder(model)
    assert lean is not None and lean.rotate_signed
    ids = torch.randint(0, 512, (3, 96), device="cuda")
    kept = {}
    with torch.inference_mode():
        got = lean.prefill(ids, torch.tensor([95, 95, 95]), lambda i, k, v: kept.update({i: k}))
        want = model(input_ids=ids).logits[:, -1, :]
    assert lean.product_ok.get((ids.device, torch.float16)) is True   # the one kernel in use
    assert agrees(got, want), (got - want).abs().max()
    assert set(kept) == {0, 1, 2}
