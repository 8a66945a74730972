"""liveconfigs.json parsing: the seed's example with its comments, defaults, every error."""
from __future__ import annotations

import json
import os

import pytest

from agile_rag.runtime.liveconfig import LiveConfigError, parse_text

from support import MINILM, ROOT, SMOLLM

SEED = os.path.join(os.path.dirname(__file__), "data", "seed_liveconfigs.json")


def seed_text_with_test_paths() -> str:
    """The seed README's example verbatim, only its model paths pointed at the test models."""
    text = open(SEED, encoding="utf-8").read()
    for old in ("/home/usr/codes/models/qwen7b/qwen/Qwen2-7B-Instruct-AWQ",
                "/home/usr/codes/models/models/qwen/Qwen1___5-7B-Chat-GPTQ-Int4"):
        text = text.replace(old, SMOLLM)
    for old in ("/home/usr/codes/models/bge-m3", "/home/usr/codes/models/m3e-base",
                "/home/usr/codes/models/bce-reranker-base_v1",
                "/home/usr/codes/models/bge_reranker/AI-ModelScope/bge-reranker-v2-m3"):
        text = text.replace(old, MINILM)
    return text


def test_the_seed_example_loads_with_its_comments_and_trailing_commas():
    cfg = parse_text(seed_text_with_test_paths(), os.path.join(ROOT, "liveconfigs.json"))
    assert cfg.standby["llm"] == ("qwen7b",)
    assert cfg.standby["embedder"] == ("bge-m3", "m3e-base")
    assert cfg.standby["reranker"] == ("bce", "bge_v2m3")
    q = cfg.spec("llm", "qwen7b")
    assert q.device == "flex" and q.max_tokens == 2048 and q.size_est == 5800
    assert cfg.spec("reranker", "bge_v2m3").cuda_thres == 8
    assert cfg.spec("reranker", "bce").idle_on_cpu is True
    assert cfg.llm_params["default_temp"] == 0.5
    assert cfg.embedder_params["token_estimation"] == "len"
    assert cfg.reranker_params["top_n"] == 9999


def test_the_default_liveconfigs_json_loads():
    path = os.path.join(ROOT, "liveconfigs.json")
    cfg = parse_text(open(path, encoding="utf-8").read(), path)
    assert cfg.standby["llm"] and cfg.standby["embedder"] and cfg.standby["reranker"]
    assert cfg.warnings == ()


def base():
    return {"standby_llms": ["a"], "llms": {"a": {"llm_path": SMOLLM, "device": "cpu"}}}


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c.update(standby_llms=["ghost"]), "'ghost', which has no entry"),
    (lambda c: c["llms"]["a"].update(device="gpu"), "device is 'gpu'"),
    (lambda c: c["llms"]["a"].update(llm_path="/no/such/model"), "does not exist"),
    (lambda c: c["llms"]["a"].update(llm_path="pkg:not_installed_pkg/x"), "not installed"),
    (lambda c: c["llms"]["a"].update(max_tokens="many"), "max_tokens"),
    (lambda c: c["llms"]["a"].update(idle_on_cpu="yes"), "idle_on_cpu"),
    (lambda c: c.update(llm_params={"default_temp": 9}), "default_temp"),
    (lambda c: c.update(llm_params={"continuous_batching": "yes"}), "continuous_batching"),
    (lambda c: c.update(llm_params={"max_batch_size": 2.5}), "max_batch_size"),
    (lambda c: c.update(llm_params={"gpu_min_slice_ms": -5}), "gpu_min_slice_ms"),
    (lambda c: c.update(embedder_params={"token_estimation": "words"}), "token_estimation"),
    (lambda c: c.update(reranker_params={"top_n": 0}), "top_n"),
    (lambda c: c.update(reranker_params={"stream_group_below_tokens": 0}),
     "reranker_params.stream_group_below_tokens"),
    (lambda c: c.update(standby_llms="a"), "standby_llms must be a list"),
])
def test_every_problem_is_reported(mutate, needle):
    cfg = base()
    mutate(cfg)
    with pytest.raises(LiveConfigError) as info:
        parse_text(json.dumps(cfg))
    assert needle in str(info.value)


def test_syntax_errors_and_many_problems_at_once():
    with pytest.raises(LiveConfigError, match="not valid JSON"):
        parse_text('{"standby_llms": [}')
    cfg = base()
    cfg["llms"]["a"]["device"] = "gpu"
    cfg["standby_embedders"] = ["nope"]
    with pytest.raises(LiveConfigError) as info:
        parse_text(json.dumps(cfg))
    assert len(info.value.problems) == 2


def test_unknown_keys_are_warnings_not_errors():
    cfg = base()
    cfg["llms"]["a"]["devcie"] = "cpu"
    parsed = parse_text(json.dumps(cfg))
    assert any("devcie" in w for w in parsed.warnings)


def test_a_removed_llm_param_still_loads():
    """llm_params.burst_linger_ms was removed in session 24 (it never waited on a GPU): a
    liveconfigs.json that still names it loads, the key ignored (a value it once refused, -1 or
    "x", no longer stops a reload)."""
    for value in (8, -1, "x"):
        cfg = base()
        cfg["llm_params"] = {"burst_linger_ms": value}
        parsed = parse_text(json.dumps(cfg))
        assert parsed.llm_params["burst_linger_ms"] == value
