"""StableBuffer on a real GPU (runtime/stable_memory.py): its pages go back to the driver on
unmap (the card's free memory grows by the buffer), come back at the same address on map, and a
CUDA graph captured over the buffer replays correctly after an unmap + map."""
from __future__ import annotations

import threading

import pytest
import torch

from agile_rag.runtime import stable_memory
from agile_rag.runtime.stable_memory import StableBuffer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MB = 2**20


def test_the_driver_api_is_there():
    assert stable_memory.available(0)


def test_unmap_gives_the_pages_back_and_map_takes_them_at_the_same_address():
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    buf = StableBuffer(256 * MB)
    x = buf.view(torch.float16, (1024, 1024))
    ptr = x.data_ptr()
    x.fill_(3.0)
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    assert free0 - free1 >= 250 * MB
    assert float(x.float().mean()) == 3.0
    buf.unmap()
    free2, _ = torch.cuda.mem_get_info()
    assert free2 - free1 >= 200 * MB, "the pages were not given back"
    buf.map()
    assert x.data_ptr() == ptr and buf.maps == 2
    x.fill_(5.0)
    assert float(x.float().mean()) == 5.0
    buf.close()
    torch.cuda.synchronize()
    free3, _ = torch.cuda.mem_get_info()
    assert abs(free3 - free0) <= 8 * MB


def test_a_graph_over_the_buffer_replays_after_unmap_and_map():
    buf = StableBuffer(64 * MB)
    src = buf.view(torch.float32, (1 << 20,))
    dst = buf.view(torch.float32, (1 << 20,), offset=8 * MB)
    src.copy_(torch.arange(1 << 20, device="cuda", dtype=torch.float32))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.mul(src, 2.0, out=dst)                     # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.mul(src, 2.0, out=dst)
    graph.replay()
    torch.cuda.synchronize()
    assert float(dst[12345]) == 2 * 12345.0
    buf.unmap()
    buf.map()                                            # new pages, same addresses
    src.fill_(7.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(dst, torch.full_like(dst, 14.0))
    del graph
    buf.close()


def test_map_and_unmap_from_another_thread():
    """The engine's loop thread maps, the executor's thread may unmap."""
    buf = StableBuffer(32 * MB)
    t = buf.view(torch.int32, (1024,))
    errors: list[BaseException] = []

    def other() -> None:
        try:
            buf.unmap()
            buf.map()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert not errors, errors
    t.fill_(9)
    assert int(t.sum()) == 9 * 1024
    buf.close()


def test_retired_rows_move_in_the_stable_kv_cache_as_row_by_row_copies_did():
    """(issue 15) A retire's moves go as one gather and one scatter per tensor
    (BatchRunner.apply_moves), here over the stable KV rectangle's views of one VMM buffer on
    the loop's own stream: every live row finds its own keys and values in its new slot."""
    from agile_rag.actors.batch_runner import BatchRunner
    from agile_rag.actors.kv_slots import make_slot_cache
    from agile_rag.runtime.cuda_streams import new_stream

    cache = make_slot_cache(3, 8, 2, 32, 16, torch.float16, torch.device("cuda:0"),
                            stable=True)
    for i, t in enumerate(cache.keys + cache.values):
        t.copy_(torch.arange(t.numel(), device="cuda").view(t.shape).to(t.dtype) + i)
    before = [t.clone() for t in cache.keys + cache.values]
    runner = BatchRunner.__new__(BatchRunner)
    runner.cache = cache
    # rows 0, 2, 3 and 7 of 8 end: 7 -> 0 is dropped (row 7 ended), then 6 -> 0, 5 -> 2, 4 -> 3
    moves = [(7, 0), (6, 0), (5, 2), (4, 3)]
    stream = new_stream("cuda:0")
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        runner.apply_moves(moves, 4)
    stream.synchronize()
    for t, old in zip(cache.keys + cache.values, before):
        for src, dst in ((6, 0), (1, 1), (5, 2), (4, 3)):
            assert torch.equal(t[dst], old[src])
