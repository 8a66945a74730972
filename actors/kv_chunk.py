"""The keys and values a chunked prefill writes: one allocation for every layer.

transformers' ``DynamicLayer`` concatenates each update into a new tensor: a prompt read in
chunks (or after a stored prefix) makes a new pair of tensors per layer and per chunk, each
as long as everything read so far. On a GPU those are many mid-sized allocations that the
caching allocator had no blocks for yet: a 1,000-token prefix of a 3B model read back and
extended took 18 new allocator segments and ~70 ms more to its first token than the same
read once the blocks existed (chat_http on an H200, 2026-12-02); and a long prompt copies its
growing cache once per chunk. :func:`chunk_cache` gives the prefill a cache whose layers
write into one slab sized for the whole context, allocated once at the first write: the
copies and the new segments go, and the finished cache's layers are views of the slab (the
prefix store keeps them as they are). A write that does not fit (a context longer than
announced, a batch of more than one row) falls back to concatenation.
"""
from __future__ import annotations

import functools
from typing import Any

import torch


class _Slab:
    """``[layers, 2, 1, kv_heads, length, head_dim]``, allocated at the first write (its shape
    and dtype taken from it)."""

    def __init__(self, n_layers: int, length: int):
        self.n_layers, self.length = n_layers, length
        self.t: torch.Tensor | None = None

    def room(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer ``layer``'s key and value space for states like ``like`` ([1, H, n, D]), or
        None where they do not fit the slab's shape."""
        if like.dim() != 4 or like.shape[0] != 1 or layer >= self.n_layers:
            return None
        t = self.t
        if t is None:
            t = self.t = torch.empty((self.n_layers, 2, 1, like.shape[1], self.length,
                                      like.shape[3]), dtype=like.dtype, device=like.device)
        if t.shape[3] != like.shape[1] or t.shape[5] != like.shape[3] or \
                t.dtype != like.dtype or t.device != like.device:
            return None
        return t[layer, 0], t[layer, 1]


@functools.cache
def _layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values are the leading part of its slab space."""

        def __init__(self, slab: _Slab, index: int):
            super().__init__()
            self.slab, self.index = slab, index
            self.used: int | None = 0          # None: out of room, concatenating from here

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if self.used is not None:
                room = self.slab.room(self.index, key_states)
                n, m = self.used, key_states.shape[-2]
                if room is not None and n + m <= room[0].shape[-2] and \
                        value_states.shape == key_states.shape:
                    if not self.is_initialized:
                        self.lazy_initialization(key_states, value_states)
                    k, v = room
                    k[:, :, n:n + m].copy_(key_states)
                    v[:, :, n:n + m].copy_(value_states)
                    self.used = n + m
                    self.keys, self.values = k[:, :, :n + m], v[:, :, :n + m]
                    return self.keys, self.values
                self.used = None
            return super().update(key_states, value_states, *args, **kwargs)

    return SlabLayer


def chunk_cache(n_layers: int, length: int) -> Any:
    """A ``DynamicCache`` for one row whose first ``n_layers`` layers write into one slab of
    ``length`` positions (further layers, if the model has more, are plain ones)."""
    from transformers import DynamicCache

    layer = _layer_class()
    kv = DynamicCache()
    slab = _Slab(n_layers, max(1, length))
    kv.layers = [layer(slab, i) for i in range(n_layers)]
    return kv


def chunk_cache_from(n_layers: int, length: int, src: torch.Tensor | None, n: int) -> Any:
    """A :func:`chunk_cache` of ``length`` positions whose first ``n`` already hold those of
    ``src`` (every layer's keys and values, ``[n_layers, 2, 1, kv_heads, >= n, head_dim]``: a
    stored prefix, actors/kv_slots.py :func:`~.kv_slots.layers_stacked`), copied in one kernel
    (a copy per layer's keys and values was 2 x layers launches, and a first update made two
    empty tensors per layer). None (nothing made) where ``src`` is None or not of that shape."""
    if src is None or src.dim() != 6 or src.shape[:3] != (n_layers, 2, 1) or \
            n > min(src.shape[4], length):
        return None
    kv = chunk_cache(n_layers, length)
    slab = kv.layers[0].slab
    t = slab.t = torch.empty((n_layers, 2, 1, src.shape[3], slab.length, src.shape[5]),
                             dtype=src.dtype, device=src.device)
    t[:, :, :, :, :n].copy_(src[:, :, :, :, :n])
    for i, layer in enumerate(kv.layers):
        layer.dtype, layer.device = src.dtype, src.device
        layer.is_initialized = True
        layer.keys, layer.values = t[i, 0, :, :, :n], t[i, 1, :, :, :n]
        layer.used = n
    return kv


def slab_of(kv: Any) -> torch.Tensor | None:
    """The slab a :func:`chunk_cache` writes into (None before the first write, or for another
    cache)."""
    layers = getattr(kv, "layers", None) or []
    slab = getattr(layers[0], "slab", None) if layers else None
    return slab.t if slab is not None else None
