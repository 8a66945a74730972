"""The KV rectangle the batch runner's decode step writes into and reads over: per layer keys and
values ``[slots, kv_heads, length, head_dim]`` (rows of different lengths share a step through a
per-row write position and an additive ``[B, 1, 1, L]`` mask), optionally in one stable GPU
buffer (runtime/stable_memory.py), and the grouped-query attention the decode step runs over
it. The block cache (actors/kv_paged.py) speaks the same protocol (:class:`ViewCache`)."""
from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from ..runtime import stable_memory
from . import llm_rope_kv

log = logging.getLogger("agile_rag.llm")


# ---- attention for the decode step -------------------------------------------------------------
DECODE_ATTN = "agile_grouped_decode"
_registered: bool | None = None


def grouped_decode_attention(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, **kwargs):
    """One new token per row against its rows' keys, without ``repeat_kv``: the query heads of
    each KV head attend as one group, so grouped-query models read each key once instead of
    materialising ``heads / kv_heads`` copies per layer per step. Anything else (prefill, no
    4D mask) goes to transformers' SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    b, h, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, h // hkv, d)            # head i uses KV head i // (h / hkv)
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale + attention_mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)                    # [B, kv_heads, group, D]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def _register_decode_attention() -> bool:
    global _registered
    if _registered is None:
        try:
            from transformers import AttentionInterface
            AttentionInterface.register(DECODE_ATTN, grouped_decode_attention)
            try:
                from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
                AttentionMaskInterface.register(DECODE_ATTN, sdpa_mask)
            except ImportError:
                pass
            _registered = True
        except Exception as exc:  # noqa: BLE001 - older transformers: keep SDPA
            log.info("grouped decode attention unavailable: %s", exc)
            _registered = False
    return _registered


# ---- every layer's keys and values as one tensor -----------------------------------------------
def layers_stacked(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """Per-layer ``(keys, values)`` of one shape, strides and dtype that lie at regular distances
    in one storage (a layer's keys to the next layer's, a layer's keys to its values) as one view
    ``[layers, 2, *shape]``: one copy kernel then reads or writes every layer, where a copy per
    tensor was 2 x layers launches (72 for a 3B Qwen). None when they do not lie so."""
    if not pairs:
        return None
    k0, v0 = pairs[0]
    size = k0.element_size()
    base = k0.data_ptr()
    storage = k0.untyped_storage().data_ptr()
    step = (pairs[1][0].data_ptr() - base) // size if len(pairs) > 1 else 0
    apart = (v0.data_ptr() - base) // size
    if step < 0 or apart < 0:
        return None
    for i, pair in enumerate(pairs):
        for j, t in enumerate(pair):
            if t.shape != k0.shape or t.stride() != k0.stride() or t.dtype != k0.dtype or \
                    t.device != k0.device or t.untyped_storage().data_ptr() != storage or \
                    t.data_ptr() != base + (i * step + j * apart) * size:
                return None
    return k0.as_strided((len(pairs), 2, *k0.shape), (step, apart, *k0.stride()),
                         k0.storage_offset())


def into_slot(whole: torch.Tensor, slot: int, src: torch.Tensor | None, n: int) -> bool:
    """One row's first ``n`` keys and values of every layer, ``src`` ``[layers, 2, 1,
    kv_heads, >= n, head_dim]``, into slot ``slot`` of a cache's ``whole``
    (``[layers, 2, slots, kv_heads, length, head_dim]``) in one copy; False (nothing copied)
    where ``src`` is None or not of that shape."""
    if src is None or src.dim() != 6 or src.shape[:3] != (whole.shape[0], 2, 1) or \
            src.shape[3] != whole.shape[3] or src.shape[5] != whole.shape[5] or \
            src.shape[4] < n or whole.shape[4] < n or src.dtype != whole.dtype:
        return False
    whole[:, :, slot, :, :n].copy_(src[:, :, 0, :, :n])
    return True


# ---- the KV cache the model writes into -------------------------------------------------------
class _SlotLayer:
    """Duck-typed cache layer (no transformers base class: its abstract API moves between
    versions); the model only calls ``update`` on the cache."""
    is_sliding = False
    is_compileable = True
    is_croppable = False
    supports_early_init = False
    is_initialized = True

    def __init__(self, cache: Any, idx: int):
        # a proxy, not a reference: a cache whose layers pointed back at it would be a cycle,
        # freed only by a full collection (~0.3 s with the GIL held on a heap not yet frozen:
        # a CPU-only LLM's idle cleanup stalled the next chat that long). Dropped, the cache
        # and its tensors now go at once
        self.cache, self.idx = weakref.proxy(cache), idx

    def get_seq_length(self) -> int:
        return int(self.cache.view_len)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.view_len, 0

    def get_max_length(self) -> int:
        return int(self.cache.length)


class ViewCache:
    """What transformers asks of our caches (the KV rectangle, the block pool): a step attends
    over ``view_len`` keys of at most ``length``; ``keys`` / ``values`` are the per-layer
    tensors. Mixed in before transformers' ``Cache``, whose import stays lazy."""
    view_len: int
    length: int
    keys: list
    values: list

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.view_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *a) -> tuple[int, int]:
        return self.view_len, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def _start(self, cache_cls: Any) -> None:
        """transformers' ``Cache.__init__`` with an empty layer list (filled by the subclass)."""
        layers: list = []
        try:
            cache_cls.__init__(self, layers=layers)
        except TypeError:                                  # other transformers versions
            self.layers = layers


def make_slot_cache(n_layers: int, slots: int, kv_heads: int, length: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device, *, stable: bool = False) -> Any:
    """The KV rectangle: per layer keys and values of ``slots`` rows x ``length`` positions,
    zeroed. ``stable`` (CUDA): in one :class:`~agile_rag.runtime.stable_memory.StableBuffer`,
    whose pages can be given back and taken again at the same addresses (``park`` /
    ``unpark``), so the decode graphs captured over it stay valid across a trim."""
    from transformers.cache_utils import Cache

    class _SlotCache(ViewCache, Cache):
        def __init__(self) -> None:
            self._start(Cache)
            self.slots, self.length = slots, length
            shape = (slots, kv_heads, length, head_dim)
            self.stable: stable_memory.StableBuffer | None = None
            if stable:
                one = slots * kv_heads * length * head_dim * torch.empty((), dtype=dtype) \
                    .element_size()
                step = -(-one // 256) * 256
                buf = stable_memory.StableBuffer(2 * n_layers * step, device.index or 0)
                weakref.finalize(self, buf.close_soon)  # the pages and the address range
                self.stable = buf
                views = [buf.view(dtype, shape, offset=i * step) for i in range(2 * n_layers)]
                self.keys, self.values = views[:n_layers], views[n_layers:]
            else:                      # one allocation too: every layer in one tensor
                whole = torch.zeros((2, n_layers, *shape), dtype=dtype, device=device)
                self.keys, self.values = list(whole[0]), list(whole[1])
            #: every layer's keys and values as one view ``[layers, 2, slots, kv_heads, length,
            #: head_dim]`` (:func:`layers_stacked`; None if they do not lie regularly)
            stacked = layers_stacked(list(zip(self.keys, self.values)))
            assert stacked is not None          # (one buffer, at regular offsets)
            self.stacked = stacked
            if stable:
                self.zero()
            self.layers.extend(_SlotLayer(self, i) for i in range(n_layers))
            self.rows: torch.Tensor | None = None   # [B] slot of each row of the step
            self.pos: torch.Tensor | None = None    # [B] where each row writes its new token
            self.view_len = 0                       # keys/values the step attends over

        def bind(self, rows: torch.Tensor, pos: torch.Tensor, view_len: int) -> None:
            self.rows, self.pos, self.view_len = rows, pos, view_len

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *a, **kw):
            k, v = self.keys[layer_idx], self.values[layer_idx]
            b = key_states.shape[0]
            k[self.rows, :, self.pos] = key_states[:, :, 0]
            v[self.rows, :, self.pos] = value_states[:, :, 0]
            return k[:b, :, :self.view_len], v[:b, :, :self.view_len]

        def takes_rope_store(self, head_dim: int) -> bool:
            """:meth:`rope_store`'s kernel writes this cache (every layer lies alike)."""
            return llm_rope_kv.takes(self.keys[0], self.values[0], head_dim)

        def rope_store(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       layer_idx: int, heads: int, kv_heads: int, head_dim: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """:meth:`update` for the q/k/v matmul's output y [B, (heads + 2 kv_heads) x D]
            before the rotary embedding: q and the new keys rotated and the new keys and
            values written in one kernel (actors/llm_rope_kv.py); (q [B, heads, D], keys,
            values) as :meth:`update` returns them."""
            k, v = self.keys[layer_idx], self.values[layer_idx]
            b = y.shape[0]
            store = llm_rope_kv.rope_store if llm_rope_kv.fits(y, cos) \
                else llm_rope_kv.reference
            q = store(y, cos, sin, k, v, self.rows, self.pos, heads, kv_heads, head_dim)
            return q, k[:b, :, :self.view_len], v[:b, :, :self.view_len]

        def zero(self) -> None:
            self.stacked.zero_()    # masked positions must not hold NaN bits

        def park(self) -> None:
            """Give the pages back; the tensors keep their addresses (never touch them
            until :meth:`unpark`)."""
            assert self.stable is not None
            self.stable.unmap()

        def unpark(self) -> None:
            assert self.stable is not None
            self.stable.map()
            self.zero()

    return _SlotCache()
