"""A turn's new chats are prepared together (issue 15): the batch loop hands every request of a
turn that has no prompt yet to ``prepare`` in one call, so the LLM actor encodes a burst's
prompts in one tokenizer call (side by side on every core) instead of one after another with the
GPU waiting (H200: ~0.03 s of a 32-chat burst, benchmarks/results/gpu-h200-s19.md). A prompt
that fails is answered with its own error; the others of its turn are served."""
from __future__ import annotations

import threading

from agile_rag.actors.batch_plan import SeqRequest
from agile_rag.actors.llm_batching import BatchEngine
from agile_rag.actors.messages import ChatResult
from agile_rag.actors.text_stream import TextTail

from support import tiny_llama


class CharTokenizer:
    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [self.decode(s) for s in seqs]


class Msg:
    def __init__(self, text: str):
        self.text = text
        self.cancel = threading.Event()
        self.temperature = 0.0
        self.top_p = 1.0
        self.seed = None
        self.stream = None


def burst(engine: BatchEngine, texts: list[str], max_new: int = 5):
    """Requests without prompts, submitted while no loop runs, then one loop over them: their
    replies (a ChatResult or the error) by text."""
    got: dict[str, object] = {}

    def on_done(req, res):
        got[req.msg.text] = res

    for t in texts:
        req = SeqRequest(Msg(t), None, max_new, on_done, TextTail(engine.tokenizer, [], None))
        assert engine.submit(req) is False
    engine.start()
    stats = engine.run()
    engine.ended()
    return got, stats


def test_a_turns_new_prompts_are_prepared_in_one_call_and_a_bad_one_answered_alone():
    calls: list[list[str]] = []

    def prepare(reqs: list[SeqRequest]) -> list[Exception | None]:
        calls.append([r.msg.text for r in reqs])
        out: list[Exception | None] = []
        for r in reqs:
            if r.msg.text == "bad":
                out.append(ValueError("this prompt is bad"))
                continue
            r.prompt = [ord(c) % 300 for c in r.msg.text]
            out.append(None)
        return out

    engine = BatchEngine(tiny_llama(), CharTokenizer(), max_batch=8, kv_tokens=4096,
                         prepare=prepare)
    texts = ["one", "two", "bad", "three", "four", "five"]
    got, stats = burst(engine, texts)
    assert calls == [texts]                       # one call for the whole turn, in order
    assert isinstance(got["bad"], ValueError)
    for t in texts:
        if t != "bad":
            res = got[t]
            assert isinstance(res, ChatResult) and res.completion_tokens == 5, res
            assert res.prompt_tokens == len(t)
    assert stats["max_batch"] == 5 and stats["prefills"] == 1   # the five read together


def test_a_prepare_call_that_fails_answers_its_turn_and_the_loop_goes_on():
    fail = [True]

    def prepare(reqs: list[SeqRequest]) -> list[Exception | None]:
        if fail[0]:
            raise RuntimeError("the tokenizer broke")
        for r in reqs:
            r.prompt = [1, 2, 3]
        return [None] * len(reqs)

    engine = BatchEngine(tiny_llama(), CharTokenizer(), max_batch=8, kv_tokens=4096,
                         prepare=prepare)
    got, _ = burst(engine, ["a", "b"])
    assert all(isinstance(r, RuntimeError) for r in got.values()) and len(got) == 2
    fail[0] = False
    got, _ = burst(engine, ["c"])
    assert isinstance(got["c"], ChatResult) and got["c"].completion_tokens == 5
