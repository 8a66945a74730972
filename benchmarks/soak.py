"""Seeded soak / stress / chaos run against a running AgileRagServer.

Many concurrent clients mix chat (streamed and not), embeddings and rerank while the live
config changes under them and some clients hang up mid-stream. Every reply is checked against
a reference computed alone before the run, so a mixed-up or truncated reply is caught; every
request has a deadline.

Two sets of live edits:
- classic (default): device flips, an embedder added and deleted, reset_flags, top_n.
- ``--chaos`` (issue 11): models of every kind added, removed and reloaded from a new path;
  devices flipped cpu <-> flex; ``llm_params.continuous_batching`` flipped in the same save as
  the LLM's device; ``prefill_chunk_tokens`` 0 / small / default; ``max_batch_size`` 2;
  other params changed and removed; reset_flags; broken files (syntax error, a standby name
  with no entry, an unknown device, a missing path, a model folder that fails to load) and
  half-written files; saves by rename and in place. Traffic adds long prompts (read in
  chunks), both rerank shapes (``documents`` and TEI's ``texts``) on both routes, requests to
  models that come and go, and clients that time out. A refusal is fine when it is an
  OpenAI-shaped 4xx / 503 (with Retry-After) / 504 without internal exception text; anything
  else (a 500, a wrong or truncated reply, a missed deadline, a request its model dropped when
  it was removed: ``actor_stopped``) is a failure. Requests carry their own ``x-request-id``;
  the server's trace of each failed one is kept in the result (``failure_traces``).

With ``--admin-key`` the run samples the server's RSS, open file descriptors, threads and the
models whose weights are still alive (``GET /admin/models``) every ``--sample-every`` seconds,
and ``--plot out.png`` draws them. The plot needs matplotlib, which is not a dependency of the
server: ``.venv/bin/pip install matplotlib`` (installed into the venv only for this benchmark).

Against a running server (the live config must be writable; the run restores it at the end):

    python benchmarks/soak.py --url http://127.0.0.1:8000 --live-config liveconfigs.json \\
        --admin-key KEY --seconds 300 --seed 1 --out benchmarks/results/soak.json

or let it start one with the default models in a work folder (``--serve DIR``):

    python benchmarks/soak.py --serve /tmp/soak --chaos --seconds 1800 --clients 12 \\
        --seed 7 --out benchmarks/results/soak-chaos-cpu.json --plot soak-chaos-cpu.png

tests/test_stress.py runs a short classic version; tests/test_chaos.py a short chaos one.
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import copy
import itertools
import json
import os
import random
import re
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
_TOPICS = ["bees", "rivers", "trains", "bread", "stars", "chess", "snow", "tea", "ships", "paint"]
#: ~900 tokens: read in several chunks at the default prefill_chunk_tokens (512)
LONG_PROMPT = ("Read these notes, then answer the question at the end.\n" + "\n".join(
    f"Note {i}: on day {i} the village council discussed {_TOPICS[i % 10]} and "
    f"{_TOPICS[(3 * i + 1) % 10]}, and agreed to meet again on day {i + 7}."
    for i in range(36)) + "\nQuestion: what did the council discuss on day 4?")

EXTRA = {"embedder": "soak-extra", "reranker": "soak-extra-rerank", "llm": "soak-extra-llm"}
SECTION = {"llm": "llms", "embedder": "embedders", "reranker": "rerankers"}
STANDBY = {"llm": "standby_llms", "embedder": "standby_embedders",
           "reranker": "standby_rerankers"}
PATH_KEY = {"llm": "llm_path", "embedder": "path", "reranker": "path"}
#: a refusal a client may get under load (a model removed or reloaded finishes what it had
#: accepted before it stops, so ``actor_stopped`` is a failure)
REFUSAL_CODES = {"overloaded", "timeout"}
#: the x-request-id of the request being made (each request runs in its own task)
_RID: contextvars.ContextVar[str | None] = contextvars.ContextVar("soak_rid", default=None)
_INTERNAL = re.compile(r"Traceback|File \"|\b[A-Z]\w*(Error|Exception)\b\s*[:(]|"
                       r"object at 0x[0-9a-f]+")


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def error_problem(status: int, headers, body) -> str | None:
    """None when an HTTP error is one a client may get (an OpenAI-shaped 4xx, 503 with
    Retry-After or 504, with no internal exception text), else what is wrong with it."""
    if not (400 <= status < 500 or status in (503, 504)):
        return f"HTTP {status}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or \
            not isinstance(err.get("type"), str) or "param" not in err or "code" not in err:
        return f"HTTP {status} not in OpenAI's error shape: {str(body)[:200]}"
    if status == 503 and not headers.get("Retry-After"):
        return "HTTP 503 without Retry-After"
    if err.get("code") == "actor_stopped":
        return f"HTTP {status}: its model stopped before answering: {err['message'][:200]}"
    if _INTERNAL.search(err["message"]):
        return f"HTTP {status} carries internal exception text: {err['message'][:200]}"
    return None


def stream_error_problem(err) -> str | None:
    """The same for an ``{"error": ...}`` event in a stream that had begun."""
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return f"stream error not in OpenAI's shape: {str(err)[:200]}"
    if _INTERNAL.search(err["message"]):
        return f"stream error carries internal exception text: {err['message'][:200]}"
    if err.get("code") not in REFUSAL_CODES:
        return f"stream failed: {err.get('code')}: {err['message'][:200]}"
    return None


class Refused(Exception):
    """An acceptable refusal (status or stream error code)."""


class Failure(Exception):
    """A wrong, truncated or malformed reply."""


# ---- live edits ------------------------------------------------------------------------------
class ChaosEditor:
    """The issue-11 live edits, drawn from a seeded deck so that a short run meets every kind.
    ``good`` is the config the server should end up running; broken writes leave it as is
    (the next edit writes a good file again)."""

    #: one deck; the extra models twice, so that each is added and removed in every deck
    ACTIONS = ["extra_embedder", "extra_reranker", "extra_llm", "reload", "device",
               "llm_batching", "prefill", "max_batch", "params", "reset", "broken",
               "half_written", "extra_embedder", "extra_reranker", "extra_llm"]
    BROKEN = ["syntax", "ghost_name", "bad_device", "missing_path", "failing_model"]

    def __init__(self, live: str, rng: random.Random, *, kinds: dict[str, str]):
        self.live = live
        self.rng = rng
        self.kinds = kinds                       # kind -> the main model's name
        with open(live) as f:
            self.original = f.read()
        self.good = json5.loads(self.original)
        self.deck: list[str] = []
        self.log: list[str] = []
        self.dir = os.path.dirname(os.path.abspath(live))
        self.alias = os.path.join(self.dir, "soak-alias-embedder")
        self.failing = os.path.join(self.dir, "soak-failing-model")
        self._prepare_folders()
        self.added: set[str] = set()             # extra model names added at any time
        self.turns: Counter = Counter()
        self.last_action = ""

    def _prepare_folders(self) -> None:
        from agile_rag.runtime.liveconfig import resolve_path

        entry = self.good[SECTION["embedder"]][self.kinds["embedder"]]
        real = resolve_path(entry["path"], self.dir)
        if os.path.islink(self.alias):
            os.unlink(self.alias)
        os.symlink(real, self.alias)             # the same weights under a new path: a reload
        os.makedirs(self.failing, exist_ok=True)  # a folder that exists but does not load
        with open(os.path.join(self.failing, "config.json"), "w") as f:
            f.write('{"architectures": ["BertModel"], "model_type": "bert"}')

    def cleanup(self) -> None:
        with open(self.live, "w") as f:
            f.write(self.original)
        if os.path.islink(self.alias):
            os.unlink(self.alias)

    # ---- writing --------------------------------------------------------------------------
    def write(self, text: str, style: str | None = None) -> str:
        style = style or self.rng.choice(["rename", "rename", "inplace"])
        if style == "rename":                    # editors that write a new file and rename it
            tmp = self.live + ".soak-tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.live)
        else:
            with open(self.live, "w") as f:
                f.write(text)
        return style

    def text(self, cfg: dict | None = None) -> str:
        return json.dumps(self.good if cfg is None else cfg, indent=2)

    # ---- one edit -------------------------------------------------------------------------
    async def step(self) -> str:
        if not self.deck:
            self.deck = list(self.ACTIONS)
            self.rng.shuffle(self.deck)
        action = self.last_action = self.deck.pop()
        what = getattr(self, "_" + action)()
        if asyncio.iscoroutine(what):
            what = await what
        self.log.append(what)
        return what

    def _toggle_extra(self, kind: str) -> str:
        name, main = EXTRA[kind], self.kinds[kind]
        c = self.good
        standby = [n for n in c[STANDBY[kind]] if n != name]
        if name in c[STANDBY[kind]]:
            c[SECTION[kind]].pop(name, None)
            c[STANDBY[kind]] = standby
            return f"removed {kind} {name} ({self.write(self.text())})"
        entry = copy.deepcopy(c[SECTION[kind]][main])
        entry["device"] = self.rng.choice(["cpu", "flex"])
        c[SECTION[kind]][name] = entry
        c[STANDBY[kind]] = standby + [name]
        self.added.add(name)
        return f"added {kind} {name} ({self.write(self.text())})"

    def _extra_embedder(self) -> str:
        return self._toggle_extra("embedder")

    def _extra_reranker(self) -> str:
        return self._toggle_extra("reranker")

    def _extra_llm(self) -> str:
        return self._toggle_extra("llm")

    async def _reload(self) -> str:
        name = EXTRA["embedder"]
        c = self.good
        first = ""
        if name not in c[STANDBY["embedder"]]:   # add it first, let that apply, then reload
            first = self._extra_embedder() + ", then "
            await asyncio.sleep(1.5)
        entry = c[SECTION["embedder"]][name]
        main = c[SECTION["embedder"]][self.kinds["embedder"]]["path"]
        entry["path"] = self.alias if entry["path"] != self.alias else main
        return f"{first}reloaded embedder {name} from a new path ({self.write(self.text())})"

    def _device(self) -> str:
        c = self.good
        kind = self.rng.choice(list(SECTION))
        names = list(c[STANDBY[kind]])
        if not names:
            return self._reset()
        name = self.rng.choice(names)
        entry = c[SECTION[kind]][name]
        entry["device"] = "cpu" if entry.get("device", "flex") != "cpu" else "flex"
        return f"{kind} {name} device {entry['device']} ({self.write(self.text())})"

    def _llm_batching(self) -> str:
        c = self.good
        p = c.setdefault("llm_params", {})
        p["continuous_batching"] = not p.get("continuous_batching", True)
        entry = c[SECTION["llm"]][self.kinds["llm"]]
        entry["device"] = "cpu" if entry.get("device", "flex") != "cpu" else "flex"
        return (f"llm continuous_batching {p['continuous_batching']} and device "
                f"{entry['device']} in one save ({self.write(self.text())})")

    def _next(self, action: str, values: list):
        """The values of an action in turn (a short run meets the ones that matter)."""
        i = self.turns[action]
        self.turns[action] += 1
        return values[i % len(values)]

    async def _prefill(self) -> str:
        """Prompts read 16 tokens at a time for a second (most chats are then half-read at
        any moment), then the next value: 0 (all at once) lands on half-read prompts."""
        p = self.good.setdefault("llm_params", {})
        p["prefill_chunk_tokens"] = 16
        self.write(self.text())
        await asyncio.sleep(1.0)
        value = self._next("prefill", [0, None, 0, 64])
        if value is None:
            p.pop("prefill_chunk_tokens", None)
        else:
            p["prefill_chunk_tokens"] = value
        return f"llm prefill_chunk_tokens 16, then {value} ({self.write(self.text())})"

    def _max_batch(self) -> str:
        p = self.good.setdefault("llm_params", {})
        value = self._next("max_batch", [2, None, 3, 2])
        if value is None:
            p.pop("max_batch_size", None)
        else:
            p["max_batch_size"] = value
        return f"llm max_batch_size {value} ({self.write(self.text())})"

    def _params(self) -> str:
        c = self.good
        section, key, values = self.rng.choice([
            ("llm_params", "default_temp", [0.0, 0.5, 1.2]),
            ("llm_params", "stream_chunk_size", [0, 3, None]),
            ("llm_params", "force_0_temp", [True, False]),
            ("llm_params", "gpu_min_slice_ms", [50, None]),
            ("embedder_params", "token_estimation", ["len", "re"]),
            ("embedder_params", "batch_linger_ms", [0, 5, None]),
            ("reranker_params", "top_n", [1, 2, 50, None]),
            ("reranker_params", "batch_size", [2, 32, None]),
            ("reranker_params", "batch_linger_ms", [0, 20, None]),
        ])
        value = self.rng.choice(values)
        p = c.setdefault(section, {})
        if value is None:
            p.pop(key, None)                      # back to its default
        else:
            p[key] = value
        return f"{section}.{key} {value} ({self.write(self.text())})"

    def _reset(self) -> str:
        self.good["reset_flags"] = self.rng.randint(1, 10**6)
        return f"reset_flags ({self.write(self.text())})"

    def _broken(self) -> str:
        how = self._next("broken", self.BROKEN)
        bad = copy.deepcopy(self.good)
        kind = "embedder"
        main = self.kinds[kind]
        if how == "syntax":
            self.write(self.text()[: -7] + ",,, // oops")
            return "broken: syntax error"
        if how == "ghost_name":
            bad[STANDBY[kind]] = bad[STANDBY[kind]] + ["ghost"]
        elif how == "bad_device":
            bad[SECTION[kind]][main]["device"] = "tpu"
        elif how == "missing_path":
            bad[SECTION[kind]][main]["path"] = "/no/such/model/folder"
        else:                                     # valid file, a model that fails to load
            bad[SECTION[kind]]["soak-failing"] = {"path": self.failing, "device": "cpu"}
            bad[STANDBY[kind]] = bad[STANDBY[kind]] + ["soak-failing"]
        return f"broken: {how} ({self.write(self.text(bad))})"

    async def _half_written(self) -> str:
        """An editor that writes the file in two steps, with a pause between them: the half
        file may be seen (and refused) when the pause is longer than the debounce."""
        self.good["reset_flags"] = self.rng.randint(1, 10**6)
        text = self.text()
        cut = self.rng.randint(len(text) // 4, 3 * len(text) // 4)
        pause = self.rng.uniform(0.05, 1.0)
        with open(self.live, "w") as f:
            f.write(text[:cut])
            f.flush()
            await asyncio.sleep(pause)
            f.write(text[cut:])
        return f"half-written file, {pause:.2f}s pause"

    async def settle_good(self, url: str, session, admin: dict) -> list[str]:
        """Write the good config once more (by rename) and apply it now."""
        self.write(self.text(), "rename")
        async with session.post(url + "/admin/reload", headers=admin) as r:
            return (await r.json()).get("applied", [])


class Soak:
    def __init__(self, url: str, live_config: str, admin_key: str, *, seed: int, clients: int,
                 seconds: float, deadline_s: float, llm: str, embedder: str, reranker: str,
                 change_every_s: float = 2.0, chaos: bool = False,
                 sample_every_s: float = 5.0, log=None):
        self.url = url.rstrip("/")
        self.live = live_config
        self.admin = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.seed = seed
        self.rng = random.Random(seed)
        self.clients, self.seconds, self.deadline_s = clients, seconds, deadline_s
        self.llm, self.embedder, self.reranker = llm, embedder, reranker
        self.change_every_s = change_every_s
        self.chaos = chaos
        self.sample_every_s = sample_every_s
        self.log = log or (lambda *a: None)
        self.ref_embed: dict[str, list] = {}
        self.ref_rerank: dict[str, list] = {}
        self.ref_chat: dict[tuple, str] = {}
        self.counts: Counter = Counter()
        self.kinds: Counter = Counter()
        self.refusals: Counter = Counter()
        self.failures: list[str] = []
        self.traces: dict[str, asyncio.Future] = {}   # failed request id -> its trace
        self.latency: dict[str, list[float]] = {}
        self.request_no = itertools.count(1)
        self.max_latency = 0.0
        self.changes: list[str] = []
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self.editor: ChaosEditor | None = None
        self.paused = asyncio.Event()            # set: the changer holds still

    # ---- references ------------------------------------------------------------------------
    async def _post(self, s, path, body, **kw):
        async with s.post(self.url + path, json=body, headers=_rid_header(), **kw) as r:
            return r.status, r.headers, await r.json(content_type=None)

    async def references(self, s) -> None:
        for t in SENTENCES:
            _, _, b = await self._post(s, "/v1/embeddings", {"model": self.embedder, "input": t})
            self.ref_embed[t] = b["data"][0]["embedding"]
        for q, docs in QUERIES:
            _, _, b = await self._post(s, "/v1/rerank", {"model": self.reranker, "query": q,
                                                         "documents": docs, "top_n": len(docs)})
            self.ref_rerank[q] = sorted((r["index"], r["relevance_score"]) for r in b["results"])
        for p, n in self.chat_cases():
            _, _, b = await self._post(s, "/v1/chat/completions", self._chat_body(p, n))
            self.ref_chat[(p, n)] = b["choices"][0]["message"]["content"]

    def chat_cases(self) -> list[tuple[str, int]]:
        cases = [(p, 8) for p in PROMPTS]
        if self.chaos:
            cases += [(LONG_PROMPT, 6), (PROMPTS[0], 24)]
        return cases

    def _chat_body(self, prompt: str, n: int = 8, stream: bool = False,
                   model: str | None = None) -> dict:
        return {"model": model or self.llm, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": n, "stream": stream}

    def _llm(self) -> str:
        """Chaos: now and then the extra LLM (the same weights; while it is absent its name
        goes to the first standby LLM)."""
        return self.rng.choice([self.llm, self.llm, EXTRA["llm"]]) if self.chaos else self.llm

    # ---- one request -----------------------------------------------------------------------
    def _fail(self, what: str) -> None:
        self.failures.append(what)
        self.counts["failed"] += 1

    def pick(self) -> str:
        if not self.chaos:
            return self.rng.choices(["embed", "rerank", "chat", "stream", "hangup"],
                                    [5, 2, 1, 1, 1])[0]
        return self.rng.choices(
            ["embed", "rerank", "tei", "chat", "stream", "hangup", "long", "timeout"],
            [5, 2, 2, 2, 2, 1, 0.8, 1])[0]

    async def one(self, s, kind: str | None = None) -> str:
        """One request of ``kind`` (drawn when None), checked; returns its outcome:
        ok, refused, gave_up or failed."""
        kind = kind or self.pick()
        t0 = time.monotonic()
        self.counts["sent"] += 1
        self.kinds[kind] += 1
        outcome = "ok"
        rid = f"soak{self.seed}-{next(self.request_no)}"
        _RID.set(rid)                         # the request's task below inherits it
        failures = len(self.failures)
        try:
            await asyncio.wait_for(self._one(s, kind), self.deadline_s)
        except asyncio.TimeoutError:
            outcome = "failed"
            self._fail(f"{kind}: no reply within {self.deadline_s}s")
        except Refused as exc:
            outcome = "refused"
            self.refusals[str(exc)] += 1
        except _GaveUp:
            outcome = "gave_up"
        except Failure as exc:
            outcome = "failed"
            self._fail(f"{kind}: {exc}")
        except (aiohttp.ClientError, ValueError, KeyError, TypeError, IndexError) as exc:
            outcome = "failed"
            self._fail(f"{kind}: {type(exc).__name__}: {exc}")
        took = time.monotonic() - t0
        if outcome != "failed":
            self.counts[outcome] += 1
        if outcome == "ok":
            self.latency.setdefault(kind, []).append(took)
        if len(self.failures) > failures:     # name the request: its trace tells the story
            self.failures[-1] = f"[{rid}, {time.monotonic() - self.t0:.0f}s] {self.failures[-1]}"
            if len(self.traces) < 10:
                self.traces[rid] = asyncio.ensure_future(self._trace(s, rid))
        self.max_latency = max(self.max_latency, took)
        if outcome == "refused" and self.chaos:
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))   # Retry-After: 1, as clients do
        return outcome

    async def _trace(self, s, rid: str) -> dict | None:
        """A failed request's timeline from the server (GET /debug/traces)."""
        await asyncio.sleep(1.0)              # let the server finish with it
        try:
            async with s.get(self.url + "/debug/traces", params={"request_id": rid},
                             timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status != 200:
                    return None
                b = await r.json()
            return {"timeline": b.get("timeline"), "events": b.get("events", [])[-12:]}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    def _refuse_or_fail(self, what: str, status: int, headers, body) -> None:
        if not self.chaos:
            raise Failure(f"{what} {status}: {str(body)[:300]}")
        problem = error_problem(status, headers, body)
        if problem is not None:
            raise Failure(f"{what}: {problem}")
        raise Refused(f"{what} {status} {body['error'].get('code')}")

    async def _one(self, s, kind: str) -> None:
        if kind == "timeout":                     # a client that gives up after a while
            inner = self.rng.choice(["embed", "rerank", "chat", "stream", "long"])
            timeout = aiohttp.ClientTimeout(total=self.rng.uniform(0.2, 2.0))
            try:
                await self._kind(s, inner, timeout)
            except asyncio.TimeoutError:
                raise _GaveUp() from None
            return
        await self._kind(s, kind, None)

    async def _kind(self, s, kind: str, timeout) -> None:
        kw = {"timeout": timeout} if timeout is not None else {}
        if kind == "embed":
            texts = self.rng.sample(SENTENCES, self.rng.randint(1, 4))
            model = self.rng.choice([self.embedder, EXTRA["embedder"]]) if self.chaos \
                else self.embedder
            status, h, b = await self._post(s, "/v1/embeddings", {"model": model,
                                                                  "input": texts}, **kw)
            if status != 200:
                return self._refuse_or_fail("embed", status, h, b)
            self.check_embeddings(texts, b)
        elif kind in ("rerank", "tei"):
            q, docs = self.rng.choice(QUERIES)
            model = self.rng.choice([self.reranker, EXTRA["reranker"]]) if self.chaos \
                else self.reranker
            route = self.rng.choice(["/v1/rerank", "/rerank"]) if self.chaos else "/v1/rerank"
            body = {"model": model, "query": q, "top_n": len(docs)}
            body["texts" if kind == "tei" else "documents"] = docs
            status, h, b = await self._post(s, route, body, **kw)
            if status != 200:
                return self._refuse_or_fail(kind, status, h, b)
            if kind == "tei":
                if not isinstance(b, list):
                    raise Failure(f"tei: not a bare array: {str(b)[:200]}")
                got = sorted((r["index"], r["score"]) for r in b)
            else:
                got = sorted((r["index"], r["relevance_score"]) for r in b["results"])
            self.check_rerank(q, got)
        elif kind in ("chat", "long"):
            p, n = (LONG_PROMPT, 6) if kind == "long" else (self.rng.choice(PROMPTS), 8)
            stream = kind == "long" and self.rng.random() < 0.5
            if stream:
                return await self._stream(s, p, n, False, kw)
            status, h, b = await self._post(s, "/v1/chat/completions",
                                            self._chat_body(p, n, model=self._llm()), **kw)
            if status != 200:
                return self._refuse_or_fail(kind, status, h, b)
            self.check_chat(p, n, b["choices"][0]["message"]["content"])
        else:
            await self._stream(s, self.rng.choice(PROMPTS), 8, kind == "hangup", kw)

    async def _stream(self, s, p: str, n: int, hangup: bool, kw: dict) -> None:
        async with s.post(self.url + "/v1/chat/completions",
                          json=self._chat_body(p, n, stream=True, model=self._llm()),
                          headers=_rid_header(), **kw) as r:
            if r.status != 200:
                return self._refuse_or_fail("stream", r.status, r.headers,
                                            await r.json(content_type=None))
            if hangup:
                first = await r.content.readline()
                if not first.startswith(b"data: {") and not first.startswith(b":"):
                    raise Failure(f"stream: first line {first[:200]!r}")
                r.close()                       # hang up mid-stream
                self.counts["hangups"] += 1
                return
            raw = (await r.read()).decode()
        text, error = parse_sse(raw)
        if error is not None:
            problem = stream_error_problem(error)
            if problem is not None or not self.chaos:
                raise Failure(problem or f"stream error: {error}")
            raise Refused(f"stream error {error.get('code')}")
        self.check_chat(p, n, text)

    # ---- checks ----------------------------------------------------------------------------
    def check_embeddings(self, texts: list[str], b: dict) -> None:
        if len(b["data"]) != len(texts):
            raise Failure(f"embed: {len(b['data'])} vectors for {len(texts)} texts")
        for t, d in zip(texts, b["data"]):
            ref = self.ref_embed[t]
            if cosine(d["embedding"], ref) < 0.9999 or \
                    float(np.max(np.abs(np.asarray(d["embedding"]) - ref))) > 2e-3:
                raise Failure(f"embed: wrong vector for {t!r}")

    def check_rerank(self, q: str, got: list) -> None:
        ref = self.ref_rerank[q]
        if [i for i, _ in got] != [i for i, _ in ref] or \
                max(abs(a[1] - b_[1]) for a, b_ in zip(got, ref)) > 1e-3:
            raise Failure(f"rerank: wrong scores for {q!r}: {got} vs {ref}")

    def check_chat(self, p: str, n: int, text: str) -> None:
        if text != self.ref_chat[(p, n)]:
            raise Failure(f"chat: wrong answer for {p[:40]!r}: {text!r} vs "
                          f"{self.ref_chat[(p, n)]!r}")

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
            wait = self.change_every_s * (self.rng.uniform(0.6, 1.4) if self.chaos else 1.0)
            try:
                await asyncio.wait_for(stop.wait(), wait)
                break
            except asyncio.TimeoutError:
                pass
            if self.paused.is_set():
                continue
            if self.editor is not None:
                what = await self.editor.step()
                self.log(f"[{time.monotonic() - self.t0:6.1f}s] edit: {what}")
                self.changes.append(self.editor.last_action)
                continue
            action = self.rng.choice(["device", "extra", "reset", "top_n"])
            if action == "device":
                dev = self.rng.choice(["cpu", "flex", "cuda"])
                self._edit(lambda c, dev=dev: c["embedders"][self.embedder].update(device=dev))
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
                self._edit(lambda c, n=n: c.setdefault("reranker_params", {}).update(top_n=n))
            self.changes.append(action)

    # ---- sampling ----------------------------------------------------------------------------
    async def sampler(self, s, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample(s)
            try:
                await asyncio.wait_for(stop.wait(), self.sample_every_s)
            except asyncio.TimeoutError:
                pass

    async def sample(self, s) -> dict | None:
        if not self.admin:
            return None
        try:
            async with s.get(self.url + "/admin/models", headers=self.admin,
                             timeout=aiohttp.ClientTimeout(total=10)) as r:
                b = await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None
        rt = b["runtime"]
        point = {"t": round(time.monotonic() - self.t0, 2),
                 "rss_mb": round((rt.get("rss_bytes") or 0) / 2**20, 1),
                 "rss_file_mb": round((rt.get("rss_file_bytes") or 0) / 2**20, 1),
                 "fds": rt.get("open_fds"), "threads": rt["threads"],
                 "models": len(b["models"]),
                 "weights_alive": len({w["actor"] for w in rt.get("weights_alive", [])}),
                 "queued": sum(m["queue_length"] for m in b["models"])}
        self.samples.append(point)
        return point

    # ---- the run -----------------------------------------------------------------------------
    async def traffic(self, s, seconds: float) -> None:
        end = time.monotonic() + seconds

        async def client():
            while time.monotonic() < end:
                await self.one(s)
        await asyncio.gather(*(client() for _ in range(self.clients)))

    async def run(self) -> dict:
        original = open(self.live).read()
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            await self.references(s)
            before = await self.snapshot(s)
            if self.chaos:
                self.editor = ChaosEditor(self.live, self.rng, kinds={
                    "llm": self.llm, "embedder": self.embedder, "reranker": self.reranker})
            self.t0 = time.monotonic()
            stop = asyncio.Event()
            changer = asyncio.create_task(self.changer(stop))
            sampler = asyncio.create_task(self.sampler(s, stop))
            try:
                await self.traffic(s, self.seconds)
            finally:
                stop.set()
                await changer
                if self.editor is not None:
                    self.editor.cleanup()
                else:
                    with open(self.live, "w") as f:
                        f.write(original)
            after = await self.settle(s, before)
            await sampler
            await self.sample(s)
            await self.traced()
        return self.result(before, after)

    async def traced(self) -> None:
        """Wait for the traces of failed requests being fetched."""
        await asyncio.gather(*self.traces.values(), return_exceptions=True)

    def result(self, before: dict, after: dict) -> dict:
        sent = self.counts["sent"]
        lost = sent - self.counts["ok"] - self.counts["failed"] - self.counts["refused"] - \
            self.counts["gave_up"]
        lat = {k: {"n": len(v), "p50_s": round(float(np.percentile(v, 50)), 2),
                   "p99_s": round(float(np.percentile(v, 99)), 2), "max_s": round(max(v), 2)}
               for k, v in sorted(self.latency.items())}
        traces = {rid: (f.result() if f.done() and not f.cancelled() else None)
                  for rid, f in self.traces.items()}
        out = {"seed": self.seed, "chaos": self.chaos, "requests": sent,
               "ok": self.counts["ok"], "failed": self.counts["failed"], "lost": lost,
               "hangups": self.counts["hangups"], "config_changes": len(self.changes),
               "changes": dict(Counter(self.changes)),
               "max_latency_s": round(self.max_latency, 2), "failures": self.failures[:20],
               "latency": lat, "before": before, "after": after}
        if traces:
            out["failure_traces"] = traces
        if self.chaos:
            out.update(refused=self.counts["refused"], gave_up=self.counts["gave_up"],
                       refusals=dict(self.refusals), kinds=dict(self.kinds),
                       edits=self.editor.log if self.editor else [],
                       samples=self.samples)
        elif self.samples:
            out["samples"] = self.samples
        return out

    async def snapshot(self, s) -> dict:
        async with s.get(self.url + "/admin/models", headers=self.admin) as r:
            b = await r.json()
        rt = b["runtime"]
        return {"threads": rt["threads"], "thread_groups": rt.get("thread_groups"),
                "actors": sorted(rt["actors"]),
                "queued": sum(m["queue_length"] for m in b["models"]),
                "states": sorted({m["state"] for m in b["models"]}),
                "gpu_holders": (b["gpu"] or {}).get("holders", {}),
                "config_error": b["config_error"],
                "weights_alive": sorted({w["actor"] for w in rt.get("weights_alive", [])}),
                "rss_mb": round((rt.get("rss_bytes") or 0) / 2**20, 1),
                "rss_file_mb": round((rt.get("rss_file_bytes") or 0) / 2**20, 1),
                "fds": rt.get("open_fds")}

    async def settle(self, s, before: dict, timeout: float = 60.0) -> dict:
        """Wait until the server is back where it started: same actors, nothing queued, no
        config error, and no weights alive but those of the running models."""
        deadline = time.monotonic() + timeout
        snap = await self.snapshot(s)
        while time.monotonic() < deadline:
            snap = await self.snapshot(s)
            if snap["actors"] == before["actors"] and snap["queued"] == 0 and \
                    snap["config_error"] is None and \
                    set(snap["weights_alive"]) <= set(snap["actors"]):
                break
            await asyncio.sleep(0.5)
        return snap


def _rid_header() -> dict:
    rid = _RID.get()
    return {"x-request-id": rid} if rid else {}


class _GaveUp(Exception):
    """The client's own timeout ran out (it hung up)."""


def parse_sse(raw: str) -> tuple[str, dict | None]:
    """The text of a chat stream, checked strictly, and its error event if it has one."""
    if not raw.endswith("\n\n"):
        raise Failure(f"stream: body does not end with a blank line: {raw[-200:]!r}")
    text, done = [], False
    for block in raw.split("\n\n")[:-1]:
        if block.startswith(":"):
            continue                                 # keep-alive comment
        if not block.startswith("data: ") or done:
            raise Failure(f"stream: unexpected block {block[:200]!r}")
        data = block[6:]
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        if "error" in event:
            return "".join(text), event["error"]
        if "choices" not in event:
            raise Failure(f"stream: chunk without choices: {data[:200]}")
        for c in event["choices"]:
            text.append((c.get("delta") or {}).get("content") or "")
    if not done:
        raise Failure("stream: no [DONE]")
    return "".join(text), None


# ---- results: markdown and plot ----------------------------------------------------------------
def plot(samples: list[dict], path: str, title: str) -> bool:
    """RSS, open fds and threads over time as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [p["t"] / 60 for p in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    for ax, key, label in zip(axes, ("rss_mb", "fds", "threads"),
                              ("RSS (MB)", "open fds", "threads")):
        ax.plot(t, [p[key] for p in samples], lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        lo = min(p[key] for p in samples)
        ax.set_ylim(bottom=0 if key != "rss_mb" else lo * 0.8)
    twin = axes[0].twinx()                # RSS rises while an extra model is loaded
    twin.step(t, [p["weights_alive"] for p in samples], where="post", color="0.6", lw=0.8)
    twin.set_ylabel("models with live weights", color="0.45")
    twin.set_ylim(0, max(p["weights_alive"] for p in samples) + 1)
    axes[0].set_title(title)
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(result: dict, plot_name: str | None = None) -> str:
    """A summary of one run for benchmarks/results/."""
    samples = result.get("samples") or []
    lines = [f"# Soak{' (chaos edits)' if result.get('chaos') else ''} on CPU: "
             f"{result['requests']} requests, {result['failed']} failed, {result['lost']} lost",
             "", "```", result.get("command", ""), "```", "",
             "| what | count |", "| --- | --- |",
             f"| requests | {result['requests']} |",
             f"| answered and equal to the reference | {result['ok']} |"]
    if result.get("chaos"):
        why = ", ".join(f"{k}: {v}" for k, v in result["refusals"].items())
        lines += [f"| refused (OpenAI-shaped 503/504, Retry-After) | {result['refused']}"
                  + (f" ({why})" if why else "") + " |",
                  f"| clients that gave up (their own timeout) | {result['gave_up']} |"]
    lines += [f"| failed (wrong, truncated, 500, malformed, past the deadline) | "
              f"{result['failed']} |",
              f"| lost (no answer at all) | {result['lost']} |",
              f"| streams hung up mid-way | {result['hangups']} |",
              f"| live-config edits | {result['config_changes']} |",
              f"| slowest reply | {result['max_latency_s']} s |"]
    if samples:
        rss = [p["rss_mb"] for p in samples]
        fds = [p["fds"] for p in samples]
        thr = [p["threads"] for p in samples]
        lines += [f"| RSS first / min / max / last sample | {rss[0]:.0f} / {min(rss):.0f} / "
                  f"{max(rss):.0f} / {rss[-1]:.0f} MB |",
                  f"| open fds first / max / last | {fds[0]} / {max(fds)} / {fds[-1]} |",
                  f"| threads first / max / last | {thr[0]} / {max(thr)} / {thr[-1]} |"]
    after = result.get("after", {})
    lines += [f"| after the run: actors | {', '.join(after.get('actors', []))} |",
              f"| after the run: weights alive | {', '.join(after.get('weights_alive', []))} |",
              f"| after the run: queued / config error | {after.get('queued')} / "
              f"{after.get('config_error')} |"]
    if result.get("latency"):
        lines += ["", "| replies by kind | n | p50 | p99 | max |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['n']} | {v['p50_s']} s | {v['p99_s']} s | {v['max_s']} s |"
                  for k, v in result["latency"].items()]
    if result.get("changes"):
        lines += ["", "Edits by kind: " + ", ".join(
            f"{k} x{v}" for k, v in sorted(result["changes"].items(), key=lambda kv: -kv[1]))]
    if plot_name:
        lines += ["", f"![RSS, fds and threads over time]({plot_name})"]
    if result.get("failures"):
        lines += ["", "First failures:", ""] + [f"- {f}" for f in result["failures"]]
    return "\n".join(lines) + "\n"


def serve(workdir: str, *, max_queued: int = 64) -> tuple:
    """Start a server with the repository's liveconfigs.json (the default models) in
    ``workdir``; returns (process, base url, live config path, admin key)."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _server import ROOT, start_server, wait_ready

    with open(os.path.join(ROOT, "liveconfigs.json")) as f:
        live = json5.loads(f.read())
    key = "soak-admin"
    cache = os.path.join(ROOT, ".cache", "agile_rag")
    proc, base, _ = start_server(workdir, live, (
        f"ADMIN_KEY = {key!r}\nDEBOUNCE_TIME = 0.3\nMODEL_CACHE_DIR = {cache!r}\n"
        f"MAX_QUEUED_PER_MODEL = {max_queued}\nSHUTDOWN_TIMEOUT = 10\nLOG_LEVEL = 'WARNING'\n"))
    wait_ready(base, proc)
    return proc, base, os.path.join(workdir, "liveconfigs.json"), key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--live-config")
    ap.add_argument("--admin-key", default="")
    ap.add_argument("--serve", metavar="DIR",
                    help="start a server with the default models in DIR (and stop it after)")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=120)
    ap.add_argument("--change-every", type=float, default=2.0)
    ap.add_argument("--chaos", action="store_true", help="the issue-11 live edits and traffic")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--reranker", default="minilm-rerank")
    ap.add_argument("--out", help="JSON result")
    ap.add_argument("--plot", help="PNG of RSS, fds and threads over time (needs matplotlib)")
    ap.add_argument("--md", help="a Markdown summary")
    a = ap.parse_args()
    skip = {"url", "live_config", "admin_key"} if a.serve else set()
    command = "python benchmarks/soak.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(a).items() if v not in (None, False, "") and k not in skip)
    proc = None
    if a.serve:
        proc, a.url, a.live_config, a.admin_key = serve(a.serve)
    if not a.live_config:
        ap.error("--live-config is required (or --serve DIR)")
    try:
        soak = Soak(a.url, a.live_config, a.admin_key, seed=a.seed, clients=a.clients,
                    seconds=a.seconds, deadline_s=a.deadline, llm=a.llm, embedder=a.embedder,
                    reranker=a.reranker, change_every_s=a.change_every, chaos=a.chaos,
                    sample_every_s=a.sample_every, log=lambda m: print(m, flush=True))
        result = asyncio.run(soak.run())
    finally:
        if proc is not None:
            from _server import stop_servers
            stop_servers([proc])
    result["command"] = command
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("failures", "samples", "edits")}, indent=2))
    for f in result["failures"]:
        print("FAILURE:", f)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    if a.plot and result.get("samples"):
        title = f"soak{' --chaos' if a.chaos else ''}: {a.clients} clients, " \
                f"{a.seconds / 60:.0f} min, seed {a.seed}"
        if not plot(result["samples"], a.plot, title):
            print("no plot: matplotlib is not installed (.venv/bin/pip install matplotlib)")
            a.plot = None
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(result, os.path.basename(a.plot) if a.plot else None))


if __name__ == "__main__":
    main()
