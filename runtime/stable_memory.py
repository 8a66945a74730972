"""GPU memory at a fixed address whose pages can be given back and taken again.

A CUDA graph replays its kernels on the addresses it was captured with. When an idle LLM gives
its KV cache back to the VRAM arbiter (a Trim, or a Yield that keeps the weights), a cache
allocated again by torch lands somewhere else, and every decode graph must be captured again:
tenths of a second, on the next chat's path. :class:`StableBuffer` keeps the *address*: it
reserves a virtual address range once and maps physical pages into it (CUDA's virtual memory
management: ``cuMemAddressReserve`` / ``cuMemCreate`` / ``cuMemMap``). ``unmap()`` gives the
pages back to the driver (the memory is free for other models) while tensors and graphs over
the range stay valid objects; ``map()`` takes fresh pages at the same address, and the graphs
replay as before. The contents are not kept (a trimmed cache holds no chat).

Nothing may touch the range while it is unmapped (a kernel would fault and the CUDA context
would be lost): the owner keeps its tensors out of reach until ``map()`` (the batch runner
parks the whole cache object). The driver API is reached through ctypes (``libcuda.so.1``,
there wherever CUDA runs); :func:`available` says whether it can be used here, and the runner
falls back to ordinary allocations when it cannot. ``AGILE_RAG_STABLE_KV=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

log = logging.getLogger("agile_rag.memory")

_PINNED = 1                  # CU_MEM_ALLOCATION_TYPE_PINNED
_ON_DEVICE = 1               # CU_MEM_LOCATION_TYPE_DEVICE
_READ_WRITE = 3              # CU_MEM_ACCESS_FLAGS_PROT_READWRITE


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class StableMemoryError(RuntimeError):
    pass


_lib: Any = None
_lib_lock = threading.Lock()


def _driver() -> Any:
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL("libcuda.so.1")
            u64, size_t = ctypes.c_ulonglong, ctypes.c_size_t
            for name, args in {
                "cuInit": [ctypes.c_uint],
                "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
                "cuCtxGetCurrent": [ctypes.POINTER(ctypes.c_void_p)],
                "cuCtxSetCurrent": [ctypes.c_void_p],
                "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
                "cuMemGetAllocationGranularity": [ctypes.POINTER(size_t),
                                                  ctypes.POINTER(_AllocationProp), ctypes.c_int],
                "cuMemAddressReserve": [ctypes.POINTER(u64), size_t, size_t, u64, u64],
                "cuMemAddressFree": [u64, size_t],
                "cuMemCreate": [ctypes.POINTER(u64), size_t, ctypes.POINTER(_AllocationProp),
                                u64],
                "cuMemRelease": [u64],
                "cuMemMap": [u64, size_t, size_t, u64, u64],
                "cuMemUnmap": [u64, size_t],
                "cuMemSetAccess": [u64, size_t, ctypes.POINTER(_AccessDesc), size_t],
                "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
                "cuStreamCreate": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint],
            }.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
            _lib = lib
    return _lib


def _check(code: int, what: str) -> None:
    if code != 0:
        text = ctypes.c_char_p()
        try:
            _driver().cuGetErrorString(code, ctypes.byref(text))
        except Exception:  # noqa: BLE001 - the message is a nicety
            pass
        msg = text.value.decode() if text.value else f"CUresult {code}"
        raise StableMemoryError(f"{what}: {msg}")


def available(device_index: int = 0) -> bool:
    """Can stable buffers be made on this card? (CUDA with the driver's VMM API; not turned
    off with ``AGILE_RAG_STABLE_KV=0``.)"""
    if os.environ.get("AGILE_RAG_STABLE_KV", "1").strip().lower() in ("0", "false", "no"):
        return False
    try:
        import torch
        if not torch.cuda.is_available():
            return False
        _driver()
        _granularity(device_index)
        return True
    except Exception as exc:  # noqa: BLE001 - no driver, no VMM: ordinary allocations
        log.info("stable GPU buffers not available (%s): CUDA graphs are captured again "
                 "after a trim", exc)
        return False


def _prop(device_index: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type = _PINNED
    prop.location.type = _ON_DEVICE
    prop.location.id = device_index
    return prop


def _granularity(device_index: int) -> int:
    _current_context(device_index)
    gran = ctypes.c_size_t()
    prop = _prop(device_index)
    _check(_driver().cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), 0),
           "cuMemGetAllocationGranularity")
    return int(gran.value)


def _current_context(device_index: int) -> None:
    """Driver calls need a current context: torch's (the primary context) in this thread."""
    drv = _driver()
    ctx = ctypes.c_void_p()
    _check(drv.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if ctx.value:
        return
    _check(drv.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(drv.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
    _check(drv.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev.value), "cuDevicePrimaryCtxRetain")
    _check(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class _CudaArray:
    """What ``torch.as_tensor`` reads to wrap device memory it does not own."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None}


class StableBuffer:
    """``nbytes`` of GPU memory on card ``device_index`` at an address that never changes;
    ``unmap()`` / ``map()`` give its pages back and take new ones. Mapped when made."""

    def __init__(self, nbytes: int, device_index: int = 0):
        import torch
        self.device_index = int(device_index)
        self.device = torch.device("cuda", self.device_index)
        gran = _granularity(self.device_index)
        self.nbytes = max(gran, -(-int(nbytes) // gran) * gran)
        self.requested = int(nbytes)
        ptr = ctypes.c_ulonglong()
        _check(_driver().cuMemAddressReserve(ctypes.byref(ptr), self.nbytes, gran, 0, 0),
               "cuMemAddressReserve")
        self.ptr = int(ptr.value)
        self._handle: int | None = None
        self.maps = 0                     # how many times pages were mapped (the first included)
        try:
            self.map()
            self._bytes = torch.as_tensor(_CudaArray(self.ptr, self.nbytes), device=self.device)
        except BaseException:
            self.close()
            raise

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def map(self) -> None:
        """Take physical pages for the range (its contents are undefined). Idempotent."""
        if self._handle is not None:
            return
        drv = _driver()
        _current_context(self.device_index)
        handle = ctypes.c_ulonglong()
        prop = _prop(self.device_index)
        _check(drv.cuMemCreate(ctypes.byref(handle), self.nbytes, ctypes.byref(prop), 0),
               "cuMemCreate")
        try:
            _check(drv.cuMemMap(self.ptr, self.nbytes, 0, handle.value, 0), "cuMemMap")
            access = _AccessDesc()
            access.location.type = _ON_DEVICE
            access.location.id = self.device_index
            access.flags = _READ_WRITE
            try:
                _check(drv.cuMemSetAccess(self.ptr, self.nbytes, ctypes.byref(access), 1),
                       "cuMemSetAccess")
            except BaseException:
                drv.cuMemUnmap(self.ptr, self.nbytes)
                raise
        except BaseException:
            drv.cuMemRelease(handle.value)
            raise
        self._handle = int(handle.value)
        self.maps += 1

    def unmap(self) -> None:
        """Give the pages back (waits for the calling thread's stream first: the owner's work
        on the buffer; never a device-wide sync, which would invalidate a CUDA graph another
        thread is capturing). Idempotent."""
        if self._handle is None:
            return
        import torch
        torch.cuda.current_stream(self.device).synchronize()
        drv = _driver()
        _current_context(self.device_index)
        _check(drv.cuMemUnmap(self.ptr, self.nbytes), "cuMemUnmap")
        _check(drv.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def view(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> Any:
        """A tensor of ``dtype`` and ``shape`` over the range from byte ``offset``."""
        import torch
        count = 1
        for d in shape:
            count *= int(d)
        size = count * torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset + size > self.nbytes:
            raise ValueError(f"{size} bytes at {offset} do not fit {self.nbytes}")
        return self._bytes[offset:offset + size].view(dtype).view(shape)

    def close_soon(self) -> None:
        """:meth:`close` for a finalizer, which runs on whichever thread drops the last
        reference or runs the garbage collector: on a thread that is capturing a CUDA graph now,
        the close (it waits for the thread's stream) would invalidate the capture, so it runs on
        a thread of its own instead."""
        import torch
        try:
            capturing = torch.cuda.is_current_stream_capturing()
        except Exception:  # noqa: BLE001 - no CUDA state to ask: close here
            capturing = False
        if capturing:
            threading.Thread(target=self.close, name="stable-buffer-close", daemon=True).start()
            return
        self.close()

    def close(self) -> None:
        """Unmap and free the address range: no tensor over it may be used afterwards."""
        try:
            self.unmap()
        finally:
            if self.ptr:
                _driver().cuMemAddressFree(self.ptr, self.nbytes)
                self.ptr = 0

    def __repr__(self) -> str:
        return (f"StableBuffer({self.nbytes} bytes at {self.ptr:#x} on cuda:{self.device_index}, "
                f"{'mapped' if self.mapped else 'unmapped'})")
