"""Which CUDA graph a small encoder batch runs in (actors/encoder_graphs.py; the graphs
themselves are tested on a GPU: tests/gpu/test_encoder_graphs_gpu.py)."""
from __future__ import annotations

import numpy as np

from agile_rag.actors.encoder_graphs import (
    GRAPH_MAX_TOKENS,
    EncoderGraphs,
    bucket,
    fill,
    row_bucket,
)


def test_row_buckets_are_powers_of_two_then_steps_of_sixteen():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert [row_bucket(n) for n in (17, 32, 33, 129, 244)] == [32, 32, 48, 144, 256]


def test_a_batch_runs_in_the_smallest_bucket_that_holds_it():
    assert bucket(1, 7, GRAPH_MAX_TOKENS, 512) == (1, 16)
    assert bucket(244, 30, GRAPH_MAX_TOKENS, 512) == (256, 32)
    assert bucket(100, 64, GRAPH_MAX_TOKENS, 512) == (112, 64)
    # too many tokens, or wider than every graph: eager
    assert bucket(256, 64, GRAPH_MAX_TOKENS, 512) is None
    assert bucket(4, 129, GRAPH_MAX_TOKENS, 512) is None
    # never wider than the model takes
    assert bucket(2, 40, GRAPH_MAX_TOKENS, 48) == (2, 48)
    # a smaller budget of graph tokens
    assert bucket(64, 32, 1024, 512) is None


class _Weight:
    def data_ptr(self) -> int:
        return 1


def test_the_buckets_captured_at_pin_are_every_bucket_a_batch_can_run_in():
    """What EncoderGraphs.capture_all captures when a model is pinned: every (rows, width) a
    batch of up to max_tokens maps to, and nothing else, the most tokens first."""
    for max_tokens, max_len in ((GRAPH_MAX_TOKENS, 512), (GRAPH_MAX_TOKENS, 48), (1024, 512)):
        g = EncoderGraphs(lambda f: None, {}, _Weight(), max_tokens=max_tokens,
                          max_len=max_len)
        keys = g.buckets()
        reached = {bucket(r, w, max_tokens, max_len) for w in range(1, max_len + 1)
                   for r in range(1, max_tokens + 1)} - {None}
        assert set(keys) == reached and len(keys) == len(set(keys))
        sizes = [r * w for r, w in keys]
        assert sizes == sorted(sizes, reverse=True)
    g = EncoderGraphs(lambda f: None, {}, _Weight(), max_tokens=GRAPH_MAX_TOKENS, max_len=512)
    assert len(g.buckets()) == 76


def test_padding_to_a_bucket_masks_the_new_rows_and_columns():
    ids = np.array([[101, 7, 102], [101, 102, 0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    got_ids = np.full((4, 16), -1)
    got_mask = np.full((4, 16), -1)
    fill(got_ids, ids, 0, "input_ids")
    fill(got_mask, mask, 0, "attention_mask")
    assert (got_ids[:2, :3] == ids).all() and (got_ids[:, 3:] == 0).all()
    assert (got_ids[2:] == 0).all()
    assert (got_mask[:2, :3] == mask).all() and got_mask[:2, 3:].sum() == 0
    # a padded row attends to its first position only (a fully masked row computes NaNs)
    assert got_mask[2:].tolist() == [[1] + [0] * 15] * 2


class _Engine:
    """A backend double holding graphs (real ones need CUDA)."""

    def __init__(self):
        self.graphs = object()
        self.stopped = 0

    def stop_graphs(self):
        self.graphs = None
        self.stopped += 1


def test_unpinning_or_turning_graphs_off_gives_their_memory_back_at_once():
    from agile_rag.actors.embedder_actor import EmbedderActor
    from agile_rag.runtime.liveconfig import ModelSpec

    pinned = ModelSpec("embedder", "e", "/nowhere", "/nowhere", device="cuda")
    actor = EmbedderActor(pinned)
    actor.engine = engine = _Engine()
    actor.update(pinned, {})                              # still pinned: kept
    assert engine.graphs is not None
    actor.update(pinned, {"cuda_graphs": False})          # turned off
    assert engine.graphs is None and engine.stopped == 1
    engine.graphs = object()
    actor.update(ModelSpec("embedder", "e", "/nowhere", "/nowhere", device="flex"), {})
    assert engine.graphs is None and engine.stopped == 2
    engine.graphs = object()
    actor.unload_blocking()                               # unloaded
    assert engine.stopped == 3 and actor.engine is None
