"""Loading an LLM's files: where a GGUF file is, and a dequantised cache of it (GGUF
dequantises slowly; the cache reloads in under a second)."""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
from typing import Any

from ..runtime.heap import trim_heap

log = logging.getLogger("agile_rag.llm")


def gguf_location(path: str) -> tuple[str, str] | None:
    """(folder, file name) when ``path`` is a .gguf file or a folder holding one GGUF only."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(path), os.path.basename(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(found) == 1:
            return path, os.path.basename(found[0])
    return None


def load_gguf(name: str, cache_dir: str | None, folder: str, fname: str, *, dtype: dict,
          common: dict) -> Any:
    """GGUF dequantises slowly (~25 s for 135M); keep the dequantised model in a cache
    folder so later starts load it in under a second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = os.path.join(folder, fname)
    cache = None
    if cache_dir:
        st = os.stat(full)
        key = hashlib.sha1(f"{os.path.abspath(full)}|{st.st_size}|{st.st_mtime_ns}".encode())
        cache = os.path.join(cache_dir, "gguf", key.hexdigest()[:16])
        if os.path.exists(os.path.join(cache, "done")):
            log.info("%s: using dequantised cache %s", name, cache)
            model = AutoModelForCausalLM.from_pretrained(cache, **dtype, **common)
            model._agile_cached_dir = cache
            return model
    log.info("%s: dequantising GGUF %s (first load only)", name, full)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, **common)
    if cache:                   # saved as dequantised (float32): any later dtype loads from it
        tmp = cache + f".tmp{os.getpid()}"
        try:
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname, **common)
            tok.save_pretrained(tmp)
            open(os.path.join(tmp, "done"), "w").close()
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            os.replace(tmp, cache)
            model._agile_cached_dir = cache
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation only
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("%s: could not cache the dequantised model: %s", name, exc)
    if dtype and dtype["dtype"] not in ("auto", torch.float32):
        model = model.to(dtype["dtype"])    # in place: no float32 copy stays beside it
    trim_heap()                             # dequantising left ~0.5 GB of freed heap
    return model


# ---- precision on the CPU ----------------------------------------------------------------------
#: CPU flags that mean native bfloat16 arithmetic (x86: AVX512-BF16 / AMX; Arm: the BF16 extension)
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
WEIGHT_QUANT = ("auto", "int4", "int8", "none")     # llm_params.weight_quant


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (read once from /proc/cpuinfo; torch's
    ``get_cpu_capability`` says AVX512 for CPUs with and without it)."""
    global _BF16
    if _BF16 is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                flags = {w for line in f if line.startswith(("flags", "Features"))
                         for w in line.split(":", 1)[1].split()}
        except OSError:
            flags = set()
        _BF16 = bool(flags & BF16_FLAGS)
    return _BF16


_BF16: bool | None = None


def llm_dtype(entry_dtype: str | None, *, gguf: bool, cpu_only: bool) -> str | None:
    """The dtype an LLM loads in: the entry's ``dtype`` when it gives one; else bfloat16 for a
    model that computes on the CPU only (no GPU, or ``device: cpu``) where the CPU computes
    bfloat16 natively; else float32 for GGUF (what transformers dequantises to) and None (the
    checkpoint's own) for the rest. A flex model on a GPU machine keeps what it had: its
    batches are then numerically the same as its lone requests (float32 on the CPU), and
    an entry's ``"dtype": "bfloat16"`` halves its GPU copy where the card computes it."""
    if entry_dtype:
        return entry_dtype
    if cpu_only and cpu_has_bf16():
        return "bfloat16"
    return "float32" if gguf else None


def weight_quant(params: dict, *, entry_dtype: str | None, gguf: bool, cpu_only: bool) -> str:
    """``llm_params.weight_quant``: "int4" (weight-only int4 decoder layers where they fit,
    int8 for the rest), "int8" (weight-only int8 linear layers, on any device), "none", or
    "auto" (the default). Auto gives "file" for a GGUF file (already quantized at the source)
    computing on the CPU only, on a CPU with native bfloat16 (the kernels are fast in bfloat16
    only), when the entry names no ``dtype``: int4 for the layers the file keeps in 4 bits,
    int8 for the others (llm_int4); "none" otherwise."""
    mode = params.get("weight_quant", "auto")
    if mode not in WEIGHT_QUANT:
        log.warning("llm_params.weight_quant %r is not one of %s: using auto", mode,
                    ", ".join(WEIGHT_QUANT))
        mode = "auto"
    if mode == "auto":
        return "file" if gguf and cpu_only and not entry_dtype and cpu_has_bf16() else "none"
    return mode


#: prompt-prefix tokens an idle CPU-only LLM keeps when it frees its KV cache
IDLE_PREFIX_TOKENS = 1024


def free_idle_cache(engine: Any) -> int:
    """(executor thread) A CPU-only LLM's batch went idle: drop its KV cache and give the
    memory back to the OS. The cache's tensors go as soon as it is dropped (its layers hold
    only a proxy of it: no cycle). No collection here: until the heap is frozen (the model
    pool idle for IDLE_TRIM_S, runtime.heap.collect) a full one walks every object the models
    keep, ~0.3 s with the GIL held, and one chat after another never let the pool idle: each
    next chat's tokens stalled that long. Measured after two 16-stream bursts: RSS 887 MB,
    675 MB after this (592 MB after load). Returns the bytes the cache held."""
    nbytes = int(engine.cache_bytes())
    # the most recent prompts' prefixes stay (a chat asked again, a shared system prompt:
    # issue 17); at most IDLE_PREFIX_TOKENS of them (SmolLM2: ~23 KB a token)
    engine.release(keep_prefix_tokens=IDLE_PREFIX_TOKENS)
    trim_heap()
    return nbytes
