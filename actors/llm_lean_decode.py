"""A lean decode step for Llama-family LLMs on the CPU (issue 17).

On a CPU a one-stream decode step of a small model (SmolLM2-135M: 30 layers) is dominated by
Python, not by reading the weights: transformers' forward makes ~12,000 tensor calls a step
(masks, cache bookkeeping, dtype round trips, module hooks) around 211 matmuls. This step makes
the same computation in about 20 calls a layer, straight over the batch runner's KV cache
(actors/kv_slots.py: :meth:`update` writes each row's new key and value and returns the keys to
attend over): embed, then per layer RMSNorm, q/k/v projections, rotary embedding (the model's
own ``rotary_emb`` and ``apply_rotary_pos_emb``), grouped-query attention over the cache
(:func:`~.kv_slots.grouped_decode_attention`), output projection, RMSNorm, the gated MLP (its
own activation); the final norm and the head. The projections are the model's own modules
(int4 / int8 / bf16).

Only for the architectures whose decoder layer is exactly that (Llama, Mistral without a sliding
window, Qwen2; :func:`lean_decoder` checks the modules and their attributes, else None). The
batch runner compares the first lean step with transformers' step on the same input and keeps
the lean one only when they agree (:func:`agrees`).
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F

from .kv_slots import grouped_decode_attention

log = logging.getLogger("agile_rag.llm")

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


def _rms_parts(norm: Any) -> tuple[torch.Tensor, float] | None:
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if not isinstance(w, torch.Tensor) or not isinstance(eps, float) or \
            "RMSNorm" not in type(norm).__name__ or list(norm.children()):
        return None
    return w, eps


class LeanDecoder:
    """``decoder(ids [B, 1], pos [B], cache, mask [B, 1, 1, L]) -> logits [B, vocab]``, the cache
    bound to the step's rows, positions and view (as transformers' step is)."""

    def __init__(self, model: Any, rope: Any):
        inner = model.model
        cfg = model.config
        self.model = model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.rope = rope
        self.head = model.lm_head
        self.heads = cfg.num_attention_heads
        attn0 = inner.layers[0].self_attn
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = int(attn0.head_dim)
        self.scaling = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.final = _rms_parts(inner.norm)
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((_rms_parts(layer.input_layernorm), a.q_proj, a.k_proj,
                                a.v_proj, a.o_proj, _rms_parts(layer.post_attention_layernorm),
                                m.gate_proj, m.up_proj, m.down_proj, m.act_fn))

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: Any,
                 mask: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        h_n, kv_n, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids)
        cos, sin = self.rotary(x, pos[:, None])
        dtype = x.dtype
        for i, (n1, q_p, k_p, v_p, o_p, n2, gate, up, down, act) in enumerate(self.layers):
            h = _rms(x, n1, dtype)
            q = q_p(h).view(b, 1, h_n, d).transpose(1, 2)
            k = k_p(h).view(b, 1, kv_n, d).transpose(1, 2)
            v = v_p(h).view(b, 1, kv_n, d).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            keys, values = cache.update(k, v, i)
            o, _ = grouped_decode_attention(None, q, keys, values, mask, scaling=self.scaling)
            x = x + o_p(o.reshape(b, 1, h_n * d))
            h = _rms(x, n2, dtype)
            x = x + down(act(gate(h)) * up(h))
        return self.head(_rms(x, self.final, dtype))[:, -1, :]


def _rms(x: torch.Tensor, parts: Any, dtype: torch.dtype) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, back to the dtype, times the
    weight."""
    w, eps = parts
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(dtype)


def lean_decoder(model: Any) -> LeanDecoder | None:
    """The lean step for ``model``, or None when its layers are not exactly what it computes."""
    try:
        cfg = model.config
        arch = type(model).__name__
        if arch not in ARCHITECTURES or getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            return None
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            return None
        inner = model.model
        if _rms_parts(inner.norm) is None or not hasattr(inner, "rotary_emb"):
            return None
        for layer in inner.layers:
            names = {n for n, _ in layer.self_attn.named_children()}
            if names != _ATTN_CHILDREN or \
                    {n for n, _ in layer.mlp.named_children()} != _MLP_CHILDREN:
                return None
            if _rms_parts(layer.input_layernorm) is None or \
                    _rms_parts(layer.post_attention_layernorm) is None:
                return None
            if {n for n, _ in layer.named_children()} != \
                    {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}:
                return None
        rope = getattr(sys.modules.get(type(inner.layers[0].self_attn).__module__),
                       "apply_rotary_pos_emb", None)
        if rope is None:
            return None
        return LeanDecoder(model, rope)
    except Exception as exc:  # noqa: BLE001 - an unexpected layout: transformers' step
        log.info("no lean decode step for %s: %s", type(model).__name__, exc)
        return None


def agrees(lean: torch.Tensor, full: torch.Tensor) -> bool:
    """The lean step's logits match transformers' (same argmax per row; values within a
    low-precision dtype's rounding of the logits' scale)."""
    if lean.shape != full.shape:
        return False
    a, b = lean.float(), full.float()
    scale = float(b.abs().max()) or 1.0
    tol = 1e-4 if full.dtype == torch.float32 else 3e-2
    if not torch.allclose(a, b, rtol=tol, atol=tol * scale):
        return False
    # the lean step's choice is transformers' choice, or a tie with it within the tolerance
    picked = b.gather(-1, a.argmax(-1, keepdim=True)).squeeze(-1)
    return bool((b.max(-1).values - picked <= tol * scale).all())
