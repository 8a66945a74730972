"""The lean prefill (``llm_params.lean_prefill``, issue 15): a burst's prompts read in one
right-padded pass of the decode step's lean decoder, keys and values straight into their slots.
It must compute what transformers' forward computes for each prompt alone (Llama with grouped
queries, Qwen2 with q/k/v biases; the GPU's fused small operations too), and through the real
SmolLM2 actor every chat must end as it does with transformers' prefill."""
from __future__ import annotations

import pytest
import torch
from test_chat_batching import CASES, chat, start_llm
from test_lean_decode import _tiny

from agile_rag.actors.llm_lean_decode import lean_decoder


@pytest.mark.parametrize("arch", ["Llama", "Qwen2"])
@pytest.mark.parametrize("fused", [False, True, "joint", "across", "apart"])
def test_a_lean_prefill_computes_what_transformers_computes_for_each_prompt(arch, fused,
                                                                           monkeypatch):
    """(``joint``, ``across``, ``apart``: the fused small operations over projections laid end
    to end, gate and up computed each way ``AGILE_RAG_GATE_UP`` names)"""
    model = _tiny(arch)
    if isinstance(fused, str):
        from agile_rag.actors.llm_fused import LinearCalls, lay_end_to_end

        def not_here(*a):
            raise AssertionError(f"gate and up were not computed {fused}")
        lay_end_to_end(model)
        monkeypatch.setenv("AGILE_RAG_GATE_UP", fused)
        if fused != "joint":
            monkeypatch.setattr(LinearCalls, "__call__", not_here)
        if fused != "across":
            monkeypatch.setattr(LinearCalls, "across", not_here)
    lean = lean_decoder(model, bool(fused))
    assert lean is not None
    lens = [5, 11, 8, 1]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lens]
    ids = torch.full((len(lens), max(lens)), 7, dtype=torch.long)     # 7: the padding
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    stored: dict = {}
    with torch.inference_mode():
        got = lean.prefill(ids, torch.tensor([n - 1 for n in lens]),
                           lambda layer, k, v: stored.__setitem__(layer, (k.clone(), v.clone())))
        for i, p in enumerate(prompts):
            out = model(input_ids=torch.tensor([p]), use_cache=True)
            torch.testing.assert_close(got[i], out.logits[0, -1], rtol=1e-4, atol=1e-4)
            for layer in range(model.config.num_hidden_layers):
                k, v = stored[layer]
                want = out.past_key_values.layers[layer]
                assert k.shape[:3] == (len(lens), model.config.num_key_value_heads, max(lens))
                torch.testing.assert_close(k[i, :, :len(p)], want.keys[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(v[i, :, :len(p)], want.values[0], rtol=1e-4,
                                           atol=1e-4)


async def test_chats_end_as_with_transformers_prefill_and_a_disagreeing_prefill_is_dropped(
        caplog):
    """A burst of prompts of different lengths, admitted together: the same words, reasons and
    token counts with the lean prefill as with transformers'; the runner compared them once and
    counted its lean passes. A lean prefill that does not agree is not used."""
    import asyncio

    actor, _, system = await start_llm({"lean_prefill": False})
    try:
        runner = actor.engine.runner
        msgs = [chat(p, n, stop) for p, n, stop in CASES]
        # the CPU's lean decoder exists after a first decode step
        want = await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs))
        assert runner.lean_prefills == 0 and runner.lean is not None
        actor.engine.configure(lean_prefill=True)
        msgs = [chat(p, n, stop) for p, n, stop in CASES]
        got = await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs))
        assert runner.lean_prefill_ok is True and runner.lean_prefills >= 1
        assert [(r.text, r.finish_reason, r.completion_tokens) for r in got] == \
            [(r.text, r.finish_reason, r.completion_tokens) for r in want]
        # a lean prefill that disagrees (its logits off): found once, then never used
        lean = runner.lean
        real = lean.prefill
        lean.prefill = lambda ids, last, store: real(ids, last, store) + 1.0
        runner.lean_prefill_ok = None
        before = runner.lean_prefills
        msgs = [chat(p, n, stop) for p, n, stop in CASES]
        again = await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs))
        assert runner.lean_prefill_ok is False and runner.lean_prefills == before
        assert [r.text for r in again] == [r.text for r in want]
        assert "prefill differs" in caplog.text
    finally:
        await system.stop_all()


def test_llm_params_lean_prefill_reaches_the_runner():
    from agile_rag.runtime.liveconfig import LiveConfigError, validate

    from support import llm_batch_settings

    assert llm_batch_settings({})["lean_prefill"] is True           # on by default
    assert llm_batch_settings({"lean_prefill": False})["lean_prefill"] is False
    assert validate({"llm_params": {"lean_prefill": True}}).llm_params["lean_prefill"] is True
    with pytest.raises(LiveConfigError) as bad:
        validate({"llm_params": {"lean_prefill": "on"}})
    assert any("lean_prefill" in p for p in bad.value.problems)
