"""GPTQ-Int4 and AWQ checkpoints through the LLM actor (CPU).

No hub: a tiny random Llama is quantized by round-to-nearest and written in each format's on-disk
layout (actors/llm_quant.py), then loaded by the real loader (transformers' from_pretrained with
gptqmodel's portable torch kernels). The checkpoint tests run everywhere; the loading tests need
the optional kernel packages (`pip install -e '.[quant]'`, not part of `make test`) and skip
without them.

On a machine without CUDA, the residency double below moves the weights the way a GPU admit does:
every parameter and buffer (qweight, qzeros, scales, g_idx, the unpack tables) is re-pointed at a
new storage (a second host buffer), and the dropped copy is zeroed after an eviction, so anything
that kept pointing at it would change the answer."""
from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest
import torch

from agile_rag.actors import llm_quant
from agile_rag.actors.llm_actor import LLMActor
from agile_rag.actors.messages import Chat, Describe, Revoke
from agile_rag.actors.vram_arbiter import VRAMArbiter
from agile_rag.runtime.liveconfig import ModelSpec
from agile_rag.runtime.residency import WeightResidency
from agile_rag.runtime.system import ActorSystem

WORDS = ["paris", "france", "capital", "banana", "yellow", "berlin", "germany", "city", "the",
         "is", "of", "a", "fruit", "river", "cat", "dog", "red", "blue", "sea", "sky", "big",
         "small", "old", "new", "and", "or", "in", "on", "to", "from", "with", "green"]
GROUP = 32

_missing = [p for p in ("gptqmodel", "optimum") if importlib.util.find_spec(p) is None]
needs_kernels = pytest.mark.skipif(
    bool(_missing), reason=f"GPTQ/AWQ kernels not installed ({', '.join(_missing)} missing): "
                           "pip install -e '.[quant]' (see README, 'Quantized LLMs')")


def build_float_llm(folder: str, seed: int = 0):
    """A tiny random Llama with a word-level tokenizer and a chat template (float32)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                  bos_token="[CLS]", eos_token="[SEP]")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}the {% endif %}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=3, pad_token_id=0,
                      bos_token_id=2, tie_word_embeddings=True, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():        # special tokens (EOS too) never win: answers run to max_tokens
        model.model.embed_tokens.weight[:5] = 0
    return model, tok


def write(fmt: str, folder: str):
    model, tok = build_float_llm(folder + "-float", seed=1 if fmt == "gptq" else 2)
    writer = llm_quant.write_gptq_checkpoint if fmt == "gptq" else llm_quant.write_awq_checkpoint
    writer(model, tok, folder, group_size=GROUP)
    return model, tok             # model: the float reference (dequantised weights)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    return {fmt: (str(d / fmt), *write(fmt, str(d / fmt))) for fmt in ("gptq", "awq")}


# ---- the on-disk layouts (no kernel package needed) ---------------------------------------------
def _unpack_rows(packed):       # int32 [R, C] -> [R*8, C]
    p = packed.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(p >> (4 * j)) & 0xF for j in range(8)], 1).reshape(-1, packed.shape[1])


def _unpack_cols(packed, order=range(8)):     # int32 [R, C] -> [R, C*8]
    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(packed.shape[0], packed.shape[1], 8, dtype=torch.int64)
    for j, src in enumerate(order):
        out[:, :, src] = (p >> (4 * j)) & 0xF
    return out.reshape(packed.shape[0], -1)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_checkpoint_layout_decodes_to_the_reference_weights(checkpoints, fmt):
    """Decode each layer by the format's own definition; it equals the reference weights."""
    import json

    from safetensors.torch import load_file

    folder, ref, _ = checkpoints[fmt]
    state = load_file(os.path.join(folder, "model.safetensors"))
    q = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    assert q["quant_method"] == fmt and q["bits"] == 4 and q["group_size"] == GROUP
    assert llm_quant.quant_method(folder) == fmt
    names = llm_quant.quantized_linear_names(ref)
    assert len(names) == 14                              # 7 linears x 2 layers; lm_head stays float
    for name in names:
        w = dict(ref.named_modules())[name].weight.detach()
        out_f, in_f = w.shape
        scales = state[f"{name}.scales"].float()
        assert scales.shape == (in_f // GROUP, out_f) and state[f"{name}.scales"].dtype == \
            torch.float16
        if fmt == "gptq":
            assert state[f"{name}.qweight"].shape == (in_f // 8, out_f)
            qw = _unpack_rows(state[f"{name}.qweight"])                      # [in, out]
            zeros = _unpack_cols(state[f"{name}.qzeros"]) + 1                  # v1 stores z-1
            g_idx = state[f"{name}.g_idx"].long()
            assert torch.equal(g_idx, torch.arange(in_f) // GROUP)
        else:
            assert state[f"{name}.qweight"].shape == (in_f, out_f // 8)
            qw = _unpack_cols(state[f"{name}.qweight"], llm_quant.AWQ_ORDER)
            zeros = _unpack_cols(state[f"{name}.qzeros"], llm_quant.AWQ_ORDER)
            g_idx = torch.arange(in_f) // GROUP
        deq = (qw - zeros[g_idx]) * scales[g_idx]                             # [in, out]
        assert torch.allclose(deq.t(), w.float(), atol=1e-6), name
        assert (w - w.mean()).abs().max() > 0                                 # not all zero
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state


def test_a_quantized_checkpoint_without_the_kernels_fails_with_the_reason(checkpoints,
                                                                          monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gptqmodel" else real(name, *a))

    async def go():
        system = ActorSystem()
        folder = checkpoints["awq"][0]
        llm = system.spawn(LLMActor(ModelSpec("llm", "awq", folder, folder)))
        state = await llm.ask(Describe(), timeout=60)
        await system.stop_all()
        return state
    state = asyncio.run(go())
    assert state.state == "failed" and "gptqmodel" in state.error and "quant" in state.error


# ---- loading and moving (needs gptqmodel + optimum) ---------------------------------------------
class HostMoveResidency(WeightResidency):
    """The real residency with a second host buffer standing in for the GPU (see the module
    docstring). Counts moves; zeroes each dropped copy."""

    def __init__(self, module):
        super().__init__(module, pin=False)
        self.admits = self.evicts = 0
        self.copy = None

    def admit(self, device="cuda"):
        with self._lock:
            if self._gpu is not None:
                return {"bytes": 0, "seconds": 0.0}
            copy = self._host.clone()
            with torch.inference_mode(self._inference):
                self._rebind(self._typed_views(copy))
            self._gpu = self.copy = copy
            self.admits += 1
            return {"bytes": self._nbytes, "seconds": 0.0}

    def evict(self):
        stats = super().evict()
        if self.copy is not None:
            self.copy.zero_()                   # stale pointers now read zeros
            self.copy = None
            self.evicts += 1
        return stats


def _chat(text: str, n: int = 12) -> Chat:
    return Chat(messages=[{"role": "user", "content": text}], max_tokens=n)


def _inside(t: torch.Tensor, buf: torch.Tensor) -> bool:
    lo = buf.data_ptr()
    return lo <= t.data_ptr() < lo + buf.numel()


@needs_kernels
@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_quantized_llm_answers_the_same_after_evict_and_admit(checkpoints, fmt):
    folder, ref, tok = checkpoints[fmt]

    async def go():
        system = ActorSystem()
        system.spawn(VRAMArbiter(1 << 30, grant_timeout=30))
        llm = LLMActor(ModelSpec("llm", fmt, folder, folder, max_tokens=256))
        llm.residency_factory = HostMoveResidency
        llm.gpu_device = "cpu"
        system.spawn(llm)
        state = await llm.ask(Describe(), timeout=300)
        assert state.state == "ready", state
        model = llm.model
        mods = llm_quant.quant_modules(model)
        assert len(mods) == 14
        assert {type(m).__name__ for m in mods} == \
            {"gptq": {"TorchLinear"}, "awq": {"AwqTorchLinear"}}[fmt]
        assert model.dtype == torch.float16

        # the loaded model computes what the float reference computes
        ids = tok("paris is the capital of france", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = ref(ids).logits.float()
            got = model(ids).logits.float()
        assert (got - want).abs().max() < 0.02 * want.abs().max(), (got - want).abs().max()

        res = llm.lease.residency
        assert isinstance(res, llm_quant.QuantResidency)
        outs = [await llm.ask(_chat("capital of france"), timeout=300)]     # admits
        assert res.admits == 1 and res.on_gpu
        for m in mods:                  # every tensor the kernel reads lives in the admitted copy
            for name, t in m.named_buffers():
                assert _inside(t, res.copy), f"{name} did not move"
        await llm.ask(Revoke(model="llm"), timeout=60)                      # evicts (and zeroes)
        assert res.evicts == 1 and not res.on_gpu
        assert llm_quant.kernel_state(model) == []          # no cache left on the old copy
        outs.append(await llm.ask(_chat("capital of france"), timeout=300))  # admits again
        assert res.admits == 2
        await llm.ask(Revoke(model="llm"), timeout=60)
        with torch.no_grad():            # and on the host master copy, outside the actor
            again = model(ids).logits.float()
        assert torch.equal(again, got)
        await system.stop_all()
        return outs
    outs = asyncio.run(go())
    assert outs[0].completion_tokens >= 4, outs[0]
    assert (outs[1].text, outs[1].completion_tokens, outs[1].finish_reason) == \
        (outs[0].text, outs[0].completion_tokens, outs[0].finish_reason)
