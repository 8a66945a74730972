"""GPTQ and AWQ (4-bit) LLM checkpoints: what the loader needs, and writers for tests/benchmarks.

Loading goes through transformers' own path (``from_pretrained`` reads ``quantization_config``
from config.json and calls optimum + gptqmodel for GPTQ, gptqmodel for AWQ). Two things are ours:

* the kernel. gptqmodel picks the fastest kernel for the device the model is loaded on; several
  of them repack the weights for that device (Marlin, the CPU int4pack/AVX512 kernels) or keep
  device state outside the module's parameters and buffers, and a repacked layout computes on
  one device only. Our weights move between host and GPU under the same module
  (runtime.residency), so we ask for the layout-preserving torch kernels (``gptq_torch``,
  ``awq_torch``): the checkpoint's own packed tensors (qweight, qzeros, scales, g_idx, bias)
  plus small unpack tables, all registered buffers, so they move with the residency; each
  forward dequantises (with a Triton kernel on CUDA when Triton is there) and multiplies.
  ``quant_backend`` in the model's ``llm_params`` can name another gptqmodel backend for a
  model pinned to one device (``device: cuda`` or ``cpu``).
* the dtype: the kernels compute in float16 or bfloat16 only (never float32); float16 is what
  the checkpoints' scales are stored in and what GPU kernels want.

``write_gptq_checkpoint`` / ``write_awq_checkpoint`` quantize a float causal LM by round-to-
nearest (no calibration) and save it in the on-disk layout of GPTQ v1 / AWQ GEMM checkpoints,
so tests and benchmarks load real-format checkpoints without a model hub.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

log = logging.getLogger("agile_rag.llm")

__all__ = ["quant_method", "quant_load_kwargs", "import_kernels", "load_quantized",
           "prepare_for_residency", "clear_kernel_caches", "QuantResidency", "residency_factory",
           "kernel_state",
           "quant_modules", "PORTABLE_BACKENDS", "write_gptq_checkpoint", "write_awq_checkpoint",
           "quantized_linear_names", "random_quantized_state", "save_random_quantized"]

# Kernels whose packed layout is the checkpoint's and that compute on CPU and CUDA alike.
PORTABLE_BACKENDS = {"gptq": "gptq_torch", "awq": "torch_awq"}   # transformers' names
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # AWQ GEMM packs 8 output columns in this order


def quant_method(path: str) -> str | None:
    """'gptq' / 'awq' when the HF folder's config.json has such a quantization_config."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            q = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    method = str(q.get("quant_method", "")).lower()
    return method if method in PORTABLE_BACKENDS else None


def quant_load_kwargs(path: str, method: str, *, backend: str | None = None,
                      trust_remote_code: bool = False) -> dict[str, Any]:
    """from_pretrained keyword arguments for a GPTQ/AWQ folder: the config with the chosen
    kernel backend written into its quantization_config."""
    from transformers import AutoConfig

    import_kernels(method)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    q = config.quantization_config
    q = dict(q) if isinstance(q, dict) else q.to_dict()
    q["backend"] = backend or PORTABLE_BACKENDS[method]
    if method == "gptq":
        q.pop("use_exllama", None)          # an exllama request would override the backend
    config.quantization_config = q
    return {"config": config}


# gptqmodel sets these at import when they are unset (its allocator settings would become the
# whole server's if CUDA had not started yet): the server's own settings, or none, stay.
_ENV_KEPT = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_ORDER")


def import_kernels(method: str) -> None:
    """Import the kernel packages a GPTQ/AWQ load needs, leaving the environment as it was."""
    _check_packages(method)
    kept = {k: os.environ.get(k) for k in _ENV_KEPT}
    try:
        import gptqmodel  # noqa: F401
        if method == "gptq":
            import optimum.gptq  # noqa: F401
    finally:
        for k, v in kept.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_packages(method: str) -> None:
    import importlib.util

    need = ["gptqmodel"] + (["optimum"] if method == "gptq" else [])
    missing = [p for p in need if importlib.util.find_spec(p) is None]
    if missing:
        raise RuntimeError(
            f"this is a {method.upper()} checkpoint: loading it needs {' and '.join(missing)} "
            "(pip install 'agile-rag-server[quant]'; see the README, 'Quantized LLMs')")


def kernel_state(model) -> list[str]:
    """Tensors that quantized layers hold outside their parameters and buffers (they would not
    move with the weights' residency): 'module.attr' for each. Empty for the portable kernels."""
    out = []
    for name, mod in model.named_modules():
        if not hasattr(mod, "qweight"):
            continue
        registered = {id(t) for t in list(mod.parameters(recurse=False)) +
                      list(mod.buffers(recurse=False))}
        for attr, val in vars(mod).items():
            items = val.items() if isinstance(val, dict) else [(None, val)]
            for key, t in items:
                if isinstance(t, torch.Tensor) and id(t) not in registered:
                    out.append(f"{name}.{attr}" + ("" if key is None else f"[{key}]"))
    return out


def quant_modules(model) -> list:
    """The quantized linear layers (gptqmodel's QuantLinear classes) of a loaded model."""
    return [m for m in model.modules()
            if "qweight" in m._buffers and type(m).__module__.startswith("gptqmodel")]


def load_quantized(path: str, method: str, *, dtype: torch.dtype | None,
                   trust_remote_code: bool = False):
    """from_pretrained for a GPTQ/AWQ folder with the portable kernel, made safe to move."""
    from transformers import AutoModelForCausalLM

    if dtype not in (torch.float16, torch.bfloat16):
        if isinstance(dtype, torch.dtype):          # float32 ("auto" and none say nothing)
            log.warning("%s: %s kernels compute in float16/bfloat16, not %s: using float16",
                        path, method.upper(), dtype)
        dtype = torch.float16
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code,
        **quant_load_kwargs(path, method, trust_remote_code=trust_remote_code))
    prepare_for_residency(model, dtype)
    return model


def prepare_for_residency(model, dtype: torch.dtype) -> int:
    """Make the quantized layers safe for runtime.residency (weights re-pointed in place):

    * eager dequantisation: gptqmodel wraps ``dequantize_weight`` in torch.compile, which costs
      ~8 s per layer shape at the first forward on a CPU and compiles again for each device;
    * ``gptq_torch`` may replace its registered ``g_idx`` by a CPU copy on CUDA (when Triton is
      missing): a replaced buffer would no longer follow the residency, so it stays put;
    * scales and bias in the model's compute dtype (AwqTorchLinear would otherwise replace them
      with converted copies at every forward);
    * the kernels' derived caches emptied. Returns the number of quantized layers."""
    mods = quant_modules(model)
    for mod in mods:
        if "dequantize_weight" in vars(mod):        # the torch.compile wrapper
            del mod.dequantize_weight
        if hasattr(mod, "_maybe_offload_g_idx_to_cpu"):
            mod._maybe_offload_g_idx_to_cpu = _noop
        for name in ("scales", "bias"):
            t = mod._buffers.get(name)
            if t is not None and t.is_floating_point() and t.dtype != dtype:
                mod._buffers[name] = t.to(dtype)
    clear_kernel_caches(model, mods)
    return len(mods)


def _noop(*_a, **_k) -> None:
    return None


def clear_kernel_caches(model, mods=None) -> None:
    """Drop what the kernels derived from the weights on their last device (unpacked zeros,
    int64 g_idx, CPU repacks): after a move those point at the old device, and a GPU copy kept
    there after an eviction would hold GPU memory the arbiter no longer counts."""
    for mod in (quant_modules(model) if mods is None else mods):
        for name in _CACHE_RESETS:          # their names differ between gptqmodel releases
            reset = getattr(mod, name, None)
            if callable(reset):
                reset()


_CACHE_RESETS = ("clear_weight_cache", "_stream_reset_cache", "_reset_prefetch_state")


class QuantResidency:
    """A weight residency (runtime.residency.WeightResidency) that empties the quantized
    kernels' caches after every admit and evict; everything else is the wrapped object's."""

    def __init__(self, inner, model):
        self._inner = inner
        self._model = model
        self._mods = quant_modules(model)

    def admit(self, *a, **k):
        try:
            return self._inner.admit(*a, **k)
        finally:
            clear_kernel_caches(self._model, self._mods)

    def evict(self, *a, **k):
        try:
            return self._inner.evict(*a, **k)
        finally:
            clear_kernel_caches(self._model, self._mods)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"QuantResidency({self._inner!r})"


def residency_factory(factory, model):
    """Wrap a residency factory so that the residencies it builds for ``model`` clear the
    quantized kernels' caches when the weights move (None stays None)."""
    if factory is None or getattr(factory, "_agile_quant", False):
        return factory

    def build(module):
        return QuantResidency(factory(module), model)
    build._agile_quant = True
    return build


# ---- writers -----------------------------------------------------------------------------------
def quantized_linear_names(model) -> list[str]:
    """The nn.Linear layers inside the decoder blocks (what GPTQ/AWQ checkpoints quantize;
    embeddings and lm_head stay float)."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            names.append(name)
    return names


def _rtn(w: torch.Tensor, group: int, sym: bool):
    """Round-to-nearest 4-bit: w [out, in] -> q [out, in] (0..15), scales/zeros [in/group, out]."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    if sym:
        scale = (g.abs().amax(-1) * 2 / 15).clamp_min(1e-8)
        zero = torch.full_like(scale, 8)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, 15)
    scale = scale.half().float()                       # what the checkpoint will store
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15)
    deq = ((q - zero[..., None]) * scale[..., None]).reshape(out_f, in_f)
    return q.reshape(out_f, in_f).to(torch.int64), scale.t().contiguous(), \
        zero.t().to(torch.int64).contiguous(), deq


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[R*8, C] of 0..15 -> int32 [R, C]: 8 consecutive rows per word, row j at bits 4j."""
    r8, c = q.shape
    q = q.reshape(r8 // 8, 8, c)
    word = torch.zeros(r8 // 8, c, dtype=torch.int64, device=q.device)
    for j in range(8):
        word |= (q[:, j] & 0xF) << (4 * j)
    return _to_int32(word)


def _pack_cols(q: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, C*8] of 0..15 -> int32 [R, C]: 8 columns per word, column order[j] at bits 4j."""
    r, c8 = q.shape
    q = q.reshape(r, c8 // 8, 8)
    word = torch.zeros(r, c8 // 8, dtype=torch.int64, device=q.device)
    for j, src in enumerate(order):
        word |= (q[:, :, src] & 0xF) << (4 * j)
    return _to_int32(word)


def _to_int32(word: torch.Tensor) -> torch.Tensor:
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _quantize_model(model, fmt: str, group: int, sym: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors; the model's quantized Linear weights become their dequantised
    values in place (so the float model is the exact reference of the quantized one)."""
    state: dict[str, torch.Tensor] = {}
    names = set(quantized_linear_names(model))
    for name, mod in model.named_modules():
        if name not in names:
            continue
        w = mod.weight.data
        if w.shape[1] % group or w.shape[0] % 8:
            raise ValueError(f"{name}: {tuple(w.shape)} does not fit group size {group}")
        q, scales, zeros, deq = _rtn(w, group, sym)
        if fmt == "gptq":
            state[f"{name}.qweight"] = _pack_rows(q.t().contiguous())          # [in/8, out]
            state[f"{name}.qzeros"] = _pack_cols(zeros - 1)                      # v1: zero - 1
            state[f"{name}.g_idx"] = torch.arange(w.shape[1], dtype=torch.int32) // group
        else:
            state[f"{name}.qweight"] = _pack_cols(q.t().contiguous(), AWQ_ORDER)  # [in, out/8]
            state[f"{name}.qzeros"] = _pack_cols(zeros, AWQ_ORDER)
        state[f"{name}.scales"] = scales.half()
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.data.half()
        mod.weight.data = deq.to(w.dtype)
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner not in names:
            state.setdefault(key, t.half())
    return state


def _save(model, tokenizer, folder: str, state: dict, qcfg: dict) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = cfg["dtype"] = "float16"
    cfg["quantization_config"] = qcfg
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def gptq_config(group: int = 128, sym: bool = True) -> dict:
    """quantization_config as Qwen1.5-7B-Chat-GPTQ-Int4 ships it."""
    return {"bits": 4, "group_size": group, "damp_percent": 0.01, "desc_act": False,
            "static_groups": False, "sym": sym, "true_sequential": True,
            "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq"}


def awq_config(group: int = 128) -> dict:
    """quantization_config as Qwen2-7B-Instruct-AWQ ships it."""
    return {"bits": 4, "group_size": group, "modules_to_not_convert": None,
            "quant_method": "awq", "version": "gemm", "zero_point": True}


def write_gptq_checkpoint(model, tokenizer, folder: str, *, group_size: int = 128,
                          sym: bool = True) -> str:
    """Save ``model`` as a GPTQ-Int4 checkpoint (v1 layout: qweight [in/8, out] packed along the
    input, qzeros [groups, out/8] holding zero-1, scales [groups, out] fp16, g_idx [in]).
    ``model``'s quantized weights are replaced by their dequantised values (the reference)."""
    if not sym:
        raise ValueError("GPTQ v1 stores zero-1, which wraps for zero 0: write sym=True")
    with torch.no_grad():
        state = _quantize_model(model, "gptq", group_size, sym)
    return _save(model, tokenizer, folder, state, gptq_config(group_size, sym))


def write_awq_checkpoint(model, tokenizer, folder: str, *, group_size: int = 128) -> str:
    """Save ``model`` as an AWQ GEMM checkpoint (qweight [in, out/8] and qzeros [groups, out/8]
    packed along the output in AWQ's order 0,2,4,6,1,3,5,7; scales [groups, out] fp16;
    asymmetric zeros). ``model``'s quantized weights become their dequantised values."""
    with torch.no_grad():
        state = _quantize_model(model, "awq", group_size, False)
    return _save(model, tokenizer, folder, state, awq_config(group_size))


def random_quantized_state(config, fmt: str, group: int = 128, device="cpu",
                           seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors for ``config`` with random packed weights (benchmarks: real
    layout and size, no float model, no calibration). Float tensors are small random fp16."""
    from transformers import AutoModelForCausalLM

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    names = set(quantized_linear_names(shell))
    state: dict[str, torch.Tensor] = {}
    i32 = dict(dtype=torch.int32, device=device, generator=gen)
    for name, mod in shell.named_modules():
        if name not in names:
            continue
        out_f, in_f = mod.weight.shape
        groups = in_f // group
        if fmt == "gptq":
            state[f"{name}.qweight"] = torch.randint(-2**31, 2**31 - 1, (in_f // 8, out_f), **i32)
            state[f"{name}.qzeros"] = torch.full((groups, out_f // 8), 0x77777777,
                                                 dtype=torch.int32, device=device)
            state[f"{name}.g_idx"] = torch.arange(in_f, dtype=torch.int32, device=device) // group
        else:
            state[f"{name}.qweight"] = torch.randint(-2**31, 2**31 - 1, (in_f, out_f // 8), **i32)
            state[f"{name}.qzeros"] = torch.full((groups, out_f // 8), 0x88888888 - 2**32,
                                                 dtype=torch.int32, device=device)
        state[f"{name}.scales"] = torch.full((groups, out_f), 1e-3, dtype=torch.float16,
                                             device=device)
        if mod.bias is not None:
            state[f"{name}.bias"] = torch.zeros(out_f, dtype=torch.float16, device=device)
    for key, t in shell.state_dict().items():
        if key.rsplit(".", 1)[0] in names:
            continue
        if getattr(config, "tie_word_embeddings", False) and key == "lm_head.weight":
            continue
        v = torch.empty(t.shape, dtype=torch.float16, device=device)
        v.normal_(0, 0.02, generator=gen) if t.dim() > 1 else v.fill_(1.0)
        state[key] = v
    return state


def save_random_quantized(config, folder: str, fmt: str, group: int = 128, device="cpu",
                          tokenizer=None) -> str:
    """Write a random-weight GPTQ/AWQ checkpoint of ``config``'s shape (benchmarks)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = random_quantized_state(config, fmt, group, device)
    # shards of ~2 GB keep the host copy of one shard small
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        cur[k] = v
        size += v.numel() * v.element_size()
        if size > 2 * 2**30:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    index: dict[str, dict[str, str]] = {"metadata": {}, "weight_map": {}}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in shard.items()},
                  os.path.join(folder, fname), metadata={"format": "pt"})
        index["weight_map"].update({k: fname for k in shard})
    del state
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    cfg = config.to_dict()
    cfg["torch_dtype"] = cfg["dtype"] = "float16"
    cfg["quantization_config"] = gptq_config(group) if fmt == "gptq" else awq_config(group)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
