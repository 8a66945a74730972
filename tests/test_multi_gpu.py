"""Several GPUs under one VRAM arbiter (issue 18), driven by message as test_vram_arbiter.py
does: the test plays the models asking for grants, ``Recorder`` actors stand for holders.
Cards are ``cuda:0`` ... ``cuda:N-1``, each with its own budget, its own queue and its own
evictions; flex models go where they cost least to admit (actors/vram_devices.py)."""
from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest
from test_vram_arbiter import Job, Recorder, until

from agile_rag.actors.messages import (
    Granted,
    JobFinished,
    Release,
    Released,
    RequestGrant,
    Revoke,
)
from agile_rag.actors.vram_arbiter import GrantRefused, GrantTooLarge, VRAMArbiter
from agile_rag.actors.vram_devices import budgets_of, device_budgets, placement_key
from agile_rag.runtime.actor import CONTROL, Actor
from agile_rag.runtime.executor import ModelExecutor
from agile_rag.runtime.liveconfig import ModelSpec, parse_device
from agile_rag.runtime.system import ActorSystem

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def cards(budgets, holders=(), **kw):
    system = ActorSystem(executor=ModelExecutor(max_workers=1))
    arb = system.spawn(VRAMArbiter(budgets, **kw))
    log: list[str] = []
    for n in holders:
        system.spawn(Recorder(n, arb, log))
    try:
        yield arb, log
    finally:
        await system.stop_all()


async def grant(arb, model, nbytes, **kw) -> Granted:
    return await arb.ask(RequestGrant(model=model, nbytes=nbytes, **kw), sender=model,
                         timeout=10)


def done(arb, model):
    arb.tell(JobFinished(model=model), priority=CONTROL, sender=model)


# ---- configuration -----------------------------------------------------------------------------
def test_device_strings_and_budgets():
    assert parse_device("cuda") == ("cuda", 0) and parse_device("cuda:3")[1] == 3
    assert parse_device("flex") == ("flex", None) and parse_device("cpu") == ("cpu", None)
    for bad in ("cuda:", "cuda:x", "gpu:1", "cuda:-1", 1, None):
        assert parse_device(bad) is None, bad
    # a file written for one GPU keeps its meaning: cuda is cuda:0
    one = ModelSpec("embedder", "e", "/p", "/p", device="cuda")
    assert one.gpu == 0 and one.placement == "cuda:0"
    assert one == ModelSpec("embedder", "e", "/p", "/p", device="cuda", gpu=0)
    assert ModelSpec("embedder", "e", "/p", "/p", device="flex", gpu=1).gpu is None
    assert budgets_of(100) == {"cuda:0": 100}
    assert budgets_of([100, 200]) == {"cuda:0": 100, "cuda:1": 200}
    assert budgets_of({"cuda": 5, "cuda:2": 7}) == {"cuda:0": 5, "cuda:2": 7}
    MB = 2**20
    assert device_budgets(1000, 0.1, count=2) == {"cuda:0": int(900 * MB),
                                                  "cuda:1": int(900 * MB)}
    assert device_budgets([1000, 2000, 3000], 0.0, count=2) == {"cuda:0": 1000 * MB,
                                                                "cuda:1": 2000 * MB}
    assert device_budgets(1000, 0.0, count=0) == {"cuda:0": 0}        # no CUDA


def test_placement_key_prefers_free_memory_then_cheap_room():
    now = time.monotonic()
    assert placement_key(100, 500, 0, [], [], now) < placement_key(100, 200, 0, [], [], now)
    fits = placement_key(100, 150, 0, [], [], now)
    assert fits < placement_key(100, 50, 0, [], [], now)                 # must evict there
    assert placement_key(100, 150, 1, [], [], now)[0] == 2               # queue ahead


# ---- placement ---------------------------------------------------------------------------------
async def test_flex_goes_to_the_card_with_room_and_pinned_to_its_card():
    async with cards([1000, 1000]) as (arb, _):
        a = await grant(arb, "a", 600)                # both empty: cuda:0 (first of equals)
        b = await grant(arb, "b", 600)                # cuda:0 has 400 left: cuda:1
        assert (a.device, b.device) == ("cuda:0", "cuda:1")
        done(arb, "a"), done(arb, "b")
        c = await grant(arb, "c", 300)                # fits on both: the one with more left
        assert c.device == "cuda:0" or c.device == "cuda:1"
        p = await grant(arb, "p", 100, pinned=True, device="cuda:1")
        assert p.device == "cuda:1"
        st = arb.state()
        assert st.placement == {"a": "cuda:0", "b": "cuda:1", "c": c.device, "p": "cuda:1"}
        assert {d: v["used"] for d, v in st.devices.items()} == {
            "cuda:0": 600 + (300 if c.device == "cuda:0" else 0),
            "cuda:1": 700 + (300 if c.device == "cuda:1" else 0)}
        with pytest.raises(GrantTooLarge, match="cuda:7"):
            await grant(arb, "q", 10, pinned=True, device="cuda:7")
        with pytest.raises(GrantTooLarge):              # fits on no card even alone
            await grant(arb, "huge", 1500)


async def test_a_pinned_model_on_each_of_four_cards():
    async with cards([1000] * 4) as (arb, _):
        got = [await grant(arb, f"p{i}", 700, pinned=True, device=f"cuda:{i}")
               for i in range(4)]
        assert [g.device for g in got] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
        for i in range(4):
            done(arb, f"p{i}")
        # a flex model of 400 fits beside none of them: refused at once (each card has only
        # 300 that no pinned model holds), not queued
        with pytest.raises(GrantTooLarge):
            await grant(arb, "f", 400)
        f = await grant(arb, "f", 250)
        assert f.device in {f"cuda:{i}" for i in range(4)}
        assert all(v["used"] <= v["budget"] for v in arb.state().devices.values())


async def test_eviction_happens_on_one_card_only():
    """Both cards full of idle flex models: a newcomer evicts on the card where that costs
    least (the one whose holder was used least), and nothing on the other."""
    async with cards([1000, 1000], holders=("busy0", "idle1")) as (arb, log):
        assert (await grant(arb, "busy0", 900)).device == "cuda:0"
        assert (await grant(arb, "idle1", 900)).device == "cuda:1"
        for _ in range(5):                              # busy0 is in demand: costly to evict
            done(arb, "busy0")
            await grant(arb, "busy0", 900)
        done(arb, "busy0"), done(arb, "idle1")
        g = await grant(arb, "new", 500)
        assert g.device == "cuda:1" and g.evicted == ("idle1",)
        assert log == ["idle1"]
        st = arb.state()
        assert st.placement == {"busy0": "cuda:0", "new": "cuda:1"}


async def test_a_waiting_flex_model_takes_the_card_that_frees_first():
    async with cards([1000, 1000]) as (arb, _):
        assert (await grant(arb, "x", 900)).device == "cuda:0"
        assert (await grant(arb, "y", 900)).device == "cuda:1"   # both busy: nothing to evict
        waiter = asyncio.ensure_future(grant(arb, "w", 500))
        await asyncio.sleep(0.05)
        assert not waiter.done() and arb.waiters[0].device == "cuda:0"
        # the other card frees first: the waiter (no room made for it yet) moves there
        done(arb, "y")
        arb.tell(Release(model="y"), priority=CONTROL, sender="y")
        g = await asyncio.wait_for(waiter, 5)
        assert g.device == "cuda:1"
        assert arb.state().placement == {"x": "cuda:0", "w": "cuda:1"}


async def test_a_holder_moving_cards_frees_the_old_one():
    async with cards([1000, 1000]) as (arb, _):
        assert (await grant(arb, "m", 400, pinned=True, device="cuda:0")).device == "cuda:0"
        done(arb, "m")
        g = await grant(arb, "m", 400, pinned=True, device="cuda:1")   # a hot device flip
        assert g.device == "cuda:1"
        st = arb.state()
        assert st.devices["cuda:0"]["used"] == 0 and st.devices["cuda:1"]["used"] == 400


async def test_one_card_behaves_as_before():
    async with cards(1000, holders=("a",)) as (arb, log):
        assert arb.budget == 1000 and list(arb.budgets) == ["cuda:0"]
        g = await grant(arb, "a", 600)
        assert g.device == "cuda:0"
        done(arb, "a")
        assert (await grant(arb, "b", 600)).evicted == ("a",)
        arb.budget = 2000                          # the one card's budget, as tests set it
        assert arb.budgets == {"cuda:0": 2000}


# ---- concurrent, seeded ----------------------------------------------------------------------
class CardModel(Actor):
    """A fake model that keeps a per-card ledger of what it really holds."""

    def __init__(self, name, arb, ledger, rng, card=None):
        super().__init__(name)
        self.arb, self.ledger, self.rng, self.card = arb, ledger, rng, card
        self.resident: tuple[str, int] | None = None

    def _set(self, where):
        self.resident = where
        self.ledger.update(self.name, where)

    async def handle(self, msg, env):
        if isinstance(msg, Job):
            try:
                g = await self.arb.ask(RequestGrant(
                    model=self.name, nbytes=msg.nbytes, priority=msg.priority,
                    pinned=self.card is not None, device=self.card), sender=self.name,
                    timeout=30)
            except GrantRefused:
                self.arb.tell(JobFinished(model=self.name), priority=CONTROL, sender=self.name)
                return "cpu"
            if self.card is not None and g.device != self.card:
                self.ledger.violations.append(f"{self.name} pinned to {self.card} got {g}")
            self._set((g.device, g.nbytes))
            await asyncio.sleep(self.rng.uniform(0, 0.004))
            self.arb.tell(JobFinished(model=self.name), priority=CONTROL, sender=self.name)
            if msg.release_after and self.card is None:
                self._set(None)
                self.arb.tell(Release(model=self.name), priority=CONTROL, sender=self.name)
            return g.device
        if isinstance(msg, Revoke):
            n = self.resident[1] if self.resident else 0
            await asyncio.sleep(self.rng.uniform(0, 0.003))
            self._set(None)
            self.arb.tell(Released(model=self.name, nbytes=n), priority=CONTROL,
                          sender=self.name)
            return None
        return await super().handle(msg, env)


class CardLedger:
    def __init__(self, budgets):
        self.budgets = budgets
        self.where: dict[str, tuple[str, int]] = {}
        self.peak = dict.fromkeys(budgets, 0)
        self.violations: list[str] = []

    def update(self, model, where):
        self.where.pop(model, None)
        if where is not None:
            self.where[model] = where
        for card, budget in self.budgets.items():
            used = sum(n for d, n in self.where.values() if d == card)
            self.peak[card] = max(self.peak[card], used)
            if used > budget:
                self.violations.append(f"{card}: {used} > {budget}: {self.where}")


@pytest.mark.parametrize("n_cards,seed", [(2, 1), (2, 2), (4, 3)])
async def test_many_models_over_several_cards(n_cards, seed):
    rng = random.Random(seed)
    budgets = {f"cuda:{i}": 1000 for i in range(n_cards)}
    ledger = CardLedger(budgets)
    system = ActorSystem(executor=ModelExecutor(max_workers=1))
    arb = system.spawn(VRAMArbiter(budgets, grant_timeout=20.0))
    try:
        names = [f"m{i}" for i in range(4 * n_cards)]
        weights = {n: rng.randint(150, 400) for n in names}
        pinned = {"m0": "cuda:0", "m1": f"cuda:{n_cards - 1}"}
        for n in pinned:
            weights[n] = 150
        models = {n: system.spawn(CardModel(n, arb, ledger, random.Random(seed * 100 + i),
                                            card=pinned.get(n)))
                  for i, n in enumerate(names)}

        async def one():
            await asyncio.sleep(rng.uniform(0, 0.25))
            n = rng.choice(names)
            job = Job(weights[n] + rng.randint(0, 80), priority=rng.choice([0, 1, 1, 2]),
                      release_after=rng.random() < 0.05)
            return await models[n].ask(job, timeout=30)

        results = await asyncio.gather(*(one() for _ in range(300)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        on = [r for r in results if r != "cpu"]
        assert len(on) >= 270, len(on)                      # refusals stay rare
        assert set(on) == set(budgets), "every card was used"
        assert not ledger.violations, ledger.violations[:5]
        assert all(ledger.peak[c] <= budgets[c] for c in budgets)
        assert all(arb.peaks[c] <= budgets[c] for c in budgets)
        assert arb.revoked_count > 0                         # it really was contended
        await until(lambda: not arb.waiters and not any(h.busy or h.revoking
                                                        for h in arb.holders.values()))
        st = arb.state()
        for card in budgets:
            assert st.devices[card]["used"] == sum(n for d, n in ledger.where.values()
                                                   if d == card)
        assert {m: d for m, (d, _) in ledger.where.items()} == st.placement
    finally:
        await system.stop_all()
