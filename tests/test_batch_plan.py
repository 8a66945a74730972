"""The batch planner alone: fake prompts and hand-written model outputs, no model, no torch
work. Each test drives BatchPlanner the way the engine does (plan -> "run" -> tell back)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from agile_rag.actors import batch_plan
from agile_rag.actors.batch_plan import BatchPlanner, BatchSettings, SeqRequest, StepKind, StepPlan
from agile_rag.actors.states import FinishReason


@dataclass
class FakeMsg:
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class FakeTail:
    ids: list = field(default_factory=list)


def seq(prompt_len: int, max_new: int) -> SeqRequest:
    return SeqRequest(FakeMsg(), list(range(prompt_len)), max_new, lambda r, res: None,
                      FakeTail())


def planner(**kw) -> BatchPlanner:
    return BatchPlanner(BatchSettings(**kw))


def run_prefill(p: BatchPlanner, plan: StepPlan, first_token: int = 7) -> None:
    """What the engine does after the runner read a PREFILL: seat, then a first token."""
    p.seat(plan.rows, plan.first_slot, [len(r.context()) for r in plan.rows])
    for r in plan.rows:
        take(r, first_token)


def take(r: SeqRequest, tid: int) -> None:
    r.last = tid
    r.generated += 1
    r.tail.ids.append(tid)
    if r.generated >= r.max_new:
        r.reason = FinishReason.LENGTH


def decode_once(p: BatchPlanner) -> StepPlan | None:
    plan, gone = p.decode()
    if plan is not None:
        p.stepped(plan.rows)
        for r in plan.rows:
            take(r, 9)
    p.retire()
    return plan


def test_admission_stays_within_the_kv_budget_and_max_batch(monkeypatch):
    monkeypatch.setattr(batch_plan, "RESERVE_NEW", 64)
    p = planner(max_batch=3, kv_tokens=400, prefill_tokens=4096, prefill_chunk=0)
    reqs = [seq(100, 30) for _ in range(5)]          # each reserves 130 tokens
    for r in reqs:
        p.accept(r)
    plan, cancelled = p.admit()
    assert plan is not None and plan.kind is StepKind.PREFILL and not cancelled
    assert plan.rows == reqs[:3]                      # 3 x 130 = 390 <= 400; max_batch 3
    assert plan.first_slot == 0 and plan.cache is not None
    slots, length = plan.cache
    assert slots >= 3 and length % batch_plan.LEN_BUCKET == 0
    run_prefill(p, plan)
    assert [r.slot for r in p.active] == [0, 1, 2] and [r.pos for r in p.active] == [100] * 3
    assert p.admit() == (None, [])                    # full: nobody else fits
    assert list(p.waiting) == reqs[3:]


def test_the_budget_refuses_a_second_long_reservation(monkeypatch):
    monkeypatch.setattr(batch_plan, "RESERVE_NEW", 512)
    p = planner(max_batch=8, kv_tokens=1000, prefill_chunk=0)
    a, b = seq(300, 400), seq(300, 400)              # 700 each: two do not fit in 1000
    p.accept(a)
    p.accept(b)
    plan, _ = p.admit()
    assert plan.rows == [a]
    run_prefill(p, plan)
    assert p.admit() == (None, [])
    a.reason = FinishReason.STOP                     # a leaves: b fits now
    gone = p.retire()
    assert gone.finished == [a]
    plan, _ = p.admit()
    assert plan.rows == [b] and plan.first_slot == 0


def test_a_cancelled_waiting_request_is_answered_not_admitted():
    p = planner(prefill_chunk=0)
    a, b = seq(10, 5), seq(10, 5)
    p.accept(a)
    p.accept(b)
    a.msg.cancel.set()
    plan, cancelled = p.admit()
    assert cancelled == [a] and a.reason is FinishReason.CANCELLED
    assert plan.rows == [b]


def test_retirement_moves_the_last_row_into_the_freed_slot():
    p = planner(max_batch=8, prefill_chunk=0)
    rows = [seq(10, 50) for _ in range(4)]
    for r in rows:
        p.accept(r)
    plan, _ = p.admit()
    run_prefill(p, plan)
    rows[1].reason = FinishReason.STOP
    gone = p.retire()
    assert gone.finished == [rows[1]] and gone.moves == [(3, 1)]
    assert p.active == [rows[0], rows[3], rows[2]] and rows[3].slot == 1
    rows[0].msg.cancel.set()                          # cancelled rows leave before a decode
    plan, gone = p.decode()
    assert gone.finished == [rows[0]] and plan.moves == [(2, 0)]
    assert plan.rows == [rows[2], rows[3]] and [r.slot for r in plan.rows] == [0, 1]


def test_a_long_prompt_is_read_in_chunks_then_lands_in_a_slot():
    p = planner(max_batch=8, kv_tokens=8192, prefill_chunk=100)
    short, long = seq(20, 50), seq(250, 10)
    p.accept(short)
    plan, _ = p.admit()
    run_prefill(p, plan)
    p.accept(long)
    plan, _ = p.admit()
    assert plan is None and p.partial is not None and p.partial.req is long
    spans = []
    while p.partial is not None:
        chunk, cancelled = p.chunk()
        assert cancelled is None and chunk.kind is StepKind.CHUNK
        spans.append((chunk.start, chunk.end, chunk.lands))
        p.chunk_done(chunk)
        if chunk.lands:
            assert chunk.first_slot == 1 and chunk.cache is not None
        decode_once(p)                                # the short one decodes between chunks
    assert spans == [(0, 100, False), (100, 200, False), (200, 250, True)]
    assert long in p.active and long.slot == 1
    assert long.pos == 251 and long.steps == 1        # seated at 250, then one decode step
    assert short.steps == 3 and long.prefill_chunks == 3


def test_a_lone_request_a_stored_prefix_serves_goes_the_chunked_way_a_burst_does_not():
    p = planner(max_batch=8, kv_tokens=8192, prefill_chunk=512)
    p.prefix_hit = lambda req: 32 if len(req.prompt) == 45 else 0
    a, b = seq(45, 10), seq(45, 10)
    p.accept(a)
    p.accept(b)
    plan, _ = p.admit()                       # a burst: one batched prefill, as before
    assert plan is not None and plan.rows == [a, b] and p.partial is None
    run_prefill(p, plan)
    c = seq(45, 10)
    p.accept(c)
    plan, _ = p.admit()                       # alone, with a prefix: read from it, in a chunk
    assert plan is None and p.partial is not None and p.partial.req is c
    p.partial.done = 32                       # what the runner's start_from_prefix sets
    chunk, _ = p.chunk()
    assert (chunk.start, chunk.end, chunk.lands) == (32, 45, True)
    p.chunk_done(chunk)
    assert c in p.active and c.pos == 45
    d = seq(30, 10)                           # alone, no prefix stored: a plain prefill
    p.accept(d)
    plan, _ = p.admit()
    assert plan is not None and plan.rows == [d] and p.partial is None


@pytest.mark.parametrize("on_gpu", [False, True])
def test_on_a_gpu_a_lone_request_reads_from_a_stored_prefix_only_when_it_saves_work(on_gpu):
    """A GPU's eager chunk after a prefix costs more than one lean prefill of the whole
    prompt (gpu-h200-s18.md: a 220-token prompt whose chat-template block was stored read in
    0.035-0.083 s against 0.017-0.025 s): there a prefix serves a lone request when it covers
    half the prompt or leaves at most PREFIX_GPU_REST tokens (one chunk graph); on a CPU
    (a pass costs its tokens) any hit of PREFIX_MIN_HIT does."""
    from agile_rag.actors.batch_plan import PREFIX_GPU_REST, PREFIX_MIN_HIT

    rest = PREFIX_GPU_REST
    hits = {220: PREFIX_MIN_HIT, 60: PREFIX_MIN_HIT, 1050: 1000, 400: 200, 399: 150,
            rest + 36: 36, rest + 37: 36, 40: PREFIX_MIN_HIT - 1}
    p = planner(max_batch=8, kv_tokens=16384, prefill_chunk=2048)
    p.on_gpu = on_gpu
    p.prefix_hit = lambda req: hits[len(req.prompt)]
    took = {}
    for n in hits:
        r = seq(n, 4)
        p.accept(r)
        plan, _ = p.admit()
        took[n] = p.partial is not None and p.partial.req is r
        if took[n]:
            p.partial = None                  # (this test only asks which way it went)
        else:
            assert plan is not None and plan.rows == [r]
            p.unadmit(plan.rows)
            p.waiting.clear()
    want = {n: n != 40 for n in hits}
    if on_gpu:                                # less than half, and more than a chunk graph left
        want.update({220: False, 399: False, rest + 37: False})
    assert took == want


def test_prefill_chunk_set_to_zero_mid_prefill_finishes_the_prompt_in_one_forward():
    """Issue 11, defect 2: the running engine took the new value and read an empty chunk."""
    p = planner(prefill_chunk=64)
    long = seq(300, 10)
    p.accept(long)
    p.admit()
    chunk, _ = p.chunk()
    p.chunk_done(chunk)
    assert (chunk.start, chunk.end) == (0, 64)
    p.settings = BatchSettings(prefill_chunk=0)
    chunk, _ = p.chunk()
    assert (chunk.start, chunk.end, chunk.lands) == (64, 300, True)
    p.chunk_done(chunk)
    assert p.active == [long] and long.pos == 300


def test_cancel_mid_prefill_answers_it_and_frees_the_partial():
    p = planner(prefill_chunk=50)
    long = seq(200, 10)
    p.accept(long)
    p.admit()
    chunk, _ = p.chunk()
    p.chunk_done(chunk)
    long.msg.cancel.set()
    plan, cancelled = p.chunk()
    assert plan is None and cancelled is long and long.reason is FinishReason.CANCELLED
    assert p.partial is None and p.idle()


def test_pause_all_puts_everyone_back_oldest_first_and_they_resume_with_their_tokens():
    p = planner(prefill_chunk=100)
    a, b, c = seq(30, 20), seq(30, 20), seq(400, 5)
    for r in (a, b):
        p.accept(r)
    plan, _ = p.admit()
    run_prefill(p, plan)
    decode_once(p)
    p.accept(c)
    p.admit()                                          # c starts a chunked prefill
    chunk, _ = p.chunk()
    p.chunk_done(chunk)
    assert p.pause_all() == 2
    assert list(p.waiting) == [a, b, c] and not p.active and p.partial is None
    assert [r.preempted for r in (a, b, c)] == [1, 1, 1]
    assert a.context() == a.prompt + [7, 9]           # re-read with what it generated
    p.cache_dropped()
    plan, _ = p.admit()
    assert plan.rows == [a, b] and plan.cache is not None


def test_a_growing_row_preempts_the_newest_when_the_budget_cannot_hold_both(monkeypatch):
    monkeypatch.setattr(batch_plan, "LEN_BUCKET", 16)
    monkeypatch.setattr(batch_plan, "RESERVE_NEW", 4)
    p = planner(max_batch=4, kv_tokens=100, prefill_chunk=0)
    old, new = seq(40, 24), seq(40, 24)
    p.accept(old)
    plan, _ = p.admit()
    run_prefill(p, plan)
    p.accept(new)
    plan, _ = p.admit()
    run_prefill(p, plan)
    assert p.active == [old, new]
    preempted = None
    for _ in range(30):
        plan = decode_once(p)
        if new in p.waiting:
            preempted = plan
            break
    assert preempted is not None and new.preempted == 1 and p.active == [old]
    assert preempted.cache == (1, 64)                 # one row of the grown length fits


def test_draining_ignores_waiting_requests():
    p = planner()
    p.accept(seq(10, 5))
    assert not p.idle() and p.idle(draining=True)


def test_take_all_hands_every_request_over_in_order():
    p = planner(prefill_chunk=100)
    a, b, c = seq(10, 5), seq(300, 5), seq(10, 5)
    p.accept(a)
    plan, _ = p.admit()
    run_prefill(p, plan)
    p.accept(b)
    p.accept(c)
    p.admit()                                          # b: chunked; c waits behind it
    assert p.partial is not None
    assert p.take_all() == [a, b, c]
    assert p.idle() and not p.waiting


@pytest.mark.parametrize("whole", [False, True])
def test_cache_shape_grows_by_powers_of_two_on_cpu_and_takes_the_budget_on_gpu(whole):
    p = BatchPlanner(BatchSettings(max_batch=32, kv_tokens=4096, prefill_chunk=0),
                     on_gpu=whole)
    for _ in range(3):
        p.accept(seq(100, 50))
    plan, _ = p.admit()
    slots, length = plan.cache
    assert length == 256
    assert slots == (16 if whole else 4)               # 4096 // 256 = 16 fit


def test_a_prefill_that_failed_puts_its_rows_back_at_the_head_of_the_queue():
    """The engine answers them with the error (they used to be in neither list: lost)."""
    p = planner(prefill_chunk=0)
    a, b, c = seq(10, 5), seq(10, 5), seq(10, 5)
    for r in (a, b, c):
        p.accept(r)
    plan, _ = p.admit()
    assert plan.rows == [a, b, c]
    p.unadmit(plan.rows)
    assert p.take_all() == [a, b, c]


def test_a_parked_cache_shape_is_taken_back_when_it_fits():
    """After a trim the runner parks a stable cache (same addresses, same graphs): the next
    cache that fits in it is that shape, so the graphs stay good; a longer chat grows as
    before."""
    p = planner(max_batch=8, kv_tokens=4096)
    p.on_gpu = True
    p.cache_dropped(parked=(8, 512))
    p.accept(seq(100, 20))
    plan, _ = p.admit()
    assert plan is not None and plan.cache == (8, 512) and p.parked is None
    q = planner(max_batch=8, kv_tokens=8192, prefill_chunk=0)
    q.on_gpu = True
    q.cache_dropped(parked=(8, 512))
    q.accept(seq(900, 20))
    plan, _ = q.admit()
    assert plan is not None and plan.cache is not None and plan.cache[1] > 512


def test_paged_admission_counts_the_blocks_each_chat_fills():
    """kv_block > 0: one cache shape for good (every row x the whole pool), and admission
    counts blocks: one long prompt no longer shrinks the batch for the short ones."""
    rect = planner(max_batch=16, kv_tokens=1024, prefill_chunk=0, prefill_tokens=8192)
    paged = planner(max_batch=16, kv_tokens=1024, prefill_chunk=0, prefill_tokens=8192,
                    kv_block=16)
    for p in (rect, paged):
        p.on_gpu = True
        p.accept(seq(400, 20))                            # 420 tokens: 512 / 27 blocks
        for _ in range(10):
            p.accept(seq(20, 20))                         # 40 tokens: 256 / 3 blocks
    r_plan, _ = rect.admit()
    p_plan, _ = paged.admit()
    assert len(r_plan.rows) == 2                          # 2 rows x 512 = 1024
    assert p_plan.cache == (16, 1024) and len(p_plan.rows) == 11     # 27 + 10 x 3 = 57 of 64
    run_prefill(paged, p_plan)
    assert paged.admit() == (None, [])                    # nobody waits; no new shape
    assert paged._grow(16, 1024) is None


def test_paged_decode_preempts_the_newest_when_the_pool_is_full(monkeypatch):
    monkeypatch.setattr(batch_plan, "RESERVE_NEW", 8)      # admission counts 48 tokens each
    p = planner(max_batch=8, kv_tokens=128, prefill_chunk=0, kv_block=16)   # 8 blocks
    p.on_gpu = True
    a, b = seq(40, 200), seq(40, 200)
    p.accept(a)
    p.accept(b)
    plan, _ = p.admit()
    assert plan is not None and plan.rows == [a, b]        # 3 + 3 blocks of 8
    run_prefill(p, plan)
    for _ in range(24):                                    # to 64 tokens each: all 8 blocks
        decode_once(p)
    assert [r.pos for r in p.active] == [64, 64]
    step, _ = p.decode()                                   # a 65th token needs a 9th block
    assert step is not None and step.rows == [a] and step.moves == []
    assert list(p.waiting) == [b] and b.preempted == 1


def test_prefill_batch_tokens_bounds_a_bursts_first_pass_and_reaches_it_from_llm_params():
    """``llm_params.prefill_batch_tokens`` (default 4096): a burst of short prompts admitted
    with nobody streaming is read in one pass of at most that many tokens; a bad value is a
    bad liveconfigs.json."""
    from agile_rag.runtime.liveconfig import LiveConfigError, validate

    from support import llm_batch_settings

    def first_pass(tokens: int) -> int:
        p = planner(max_batch=64, kv_tokens=65536, prefill_tokens=tokens, prefill_chunk=2048)
        for _ in range(32):
            p.accept(seq(240, 128))
        plan, _ = p.admit()
        assert plan is not None
        return len(plan.rows)

    assert first_pass(4096) == 17                     # 17 x 240 <= 4096
    assert first_pass(8192) == 32                     # the whole burst in one pass

    assert llm_batch_settings({})["prefill_tokens"] == 4096
    assert llm_batch_settings({"prefill_batch_tokens": 8192})["prefill_tokens"] == 8192
    assert validate({"llm_params": {"prefill_batch_tokens": 8192}}).llm_params[
        "prefill_batch_tokens"] == 8192
    with pytest.raises(LiveConfigError) as bad:
        validate({"llm_params": {"prefill_batch_tokens": "lots"}})
    assert any("prefill_batch_tokens" in p for p in bad.value.problems)


@pytest.mark.parametrize("on_gpu, passes", [(True, [17, 15]), (False, [17] + [2] * 7 + [1])])
def test_a_burst_is_read_in_two_passes_on_a_gpu_while_its_first_rows_stream(on_gpu, passes):
    """(issue 15) A burst of 32 prompts of 240 tokens, ``prefill_chunk_tokens`` unset: 17 with
    nobody streaming (``prefill_batch_tokens``), then, while those stream, the other 15 in one
    more pass on a GPU (up to ``prefill_batch_tokens`` again: the burst ends a decode step and a
    pass sooner than with 8 and 7 in 2048-token passes), two at a time on a CPU (512). A long
    prompt is still read 2048 tokens a pass on a GPU; a ``prefill_chunk_tokens`` that is set
    bounds a pass while chats stream on either."""
    p = BatchPlanner(BatchSettings(max_batch=64, kv_tokens=65536), on_gpu=on_gpu)
    assert p.chunk_tokens() == (2048 if on_gpu else 512)
    assert p.stream_pass_tokens() == (0 if on_gpu else 512)
    assert BatchPlanner(BatchSettings(prefill_chunk=2048), on_gpu=True).stream_pass_tokens() \
        == 2048
    burst = [seq(240, 128) for _ in range(32)]
    for r in burst:
        p.accept(r)
    read = []
    while p.waiting:
        plan, _ = p.admit()
        assert plan is not None and plan.kind is StepKind.PREFILL
        run_prefill(p, plan)
        read.append(len(plan.rows))
        assert decode_once(p) is not None             # the rows read so far stream
    assert read == passes
    assert sorted(id(r) for r in p.active) == sorted(id(r) for r in burst)


@pytest.mark.parametrize("chunk", [0, 2048])
def test_a_rag_mix_decodes_twice_the_rows_together_with_blocks_as_with_the_rectangle(chunk):
    """(issue 15) Most prompts short, every fourth long (chat_http.py's ``rag`` mix: 18 of
    200..600 tokens, 6 of 1,500..3,000), 64 new tokens each, under 16,384 KV tokens: the
    rectangle holds rows x its longest reservation (8 rows together), blocks hold what each
    row fills (19): the admission loop as the engine runs it, one decode step a turn."""
    from test_chat_http_bench import chat_http_bench

    lens = chat_http_bench().mixed_lengths("rag", 24, False)
    assert min(lens) == 200 and max(lens) == 3000 and sum(n >= 1500 for n in lens) == 6

    def most_together(kv_block: int) -> int:
        p = planner(max_batch=64, kv_tokens=16384, prefill_tokens=4096, prefill_chunk=chunk,
                    kv_block=kv_block)
        p.on_gpu = True
        for n in lens:
            p.accept(seq(n, 64))
        most = 0
        for _ in range(2000):
            plan, _ = p.admit()
            if plan is not None:
                run_prefill(p, plan)
            part, _ = p.chunk()                       # a long prompt, a chunk a turn
            if part is not None:
                p.chunk_done(part)
                if part.lands:
                    take(part.rows[0], 7)
            most = max(most, len(p.active))
            if decode_once(p) is None and not p.waiting and p.partial is None:
                break
        assert not p.waiting and not p.active
        return most

    rect, blocks = most_together(0), most_together(16)
    assert (rect, blocks) == (8, 19)


def test_net_moves_leave_each_slot_what_the_moves_in_order_leave():
    """batch_plan.net_moves: a retire's moves in order (a later one may read a slot an earlier
    one wrote, or write it again) as one gather-then-scatter set; only the live rows'
    destinations when ``active`` is given."""
    assert batch_plan.net_moves([]) == []
    assert batch_plan.net_moves([(3, 1)]) == [(3, 1)]
    assert batch_plan.net_moves([(2, 0), (1, 0)]) == [(1, 0)]           # written again
    assert sorted(batch_plan.net_moves([(3, 1), (1, 0)])) == [(3, 0), (3, 1)]   # read again
    assert batch_plan.net_moves([(3, 1), (1, 0)], active=1) == [(3, 0)]


@pytest.mark.parametrize("seed", range(6))
def test_a_retire_of_many_rows_moves_the_cache_as_row_by_row_copies_did(seed):
    """The batch runner applies a retire's moves as one gather and one scatter per tensor
    (a copy per row and tensor held a 3B model's burst up ~35 ms on the H200): rows ending
    in any pattern, the rows left find their own keys and values in their new slots."""
    import random

    import torch

    from agile_rag.actors.batch_runner import BatchRunner
    from agile_rag.actors.kv_slots import make_slot_cache

    rng = random.Random(seed)
    n = rng.randint(2, 12)
    p = planner(max_batch=16, prefill_chunk=0)
    rows = [seq(10, 50) for _ in range(n)]
    for r in rows:
        p.accept(r)
    plan, _ = p.admit()
    run_prefill(p, plan)
    cache = make_slot_cache(2, 16, 2, 8, 4, torch.float32, torch.device("cpu"))
    for t in cache.keys + cache.values:
        t.normal_(generator=torch.Generator().manual_seed(seed))
    own = {id(r): [t[r.slot].clone() for t in cache.keys + cache.values] for r in rows}
    for r in rng.sample(rows, rng.randint(1, n)):
        r.reason = FinishReason.STOP
    gone = p.retire()
    runner = BatchRunner.__new__(BatchRunner)
    runner.cache = cache
    runner.apply_moves(gone.moves, len(p.active))
    assert len(p.active) + len(gone.finished) == n
    for r in p.active:
        for t, want in zip(cache.keys + cache.values, own[id(r)]):
            assert torch.equal(t[r.slot], want)


@pytest.mark.parametrize("on_gpu, streaming, lengths", [
    (True, False, [240] * 32),                 # a burst: 17 a pass with nobody streaming
    (True, True, [240] * 32),                  # while chats stream (no bound but 4096)
    (False, True, [240] * 32),                 # a CPU while chats stream: 512 a pass
    (True, False, [100, 3000, 100]),           # a long prompt behind a short one
    (True, False, [3000, 100]),                # a long prompt first: read alone, in chunks
    (True, False, [50] * 70),                  # max_batch (64) before the tokens
    (True, False, [300, 20, 20, 4000]),
])
def test_the_waiting_requests_fill_the_next_pass_as_admit_reads_it(on_gpu, streaming, lengths):
    """(issue 15) ``pass_filled``: once the waiting requests fill the next prefill pass, one
    more behind them changes nothing that pass reads: the loop encodes the others' prompts
    while the pass computes. Accepted one by one until it says so, the pass is the one all of
    them waiting give."""
    def fresh() -> BatchPlanner:
        p = BatchPlanner(BatchSettings(max_batch=64, kv_tokens=1 << 20), on_gpu=on_gpu)
        if streaming:
            p.accept(seq(30, 64))
            run_prefill(p, p.admit()[0])
        return p

    reqs = [seq(n, 16) for n in lengths]
    every = fresh()
    for r in reqs:
        every.accept(r)
    want, _ = every.admit()
    some, n = fresh(), 0
    while n < len(reqs) and not some.pass_filled():
        some.accept(reqs[n])
        n += 1
    if on_gpu and not streaming and lengths == [240] * 32:
        assert n == 18                         # 17 read, 15 encoded while they are
    got, _ = some.admit()
    if want is None:                           # a long prompt first: a chunked prefill
        assert got is None and some.partial.req is every.partial.req is reqs[0]
    else:
        assert got is not None and [id(r) for r in got.rows] == [id(r) for r in want.rows]
    assert not fresh().pass_filled()           # nobody waits: nothing fills it
