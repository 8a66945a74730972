"""An encoder actor run layer-streamed through the real residency and LayerStream (on a CPU
'device': the same hooks and slots, plain copies), chosen by the real arbiter when the whole
model does not fit: the same vectors as on the CPU, and /health-style state says so."""
from __future__ import annotations

import numpy as np
import pytest

from agile_rag.actors.embedder_actor import EmbedderActor
from agile_rag.actors.messages import Describe, Embed
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.streamed_residency import StreamableResidency
from agile_rag.runtime.system import ActorSystem

from support import minilm_dir

TEXTS = ["The tide rises twice a day.", "Bread needs yeast.", ""]


def cpu_streamable(module):
    return StreamableResidency(module, pin=False, device="cpu")


async def cpu_vectors(path, texts_per_request):
    """The plain CPU model's vectors for each request's texts (what streaming must give)."""
    system = ActorSystem()
    ref = system.spawn(EmbedderActor(ModelSpec("embedder", "ref", path, path, device="cpu")))
    try:
        return [(await ref.ask(Embed(texts=t), timeout=120)).vectors for t in texts_per_request]
    finally:
        await system.stop_all()


async def streamable_embedder(path):
    """A flex embedder whose residency can stream (on a CPU 'device'), loaded, behind a real
    arbiter with a budget the caller sets: (system, arbiter, embedder, residency)."""
    system = ActorSystem()
    arbiter = system.spawn(VRAMArbiter(1 << 40, grant_timeout=10))
    e = EmbedderActor(ModelSpec("embedder", "emb", path, path, device="flex"))
    e.residency_factory = cpu_streamable
    e.gpu_device = "cpu"
    system.spawn(e)
    assert (await e.ask(Describe(), timeout=120)).state == "ready"
    return system, arbiter, e, e.lease.residency


async def test_an_embedder_that_only_fits_streamed_runs_streamed_with_the_same_vectors():
    path = minilm_dir()
    want = (await cpu_vectors(path, [TEXTS]))[0]
    system, arbiter, e, res = await streamable_embedder(path)
    assert 0 < res.stream_bytes < res.weight_bytes
    e.working_bytes = lambda items, depth=2: 64 << 20         # a fixed job size, whatever the batch
    # the whole model does not fit; its streamed mode does
    arbiter.budget = res.stream_bytes + (64 << 20) + (res.weight_bytes - res.stream_bytes) // 2
    try:
        got = (await e.ask(Embed(texts=TEXTS), timeout=120)).vectors
        assert np.allclose(got, want, atol=1e-5)
        jobs = [ev.detail for ev in system.tracer.events if ev.detail.get("gpu_mode")]
        assert jobs and jobs[-1]["gpu_mode"] == "streamed", jobs
        assert e.describe().gpu_mode == "streamed" and res.streamed
        assert arbiter.peak_used <= arbiter.budget
        # room for the whole model: the next job runs resident, same vectors
        arbiter.budget = 1 << 40
        got = (await e.ask(Embed(texts=TEXTS), timeout=120)).vectors
        assert np.allclose(got, want, atol=1e-5)
    finally:
        await system.stop_all()


async def test_a_streamed_job_of_many_forwards_runs_them_in_layer_major_groups():
    """A streamed grant with room for small forwards only: a burst of requests still has its
    layers copied once per group of forwards (LayerStream.run_group), not once per forward,
    and every vector is the CPU model's."""
    import asyncio

    path = minilm_dir()
    texts = [[f"Request {r}, text {i}: the river carries {r * i} stones to the sea."
              for i in range(8)] for r in range(12)]
    want = await cpu_vectors(path, texts)
    system, arbiter, e, res = await streamable_embedder(path)
    # room for forwards of 64 tokens (twice: one forward's working memory, and the hidden
    # states the group keeps between layers)
    e.working_bytes = lambda items, depth=2: (64 << 20) + 2 * 64 * e._token_bytes
    arbiter.budget = res.stream_bytes + e.working_bytes(1) + \
        (res.weight_bytes - res.stream_bytes) // 2
    try:
        got = await asyncio.gather(*(e.ask(Embed(texts=t), timeout=120) for t in texts))
        for g, w in zip(got, want):
            assert np.allclose(g.vectors, w, atol=1e-5)
        st = res.stats()
        forwards = sum(ev.detail.get("forwards", 0) for ev in system.tracer.events
                       if ev.msg_type == "Embed")
        assert st["group_passes"] >= 1 and st["group_forwards"] >= 2 * st["group_passes"]
        assert st["passes"] < st["group_forwards"], st       # fewer copies than forwards
        assert forwards >= st["group_forwards"]
        assert st["aborted_passes"] == 0
        jobs = [ev.detail for ev in system.tracer.events if ev.detail.get("gpu_mode")]
        assert jobs and all(j["gpu_mode"] == "streamed" for j in jobs), jobs
        groups = [ev.detail.get("layer_group", 1) for ev in system.tracer.events
                  if ev.msg_type == "Embed"]
        assert max(groups) >= 2 and max(groups) <= 32       # traced: how it ran
    finally:
        await system.stop_all()


def test_measured_speed_per_mode_is_what_a_streamed_job_is_said_to_cost():
    """An encoder times its GPU jobs per mode (seconds per padded token, jobs of at least
    RATE_MIN_TOKENS); once both modes ran, a grant request says how much longer the job would
    take streamed from those measures when that is more than the copies' estimate."""
    from types import SimpleNamespace

    from agile_rag.actors.encoder_engine import RATE_MIN_TOKENS
    from agile_rag.actors.gpu_lease import GpuLease

    path = minilm_dir()
    e = EmbedderActor(ModelSpec("embedder", "emb", path, path, device="flex"))
    assert e.stream_extra_s(100) == 0.0                      # nothing measured yet

    def job(mode, tokens, seconds, rows):
        return SimpleNamespace(gpu_mode=mode, tokens_run=tokens, busy_s=seconds, rows_run=rows)
    e._note_speed(job("streamed", RATE_MIN_TOKENS - 1, 9.0, 10))      # too small: not counted
    e._note_speed(job("streamed", 4000, 0.4, 200))                     # 1e-4 s a token
    assert e.stream_extra_s(100) == 0.0                      # the resident mode not yet
    e._note_speed(job("resident", 4000, 0.1, 200))                     # 2.5e-5 s a token
    e._note_speed(job("", 4000, 50.0, 200))                            # a CPU job: not counted
    assert e.stream_extra_s(100) == pytest.approx(100 * 20 * 7.5e-5)
    # what the lease sends: the measure when it is more than the copies' estimate
    lease = GpuLease.__new__(GpuLease)
    lease.residency = SimpleNamespace(stream_bytes=1 << 20, stream_s=lambda: 0.02)
    assert lease._stream_terms(1, 1, 0.15)["stream_s"] == pytest.approx(0.15)
    assert lease._stream_terms(1, 1, 0.0)["stream_s"] == pytest.approx(0.02)


def test_a_streamed_grant_with_room_for_two_big_forwards_runs_two_in_flight():
    """As a resident job does: with room for two forwards of at least GROUP_BELOW_TOKENS, two
    run in flight (the next one's host work overlaps the running one's compute); with room for
    one big forward, one; with room for small ones only, one at a time (or groups, below)."""
    from types import SimpleNamespace

    from agile_rag.actors.encoder_engine import GPU_DEPTH, GROUP_BELOW_TOKENS

    path = minilm_dir()
    e = EmbedderActor(ModelSpec("embedder", "emb", path, path, device="flex"))
    per = e._token_bytes

    def plan(budget, room_tokens):
        job = SimpleNamespace(budget=budget, depth=1, group=1, group_tokens=0)
        e._plan_groups(job, room_tokens * per)
        return job.depth, job.budget, job.group

    assert plan(8192, 2 * 8192) == (GPU_DEPTH, 8192, 1)
    assert plan(8192, 4 * 8192) == (GPU_DEPTH, 8192, 1)          # never past the budget
    assert plan(8192, 2 * GROUP_BELOW_TOKENS) == (GPU_DEPTH, GROUP_BELOW_TOKENS, 1)
    assert plan(8192, 6000) == (1, 6000, 1)                       # one big forward
    assert plan(8192, 1000)[:2] == (1, 1000)                      # small: one (no engine here)
    e.params = {**e.params, "stream_group_below_tokens": 1 << 30}  # every forward "small"
    assert plan(8192, 2 * 8192)[:2] == (1, 8192)                  # no two big ones in flight
