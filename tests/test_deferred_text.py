"""A decode step's text read while the next step computes (``BatchEngine.defer_text``, on by
itself on a GPU): forced on here, with the real SmolLM2 model on the CPU, every chat must end
exactly as with the text read at once: the same words, finish reasons, token counts, streamed
pieces, logprobs and JSON, with stop strings, length limits, cancels and a pause for another
model in the same batch."""
from __future__ import annotations

import asyncio
import json

import pytest
from test_chat_batching import CASES, chat, drain, idle_events, start_llm

from agile_rag.actors.messages import Chat, JobFinished, RequestGrant, Revoke

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def extras() -> list[Chat]:
    """Chats beyond CASES: logprobs, a JSON schema, a stop string hit by a late token."""
    return [
        Chat(messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8,
             temperature=0.0, logprobs=[], top_logprobs=2),
        Chat(messages=[{"role": "user", "content": "Invent a person."}], max_tokens=40,
             temperature=0.0, response_schema=json.dumps(SCHEMA), schema_strict=True),
        Chat(messages=[{"role": "user", "content": "Count from 1 to 20."}], max_tokens=40,
             temperature=0.0, stop=["7"]),
    ]


def outcome(msg: Chat, res) -> tuple:
    """What a chat ended with: text, finish reason, token count, tokens, logprobs."""
    return (res.text, res.finish_reason, res.completion_tokens,
            [t for t, _, _ in msg.logprobs or []], [lp for _, lp, _ in msg.logprobs or []])


def same_outcomes(a: list[tuple], b: list[tuple]) -> None:
    """Everything equal, the logprobs within 1e-4: a batch read in other passes or steps may
    differ in the CPU's last float bits (rounded to 4 places, -1.45995 once read -1.46 and
    once -1.4599 in CI), never in its tokens."""
    assert [o[:4] for o in a] == [o[:4] for o in b]
    for x, y in zip(a, b):
        assert x[4] == pytest.approx(y[4], abs=1e-4)


@pytest.fixture(scope="module")
async def llm():
    actor, arbiter, system = await start_llm({})
    yield actor, arbiter, system
    await system.stop_all()


async def together(actor, msgs: list[Chat]) -> list:
    return await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs))


async def test_deferred_text_ends_every_chat_as_the_text_read_at_once(llm):
    actor = llm[0]
    results = {}
    for defer in (False, True):
        await idle_events(actor, 0)      # a loop reads defer_text as it starts: none runs
        actor.engine.defer_text = defer
        msgs = [chat(p, n, stop, stream=True) for p, n, stop in CASES] + extras()
        got = await together(actor, msgs)
        assert actor.engine._deferring is defer
        for m, r in zip(msgs, got):
            if m.stream is not None:                      # streamed once, piece by piece
                assert await drain(m.stream, r) == r.text
        results[defer] = [outcome(m, r) for m, r in zip(msgs, got)]
    await idle_events(actor, 0)          # (the last chats' loop may still be ending)
    actor.engine.defer_text = None
    await actor.ask(chat("Hi.", 2), timeout=300)
    assert actor.engine._deferring is False               # None: at once on a CPU
    same_outcomes(results[True], results[False])
    reasons = [o[1] for o in results[True]]
    assert "stop" in reasons and "length" in reasons
    assert "7" not in results[True][-1][0] and results[True][-1][1] == "stop"
    assert json.loads(results[True][-2][0]).keys() == {"name", "age"}
    assert len(results[True][-3][3]) == results[True][-3][2]     # a logprob per token


async def test_a_cancel_and_a_pause_with_deferred_text(llm):
    """A stream cancelled mid-batch leaves, a pause for another model (Yield) reads the held
    text first, and the chats resume with the words they have alone."""
    def defer(actor, on):
        actor.engine.defer_text = on
    await cancel_and_pause(llm, defer)


async def cancel_and_pause(llm, mode) -> None:
    """Two chats and a third cancelled mid-batch, with ``mode(actor, True)`` on (after their
    words alone, with ``mode(actor, False)``), paused for another model: the cancelled one
    ends "cancelled", the others with their words alone, streamed once; the batch did pause.
    ``mode(actor, None)`` at the end."""
    actor, arbiter, system = llm
    mode(actor, False)
    # long enough that the batch is still decoding when its slice (500 ms) lets it pause
    prompts = [("Write a long story about a dragon.", 80),
               ("Write a long essay about rivers.", 80)]
    alone = [await actor.ask(chat(p, n), timeout=300) for p, n in prompts]
    mode(actor, True)
    budget = arbiter.budget
    try:
        arbiter.budget = actor.lease.residency.weight_bytes + actor.working_bytes(1) + \
            (64 << 20)
        await actor.ask(Revoke(model="smollm2", reason="start from the CPU"), timeout=30)
        gone = chat("Write a long poem about snow.", 200, stream=True)
        msgs = [chat(p, n, stream=True) for p, n in prompts]
        tasks = [asyncio.ensure_future(actor.ask(m, timeout=300)) for m in msgs + [gone]]
        await asyncio.wait_for(gone.stream.get(), 120)         # the batch is decoding
        gone.cancel.set()
        other = RequestGrant(model="other-model", nbytes=actor.working_bytes(1) + (128 << 20))
        await arbiter.ask(other, timeout=60, sender="test")   # the chats pause for it
        arbiter.tell(JobFinished(model="other-model"), sender="test")
        results = [await asyncio.wait_for(t, 300) for t in tasks]
        assert [(r.text, r.finish_reason) for r in results[:2]] == \
            [(r.text, r.finish_reason) for r in alone]
        for m, r in zip(msgs, results):
            assert await drain(m.stream, r) == r.text
        assert results[2].finish_reason == "cancelled"
        idle = [e for e in system.tracer.events if e.msg_type == "BatchIdle"]
        assert any(e.detail.get("yielded") for e in idle)           # it did pause
    finally:
        arbiter.budget = budget
        mode(actor, None)
