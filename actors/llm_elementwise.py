"""Elementwise steps of the lean decoder's GPU forms (actors/llm_lean_decode.py) in fewer
kernels (issue 15).

In a prefill pass of a 3B Qwen over a burst's prompts (thousands of tokens) the matmuls run at
~70% of the H100's peak and the elementwise work around them is ~22% of the pass: the gated MLP's
SiLU and product (two kernels, the product reading both halves again) ~12%, the rotary embedding
(five kernels over q and k) ~10% (benchmarks/results/gpu-prefill-pass-h100-s25-1.txt). Both
are bound by memory traffic, so fewer passes over the data are what they gain:

- :func:`silu_mul`: ``silu(gate) * up`` as one kernel, made at run time by torch's jiterator
  (NVRTC) on a CUDA device: it reads each input once and writes once, in float32 inside and
  rounded once. Elsewhere (a CPU, or no jiterator) the two torch kernels.
- :func:`rotate_signed`: transformers' ``x * cos + rotate_half(x) * sin`` as three kernels
  (the halves swapped, ``x * cos``, one ``addcmul_`` with the sine's first half negated once a
  pass by :func:`signed_sine`) where it takes five (a negation, a concatenation, two products
  and a sum); the product and the sum round once where transformers rounds twice.

A jiterator kernel is compiled for each layout it meets (contiguous, strided, unaligned) at its
first call; :func:`warm_silu_mul` compiles and checks the ones the decoder's forms use at the
decoder's first eager pass on the device (a load's checks), so that no compile happens inside a
CUDA graph's capture or on a request.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("agile_rag.llm")

_CODE = """
template <typename T> T agile_silu_mul(T g, T u) {
    float x = static_cast<float>(g);
    return static_cast<T>(x / (1.0f + expf(-x)) * static_cast<float>(u));
}
"""

_lock = threading.Lock()
#: the jiterator function; None: not made yet; False: unavailable here
_kernel: Any = None


def _silu_mul_kernel() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    global _kernel
    if _kernel is None:
        with _lock:
            if _kernel is None:
                try:
                    _kernel = torch.cuda.jiterator._create_jit_fn(_CODE)
                except Exception as exc:  # noqa: BLE001 - no jiterator: torch's two kernels
                    log.info("no jiterator SiLU-and-product kernel: %s", exc)
                    _kernel = False
    return _kernel or None


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` (a new tensor of g's shape): one jiterator kernel on a CUDA device where
    it can be made, else torch's SiLU and product."""
    if g.is_cuda:
        kernel = _silu_mul_kernel()
        if kernel is not None:
            return kernel(g, u)
    return F.silu(g).mul_(u)


def warm_silu_mul(device: torch.device, dtype: torch.dtype) -> bool:
    """Compile the kernel's layouts the lean decoder meets (contiguous blocks, strided views of
    one matmul's output, contiguous ones at unaligned offsets) for ``dtype`` on ``device``, and
    check them against torch's; False (and the kernel left unused from then on) when one fails
    or differs."""
    global _kernel
    if device.type != "cuda" or _silu_mul_kernel() is None:
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        both = torch.randn((24, 512), generator=gen, device=device).to(dtype)
        flat = both.view(-1)
        # contiguous (apart; across's blocks), strided (joint: views of one matmul's output),
        # and contiguous at offsets that allow vectors of 1, 2 and 4 elements (each a kernel)
        cases = [(both[:12], both[12:]), (both[:, :256], both[:, 256:])] + \
            [(flat[k:k + 256], flat[k + 512:k + 768]) for k in (1, 2, 4)]
        for g, u in cases:
            got = silu_mul(g, u)
            want = F.silu(g.float()) * u.float()
            if got.dtype != dtype or got.shape != g.shape or \
                    not torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2):
                raise ValueError(f"differs from torch's for {tuple(g.shape)} {g.stride()}")
        return True                     # (allclose waited for each kernel: no device sync)
    except Exception as exc:  # noqa: BLE001 - compile or launch failed: torch's kernels
        log.warning("SiLU-and-product kernel off: %s", exc)
        with _lock:
            _kernel = False
        return False


def signed_sine(sin: torch.Tensor) -> torch.Tensor:
    """The sine with its first half negated (once a pass, for :func:`rotate_signed`)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (transformers' rotary embedding, ``signed`` from
    :func:`signed_sine`) in three kernels: rotate_half(x) * sin is the swapped halves times
    the signed sine."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return (x * cos).addcmul_(swapped, signed)
