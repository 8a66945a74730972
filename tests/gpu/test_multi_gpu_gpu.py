"""Several GPUs in one process (issue 18), on real cards: skipped unless there are two.

Real model actors (small random-weight models saved with save_pretrained, the real loaders),
the real VRAM arbiter with one budget per card and the real residency: a model pinned to each
card computes there what the CPU computes, a flex model goes to the card with room, a hot
device flip moves a pinned model from cuda:0 to cuda:1 and leaves nothing on cuda:0, an LLM
pinned to cuda:1 (its batch loop and CUDA graphs on that card) answers what it answers on
cuda:0, and when the models are stopped no tensor is left behind on either card."""
from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from test_model_actors_gpu import DOCS, TEXTS, build, build_tiny_llm

from agile_rag.actors.embedder_actor import EmbedderActor
from agile_rag.actors.messages import Chat, Describe, Embed, Rerank, UpdateModel
from agile_rag.actors.reranker_actor import RerankerActor
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.residency import WeightResidency
from agile_rag.runtime.system import ActorSystem

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two CUDA devices (torch.cuda.device_count() >= 2)")

CARDS = ("cuda:0", "cuda:1")


def allocated() -> dict[str, int]:
    """Bytes held by live tensors on each card (cuBLAS workspaces cleared first)."""
    out = {}
    for i in range(len(CARDS)):
        torch.cuda.synchronize(i)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    for i, card in enumerate(CARDS):
        out[card] = torch.cuda.memory_allocated(i)
    return out


def device_of(module) -> str:
    return str(next(module.parameters()).device)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi-gpu-models")
    return build(str(d / "emb"), False), build(str(d / "ce"), True)


def spawn(system, cls, spec, **kw):
    actor = cls(spec, {"layer_streaming": False}, **kw)
    actor.residency_factory = WeightResidency
    system.spawn(actor)
    return actor


async def results(e, r) -> list:
    out = [(await e.ask(Embed(texts=TEXTS))).vectors]
    out.append(np.asarray((await r.ask(Rerank(query="capital of france",
                                              documents=DOCS))).scores))
    return out


async def on_cpu(folders) -> list:
    system = ActorSystem()
    e = spawn(system, EmbedderActor, ModelSpec("embedder", "emb", folders[0], folders[0],
                                               device="cpu"))
    r = spawn(system, RerankerActor, ModelSpec("reranker", "ce", folders[1], folders[1],
                                               device="cpu", backend="cross-encoder",
                                               max_tokens=64))
    await e.ask(Describe())
    await r.ask(Describe())
    out = await results(e, r)
    await system.stop_all()
    return out


def close(a: list, b: list) -> bool:
    return all(np.allclose(x, y, atol=2e-3) for x, y in zip(a, b))


def test_a_model_pinned_to_each_card_and_a_hot_flip(folders):
    base = allocated()
    want = asyncio.run(on_cpu(folders))

    async def go():
        system = ActorSystem()
        arbiter = system.spawn(VRAMArbiter({c: 1 << 30 for c in CARDS}))
        espec = ModelSpec("embedder", "emb", folders[0], folders[0], device="cuda")   # cuda:0
        e = spawn(system, EmbedderActor, espec)
        r = spawn(system, RerankerActor, ModelSpec(
            "reranker", "ce", folders[1], folders[1], device="cuda", gpu=1,
            backend="cross-encoder", max_tokens=64))
        await e.ask(Describe())
        await r.ask(Describe())
        assert (device_of(e.torch_module()), device_of(r.torch_module())) == CARDS
        assert (e.describe().gpu, r.describe().gpu) == CARDS
        assert close(await results(e, r), want)
        mid = allocated()
        assert mid["cuda:0"] > base["cuda:0"] and mid["cuda:1"] > base["cuda:1"]

        # the hot flip: cuda:0 -> cuda:1 (what the config actor sends on a liveconfigs edit)
        await e.ask(UpdateModel(spec=dataclasses.replace(espec, gpu=1), params=e.params))
        assert device_of(e.torch_module()) == "cuda:1" and e.describe().gpu == "cuda:1"
        state = await arbiter.ask(Describe())
        assert state.placement == {"emb": "cuda:1", "ce": "cuda:1"}
        assert state.devices["cuda:0"]["used"] == 0
        assert close(await results(e, r), want)
        after = allocated()
        left = after["cuda:0"] - base["cuda:0"]
        assert left < 16 * 2**20, f"{left} bytes left on cuda:0 after the flip"
        await system.stop_all()

    asyncio.run(go())
    end = allocated()
    for card in CARDS:
        left = end[card] - base[card]
        assert left < 16 * 2**20, f"{left} bytes still allocated on {card} after the stop"


def test_a_flex_model_goes_to_the_card_with_room(folders):
    base = allocated()
    want = asyncio.run(on_cpu(folders))

    async def go():
        system = ActorSystem()
        arbiter = system.spawn(VRAMArbiter({c: 1 << 30 for c in CARDS}))
        e = spawn(system, EmbedderActor, ModelSpec("embedder", "emb", folders[0], folders[0],
                                                   device="cuda"))
        r = spawn(system, RerankerActor, ModelSpec(
            "reranker", "ce", folders[1], folders[1], device="flex",
            backend="cross-encoder", max_tokens=64))
        await e.ask(Describe())
        await r.ask(Describe())
        # cuda:0 holds the pinned embedder and nothing more; cuda:1 has room
        arbiter.budgets["cuda:0"] = arbiter.used_on("cuda:0") + 2**20
        got = await results(e, r)
        assert close(got, want)
        assert device_of(r.torch_module()) == "cuda:1" and r.describe().gpu == "cuda:1"
        state = await arbiter.ask(Describe())
        assert state.placement == {"emb": "cuda:0", "ce": "cuda:1"}
        assert arbiter.revoked_count == 0
        grants = [ev.detail for ev in system.tracer.events
                  if ev.msg_type == "RequestGrant" and "granted" in ev.detail]
        assert {d["model"]: d["device"] for d in grants} == {"emb": "cuda:0", "ce": "cuda:1"}
        await system.stop_all()

    asyncio.run(go())
    end = allocated()
    for card in CARDS:
        assert end[card] - base[card] < 16 * 2**20, (card, end, base)


def test_an_llm_pinned_to_card_one_answers_as_on_card_zero(tmp_path):
    """The batch loop (and its CUDA graphs) run with the grant's card as the current device."""
    from agile_rag.actors.llm_actor import LLMActor

    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=64, max_positions=256)
    base = allocated()

    async def ask(gpu: int):
        system = ActorSystem()
        system.spawn(VRAMArbiter({c: 1 << 30 for c in CARDS}))
        llm = LLMActor(ModelSpec("llm", "tiny", folder, folder, max_tokens=256, device="cuda",
                                 gpu=gpu))
        llm.residency_factory = WeightResidency
        system.spawn(llm)
        await llm.ask(Describe())
        outs = await asyncio.gather(*(llm.ask(Chat(
            messages=[{"role": "user", "content": p}], max_tokens=8))
            for p in ("capital of france", "the cat", "a river") * 2))
        where = device_of(llm.torch_module()), llm.describe().gpu
        await system.stop_all()
        return [o.text for o in outs], where

    texts0, where0 = asyncio.run(ask(0))
    texts1, where1 = asyncio.run(ask(1))
    assert where0 == ("cuda:0", "cuda:0") and where1 == ("cuda:1", "cuda:1")
    assert texts1 == texts0 and all(texts0)
    end = allocated()
    for card in CARDS:
        assert end[card] - base[card] < 16 * 2**20, (card, end, base)
