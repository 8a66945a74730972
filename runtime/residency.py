"""GPU residency of one module's weights.

A model owns one master copy of its weights in (pinned) host memory: one flat uint8 buffer that
every parameter and buffer of the module is a view of, so the CPU model computes straight from it.
Taking the GPU (`admit`) is one asynchronous host-to-device copy of that buffer on a side CUDA
stream, after which every parameter and buffer is re-pointed at views of the GPU copy. Giving the
GPU back (`evict`) re-points them at the host views and drops the GPU buffer: weights are immutable
at inference, so nothing is copied back.

Rules the callers rely on:
- Only this object moves the module's weights. Never call `module.to(device)` on a wrapped module.
- `admit` and `evict` block; call them from an executor thread, never from the event loop.
- Compute on the admitting thread's current stream (the default stream, unless the caller changed
  it). The GPU buffer is allocated on that stream, so the caching allocator only reuses its memory
  after the work queued there before `evict` has run. Work on other streams must be synchronised
  before `evict`.
- Tied weights stay tied: one Parameter object registered in two modules (lm_head / embed_tokens)
  is rebound in place (`param.data = view`), and distinct tensors that share a storage are copied
  once and keep sharing it, on the host and on the GPU.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["WeightResidency", "ALIGN"]

log = logging.getLogger(__name__)

# Byte alignment of every storage inside the flat buffer: a multiple of every dtype's size and of
# the 16-byte vector loads kernels use (cudaMalloc itself aligns to 256).
ALIGN = 256


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class _Binding:
    """One distinct tensor object of the module (a Parameter or a buffer) and where it lives."""
    tensor: torch.Tensor
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    elem_offset: int  # absolute offset, in elements of `dtype`, into the flat buffer as `dtype`
    owners: list[tuple[nn.Module, str, bool]]  # (module, name, is_parameter), for the fallback path


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of `t`, on t's device."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (st.nbytes(),), (1,))


class WeightResidency:
    """Owns one nn.Module's weights: a master copy in host memory, at most one copy on a GPU."""

    def __init__(self, module: nn.Module, pin: bool = True):
        self.module = module
        self._lock = threading.Lock()
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._gpu: torch.Tensor | None = None
        self._device = torch.device("cpu")
        self._released = False

        # 1. Every distinct tensor object registered as a parameter or buffer, anywhere in the tree.
        by_id: dict[int, tuple[torch.Tensor, list[tuple[nn.Module, str, bool]]]] = {}
        for mod in module.modules():
            for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    if t.device.type == "meta":
                        raise ValueError(f"{type(mod).__name__}.{name} is on the meta device: "
                                         "materialise the weights before wrapping the module")
                    entry = by_id.setdefault(id(t), (t, []))
                    entry[1].append((mod, name, is_param))

        # 2. Group by storage: tensors sharing one storage are copied once and keep sharing it.
        slots: dict[tuple[str, int, int], int] = {}  # storage key -> byte offset in the flat buffer
        sources: list[tuple[torch.Tensor, int]] = []  # (tensor on that storage, byte offset)
        total = 0
        staged = []
        for t, owners in by_id.values():
            st = t.untyped_storage()
            nbytes = st.nbytes()
            if nbytes == 0:
                key = ("empty", id(t), 0)
            else:
                key = (str(t.device), st.data_ptr(), nbytes)
            if key not in slots:
                slots[key] = total
                sources.append((t, total))
                total += _align(nbytes)
            staged.append((t, owners, slots[key]))
        self._nbytes = total
        self._weight_bytes = sum(t.untyped_storage().nbytes() for t, _ in sources)

        # 3. One flat host buffer, pinned when it can be. Its views must be the same kind of tensor
        #    as the parameters they back: ordinary tensors (also when the caller is in inference
        #    mode), or inference tensors when the module itself was built under inference_mode().
        kinds = {t.is_inference() for t, _ in by_id.values()}
        self._inference = kinds == {True}
        if len(kinds) > 1:
            log.warning("%s mixes inference-mode and ordinary tensors: backing all of them with "
                        "ordinary tensors", type(module).__name__)
        with torch.inference_mode(self._inference):
            self._host, self._pinned = self._alloc_host(total, pin)
            self._adopt(sources, staged)

    def _adopt(self, sources, staged) -> None:
        # 4. Copy each storage once (straight from the GPU when the module was built there), then
        #    point every tensor at its view of the flat buffer.
        for t, off in sources:
            nb = t.untyped_storage().nbytes()
            if nb:
                self._host[off:off + nb].copy_(_storage_bytes(t))
        self._bindings: list[_Binding] = []
        for t, owners, off in staged:
            item = t.element_size()
            if off % item:
                raise AssertionError("flat buffer offset not aligned to the dtype")  # cannot happen
            self._bindings.append(_Binding(
                tensor=t, dtype=t.dtype, size=tuple(t.shape), stride=tuple(t.stride()),
                elem_offset=off // item + t.storage_offset(), owners=owners))
        self._host_views = self._typed_views(self._host)
        self._rebind(self._host_views)
        log.debug("WeightResidency: %d tensors, %d storages, %.3f GB in one %s host buffer",
                  len(self._bindings), len(sources), self._weight_bytes / 1e9,
                  "pinned" if self._pinned else "pageable")

    # ------------------------------------------------------------------ properties
    @property
    def weight_bytes(self) -> int:
        """Bytes of parameters and buffers, each storage counted once (tied weights once)."""
        return self._weight_bytes

    @property
    def buffer_bytes(self) -> int:
        """Size of the flat buffer (weight_bytes plus alignment padding): what admit allocates."""
        return self._nbytes

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def host_buffer(self) -> torch.Tensor:
        """The flat host master copy (read it, never write it: every CPU weight is a view of it)."""
        return self._host

    @property
    def num_tensors(self) -> int:
        return len(self._bindings)

    def __repr__(self) -> str:
        if self.released:
            return "WeightResidency(released)"
        return (f"WeightResidency({type(self.module).__name__}, {self._weight_bytes / 1e9:.3f} GB, "
                f"{'pinned' if self._pinned else 'pageable'}, device={self._device})")

    # ------------------------------------------------------------------ moves
    def admit(self, device="cuda") -> dict:
        """Copy the weights to `device` (one H2D copy on a side stream) and point the module at
        them.

        Blocking; idempotent. Returns {"bytes", "seconds", "gbps", "copy_seconds", "device"};
        bytes is 0 when the weights were already there.
        """
        with self._lock:
            if self.released:
                raise RuntimeError("WeightResidency.admit after release(): the model was unloaded")
            if not torch.cuda.is_available():
                raise RuntimeError("WeightResidency.admit needs CUDA, and "
                                   "torch.cuda.is_available() is False: the weights stay in host "
                                   "memory")
            dev = torch.device(device)
            if dev.type != "cuda":
                raise ValueError(f"admit takes a CUDA device, not {device!r}")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            if self._gpu is not None:
                if self._device == dev:
                    return {"bytes": 0, "seconds": 0.0, "gbps": 0.0, "copy_seconds": 0.0,
                            "device": str(dev)}
                self._evict_locked()

            t0 = time.perf_counter()
            with torch.inference_mode(self._inference), torch.cuda.device(dev):
                current = torch.cuda.current_stream(dev)
                side = self._streams.get(dev.index)
                if side is None:
                    side = self._streams[dev.index] = torch.cuda.Stream(dev)
                # Allocated on the current (compute) stream: see the module docstring.
                gpu = torch.empty(self._nbytes, dtype=torch.uint8, device=dev)
                # memory reused from freed blocks is free once `current` is
                side.wait_stream(current)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(side):
                    start.record(side)
                    gpu.copy_(self._host, non_blocking=self._pinned)
                    end.record(side)
            try:
                # Re-point the tensors while the copy runs (views need only the allocation;
                # nothing computes on them before the synchronize below): hides the ~2 ms of
                # re-pointing a few hundred tensors behind the copy.
                with torch.inference_mode(self._inference):
                    self._rebind(self._typed_views(gpu))
            except BaseException:
                side.synchronize()
                with torch.inference_mode(self._inference):
                    self._rebind(self._host_views)  # never leave the module split across devices
                raise
            finally:
                side.synchronize()
            self._gpu, self._device = gpu, dev
            seconds = time.perf_counter() - t0
            return {"bytes": self._nbytes, "seconds": seconds,
                    "gbps": self._nbytes / seconds / 1e9 if seconds > 0 else 0.0,
                    "copy_seconds": start.elapsed_time(end) / 1e3, "device": str(dev)}

    def evict(self) -> dict:
        """Point the module back at the host master copy and drop the GPU copy (nothing is copied
        back).

        No-op when not on a GPU. Returns {"seconds", "bytes"} (bytes released).
        """
        with self._lock:
            return self._evict_locked()

    def _evict_locked(self) -> dict:
        if self._gpu is None:
            return {"seconds": 0.0, "bytes": 0}
        t0 = time.perf_counter()
        with torch.inference_mode(self._inference):
            self._rebind(self._host_views)
        self._gpu = None  # the last reference: the caching allocator takes the block back
        self._device = torch.device("cpu")
        return {"seconds": time.perf_counter() - t0, "bytes": self._nbytes}

    def release(self) -> dict:
        """The model is being unloaded: drop the GPU copy and every reference this object holds
        to the weights (the module, the tensor bindings, the host master copy and its views, the
        side streams), so that the pinned host buffer is freed as soon as the module itself is
        gone (its parameters are views of that buffer). Idempotent; the object cannot admit again.

        Returns {"bytes": GPU bytes dropped, "host_bytes": size of the host copy let go}.
        """
        with self._lock:
            dropped = self._evict_locked()["bytes"] if self._gpu is not None else 0
            host_bytes = self._nbytes if self._host is not None else 0
            self.module = None
            self._bindings = []
            self._host_views = {}
            self._host = None
            self._streams = {}
            self._gpu = None
            self._device = torch.device("cpu")
            self._released = True
            return {"bytes": dropped, "host_bytes": host_bytes}

    @property
    def released(self) -> bool:
        return self._released

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _alloc_host(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
        if pin:
            if torch.cuda.is_available():
                try:
                    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), True
                except Exception as exc:  # e.g. out of lockable memory
                    log.warning("could not pin %.3f GB of host memory (%s): using pageable memory; "
                                "GPU admits will be several times slower", nbytes / 1e9, exc)
            else:
                log.debug("CUDA absent: weights kept in pageable host memory")
        return torch.empty(nbytes, dtype=torch.uint8), False

    def _typed_views(self, flat: torch.Tensor) -> dict[torch.dtype, torch.Tensor]:
        views: dict[torch.dtype, torch.Tensor] = {}
        for b in self._bindings:
            if b.dtype not in views:
                views[b.dtype] = flat.view(b.dtype)
        return views

    def _rebind(self, views: dict[torch.dtype, torch.Tensor]) -> None:
        for b in self._bindings:
            v = views[b.dtype].as_strided(b.size, b.stride, b.elem_offset)
            try:
                b.tensor.data = v
            except RuntimeError:
                # Tensors whose .data cannot be swapped (e.g. inference-mode buffers): replace the
                # registered object in every owner instead (aliases outside the module won't
                # follow).
                new = nn.Parameter(v, requires_grad=b.tensor.requires_grad) \
                    if isinstance(b.tensor, nn.Parameter) else v
                for mod, name, is_param in b.owners:
                    (mod._parameters if is_param else mod._buffers)[name] = new
                b.tensor = new
