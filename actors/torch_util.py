"""Small torch helpers the model actors share (one copy of each).

torch is imported inside each function: importing this module (from the model actors, which the
HTTP layer imports) must not load torch by itself.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("agile_rag.torch")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the GPU running out of memory (torch's error, or one that says so)."""
    import torch
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def empty_cache() -> None:
    """Give the caching allocator's free blocks back to the driver (no-op without CUDA)."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def empty_host_cache() -> None:
    """Give torch's cached pinned host blocks back (no-op without CUDA). A pinned block whose
    last asynchronous copy was not yet seen to complete stays counted as in use until the host
    allocator looks at its events: this makes it look (seen: 34 MB left after an unload).
    Never ``torch.cuda.synchronize()`` here: a device-wide sync from this thread invalidates a
    CUDA graph another thread is capturing (seen: an LLM's warm-up during an encoder's unload)."""
    import torch
    if not torch.cuda.is_available():
        return
    for fn in (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None),
               getattr(torch._C, "_host_emptyCache", None)):
        if fn is not None:
            try:
                fn()        # no device-wide sync: it would break a graph capture elsewhere
            except Exception:  # noqa: BLE001 - an optimisation only
                log.debug("emptying the pinned host cache failed", exc_info=True)
            return


def module_bytes(module: nn.Module) -> int:
    """Bytes of a torch module's parameters and buffers, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def torch_dtype(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16`` (an entry's ``dtype``)."""
    import torch
    dtype = getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def as_list(v: Any) -> list[Any]:
    """One value or several (``eos_token_id`` is an int in some configs, a list in others) as a
    list; None as an empty one."""
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple, set)) else [v]
