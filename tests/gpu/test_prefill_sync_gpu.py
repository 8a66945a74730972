"""A long prompt's prefill chunks that do not land yet queue their work without a host sync
(actors/batch_runner.py: ``_h2d`` and no attention mask of ones), so the batch loop goes on
while the GPU computes them; a sync there would wait for every model's work queued on the
stream before it (issue 13: 512-token chunks took ~80 ms of the loop's time at 32 clients)."""
from __future__ import annotations

import asyncio

import torch
from test_chat_graphs_gpu import chat, spawn
from test_model_actors_gpu import WORDS, build_tiny_llm

from agile_rag.actors.batch_plan import StepKind


def test_a_chunk_that_does_not_land_queues_its_work_without_a_sync(tmp_path):
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)
    checked: list[int] = []
    errors: list[str] = []
    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(200))

    async def go():
        system, llm = await spawn(folder, "cuda", {"prefill_chunk_tokens": 32})
        runner = llm.engine.runner
        run = runner.run

        def strict(plan, stats):
            if plan.kind is not StepKind.CHUNK or plan.lands:
                return run(plan, stats)
            torch.cuda.set_sync_debug_mode("error")      # any synchronising op raises
            try:
                return run(plan, stats)
            except RuntimeError as exc:
                errors.append(str(exc)[:300])
                raise
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(plan.end - plan.start)

        runner.run = strict
        out = await llm.ask(chat(long_prompt), timeout=120)
        runner.run = run
        again = await llm.ask(chat(long_prompt), timeout=120)   # the same words, unchecked
        await system.stop_all()
        return out, again

    out, again = asyncio.run(go())
    assert not errors, errors
    assert len(checked) >= 3 and all(n == 32 for n in checked), checked
    assert out.text and out.text == again.text
