"""The actor core: tell/ask, deadlines, control priority, batching, supervision, traces."""
from __future__ import annotations

import asyncio

import pytest

from agile_rag.runtime.actor import CONTROL, DEFER, Actor
from agile_rag.runtime.errors import ActorCrashed, ActorStopped, DeadlineExceeded, InvalidRequest
from agile_rag.runtime.system import ActorSystem


class Echo(Actor):
    def __init__(self, name="echo"):
        super().__init__(name)
        self.seen = []

    async def handle(self, msg, env):
        self.seen.append(msg)
        if msg == "slow":
            await asyncio.sleep(0.3)
        if msg == "bad":
            raise InvalidRequest("bad message")
        return f"echo:{msg}"


class Batcher(Actor):
    batching = True
    max_batch = 8

    def __init__(self):
        super().__init__("batcher")
        self.batches = []

    def joinable(self, msg):
        return isinstance(msg, int)

    async def handle(self, msg, env):
        await asyncio.sleep(0.05)
        return f"single:{msg}"

    async def handle_batch(self, envs):
        self.batches.append([e.msg for e in envs])
        return [e.msg * 10 for e in envs]


async def test_ask_tell_and_request_errors_leave_the_actor_alive():
    system = ActorSystem()
    a = system.spawn(Echo())
    assert await a.ask("x") == "echo:x"
    a.tell("told")
    with pytest.raises(InvalidRequest):
        await a.ask("bad")
    assert await a.ask("after") == "echo:after"
    assert "told" in a.seen
    await system.stop_all()


async def test_deadline_names_the_actor_and_skips_abandoned_work():
    system = ActorSystem()
    a = system.spawn(Echo())
    slow = asyncio.create_task(a.ask("slow"))
    await asyncio.sleep(0.01)
    with pytest.raises(DeadlineExceeded, match="echo did not answer str within 0.05s"):
        await a.ask("late", timeout=0.05)
    await slow
    await a.ask("sync")
    assert "late" not in a.seen                     # dropped, never handled
    assert any(e.outcome == "dropped" for e in system.tracer.events)
    await system.stop_all()


async def test_control_messages_overtake_queued_requests():
    system = ActorSystem()
    a = system.spawn(Echo())
    first = asyncio.create_task(a.ask("slow"))
    await asyncio.sleep(0.01)
    normal = [asyncio.create_task(a.ask(f"n{i}")) for i in range(3)]
    await asyncio.sleep(0.01)
    ctrl = asyncio.create_task(a.ask("ctrl", priority=CONTROL))
    await asyncio.gather(first, ctrl, *normal)
    assert a.seen.index("ctrl") == 1
    await system.stop_all()


async def test_batching_keeps_order_and_own_results():
    system = ActorSystem()
    b = system.spawn(Batcher())
    blocker = asyncio.create_task(b.ask("block"))          # not joinable: handled alone
    await asyncio.sleep(0.01)
    tasks = [asyncio.create_task(b.ask(i)) for i in range(20)]
    assert await blocker == "single:block"
    assert [await t for t in tasks] == [i * 10 for i in range(20)]
    assert [len(x) for x in b.batches] == [8, 8, 4]
    assert [m for batch in b.batches for m in batch] == list(range(20))
    await system.stop_all()


class Crashy(Actor):
    async def handle(self, msg, env):
        return msg

    async def _process(self, batch):                        # a bug in the loop itself
        if batch[0].msg == "boom":
            self._inflight = batch
            raise RuntimeError("loop bug")
        await super()._process(batch)


async def test_supervisor_restarts_a_crashed_actor_and_fails_its_pending_ask():
    system = ActorSystem()
    c = system.spawn(Crashy("crashy"))
    boom = asyncio.create_task(c.ask("boom"))
    queued = asyncio.create_task(c.ask("after"))
    with pytest.raises(ActorCrashed, match="crashy crashed.*loop bug"):
        await boom
    assert await queued == "after"                            # nothing queued is lost
    assert len(c.restarts) == 1
    await system.stop_all()


async def test_repeated_crashes_stop_the_actor_with_a_clear_error():
    system = ActorSystem(max_restarts=2)
    c = system.spawn(Crashy("crashy"))
    for _ in range(3):
        with pytest.raises(ActorCrashed):
            await c.ask("boom")
    with pytest.raises(ActorStopped, match="crashed 3 times"):
        await c.ask("x")
    await system.stop_all()


class Deferrer(Actor):
    def __init__(self):
        super().__init__("deferrer")
        self.parked = []

    async def handle(self, msg, env):
        if msg == "park":
            self.parked.append(env)
            return DEFER
        if msg == "release":
            for e in self.parked:
                self.reply_to(e, "released")
            return "ok"


async def test_deferred_replies_do_not_block_the_mailbox():
    system = ActorSystem()
    d = system.spawn(Deferrer())
    parked = asyncio.create_task(d.ask("park"))
    await asyncio.sleep(0.01)
    assert await d.ask("release") == "ok"
    assert await parked == "released"
    await system.stop_all()


async def test_traces_carry_request_ids_and_times():
    system = ActorSystem()
    a = system.spawn(Echo())
    await a.ask("x", request_id="req-1", sender="test")
    (ev,) = system.tracer.for_request("req-1")
    assert ev.actor == "echo" and ev.msg_type == "str" and ev.sender == "test"
    assert ev.enqueued <= ev.started <= ev.ended
    await system.stop_all()


class Holder(Actor):
    """Its handler holds a big object across an await, as the LLM's held its batch engine
    (and through it the model's weights) while it freed an idle KV cache."""
    def __init__(self):
        super().__init__("holder")
        self.started = asyncio.Event()

    async def handle(self, msg, env):
        engine = msg()                          # only this frame refers to it
        self.started.set()
        await asyncio.sleep(60)
        return engine


async def test_a_stopped_actor_keeps_nothing_its_handler_held():
    """Stopping cancels the actor's task; asyncio keeps the CancelledError on the task and its
    traceback the handler's frames, locals and all. The chaos run lost a removed LLM's 513 MB
    that way, for good (the stopped actor was still referenced). The system clears them."""
    import gc
    import weakref

    class Engine:
        pass
    system = ActorSystem()
    actor = system.spawn(Holder())
    refs = []

    def make():
        e = Engine()
        refs.append(weakref.ref(e))
        return e
    actor.tell(make)
    await asyncio.wait_for(actor.started.wait(), 5)
    assert refs[0]() is not None
    gc.disable()                                # freed by reference counts, not a collection
    try:
        await system.stop("holder")
        assert actor._task.done()               # the stopped actor is still referenced here
        assert refs[0]() is None, "the stopped actor's task still holds its handler's locals"
    finally:
        gc.enable()
        await system.stop_all()
