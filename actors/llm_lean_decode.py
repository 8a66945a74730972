"""A lean decode step for Llama-family LLMs on the CPU (issue 17), and optionally a GPU's.

On a CPU a one-stream decode step of a small model (SmolLM2-135M: 30 layers) is dominated by
Python, not by reading the weights: transformers' forward makes ~12,000 tensor calls a step
(masks, cache bookkeeping, dtype round trips, module hooks) around 211 matmuls. This step makes
the same computation in about 20 calls a layer, straight over the batch runner's KV cache
(actors/kv_slots.py: :meth:`update` writes each row's new key and value and returns the keys to
attend over): embed, then per layer RMSNorm, q/k/v projections, rotary embedding (the model's
own ``rotary_emb`` and ``apply_rotary_pos_emb``), grouped-query attention over the cache
(:func:`~.kv_slots.grouped_decode_attention`), output projection, RMSNorm, the gated MLP (its
own activation); the final norm and the head. The projections are the model's own modules
(int4 / int8 / bf16); plain ones laid end to end (actors/llm_fused.py) run as one matmul per
input, as the int4 ones do. Int4 projections that read the same input (q, k and v; gate and
up) run as one call of the int4 kernel over their weights laid end to end
(:class:`Int4Calls`: the layers' own packed weights become views of that buffer, so nothing is
held twice), and every int4 projection calls the kernel directly: on 2 cores a kernel call on
one row takes ~14 us and the module's reshapes and casts around it another ~12 us, 210 times a
step.

On a GPU (``llm_params.gpu_lean_decode``) the batch runner captures this step in its decode
graphs instead of transformers' forward: fewer kernels a layer (one RMSNorm kernel, q and k
rotated together, one matmul for q/k/v and one for gate/up when laid end to end), where the
graph of transformers' step spends ~2 of its ~5 ms at batch 1 on ~1,400 small kernels (a 3B
Qwen on the H200, benchmarks/results/chat-http-h200-s6.md).

On a GPU the step also takes the fused forms of its small operations (``fused_ops``; a GPU's
step at batch 1 is mostly small kernels around the matmuls, ~25 a layer): each RMSNorm is
one ``F.rms_norm`` call with its weight (no float32 round trip), q and k are rotated by one
batched matmul with a rotation matrix built once a step for every layer (in place of five
elementwise kernels), the attention is torch's SDPA at every view length (the two-matmul
form wins only on a CPU), and the output and down projections add into the residual stream
in their own matmul (``addmm_``). A chunk of a prompt (:meth:`LeanDecoder.chunk`, eager or
in a chunk graph) takes them too, and so does a burst's prefill (:meth:`LeanDecoder.prefill`,
``llm_params.lean_prefill``: the prompts right-padded, each row attending causally with no mask,
q and k rotated elementwise). Each rounds once where transformers rounds twice, so the
logits differ within the half-precision rounding that :func:`agrees` allows.

Only for the architectures whose decoder layer is exactly that (Llama, Mistral without a sliding
window, Qwen2; :func:`lean_decoder` checks the modules and their attributes, else None). The
batch runner compares the first lean step with transformers' step on the same input and keeps
the lean one only when they agree (:func:`agrees`).
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import llm_rope_kv
from .kv_slots import grouped_decode_attention
from .llm_elementwise import rotate_signed, signed_sine, silu_mul, warm_silu_mul
from .llm_fused import LinearCalls, laid_end_to_end
from .llm_int4 import GROUP, INT4_ROWS, Int4Linear

log = logging.getLogger("agile_rag.llm")

#: views of at most this many keys attend through torch's SDPA kernel, longer ones through
#: two matmuls (on 2 cores, one row, 3 KV heads of 3 query heads: 18 against 45 us at 64
#: keys, 64 against 60 at 512, 250 against 121 at 2,048)
SDPA_KEYS = 256
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


class Int4Calls:
    """Int4 projections of one input as one kernel call: ``calls(x2 [rows, in] bfloat16)
    -> one [rows, out_i] per layer``. Their packed weights are laid end to end (the kernel packs
    each output row on its own: a layer's rows are a slice) and each layer's ``packed`` buffer
    becomes its slice, a view (nothing is held twice); their scales and offsets and their
    biases are concatenated (small)."""

    def __init__(self, layers: list[Int4Linear]):
        self.sizes = [lin.out_features for lin in layers]
        first = layers[0].packed
        if len(layers) == 1:
            self.packed = first
        elif laid_end_to_end([lin.packed for lin in layers]):
            # already views of one buffer (another lean decoder of this model made it)
            self.packed = first.as_strided((sum(self.sizes), first.shape[1]), first.stride())
        else:
            self.packed = torch.cat([lin.packed for lin in layers], 0)
            start = 0
            for lin in layers:
                lin.packed = self.packed[start:start + lin.out_features]
                start += lin.out_features
        self.scale_zero = layers[0].scale_zero.contiguous() if len(layers) == 1 else \
            torch.cat([lin.scale_zero for lin in layers], 1)
        biases = [lin.bias for lin in layers]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().to(torch.bfloat16) if b is not None else
             torch.zeros(n, dtype=torch.bfloat16) for b, n in zip(biases, self.sizes)])

    def whole(self, x2: torch.Tensor) -> torch.Tensor:
        """All the layers' outputs side by side: [rows, sum of out_i]."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scale_zero)
        return y + self.bias if self.bias is not None else y

    def __call__(self, x2: torch.Tensor) -> list[torch.Tensor]:
        y = self.whole(x2)
        return list(y.split(self.sizes, -1)) if len(self.sizes) > 1 else [y]

    @staticmethod
    def of(layers: list[Any]) -> Int4Calls | None:
        """For int4 projections on the CPU with bfloat16 scales; None otherwise."""
        if not all(isinstance(lin, Int4Linear) and lin.packed.device.type == "cpu" and
                   lin.scale_zero.dtype == torch.bfloat16 for lin in layers):
            return None
        if len({lin.in_features for lin in layers}) != 1:
            return None
        return Int4Calls(layers)


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

    def __init__(self, model: Any, rope: Any, fused_ops: bool | None = None,
                 rope_kv: bool = False):
        inner = model.model
        cfg = model.config
        self.model = model
        #: the fused small operations (see the module's docstring): None on a GPU only, True
        #: everywhere (tests), False never
        self.fused_ops = fused_ops
        #: a fused step over the KV rectangle rotates q and k and writes the new keys and
        #: values in one Triton kernel a layer (actors/llm_rope_kv.py; llm_params.decode_rope_kv)
        #: where it is compiled and checked on the device
        self.rope_kv = rope_kv
        #: how the fused MLP computes gate and up (:meth:`gate_up_form`; ``AGILE_RAG_GATE_UP``)
        self.gate_up = gate_up_setting()
        #: per (device, dtype): the one-kernel SiLU and product compiled and checked there
        #: (:meth:`warm_product`)
        self.product_ok: dict[tuple[torch.device, torch.dtype], bool] = {}
        #: a fused prefill rotates q and k in three kernels (:func:`rotate_signed`), not five
        #: (``AGILE_RAG_ROTATE_SIGNED=0``: five)
        self.rotate_signed = _switched_on("AGILE_RAG_ROTATE_SIGNED")
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
        self.joint_rope = _rope_is_rotate_half(rope, self.head_dim)
        #: every layer's activation is SiLU (checked on values: transformers' own class, or
        #: torch's): the fused forms may take SiLU and product as one kernel
        self.act_silu = _is_silu(inner.layers[0].mlp.act_fn) and \
            len({type(layer.mlp.act_fn) for layer in inner.layers}) == 1
        self.layers = []
        # per layer, the int4 kernel calls (None: the modules): q/k/v, o, gate/up, down
        self.int4: list[tuple[Int4Calls, Int4Calls, Int4Calls, Int4Calls] | None] = []
        # per layer, plain linear layers laid end to end (actors/llm_fused.py; a GPU's fp16
        # weights): q/k/v, o, gate/up, down as one matmul per input (None: the modules)
        self.linear: list[tuple[LinearCalls, LinearCalls, LinearCalls, LinearCalls] | None] = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((_rms_parts(layer.input_layernorm), a.q_proj, a.k_proj,
                                a.v_proj, a.o_proj, _rms_parts(layer.post_attention_layernorm),
                                m.gate_proj, m.up_proj, m.down_proj, m.act_fn))
            qkv, o_c = Int4Calls.of([a.q_proj, a.k_proj, a.v_proj]), Int4Calls.of([a.o_proj])
            gate_up, down_c = Int4Calls.of([m.gate_proj, m.up_proj]), Int4Calls.of([m.down_proj])
            if qkv is not None and o_c is not None and gate_up is not None and \
                    down_c is not None:
                self.int4.append((qkv, o_c, gate_up, down_c))
            else:
                self.int4.append(None)
            lin = (LinearCalls.of([a.q_proj, a.k_proj, a.v_proj]), LinearCalls.of([a.o_proj]),
                   LinearCalls.of([m.gate_proj, m.up_proj]), LinearCalls.of([m.down_proj]))
            self.linear.append(lin if all(c is not None for c in lin) else None)  # type: ignore

    def _calls(self, i: int, b: int, dtype: torch.dtype) -> Any:
        """Layer ``i``'s projections for ``b`` rows as kernel calls (int4 direct, or plain
        ones laid end to end), or None: the modules."""
        calls: Any = self.int4[i] if dtype == torch.bfloat16 and b <= INT4_ROWS else None
        return calls if calls is not None else self.linear[i]

    def _qkv(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             calls: Any, rot: torch.Tensor | None = None, signed: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s q [B, heads, 1, D], k and v [B, kv heads, 1, D] of the normed input
        h [B, 1, hidden], q and k rotated (by ``rot`` [B, D, D], :func:`rotation`, when
        given; else in three kernels with ``signed``, the sine of
        :func:`~.llm_elementwise.signed_sine`, when given)."""
        b = h.shape[0]
        h_n, kv_n, d = self.heads, self.kv_heads, self.head_dim
        _, q_p, k_p, v_p = self.layers[i][:4]
        if calls is not None:
            y = calls[0].whole(h.view(b, -1))
            v = y[:, (h_n + kv_n) * d:].view(b, 1, kv_n, d).transpose(1, 2)
            if self.joint_rope:
                # q's and k's heads side by side, rotated as one: [B, heads + kv heads, D]
                qk = y[:, :(h_n + kv_n) * d].view(b, h_n + kv_n, d)
                qk = torch.bmm(qk, rot) if rot is not None else \
                    rotate_signed(qk, cos, signed) if signed is not None else \
                    _rotate(qk, cos, sin)
                return qk[:, :h_n].unsqueeze(2), qk[:, h_n:].unsqueeze(2), v
            q = y[:, :h_n * d].view(b, 1, h_n, d).transpose(1, 2)
            k = y[:, h_n * d:(h_n + kv_n) * d].view(b, 1, kv_n, d).transpose(1, 2)
        else:
            q = q_p(h).view(b, 1, h_n, d).transpose(1, 2)
            k = k_p(h).view(b, 1, kv_n, d).transpose(1, 2)
            v = v_p(h).view(b, 1, kv_n, d).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        return q, k, v

    def gate_up_form(self, rows: int) -> str:
        """How the fused MLP computes gate and up for a pass of ``rows`` rows (tokens):
        ``joint``: one matmul over both layers' weights (laid end to end), gate and up strided
        views of its output; ``across``: that matmul transposed, [2 x intermediate, rows], each
        a contiguous block; ``apart``: two matmuls. An activation or a product over a strided
        view takes a GPU's unvectorized elementwise kernel. ``auto`` (the default): joint for
        fewer than :data:`ACROSS_ROWS` rows (one row's views are contiguous), across for a
        decode step's rows, apart for a prefill's (more than :data:`APART_ROWS`: a transposed
        matmul over thousands of tokens was slower on the H200,
        benchmarks/results/gpu-h200-s18.md)."""
        if self.gate_up != "auto":
            return self.gate_up
        if rows > APART_ROWS:
            return "apart"
        return "across" if rows >= ACROSS_ROWS else "joint"

    def _after_attention(self, i: int, x: torch.Tensor, o: torch.Tensor, calls: Any,
                         dtype: torch.dtype, fused: bool = False) -> torch.Tensor:
        """x [B, 1, hidden] plus layer ``i``'s output projection of the attention's o
        [B, heads x D], then plus its MLP (``fused``: added into x in place, by the
        projections' own matmuls, when they have no bias)."""
        b = x.shape[0]
        _, _, _, _, o_p, n2, gate, up, down, act = self.layers[i]
        if fused and isinstance(calls, tuple) and isinstance(calls[0], LinearCalls) and \
                o_p.bias is None and down.bias is None:
            _, _, gate_up, _ = calls
            x2 = x.view(b, -1)
            x2.addmm_(o, o_p.weight.t())
            h = _rms_fused(x2, n2)
            form = self.gate_up_form(b)
            t = gate_up.across(h) if form == "across" else None
            if t is not None:               # [gate's rows; up's rows] x the rows, contiguous
                a = self._product(t[:gate.out_features], t[gate.out_features:], act).t()
            elif form == "apart":           # two matmuls, each output contiguous
                a = self._product(F.linear(h, gate.weight, gate.bias),
                                  F.linear(h, up.weight, up.bias), act)
            else:                           # one matmul, gate and up strided views of it
                g, u = gate_up(h)
                a = self._product(g, u, act)
            x2.addmm_(a, down.weight.t())
            return x
        if calls is not None:
            _, o_c, gate_up, down_c = calls
            x = x + o_c(o)[0].view(b, 1, -1)
            h = _rms(x, n2, dtype)
            g, u = gate_up(h.view(b, -1))
            return x + down_c((act(g) * u).contiguous())[0].view(b, 1, -1)
        x = x + o_p(o.view(b, 1, -1))
        h = _rms(x, n2, dtype)
        return x + down(act(gate(h)) * up(h))

    def _product(self, g: torch.Tensor, u: torch.Tensor, act: Any) -> torch.Tensor:
        """The gated MLP's ``act(g) * u`` (a new tensor) in the fused forms: SiLU and product
        as one kernel on a CUDA device (:func:`~.llm_elementwise.silu_mul`) once its layouts
        are compiled and checked there (:meth:`warm_product`; never during a CUDA graph's
        capture: such a graph keeps torch's two kernels)."""
        if not self.act_silu or not g.is_cuda:
            return act(g).mul_(u)
        key = (g.device, g.dtype)
        ok = self.product_ok.get(key)
        if ok is None:
            if torch.cuda.is_current_stream_capturing():
                return act(g).mul_(u)
            ok = self.warm_product(g.device, g.dtype)
        return silu_mul(g, u) if ok else act(g).mul_(u)

    def warm_product(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Compile and check the one-kernel SiLU and product for ``dtype`` on ``device``
        (``AGILE_RAG_SILU_MUL=0``: never)."""
        key = (device, dtype)
        if key not in self.product_ok:
            self.product_ok[key] = _switched_on("AGILE_RAG_SILU_MUL") and \
                warm_silu_mul(device, dtype)
        return self.product_ok[key]

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: Any,
                 mask: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        h_n, kv_n, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids)
        cos, sin = self.rotary(x, pos[:, None])
        dtype = x.dtype
        store = self._stores(x, cache)
        fused, rot = self._fused(x, cos, sin, rotate=not store)
        for i, layer in enumerate(self.layers):
            calls = self._calls(i, b, dtype)
            h = _norm(x, layer[0], dtype, fused)
            if store and calls is not None:   # one kernel: q, and the new keys and values stored
                q, keys, values = cache.rope_store(calls[0].whole(h.view(b, -1)), cos, sin, i,
                                                   h_n, kv_n, d)
            else:
                q, k, v = self._qkv(i, h, cos, sin, calls, rot)
                keys, values = cache.update(k, v, i)
            if fused or mask.shape[-1] <= SDPA_KEYS:
                # each KV head's query heads as one group of queries: [B, kv heads, group, D]
                o = F.scaled_dot_product_attention(q.reshape(b, kv_n, h_n // kv_n, d), keys,
                                                   values, attn_mask=mask, scale=self.scaling)
            else:
                o, _ = grouped_decode_attention(None, q, keys, values, mask,
                                                scaling=self.scaling)
            x = self._after_attention(i, x, o.reshape(b, h_n * d), calls, dtype, fused)
        return self.head(_norm(x, self.final, dtype, fused))[:, -1, :]

    def _fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rotate: bool = True) -> tuple[bool, torch.Tensor | None]:
        """Whether this pass takes the fused small operations, and then (q and k rotated in
        one go, ``rotate``) the rotation matrix of each row, made once for every layer."""
        fused = self._takes_fused(x)
        return fused, rotation(cos, sin) if fused and self.joint_rope and rotate else None

    def _stores(self, x: torch.Tensor, cache: Any) -> bool:
        """Whether this step rotates q and k and stores the new keys and values in one kernel
        a layer (:attr:`rope_kv`): a fused step, q and k rotated as one, over a cache whose
        layout and head size the kernel takes (the KV rectangle's ``rope_store``), the kernel
        compiled and checked on the device for these heads (never during a CUDA graph's
        capture: a step captured before its check keeps the three kernels)."""
        takes = getattr(cache, "takes_rope_store", None)
        if not (self.rope_kv and self.joint_rope and self._takes_fused(x) and
                takes is not None and takes(self.head_dim)):
            return False
        args = (x.device, x.dtype, self.heads, self.kv_heads, self.head_dim)
        if not llm_rope_kv.checked(*args) and x.is_cuda and \
                torch.cuda.is_current_stream_capturing():
            return False
        return llm_rope_kv.ready(*args)

    def _takes_fused(self, x: torch.Tensor) -> bool:
        """Whether a pass over ``x`` takes the fused small operations (:attr:`fused_ops`;
        None: on a GPU)."""
        return self.fused_ops if self.fused_ops is not None else x.is_cuda

    def chunk(self, ids: torch.Tensor, pos: torch.Tensor, kv: Any,
              logits: bool = True, every_row: bool = False) -> torch.Tensor | None:
        """A few more tokens of one context (ids [1, m] at positions pos [m]) read into its
        cache ``kv`` (a chunked prefill's ``DynamicCache``, e.g. after a stored prefix, or one
        slot of the KV rectangle: actors/chunk_graphs.py): the same computation as
        transformers' forward, each token a row of the projections and the MLP, and causal
        attention (token t sees the keys at positions up to ``pos[t]``) over the keys ``kv``
        returns. The last token's logits [1, vocab]; every token's [m, vocab] with
        ``every_row``; None unless ``logits``."""
        m = ids.shape[-1]
        h_n, kv_n, d = self.heads, self.kv_heads, self.head_dim
        g = h_n // kv_n
        x = self.embed(ids.reshape(m, 1))
        cos, sin = self.rotary(x, pos.reshape(m, 1))
        dtype = x.dtype
        fused, rot = self._fused(x, cos, sin)
        mask: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            calls = self._calls(i, m, dtype)
            q, k, v = self._qkv(i, _norm(x, layer[0], dtype, fused), cos, sin, calls, rot)
            # the tokens as positions of one row: [1, kv heads, m, D]
            keys, values = kv.update(k.squeeze(2).transpose(0, 1).unsqueeze(0),
                                     v.squeeze(2).transpose(0, 1).unsqueeze(0), i)
            if mask is None:                 # token t sees every key up to its own position
                seen = torch.arange(keys.shape[-2], device=x.device)[None, :] <= \
                    pos.reshape(m, 1)
                mask = seen.repeat(g, 1)     # [group x m, keys]
            # each KV head's query heads, all their tokens, as one group of queries
            qg = q.squeeze(2).transpose(0, 1).reshape(1, kv_n, g * m, d)
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask,
                                               scale=self.scaling)
            # (reshape, not view: a GPU's memory-efficient and flash kernels return their
            # output laid out [1, m x group, kv heads, D] underneath, not contiguous)
            o = o.reshape(h_n, m, d).transpose(0, 1).reshape(m, h_n * d)
            x = self._after_attention(i, x, o, calls, dtype, fused)
        if not logits:
            return None
        rows = x if every_row else x[-1:]
        return self.head(_norm(rows, self.final, dtype, fused))[:, -1, :]

    def prefill(self, ids: torch.Tensor, last: torch.Tensor,
                store: Callable[[int, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
        """``n`` prompts read in one pass, right-padded to one length (ids [n, lp], each row's
        tokens from position 0): the same computation as transformers' forward over them, every
        token a row of the projections and the MLP, causal attention within each row (no mask:
        the padding is after a row's tokens, which never attend to it). Each layer's keys and
        values [n, kv heads, lp, D] go to ``store(layer, keys, values)`` (the padding's too:
        past a row's end, never attended, overwritten as the row decodes); the logits
        [n, vocab] of each row's token at index ``last[i]``. q and k are rotated elementwise
        here (a rotation matrix per token would be D x D for every token read)."""
        n, lp = ids.shape
        m = n * lp
        h_n, kv_n, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids.reshape(m, 1))
        pos = torch.arange(lp, device=ids.device).repeat(n)
        cos, sin = self.rotary(x, pos.reshape(m, 1))
        dtype = x.dtype
        fused = self._takes_fused(x)
        signed = signed_sine(sin) if fused and self.joint_rope and self.rotate_signed else None
        for i, layer in enumerate(self.layers):
            calls = self._calls(i, m, dtype)
            q, k, v = self._qkv(i, _norm(x, layer[0], dtype, fused), cos, sin, calls,
                                signed=signed)
            # [m, heads, 1, D] -> [n, heads, lp, D]: each row's tokens as one sequence
            q = q.reshape(n, lp, h_n, d).transpose(1, 2)
            k = k.reshape(n, lp, kv_n, d).transpose(1, 2)
            v = v.reshape(n, lp, kv_n, d).transpose(1, 2)
            store(i, k, v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                               enable_gqa=kv_n != h_n)
            x = self._after_attention(i, x, o.transpose(1, 2).reshape(m, h_n * d), calls,
                                      dtype, fused)
        rows = x.view(n, lp, -1)[torch.arange(n, device=x.device), last.to(x.device)]
        return self.head(_norm(rows[:, None, :], self.final, dtype, fused))[:, -1, :]


#: how the fused MLP computes gate and up (LeanDecoder.gate_up_form), and its bounds in rows
GATE_UP_FORMS = ("auto", "joint", "across", "apart")
ACROSS_ROWS = 8
APART_ROWS = 64


def gate_up_setting() -> str:
    """``AGILE_RAG_GATE_UP`` (one of :data:`GATE_UP_FORMS`; ``auto`` when unset or unknown)."""
    v = os.environ.get("AGILE_RAG_GATE_UP", "auto").strip().lower() or "auto"
    if v not in GATE_UP_FORMS:
        log.warning("AGILE_RAG_GATE_UP=%s is none of %s: auto", v, ", ".join(GATE_UP_FORMS))
        return "auto"
    return v


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding (``x * cos + rotate_half(x) * sin``) of x [B, H, D],
    cos and sin [B, 1, D]: the same operations in the same order as apply_rotary_pos_emb."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotation matrices M [B, D, D] with ``x @ M[b]`` what :func:`_rotate` computes for row b
    (cos and sin [B, 1, D]): ``x * cos + rotate_half(x) * sin``, where rotate_half(x)[j] is
    -x[j + D/2] for j < D/2 and x[j - D/2] after. So M is cos on the diagonal, -sin[j] at
    (j + D/2, j) and sin[j] at (j - D/2, j)."""
    b, d = cos.shape[0], cos.shape[-1]
    half = d // 2
    c, s = cos.reshape(b, d), sin.reshape(b, d)
    m = torch.diag_embed(c)
    j = torch.arange(half, device=cos.device)
    m[:, j + half, j] = -s[:, :half]
    m[:, j, j + half] = s[:, half:]
    return m


def _rope_is_rotate_half(rope: Any, head_dim: int) -> bool:
    """The model's apply_rotary_pos_emb computes what :func:`_rotate` does (checked on
    random values): then q and k are rotated in one go."""
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 3, 1, head_dim, generator=g)
        k = torch.randn(2, 1, 1, head_dim, generator=g)
        cos = torch.randn(2, 1, head_dim, generator=g)
        sin = torch.randn(2, 1, head_dim, generator=g)
        want_q, want_k = rope(q, k, cos, sin)
        both = _rotate(torch.cat([q, k], 1).squeeze(2), cos, sin)
        return torch.equal(both[:, :3], want_q.squeeze(2)) and \
            torch.equal(both[:, 3:], want_k.squeeze(2))
    except Exception:  # noqa: BLE001 - another signature or layout: the model's own function
        return False


def _switched_on(name: str) -> bool:
    """Environment switch ``name``: on unless 0, false or off."""
    return os.environ.get(name, "1").strip() not in ("0", "false", "off")


def _is_silu(act: Any) -> bool:
    """``act`` computes torch's SiLU (checked on a few values)."""
    try:
        x = torch.linspace(-6.0, 6.0, 25)
        return torch.equal(act(x), F.silu(x))
    except Exception:  # noqa: BLE001 - not a plain elementwise module
        return False


def _rms(x: torch.Tensor, parts: Any, dtype: torch.dtype) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, back to the dtype, times the
    weight."""
    w, eps = parts
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(dtype)


def _rms_fused(x: torch.Tensor, parts: Any) -> torch.Tensor:
    """The RMSNorm as one ``F.rms_norm`` call with its weight, in x's dtype (a GPU's fused
    kernel reduces in float32 and rounds once)."""
    w, eps = parts
    return F.rms_norm(x, (x.shape[-1],), weight=w, eps=eps)


def _norm(x: torch.Tensor, parts: Any, dtype: torch.dtype, fused: bool) -> torch.Tensor:
    return _rms_fused(x, parts) if fused else _rms(x, parts, dtype)


def lean_decoder(model: Any, fused_ops: bool | None = None,
                 rope_kv: bool = False) -> LeanDecoder | None:
    """The lean step for ``model``, or None when its layers are not exactly what it computes
    (``fused_ops``, ``rope_kv``: see :class:`LeanDecoder`)."""
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
        return LeanDecoder(model, rope, fused_ops, rope_kv)
    except Exception as exc:  # noqa: BLE001 - an unexpected layout: transformers' step
        log.info("no lean decode step for %s: %s", type(model).__name__, exc)
        return None


def _tolerance(full: torch.Tensor) -> tuple[float, float]:
    """(relative tolerance, scale) of a comparison with ``full``: 1e-4 in float32, else 3e-2;
    its largest magnitude (1 when all zero)."""
    return (1e-4 if full.dtype == torch.float32 else 3e-2), \
        float(full.float().abs().max()) or 1.0


def close(lean: torch.Tensor, full: torch.Tensor) -> bool:
    """Same shape, and values within ``full``'s dtype's rounding of its scale."""
    if lean.shape != full.shape:
        return False
    tol, scale = _tolerance(full)
    return torch.allclose(lean.float(), full.float(), rtol=tol, atol=tol * scale)


def agrees(lean: torch.Tensor, full: torch.Tensor) -> bool:
    """The lean step's logits match transformers' (same argmax per row; values within a
    low-precision dtype's rounding of the logits' scale: :func:`close`)."""
    if not close(lean, full):
        return False
    a, b = lean.float(), full.float()
    tol, scale = _tolerance(full)
    # the lean step's choice is transformers' choice, or a tie with it within the tolerance
    picked = b.gather(-1, a.argmax(-1, keepdim=True)).squeeze(-1)
    return bool((b.max(-1).values - picked <= tol * scale).all())
