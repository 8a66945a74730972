"""Real model actors lending one GPU through the real VRAM arbiter (runs where CUDA is).

Two small random-weight models saved with save_pretrained and loaded by the real loaders;
a budget that fits one at a time: each job moves its model in and the other out, results
equal the CPU results, and GPU memory returns to baseline when the models are released."""
from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch

from agile_rag.actors.embedder_actor import EmbedderActor
from agile_rag.actors.messages import Describe, Embed, Rerank
from agile_rag.actors.reranker_actor import RerankerActor
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.residency import WeightResidency
from agile_rag.runtime.system import ActorSystem

from support import gpu_bytes_in_use

WORDS = ["paris", "france", "capital", "banana", "yellow", "berlin", "germany", "city", "the",
         "is", "of", "a", "fruit", "river", "cat", "dog"]


def build(folder: str, cross: bool) -> str:
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab=vocab)        # a path; vocab_file= is ignored (5 tokens)
    torch.manual_seed(1 if cross else 2)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=256, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=1024, num_labels=1,
                     initializer_range=0.5 if cross else 0.02)
    model = (BertForSequenceClassification if cross else BertModel)(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_tiny_llm(folder: str, *, hidden: int, max_positions: int,
                   words_only: bool = False) -> str:
    """A two-layer random Llama on a WORDS tokenizer with a plain chat template."""
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    os.makedirs(folder)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab=vocab)        # a path; vocab_file= is ignored (5 tokens)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}the {% endif %}")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden,
                                         intermediate_size=2 * hidden, num_hidden_layers=2,
                                         num_attention_heads=4,
                                         max_position_embeddings=max_positions,
                                         eos_token_id=3, pad_token_id=0))
    if words_only:
        with torch.no_grad():
            model.lm_head.weight[:5] = 0    # special tokens never win: the answer has words
    model.save_pretrained(folder)
    return folder


def ask_tiny_llm(folder: str, max_tokens: int, asks: list) -> tuple[list, bool]:
    """An LLM actor on the GPU (real arbiter and residency) answers each ``(prefill_chunk or
    None, prompt)`` in turn, greedily, 8 tokens: the answers, and whether it ended on the GPU."""
    from agile_rag.actors.llm_actor import LLMActor
    from agile_rag.actors.messages import Chat

    async def go():
        system = ActorSystem()
        system.spawn(VRAMArbiter(1 << 30))
        llm = LLMActor(ModelSpec("llm", "tiny", folder, folder, max_tokens=max_tokens))
        llm.residency_factory = WeightResidency
        system.spawn(llm)
        await llm.ask(Describe())
        outs = []
        for chunk, prompt in asks:
            if chunk is not None:
                llm.engine.configure(prefill_chunk=chunk)
            outs.append(await llm.ask(Chat(messages=[{"role": "user", "content": prompt}],
                                           max_tokens=8)))
        on_gpu = llm.lease.residency.on_gpu
        await system.stop_all()
        return outs, on_gpu
    return asyncio.run(go())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu-models")
    return build(str(d / "emb"), False), build(str(d / "ce"), True)


def spawn_pair(system, emb_path, ce_path, streaming: bool = True, **kw):
    params = None if streaming else {"layer_streaming": False}
    e = EmbedderActor(ModelSpec("embedder", "emb", emb_path, emb_path, **kw), params)
    r = RerankerActor(ModelSpec("reranker", "ce", ce_path, ce_path, backend="cross-encoder",
                                max_tokens=64, **kw), params)
    for a in (e, r):
        a.residency_factory = WeightResidency
        system.spawn(a)
    return e, r


DOCS = ["paris is the capital of france", "banana is a yellow fruit", "berlin is a city"]
TEXTS = ["the cat", "a river of france", "the dog is yellow"]


async def run_on(device_mode: str, folders, budget: int, streaming: bool = True):
    system = ActorSystem()
    arbiter = system.spawn(VRAMArbiter(budget))
    e, r = spawn_pair(system, *folders, streaming=streaming, device=device_mode)
    await e.ask(Describe())
    await r.ask(Describe())
    out = []
    for _ in range(3):
        out.append((await e.ask(Embed(texts=TEXTS))).vectors)
        reranked = await r.ask(Rerank(query="capital of france", documents=DOCS))
        out.append(np.asarray(reranked.scores))
    state = await arbiter.ask(Describe())
    moves = {a.name: (a.lease.residency.on_gpu if a.lease else None) for a in (e, r)}
    await system.stop_all()
    return out, state, moves, arbiter, system


def test_two_models_share_one_gpu_and_compute_what_the_cpu_computes(folders):
    torch.cuda.synchronize()
    base_mem = gpu_bytes_in_use()
    cpu_out, _, _, _, _ = asyncio.run(run_on("cpu", folders, 1 << 34))
    # budget: one model's grant (13 MB of weights + ~67 MB working memory), not the other's
    # weights beside it (with 120 MB, trimming the idle one's working memory was enough)
    budget = 90 * 2**20
    # (without layer streaming: with it, the reranker runs streamed beside the embedder)
    gpu_out, state, moves, arbiter, system = asyncio.run(run_on("flex", folders, budget,
                                                                streaming=False))
    for a, b in zip(cpu_out, gpu_out):
        assert np.allclose(a, b, atol=2e-3), f"GPU result differs from CPU: {a} vs {b}"
    gpu_events = [(ev.actor, ev.msg_type, ev.detail) for ev in system.tracer.events
                  if ev.detail]
    assert arbiter.revoked_count >= 4, f"each job should move the other model out: {gpu_events}"
    assert arbiter.peak_used <= budget
    admits = [ev for ev in system.tracer.events if ev.detail.get("admit_bytes")]
    evicts = [ev for ev in system.tracer.events if "evict_s" in ev.detail]
    assert len(admits) >= 5 and len(evicts) >= 4, gpu_events
    assert max(ev.detail["evict_s"] for ev in evicts) < 0.02, gpu_events
    torch.cuda.synchronize()
    left = gpu_bytes_in_use() - base_mem
    assert left < 16 * 2**20, f"{left} bytes still allocated after both models were released"


def test_idle_on_cpu_and_pinned_cuda_on_a_real_gpu(folders):
    async def go():
        system = ActorSystem()
        arbiter = system.spawn(VRAMArbiter(1 << 30))
        e = EmbedderActor(ModelSpec("embedder", "emb", folders[0], folders[0], device="cuda"))
        r = RerankerActor(ModelSpec("reranker", "ce", folders[1], folders[1], idle_on_cpu=True,
                                    backend="cross-encoder", max_tokens=64))
        for a in (e, r):
            a.residency_factory = WeightResidency
            system.spawn(a)
            await a.ask(Describe())
        assert e.describe().device == "cuda"
        assert next(e.model.parameters()).is_cuda
        await r.ask(Rerank(query="capital of france", documents=DOCS))
        assert not next(r.torch_module().parameters()).is_cuda      # gave the GPU back
        assert set((await arbiter.ask(Describe())).holders) == {"emb"}
        await system.stop_all()
    asyncio.run(go())


def test_the_llm_actor_generates_on_the_gpu(tmp_path):
    """Regression: the attention mask stayed on the CPU while the weights were on the GPU."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=64, max_positions=256)

    outs, on_gpu = ask_tiny_llm(folder, 256, [(None, "capital of france")] * 2)
    assert on_gpu
    assert outs[0].completion_tokens > 0 and outs[0].text == outs[1].text


def test_a_busy_llm_batch_yields_the_gpu_to_the_reranker(folders, tmp_path):
    """Chats keep the LLM's batch on the GPU; a rerank needs memory only the LLM holds. The
    LLM yields (weights evicted), the rerank runs on the GPU with the CPU's scores, and the
    chats then finish on the GPU."""
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    from agile_rag.actors.llm_actor import LLMActor
    from agile_rag.actors.messages import Chat

    folder = str(tmp_path / "llm")
    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024,
                                 num_hidden_layers=4, num_attention_heads=8,
                                 max_position_embeddings=512, eos_token_id=3,
                                 pad_token_id=0)).save_pretrained(folder)
    from transformers import BertTokenizerFast
    tok = BertTokenizerFast.from_pretrained(folders[1])
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}the {% endif %}")
    tok.save_pretrained(folder)

    async def go():
        system = ActorSystem()
        arbiter = system.spawn(VRAMArbiter(1 << 34))
        llm = LLMActor(ModelSpec("llm", "tiny", folder, folder, max_tokens=512),
                       {"gpu_min_slice_ms": 200, "batch_kv_tokens": 1024})
        r_cpu = RerankerActor(ModelSpec("reranker", "ce-cpu", folders[1], folders[1],
                                        backend="cross-encoder", max_tokens=64, device="cpu"))
        r = RerankerActor(ModelSpec("reranker", "ce", folders[1], folders[1],
                                    backend="cross-encoder", max_tokens=64))
        for a in (llm, r, r_cpu):
            a.residency_factory = WeightResidency
            system.spawn(a)
            await a.ask(Describe())
        cpu_scores = (await r_cpu.ask(Rerank(query="capital of france", documents=DOCS))).scores
        llm_need = llm.lease.residency.weight_bytes + llm.working_bytes(1)
        arbiter.budget = llm_need + 8 * 2**20           # the LLM or the reranker, not both
        chats = [Chat(messages=[{"role": "user", "content": f"capital of france {i}"}],
                      max_tokens=400) for i in range(3)]
        tasks = [asyncio.ensure_future(llm.ask(c, timeout=120)) for c in chats]
        for _ in range(400):
            if llm.engine.running and llm.lease.on_gpu:
                break
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        res = await r.ask(Rerank(query="capital of france", documents=DOCS), timeout=60)
        took = time.monotonic() - t0
        gpu_rerank = [e for e in system.tracer.events if e.msg_type == "Rerank"][-1].detail
        results = [await t for t in tasks]
        yields = [e for e in system.tracer.events if e.msg_type == "Yield"]
        await system.stop_all()
        return cpu_scores, res.scores, took, gpu_rerank, results, yields
    cpu_scores, gpu_scores, took, detail, results, yields = asyncio.run(go())
    assert yields and detail.get("admit_bytes"), detail          # it ran on the GPU
    assert took < 10, (took, detail)
    assert np.allclose(cpu_scores, gpu_scores, atol=2e-3)
    assert all(r.completion_tokens > 0 and r.finish_reason in ("length", "stop") for r in results)


def test_chunked_prefill_on_the_gpu_gives_the_same_words(tmp_path):
    """A prompt longer than prefill_chunk_tokens, read in chunks on the GPU, answers what
    one whole prefill answers (greedy)."""
    folder = build_tiny_llm(str(tmp_path / "llm"), hidden=128, max_positions=1024,
                            words_only=True)
    prompt = " ".join(WORDS * 20)

    (whole, chunked), on_gpu = ask_tiny_llm(folder, 1024, [(0, prompt), (64, prompt)])
    assert on_gpu and whole.prompt_tokens > 256 and whole.text.strip()
    assert chunked.text == whole.text and chunked.completion_tokens == whole.completion_tokens
