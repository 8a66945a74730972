"""Seeded soak / stress run against a running AgileRagServer.

Many concurrent clients mix chat (streamed and not), embeddings and rerank while the live
config changes under them (device flips, an embedder added and deleted, reset_flags, top_n)
and some clients hang up mid-stream. Every reply is checked against a reference computed
alone before the run, so a mixed-up or truncated reply is caught; every request has a deadline.

    python benchmarks/soak.py --url http://127.0.0.1:8000 --live-config liveconfigs.json \\
        --admin-key KEY --seconds 300 --seed 1 --out benchmarks/results/soak.json

The server must serve the models named by --llm / --embedder / --reranker, and the live config
must be writable (the run restores it at the end). tests/test_stress.py runs a short version.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter

import aiohttp
import json5
import numpy as np

SENTENCES = [f"Sentence number {i} talks about {w}." for i, w in enumerate(
    ["cats", "rivers", "taxes", "music", "stars", "bread", "trains", "snow", "chess", "bees",
     "clouds", "paint", "coffee", "ships", "robots", "tea"])]
QUERIES = [("capital of France", ["Paris is the capital of France.", "Bananas are yellow.",
                                  "Berlin is in Germany."]),
           ("how do bees make honey", ["Cars need fuel.", "Bees turn nectar into honey.",
                                       "Snow is cold."]),
           ("famous painter", ["Van Gogh painted sunflowers.", "Trains run on rails."])]
PROMPTS = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?",
           "Say hello."]


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class Soak:
    def __init__(self, url: str, live_config: str, admin_key: str, *, seed: int, clients: int,
                 seconds: float, deadline_s: float, llm: str, embedder: str, reranker: str,
                 change_every_s: float = 2.0):
        self.url = url.rstrip("/")
        self.live = live_config
        self.admin = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.rng = random.Random(seed)
        self.clients, self.seconds, self.deadline_s = clients, seconds, deadline_s
        self.llm, self.embedder, self.reranker = llm, embedder, reranker
        self.change_every_s = change_every_s
        self.ref_embed: dict[str, list] = {}
        self.ref_rerank: dict[str, list] = {}
        self.ref_chat: dict[str, str] = {}
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.max_latency = 0.0
        self.changes: list[str] = []

    # ---- requests --------------------------------------------------------------------------
    async def _post(self, s, path, body):
        async with s.post(self.url + path, json=body) as r:
            return r.status, await r.json()

    async def references(self, s) -> None:
        for t in SENTENCES:
            _, b = await self._post(s, "/v1/embeddings", {"model": self.embedder, "input": t})
            self.ref_embed[t] = b["data"][0]["embedding"]
        for q, docs in QUERIES:
            _, b = await self._post(s, "/v1/rerank", {"model": self.reranker, "query": q,
                                                      "documents": docs, "top_n": len(docs)})
            self.ref_rerank[q] = sorted((r["index"], r["relevance_score"]) for r in b["results"])
        for p in PROMPTS:
            _, b = await self._post(s, "/v1/chat/completions", self._chat_body(p))
            self.ref_chat[p] = b["choices"][0]["message"]["content"]

    def _chat_body(self, prompt: str, stream: bool = False) -> dict:
        return {"model": self.llm, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": 8, "stream": stream}

    def _fail(self, what: str) -> None:
        self.failures.append(what)
        self.counts["failed"] += 1

    async def one(self, s) -> None:
        kind = self.rng.choices(["embed", "rerank", "chat", "stream", "hangup"],
                                [5, 2, 1, 1, 1])[0]
        t0 = time.monotonic()
        self.counts["sent"] += 1
        try:
            await asyncio.wait_for(self._one(s, kind), self.deadline_s)
        except asyncio.TimeoutError:
            self._fail(f"{kind}: no reply within {self.deadline_s}s")
        except (aiohttp.ClientError, ValueError, KeyError) as exc:
            self._fail(f"{kind}: {type(exc).__name__}: {exc}")
        self.max_latency = max(self.max_latency, time.monotonic() - t0)

    async def _one(self, s, kind: str) -> None:
        if kind == "embed":
            texts = self.rng.sample(SENTENCES, self.rng.randint(1, 4))
            status, b = await self._post(s, "/v1/embeddings", {"model": self.embedder,
                                                               "input": texts})
            if status != 200:
                return self._fail(f"embed {status}: {b}")
            for t, d in zip(texts, b["data"]):
                if cosine(d["embedding"], self.ref_embed[t]) < 0.999:
                    return self._fail(f"embed: wrong vector for {t!r}")
        elif kind == "rerank":
            q, docs = self.rng.choice(QUERIES)
            status, b = await self._post(s, "/v1/rerank", {"model": self.reranker, "query": q,
                                                           "documents": docs,
                                                           "top_n": len(docs)})
            if status != 200:
                return self._fail(f"rerank {status}: {b}")
            got = sorted((r["index"], r["relevance_score"]) for r in b["results"])
            ref = self.ref_rerank[q]
            if [i for i, _ in got] != [i for i, _ in ref] or \
                    max(abs(a[1] - b_[1]) for a, b_ in zip(got, ref)) > 1e-3:
                return self._fail(f"rerank: wrong scores for {q!r}: {got} vs {ref}")
        elif kind == "chat":
            p = self.rng.choice(PROMPTS)
            status, b = await self._post(s, "/v1/chat/completions", self._chat_body(p))
            if status != 200:
                return self._fail(f"chat {status}: {b}")
            if b["choices"][0]["message"]["content"] != self.ref_chat[p]:
                return self._fail(f"chat: wrong answer for {p!r}")
        else:
            p = self.rng.choice(PROMPTS)
            async with s.post(self.url + "/v1/chat/completions",
                              json=self._chat_body(p, stream=True)) as r:
                if r.status != 200:
                    return self._fail(f"stream {r.status}")
                if kind == "hangup":
                    await r.content.readline()
                    r.close()                       # hang up mid-stream
                    self.counts["hangups"] += 1
                    self.counts["ok"] += 1
                    return
                raw = (await r.read()).decode()
            if not raw.rstrip().endswith("data: [DONE]"):
                return self._fail("stream: no [DONE]")
            text = "".join(
                (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                for line in raw.split("\n") if line.startswith("data: {"))
            if text != self.ref_chat[p]:
                return self._fail(f"stream: wrong answer for {p!r}: {text!r}")
        self.counts["ok"] += 1

    # ---- config changes --------------------------------------------------------------------
    def _edit(self, fn) -> None:
        with open(self.live) as f:
            cfg = json5.load(f)                  # the live config may carry // comments
        fn(cfg)
        tmp = self.live + ".soak"
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, self.live)

    async def changer(self, stop: asyncio.Event) -> None:
        extra = False
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.change_every_s)
                break
            except asyncio.TimeoutError:
                pass
            action = self.rng.choice(["device", "extra", "reset", "top_n"])
            if action == "device":
                dev = self.rng.choice(["cpu", "flex", "cuda"])
                self._edit(lambda c: c["embedders"][self.embedder].update(device=dev))
            elif action == "extra":
                extra = not extra

                def toggle(c, on=extra):
                    path = c["embedders"][self.embedder]["path"]
                    c["embedders"]["soak-extra"] = {"path": path, "device": "flex"}
                    names = [n for n in c["standby_embedders"] if n != "soak-extra"]
                    c["standby_embedders"] = names + (["soak-extra"] if on else [])
                self._edit(toggle)
            elif action == "reset":
                self._edit(lambda c: c.update(reset_flags=self.rng.random()))
            else:
                n = self.rng.randint(1, 50)
                self._edit(lambda c: c.setdefault("reranker_params", {}).update(top_n=n))
            self.changes.append(action)

    async def run(self) -> dict:
        original = open(self.live).read()
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            await self.references(s)
            before = await self.snapshot(s)
            stop = asyncio.Event()
            changer = asyncio.create_task(self.changer(stop))
            end = time.monotonic() + self.seconds

            async def client():
                while time.monotonic() < end:
                    await self.one(s)
            await asyncio.gather(*(client() for _ in range(self.clients)))
            stop.set()
            await changer
            with open(self.live, "w") as f:
                f.write(original)
            after = await self.settle(s, before)
        lost = self.counts["sent"] - self.counts["ok"] - self.counts["failed"]
        return {"requests": self.counts["sent"], "ok": self.counts["ok"],
                "failed": self.counts["failed"], "lost": lost,
                "hangups": self.counts["hangups"], "config_changes": len(self.changes),
                "changes": dict(Counter(self.changes)), "max_latency_s": round(self.max_latency, 2),
                "failures": self.failures[:20], "before": before, "after": after}

    async def snapshot(self, s) -> dict:
        async with s.get(self.url + "/admin/models", headers=self.admin) as r:
            b = await r.json()
        return {"threads": b["runtime"]["threads"], "actors": sorted(b["runtime"]["actors"]),
                "queued": sum(m["queue_length"] for m in b["models"]),
                "states": sorted({m["state"] for m in b["models"]}),
                "gpu_holders": (b["gpu"] or {}).get("holders", {}),
                "config_error": b["config_error"]}

    async def settle(self, s, before: dict, timeout: float = 60.0) -> dict:
        """Wait until the server is back where it started: same actors, nothing queued."""
        deadline = time.monotonic() + timeout
        snap = await self.snapshot(s)
        while time.monotonic() < deadline:
            snap = await self.snapshot(s)
            if snap["actors"] == before["actors"] and snap["queued"] == 0 and \
                    snap["config_error"] is None:
                break
            await asyncio.sleep(0.5)
        return snap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--live-config", required=True)
    ap.add_argument("--admin-key", required=True)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=120)
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--reranker", default="minilm-rerank")
    ap.add_argument("--out")
    a = ap.parse_args()
    soak = Soak(a.url, a.live_config, a.admin_key, seed=a.seed, clients=a.clients,
                seconds=a.seconds, deadline_s=a.deadline, llm=a.llm, embedder=a.embedder,
                reranker=a.reranker)
    result = asyncio.run(soak.run())
    result["command"] = "python benchmarks/soak.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "out" and v)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=2))
    for f in result["failures"]:
        print("FAILURE:", f)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
