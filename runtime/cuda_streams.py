"""CUDA streams that belong to one user.

``torch.cuda.Stream()`` hands out one of a fixed pool of 32 streams per device and priority, round-
robin: the 33rd caller gets the 1st caller's stream. Two threads given the same pool stream
serialise their work, and a CUDA graph captured on a pool stream takes in (or fails on) whatever
another thread queues on it meanwhile: seen as "Cannot copy between CPU and CUDA tensors during
CUDA graph capture" in an encoder's forward while the LLM captured a decode graph, in an experiment
where the encoders computed on pool streams of their own (issue 13). The LLM's decode graphs are
captured on such a stream of their own (actors/decode_graphs.py): torch's default capture stream is
a pool stream too, which an admit's or a layer stream's copies could share.

:func:`new_stream` makes a stream nobody else is given: created through the driver
(``cuStreamCreate``, reached as runtime/stable_memory.py reaches it), non-blocking (it never waits
for the legacy default stream, nor that stream for it), wrapped as a ``torch.cuda.ExternalStream``.
It is never destroyed (a stream costs the driver little, and each user makes one for its lifetime:
an LLM engine one); a GPU test run whose streams were destroyed by finalizers ended in a
segmentation fault at exit (cause not isolated). Where the driver cannot be reached it falls back
to a pool stream, with a warning.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger("agile_rag.memory")

CU_STREAM_NON_BLOCKING = 1

__all__ = ["new_stream"]


def new_stream(device: Any) -> Any:
    """A non-blocking CUDA stream on ``device`` (a torch device, index or "cuda:N") that no
    other caller shares."""
    import torch

    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    try:
        from .stable_memory import _check, _current_context, _driver

        handle = ctypes.c_void_p()
        with torch.cuda.device(index):          # that card's primary context, current here
            torch.cuda.init()
            _current_context(index)
            _check(_driver().cuStreamCreate(ctypes.byref(handle), CU_STREAM_NON_BLOCKING),
                   "cuStreamCreate")
        if not handle.value:
            raise RuntimeError("cuStreamCreate gave no stream")
        ptr = int(handle.value)
        stream = torch.cuda.ExternalStream(ptr, device=torch.device("cuda", index))
    except Exception as exc:  # noqa: BLE001 - a shared pool stream still works, only slower
        log.warning("a CUDA stream of its own could not be made (%s): using one of torch's "
                    "pool streams", exc)
        return torch.cuda.Stream(index)
    return stream
