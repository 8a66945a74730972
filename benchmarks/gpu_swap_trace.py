"""The seed's RAG cycle through the real server on a GPU, with a budget that fits the LLM or
the reranker but not both, then the actor trace of it (Chrome format) for a timeline PNG.

Models: random weights of real architectures saved with save_pretrained (no hub): a
Llama-shaped ~1B fp16 LLM on SmolLM2's tokenizer and chat template, a BERT-base embedder and a
BERT-large-shaped cross-encoder on MiniLM's tokenizer. Tokenizer folders come from --tokenizers
(tok-smol/ and tok-minilm/, copied from the installed model packages).

    python benchmarks/gpu_swap_trace.py --tokenizers .gpucarry --out $OUT
    python benchmarks/trace_timeline.py $OUT/trace-gpu.json -o benchmarks/results/trace-gpu-swap.png
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_models(work: str, toks: str) -> dict:
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertModel, LlamaConfig,
                              LlamaForCausalLM)

    paths = {}
    torch.manual_seed(0)
    with torch.device("cuda"):
        llm = LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)).half()
    paths["llm"] = os.path.join(work, "llm")
    llm.save_pretrained(paths["llm"])
    del llm
    for f in os.listdir(os.path.join(toks, "tok-smol")):
        shutil.copy(os.path.join(toks, "tok-smol", f), paths["llm"])
    for name, cls, cfg in (
            ("embedder", BertModel, BertConfig(hidden_size=768, num_hidden_layers=12,
                                               num_attention_heads=12, intermediate_size=3072)),
            ("reranker", BertForSequenceClassification,
             BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, num_labels=1))):
        with torch.device("cuda"):
            m = cls(cfg).half()
        paths[name] = os.path.join(work, name)
        m.save_pretrained(paths[name])
        del m
        for f in os.listdir(os.path.join(toks, "tok-minilm")):
            shutil.copy(os.path.join(toks, "tok-minilm", f), paths[name])
    torch.cuda.empty_cache()
    return paths


def get(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizers", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-mb", type=int, default=3000)
    ap.add_argument("--cycles", type=int, default=2)
    a = ap.parse_args()
    work = "/tmp/gpu-swap-trace"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    paths = build_models(work, a.tokenizers)
    live = {"standby_llms": ["llm"], "standby_embedders": ["emb"], "standby_rerankers": ["rr"],
            "llms": {"llm": {"llm_path": paths["llm"], "device": "flex", "max_tokens": 1024,
                             "dtype": "float16"}},
            "embedders": {"emb": {"path": paths["embedder"], "device": "flex", "dtype": "float16",
                                  "cuda_thres": 0}},
            "rerankers": {"rr": {"path": paths["reranker"], "device": "flex", "max_tokens": 512,
                                 "kind": "cross-encoder", "dtype": "float16"}},
            "llm_params": {"default_temp": 0}}
    with open(os.path.join(work, "live.json"), "w") as f:
        json.dump(live, f)
    with open(os.path.join(work, "configs.py"), "w") as f:
        f.write(f"TOTAL_CUDA_MEMORY = {a.budget_mb}\nMEMORY_REDUNDANCY = 0.0\n"
                "ADMIN_KEY = 'k'\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(a.out, "server-gpu.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "agile_rag", "--port", str(port),
                             "--live-config", os.path.join(work, "live.json"),
                             "--config", os.path.join(work, "configs.py")],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    result = {"budget_mb": a.budget_mb, "cycles": []}
    try:
        for _ in range(600):
            try:
                h = get(base + "/health", 2)
                if h["status"] != "loading":
                    break
            except OSError:
                pass
            time.sleep(0.5)
        result["health"] = h
        passages = [("Paris is the capital of France. " * 24)[:768]] * 50 + \
                   [("Bananas are a yellow fruit rich in potassium. " * 17)[:768]] * 50
        for i in range(a.cycles):
            t0 = time.monotonic()
            steps = {}
            q = [{"role": "user", "content": "What is the capital of France?"}]
            t = time.monotonic()
            post(base + "/v1/chat/completions", {"messages": q, "max_tokens": 64})
            steps["chat1"] = time.monotonic() - t
            t = time.monotonic()
            post(base + "/v1/embeddings", {"input": "capital of France"})
            steps["embed"] = time.monotonic() - t
            t = time.monotonic()
            rr = post(base + "/v1/rerank", {"query": "capital of France", "documents": passages})
            steps["rerank100"] = time.monotonic() - t
            t = time.monotonic()
            post(base + "/v1/chat/completions", {"messages": q, "max_tokens": 64})
            steps["chat2"] = time.monotonic() - t
            result["cycles"].append({"total_s": time.monotonic() - t0, **steps,
                                     "rerank_results": len(rr["results"])})
        req = urllib.request.Request(base + "/admin/models", headers={"Authorization": "Bearer k"})
        with urllib.request.urlopen(req) as r:
            result["admin"] = json.load(r)
        with urllib.request.urlopen(base + "/debug/traces?format=chrome&since=600") as r:
            trace = r.read()
        with open(os.path.join(a.out, "trace-gpu.json"), "wb") as f:
            f.write(trace)
        with urllib.request.urlopen(base + "/metrics") as r:
            with open(os.path.join(a.out, "metrics-gpu.txt"), "wb") as f:
                f.write(r.read())
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    import torch
    result["gpu"] = torch.cuda.get_device_name(0)
    result["command"] = "python benchmarks/gpu_swap_trace.py " + " ".join(sys.argv[1:])
    with open(os.path.join(a.out, "gpu-swap-trace.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "admin"}, indent=1))


if __name__ == "__main__":
    main()
