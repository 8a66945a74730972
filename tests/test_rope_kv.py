"""A decode step's rotary embedding and KV write as one kernel (actors/llm_rope_kv.py, issue 15,
``llm_params.decode_rope_kv``): the torch form the kernel is checked against computes
transformers' rotation and ``index_put``'s write; the lean step that takes it gives
transformers' logits and leaves the same cache, step after step; off a GPU (no Triton, or a
CPU) nothing changes; the switch reaches the runner and drops its graphs. With Triton
installed, its interpreter runs the kernel itself on the CPU (the GPU's check:
tests/gpu/test_rope_kv_gpu.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_lean_decode import _tiny, same_steps
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from agile_rag.actors import llm_rope_kv
from agile_rag.actors.llm_lean_decode import LeanDecoder, lean_decoder


def _inputs(b: int, heads: int = 4, kv: int = 2, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(b, (heads + 2 * kv) * d, generator=g)
    angle = torch.randn(b, 1, d // 2, generator=g)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    keys, values = torch.randn(6, kv, 9, d, generator=g), torch.randn(6, kv, 9, d, generator=g)
    rows = torch.randperm(6, generator=g)[:b]
    pos = torch.randint(0, 9, (b,), generator=g)
    return y, cos, sin, keys, values, rows, pos


def test_the_torch_form_is_transformers_rotation_and_write():
    heads, kv, d = 4, 2, 16
    y, cos, sin, keys, values, rows, pos = _inputs(3)
    want_k, want_v = keys.clone(), values.clone()
    q = y[:, :heads * d].view(3, heads, 1, d)
    k = y[:, heads * d:(heads + kv) * d].view(3, kv, 1, d)
    want_q, rot_k = apply_rotary_pos_emb(q, k, cos, sin)
    want_k[rows, :, pos] = rot_k[:, :, 0]
    want_v[rows, :, pos] = y[:, (heads + kv) * d:].view(3, kv, d)
    got = llm_rope_kv.reference(y, cos, sin, keys, values, rows, pos, heads, kv, d)
    torch.testing.assert_close(got, want_q[:, :, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(keys, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(values, want_v)                 # the rest of the cache untouched


@pytest.mark.parametrize("arch", ["Llama", "Qwen2"])
def test_a_lean_step_that_stores_in_one_kernel_computes_transformers_step(arch, monkeypatch):
    """The fused step with ``rope_kv`` (the kernel stood in for by its torch form, which the
    GPU checks it against): no rotation matrix, no ``update``; the same logits and the same
    keys and values as transformers' step, step after step."""
    import agile_rag.actors.llm_lean_decode as lean_mod

    def not_here(*a, **kw):
        raise AssertionError("the step took the three kernels' path")

    calls = []

    def stand_in(*a):
        calls.append(a[0].shape[0])
        return llm_rope_kv.reference(*a)

    model = _tiny(arch, hidden_size=128)                 # 8 heads of 16
    from agile_rag.actors.llm_fused import lay_end_to_end
    lay_end_to_end(model)
    monkeypatch.setattr(llm_rope_kv, "ready", lambda *a: True)
    monkeypatch.setattr(llm_rope_kv, "rope_store", stand_in)
    lean = lean_decoder(model, fused_ops=True, rope_kv=True)
    assert isinstance(lean, LeanDecoder) and lean.rope_kv and lean.joint_rope
    monkeypatch.setattr(lean_mod, "rotation", not_here)
    monkeypatch.setattr(lean_mod, "_rotate", not_here)
    same_steps(model, lean)
    assert calls and set(calls) == {3}                 # every layer of every step, 3 rows


def test_off_a_gpu_or_switched_off_the_step_keeps_its_kernels(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    llm_rope_kv._checked.pop((dev, torch.float32, 8, 2, 8), None)
    assert llm_rope_kv.ready(dev, torch.float32, 8, 2, 8) is False
    assert llm_rope_kv.checked(dev, torch.float32, 8, 2, 8)
    lean = lean_decoder(_tiny("Llama"), fused_ops=True, rope_kv=True)
    same_steps(_tiny("Llama"), lean, steps=3)       # the three kernels: still transformers'


def test_the_kernel_takes_only_the_layouts_it_reads():
    y, cos, sin, keys, values, rows, pos = _inputs(2)
    assert llm_rope_kv.fits(y, cos) and llm_rope_kv.takes(keys, values, 16)
    assert not llm_rope_kv.fits(y[:, ::2], cos)                              # strided inside
    assert not llm_rope_kv.takes(keys.transpose(2, 3), values.transpose(2, 3), 16)
    assert not llm_rope_kv.takes(keys, values.half(), 16)
    assert not llm_rope_kv.takes(keys, values, 24)                          # not a power of 2


def test_the_switch_reaches_the_runner_and_drops_its_graphs():
    from transformers import LlamaConfig, LlamaForCausalLM

    from agile_rag.actors.llm_batching import BatchEngine

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()

    class Tok:
        eos_token_id = 0
        pad_token_id = 0

    engine = BatchEngine(model, Tok())
    assert engine.settings.decode_rope_kv is True and engine.runner.rope_kv is True  # default
    engine.runner.graphs = object()
    engine._apply({"decode_rope_kv": False})
    assert engine.runner.rope_kv is False and engine.runner.graphs is None
    engine.runner.graphs = object()
    engine._apply({"decode_rope_kv": True})
    assert engine.runner.rope_kv is True and engine.runner.graphs is None
    engine.runner.graphs = marker = object()
    engine._apply({"max_batch": 8})                   # another setting: the graphs stay
    assert engine.runner.graphs is marker


def test_llm_params_leave_it_on_unless_false():
    from agile_rag.actors.llm_actor import LLMActor

    class Spec:
        idle_on_cpu = False
        device = "cuda"

    actor = LLMActor.__new__(LLMActor)
    actor.params, actor.spec, actor.context_length = {}, Spec(), 2048
    assert actor._batch_settings()["decode_rope_kv"] is True       # the default: on
    actor.params = {"decode_rope_kv": False}
    assert actor._batch_settings()["decode_rope_kv"] is False


HERE = os.path.dirname(os.path.abspath(__file__))
_INTERPRETED = textwrap.dedent("""
    import torch
    from agile_rag.actors import llm_rope_kv as rk
    from test_rope_kv import _inputs
    assert rk.ready(torch.device("cpu"), torch.float32, 4, 2, 16)
    for b in (1, 5):
        mine = _inputs(b, seed=b)
        theirs = [t.clone() for t in mine]
        q = rk.rope_store(*mine, 4, 2, 16)
        want = rk.reference(*theirs, 4, 2, 16)
        assert torch.equal(q, want)
        assert torch.equal(mine[3], theirs[3]) and torch.equal(mine[4], theirs[4])
    from test_lean_decode import _tiny, same_steps
    from agile_rag.actors.llm_fused import lay_end_to_end
    from agile_rag.actors.llm_lean_decode import lean_decoder
    assert rk.ready(torch.device("cpu"), torch.float32, 8, 2, 16)   # the tiny model's heads
    calls = []
    kernel = rk.rope_store
    rk.rope_store = lambda *a: calls.append(1) or kernel(*a)
    model = _tiny("Qwen2", hidden_size=128)
    lay_end_to_end(model)
    same_steps(model, lean_decoder(model, fused_ops=True, rope_kv=True), steps=3)
    assert len(calls) == 3 * model.config.num_hidden_layers, calls
    print("ok")
""")


def test_the_kernel_itself_in_tritons_interpreter():
    """Triton's interpreter runs the kernel on the CPU: what it returns and writes is its torch
    form's, to the bit (float32), its load check passes, and a lean step through it gives
    transformers' logits and cache. Skipped without Triton (torch's CPU wheels do not bring
    it)."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-c", _INTERPRETED],
                         env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
                             [HERE, os.environ.get("PYTHONPATH", "")])},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


async def test_a_served_burst_says_the_same_words_through_the_one_kernel_store(monkeypatch):
    """SmolLM2 (9 query heads, 3 KV heads of 64) behind the LLM actor with
    ``decode_rope_kv: true``: its lean step (the fused operations forced on this CPU, the
    q/k/v weights laid end to end as a GPU's load lays them, the kernel stood in for by its
    torch form) stores every layer's keys and values through the
    KV rectangle's ``rope_store``, and a burst of chats says what the three kernels say."""
    import asyncio

    from agile_rag.actors.llm_actor import LLMActor
    from agile_rag.actors.llm_fused import lay_end_to_end
    from agile_rag.actors.messages import Chat, Describe
    from agile_rag.runtime.liveconfig import ModelSpec, resolve_path
    from agile_rag.runtime.system import ActorSystem

    from support import CACHE, ROOT, SMOLLM

    calls = []

    def stand_in(*a):
        calls.append(a[0].shape[0])
        return llm_rope_kv.reference(*a)

    monkeypatch.setattr(llm_rope_kv, "ready", lambda *a: True)
    monkeypatch.setattr(llm_rope_kv, "rope_store", stand_in)
    system = ActorSystem()
    path = resolve_path(SMOLLM, ROOT)
    actor = LLMActor(ModelSpec("llm", "smollm2", path, path, device="cpu", max_tokens=2048,
                               dtype="float32"),
                     {"default_temp": 0, "decode_rope_kv": True}, cache_dir=CACHE)
    system.spawn(actor)
    try:
        assert (await actor.ask(Describe(), timeout=300)).state == "ready"
        runner = actor.engine.runner
        assert runner.rope_kv is True
        layers = actor.model.config.num_hidden_layers
        assert lay_end_to_end(actor.model) == 2 * layers     # as a GPU's load lays them

        async def burst() -> list[str]:
            runner.lean_fused_ops, runner.lean = True, None   # made again at the next step
            prompts = ["What is the capital of France?", "Write a poem about the sea.",
                       "Count from 1 to 20.", "Name three colours."]
            outs = await asyncio.gather(*(actor.ask(Chat(
                messages=[{"role": "user", "content": p}], max_tokens=10), timeout=300)
                for p in prompts))
            return [o.text for o in outs]

        got = await burst()
        assert isinstance(runner.lean, LeanDecoder) and runner.lean.rope_kv
        assert len(calls) >= layers * 9 and len(calls) % layers == 0, len(calls)
        runner.rope_kv = False
        want = await burst()
        assert not runner.lean.rope_kv
        assert got == want and all(got)
    finally:
        await system.stop_all()


def test_switched_on_without_triton_it_says_so_and_keeps_the_three_kernels(monkeypatch, caplog):
    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(llm_rope_kv, "_kernel", None)
    monkeypatch.setattr(llm_rope_kv, "_checked", {})
    monkeypatch.setattr(llm_rope_kv, "_make_kernel", no_triton)
    with caplog.at_level("INFO", logger="agile_rag.llm"):
        assert llm_rope_kv.ready(torch.device("cuda"), torch.float16, 16, 2, 128) is False
    assert "decode_rope_kv: no Triton here" in caplog.text


def test_heads_the_kernel_does_not_take_keep_the_three_kernels(monkeypatch):
    """A head size the kernel does not take (8 here; 80 or 96 in some models): the step keeps
    its three kernels, not the kernel's slower torch form, and still computes transformers'
    step."""
    from agile_rag.actors.llm_fused import lay_end_to_end

    def not_here(*a, **kw):
        raise AssertionError("the torch form stood in for the three kernels")

    monkeypatch.setattr(llm_rope_kv, "ready", lambda *a: True)
    monkeypatch.setattr(llm_rope_kv, "reference", not_here)
    monkeypatch.setattr(llm_rope_kv, "rope_store", not_here)
    model = _tiny("Qwen2")                                  # 8 heads of 8
    lay_end_to_end(model)
    lean = lean_decoder(model, fused_ops=True, rope_kv=True)
    assert lean.head_dim == 8 and lean.rope_kv
    same_steps(model, lean, steps=3)


def test_a_kernel_that_fails_its_check_is_not_used_and_said_once(monkeypatch, caplog):
    """An old GPU whose Triton cannot build the kernel (or a kernel that raises): ``ready``
    says so in one warning, answers False, and keeps that answer (the step keeps its three
    kernels), now that the switch is on by default."""
    calls = []

    def broken(*a):
        calls.append(a)
        raise RuntimeError("no kernel for this GPU (test)")

    monkeypatch.setattr(llm_rope_kv, "_kernel", object())       # Triton "there"
    monkeypatch.setattr(llm_rope_kv, "_checked", {})
    monkeypatch.setattr(llm_rope_kv, "_check", broken)
    with caplog.at_level("WARNING", logger="agile_rag.llm"):
        for _ in range(3):
            assert llm_rope_kv.ready(torch.device("cuda"), torch.float16, 16, 2, 128) is False
    assert len(calls) == 1
    warned = [r for r in caplog.records if "rotary-and-KV-write" in r.getMessage()]
    assert len(warned) == 1 and "failed its check" in warned[0].getMessage()
    assert "three kernels" in warned[0].getMessage()
