"""CUDA graphs of small encoder forwards (actors/encoder_graphs.py), on a real GPU.

An embedder and a cross-encoder pinned on the GPU (``device: cuda``) answer through graphs for
small batches: the same vectors and scores as the eager forward of the same batch (float32:
1e-5; float16: 2e-3), a batch wider than every graph runs eagerly, padded rows and columns
change nothing, and ``cuda_graphs: false`` keeps every forward eager."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from test_model_actors_gpu import WORDS, build

from agile_rag.actors.embedder_actor import EmbedderActor
from agile_rag.actors.encoder_graphs import GRAPH_WIDTHS
from agile_rag.actors.encoder_tokens import Piece, split_features
from agile_rag.actors.messages import Describe, Embed, Rerank
from agile_rag.actors.reranker_actor import RerankerActor
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.residency import WeightResidency
from agile_rag.runtime.system import ActorSystem

TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 13))
         for i in range(150)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("graph-models")
    return build(str(d / "emb"), False), build(str(d / "ce"), True)


def pieces_of(engine, inputs):
    tokens = split_features(engine.features(inputs))
    return [Piece(int(n), i, tokens, i, x, None, i)      # type: ignore[arg-type]
            for i, (n, x) in enumerate(zip(tokens.lengths, inputs))]


def eager(engine, inputs):
    graphs, engine.graphs = engine.graphs, None
    try:
        return engine.forward(pieces_of(engine, inputs))
    finally:
        engine.graphs = graphs


async def pinned(cls, kind: str, name: str, folder: str, params=None, **spec_kw):
    """A new system (the real arbiter) with ``cls`` loaded from ``folder``, pinned on the GPU."""
    system = ActorSystem()
    system.spawn(VRAMArbiter(1 << 32))
    actor = cls(ModelSpec(kind, name, folder, folder, device="cuda", **spec_kw), params)
    actor.residency_factory = WeightResidency
    system.spawn(actor)
    await actor.ask(Describe())
    return system, actor


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_embedder_graphs_give_the_eager_vectors(folders, dtype, tol):
    async def go():
        system, e = await pinned(EmbedderActor, "embedder", "emb", folders[0], dtype=dtype)
        assert next(e.model.parameters()).is_cuda
        for n in (1, 3, 17, 40, 150):
            texts = TEXTS[:n]
            got = (await e.ask(Embed(texts=texts))).vectors
            want = eager(e.engine, texts)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= tol, (n, np.abs(got - want).max())
        graphs = e.engine.graphs
        assert graphs is not None and not graphs.off, graphs and graphs.off
        assert graphs.captures >= 2 and graphs.replays >= 5
        # wider than every graph: eager, same answer as before
        long_text = " ".join(WORDS * 20)
        before = graphs.replays
        got = (await e.ask(Embed(texts=[long_text]))).vectors
        assert graphs.replays == before
        assert np.abs(got - eager(e.engine, [long_text])).max() <= tol
        await system.stop_all()
    asyncio.run(go())


def test_reranker_graphs_give_the_eager_scores(folders):
    docs = TEXTS[:100]

    async def go():
        system, r = await pinned(RerankerActor, "reranker", "ce", folders[1],
                                 backend="cross-encoder", max_tokens=64)
        got = (await r.ask(Rerank(query="capital of france", documents=docs))).scores
        want = eager(r.engine, [["capital of france", d] for d in docs])
        assert np.abs(np.asarray(got) - want).max() <= 1e-5     # input order
        assert r.engine.graphs is not None and r.engine.graphs.replays >= 1
        await system.stop_all()
    asyncio.run(go())


def test_padding_of_a_graph_bucket_changes_nothing(folders):
    """Rows and columns the bucket adds are masked: a batch's rows equal each row alone."""
    async def go():
        system, e = await pinned(EmbedderActor, "embedder", "emb", folders[0])
        engine = e.engine
        engine.start_graphs(8192)
        batch = engine.forward(pieces_of(engine, TEXTS[:5]))     # 5 rows -> the 8-row graph
        alone = np.concatenate([engine.forward(pieces_of(engine, [t])) for t in TEXTS[:5]])
        assert engine.graphs.replays == 6
        assert np.abs(batch - alone).max() <= 1e-5
        await system.stop_all()
    asyncio.run(go())


def test_cuda_graphs_false_keeps_forwards_eager(folders):
    async def go():
        system, e = await pinned(EmbedderActor, "embedder", "emb", folders[0],
                                 {"cuda_graphs": False})
        await e.ask(Embed(texts=TEXTS[:10]))
        assert e.engine.graphs is None
        await system.stop_all()
    asyncio.run(go())


def test_graph_widths_are_ascending():
    assert list(GRAPH_WIDTHS) == sorted(GRAPH_WIDTHS)
    assert torch.cuda.is_available()


def test_every_bucket_is_captured_when_pinned(folders):
    """Pinning captures every bucket before the model is ready: requests only replay."""
    async def go():
        system, e = await pinned(EmbedderActor, "embedder", "emb", folders[0])
        graphs = e.engine.graphs
        assert graphs is not None and not graphs.off, graphs and graphs.off
        keys = graphs.buckets()
        assert len(graphs) == len(keys) == graphs.captures
        assert {k[1] for k in keys} <= {min(w, graphs.max_len) for w in GRAPH_WIDTHS}
        assert all(k[0] * k[1] <= graphs.max_tokens for k in keys)
        for n in (1, 3, 17, 40):
            got = (await e.ask(Embed(texts=TEXTS[:n]))).vectors
            assert np.abs(got - eager(e.engine, TEXTS[:n])).max() <= 1e-5
        assert graphs.captures == len(keys) and graphs.replays >= 4
        await system.stop_all()
    asyncio.run(go())
