"""The decode graphs' warm-up (issue 15): after a load or an admit the batch loop captures the
common (batch, view) buckets while it has nothing else to do, one per turn, so a request that
arrives meanwhile is served at once and later bursts find the graphs ready. CUDA is not here:
the capture itself is replaced by a recorder (tests/gpu/test_chat_graphs_gpu.py captures for
real); the loop's control flow, the cache and the model's tokens are the real ones."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from agile_rag.actors import batch_runner
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


class FakeChat:
    def __init__(self):
        self.cancel = threading.Event()
        self.temperature = 0.0
        self.top_p = 1.0
        self.seed = None
        self.stream = None


@pytest.fixture
def engine(monkeypatch):
    """A real engine on a tiny Llama whose runner believes it decodes on a GPU with graphs;
    each capture is recorded (and takes 50 ms) instead of run."""
    events: list = []

    def fake_capture(self, bb, vv):
        time.sleep(0.05)
        events.append(("capture", (bb, vv), time.monotonic()))
        self.graphs[(bb, vv)] = object()

    monkeypatch.setattr(batch_runner._Graphs, "_capture", fake_capture)
    eng = BatchEngine(tiny_llama(), CharTokenizer(), max_batch=8, kv_tokens=4096)
    monkeypatch.setattr(eng.runner, "on_gpu", lambda: True)    # the cache takes the budget
    eng.events = events
    return eng


def request(engine, prompt: list[int], max_new: int = 6) -> tuple[SeqRequest, threading.Event]:
    done = threading.Event()

    def on_done(req, res):
        assert isinstance(res, ChatResult), res
        engine.events.append(("done", req, time.monotonic()))
        req.result = res
        done.set()

    req = SeqRequest(FakeChat(), list(prompt), max_new, on_done,
                     TextTail(engine.tokenizer, [], None))
    return req, done


def run_loop(engine) -> tuple[threading.Thread, dict]:
    out: dict = {}
    engine.start()
    t = threading.Thread(target=lambda: out.update(engine.run()))
    t.start()
    return t, out


def greedy_alone(prompt: list[int], n: int) -> list[int]:
    """What the model says alone (plain forwards, no engine)."""
    model = tiny_llama()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def captures(engine) -> list:
    return [e[1] for e in engine.events if e[0] == "capture"]


def wait_for_captures(engine, t: threading.Thread, n: int, timeout: float = 30) -> None:
    """Until the loop has captured ``n`` graphs; fails (never hangs) when the loop ended or
    stalled first."""
    deadline = time.monotonic() + timeout
    while len(captures(engine)) < n:
        assert t.is_alive(), "the batch loop ended before its warm-up captures"
        assert time.monotonic() < deadline, f"{len(captures(engine))} of {n} captures"
        time.sleep(0.005)



def test_warm_up_after_load_serves_a_request_between_two_captures(engine):
    t, stats = run_loop(engine)              # a loop with no request: the warm-up at load
    wait_for_captures(engine, t, 2)
    req, done = request(engine, [5, 9, 14, 3, 7], 6)
    assert engine.submit(req)                # the warm-up loop takes it
    assert done.wait(30)
    t.join(30)
    engine.ended()
    keys = engine.runner.warm_buckets()
    # every batch bucket at views 256 and 512, smallest view first
    assert keys[:4] == [(1, 256), (2, 256), (4, 256), (8, 256)] and (8, 512) in keys
    assert sorted(captures(engine)) == sorted(keys)              # each exactly once
    order = [e[0] for e in engine.events]
    done_at = order.index("done")
    assert 2 <= done_at < len(order) - 1      # served between captures, warm-up went on after
    # it waited for at most the capture in progress, not for the whole warm-up
    first = next(e for e in engine.events if e[0] == "capture")
    assert req.result.completion_tokens == 6
    assert req.tail.ids == greedy_alone([5, 9, 14, 3, 7], 6)
    assert stats["warm_captures"] == len(keys)
    assert engine.runner.last_warm["graphs"] == len(keys)
    assert first[2] < engine.events[done_at][2]


def test_after_an_evict_the_next_loop_serves_first_and_warms_when_idle(engine):
    t, _ = run_loop(engine)
    t.join(30)
    engine.ended()
    assert len(captures(engine)) == len(engine.runner.warm_buckets()) == 8
    engine.release()                          # the weights left: cache and graphs dropped
    engine.events.clear()
    reqs = [request(engine, [3 + i, 8, 1, 4], 5) for i in range(3)]
    for req, _ in reqs:
        assert not engine.submit(req)         # no loop runs: the admit starts one
    t, stats = run_loop(engine)
    assert all(done.wait(30) for _, done in reqs)
    t.join(30)
    engine.ended()
    order = [e[0] for e in engine.events]
    assert order[:3] == ["done"] * 3          # the chats first: no capture before them
    # then the set of the cache the chats made (8 slots x 256: views of 256), while idle
    assert engine.cache.length == 256 and engine.cache.slots == 8
    assert captures(engine) == engine.runner.warm_buckets() == [(1, 256), (2, 256), (4, 256),
                                                                 (8, 256)]
    assert stats["warm_captures"] == 4
    for i, (req, _) in enumerate(reqs):
        assert req.tail.ids == greedy_alone([3 + i, 8, 1, 4], 5)


def test_a_yield_or_a_drain_ends_the_warm_up_and_graphs_off_skips_it(engine):
    t, _ = run_loop(engine)
    wait_for_captures(engine, t, 1)
    engine.request_yield()                    # another model waits for the GPU
    t.join(30)
    engine.ended()
    assert len(captures(engine)) < len(engine.runner.warm_buckets())
    engine.release()
    engine.events.clear()
    engine.configure(warm_graphs=False)
    engine.apply_idle_commands()
    t, _ = run_loop(engine)
    t.join(30)
    engine.ended()
    assert captures(engine) == []


def test_a_graph_set_started_since_the_last_warm_up_is_warmed_when_idle(monkeypatch):
    """(issue 15, s18) The loop warms the decode graphs when it starts without any, and now
    also when the runner's graph set is not the one the last warm-up finished for (a cache
    made anew mid-loop: its first graph captured by a step): else the next short chat
    captured its own graph on its request."""
    eng = BatchEngine(tiny_llama(), CharTokenizer())
    runner = eng.runner
    monkeypatch.setattr(runner, "graphs_wanted", lambda: True)
    eng._warm_if_unwarmed()
    assert eng.warming                                 # no graphs yet
    # the warm-up runs to its end (nothing left to capture here)
    monkeypatch.setattr(runner, "plan_warmup", lambda: 0)
    def warm_one(active, stats):              # the set the warm-up captures into
        runner.graphs, runner.graph_sets = object(), runner.graph_sets + 1
        return False
    monkeypatch.setattr(runner, "warm_one", warm_one)
    monkeypatch.setattr(runner, "check_lean_chunk", lambda: None)
    monkeypatch.setattr(runner, "check_lean_prefill", lambda tokens: None)
    assert eng._warm_step({}) is False and not eng.warming
    eng._warm_if_unwarmed()
    assert not eng.warming                             # the set the warm-up finished for
    runner.graph_sets += 1                             # a new set, started by a step
    eng._warm_if_unwarmed()
    assert eng.warming and not eng._warm_planned
    eng.warming = False
    eng._apply({"warm_graphs": False})                 # warm-ups off: never
    eng._warm_if_unwarmed()
    assert not eng.warming


def test_a_cache_made_anew_mid_loop_is_warmed_when_idle_and_the_next_chat_captures_none(
        engine):
    """(issue 15, s18) A prompt longer than the warmed cache makes the cache anew mid-loop
    (the old graphs go with it; on a GPU its own step captures its graph); the loop warms the
    new set while idle after it, so the short chat after it meets a warm set and its loop
    captures nothing (before, that loop met graphs made for the long prompt only: on the H200
    its step captured one on its request, 0.09-0.15 s to the first token). Here decode steps
    run eagerly: what shows is when the warm-up's captures happen."""
    t, _ = run_loop(engine)                   # the warm-up at load
    t.join(30)
    engine.ended()
    length = engine.cache.length
    long_prompt = [(7 * i) % 290 + 5 for i in range(length + 100)]
    req, done = request(engine, long_prompt, 4)
    assert not engine.submit(req)
    t, stats = run_loop(engine)
    assert done.wait(60)
    t.join(60)
    engine.ended()
    assert engine.cache.length > length
    assert stats.get("warm_captures", 0) > 0  # the new set, while idle after the long chat
    assert set(engine.runner.warm_buckets()) <= set(engine.runner.graphs.graphs)
    engine.events.clear()
    short, done = request(engine, [5, 9, 14, 3, 7], 6)
    assert not engine.submit(short)
    t, stats = run_loop(engine)
    assert done.wait(30)
    t.join(30)
    engine.ended()
    assert stats.get("captures", 0) == 0 and captures(engine) == []
    assert short.tail.ids == greedy_alone([5, 9, 14, 3, 7], 6)
