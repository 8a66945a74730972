"""The KV cache by the block (issue 15): one pool of fixed-size blocks per layer, shared by every
row of the batch through a block table, so a chat holds the blocks its tokens fill and no more
(the rectangle cache of actors/batch_runner.py holds ``slots x the longest reservation``).

Layout per layer: ``[blocks + 1, block, kv_heads, head_dim]``; block 0 is a null block that
table entries of unused positions point to (a spare row of a captured decode graph writes
there, and a gather past a row's tokens reads it, masked). ``table[slot, j]`` is the block of
a row's tokens ``j*block .. (j+1)*block - 1``. Blocks are taken from the free list as a row's
tokens reach them (:meth:`ensure`) and given back when the row leaves (:meth:`move`,
:meth:`free_from`). The decode step writes each row's new key at its position and reads the
row's keys back as a ``[B, kv_heads, view, head_dim]`` gather, so attention, the mask and the
CUDA graphs (the table is a static buffer) work as with the rectangle. Only the engine's loop
thread touches it.
"""
from __future__ import annotations

from typing import Any

import torch


def make_paged_cache(n_layers: int, slots: int, kv_heads: int, blocks: int, block: int,
                     head_dim: int, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers.cache_utils import Cache

    from .kv_slots import ViewCache, _SlotLayer

    class _PagedCache(ViewCache, Cache):
        paged = True

        def __init__(self) -> None:
            self._start(Cache)
            self.slots, self.block, self.blocks = slots, block, blocks
            self.length = blocks * block               # the most one row can hold
            shape = (blocks + 1, block, kv_heads, head_dim)
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device)
                           for _ in range(n_layers)]
            self.table = torch.zeros((slots, blocks), dtype=torch.long, device=device)
            self.free = list(range(blocks, 0, -1))     # pop() gives the lowest first
            self.owned: list[list[int]] = [[] for _ in range(slots)]
            self.offsets = torch.arange(block, device=device)
            self.layers.extend(_SlotLayer(self, i) for i in range(n_layers))
            self.rows: torch.Tensor | None = None
            self.pos: torch.Tensor | None = None
            self.view_len = 0

        # ---- blocks ------------------------------------------------------------------------
        def ensure(self, needs: list[tuple[int, int]]) -> None:
            """Each ``(slot, tokens)``: the slot's row has blocks for that many tokens."""
            s_idx, j_idx, b_idx = [], [], []
            for slot, n in needs:
                own = self.owned[slot]
                while len(own) * self.block < n:
                    if not self.free:
                        raise RuntimeError("KV block pool exhausted")   # the planner prevents it
                    blk = self.free.pop()
                    s_idx.append(slot)
                    j_idx.append(len(own))
                    b_idx.append(blk)
                    own.append(blk)
            if b_idx:
                self.table[torch.tensor(s_idx), torch.tensor(j_idx)] = \
                    torch.tensor(b_idx).to(self.table.device)

        def move(self, src: int, dst: int) -> None:
            """Row ``dst`` leaves (its blocks go back) and row ``src`` takes its slot."""
            self.free.extend(self.owned[dst])
            self.owned[dst], self.owned[src] = self.owned[src], []
            self.table[dst].copy_(self.table[src])
            self.table[src].zero_()

        def free_from(self, first: int) -> None:
            """Rows ``first..`` are empty: their blocks go back, their table rows to null."""
            for slot in range(first, self.slots):
                if self.owned[slot]:
                    self.free.extend(self.owned[slot])
                    self.owned[slot] = []
                    self.table[slot].zero_()

        def used_blocks(self) -> int:
            return self.blocks - len(self.free)

        def dest(self, slot: int, n: int) -> torch.Tensor:
            """Flat pool indices of a row's first ``n`` positions (after :meth:`ensure`)."""
            blocks = torch.tensor(self.owned[slot], dtype=torch.long)
            flat = (blocks[:, None] * self.block + torch.arange(self.block)[None, :]).reshape(-1)
            return flat[:n].to(self.table.device)

        def write(self, layer: int, dest: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            """Keys and values ``[n, kv_heads, head_dim]`` to the flat positions ``dest``."""
            self.keys[layer].view(-1, *self.keys[layer].shape[2:])[dest] = k
            self.values[layer].view(-1, *self.values[layer].shape[2:])[dest] = v

        # ---- the decode step (the model calls update) ---------------------------------------
        def bind(self, rows: torch.Tensor, pos: torch.Tensor, view_len: int) -> None:
            self.rows, self.pos, self.view_len = rows, pos, view_len

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *a, **kw):
            rows, pos, view = self.rows, self.pos, self.view_len
            b = key_states.shape[0]
            blk = self.block
            dest = self.table[rows, pos // blk] * blk + pos % blk                 # [B]
            kf = self.keys[layer_idx].view(-1, *self.keys[layer_idx].shape[2:])
            vf = self.values[layer_idx].view(-1, *self.values[layer_idx].shape[2:])
            kf[dest] = key_states[:, :, 0]
            vf[dest] = value_states[:, :, 0]
            nb = -(-view // blk)
            idx = (self.table[rows[:b], :nb, None] * blk + self.offsets).reshape(b, -1)[:, :view]
            return kf[idx].transpose(1, 2), vf[idx].transpose(1, 2)   # [B, kv, view, D]

    return _PagedCache()
