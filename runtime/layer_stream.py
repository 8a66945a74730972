"""Layer-streamed residency of an encoder (issue 13, item 3).

An encoder (a BERT / XLM-R embedder or cross-encoder) is a stack of identically shaped blocks
(`encoder.layer`, an nn.ModuleList) plus small non-repeated parts (embeddings, pooler, classifier
head, final norms). `LayerStream.attach(device)` makes the module runnable on `device` while only
the non-repeated parts live there, plus K "slots", each one layer's worth of parameters and
buffers. During a forward, layer i's weights are copied from host memory into slot i % K on a side
stream, ahead of their use, overlapped with the compute of the layers before:

- a forward pre-hook on the outer modules (the first one that runs in a pass) starts the copies
  of layers 0 .. K-2;
- the pre-hook of layer i makes the compute stream wait for layer i's copy (a CUDA event), points
  layer i's parameters at views of its slot (`param.data = view`), and starts the copy of layer
  i+K-1 into the slot layer i-1 used, on the copy stream, after an event recorded on the compute
  stream by layer i-1's forward post-hook (so the copy never overwrites weights still being read).

While attached, every parameter and buffer is on the device as far as callers can tell: each
layer's tensors are views of its slot (holding whichever layer was copied there last; the
pre-hook re-points them before the layer runs), so code that picks the device from the first
parameter, or sentence-transformers' encode/predict (which `.to(device)` a model with any tensor
elsewhere), sees a model on the device. Never read a layer's weights outside its forward.

With K = 2 the copy of layer i+1 overlaps the compute of layer i. The copies come straight from
the weights' host memory: when the module is wrapped by a `WeightResidency`, each layer is one
contiguous range of its flat pinned master copy (one copy per layer, no extra host memory);
otherwise (host tensors not pinned while the target is CUDA, or `stage=True`) each layer is packed
once, at the first attach, into a flat (pinned) host buffer that is kept until `release()`.

Opt-in `host_embeddings=True`: embedding tables bigger than one layer (XLM-R's 250k-token word
embeddings, ~515 MB of the ~565 MB a streamed XLM-R-large holds) stay in host memory and are
looked up on the CPU, the rows copied to the device (a pinned buffer from the caching host
allocator); the table's parameter points at a zero-stride placeholder on the device. The
lookup reads the token ids back to the host, which synchronises the CPU with the compute stream
once per forward (the GPU idles while the CPU gathers the rows), so it is for budgets where even
the resident parts do not fit.

`run_group(fns)` runs several forwards as one pass, layer-major, each layer copied once for all
of them (runtime/layer_group.py): for jobs whose forwards are too small to hide their copies.

On a CPU "device" (the tests) the same hooks and slots run, the copies are plain `copy_` with no
streams or events.

Rules the callers rely on:
- Inference only: autograd would save views of slots that later layers overwrite.
- Forwards may come from several threads (the encoder engine keeps two in flight on a GPU):
  a pass lock, taken by the first hook of a forward and released once its last layer is
  launched (or when it raises), serialises the passes; the next forward's kernels still queue
  behind the running one's. The hooks use the forwarding thread's current CUDA stream, and a
  pass's copies also wait for the previous pass's layers, whichever stream they ran on.
- Build the LayerStream after the module's `WeightResidency` (which moves the weights into its
  master copy; attach refuses weights that moved since). The module must be on the host when
  attached (the residency evicted), and nothing else may move its weights while attached: never
  `admit` the residency of an attached module, and `detach()` before `admit`. Attach and detach
  between forwards, never during one. `detach()` points every parameter and buffer back at
  exactly the host tensors they were views of before (same storage, same offsets).
- Weights are immutable: the staged host buffers (when used) are copies taken at the first attach.
- Blocking calls (`attach`, `detach`, `measure_copy_rate`): run them in an executor thread.

GPU memory while attached (`weight_bytes`, `gpu_bytes()`): the resident parts (one flat buffer)
plus K slots. For an XLM-R-large cross-encoder (bge-reranker-v2-m3 shape, fp16) the resident
parts are dominated by the 250k-token word embedding (~515 MB), each slot is ~25 MB, and a pass
copies the 24 layers, ~604 MB.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layer_group import _Captured, one_by_one, run_layer_major, same_result

__all__ = ["LayerStream", "find_blocks", "ALIGN", "host_twins"]

log = logging.getLogger(__name__)

# Alignment of every copied range inside a slot or the resident buffer (as runtime.residency).
ALIGN = 256


# The CUDA API the hooks call (Stream, Event, stream, current_stream, is_available): a seam the
# CPU tests replace with fakes that log each stream's queue, to check the ordering protocol.
_cuda: Any = torch.cuda


# The host tensors a forward's device inputs were copied from (this thread's forward only):
# a host embedding lookup reads its ids from here instead of back from the device, which
# would synchronise the CPU with everything queued on the compute stream (the forward before).
_twins = threading.local()


class host_twins:
    """``with host_twins([(device_tensor, host_tensor), ...]):`` around a forward whose
    inputs were copied to the device from those host tensors (same values): the host
    embedding lookups of that forward take their ids from the host tensor, with no sync."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = {(d.data_ptr(), tuple(d.shape), d.stride()): h for d, h in pairs
                      if d.device.type != "cpu"}

    def __enter__(self) -> host_twins:
        self.prev = getattr(_twins, "pairs", None)
        _twins.pairs = self.pairs
        return self

    def __exit__(self, *exc: Any) -> None:
        _twins.pairs = self.prev


def _host_ids(ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(ids on the host, whether reading them synchronised): the host twin of this device
    tensor when the forward named one (no sync), else a copy back from the device (which
    waits for the stream that made them)."""
    if ids.device.type == "cpu":
        return ids, False
    pairs = getattr(_twins, "pairs", None)
    if pairs:
        twin = pairs.get((ids.data_ptr(), tuple(ids.shape), ids.stride()))
        if twin is not None and twin.dtype == ids.dtype:
            return twin, False
    return ids.to("cpu"), True


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from t's first element to one past its last (strided extent)."""
    if t.numel() == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of `t`, on t's device."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (st.nbytes(),), (1,))


def _signature(mod: nn.Module) -> tuple:
    items = [(n, tuple(p.shape), p.dtype) for n, p in mod.named_parameters(remove_duplicate=False)]
    items += [(n, tuple(b.shape), b.dtype) for n, b in mod.named_buffers(remove_duplicate=False)]
    return (type(mod), tuple(items))


def find_blocks(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated block list of `module`: the longest nn.ModuleList (at least 2 entries) whose
    children have identical types and parameter/buffer names, shapes and dtypes (ties: the one
    with the most parameters). Returns (qualified name, the list). ValueError when there is none.
    """
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, mod in module.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        sigs = {_signature(child) for child in mod}
        if len(sigs) != 1:
            continue
        numel = sum(p.numel() for p in mod[0].parameters())
        if numel == 0:
            continue
        key = (len(mod), numel)
        if best is None or key > best[:2]:
            best = (len(mod), numel, name, mod)
    if best is None:
        raise ValueError(f"{type(module).__name__} has no nn.ModuleList of identically shaped "
                         "blocks to stream")
    return best[2], best[3]


@dataclass
class _Tensor:
    """One distinct tensor object (a Parameter or a buffer) the stream re-points."""
    tensor: torch.Tensor
    owners: list[tuple[nn.Module, str, bool]]  # (module, name, is_parameter)
    host: torch.Tensor = field(init=False)     # its host `.data` before attach (restored by detach)
    host_ptr: int = field(init=False)          # where the copies read it from
    replaced: bool = False                     # the registered object was swapped (see _bind)

    def __post_init__(self) -> None:
        self.host = self.tensor.data
        self.host_ptr = self.tensor.data_ptr()


@dataclass
class _Layout:
    """Where a group of tensors' bytes come from (merged byte ranges of their storages) and where
    each tensor sits once those ranges are packed into one flat buffer."""
    ranges: list[tuple[torch.Tensor, int, int]]  # (an alias of that storage, start byte, end byte)
    packed: list[int]                            # packed offset of each range
    places: list[tuple[torch.dtype, tuple, tuple, int]]  # per tensor: dtype, size, stride, byte off
    nbytes: int                                  # packed size (aligned)
    sources: list[torch.Tensor] = field(init=False)  # uint8 views of the ranges, made once

    def __post_init__(self) -> None:
        self.sources = [_storage_bytes(t)[s:e] for t, s, e in self.ranges]

    def signature(self) -> tuple:
        return (tuple(e - s for _, s, e in self.ranges), tuple(self.packed), tuple(self.places))


def _layout(tensors: list[torch.Tensor]) -> _Layout:
    """Merge the tensors' byte ranges per storage (gaps under ALIGN bytes are bridged, so a layer
    of a WeightResidency master copy is one range), packed in order of first appearance."""
    info: list[tuple[int, int]] = []                 # per tensor: (storage key, start byte)
    by_key: dict[int, list[tuple[int, int]]] = {}
    rep: dict[int, torch.Tensor] = {}
    for i, t in enumerate(tensors):
        st = t.untyped_storage()
        key, start = (st.data_ptr(), t.data_ptr() - st.data_ptr()) if st.nbytes() else (-1 - i, 0)
        info.append((key, start))
        by_key.setdefault(key, []).append((start, start + _span_bytes(t)))
        if key not in rep:
            rep[key] = t.detach()   # the host storage itself, not the object the hooks re-point
    merged: dict[int, list[list[int]]] = {}
    for key, lst in by_key.items():
        out: list[list[int]] = []
        for s, e in sorted(lst):
            if out and s - out[-1][1] < ALIGN:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        merged[key] = out

    def find(key: int, start: int) -> int:
        return next(r for r, (s, e) in enumerate(merged[key]) if s <= start <= e)

    ranges: list[tuple[torch.Tensor, int, int]] = []
    packed: list[int] = []
    where: dict[tuple[int, int], int] = {}           # (storage key, range index) -> position
    total = 0
    for key, start in info:
        r = find(key, start)
        if (key, r) not in where:
            s, e = merged[key][r]
            where[(key, r)] = len(ranges)
            ranges.append((rep[key], s, e))
            packed.append(total)
            total += _align(e - s)
    places = []
    for t, (key, start) in zip(tensors, info):
        r = find(key, start)
        off = packed[where[(key, r)]] + start - merged[key][r][0]
        if off % t.element_size():
            raise ValueError("a tensor's byte offset is not a multiple of its element size")
        places.append((t.dtype, tuple(t.shape), tuple(t.stride()), off))
    return _Layout(ranges, packed, places, total)


def _copy_ranges(dst: torch.Tensor, lay: _Layout, *, non_blocking: bool) -> None:
    """Copy a layout's host ranges into the flat buffer `dst` at their packed offsets."""
    for src, off in zip(lay.sources, lay.packed):
        dst[off:off + src.numel()].copy_(src, non_blocking=non_blocking)


def _views(flat: torch.Tensor, layout: _Layout) -> list[torch.Tensor]:
    typed: dict[torch.dtype, torch.Tensor] = {}
    out = []
    for dtype, size, stride, off in layout.places:
        if dtype not in typed:
            typed[dtype] = flat.view(dtype)
        item = typed[dtype].element_size()
        out.append(typed[dtype].as_strided(size, stride, off // item))
    return out


def _distinct(mods: list[nn.Module]) -> dict[int, _Tensor]:
    by_id: dict[int, _Tensor] = {}
    for root in mods:
        for mod in root.modules():
            for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    entry = by_id.get(id(t))
                    if entry is None:
                        entry = by_id[id(t)] = _Tensor(t, [])
                    entry.owners.append((mod, name, is_param))
    return by_id


class LayerStream:
    """Runs `module` on `device` with its repeated blocks streamed through K slot buffers.

    `LayerStream(module, device="cuda", slots=2)`; `attach()` / `detach()` / `release()`;
    `weight_bytes` (resident parts + K slots: what the arbiter grants), `gpu_bytes(batch_tokens,
    seq_len=None)` (that plus an activation estimate), `bytes_per_pass`, `stats()` for /metrics.

    Options: `blocks` (the nn.ModuleList, or its dotted name; default: found by `find_blocks`),
    `stage` (pack each layer into its own host buffer at the first attach; default: when the
    host weights are not pinned and the device is CUDA), `timing` (time each layer copy with
    CUDA events: `stats()["copy_gbps"]`), `host_embeddings` (see the module docstring).
    """

    def __init__(self, module: nn.Module, device: str | torch.device = "cuda", *,
                 slots: int = 2, blocks: nn.ModuleList | str | None = None,
                 stage: bool | None = None, timing: bool = False,
                 host_embeddings: bool = False):
        if slots < 2:
            raise ValueError("LayerStream needs at least 2 slots (one computing, one loading)")
        self.module = module
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", _cuda.current_device())
        self.device = dev
        self._cuda = dev.type == "cuda"
        if isinstance(blocks, str):
            self.blocks_name = blocks
            got = module.get_submodule(blocks)
            if not isinstance(got, nn.ModuleList):
                raise ValueError(f"{blocks} is a {type(got).__name__}, not an nn.ModuleList")
            self.blocks = got
        elif blocks is not None:
            self.blocks = blocks
            self.blocks_name = next((n for n, m in module.named_modules() if m is blocks), "?")
        else:
            self.blocks_name, self.blocks = find_blocks(module)
        self.num_layers = len(self.blocks)
        self.slots = min(slots, self.num_layers)
        self.timing = timing and self._cuda
        self._lock = threading.Lock()
        self._timing_lock = threading.Lock()     # the pass timings, read by stats() elsewhere

        # Distinct tensors: per layer, and the rest (resident while attached).
        self._layer_tensors: list[list[_Tensor]] = []
        in_layers: dict[int, int] = {}
        for i, layer in enumerate(self.blocks):
            entries = list(_distinct([layer]).values())
            for e in entries:
                if id(e.tensor) in in_layers:
                    raise ValueError(f"a tensor is shared by layers {in_layers[id(e.tensor)]} "
                                     f"and {i}: cannot stream")
                in_layers[id(e.tensor)] = i
            self._layer_tensors.append(entries)
        everything = _distinct([module])
        self._resident_tensors = [e for k, e in everything.items() if k not in in_layers]
        # Opt-in: embedding tables bigger than a layer stay in host memory (see _lookup).
        self._host_embeds: list[nn.Embedding] = []
        if host_embeddings:
            layer_bytes = sum(t.numel() * t.element_size()
                              for t in (e.tensor for e in self._layer_tensors[0]))
            for mod in module.modules():
                w = getattr(mod, "weight", None)
                if (isinstance(mod, nn.Embedding) and isinstance(w, torch.Tensor)
                        and id(w) not in in_layers and w.numel() * w.element_size() > layer_bytes
                        and len(everything[id(w)].owners) == 1):
                    self._host_embeds.append(mod)
            kept = {id(m.weight) for m in self._host_embeds}
            self._resident_tensors = [e for e in self._resident_tensors
                                      if id(e.tensor) not in kept]
        self._host_embed_tensors = [everything[id(m.weight)] for m in self._host_embeds]
        self.host_embedding_bytes = sum(m.weight.numel() * m.weight.element_size()
                                        for m in self._host_embeds)
        for e in everything.values():
            if e.tensor.device.type != "cpu":
                raise ValueError(f"{type(module).__name__} has weights on {e.tensor.device}: "
                                 "LayerStream takes a module whose weights are in host memory")
        kinds = {e.tensor.is_inference() for e in everything.values()}
        self._inference = kinds == {True}

        # Layer layouts: identical across layers, or streaming is refused.
        self._layer_layouts = [_layout([e.tensor for e in lt]) for lt in self._layer_tensors]
        sig0 = self._layer_layouts[0].signature()
        for i, lay in enumerate(self._layer_layouts[1:], 1):
            if lay.signature() != sig0:
                raise ValueError(f"layer {i} is laid out differently in host memory from layer 0")
        lay0 = self._layer_layouts[0]
        self.slot_bytes = lay0.nbytes
        self.layer_copy_bytes = sum(e - s for _, s, e in lay0.ranges)
        self._copies_per_layer = len(lay0.ranges)
        self._resident_layout = _layout([e.tensor for e in self._resident_tensors])
        self.resident_bytes = self._resident_layout.nbytes
        # No host memory may be shared across a layer boundary (tied weights): refused.
        self._check_disjoint()

        sources_pinned = self._cuda and all(
            t.is_pinned() for lay in self._layer_layouts for t, _, _ in lay.ranges)
        if stage is None:
            stage = self._cuda and not sources_pinned
        self.staged = bool(stage)
        if self.staged:
            self.layer_copy_bytes = self.slot_bytes   # one copy of the packed layer
            self._copies_per_layer = 1
        self._staged_bufs: list[torch.Tensor] | None = None
        self.pinned = sources_pinned if not self.staged else False

        # Attached state.
        self._attached = False
        self._resident_gpu: torch.Tensor | None = None
        self._slot_bufs: list[torch.Tensor] = []
        self._slot_views: list[list[torch.Tensor]] = []
        self._copy_stream: Any = None
        self._ready: list[Any] = []
        self._freed: list[Any] = []
        self._hooks: list[Any] = []
        self._active = False
        self._cursor = 0
        self._pass_lock = threading.Lock()
        self._pass_owner: int | None = None
        self._pass_root: nn.Module | None = None
        self._pass_done: Any = None
        self._group_thread: int | None = None  # the thread running a group (run_group)
        self._group_mode = ""                  # its phase: capture | layers | replay
        self._group_ok: bool | None = None     # grouped results checked (None: not yet)
        self._t_pass: list[tuple[Any, Any]] = []          # this pass's (start, end) copy events
        self._t_pending: list[list[tuple[Any, Any]]] = []  # finished passes not yet read
        self._stats: dict[str, Any] = {
            "passes": 0, "layer_copies": 0, "bytes_copied": 0, "aborted_passes": 0,
            "group_passes": 0, "group_forwards": 0, "attaches": 0, "detaches": 0,
            "attach_seconds": 0.0, "last_copy_seconds": None,
            "copy_seconds": 0.0, "timed_passes": 0, "host_lookups": 0, "host_lookup_syncs": 0,
        }

    # ------------------------------------------------------------------ sizes
    @property
    def weight_bytes(self) -> int:
        """GPU bytes the streamed residency holds while attached: the resident parts plus K slots
        (what `attach` allocates; the arbiter grants this instead of the whole model)."""
        return self.resident_bytes + self.slots * self.slot_bytes

    @property
    def model_bytes(self) -> int:
        """Bytes of the whole model's weights (resident parts + every layer + host embedding
        tables), for comparison."""
        return (self.resident_bytes + self.num_layers * self.slot_bytes
                + self.host_embedding_bytes)

    @property
    def bytes_per_pass(self) -> int:
        """Host-to-device bytes one forward copies (every layer once)."""
        return self.num_layers * self.layer_copy_bytes

    def activation_bytes(self, batch_tokens: int, seq_len: int | None = None) -> int:
        """A conservative estimate of a forward's working memory for `batch_tokens` tokens (the
        same as the resident model's: streaming adds no activations). Per token
        (2 * intermediate + 8 * hidden) * itemsize; with `seq_len`, also one materialised
        attention-score matrix per head and the 4-D mask (eager / CPU attention)."""
        if batch_tokens <= 0:
            return 0
        layer = self.blocks[0]
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        item = next(layer.parameters()).element_size()
        if linears:
            hidden = min(m.in_features for m in linears)
            inter = max(m.out_features for m in linears)
        else:  # pragma: no cover - no encoder without linears
            hidden = inter = max(p.shape[-1] for p in layer.parameters())
        total = batch_tokens * (2 * inter + 8 * hidden) * item
        if seq_len:
            heads = next((getattr(m, a) for m in layer.modules()
                          for a in ("num_attention_heads", "num_heads")
                          if isinstance(getattr(m, a, None), int)), 1)
            total += batch_tokens * seq_len * (2 * heads + 1) * item
        return total

    def gpu_bytes(self, batch_tokens: int = 0, seq_len: int | None = None) -> int:
        """What a streamed job needs on the device: `weight_bytes` (resident parts + K slots),
        plus `activation_bytes(batch_tokens, seq_len)` when tokens are given."""
        return self.weight_bytes + self.activation_bytes(batch_tokens, seq_len)

    @property
    def attached(self) -> bool:
        return self._attached

    def stats(self) -> dict[str, Any]:
        """Counters and sizes for /metrics (cheap; never synchronises)."""
        self._collect_timing()
        s = dict(self._stats)
        s.update(attached=self._attached, device=str(self.device), layers=self.num_layers,
                 slots=self.slots, slot_bytes=self.slot_bytes, resident_bytes=self.resident_bytes,
                 weight_bytes=self.weight_bytes, model_bytes=self.model_bytes,
                 bytes_per_pass=self.bytes_per_pass, source="staged" if self.staged else "host",
                 pinned=self.pinned, copies_per_layer=self._copies_per_layer,
                 host_embedding_bytes=self.host_embedding_bytes)
        if s["timed_passes"] and s["copy_seconds"] > 0:
            s["copy_gbps"] = s["timed_passes"] * self.bytes_per_pass / s["copy_seconds"] / 1e9
        return s

    def __repr__(self) -> str:
        return (f"LayerStream({type(self.module).__name__}, {self.blocks_name}: "
                f"{self.num_layers} x {self.slot_bytes / 1e6:.1f} MB, K={self.slots}, resident "
                f"{self.resident_bytes / 1e6:.1f} MB, device={self.device}, "
                f"{'attached' if self._attached else 'detached'})")

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> dict[str, Any]:
        """Copy the resident parts to the device, allocate the K slots and install the hooks.
        Blocking; idempotent. Returns {"bytes", "seconds"} (bytes allocated on the device)."""
        with self._lock:
            if self._attached:
                return {"bytes": 0, "seconds": 0.0}
            if self.module is None:
                raise RuntimeError("LayerStream.attach after release()")
            t0 = time.perf_counter()
            if self._cuda and not _cuda.is_available():
                raise RuntimeError("LayerStream on a CUDA device needs CUDA")
            with torch.inference_mode(self._inference):
                self._attach_locked()
            seconds = time.perf_counter() - t0
            self._stats["attaches"] += 1
            self._stats["attach_seconds"] = seconds
            return {"bytes": self.weight_bytes, "seconds": seconds}

    def _attach_locked(self) -> None:
        dev = self.device
        if self.staged and self._staged_bufs is None:
            self._staged_bufs = [self._stage(lay) for lay in self._layer_layouts]
        # Saved host views (the tensors may have been re-pointed by a residency since __init__).
        for e in self._all_tensors():
            if e.tensor.device.type != "cpu":
                raise RuntimeError("LayerStream.attach: the module's weights are not on the host "
                                   "(evict its WeightResidency first)")
            if e.tensor.data_ptr() != e.host_ptr:
                raise RuntimeError("LayerStream.attach: the module's host weights moved since the "
                                   "LayerStream was built: build a new one")
            e.host = e.tensor.data
        try:
            if self._cuda:
                self._copy_stream = _cuda.Stream(dev)
                self._ready = [_cuda.Event() for _ in range(self.slots)]
                self._freed = [_cuda.Event() for _ in range(self.slots)]
                self._pass_done = _cuda.Event()
            # Allocated on the current (compute) stream, as runtime.residency does.
            resident = torch.empty(self.resident_bytes, dtype=torch.uint8, device=dev)
            self._slot_bufs = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=dev)
                               for _ in range(self.slots)]
            lay = self._resident_layout
            if self._cuda:
                self._copy_stream.wait_stream(_cuda.current_stream(dev))
                with _cuda.stream(self._copy_stream):
                    _copy_ranges(resident, lay, non_blocking=True)
            else:
                _copy_ranges(resident, lay, non_blocking=False)
            self._resident_gpu = resident
            for ent, v in zip(self._resident_tensors, _views(resident, lay)):
                self._bind(ent, v)
            self._slot_views = [_views(buf, self._layer_layouts[0]) for buf in self._slot_bufs]
            # Every parameter and buffer reports the device from now on (wrappers such as
            # sentence-transformers' encode/predict move a model that has any tensor elsewhere,
            # and callers take the device from the first parameter): each layer points at its
            # slot (its contents are copied in before the layer runs), and a host embedding
            # table at a placeholder on the device (its lookups read the host table).
            for i, lt in enumerate(self._layer_tensors):
                for ent, v in zip(lt, self._slot_views[i % self.slots]):
                    self._bind(ent, v)
            for mod, ent in zip(self._host_embeds, self._host_embed_tensors):
                if "forward" in mod.__dict__:
                    raise RuntimeError(f"{type(mod).__name__} already has an instance forward")
                mod.forward = self._make_lookup(mod, ent.host)
                self._bind(ent, torch.zeros(1, dtype=ent.host.dtype, device=dev)
                           .expand(ent.host.shape))
            self._install_hooks()
            if self._cuda:
                self._copy_stream.synchronize()
        except BaseException:
            self._teardown()
            raise
        self._active = False
        self._cursor = 0
        self._attached = True

    def detach(self) -> dict[str, Any]:
        """Remove the hooks, point every tensor back at its host memory, and drop the resident
        parts and slots. Blocking; idempotent. Returns {"bytes", "seconds"} (bytes released)."""
        with self._lock:
            if not self._attached:
                return {"bytes": 0, "seconds": 0.0}
            t0 = time.perf_counter()
            with torch.inference_mode(self._inference):
                self._teardown()
            self._attached = False
            self._stats["detaches"] += 1
            return {"bytes": self.weight_bytes, "seconds": time.perf_counter() - t0}

    def release(self) -> None:
        """Detach and drop every reference to the module and the staged host buffers."""
        self.detach()
        with self._lock:
            self._staged_bufs = None
            self._layer_tensors = []
            self._resident_tensors = []
            self._layer_layouts = []
            self._resident_layout = _Layout([], [], [], 0)
            self._host_embeds = []
            self._host_embed_tensors = []
            self.module = None  # type: ignore[assignment]

    def _teardown(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for mod in self._host_embeds:
            mod.__dict__.pop("forward", None)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()   # no copy may still write a slot we free
        if self._pass_done is not None:
            self._pass_done.synchronize()     # nor a layer still read one (on any stream)
        for e in self._all_tensors():
            self._unbind(e)
        self._collect_timing()
        self._resident_gpu = None
        self._slot_bufs = []
        self._slot_views = []
        self._ready = []
        self._freed = []
        self._copy_stream = None
        self._pass_done = None
        self._t_pass = []
        self._t_pending = []
        self._active = False
        self._cursor = 0
        self._pass_root = None
        if self._pass_owner is not None:      # detached mid-pass (a misuse): never deadlock later
            self._pass_owner = None
            self._pass_lock.release()

    def _all_tensors(self) -> list[_Tensor]:
        return (self._resident_tensors + self._host_embed_tensors
                + [e for lt in self._layer_tensors for e in lt])

    # ------------------------------------------------------------------ binding
    @staticmethod
    def _bind(e: _Tensor, view: torch.Tensor) -> None:
        if not e.replaced:
            try:
                e.tensor.data = view
                return
            except RuntimeError:
                e.replaced = True
        # Tensors whose .data cannot be swapped: replace the registered object in every owner.
        new = nn.Parameter(view, requires_grad=False) if isinstance(e.tensor, nn.Parameter) \
            else view
        for mod, name, is_param in e.owners:
            (mod._parameters if is_param else mod._buffers)[name] = new

    @staticmethod
    def _unbind(e: _Tensor) -> None:
        if e.replaced:   # the original object was never changed: register it again
            for mod, name, is_param in e.owners:
                (mod._parameters if is_param else mod._buffers)[name] = e.tensor
            e.replaced = False
            return
        e.tensor.data = e.host

    def _stage(self, lay: _Layout) -> torch.Tensor:
        buf = None
        if self._cuda:
            try:
                buf = torch.empty(lay.nbytes, dtype=torch.uint8, pin_memory=True)
                self.pinned = True
            except Exception as exc:  # e.g. out of lockable memory
                log.warning("could not pin %.1f MB for a streamed layer (%s): pageable copies",
                            lay.nbytes / 1e6, exc)
        if buf is None:
            buf = torch.empty(lay.nbytes, dtype=torch.uint8)
        _copy_ranges(buf, lay, non_blocking=False)
        return buf

    def _check_disjoint(self) -> None:
        owner: dict[int, list[tuple[int, int, str]]] = {}
        groups = [(f"layer {i}", lay) for i, lay in enumerate(self._layer_layouts)]
        groups.append(("resident parts", self._resident_layout))
        if self._host_embeds:
            groups.append(("host embeddings", _layout([m.weight for m in self._host_embeds])))
        for name, lay in groups:
            for t, s, e in lay.ranges:
                base = t.untyped_storage().data_ptr()
                for s2, e2, other in owner.get(base, []):
                    if s < e2 and s2 < e and other != name:
                        raise ValueError(f"{name} shares host memory with {other} (tied weights "
                                         "across a block boundary): cannot stream")
                owner.setdefault(base, []).append((s, e, name))

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        # Every module on the path from the root to the block list's parent: whichever is called
        # first in a pass (some wrappers call .forward directly, which skips the hooks) starts it.
        path = self.blocks_name.split(".") if self.blocks_name not in ("", "?") else []
        mods = [self.module]
        cur = self.module
        for part in path[:-1]:
            cur = getattr(cur, part)          # registered submodules, ModuleList entries too
            mods.append(cur)
        for m in mods:
            self._hooks.append(m.register_forward_pre_hook(self._outer_pre))
            self._hooks.append(m.register_forward_hook(self._outer_post, always_call=True))
        for i, layer in enumerate(self.blocks):
            self._hooks.append(layer.register_forward_pre_hook(self._make_pre(i),
                                                               with_kwargs=True))
            # always_call: runs (with output None) when the layer raised, to end the pass
            self._hooks.append(layer.register_forward_hook(self._make_post(i), always_call=True))

    def _make_lookup(self, mod: nn.Embedding, weight: torch.Tensor):
        dev = self.device                      # `weight`: the host table

        def lookup(ids: torch.Tensor) -> torch.Tensor:
            """The embedding lookup on the CPU, from the host table; the rows go to the device.
            The ids come from their host twin (`host_twins`) when the caller named one;
            otherwise reading them back synchronises the CPU with the stream that made them."""
            if self._grouping() and self._group_mode == "replay":
                # the blocks ignore their input in a group's replay: no gather, no sync
                return torch.empty((*ids.shape, weight.shape[1]), dtype=weight.dtype,
                                   device=dev)
            self._stats["host_lookups"] += 1
            cpu_ids, synced = _host_ids(ids)
            if synced:
                self._stats["host_lookup_syncs"] += 1
            if mod.max_norm is not None or dev.type == "cpu":
                out = nn.functional.embedding(cpu_ids, weight, mod.padding_idx, mod.max_norm,
                                              mod.norm_type, mod.scale_grad_by_freq, mod.sparse)
                return out.to(dev)
            buf = torch.empty((cpu_ids.numel(), weight.shape[1]), dtype=weight.dtype,
                              pin_memory=True)     # from the caching host allocator
            torch.index_select(weight, 0, cpu_ids.reshape(-1), out=buf)
            return buf.view(*cpu_ids.shape, weight.shape[1]).to(dev, non_blocking=True)
        return lookup

    def _make_pre(self, i: int):
        def hook(module, args, kwargs):
            if self._grouping():
                if self._group_mode == "capture":
                    raise _Captured(args, kwargs)     # the member's forward stops here
                return None                  # run_group drives the layers itself
            self._layer_pre(i)
            return None
        return hook

    def _make_post(self, i: int):
        def hook(module, args, output):
            self._layer_post(i, output)
        return hook

    # A pass belongs to one thread from its start to its last layer: the pass lock serialises
    # forwards run by several threads (the encoder engine keeps two in flight on a GPU), so a
    # second forward queues its layers behind the first one's (its kernels are still queued
    # while the first computes: the lock is released once the last layer is launched).
    def _owner(self) -> bool:
        return self._pass_owner == threading.get_ident()

    def _grouping(self) -> bool:
        return self._group_thread is not None and self._group_thread == threading.get_ident()

    def _outer_pre(self, module, args) -> None:
        if self._grouping():
            return                           # run_group drives the pass itself
        if self._owner() and self._active and self._cursor == 0:
            return                           # an inner module of the pass already started
        self._start_pass(module)

    def _outer_post(self, module, args, output) -> None:
        if self._grouping():
            return
        if self._owner() and self._pass_root is module:
            self._end_pass(aborted=True)     # it returned or raised without running the layers

    def _start_pass(self, root: nn.Module | None) -> None:
        if not self._owner():
            self._pass_lock.acquire()
            self._pass_owner = threading.get_ident()
        elif self._active:
            self._stats["aborted_passes"] += 1   # this thread's last pass stopped midway
        self._active = True
        self._cursor = 0
        self._pass_root = root
        self._start_copies()

    def _end_pass(self, *, aborted: bool) -> None:
        if self._cuda:
            self._pass_done.record(_cuda.current_stream(self.device))
        if aborted:
            self._stats["aborted_passes"] += 1
            self._t_pass = []
        self._active = False
        self._cursor = 0
        self._pass_root = None
        self._pass_owner = None
        self._pass_lock.release()

    def _copy(self, j: int, *, wait_freed: bool) -> None:
        s = j % self.slots
        dst = self._slot_bufs[s]
        if self._cuda:
            cs = self._copy_stream
            if wait_freed:
                cs.wait_event(self._freed[s])
            with _cuda.stream(cs):
                if self.timing:
                    t0 = _cuda.Event(enable_timing=True)
                    t0.record(cs)
                self._copy_into(j, dst, non_blocking=True)
                self._ready[s].record(cs)
                if self.timing:
                    t1 = _cuda.Event(enable_timing=True)
                    t1.record(cs)
                    self._t_pass.append((t0, t1))
        else:
            self._copy_into(j, dst, non_blocking=False)
        self._stats["layer_copies"] += 1
        self._stats["bytes_copied"] += self.layer_copy_bytes

    def _copy_into(self, j: int, dst: torch.Tensor, *, non_blocking: bool) -> None:
        lay = self._layer_layouts[j]
        if self._staged_bufs is not None and self.staged:
            dst.copy_(self._staged_bufs[j], non_blocking=non_blocking)
            return
        _copy_ranges(dst, lay, non_blocking=non_blocking)

    def _layer_pre(self, i: int) -> None:
        if i == 0 and (not self._owner() or self._cursor != 0):
            self._start_pass(None)
        elif not self._owner() or i != self._cursor:
            raise RuntimeError(f"LayerStream: layer {i} ran out of order (expected "
                               f"{self._cursor if self._owner() else 0}); streamed blocks must "
                               "run once each, in order, per forward")
        self._begin_layer(i)

    def _begin_layer(self, i: int) -> None:
        """Layer i is about to run: the compute stream waits for its copy, its tensors point at
        its slot, and the copy of layer i+K-1 starts into the slot layer i-1 used."""
        s = i % self.slots
        if self._cuda:
            _cuda.current_stream(self.device).wait_event(self._ready[s])
        for e, v in zip(self._layer_tensors[i], self._slot_views[s]):
            self._bind(e, v)
        j = i + self.slots - 1
        if j < self.num_layers:
            # slot j % K == (i - 1) % K: the one layer i-1 used (none yet when i == 0)
            self._copy(j, wait_freed=i > 0)

    def _end_layer(self, i: int) -> None:
        """Layer i's work is queued: its slot may be overwritten after it."""
        if self._cuda:
            self._freed[i % self.slots].record(_cuda.current_stream(self.device))

    def _layer_post(self, i: int, output: Any) -> None:
        if self._grouping():
            return
        if not self._owner():
            return                           # a layer called out of order raised
        if output is None:
            self._end_pass(aborted=True)     # the layer raised
            return
        self._end_layer(i)
        self._cursor = i + 1
        if i == self.num_layers - 1:
            self._stats["passes"] += 1
            self._keep_timing()
            self._end_pass(aborted=False)

    def _keep_timing(self) -> None:
        if self._t_pass:
            with self._timing_lock:
                self._t_pending.append(self._t_pass)
            self._t_pass = []

    # ------------------------------------------------------------------ grouped passes
    def run_group(self, fns: list[Callable[[], Any]]) -> list[Any]:
        """Run forwards (each ``fn()`` calls the module once) layer-major on this thread,
        sharing one copy of each layer: every forward runs layer 0, then every one runs layer
        1, ... (runtime/layer_group.py). Returns each fn's result, or the exception it raised
        (one failing forward fails only itself).

        The group is one pass: its layers are copied once, whatever the number of forwards.
        Between layers each forward keeps only its hidden states, and the forwards' layers run
        one after another, so the working memory is one forward's plus every forward's hidden
        states. The first group is checked against a plain pass of its first forward; if they
        differ (a model that calls its blocks in a way the group cannot reproduce), that group
        and every later one run as plain passes. Detached, or a single fn: plain passes."""
        if len(fns) <= 1 or not self._attached or self._group_ok is False:
            return one_by_one(fns)
        with self._pass_lock:
            self._group_thread = threading.get_ident()
            ok = False
            try:
                out = run_layer_major(self, fns)
                ok = True
            finally:
                self._group_thread = None
                self._group_mode = ""
                if self._cuda:
                    self._pass_done.record(_cuda.current_stream(self.device))
                if ok:
                    self._stats["passes"] += 1
                    self._stats["group_passes"] += 1
                    self._stats["group_forwards"] += len(fns)
                    self._keep_timing()
                else:
                    self._stats["aborted_passes"] += 1
                    self._t_pass = []
        if self._group_ok is None:
            k = next((k for k, o in enumerate(out) if not isinstance(o, BaseException)), None)
            if k is not None:
                plain = one_by_one([fns[k]])[0]
                self._group_ok = same_result(out[k], plain)
                if not self._group_ok:
                    log.warning("%s: forwards run layer-major differ from a plain pass: "
                                "grouped passes are off for this model",
                                type(self.module).__name__)
                    return one_by_one(fns)
        return out

    def _start_copies(self) -> None:
        """A pass begins (a forward's, or a group's: run_layer_major): its copies go after
        everything queued so far on this compute stream and after the previous pass's layers
        (on whichever stream they ran: they read the slots); the first K-1 layers start
        copying."""
        if self._cuda:
            cs = self._copy_stream
            cs.wait_stream(_cuda.current_stream(self.device))
            cs.wait_event(self._pass_done)
            self._t_pass = []
        for j in range(min(self.slots - 1, self.num_layers)):
            self._copy(j, wait_freed=False)

    def _collect_timing(self) -> None:
        """With `timing`: the summed durations of a finished pass's layer copies (pure copy time,
        not the waits for compute between them), read once its last copy has run."""
        with self._timing_lock:
            keep = []
            for events in self._t_pending:
                if events[-1][1].query():
                    sec = sum(a.elapsed_time(b) for a, b in events) / 1e3
                    self._stats["last_copy_seconds"] = sec
                    self._stats["copy_seconds"] += sec
                    self._stats["timed_passes"] += 1
                else:
                    keep.append(events)
            self._t_pending = keep

    # ------------------------------------------------------------------ measurement
    def measure_copy_rate(self, repeat: int = 3) -> dict[str, float]:
        """Copy every layer into the slots back to back on the copy stream (no compute), timed
        with CUDA events: the pass copy rate the hardware gives. Attached, CUDA only, not during
        a forward. Returns {"seconds": best pass, "gbps"}."""
        if not (self._attached and self._cuda):
            raise RuntimeError("measure_copy_rate needs an attached CUDA LayerStream")
        cs = self._copy_stream
        best = float("inf")
        cs.wait_stream(_cuda.current_stream(self.device))
        with torch.inference_mode(self._inference):
            for _ in range(repeat):
                start = _cuda.Event(enable_timing=True)
                end = _cuda.Event(enable_timing=True)
                with _cuda.stream(cs):
                    start.record(cs)
                    for j in range(self.num_layers):
                        self._copy_into(j, self._slot_bufs[j % self.slots], non_blocking=True)
                    end.record(cs)
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
        return {"seconds": best, "gbps": self.bytes_per_pass / best / 1e9}

