"""An encoder's GPU residency in two modes: resident (the whole model copied to the GPU, as
:class:`~.residency.WeightResidency` does) or streamed (only the small non-repeated parts on
the GPU, the layers copied through K slots during each forward: :class:`~.layer_stream.
LayerStream`). The VRAM arbiter picks the mode per grant: streamed when the whole model would
only fit by evicting others (the LLM), resident otherwise. The model actor's lease switches
between them; both compute exactly the same thing.

Blocking methods (``admit``, ``evict``, ``release``): call them from an executor thread.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .layer_group import one_by_one
from .layer_stream import LayerStream
from .residency import WeightResidency

log = logging.getLogger(__name__)

#: streaming is offered only when it holds at most this share of the whole model's bytes
STREAM_WORTH = 0.8


STREAM_GBPS_GUESS = 25.0    # host -> GPU pinned copy rate before one was measured
HOST_EMBED_SHARE = 0.25     # embedding tables above this share of the weights stay on the host


def _big_embeddings(module: nn.Module, weight_bytes: int) -> bool:
    """Streamed, an XLM-R's 250k-token word embeddings (~46% of the model) would be most of
    what stays on the GPU: above ``HOST_EMBED_SHARE`` they are looked up on the host instead
    (runtime/layer_stream.py, ``host_embeddings``), so a streamed XLM-R-large holds ~54 MB,
    not ~565 MB. A BERT's 30k-token table (~9%) stays on the GPU."""
    tables = sum(m.weight.numel() * m.weight.element_size()
                 for m in module.modules() if isinstance(m, nn.Embedding))
    return weight_bytes > 0 and tables > HOST_EMBED_SHARE * weight_bytes

class StreamableResidency:
    def __init__(self, module: nn.Module, pin: bool = True, *, slots: int = 2,
                 device: str = "cuda"):
        self.full = WeightResidency(module, pin=pin)
        self.stream: LayerStream | None = None
        try:
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                raise RuntimeError("no CUDA")
            stream = LayerStream(module, device, slots=slots,
                                 host_embeddings=_big_embeddings(module, self.full.weight_bytes))
        except Exception as exc:  # noqa: BLE001 - no stack of layers, no CUDA: resident only
            log.info("%s cannot be layer-streamed (%s): resident only",
                     type(module).__name__, exc)
        else:
            if stream.weight_bytes <= STREAM_WORTH * self.full.weight_bytes:
                self.stream = stream
            else:
                stream.release()

    def __getattr__(self, name: str) -> Any:
        """Everything else (host_buffer, pinned, device, ...) is the resident mode's."""
        if name == "full":
            raise AttributeError(name)
        return getattr(self.full, name)

    # ---- what the lease reads --------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return self.full.weight_bytes

    @property
    def stream_bytes(self) -> int:
        """GPU bytes of the streamed mode (resident parts + slots); 0: not offered."""
        return self.stream.weight_bytes if self.stream is not None else 0

    def stream_s(self) -> float:
        """Seconds a streamed pass may add over a resident one: copying its layers, at the
        measured pinned rate (25 GB/s until a pass was timed). Large jobs hide most of it
        behind their compute; a one-query job pays it whole."""
        gbps = self.stats().get("copy_gbps") or STREAM_GBPS_GUESS
        return self.weight_bytes / (float(gbps) * 1e9)

    @property
    def streamed(self) -> bool:
        return self.stream is not None and self.stream.attached

    @property
    def on_gpu(self) -> bool:
        return self.full.on_gpu or self.streamed

    def stats(self) -> dict[str, Any]:
        return self.stream.stats() if self.stream is not None else {}

    def run_group(self, fns: list) -> list:
        """Forwards as one layer-major group when streamed (each layer copied once for all of
        them: :meth:`LayerStream.run_group`); resident, one after another. Each fn's result or
        the exception it raised."""
        if self.streamed:
            assert self.stream is not None
            return self.stream.run_group(fns)
        return one_by_one(fns)

    # ---- moves -----------------------------------------------------------------------------
    def admit(self, device: str = "cuda", *, streamed: bool = False) -> dict:
        """Take the GPU in the given mode (switching modes if needed)."""
        if streamed:
            if self.stream is None:
                raise RuntimeError("this model cannot be layer-streamed")
            out: dict[str, Any] = {"bytes": 0, "seconds": 0.0}
            if self.full.on_gpu:
                self.full.evict()
            self._retarget(device)
            got = self.stream.attach()
            out.update(bytes=got.get("bytes", 0), seconds=got.get("seconds", 0.0),
                       streamed=True)
            return out
        if self.streamed:
            assert self.stream is not None
            self.stream.detach()
        return self.full.admit(device)

    def _retarget(self, device: str) -> None:
        """Stream to ``device`` from now on (several GPUs: the card of this grant)."""
        assert self.stream is not None
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type == self.stream.device.type and dev != self.stream.device:
            self.stream.detach()
            self.stream.device = dev

    def evict(self) -> dict:
        if self.streamed:
            assert self.stream is not None
            got = self.stream.detach()
            return {"seconds": got.get("seconds", 0.0), "bytes": got.get("bytes", 0)}
        return self.full.evict()

    def release(self) -> Any:
        if self.stream is not None:
            self.stream.release()
            self.stream = None
        return self.full.release()
