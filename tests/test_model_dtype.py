"""`dtype` in a model entry is honoured by every loader: embedders and rerankers load their
weights in it (they used to ignore it: the reranker always, the embedder for float32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from agile_rag.actors.embedder_actor import EmbedderActor
from agile_rag.actors.messages import Describe, Embed, Rerank
from agile_rag.actors.reranker_actor import RerankerActor
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.system import ActorSystem

from support import build_cross_encoder, minilm_dir

DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is in Germany."]


async def start(actor):
    system = ActorSystem()
    system.spawn(actor)
    state = await actor.ask(Describe(), timeout=120)
    assert state.state == "ready", state
    return system


def params_dtype(module) -> set:
    return {p.dtype for p in module.parameters()}


@pytest.fixture(scope="module")
def fp16_embedder(tmp_path_factory):
    from sentence_transformers import SentenceTransformer
    folder = str(tmp_path_factory.mktemp("fp16-minilm"))
    SentenceTransformer(minilm_dir(), device="cpu").half().save(folder)
    return folder


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
async def test_embedder_loads_in_the_entrys_dtype(fp16_embedder, dtype):
    """An fp16 checkpoint asked for float32 (the CPU-friendly one) or bfloat16 gets it."""
    actor = EmbedderActor(ModelSpec("embedder", "e", fp16_embedder, fp16_embedder, device="cpu",
                                    dtype=dtype))
    system = await start(actor)
    try:
        assert params_dtype(actor.model) == {getattr(torch, dtype)}
        res = await actor.ask(Embed(texts=["the capital of France", "Paris"]), timeout=60)
        v = np.asarray(res.vectors)
        assert v.shape == (2, 384) and np.isfinite(v).all()
        assert float(v[0] @ v[1]) > 0.3              # related texts stay related
    finally:
        await system.stop_all()


async def test_cross_encoder_loads_in_the_entrys_dtype(tmp_path):
    folder = build_cross_encoder(str(tmp_path / "ce"))
    ref = RerankerActor(ModelSpec("reranker", "ref", folder, folder, device="cpu",
                                  backend="cross-encoder", max_tokens=64))
    half = RerankerActor(ModelSpec("reranker", "bf16", folder, folder, device="cpu",
                                   backend="cross-encoder", max_tokens=64, dtype="bfloat16"))
    systems = [await start(ref), await start(half)]
    try:
        assert params_dtype(ref.torch_module()) == {torch.float32}
        assert params_dtype(half.torch_module()) == {torch.bfloat16}
        a = (await ref.ask(Rerank(query="capital of France", documents=DOCS), timeout=60)).scores
        b = (await half.ask(Rerank(query="capital of France", documents=DOCS), timeout=60)).scores
        # random weights with a wide init: bfloat16 moves the scores, not the order
        assert list(np.argsort(a)) == list(np.argsort(b)), (a, b)
    finally:
        for s in systems:
            await s.stop_all()


async def test_bi_encoder_reranker_loads_in_the_entrys_dtype():
    path = minilm_dir()
    actor = RerankerActor(ModelSpec("reranker", "bi", path, path, device="cpu",
                                    backend="bi-encoder", dtype="bfloat16"))
    system = await start(actor)
    try:
        assert params_dtype(actor.torch_module()) == {torch.bfloat16}
        reply = await actor.ask(Rerank(query="capital of France", documents=DOCS), timeout=60)
        scores = reply.scores
        assert int(np.argmax(scores)) == 0
    finally:
        await system.stop_all()
