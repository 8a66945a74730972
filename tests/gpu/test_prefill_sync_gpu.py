"""Prefills queue their work without a host sync (actors/batch_runner.py: ``_h2d``, no
attention mask of ones for a chunk, a 4D mask of our own for a padded batch): a chunk that does
not land lets the batch loop go on while the GPU computes it, and a batched admission syncs
once, for its sampled tokens, not in the middle of its forward. A sync there waits for every
model's work queued on the stream before it (issue 13: prefills took ~80 ms of the loop's time
at 32 clients)."""
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

        def strict(plan, stats, ids=None):
            if plan.kind is StepKind.DECODE or (plan.kind is StepKind.CHUNK and plan.lands):
                return run(plan, stats, ids)
            torch.cuda.set_sync_debug_mode("error")      # any synchronising op raises
            try:
                return run(plan, stats, ids)
            except RuntimeError as exc:
                errors.append(f"{plan.kind}: {str(exc)[:300]}")
                raise
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(plan.kind)

        runner.run = strict
        out = await llm.ask(chat(long_prompt), timeout=120)
        burst = await asyncio.gather(*(llm.ask(chat(" ".join(WORDS[i:i + 3 + i])), timeout=120)
                                       for i in range(4)))          # padded rows together
        runner.run = run
        again = await llm.ask(chat(long_prompt), timeout=120)   # the same words, unchecked
        alone = [await llm.ask(chat(" ".join(WORDS[i:i + 3 + i])), timeout=120)
                 for i in range(4)]
        await system.stop_all()
        return out, again, burst, alone

    out, again, burst, alone = asyncio.run(go())
    assert not errors, errors
    assert checked.count(StepKind.CHUNK) >= 3 and StepKind.PREFILL in checked, checked
    assert out.text and out.text == again.text
    assert [o.text for o in burst] == [o.text for o in alone]
