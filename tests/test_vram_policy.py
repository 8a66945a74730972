"""The arbiter's cost rule alone (actors/vram_policy.py), and the Trim part of its protocol."""
from __future__ import annotations

import asyncio

from agile_rag.actors.messages import (
    Describe,
    JobFinished,
    Released,
    RequestGrant,
    Revoke,
    RevokeAllFlex,
    Trim,
    Trimmed,
    Yield,
)
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.actors.vram_policy import Holder, choose_room
from agile_rag.runtime.actor import Actor
from agile_rag.runtime.system import ActorSystem

GB = 10**9


def holder(model, weights, working, uses, *, restore_s=0.0, now=100.0):
    h = Holder(model, weights + working, False, model, weights=weights, restore_s=restore_s)
    for i in range(uses):
        h.used_now(now - uses + i)
    return h


def test_working_memory_goes_before_any_weights():
    llm = holder("llm", 6_170_000_000, 1_080_000_000, uses=2, restore_s=0.4)
    emb = holder("emb", 1_190_000_000, 70_000_000, uses=1)
    room = choose_room([llm, emb], 1_000_000_000, now=100.0)
    assert room.evictions == () and room.trims == (llm,)


def test_the_seed_cycle_takes_the_idle_cache_and_encoder_never_the_llm_weights():
    """Reranker's job needs 1.43 GB beyond the free memory: the LLM's KV (1.08 GB) is not
    enough; evicting the embedder (cheap to bring back, used once a cycle) and trimming the LLM
    is; evicting the LLM (6 GB, used twice a cycle) would also do, at a much higher cost."""
    llm = holder("llm", 6_170_000_000, 1_080_000_000, uses=8, restore_s=0.5)
    emb = holder("emb", 1_190_000_000, 70_000_000, uses=4)
    room = choose_room([llm, emb], 1_430_000_000, now=100.0)
    assert room.evictions == (emb,) and room.trims == (llm,)
    assert room.frees >= 1_430_000_000


def test_a_rarely_used_big_model_goes_before_a_busy_small_one():
    big = holder("big", 3 * GB, 0, uses=1, now=-2000.0)     # last used half an hour ago
    small = holder("small", 1 * GB, 0, uses=50)
    room = choose_room([big, small], GB, now=100.0)
    assert room.evictions == (big,)


def test_no_room_when_all_idle_memory_is_not_enough():
    assert choose_room([holder("a", GB, 0, uses=1)], 2 * GB, now=0.0) is None
    assert choose_room([], 0, now=0.0).frees == 0


def test_only_the_trims_needed_are_asked_for():
    a = holder("a", GB, GB // 2, uses=5)
    b = holder("b", GB, GB // 2, uses=1)
    room = choose_room([a, b], GB // 4, now=100.0)
    assert room.trims == (b,) and not room.evictions    # the less used one trims first


class TrimmingHolder(Actor):
    """Answers Trim like a model actor: keeps ``keep`` bytes."""

    def __init__(self, name):
        super().__init__(name)
        self.trims = 0

    async def handle(self, msg, env):
        if isinstance(msg, Trim):
            self.trims += 1
            self.system.actors["vram-arbiter"].tell(Trimmed(model=self.name, nbytes=msg.keep))
        return None


async def test_the_arbiter_trims_an_idle_holder_instead_of_evicting_it():
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(1050, grant_timeout=5))
    llm = system.spawn(TrimmingHolder("llm"))
    system.spawn(TrimmingHolder("emb"))
    await arb.ask(RequestGrant(model="llm", nbytes=800, weights=600), sender="llm")
    arb.tell(JobFinished(model="llm"))
    g = await asyncio.wait_for(arb.ask(RequestGrant(model="emb", nbytes=300, weights=250),
                                       sender="emb"), 5)
    assert g.evicted == () and llm.trims == 1
    state = await arb.ask(Describe())
    assert state.holders == {"llm": 600, "emb": 300}
    # the LLM asks for its cache again: the embedder's idle working memory makes room
    arb.tell(JobFinished(model="emb"))
    g = await asyncio.wait_for(arb.ask(RequestGrant(model="llm", nbytes=800, weights=600),
                                       sender="llm"), 5)
    assert (await arb.ask(Describe())).holders == {"llm": 800, "emb": 250}
    assert arb.peak_used <= 1050 and arb.revoked_count == 0
    await system.stop_all()


class Recorder(TrimmingHolder):
    """A holder that answers Trim and records every message it gets."""

    def __init__(self, name):
        super().__init__(name)
        self.got = []

    async def handle(self, msg, env):
        self.got.append(type(msg).__name__)
        return await super().handle(msg, env)


async def test_an_encoder_streams_beside_a_busy_llm_instead_of_making_it_yield():
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(1000, grant_timeout=5))
    llm = system.spawn(Recorder("llm"))
    system.spawn(Recorder("enc"))
    await arb.ask(RequestGrant(model="llm", nbytes=800, weights=600, preemptible=True),
                  sender="llm")                                  # busy: chats decoding
    g = await asyncio.wait_for(arb.ask(RequestGrant(model="enc", nbytes=400, weights=350,
                                                    stream_bytes=100), sender="enc"), 5)
    assert g.streamed and g.nbytes == 150                       # 100 streamed + 50 working
    await asyncio.sleep(0.05)
    assert "Yield" not in llm.got and arb.revoked_count == 0
    # without streaming the same ask would have had to wait for the LLM to yield
    arb.tell(JobFinished(model="enc"))
    await system.stop_all()


async def test_streaming_is_chosen_over_evicting_the_idle_llm():
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(1000, grant_timeout=5))
    llm = system.spawn(Recorder("llm"))
    system.spawn(Recorder("enc"))
    for _ in range(3):                                           # a busy, costly model
        await arb.ask(RequestGrant(model="llm", nbytes=800, weights=700, restore_s=0.5),
                      sender="llm")
        arb.tell(JobFinished(model="llm"))
    g = await asyncio.wait_for(arb.ask(RequestGrant(model="enc", nbytes=400, weights=350,
                                                    stream_bytes=200), sender="enc"), 5)
    assert g.streamed and g.evicted == ()
    assert "Revoke" not in llm.got and llm.trims == 1            # its cache went, not its weights
    assert (await arb.ask(Describe())).holders == {"llm": 700, "enc": 250}
    await system.stop_all()


class Stubborn(Actor):
    """Keeps everything on a Trim (says so), gives everything back on a Revoke."""

    def __init__(self, name, nbytes):
        super().__init__(name)
        self.nbytes, self.trims = nbytes, 0

    async def handle(self, msg, env):
        arb = self.system.actors["vram-arbiter"]
        if isinstance(msg, Trim):
            self.trims += 1
            arb.tell(Trimmed(model=self.name, nbytes=self.nbytes))
        elif isinstance(msg, Revoke):
            arb.tell(Released(model=self.name, nbytes=self.nbytes))
        return None


async def test_a_trim_that_frees_nothing_is_not_asked_again():
    """A holder whose Trimmed kept its working memory used to be trimmed again and again (a
    livelock of Trim/Trimmed, seen on the GPU with a streamed grant); now what it kept counts
    as weights until its next grant, and the arbiter moves on to an eviction."""
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(1000, grant_timeout=5))
    old = system.spawn(Stubborn("old", 600))
    system.spawn(TrimmingHolder("new"))
    await arb.ask(RequestGrant(model="old", nbytes=600, weights=300), sender="old")
    arb.tell(JobFinished(model="old"))
    g = await asyncio.wait_for(arb.ask(RequestGrant(model="new", nbytes=600, weights=500),
                                       sender="new"), 5)
    assert g.evicted == ("old",) and old.trims == 1
    await system.stop_all()


def test_a_costly_trim_loses_to_evicting_a_cheap_idle_encoder():
    """An LLM whose trim costs its CUDA graphs (trim_s) keeps its cache when evicting an idle
    encoder (a 20 ms copy back) makes the same room; with a free trim it is the other way."""
    llm = holder("llm", 6_170_000_000, 1_080_000_000, uses=2, restore_s=0.5)
    rr = holder("rr", 1_120_000_000, 0, uses=1, restore_s=0.02)
    room = choose_room([llm, rr], 1_000_000_000, now=100.0)
    assert room.trims == (llm,) and room.evictions == ()          # trims nearly free
    llm.trim_s = 0.3
    room = choose_room([llm, rr], 1_000_000_000, now=100.0)
    assert room.evictions == (rr,) and room.trims == ()
    assert room.cost(100.0) < llm.trim_cost(100.0)


async def test_an_encoder_streams_rather_than_trim_an_llm_whose_graphs_a_trim_costs():
    """The N=1 RAG cycle: the idle LLM's cache would make room for the reranker, but dropping
    it costs the LLM its CUDA graphs (trim_s); streaming the reranker costs less (stream_s),
    so it streams with its one-forward working memory (stream_working) and the LLM keeps all."""
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(1000, grant_timeout=5))
    llm = system.spawn(Recorder("llm"))
    system.spawn(Recorder("rr"))
    for _ in range(3):
        await arb.ask(RequestGrant(model="llm", nbytes=800, weights=600, restore_s=0.5,
                                   trim_s=0.3), sender="llm")
        arb.tell(JobFinished(model="llm"))
    g = await asyncio.wait_for(arb.ask(
        RequestGrant(model="rr", nbytes=400, weights=300, stream_bytes=60, stream_working=50,
                     stream_s=0.02), sender="rr"), 5)
    assert g.streamed and g.nbytes == 110 and g.evicted == ()
    await asyncio.sleep(0.05)
    assert llm.trims == 0 and "Revoke" not in llm.got
    assert (await arb.ask(Describe())).holders == {"llm": 800, "rr": 110}
    arb.tell(JobFinished(model="rr"))
    # a streamed pass that would cost more than the trim: the trim is asked for instead
    g = await asyncio.wait_for(arb.ask(
        RequestGrant(model="rr", nbytes=400, weights=300, stream_bytes=60, stream_working=50,
                     stream_s=5.0), sender="rr"), 5)
    assert not g.streamed and llm.trims == 1
    await system.stop_all()


class Releasing(Recorder):
    """Records every message, answers Trim and Revoke as a model actor does."""

    async def handle(self, msg, env):
        if isinstance(msg, Revoke):
            self.got.append("Revoke")
            self.system.actors["vram-arbiter"].tell(Released(model=self.name, nbytes=400))
            return None
        return await super().handle(msg, env)


async def test_a_busy_encoder_is_asked_to_close_its_job_when_another_model_waits():
    """An encoder whose job keeps taking requests in would hold the GPU while another model
    waits (seen: embeds waiting ~0.6 s behind a reranker's job at 32 clients): the arbiter
    asks it once to close the job (FinishJob), then evicts it at JobFinished."""
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(1000, grant_timeout=5))
    rr = system.spawn(Releasing("rr"))
    system.spawn(Releasing("emb"))
    await arb.ask(RequestGrant(model="rr", nbytes=400, weights=300), sender="rr")   # busy
    arb.tell(RequestGrant(model="llm", nbytes=500, pinned=True), sender="llm")
    waiter = asyncio.ensure_future(arb.ask(RequestGrant(model="emb", nbytes=400, weights=350),
                                           sender="emb"))
    await asyncio.sleep(0.1)
    assert rr.got.count("FinishJob") == 1 and not waiter.done()
    arb.tell(JobFinished(model="rr"))
    g = await asyncio.wait_for(waiter, 5)
    assert g.evicted == ("rr",) and rr.got.count("FinishJob") == 1
    await system.stop_all()


async def _idle_llm_beside(encoder, llm_bytes):
    """A 1,000-byte card whose LLM (800 bytes of weights, ``llm_bytes`` with its cache) has
    run three jobs and is idle, and an ``encoder`` that streams (60 bytes of streamed parts;
    150 of working memory for its full forwards, 20 for its smallest), asking for a grant now:
    (system, the LLM's actor, the encoder's grant)."""
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(1000, grant_timeout=5))
    llm = system.spawn(Releasing("llm"))
    system.spawn(Releasing(encoder))
    for _ in range(3):
        await arb.ask(RequestGrant(model="llm", nbytes=llm_bytes, weights=800, restore_s=0.5),
                      sender="llm")
        arb.tell(JobFinished(model="llm"))
    llm.trims = 0
    g = await asyncio.wait_for(arb.ask(
        RequestGrant(model=encoder, nbytes=500, weights=300, stream_bytes=60,
                     stream_working=150, stream_working_min=20, stream_s=0.01),
        sender=encoder), 5)
    return system, llm, g


async def test_a_streamed_job_takes_smaller_forwards_when_only_that_fits():
    """A 6 GiB card with the LLM's weights and cache: the streamed reranker's full forward does
    not fit beside them, its smallest one does; it streams with what is free (more passes)
    rather than evict the LLM (whose return costs far more)."""
    system, llm, g = await _idle_llm_beside("rr", 880)
    assert g.streamed and g.evicted == ()
    assert g.nbytes <= 1000 - 800 and "Revoke" not in llm.got
    assert (await system.actors["vram-arbiter"].ask(Describe())).holders["llm"] >= 800
    await system.stop_all()


async def test_a_streamed_job_trims_the_idle_llm_for_its_smallest_forwards_not_evicts_it():
    """6 GiB, session 12: the LLM's weights and idle cache filled the card (14 MB free), the
    streamed encoder's smallest grant fit only once the cache went, its full one needed the
    LLM's weights too, and every 1-query embed evicted the LLM (a 6 GB round trip a cycle).
    The arbiter trims the idle cache and streams the job in smaller forwards instead."""
    system, llm, g = await _idle_llm_beside("emb", 990)
    arb = system.actors["vram-arbiter"]
    assert g.streamed and g.evicted == () and "Revoke" not in llm.got
    assert llm.trims == 1 and 80 <= g.nbytes <= 1000 - 800     # the smallest grant or more
    assert (await arb.ask(Describe())).holders["llm"] == 800   # weights only: the cache went
    # the LLM's next chat gets its cache back once the encoder's job is over
    arb.tell(JobFinished(model="emb"))
    g2 = await asyncio.wait_for(arb.ask(RequestGrant(model="llm", nbytes=990, weights=800,
                                                     restore_s=0.5), sender="llm"), 5)
    assert g2.nbytes == 990 and "Revoke" not in llm.got
    await system.stop_all()


class Pausing(Releasing):
    """An LLM whose batch is running: answers Yield as the LLM actor does (its job pauses;
    keeping its weights it answers JobFinished then Trimmed, else JobFinished then Released)."""

    def __init__(self, name, weights):
        super().__init__(name)
        self.weights = weights
        self.yields = []

    async def handle(self, msg, env):
        if isinstance(msg, Yield):
            self.yields.append(msg.keep_weights)
            arb = self.system.actors["vram-arbiter"]
            arb.tell(JobFinished(model=self.name))
            if msg.keep_weights:
                arb.tell(Trimmed(model=self.name, nbytes=self.weights))
            else:
                arb.tell(Released(model=self.name, nbytes=0))
            return None
        return await super().handle(msg, env)


async def test_a_busy_llm_pauses_keeping_its_weights_for_a_job_that_can_stream():
    """6 GiB, session 13: the LLM's batch was still open when the 1-query embed asked (the
    chat had just ended), so nothing was idle; the Yield was sized for the embedder's
    resident grant (more than the LLM's cache), so the LLM gave back its weights too, and
    every cycle copied 6 GB back. Sized for the streamed grant, the cache is enough: the LLM
    keeps its weights and the embed streams."""
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(1000, grant_timeout=5))
    llm = system.spawn(Pausing("llm", 800))
    system.spawn(Releasing("emb"))
    for _ in range(3):
        await arb.ask(RequestGrant(model="llm", nbytes=990, weights=800, restore_s=0.5,
                                   preemptible=True), sender="llm")
        arb.tell(JobFinished(model="llm"))
    await arb.ask(RequestGrant(model="llm", nbytes=990, weights=800, restore_s=0.5,
                               preemptible=True), sender="llm")   # busy: its batch is open
    g = await asyncio.wait_for(arb.ask(
        RequestGrant(model="emb", nbytes=500, weights=300, stream_bytes=60,
                     stream_working=150, stream_working_min=20, stream_s=0.01),
        sender="emb"), 5)
    assert llm.yields == [True]                     # the cache only
    assert g.streamed and g.evicted == () and "Revoke" not in llm.got
    assert (await arb.ask(Describe())).holders["llm"] == 800
    await system.stop_all()


async def test_a_model_evicted_and_admitted_again_keeps_its_usage_rate():
    """6 GiB, session 13: the arbiter forgot a model's grant rate when it was evicted, so the
    LLM admitted again counted as used once: evicting it looked cheaper than streaming the
    next embed (0.9 s x 1/30 per s against 0.045 s), and it was evicted every cycle. Its rate
    (and restore cost) outlive its grants: the embed streams beside its weights."""
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(1000, grant_timeout=5))
    llm = system.spawn(Releasing("llm"))
    system.spawn(Releasing("emb"))
    for _ in range(6):                              # a busy LLM ...
        await arb.ask(RequestGrant(model="llm", nbytes=990, weights=800, restore_s=0.5),
                      sender="llm")
        arb.tell(JobFinished(model="llm"))
    arb.tell(RevokeAllFlex())                       # ... evicted once (reset_flags, a swap)
    await asyncio.sleep(0.05)
    assert "Revoke" in llm.got
    assert "llm" not in (await arb.ask(Describe())).holders
    await arb.ask(RequestGrant(model="llm", nbytes=990, weights=800, restore_s=0.5),
                  sender="llm")                     # and back for its next chat
    arb.tell(JobFinished(model="llm"))
    g = await asyncio.wait_for(arb.ask(
        RequestGrant(model="emb", nbytes=500, weights=300, stream_bytes=60,
                     stream_working=150, stream_working_min=20, stream_s=0.03),
        sender="emb"), 5)
    assert g.streamed and g.evicted == (), g
    assert (await arb.ask(Describe())).holders["llm"] >= 800
    await system.stop_all()


class FakeClock:
    """The arbiter's clock (its grant rates), moved by the test: a cycle's steps take the
    seconds measured on the H200, not the microseconds they take here."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


MIB = 2**20
H200_CYCLE = (   # the seed cycle's grants at N=1 with the figures measured on the H200
    (dict(model="llm", weights=6_171_877_888, restore_s=0.93, preemptible=True), 0.60),
    (dict(model="emb", nbytes=1_119_791_136 + 116 * MIB, weights=1_119_791_136,
          restore_s=0.022, stream_bytes=51 * MIB, stream_working=116 * MIB,
          stream_working_min=90 * MIB, stream_s=0.045), 0.04),
    (dict(model="rr", nbytes=1_119_793_186 + 896 * MIB, weights=1_119_793_186,
          restore_s=0.022, stream_bytes=51 * MIB, stream_working=896 * MIB,
          stream_working_min=90 * MIB, stream_s=0.045), 0.08),
    (dict(model="llm", weights=6_171_877_888, restore_s=0.93, preemptible=True), 0.72))


async def run_h200_cycles(monkeypatch, budget_mib, llm_working, cycles=6):
    """The seed cycle, one grant at a time, against the arbiter alone: per cycle, each grant's
    (model, streamed, evicted)."""
    import agile_rag.actors.vram_arbiter as vram_arbiter
    clock = FakeClock()
    monkeypatch.setattr(vram_arbiter, "time", clock)
    system = ActorSystem()
    arb = system.spawn(VRAMArbiter(budget_mib * MIB, grant_timeout=5))
    for m in ("llm", "emb", "rr"):
        system.spawn(Releasing(m))
    out = []
    for _ in range(cycles):
        cycle = []
        for ask, seconds in H200_CYCLE:
            if ask["model"] == "llm":
                ask = {**ask, "nbytes": ask["weights"] + llm_working}
            g = await asyncio.wait_for(arb.ask(RequestGrant(**ask), sender=ask["model"]), 5)
            cycle.append((ask["model"], g.streamed, g.evicted))
            clock.now += seconds
            arb.tell(JobFinished(model=ask["model"]))
            await asyncio.sleep(0.01)          # the Trim / Revoke answers
        out.append(cycle)
    await system.stop_all()
    return out


async def test_the_h200_seed_cycle_at_8gib_never_evicts_the_llm(monkeypatch):
    """What the H200 measured at 8 GiB (N=1): the LLM stays; the reranker's job takes the
    embedder's place, 1.12 GB copied a cycle."""
    cycles = await run_h200_cycles(monkeypatch, 8192, 1_226_833_920)
    assert not any("llm" in ev for c in cycles for _m, _s, ev in c), cycles
    assert all(c[2] == ("rr", False, ("emb",)) for c in cycles[1:]), cycles


async def test_the_h200_seed_cycle_at_6gib_streams_the_encoders_beside_the_llm(monkeypatch):
    """At 6 GiB (the LLM's weights and its 0.26 GB cache fill the card) both encoders stream
    beside the LLM's weights from the first cycle: the LLM's rate (two grants in 1.4 s) makes
    its eviction (0.93 s to come back) cost more than the encoders' streamed passes. Before,
    the first embed evicted the LLM (a rate averaged over a 30 s window the server had not
    lived yet: 1/30 per s), and then every reranker job did (an evicted model's rate was
    forgotten)."""
    cycles = await run_h200_cycles(monkeypatch, 6144, 256_376_832)
    for c in cycles:
        assert [(m, s) for m, s, _ev in c[1:3]] == [("emb", True), ("rr", True)], cycles
        assert not any("llm" in ev for _m, _s, ev in c), cycles
