"""actors/llm_lean_decode.py: the CPU's lean decode step computes what transformers' step
computes over the batch runner's KV cache (Llama with grouped-query attention, Qwen2 with q/k/v
biases), several rows at different positions, step after step; models whose layers are not
exactly that get no lean step; the batch runner keeps it only when its first step agrees."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agile_rag.actors.batch_runner import BatchRunner
from agile_rag.actors.kv_slots import make_slot_cache
from agile_rag.actors.llm_lean_decode import LeanDecoder, agrees, lean_decoder


def _tiny(arch: str, **shape):
    """A tiny random ``arch`` model (``shape``: config fields over the defaults below)."""
    import transformers
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    kw.update(shape)
    cfg = getattr(transformers, arch + "Config")(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = getattr(transformers, arch + "ForCausalLM")(cfg).eval()
    if arch == "Qwen2":                        # biases on q/k/v: make them matter
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(p.bias, std=0.5)
    return model


def random_steps(n: int, seed: int, start: list[int]):
    """``n`` decode steps of rows that start at different positions: (ids, pos, rows, view)
    each, random tokens."""
    g = torch.Generator().manual_seed(seed)
    first = torch.tensor(start)
    for step in range(n):
        ids = torch.randint(0, 300, (len(start),), generator=g)
        pos = first + step
        yield ids, pos, torch.arange(len(start)), int(pos.max()) + 1


def _runner(model):
    r = BatchRunner(model, pad=0)
    r.cache = make_slot_cache(model.config.num_hidden_layers, 4, r.kv_heads, 64, r.head_dim,
                              torch.float32, torch.device("cpu"))
    return r


def same_steps(model, lean, steps: int = 12, seed: int = 1, start=(3, 9, 0)) -> None:
    """``lean``'s decode steps of rows at different positions give transformers' logits (and
    the same choice), step after step, and leave the same keys and values in the cache."""
    full, mine = _runner(model), _runner(model)
    mine.lean = lean
    with torch.inference_mode():
        for ids, pos, rows, view in random_steps(steps, seed, list(start)):
            want = full.forward(ids[:, None], pos, rows, view)
            got = mine._lean_run(ids, pos, rows, view)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert agrees(got, want)
        for a, b in zip(full.cache.keys + full.cache.values, mine.cache.keys + mine.cache.values):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,sdpa_keys", [("Llama", 256), ("Qwen2", 256), ("Llama", 0)])
def test_the_lean_step_computes_transformers_step(arch, sdpa_keys, monkeypatch):
    """(sdpa_keys 0: every view attends through the two-matmul path, as long views do)"""
    import agile_rag.actors.llm_lean_decode as lean_mod
    monkeypatch.setattr(lean_mod, "SDPA_KEYS", sdpa_keys)
    model = _tiny(arch)
    lean = lean_decoder(model)
    assert isinstance(lean, LeanDecoder)
    same_steps(model, lean)


@pytest.mark.parametrize("arch", ["Llama", "Qwen2"])
@pytest.mark.parametrize("form", ["joint", "across", "apart"])
def test_the_fused_gpu_ops_compute_transformers_step(arch, form, monkeypatch):
    """LeanDecoder.fused_ops (on a GPU by default; forced here on the CPU, float32): one
    rms_norm call with its weight, q and k rotated by one batched matmul, SDPA at every view
    length, the output and down projections added into the residual by addmm_, gate and up
    each way ``AGILE_RAG_GATE_UP`` names (``joint``: one matmul, split; ``across``: that
    matmul transposed; ``apart``: two matmuls): the same logits and the same keys and values
    as transformers' step, step after step."""
    import agile_rag.actors.llm_lean_decode as lean_mod
    from agile_rag.actors.llm_fused import LinearCalls, lay_end_to_end

    def not_here(*a, **kw):
        raise AssertionError("the fused step took the unfused path")
    monkeypatch.setattr(lean_mod, "SDPA_KEYS", 0)            # long views: SDPA all the same
    monkeypatch.setattr(lean_mod, "grouped_decode_attention", not_here)
    model = _tiny(arch)
    assert lay_end_to_end(model) == 2 * model.config.num_hidden_layers
    monkeypatch.setenv("AGILE_RAG_GATE_UP", form)
    lean = lean_decoder(model, fused_ops=True)
    assert isinstance(lean, LeanDecoder) and lean.joint_rope and lean.gate_up == form
    if form != "joint":                              # gate and up are not split
        monkeypatch.setattr(LinearCalls, "__call__", not_here)
    if form != "across":
        monkeypatch.setattr(LinearCalls, "across", not_here)
    monkeypatch.setattr(lean_mod, "_rotate", not_here)       # q and k: the rotation matrix
    monkeypatch.setattr(lean_mod, "_rms", not_here)
    assert all(c is not None for c in lean.linear)
    same_steps(model, lean)


def test_gate_and_up_take_the_form_that_suits_the_rows(monkeypatch, caplog):
    """``auto`` (the default): one matmul for a few rows, transposed for a decode batch, two
    matmuls for a prefill's tokens; ``AGILE_RAG_GATE_UP`` names one form for every pass, and
    an unknown name is logged and taken as auto."""
    import agile_rag.actors.llm_lean_decode as lean_mod

    monkeypatch.delenv("AGILE_RAG_GATE_UP", raising=False)
    lean = lean_decoder(_tiny("Qwen2"), fused_ops=True)
    assert lean.gate_up == "auto"
    assert [lean.gate_up_form(r) for r in (1, 4, lean_mod.ACROSS_ROWS, 32, lean_mod.APART_ROWS,
                                           lean_mod.APART_ROWS + 1, 4000)] == \
        ["joint", "joint", "across", "across", "across", "apart", "apart"]
    monkeypatch.setenv("AGILE_RAG_GATE_UP", "apart")
    assert lean_mod.gate_up_setting() == "apart"
    monkeypatch.setenv("AGILE_RAG_GATE_UP", "sideways")
    with caplog.at_level("WARNING", logger="agile_rag.llm"):
        assert lean_mod.gate_up_setting() == "auto"
    assert "AGILE_RAG_GATE_UP=sideways" in caplog.text


def test_the_rotation_matrix_rotates_as_transformers_rotary_does():
    """rotation(cos, sin): x @ M[b] is x * cos + rotate_half(x) * sin, row by row."""
    from agile_rag.actors.llm_lean_decode import _rotate, rotation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    angles = torch.randn(3, 1, 16, generator=g)
    cos, sin = angles.cos(), angles.sin()
    torch.testing.assert_close(torch.bmm(x, rotation(cos, sin)), _rotate(x, cos, sin),
                               rtol=1e-6, atol=1e-6)


def test_models_whose_layers_differ_get_no_lean_step():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)).eval()
    assert lean_decoder(qwen3) is None           # q_norm / k_norm in its attention
    assert lean_decoder(gpt2) is None
    llama = _tiny("Llama")
    llama.model.layers[1].mlp.extra = torch.nn.Identity()   # a module the step would skip
    assert lean_decoder(llama) is None


def test_agrees_needs_the_same_choice_or_a_tie():
    a = torch.tensor([[1.0, 5.0, 2.0]], dtype=torch.bfloat16)
    assert agrees(a, a.clone())
    assert not agrees(torch.tensor([[1.0, 2.0, 5.0]], dtype=torch.bfloat16), a)
    assert agrees(torch.tensor([[1.0, 5.0, 5.06]], dtype=torch.bfloat16),
                  torch.tensor([[1.0, 5.06, 5.0]], dtype=torch.bfloat16))   # a near tie


def test_the_runner_drops_a_lean_step_that_disagrees(caplog):
    """The first CPU step runs both; a lean step that differs (here: a broken one) is
    dropped for transformers' step, which gives that step's logits."""
    model = _tiny("Llama")
    r = _runner(model)
    real = lean_decoder
    from agile_rag.actors import batch_runner

    class Broken(LeanDecoder):
        def __call__(self, *a, **k):
            return super().__call__(*a, **k) * 1.5
    batch_runner.lean_decoder = lambda m, fused_ops=None, rope_kv=False: Broken(m, real(m).rope)
    try:
        with torch.inference_mode():
            ids, pos = torch.tensor([7]), torch.tensor([0])
            stats: dict = {}
            got = r._lean_step(ids, pos, 64, stats)
            want = _runner(model).forward(ids[:, None], pos, torch.arange(1), 64)
    finally:
        batch_runner.lean_decoder = real
    assert r.lean is False and stats["lean_decode"] == "off"
    torch.testing.assert_close(got, want)
    assert "differs" in caplog.text


def test_llm_params_lean_decode_false_keeps_transformers_step():
    """``llm_params.lean_decode: false`` (a setting, changed live like the others)."""
    from types import SimpleNamespace

    from agile_rag.actors.llm_batching import BatchEngine, _settings

    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    engine = BatchEngine(_tiny("Llama"), tok, lean_decode=False)
    assert engine.runner.lean is False
    engine._apply({"lean_decode": True})
    assert engine.runner.lean is None            # tried again at the next CPU step
    assert _settings(engine.planner.settings, {"lean_decode": 0}).lean_decode is False


@pytest.mark.parametrize("arch,joint", [("Llama", True), ("Qwen2", True), ("Llama", False)])
def test_int4_projections_run_as_one_kernel_call_each_and_compute_the_same(arch, joint):
    """bfloat16 with int4 projections (the server's CPU default): q/k/v and gate/up run as one
    kernel call each, over the layers' own packed weights (now views of one buffer), and give
    exactly what the modules give, step after step; the step still agrees with transformers'.
    (joint: q's and k's heads rotated in one go, as the model's rotary function does them.)"""
    from agile_rag.actors.llm_int4 import Int4Linear, quantize_int4
    from agile_rag.actors.llm_lean_decode import Int4Calls

    # shapes the int4 kernel takes (outputs in blocks of 64, inputs in groups of 32)
    model = _tiny(arch, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1).to(torch.bfloat16)
    cfg = model.config
    assert quantize_int4(model) == 2 * 7
    fused = lean_decoder(model)
    plain = lean_decoder(model)
    assert isinstance(fused, LeanDecoder) and isinstance(plain, LeanDecoder)
    assert all(c is not None for c in fused.int4)
    assert fused.joint_rope                           # Llama's and Qwen2's rotary: rotate_half
    fused.joint_rope = joint
    attn = model.model.layers[0].self_attn
    qkv = fused.int4[0][0]
    assert isinstance(qkv, Int4Calls) and isinstance(attn.k_proj, Int4Linear)
    for lean in (fused, plain):                        # a second decoder made no new buffer
        assert attn.k_proj.packed.untyped_storage().data_ptr() == \
            lean.int4[0][0].packed.untyped_storage().data_ptr()   # views: held once
    plain.int4 = [None] * len(plain.int4)          # the modules' own forward

    def runner(lean):
        r = BatchRunner(model, pad=0)
        r.cache = make_slot_cache(cfg.num_hidden_layers, 4, r.kv_heads, 64, r.head_dim,
                                  torch.bfloat16, torch.device("cpu"))
        r.lean = lean
        return r

    a, b, full = runner(fused), runner(plain), runner(None)
    with torch.inference_mode():
        for ids, pos, rows, view in random_steps(8, 1, [3, 9, 0]):
            got = a._lean_run(ids, pos, rows, view)
            assert torch.equal(got, b._lean_run(ids, pos, rows, view))
            assert agrees(got, full.forward(ids[:, None], pos, rows, view))


@pytest.mark.parametrize("arch,fused", [("Llama", None), ("Qwen2", None), ("Qwen2", True)])
def test_a_lean_chunk_computes_transformers_chunk(arch, fused):
    """LeanDecoder.chunk: 13 tokens read after 27 already in a chunked prefill's cache (the
    question after a stored prefix) give transformers' last logits and write its keys and
    values, grouped-query heads and all (fused: with the fused small operations a GPU takes,
    forced here, over projections laid end to end)."""
    from agile_rag.actors.batch_runner import _dynamic_layer
    from agile_rag.actors.kv_chunk import chunk_cache
    from agile_rag.actors.llm_fused import lay_end_to_end

    model = _tiny(arch)
    if fused:
        assert lay_end_to_end(model) == 2 * model.config.num_hidden_layers
    lean = lean_decoder(model, fused_ops=fused)
    assert isinstance(lean, LeanDecoder)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)
    theirs, mine, quiet = chunk_cache(3, 40), chunk_cache(3, 40), chunk_cache(3, 40)
    with torch.inference_mode():
        for kv in (theirs, mine, quiet):
            model(input_ids=ids[:, :27], position_ids=pos[None, :27], past_key_values=kv,
                  use_cache=True)
        want = model(input_ids=ids[:, 27:], position_ids=pos[None, 27:],
                     past_key_values=theirs, use_cache=True).logits[:, -1, :]
        got = lean.chunk(ids[:, 27:], pos[27:], mine)
        # a chunk that does not finish the prompt: its keys and values only
        assert lean.chunk(ids[:, 27:], pos[27:], quiet, logits=False) is None
        assert torch.equal(_dynamic_layer(quiet, 2)[0], _dynamic_layer(mine, 2)[0])
    assert got is not None and got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    for layer in range(3):
        for a, b in zip(_dynamic_layer(theirs, layer), _dynamic_layer(mine, layer)):
            assert a.shape == b.shape == (1, 2, 40, 8)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_lean_chunk_takes_attention_output_laid_out_as_a_gpu_kernel_lays_it(monkeypatch):
    """A GPU's memory-efficient and flash SDPA kernels return their output with the heads
    and the queries' dimensions swapped underneath (not contiguous); the chunk read it with
    ``view`` and failed on every GPU (the 3B benchmark's chunks all went through
    transformers, found on the H200 in session 11). Here the CPU's kernel is wrapped to
    return that layout: the chunk still gives transformers' logits."""
    import agile_rag.actors.llm_lean_decode as lean_mod
    from agile_rag.actors.kv_chunk import chunk_cache

    sdpa = F.scaled_dot_product_attention

    def gpu_layout(*args, **kwargs):
        out = sdpa(*args, **kwargs)                     # [B, H, L, D] values, stored as
        return out.transpose(1, 2).contiguous().transpose(1, 2)   # [B, L, H, D]

    model = _tiny("Qwen2")
    lean = lean_decoder(model)
    assert isinstance(lean, LeanDecoder)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(20)
    theirs, mine = chunk_cache(3, 20), chunk_cache(3, 20)
    with torch.inference_mode():
        for kv in (theirs, mine):
            model(input_ids=ids[:, :12], position_ids=pos[None, :12], past_key_values=kv,
                  use_cache=True)
        want = model(input_ids=ids[:, 12:], position_ids=pos[None, 12:],
                     past_key_values=theirs, use_cache=True).logits[:, -1, :]
        monkeypatch.setattr(lean_mod.F, "scaled_dot_product_attention", gpu_layout)
        got = lean.chunk(ids[:, 12:], pos[12:], mine)
    assert got is not None
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


def test_the_runner_reads_short_chunks_leanly_only_when_they_agree(caplog):
    """Chunks of up to LEAN_CHUNK_TOKENS go through the decode step's lean decoder once its
    chunk agreed with transformers' (checked once per runner: a decoder made again after the
    weights moved is not checked again); a decoder whose chunk differs is not used for chunks
    and the warning says what differed; a longer chunk is transformers'."""
    from agile_rag.actors.batch_runner import LEAN_CHUNK_TOKENS

    model = _tiny("Qwen2")
    r = _runner(model)
    assert r._chunk_lean(8) is None               # no lean decode step decided yet
    r.check_lean_chunk()
    assert r.lean_chunk_ok is None                # nothing to compare yet
    r.lean = lean_decoder(model)
    r.check_lean_chunk()                          # a warm-up's end compares them
    assert r.lean_chunk_ok is True
    assert r._chunk_lean(8) is r.lean and r._chunk_lean(LEAN_CHUNK_TOKENS + 1) is None
    r.lean = again = lean_decoder(model)          # made again: not compared again
    assert r._chunk_lean(8) is again
    bad = lean_decoder(model)
    assert isinstance(bad, LeanDecoder)
    bad.chunk = lambda ids, pos, kv, logits=True: torch.zeros(1, 300)    # type: ignore
    r2 = _runner(model)
    r2.lean = bad
    with caplog.at_level("WARNING"):
        assert r2._chunk_lean(8) is None and r2._chunk_lean(8) is None
    said = [m for m in caplog.messages if "chunk differs" in m]
    assert len(said) == 1 and "logits: largest difference" in said[0], said
    assert r2.lean_chunk_ok is False


def test_lean_and_transformers_chunks_take_turns_over_one_cache():
    """A long prompt read in chunks: a short lean chunk between transformers' chunks leaves
    the cache as transformers' own would (its length, keys and values): the chunk after it
    gives transformers' logits."""
    from agile_rag.actors.kv_chunk import chunk_cache

    model = _tiny("Llama")
    lean = lean_decoder(model)
    assert isinstance(lean, LeanDecoder)
    ids = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(60)
    parts = [(0, 20), (20, 30), (30, 60)]
    outs = []
    for lean_middle in (False, True):
        kv = chunk_cache(3, 60)
        with torch.inference_mode():
            for i, (a, b) in enumerate(parts):
                if lean_middle and i == 1:
                    lean.chunk(ids[:, a:b], pos[a:b], kv, logits=False)
                    continue
                out = model(input_ids=ids[:, a:b], position_ids=pos[None, a:b],
                            past_key_values=kv, use_cache=True)
        assert kv.get_seq_length() == 60
        outs.append(out.logits[:, -1, :])
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
