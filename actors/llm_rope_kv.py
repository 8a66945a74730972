"""A decode step's rotary embedding and its KV write as one kernel (issue 15: a 32-row step
should cost little more than a one-row step).

The lean decode step (actors/llm_lean_decode.py) takes three kernels a layer between the q/k/v
matmul and the attention: q and k rotated (one batched matmul by each row's rotation matrix),
then the new key and the new value each written into the KV rectangle at its row's slot and
position (two ``index_put`` kernels). In an H100's 3B-shaped step they took ~10.8 µs a layer
for 32 rows and ~7.6 µs for one (benchmarks/results/gpu-decode-step-h100-s26-view512-profile.md:
the index kernels 3.9 µs each at 32 rows, 2.6 at one; the matmul 3.0 and 2.4): ~0.40 ms of a
32-row step's 4.1 ms, ~0.28 of a one-row step's 3.8. Each moves a few kilobytes: they are bound
by their launch and index arithmetic, not by memory.

:func:`rope_store` does it in one Triton kernel: one program per (row, head) reads its head of
the q/k/v matmul's output, rotates a query or key head (``x * cos + rotate_half(x) * sin``, in
float32, rounded once) and writes a query head to the returned q, or a key head and its value
head straight into the cache. The KV rectangle's ``rope_store`` (actors/kv_slots.py) calls it;
the block cache keeps transformers' step. Triton comes with torch's CUDA wheels on Linux;
without it (a CPU, Windows) the step keeps its three kernels. :func:`ready` compiles the kernel
for a device, dtype and heads and checks it against its torch form (:func:`reference`) at the
decode graphs' first (eager) step, never in a capture or on a request; a decode graph whose
capture fails with it is captured without it (actors/batch_runner.py).

``llm_params.decode_rope_kv`` (default on) says whether to use it. On an H100 (session 29,
benchmarks/results/gpu-s29.md) a 32-row step takes 4.03 ms with it against 4.39 without, a
one-row step 3.77 against 3.99; served 32 chats against one chat 25.4x against 24.5x in the same
servers. ``benchmarks/gpu_decode_step.py`` times the step both ways, ``benchmarks/chat_http.py
--ab-llm-params '{"decode_rope_kv": false}'`` the served chats.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

import torch

log = logging.getLogger("agile_rag.llm")

_lock = threading.Lock()
#: the jitted Triton kernel; None: not made yet; False: unavailable here
_kernel: Any = None
#: per (device, dtype, heads, kv heads, head dim): compiled and checked there
_checked: dict[tuple, bool] = {}


def _make_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kv_kernel(y_ptr, y_row, cos_ptr, sin_ptr, cs_row, q_ptr, q_row,
                       k_ptr, v_ptr, c_slot, c_head, c_pos, rows_ptr, pos_ptr,
                       HEADS: tl.constexpr, KV: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)                     # query heads first, then the key heads
        HALF: tl.constexpr = D // 2
        offs = tl.arange(0, HALF)
        src = y_ptr + b * y_row + h * D
        x1 = tl.load(src + offs).to(tl.float32)
        x2 = tl.load(src + HALF + offs).to(tl.float32)
        c = cos_ptr + b * cs_row
        s = sin_ptr + b * cs_row
        c1 = tl.load(c + offs).to(tl.float32)
        c2 = tl.load(c + HALF + offs).to(tl.float32)
        s1 = tl.load(s + offs).to(tl.float32)
        s2 = tl.load(s + HALF + offs).to(tl.float32)
        o1 = x1 * c1 - x2 * s1                   # rotate_half(x) = [-x2, x1]
        o2 = x2 * c2 + x1 * s2
        if h < HEADS:
            dst = q_ptr + b * q_row + h * D
            tl.store(dst + offs, o1.to(q_ptr.dtype.element_ty))
            tl.store(dst + HALF + offs, o2.to(q_ptr.dtype.element_ty))
        else:
            kh = h - HEADS
            slot = tl.load(rows_ptr + b).to(tl.int64)
            p = tl.load(pos_ptr + b).to(tl.int64)
            at = slot * c_slot + kh * c_head + p * c_pos
            tl.store(k_ptr + at + offs, o1.to(k_ptr.dtype.element_ty))
            tl.store(k_ptr + at + HALF + offs, o2.to(k_ptr.dtype.element_ty))
            whole = tl.arange(0, D)
            val = tl.load(y_ptr + b * y_row + (HEADS + KV) * D + kh * D + whole)
            tl.store(v_ptr + at + whole, val)

    return rope_kv_kernel


def _get_kernel() -> Any:
    global _kernel
    if _kernel is None:
        with _lock:
            if _kernel is None:
                try:
                    _kernel = _make_kernel()
                except Exception as exc:  # noqa: BLE001 - no Triton: the step's three kernels
                    # (asked for only where llm_params.decode_rope_kv is on, its default)
                    log.info("llm_params.decode_rope_kv: no Triton here (%s): the decode "
                             "step keeps its three kernels", exc)
                    _kernel = False
    return _kernel or None


def checked(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
            head_dim: int) -> bool:
    """:func:`ready` has been asked for these already (its answer is kept)."""
    return (device, dtype, heads, kv_heads, head_dim) in _checked


def interpreted() -> bool:
    """``TRITON_INTERPRET=1``: Triton's interpreter runs the kernel on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


def takes(keys: torch.Tensor, values: torch.Tensor, head_dim: int) -> bool:
    """The caches the kernel writes: a layer ``[slots, kv_heads, length, head_dim]`` with unit
    stride inside a position, keys and values of one layout and dtype, a head dimension that is
    an even power of two (asked once a step: where it does not, the step keeps its three
    kernels)."""
    return keys.dim() == 4 and keys.stride() == values.stride() and keys.stride(3) == 1 and \
        keys.dtype == values.dtype and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def fits(y: torch.Tensor, cos: torch.Tensor) -> bool:
    """The rows the kernel reads: y ``[B, ...]`` and cos (and sin, made alike) with unit
    strides inside a row (the q/k/v matmul's and the rotary embedding's outputs are)."""
    return y.dim() == 2 and y.stride(1) == 1 and cos.stride(-1) == 1


def rope_store(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, heads: int,
               kv_heads: int, head_dim: int) -> torch.Tensor:
    """y [B, (heads + 2 kv_heads) x D] (the q/k/v matmul's output), cos and sin [B, 1, D]:
    q [B, heads, D] rotated (returned); the rotated keys and the values written into ``keys``
    and ``values`` ([slots, kv_heads, length, D], one layer) at slot ``rows[b]``, position
    ``pos[b]``. One Triton kernel (see :func:`ready`)."""
    b = y.shape[0]
    q = torch.empty((b, heads, head_dim), dtype=y.dtype, device=y.device)
    cos2, sin2 = cos.reshape(b, head_dim), sin.reshape(b, head_dim)
    # Triton launches on the current device: the tensors' (an LLM pinned to another card)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        _get_kernel()[(b, heads + kv_heads)](
            y, y.stride(0), cos2, sin2, cos2.stride(0), q, q.stride(0),
            keys, values, keys.stride(0), keys.stride(1), keys.stride(2), rows, pos,
            HEADS=heads, KV=kv_heads, D=head_dim,
            num_warps=1 if head_dim <= 128 else 2)   # a head is 64-128 elements: one warp
    return q


def reference(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, heads: int,
              kv_heads: int, head_dim: int) -> torch.Tensor:
    """What :func:`rope_store` computes, in torch's operations (float32 inside, as the kernel)."""
    b, d = y.shape[0], head_dim
    qk = y[:, :(heads + kv_heads) * d].float().view(b, heads + kv_heads, d)
    c = cos.reshape(b, 1, d).float()
    s = sin.reshape(b, 1, d).float()
    half = d // 2
    rot = (qk * c + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * s).to(y.dtype)
    v = y[:, (heads + kv_heads) * d:].view(b, kv_heads, d)
    keys[rows, :, pos] = rot[:, heads:]
    values[rows, :, pos] = v
    return rot[:, :heads].contiguous()


def ready(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
          head_dim: int) -> bool:
    """The kernel compiled for ``dtype`` on ``device`` and checked against :func:`reference`
    (each written key and value, the returned q, and nothing else in the cache touched);
    False (and not used there from then on) when Triton is missing, or the kernel fails or
    differs. Never call it during a CUDA graph's capture."""
    key = (device, dtype, heads, kv_heads, head_dim)
    if key in _checked:
        return _checked[key]
    ok = False
    if (device.type == "cuda" or interpreted()) and _get_kernel() is not None:
        try:
            ok = _check(device, dtype, heads, kv_heads, head_dim)
            if not ok:
                log.warning("the Triton rotary-and-KV-write kernel differs from torch's on %s "
                            "%s: not used (the decode step keeps its three kernels)",
                            device, dtype)
        except Exception as exc:  # noqa: BLE001 - a kernel that fails (an old GPU) is not used
            log.warning("the Triton rotary-and-KV-write kernel failed its check on %s %s (%s): "
                        "not used (the decode step keeps its three kernels)", device, dtype, exc)
            ok = False
    _checked[key] = ok
    return ok


def _check(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
           head_dim: int) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    d = head_dim
    for b in (1, 5):
        y = torch.randn((b, (heads + 2 * kv_heads) * d), generator=gen, device=device).to(dtype)
        ang = torch.rand((b, 1, d), generator=gen, device=device) * 6.0
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        shape = (6, kv_heads, 9, d)
        mine = [torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(2)]
        theirs = [t.clone() for t in mine]
        rows = torch.randperm(6, generator=gen, device=device)[:b]
        pos = torch.randint(0, 9, (b,), generator=gen, device=device)
        q = rope_store(y, cos, sin, mine[0], mine[1], rows, pos, heads, kv_heads, d)
        want = reference(y, cos, sin, theirs[0], theirs[1], rows, pos, heads, kv_heads, d)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
        if not torch.allclose(q.float(), want.float(), atol=tol, rtol=tol) or \
                not torch.allclose(mine[0].float(), theirs[0].float(), atol=tol, rtol=tol) or \
                not torch.equal(mine[1], theirs[1]):
            return False
    return True
