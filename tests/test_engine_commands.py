"""Live edits reach the running batch engine only between steps, and nobody is lost
(issue 11's defects 1, 2 and 4), with the real SmolLM2 model on the CPU."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
from test_chat_batching import LONG_PROMPT, chat, start_llm

from agile_rag.actors.messages import UpdateModel
from agile_rag.runtime.errors import ModelFailed

PROMPTS = [f"Tell me fact number {i} about the sea." for i in range(10)]


@pytest.mark.parametrize("threads", [0, 2])
async def test_turning_batching_off_with_a_device_change_answers_every_waiting_chat(threads):
    """Defect 1: with max_batch_size 2 and 10 chats, one save that moves the LLM to the CPU
    and turns continuous batching off used to drop the 8 chats waiting for a slot with the old
    engine (nobody answered them until REQUEST_TIMEOUT). Now they go to the generate path,
    the streamed ones continue where they paused, and every text is what it is alone. With
    prompt threads (llm_params.prompt_threads) the waiting chats' prompts were encoded on
    them: the generate path takes them as encoded."""
    base = {"max_batch_size": 2, "prompt_threads": threads}
    actor, _, system = await start_llm(base)
    try:
        alone = [await actor.ask(chat(p, 12), timeout=300) for p in PROMPTS]
        msgs = [chat(p, 12, stream=i % 2 == 0) for i, p in enumerate(PROMPTS)]
        tasks = [asyncio.ensure_future(actor.ask(m, timeout=300)) for m in msgs]
        await asyncio.wait_for(msgs[0].stream.get(), 120)         # the batch is running
        assert actor.queue_length() >= 8                          # defect 4: they count
        spec = dataclasses.replace(actor.spec, device="cpu")
        await actor.ask(UpdateModel(spec=spec, params={**base, "continuous_batching": False}),
                        timeout=300)
        assert actor.engine is None
        results = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        assert [(r.text, r.finish_reason) for r in results] == \
            [(r.text, r.finish_reason) for r in alone]
        for m, r in zip(msgs, results):
            if m.stream is not None:                               # streamed exactly once
                pieces = []
                while not m.stream.queue.empty():
                    pieces.append(m.stream.queue.get_nowait())
                assert "".join(p for p in pieces if isinstance(p, str)) == r.text
        assert actor.queue_length() == 0
        # and back on: the engine takes chats again
        await actor.ask(UpdateModel(spec=spec, params=base), timeout=300)
        assert actor.engine is not None
        again = await asyncio.gather(*(actor.ask(chat(p, 12), timeout=300)
                                       for p in PROMPTS[:3]))
        assert [r.text for r in again] == [r.text for r in alone[:3]]
    finally:
        await system.stop_all()


async def test_prefill_chunk_set_to_zero_while_a_prompt_is_half_read():
    """Defect 2: the running engine took prefill_chunk_tokens = 0 mid-prefill, computed an
    empty chunk and failed every chat with the internal error's text. Now the setting
    arrives between steps and the prompt is finished in one forward, with the same words."""
    actor, _, system = await start_llm({"prefill_chunk_tokens": 16, "gpu_min_slice_ms": 0})
    try:
        whole = await actor.ask(chat(LONG_PROMPT, 8), timeout=300)
        other = chat("Write a long story about a dragon.", 30, stream=True)
        other_alone = await actor.ask(chat("Write a long story about a dragon.", 30),
                                      timeout=300)
        task_o = asyncio.ensure_future(actor.ask(other, timeout=300))
        await asyncio.wait_for(other.stream.get(), 120)
        task = asyncio.ensure_future(actor.ask(chat(LONG_PROMPT, 8), timeout=300))
        while actor.engine.partial is None or actor.engine.partial.done == 0:
            await asyncio.sleep(0.002)
        await actor.ask(UpdateModel(spec=actor.spec, params={"prefill_chunk_tokens": 0}),
                        timeout=60)
        got, o = await asyncio.wait_for(asyncio.gather(task, task_o), 300)
        assert (got.text, got.finish_reason) == (whole.text, whole.finish_reason)
        assert o.text == other_alone.text
        assert actor.engine.prefill_chunk == 0
    finally:
        await system.stop_all()


async def test_an_internal_error_reaches_the_client_without_its_text():
    """A failure inside the batch loop answers every chat with a ModelFailed that names the
    request id, never the exception's own text (that goes to the log)."""
    actor, _, system = await start_llm({})
    try:
        def broken(*a, **kw):
            raise RuntimeError("cannot reshape tensor of 0 elements (internal detail)")
        actor.engine.runner.model = type("Broken", (), {
            "parameters": actor.model.parameters, "config": actor.model.config,
            "__call__": broken})()
        try:
            await actor.ask(chat("Hello there.", 4), timeout=120, request_id="req-xyz")
        except ModelFailed as exc:
            assert "req-xyz" in exc.message and "reshape" not in exc.message
        else:
            raise AssertionError("the chat should have failed")
    finally:
        await system.stop_all()
