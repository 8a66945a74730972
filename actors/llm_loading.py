"""Loading an LLM's files: where a GGUF file is, and a dequantised cache of it (GGUF
dequantises slowly; the cache reloads in under a second)."""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
from typing import Any

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
    if dtype:
        model = model.to(dtype["dtype"])
    if cache:
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
    return model
