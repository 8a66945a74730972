"""Load test for AgileRagServer or any OpenAI-compatible server.

For each concurrency level, N workers send a weighted mix of requests for ``--duration`` seconds
(each worker waits for its answer before sending the next, so N is the number in flight), then
the level's table is printed: requests/s, tokens/s of chat, p50/p99 latency and errors per kind.
A JSON file with every level goes to ``--out``, and PNG plots of throughput and of p50/p99
latency against concurrency when matplotlib is importable (it is optional).

Only three routes are used: ``/v1/chat/completions`` (streaming, with
``stream_options.include_usage``), ``/v1/embeddings`` and ``/v1/rerank`` (Jina/Cohere shape).
A target without a rerank route (404/405 on the first try) just drops rerank from the mix.

    python benchmarks/loadtest.py --url http://127.0.0.1:8000 --concurrency 1,8,32 \\
        --duration 20 --mix chat=1,embed=4,rerank=1 --max-tokens 32 --out benchmarks/results/load

Bounded: each level stops sending after ``--duration`` seconds or ``--max-requests`` requests,
cancels what is still in flight ``--grace`` seconds later (counted as "cut"), and every request
has a ``--timeout``. Point it only at servers you run (loopback in our docs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

KINDS = ("chat", "embed", "rerank")
ROUTES = {"chat": "/v1/chat/completions", "embed": "/v1/embeddings", "rerank": "/v1/rerank"}
MODEL_TYPES = {"chat": "chat", "embed": "embedding", "rerank": "rerank"}

_WORDS = ("river city market engineer library garden winter train music harbour bread letter "
          "mountain window lamp coffee bicycle forest doctor teacher museum bridge storm island "
          "kitchen rocket planet violin camera ladder").split()
_QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.",
              "Explain in one sentence what a reranker does.", "Write a haiku about rain.",
              "What does RAG stand for in machine learning?", "Give two tips for sleeping well."]


def sentence(rng: random.Random, words: int = 12) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        if not part.strip():
            continue
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {kind!r} in --mix (use {KINDS})")
        try:
            mix[kind] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in --mix: {part!r}") from None
    if not mix or sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("--mix needs at least one positive weight")
    return {k: w for k, w in mix.items() if w > 0}


def parse_models(text: str) -> dict[str, str]:
    out = {}
    for part in (text or "").split(","):
        if part.strip():
            kind, _, name = part.partition("=")
            if kind.strip() not in KINDS or not name:
                raise argparse.ArgumentTypeError(f"--model wants kind=name pairs; got {part!r}")
            out[kind.strip()] = name.strip()
    return out


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency wants e.g. 1,8,32; got {text!r}") \
            from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("--concurrency levels must be >= 1")
    return levels


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


@dataclass
class Sample:
    kind: str
    start: float
    latency: float
    ok: bool
    tokens: int = 0              # chat: completion tokens
    ttft: float | None = None    # chat: time to the first content token
    error: str | None = None


@dataclass
class Level:
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    cut: int = 0                 # requests still running at the level's hard stop, cancelled

    def summary(self) -> dict:
        out: dict = {"concurrency": self.concurrency, "wall_s": round(self.wall, 3),
                     "requests": len(self.samples), "cut": self.cut,
                     "errors": sum(not s.ok for s in self.samples), "kinds": {}}
        wall = max(self.wall, 1e-9)
        for kind in KINDS:
            ss = [s for s in self.samples if s.kind == kind]
            if not ss:
                continue
            ok = [s for s in ss if s.ok]
            lat = [s.latency for s in ok]
            d = {"requests": len(ss), "ok": len(ok), "errors": len(ss) - len(ok),
                 "rps": len(ok) / wall,
                 "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
                 "mean_s": statistics.fmean(lat) if lat else None}
            if kind == "chat":
                d["tokens"] = sum(s.tokens for s in ok)
                d["tokens_per_s"] = d["tokens"] / wall
                ttft = [s.ttft for s in ok if s.ttft is not None]
                d["ttft_p50_s"] = percentile(ttft, 50)
                d["ttft_p99_s"] = percentile(ttft, 99)
            errs: dict[str, int] = {}
            for s in ss:
                if not s.ok:
                    errs[s.error or "?"] = errs.get(s.error or "?", 0) + 1
            if errs:
                d["error_kinds"] = dict(sorted(errs.items(), key=lambda kv: -kv[1])[:5])
            out["kinds"][kind] = d
        return out


class Unsupported(Exception):
    """The target has no such route (404/405)."""


class LoadTester:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.base = args.url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.mix = dict(args.mix)
        self.models: dict[str, str] = dict(args.model)
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.notes: list[str] = []

    # ---- requests -------------------------------------------------------------------------------
    async def chat(self, session, rng: random.Random) -> tuple[int, float | None]:
        body = {"model": self.models.get("chat", "default"), "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": self.args.max_tokens,
                "temperature": self.args.temperature,
                "messages": [{"role": "user", "content": rng.choice(_QUESTIONS)}]}
        t0 = time.perf_counter()
        ttft = None
        chunks = 0
        usage_tokens = None
        async with session.post(self.base + ROUTES["chat"], json=body,
                                headers=self.headers) as r:
            await self._check(r, "chat")
            buf = b""
            async for raw in r.content.iter_any():
                buf += raw
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue                  # blank lines and ': ping' comments
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        raise RuntimeError(f"stream error: {str(obj['error'])[:120]}")
                    if obj.get("usage"):
                        usage_tokens = obj["usage"].get("completion_tokens")
                    for choice in obj.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            chunks += 1
                            if ttft is None:
                                ttft = time.perf_counter() - t0
        return (usage_tokens if usage_tokens is not None else chunks), ttft

    async def embed(self, session, rng: random.Random) -> None:
        n = self.args.embed_inputs
        body = {"model": self.models.get("embed", "default"),
                "input": sentence(rng) if n == 1 else [sentence(rng) for _ in range(n)]}
        async with session.post(self.base + ROUTES["embed"], json=body,
                                headers=self.headers) as r:
            await self._check(r, "embed")
            data = (await r.json(content_type=None)).get("data")
            if not isinstance(data, list) or len(data) != n:
                raise RuntimeError("bad embeddings reply")

    async def rerank(self, session, rng: random.Random) -> None:
        docs = [sentence(rng, 24) for _ in range(self.args.rerank_docs)]
        body = {"model": self.models.get("rerank", "default"), "query": sentence(rng, 6),
                "documents": docs, "return_documents": False}
        async with session.post(self.base + ROUTES["rerank"], json=body,
                                headers=self.headers) as r:
            await self._check(r, "rerank")
            results = (await r.json(content_type=None)).get("results")
            if not isinstance(results, list) or not results:
                raise RuntimeError("bad rerank reply")

    async def _check(self, r, kind: str) -> None:
        if r.status in (404, 405):
            raise Unsupported(f"{kind}: HTTP {r.status} on {ROUTES[kind]}")
        if r.status != 200:
            text = (await r.text())[:200]
            raise RuntimeError(f"HTTP {r.status}: {text}")

    # ---- setup ---------------------------------------------------------------------------------
    async def discover(self, session) -> None:
        """Default model names from GET /v1/models (our cards carry a ``type``)."""
        if all(k in self.models for k in self.mix):
            return
        try:
            async with session.get(self.base + "/v1/models", headers=self.headers) as r:
                cards = []
                if r.status == 200:
                    cards = (await r.json(content_type=None)).get("data") or []
        except Exception:  # noqa: BLE001 - any failure: fall back to "default"
            cards = []
        for kind in self.mix:
            if kind in self.models:
                continue
            typed = [c["id"] for c in cards if c.get("type") == MODEL_TYPES[kind]]
            if typed:
                self.models[kind] = typed[0]
            elif cards:
                self.models[kind] = cards[0]["id"]
                self.notes.append(f"{kind}: no typed model card; using {cards[0]['id']!r} "
                                  f"(pass --model {kind}=NAME)")
            else:
                self.models[kind] = "default"

    async def probe(self, session) -> None:
        """One request of each kind in the mix: drops unsupported routes, fails on others."""
        rng = random.Random(0)
        for kind in list(self.mix):
            try:
                await getattr(self, kind)(session, rng)
            except Unsupported as exc:
                if kind == "rerank":
                    self.notes.append(f"rerank dropped from the mix ({exc})")
                    del self.mix[kind]
                else:
                    raise SystemExit(f"the target does not serve {kind}: {exc}") from None
            except Exception as exc:  # noqa: BLE001
                raise SystemExit(f"warm-up {kind} request failed: {exc!r}") from None
        if not self.mix:
            raise SystemExit("nothing left to send")

    # ---- one level ----------------------------------------------------------------------------
    async def run_level(self, session, concurrency: int) -> Level:
        level = Level(concurrency)
        kinds = list(self.mix)
        weights = [self.mix[k] for k in kinds]
        deadline = time.perf_counter() + self.args.duration
        budget = [self.args.max_requests]

        async def worker(i: int) -> None:
            rng = random.Random(self.args.seed * 100003 + concurrency * 1009 + i)
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                kind = rng.choices(kinds, weights)[0]
                t0 = time.perf_counter()
                s = Sample(kind, t0, 0.0, True)
                try:
                    res = await asyncio.wait_for(getattr(self, kind)(session, rng),
                                                 self.args.timeout)
                    if kind == "chat":
                        s.tokens, s.ttft = res
                except asyncio.TimeoutError:
                    s.ok, s.error = False, "timeout"
                except Exception as exc:  # noqa: BLE001 - counted, not fatal
                    s.ok, s.error = False, (str(exc) or type(exc).__name__)[:120]
                s.latency = time.perf_counter() - t0
                level.samples.append(s)

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
        _, running = await asyncio.wait(tasks, timeout=self.args.duration + self.args.grace)
        for t in running:                         # hard stop: cancel what is still in flight
            t.cancel()
        if running:
            await asyncio.wait(running)
        level.cut = len(running)
        level.wall = time.perf_counter() - t0
        return level

    async def run(self) -> list[dict]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        summaries = []
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            await self.discover(session)
            await self.probe(session)
            for note in self.notes:
                print("note:", note)
            print(f"target {self.base}  mix {self.mix}  models "
                  f"{ {k: self.models[k] for k in self.mix} }")
            for c in self.args.concurrency:
                level = await self.run_level(session, c)
                summary = level.summary()
                summaries.append(summary)
                print_level(summary)
        return summaries


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def print_level(s: dict) -> None:
    cut = f", {s['cut']} cut at the hard stop" if s.get("cut") else ""
    print(f"\nconcurrency {s['concurrency']}: {s['requests']} requests in {s['wall_s']:.1f}s, "
          f"{s['errors']} errors{cut}")
    print(f"  {'kind':<7}{'ok':>6}{'err':>5}{'req/s':>9}{'tok/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'ttft50':>8}")
    for kind, d in s["kinds"].items():
        tok = f"{d['tokens_per_s']:.1f}" if "tokens_per_s" in d else "-"
        ttft = _ms(d.get("ttft_p50_s")) if kind == "chat" else "-"
        print(f"  {kind:<7}{d['ok']:>6}{d['errors']:>5}{d['rps']:>9.2f}{tok:>9}"
              f"{_ms(d['p50_s']):>9}{_ms(d['p99_s']):>9}{ttft:>8}")
        for err, n in (d.get("error_kinds") or {}).items():
            print(f"      {n} x {err}")


def _level_axis(ax, levels: list[int]) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(summaries: list[dict], out_dir: str) -> list[str]:
    """PNG plots when matplotlib is importable; [] otherwise."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    levels = [s["concurrency"] for s in summaries]
    kinds = [k for k in KINDS if any(k in s["kinds"] for s in summaries)]
    files = []

    def series(kind: str, key: str) -> list[float]:
        return [(s["kinds"].get(kind) or {}).get(key) or float("nan") for s in summaries]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in kinds:
        ax.plot(levels, series(kind, "rps"), marker="o", label=f"{kind} req/s")
    _level_axis(ax, levels)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("requests/s")
    if "chat" in kinds:
        ax2 = ax.twinx()
        ax2.plot(levels, series("chat", "tokens_per_s"), marker="s", linestyle="--",
                 color="black", label="chat tokens/s")
        ax2.set_ylabel("chat tokens/s")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("Throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, kind in enumerate(kinds):
        color = f"C{i}"
        ax.plot(levels, [v * 1000 for v in series(kind, "p50_s")], marker="o", color=color,
                label=f"{kind} p50")
        ax.plot(levels, [v * 1000 for v in series(kind, "p99_s")], marker="^", color=color,
                linestyle="--", label=f"{kind} p99")
    _level_axis(ax, levels)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency vs concurrency")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    return files


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--url", default="http://127.0.0.1:8000",
                    help="base URL of the server (with or without /v1)")
    ap.add_argument("--concurrency", type=parse_levels, default=parse_levels("1,8,32"),
                    help="comma-separated concurrency levels (default 1,8,32)")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="seconds of sending per level (default 10)")
    ap.add_argument("--mix", type=parse_mix, default=parse_mix("chat=1,embed=4,rerank=1"),
                    help="request kinds and weights (default chat=1,embed=4,rerank=1)")
    ap.add_argument("--model", type=parse_models, default={},
                    help="model per kind, e.g. chat=smollm2,embed=minilm,rerank=tiny-ce "
                         "(default: from GET /v1/models)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of chats (default 32)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--embed-inputs", type=int, default=1,
                    help="sentences per embedding request (default 1)")
    ap.add_argument("--rerank-docs", type=int, default=8,
                    help="documents per rerank request (default 8)")
    ap.add_argument("--max-requests", type=int, default=100000,
                    help="at most this many requests per level (default 100000)")
    ap.add_argument("--grace", type=float, default=30.0,
                    help="seconds a level waits for requests in flight after --duration; "
                         "then they are cancelled and counted as cut (default 30)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""),
                    help="Bearer key (default $OPENAI_API_KEY; none sent if empty)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="",
                    help="folder for loadtest.json and the PNG plots ('' = print only)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tester = LoadTester(args)
    started = time.time()
    summaries = asyncio.run(tester.run())
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        result = {"url": tester.base, "started": started, "mix": tester.mix,
                  "models": {k: tester.models[k] for k in tester.mix},
                  "duration_s": args.duration, "max_tokens": args.max_tokens,
                  "embed_inputs": args.embed_inputs, "rerank_docs": args.rerank_docs,
                  "notes": tester.notes, "levels": summaries,
                  "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])])}
        path = os.path.join(args.out, "loadtest.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {path}")
        files = plot(summaries, args.out)
        if files:
            print("wrote " + ", ".join(files))
        else:
            print("(matplotlib not importable: JSON only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
