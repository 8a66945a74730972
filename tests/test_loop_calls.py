"""runtime/loop_calls.py: a worker thread's calls into an event loop, held inside a block, reach
the loop as one wake-up per block, in order, after the calls made before the block; outside a
block each call goes at once. The LLM's batch thread holds each step's text pieces so."""
from __future__ import annotations

import asyncio
import threading

from agile_rag.actors.messages import TokenStream
from agile_rag.runtime.loop_calls import held_calls


async def test_a_block_of_calls_wakes_the_loop_once_and_keeps_the_order():
    loop = asyncio.get_running_loop()
    streams = [TokenStream() for _ in range(3)]
    wakes = []
    real = loop.call_soon_threadsafe

    def counting(fn, *args):
        wakes.append(fn)
        return real(fn, *args)
    loop.call_soon_threadsafe = counting      # type: ignore[method-assign]
    try:
        def worker():
            streams[0].push_threadsafe("before")        # outside a block: at once
            with held_calls():
                for step in range(2):
                    for i, s in enumerate(streams):
                        s.push_threadsafe(f"{i}:{step}")
                with held_calls():                     # nested: part of the outer block
                    streams[2].push_threadsafe("nested")
        t = threading.Thread(target=worker)
        t.start()
        await asyncio.to_thread(t.join)
        got = []
        for s in streams:
            items = []
            while not s.queue.empty() or len(items) < (3 if s is streams[0] or
                                                       s is streams[2] else 2):
                items.append(await asyncio.wait_for(s.get(), 5))
            got.append(items)
    finally:
        loop.call_soon_threadsafe = real          # type: ignore[method-assign]
    ours = [w for w in wakes if getattr(w, "__name__", "") in ("put_nowait", "_run_all")]
    assert len(ours) == 2                         # "before", then the whole block
    assert got == [["before", "0:0", "0:1"], ["1:0", "1:1"], ["2:0", "2:1", "nested"]]


async def test_streamed_chats_get_their_text_through_held_calls():
    """Through the real batch engine: several streamed chats' pieces, in order, whole."""
    import sys
    sys.path.insert(0, "tests")
    from test_chat_batching import chat, drain, start_llm

    actor, arbiter, system = await start_llm({})
    try:
        msgs = [chat(f"Count to {n}.", 12, stream=True) for n in (3, 4, 5, 6)]
        replies = await asyncio.gather(*(actor.ask(m, timeout=300) for m in msgs))
        # no wait: the reply comes after every piece (one held block: pieces, then the reply)
        for m, r in zip(msgs, replies):
            assert r.text and await drain(m.stream, r) == r.text
    finally:
        await system.stop_all()
