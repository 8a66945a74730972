"""Int4 weight-only linear layers: 4-bit weights in groups of 32 along the input, each group with
its own scale and offset (asymmetric, as GGUF's Q4_1), for fast batch-1 decode on a CPU.

Why (issue 17): batch-1 decode reads every weight once per token. Measured on the default LLM
(SmolLM2-135M from its Q4_1 GGUF, greedy, bfloat16 activations, a static cache, 2 cores
AVX512-BF16, 3 runs of 48 tokens each): 2 torch threads, int8 layers 64-66 tokens/s, int4
decoder layers + int8 head 80-82; 1 thread, 44-51 against 42-59 (the step is then bound by
its ~16 ms of compute and small ops, not by the bytes: per step the int4 layers take 6.5 ms,
the int8 head 2.3 ms, attention 1.8 ms). int4 also halves the layers' memory (-38 MiB here).
A layer-alone timing showed no gain (15.5 vs 14.5 us for a 1536x576 layer): there the weights
sit in cache, and the kernel's arithmetic, not memory, is what is timed.

Faithful to the file: a GGUF tensor stored as Q4_0/Q4_1 holds, per 32 input values, 16 levels
on a grid; the min/max quantization here puts back the same grid wherever a group uses its
lowest and highest level (nearly all), so the model computes what the file says, at the file's
size. Only layers the file keeps in 4 bits are made int4 (:func:`gguf_four_bit`); the head and
the embeddings (Q8_0 in SmolLM2's file) stay int8 / bfloat16. Quantizing the head to 4 bits
too changed SmolLM2's greedy answer to "What is the capital of France?" from Paris.

The kernel is torch core's own (``aten._weight_int4pack_mm_for_cpu``, bfloat16 activations), so
no new dependency. Its packed layout is also the storage: a uint8 [out, in/2] buffer in blocks
of output rows whose size and nibble order torch picks by the CPU's vector width: on AVX-512,
per block of 64 rows, byte ``[k, d]`` holds row ``d`` in its low nibble and row ``32 + d`` in its
high one; on AVX2 the same with 32 rows and ``16 + d``; without either, rows ``2d`` and
``2d + 1`` (:func:`kernel_layout` finds which once, by packing a probe; :func:`unpack` reads it
back, checked against the packer in the tests). On any
other device, and for many rows at once (a prefill), the layer unpacks that buffer with plain
tensor ops and runs a float matmul: the same buffers move to the GPU through the weights'
residency with no repacking, and come back unchanged.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

from .llm_int8 import output_head, replace_linears

log = logging.getLogger("agile_rag.llm")

__all__ = ["Int4Linear", "quantize_int4", "int4_layers", "unpack", "GROUP", "INT4_ROWS",
           "gguf_four_bit"]

GROUP = 32          # input values per scale and offset (GGUF's Q4_0 / Q4_1 block)
#: (rows per block, pairs half a block apart) layouts the CPU packer may use (kernel_layout)
LAYOUTS = ((64, True), (32, True), (32, False), (64, False), (16, False))
#: at most this many rows go through the int4 kernel on the CPU; more are unpacked + GEMM.
#: Measured on one core (SmolLM2's 576x1536 layer): the kernel takes ~13 us a row, unpacking
#: costs ~1.6 ms before its GEMM, so the kernel wins up to ~150 rows (a whole short prompt)
INT4_ROWS = 128
#: GGUF tensor types whose values an int4 group of 32 holds exactly
FOUR_BIT_TYPES = {"Q4_0", "Q4_1"}


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit values [out, in] (uint8, 0..15) of a CPU-kernel packed uint8 [out, in/2]
    buffer, on its own device."""
    return _unpack(packed, *kernel_layout())


def _unpack(packed: torch.Tensor, block: int, split: bool) -> torch.Tensor:
    n, half = packed.shape
    b = packed.reshape(n // block, half * 2, block // 2)
    if split:                                             # row d | row d + block/2
        q = torch.cat([b & 0xF, b >> 4], dim=2)
    else:                                                 # row 2d | row 2d + 1
        q = torch.stack([b & 0xF, b >> 4], dim=3).reshape(n // block, half * 2, block)
    return q.permute(0, 2, 1).reshape(n, half * 2)        # [n/block, in, block] -> [n, in]


@functools.cache
def kernel_layout() -> tuple[int, bool]:
    """The packed layout of torch's CPU int4 packer on this machine, as (rows per block,
    whether a byte pairs rows half a block apart): found by packing a probe and reading it back
    with each known layout. (0, False) when none fits: then no layer is made int4."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32,
                      generator=torch.Generator().manual_seed(0))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except (RuntimeError, AttributeError):
        log.warning("this torch has no CPU int4 packer: int4 layers are off")
        return 0, False
    for block, split in LAYOUTS if packed.shape == (128, 32) else ():
        if torch.equal(_unpack(packed, block, split).int(), q):
            return block, split
    log.warning("torch's CPU int4 packer uses a layout this server cannot read: int4 layers "
                "are off")
    return 0, False


class Int4Linear(nn.Module):
    """``y = x @ W.T + bias`` with ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``,
    ``g = k // GROUP``; ``q`` packed in ``packed``, scale and zero in ``scale_zero`` [in/GROUP,
    out, 2] (the kernel's layout). Built from an nn.Linear by :meth:`from_linear`."""

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = packed.shape[1] * 2
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @staticmethod
    def fits(lin: nn.Linear) -> bool:
        block = kernel_layout()[0]
        return block > 0 and lin.out_features % block == 0 and lin.in_features % GROUP == 0

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int4Linear:
        w = lin.weight.detach().float()
        n, k = w.shape
        g = w.reshape(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-10)
        q = torch.round((g - lo) / scale).clamp_(0, 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        zero = lo + 8 * scale
        sz = torch.cat([scale, zero], dim=2)                 # [n, k/GROUP, 2]
        bias = None if lin.bias is None else lin.bias.detach().to(torch.bfloat16)
        return cls(packed, sz.transpose(0, 1).contiguous().to(torch.bfloat16), bias)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] this layer computes with, in ``dtype`` (default: bfloat16)."""
        dtype = dtype or self.scale_zero.dtype
        q = unpack(self.packed).to(dtype).reshape(self.out_features, -1, GROUP)
        sz = self.scale_zero.to(dtype).transpose(0, 1)      # [out, in/GROUP, 2]
        w = (q - 8) * sz[..., :1] + sz[..., 1:]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type == "cpu" and x2.shape[0] <= INT4_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.packed, GROUP, self.scale_zero)
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            bias = None if self.bias is None else self.bias.to(x2.dtype)
            y = F.linear(x2, self.dequantized(x2.dtype), bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4"


def quantize_int4(model: nn.Module, *, only: set[str] | None = None) -> int:
    """Replace the nn.Linear layers of ``model`` that fit the kernel by :class:`Int4Linear`,
    never the output head; with ``only``, just those whose attribute name (q_proj, up_proj,
    ...) is in ``only`` (see :func:`gguf_four_bit`). Each layer is replaced as it is quantized.
    Returns the number of layers replaced."""
    head = output_head(model)
    return replace_linears(
        model, lambda name, lin: lin is not head and Int4Linear.fits(lin) and
        (only is None or name in only), Int4Linear.from_linear)


#: GGUF tensor name parts -> the transformers module names they load into (llama-style models)
GGUF_TO_HF = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
              "attn_output": "o_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj",
              "ffn_down": "down_proj"}


def gguf_four_bit(path: str) -> set[str]:
    """The transformers layer names (q_proj, up_proj, ...) whose tensors the GGUF file stores
    in 4 bits in every block (types in FOUR_BIT_TYPES); empty when none, or when the file
    cannot be read."""
    try:
        from gguf import GGUFReader
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - then nothing is int4; int8 still applies
        log.warning("%s: cannot read the GGUF tensor types (%s): no int4 layers", path, exc)
        return set()
    kinds: dict[str, set[str]] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) >= 3 and parts[-2] in GGUF_TO_HF:
            kinds.setdefault(GGUF_TO_HF[parts[-2]], set()).add(t.tensor_type.name)
    return {name for name, types in kinds.items() if types <= FOUR_BIT_TYPES}


def int4_layers(model: nn.Module) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]
