"""liveconfigs.json: parse (JSON with comments), validate the whole file, resolve model paths.

The schema is the seed's, key for key. A few optional keys are ours (marked "ours" below);
unknown keys are reported as warnings and otherwise ignored.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import json5

from ..actors.states import DeviceMode

DEVICES = tuple(d.value for d in DeviceMode)        # flex, cuda, cpu (and cuda:N, see below)
KINDS = ("llm", "embedder", "reranker")
SECTION = {"llm": "llms", "embedder": "embedders", "reranker": "rerankers"}
STANDBY = {"llm": "standby_llms", "embedder": "standby_embedders", "reranker": "standby_rerankers"}
RERANK_BACKENDS = ("auto", "cross-encoder", "bi-encoder", "flag")

_ENTRY_KEYS = {
    "llm": {"llm_path", "tokenizer_path", "device", "max_tokens", "size_est", "cuda_thres",
            "idle_on_cpu", "trust_remote_code", "dtype"},
    "embedder": {"path", "device", "max_tokens", "size_est", "cuda_thres", "idle_on_cpu",
                 "trust_remote_code", "dtype"},
    "reranker": {"path", "device", "max_tokens", "size_est", "cuda_thres", "idle_on_cpu",
                 "trust_remote_code", "dtype", "kind"},
}
_TOP_KEYS = {"reset_flags", *STANDBY.values(), *SECTION.values(),
             "llm_params", "embedder_params", "reranker_params"}


class LiveConfigError(ValueError):
    """The file cannot be used; ``problems`` lists every reason found."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    kind: str                  # llm | embedder | reranker
    name: str
    path: str                  # resolved, absolute (a folder, or a .gguf file)
    tokenizer_path: str        # llms only; same as path otherwise
    device: DeviceMode = DeviceMode.FLEX
    max_tokens: int | None = None
    size_est: float | None = None   # MB, used only before the first load
    cuda_thres: int = 0
    idle_on_cpu: bool = False
    trust_remote_code: bool = False  # ours: off unless an entry asks for it
    dtype: str | None = None         # ours: "float16", "bfloat16", "float32"
    backend: str = "auto"            # ours, rerankers: auto | cross-encoder | bi-encoder | flag
    gpu: int | None = None           # ours: the card of a pinned model (``cuda:N``; ``cuda`` is 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", DeviceMode(self.device))   # "cpu" -> DeviceMode.CPU
        # ``cuda`` means ``cuda:0``, so that a file written for one GPU keeps its meaning; only
        # a pinned model names a card (flex ones are placed by the VRAM arbiter)
        gpu = (self.gpu or 0) if self.device == DeviceMode.CUDA else None
        object.__setattr__(self, "gpu", gpu)

    @property
    def placement(self) -> str:
        """The entry's ``device`` as written, normalised: ``cuda:N``, ``flex`` or ``cpu``."""
        return f"cuda:{self.gpu}" if self.device == DeviceMode.CUDA else str(self.device)

    def load_key(self) -> tuple:
        """What requires re-reading the weights when it changes."""
        return (self.path, self.tokenizer_path, self.trust_remote_code, self.dtype, self.backend)


@dataclasses.dataclass(frozen=True)
class LiveConfig:
    standby: dict[str, tuple[str, ...]]           # kind -> names, in order (first = default)
    models: dict[str, dict[str, ModelSpec]]       # kind -> name -> spec (standby ones only)
    llm_params: dict[str, Any]
    embedder_params: dict[str, Any]
    reranker_params: dict[str, Any]
    reset_flags: Any = None
    warnings: tuple[str, ...] = ()

    def spec(self, kind: str, name: str) -> ModelSpec:
        return self.models[kind][name]


LLM_PARAMS = {"default_temp": 0.5, "force_0_temp": False, "stream_chunk_size": 0}
EMBEDDER_PARAMS = {"token_estimation": "len", "resize": 0}
#: reranker_params.batch_size (pairs per forward, at most) has no default: max_batch_tokens
#: sizes the forwards unless it is set
RERANKER_PARAMS = {"top_n": 9999, "sentence_transformer_num_workers": 0}


def resolve_path(raw: str, base_dir: str) -> str:
    """``pkg:module/rel/path`` -> the file inside an installed package; relative paths are
    relative to the liveconfigs.json folder; ``~`` is expanded."""
    if raw.startswith("pkg:"):
        module, _, rel = raw[4:].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {module!r} is not installed (from {raw!r})")
        return os.path.join(list(spec.submodule_search_locations)[0], rel)
    path = os.path.expanduser(raw)
    if not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normpath(path)


def parse_text(text: str, path: str = "liveconfigs.json") -> LiveConfig:
    try:
        data = json5.loads(text)
    except ValueError as exc:
        raise LiveConfigError(path, [f"not valid JSON (comments allowed): {exc}"]) from None
    return validate(data, path)


def validate(data: Any, path: str = "liveconfigs.json") -> LiveConfig:
    problems: list[str] = []
    warnings: list[str] = []
    if not isinstance(data, dict):
        raise LiveConfigError(path, ["the top level must be an object {...}"])
    base_dir = os.path.dirname(os.path.abspath(path))
    for key in data:
        if key not in _TOP_KEYS:
            warnings.append(f"unknown key {key!r} ignored")

    standby: dict[str, tuple[str, ...]] = {}
    models: dict[str, dict[str, ModelSpec]] = {}
    for kind in KINDS:
        names = data.get(STANDBY[kind], [])
        section = data.get(SECTION[kind], {})
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"{STANDBY[kind]} must be a list of model names")
            names = []
        if not isinstance(section, dict):
            problems.append(f"{SECTION[kind]} must be an object of name -> settings")
            section = {}
        if len(set(names)) != len(names):
            problems.append(f"{STANDBY[kind]} names a model twice")
        standby[kind] = tuple(names)
        models[kind] = {}
        for name in names:
            if name not in section:
                problems.append(f"{STANDBY[kind]} names {name!r}, which has no entry in "
                                f"{SECTION[kind]}")
                continue
            spec = _spec(kind, name, section[name], base_dir, problems, warnings)
            if spec is not None:
                models[kind][name] = spec

    params = {}
    for key, defaults in (("llm_params", LLM_PARAMS), ("embedder_params", EMBEDDER_PARAMS),
                          ("reranker_params", RERANKER_PARAMS)):
        given = data.get(key, {})
        if not isinstance(given, dict):
            problems.append(f"{key} must be an object")
            given = {}
        params[key] = {**defaults, **given}
    lp, ep, rp = params["llm_params"], params["embedder_params"], params["reranker_params"]
    if not _is_num(lp["default_temp"]) or not 0 <= lp["default_temp"] <= 2:
        problems.append("llm_params.default_temp must be a number from 0 to 2")
    if not isinstance(lp["force_0_temp"], bool):
        problems.append("llm_params.force_0_temp must be true or false")
    for key in ("continuous_batching", "cuda_graphs", "decode_ahead", "decode_cudnn_attention",
                "lean_prefill", "prefill_graphs", "wait_for_prompts", "burst_prefill",
                "decode_rope_kv"):
        if key in lp and not isinstance(lp[key], bool):
            problems.append(f"llm_params.{key} must be true or false")
    for key in ("max_batch_size", "batch_kv_tokens", "stream_chunk_size", "gpu_min_slice_ms",
                "prefill_chunk_tokens", "prefill_batch_tokens"):
        if key in lp and (not _is_int(lp[key]) or lp[key] < 0):
            problems.append(f"llm_params.{key} must be a whole number")
    if "prompt_threads" in lp and lp["prompt_threads"] != "auto" and (
            not _is_int(lp["prompt_threads"]) or not 0 <= lp["prompt_threads"] <= 16):
        problems.append('llm_params.prompt_threads must be a whole number from 0 to 16, '
                        'or "auto"')
    if ep["token_estimation"] not in ("len", "re"):
        problems.append('embedder_params.token_estimation must be "len" or "re"')
    if not _is_int(ep["resize"]) or ep["resize"] < 0:
        problems.append("embedder_params.resize must be 0 or a positive integer")
    if not _is_int(rp["top_n"]) or rp["top_n"] < 1:
        problems.append("reranker_params.top_n must be a positive integer")
    if "batch_size" in rp and (not _is_int(rp["batch_size"]) or rp["batch_size"] < 1):
        problems.append("reranker_params.batch_size must be a positive integer")
    for name, kp in (("embedder_params", ep), ("reranker_params", rp)):
        for key in ("max_batch_tokens", "stream_group_below_tokens"):
            if key in kp and (not _is_int(kp[key]) or kp[key] < 1):
                problems.append(f"{name}.{key} must be a positive integer")

    if problems:
        raise LiveConfigError(path, problems)
    return LiveConfig(standby, models, lp, ep, rp, data.get("reset_flags"), tuple(warnings))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _spec(kind: str, name: str, entry: Any, base_dir: str, problems: list[str],
          warnings: list[str]) -> ModelSpec | None:
    where = f"{SECTION[kind]}.{name}"
    if not isinstance(entry, dict):
        problems.append(f"{where} must be an object")
        return None
    for key in entry:
        if key not in _ENTRY_KEYS[kind]:
            warnings.append(f"{where}: unknown key {key!r} ignored")
    path_key = "llm_path" if kind == "llm" else "path"
    raw = entry.get(path_key)
    if not isinstance(raw, str) or not raw:
        problems.append(f"{where}.{path_key} is required (a folder or file path)")
        return None
    before = len(problems)
    path = _existing(raw, base_dir, f"{where}.{path_key}", problems)
    tok = path
    if kind == "llm" and entry.get("tokenizer_path"):
        tok = _existing(entry["tokenizer_path"], base_dir, f"{where}.tokenizer_path", problems)
    device, gpu = parse_device(entry.get("device", "flex")) or (None, None)
    if device is None:
        problems.append(f"{where}.device is {entry.get('device')!r}; it must be one of flex, "
                        "cuda, cuda:N (a card by its index: cuda:0, cuda:1, ...), cpu")
    max_tokens = entry.get("max_tokens")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        problems.append(f"{where}.max_tokens must be a positive integer")
    size_est = entry.get("size_est")
    if size_est is not None and (not _is_num(size_est) or size_est < 0):
        problems.append(f"{where}.size_est must be a number of MB")
    cuda_thres = entry.get("cuda_thres", 0) or 0
    if not _is_int(cuda_thres) or cuda_thres < 0:
        problems.append(f"{where}.cuda_thres must be 0 or a positive integer")
    idle = entry.get("idle_on_cpu", False)
    if not isinstance(idle, bool):
        problems.append(f"{where}.idle_on_cpu must be true or false")
    trust = entry.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        problems.append(f"{where}.trust_remote_code must be true or false")
    dtype = entry.get("dtype")
    if dtype not in (None, "float16", "bfloat16", "float32", "auto"):
        problems.append(f"{where}.dtype must be float16, bfloat16, float32 or auto")
    backend = entry.get("kind", "auto")
    if kind == "reranker" and backend not in RERANK_BACKENDS:
        problems.append(f"{where}.kind must be one of {', '.join(RERANK_BACKENDS)}")
    if len(problems) > before:
        return None
    return ModelSpec(kind, name, path, tok, device or DeviceMode.FLEX, max_tokens, size_est,
                     cuda_thres, idle, trust, dtype, backend, gpu=gpu)


def parse_device(value: Any) -> tuple[DeviceMode, int | None] | None:
    """An entry's ``device``: ``flex``, ``cpu``, ``cuda`` (= ``cuda:0``) or ``cuda:N`` (pinned
    to card N). None when it is none of these. Whether card N exists is the VRAM arbiter's
    business (a liveconfigs.json may be written on another machine): a grant for a card the
    server does not have is refused and the model runs on the CPU, with the reason."""
    if not isinstance(value, str):
        return None
    if value in DEVICES:
        mode = DeviceMode(value)
        return mode, (0 if mode == DeviceMode.CUDA else None)
    head, sep, index = value.partition(":")
    if head == DeviceMode.CUDA and sep and index.isdigit() and len(index) <= 3:
        return DeviceMode.CUDA, int(index)
    return None


def _existing(raw: Any, base_dir: str, where: str, problems: list[str]) -> str:
    if not isinstance(raw, str):
        problems.append(f"{where} must be a string")
        return ""
    try:
        path = resolve_path(raw, base_dir)
    except FileNotFoundError as exc:
        problems.append(f"{where}: {exc}")
        return ""
    if not os.path.exists(path):
        problems.append(f"{where}: {raw!r} does not exist ({path})")
    return path
