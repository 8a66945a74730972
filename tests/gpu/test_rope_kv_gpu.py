"""The decode step's rotary embedding and KV write as one Triton kernel on a GPU
(actors/llm_rope_kv.py, issue 15, ``llm_params.decode_rope_kv``): it compiles and passes its
check for the heads of the models this project serves, computes its torch form for a 32-row
step, and decode graphs captured with it replay it and say the words the three kernels say."""
from __future__ import annotations

import asyncio

import pytest
import torch
from test_chat_graphs_gpu import graph_kernels, half_burst
from test_model_actors_gpu import build_tiny_llm

from agile_rag.actors import llm_rope_kv
from agile_rag.actors.llm_lean_decode import LeanDecoder

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv,d", [(16, 2, 128), (9, 3, 64), (4, 4, 64)])
def test_the_kernel_is_checked_and_computes_its_torch_form(dtype, heads, kv, d):
    dev = torch.device("cuda")
    assert llm_rope_kv.ready(dev, dtype, heads, kv, d)
    g = torch.Generator(device=dev).manual_seed(0)
    b = 32
    y = torch.randn((b, (heads + 2 * kv) * d), generator=g, device=dev).to(dtype)
    angle = torch.rand((b, 1, d // 2), generator=g, device=dev) * 300
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(dtype)
    mine = [torch.randn((40, kv, 700, d), generator=g, device=dev).to(dtype) for _ in range(2)]
    theirs = [t.clone() for t in mine]
    rows = torch.randperm(40, generator=g, device=dev)[:b]
    pos = torch.randint(0, 700, (b,), generator=g, device=dev)
    q = llm_rope_kv.rope_store(y, cos, sin, *mine, rows, pos, heads, kv, d)
    want = llm_rope_kv.reference(y, cos, sin, *theirs, rows, pos, heads, kv, d)
    torch.testing.assert_close(q, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-2, atol=1e-2)
    assert torch.equal(mine[1], theirs[1])


def test_decode_graphs_with_the_one_kernel_say_the_same_words(tmp_path):
    """``decode_rope_kv`` (on by default): the lean step captured in the decode graphs stores
    through the Triton kernel (its replay runs it, and one index kernel fewer a layer at
    least), and the burst's words are those of the three kernels (``decode_rope_kv: false``)."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=256, max_positions=1024,
                            words_only=True)

    def look(runner):
        lean = runner.gpu_lean
        return graph_kernels(runner), isinstance(lean, LeanDecoder) and lean.rope_kv

    want, (plain, off) = asyncio.run(half_burst(folder, {"decode_rope_kv": False}, look))
    got, (kernels, on) = asyncio.run(half_burst(folder, {}, look))
    assert (off, on) == (False, True)
    assert not any("rope_kv" in k for k in plain)
    assert any("rope_kv" in k for k in kernels), sorted(kernels)

    def index_kernels(ks):
        return sum(n for k, n in ks.items() if "index" in k.lower())
    assert index_kernels(kernels) < index_kernels(plain), (plain, kernels)
    assert got == want


def test_a_capture_that_fails_with_the_kernel_is_captured_without_it(tmp_path, monkeypatch):
    """Should a decode graph's capture fail with the kernel in it, the graphs are captured
    without it (the three kernels), not dropped: still graphs, and the same words."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=256, max_positions=1024,
                            words_only=True)
    real = llm_rope_kv.rope_store

    def fails_in_a_capture(*a):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("no capture here (test)")
        return real(*a)

    def look(runner):
        lean = runner.gpu_lean
        return (runner.cuda_graphs, runner.graphs is not None and len(runner.graphs.graphs),
                runner.rope_kv, isinstance(lean, LeanDecoder) and lean.rope_kv)

    want, _ = asyncio.run(half_burst(folder, {"decode_rope_kv": False}, look))
    monkeypatch.setattr(llm_rope_kv, "rope_store", fails_in_a_capture)
    got, (graphs_on, captured, rope_kv, lean_stores) = asyncio.run(
        half_burst(folder, {"decode_rope_kv": True}, look))
    assert graphs_on and captured and not rope_kv and not lean_stores
    assert got == want
