"""Int8 weight-only linear layers: an LLM's float weights kept as int8 plus one scale per output
row (symmetric, round to nearest), for fast batch-1 decode on a CPU.

Why int8 and torch's own kernel (measured on a 2-core AVX512-BF16 CPU, SmolLM2-135M, greedy
decode, tokens/s): float32 25, bfloat16 41, int8 (``aten._weight_int8pack_mm``) 68, int8 with
the lm_head too 81. Batch-1 decode reads every weight once per token, so bytes read decide.
torch core's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) measured no faster than int8 at
these shapes (15.5 vs 14.5 us for a 1536x576 layer) and its packed layout is the CPU's only
(the CUDA kernel wants another packing), so int4 would need a repack on every move; torchao
would add a dependency for the same kernels. Int8 it is.

The same two tensors serve every device: they are registered buffers, so the weights' residency
(runtime.residency) moves them to the GPU and back like any weight, with no re-quantization.
On the CPU a forward of few rows (decode) calls the int8 kernel; many rows (a prefill), or any
other device, dequantise the layer's weight to the compute dtype and run the plain matmul (the
int8 kernel is ~3x slower than a bfloat16 GEMM at 512 rows). Int8 pays on a CPU with native
bfloat16 only: its float32 path is ~15x slower than its bfloat16 one (0.73 ms vs 0.05 ms for a
1536x576 layer), slower than plain float32 weights.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime.heap import trim_heap

log = logging.getLogger("agile_rag.llm")

__all__ = ["Int8Linear", "quantize_int8", "int8_layers", "INT8_ROWS", "output_head",
           "replace_linears"]

#: at most this many rows go through the int8 kernel on the CPU; more are dequantised + GEMM
INT8_ROWS = 32


class Int8Linear(nn.Module):
    """``y = x @ (qweight * scales[:, None]).T + bias``; qweight int8 [out, in], scales [out]
    in the compute dtype. Built from an nn.Linear by :meth:`from_linear`."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = qweight.shape[1]
        self.out_features = qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, dtype: torch.dtype) -> Int8Linear:
        w = lin.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-10)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        bias = None if lin.bias is None else lin.bias.detach().to(dtype)
        return cls(q, scale.to(dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != self.scales.dtype:
            x2 = x2.to(self.scales.dtype)
        if x2.device.type == "cpu" and x2.shape[0] <= INT8_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
            if self.bias is not None:
                y = y + self.bias
        else:
            w = self.qweight.to(x2.dtype) * self.scales[:, None]
            y = F.linear(x2, w, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with (tests, debugging)."""
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module, dtype: torch.dtype, *, lm_head: bool = True) -> int:
    """Replace every nn.Linear of ``model`` by an :class:`Int8Linear` (the output head too when
    ``lm_head``: it is ~1/5 of a small model's bytes read per token; a head tied to the
    embeddings gets its own int8 copy, the embeddings stay in ``dtype``). Each layer is
    replaced as it is quantized, so the float copy of one layer at most lives beside the int8
    ones. Returns the number of layers replaced."""
    head = output_head(model)
    n = replace_linears(model, lambda name, lin: lin is not head or lm_head,
                        lambda lin: Int8Linear.from_linear(lin, dtype))
    if head is not None and lm_head and getattr(model.config, "tie_word_embeddings", False):
        # the head is no longer tied: a later tie_weights() must not put the float one back
        model.config.tie_word_embeddings = False
    trim_heap()                             # the float layers just freed
    return n


def output_head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def replace_linears(model: nn.Module, want: Callable[[str, nn.Linear], bool],
                    build: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace each nn.Linear of ``model`` for which ``want(attribute name, layer)`` by
    ``build(layer)``, one at a time (the float copy of one layer at most lives beside the
    quantized ones). Returns the number replaced."""
    n = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and want(name, child):
                    setattr(parent, name, build(child))
                    n += 1
    return n


def int8_layers(model: nn.Module) -> list[Int8Linear]:
    return [m for m in model.modules() if isinstance(m, Int8Linear)]
