"""Projections that read the same input, as one matmul (issue 15: batch-1 decode on a GPU).

A Llama-family decoder layer reads its normalised input through q, k and v, and later through
gate and up. On a GPU at batch 1 each projection is one GEMM, and the small ones (a 3B Qwen's k
and v are 2048 x 256) read their weights far below the card's bandwidth. vLLM keeps such
weights merged (``QKVParallelLinear``, ``MergedColumnParallelLinear``); here the modules stay
transformers' own, and :func:`lay_end_to_end` makes their weights (and biases) views of one
tensor per group, rows after rows, so nothing is held twice. The weights' residency
(runtime/residency.py) copies a storage once and keeps its views' offsets, so the group stays
laid end to end on the GPU after every admit. :class:`LinearCalls` then runs a group as one
``F.linear`` over a view of all its rows, found from the first module's weight at each call
(it follows the weights between host and GPU), and splits the result.

Only the lean decode step (actors/llm_lean_decode.py) uses the groups; transformers' forward
still calls each module on its own views, with the same results.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: (attention or mlp, the projections read from one input), as Llama-family layers name them
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def laid_end_to_end(parts: list[torch.Tensor]) -> bool:
    """The tensors are consecutive row ranges of one contiguous buffer (same storage)."""
    first = parts[0]
    end = first.data_ptr()
    for t in parts:
        if not t.is_contiguous() or t.data_ptr() != end or t.shape[1:] != first.shape[1:] or \
                t.dtype != first.dtype or \
                t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return False
        end += t.numel() * t.element_size()
    return True


def _plain(layers: list[Any]) -> bool:
    return all(type(lin) is nn.Linear for lin in layers) and \
        len({lin.in_features for lin in layers}) == 1 and \
        len({(lin.weight.dtype, lin.weight.device) for lin in layers}) == 1 and \
        len({lin.bias is None for lin in layers}) == 1


def _lay(layers: list[nn.Linear]) -> bool:
    """Make the layers' weights (and biases) views of one tensor each; False when they are not
    plain linear layers of one input (quantized ones keep their own layout)."""
    if not _plain(layers):
        return False
    with torch.no_grad():
        for name in ("weight", "bias"):
            tensors = [getattr(lin, name) for lin in layers]
            if tensors[0] is None or laid_end_to_end([t.detach() for t in tensors]):
                continue
            whole = torch.cat([t.detach() for t in tensors], 0)
            start = 0
            for lin, t in zip(layers, tensors):
                n = t.shape[0]
                setattr(lin, name, nn.Parameter(whole[start:start + n],
                                                requires_grad=t.requires_grad))
                start += n
    return True


def lay_end_to_end(model: Any) -> int:
    """Lay each decoder layer's q/k/v and gate/up weights end to end (call before the weights'
    residency is made: it adopts the shared storages as they are). The number of groups laid;
    0 for a model whose layers are not Llama-shaped or whose projections are quantized."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return 0
    n = 0
    for layer in layers:
        for part, names in GROUPS:
            block = getattr(layer, part, None)
            mods = [getattr(block, name, None) for name in names]
            if block is not None and all(m is not None for m in mods) and _lay(mods):
                n += 1
    return n


class LinearCalls:
    """Plain linear layers of one input, laid end to end, as one ``F.linear``:
    ``calls(x [rows, in]) -> one [rows, out_i] per layer``; :meth:`whole` gives them side by
    side. The view over all the rows is taken from the first layer's weight at each call, and
    the layout is checked again whenever that weight moved (evict, admit)."""

    def __init__(self, layers: list[nn.Linear]):
        self.layers = layers
        self.sizes = [lin.out_features for lin in layers]
        self.rows = sum(self.sizes)
        self._checked: tuple[int, int] | None = None    # (weight address, bias address)

    @staticmethod
    def of(layers: list[Any]) -> LinearCalls | None:
        """For plain linear layers of one input whose weights (and biases) are laid end to
        end; None otherwise."""
        if not _plain(layers):
            return None
        calls = LinearCalls(layers)
        return calls if calls._still_laid() else None

    def _still_laid(self) -> bool:
        w = [lin.weight for lin in self.layers]
        b = [lin.bias for lin in self.layers]
        key = (w[0].data_ptr(), b[0].data_ptr() if b[0] is not None else 0)
        if key == self._checked:
            return True
        ok = laid_end_to_end(w) and (b[0] is None or laid_end_to_end(b))
        self._checked = key if ok else None
        return ok

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.layers) == 1:
            lin = self.layers[0]
            return F.linear(x, lin.weight, lin.bias)
        if not self._still_laid():
            return torch.cat([F.linear(x, lin.weight, lin.bias) for lin in self.layers], -1)
        return F.linear(x, *self._all_rows())

    def _all_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of every layer's rows as one view each (laid end to end)."""
        w0, b0 = self.layers[0].weight, self.layers[0].bias
        w = w0.as_strided((self.rows, w0.shape[1]), w0.stride())
        return w, b0.as_strided((self.rows,), b0.stride()) if b0 is not None else None

    def across(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layers' outputs for x [rows, in], transposed and one above the other:
        [sum of out, rows], so each layer's part is a contiguous block (the split of
        :meth:`whole` gives strided views, and an elementwise operation over a strided view
        takes a GPU's slower, unvectorized kernel). None when the weights are not laid end
        to end."""
        if not self._still_laid():
            return None
        w, b = self._all_rows()
        return torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.whole(x)
        return list(y.split(self.sizes, -1)) if len(self.sizes) > 1 else [y]
