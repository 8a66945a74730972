"""An encoder actor run layer-streamed through the real residency and LayerStream (on a CPU
'device': the same hooks and slots, plain copies), chosen by the real arbiter when the whole
model does not fit: the same vectors as on the CPU, and /health-style state says so."""
from __future__ import annotations

import numpy as np

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


async def test_an_embedder_that_only_fits_streamed_runs_streamed_with_the_same_vectors():
    path = minilm_dir()
    ref_sys = ActorSystem()
    ref = ref_sys.spawn(EmbedderActor(ModelSpec("embedder", "ref", path, path, device="cpu")))
    want = (await ref.ask(Embed(texts=TEXTS), timeout=120)).vectors
    await ref_sys.stop_all()

    system = ActorSystem()
    arbiter = system.spawn(VRAMArbiter(1 << 40, grant_timeout=10))
    e = EmbedderActor(ModelSpec("embedder", "emb", path, path, device="flex"))
    e.residency_factory = cpu_streamable
    e.gpu_device = "cpu"
    system.spawn(e)
    assert (await e.ask(Describe(), timeout=120)).state == "ready"
    res = e.lease.residency
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
