"""GET /metrics in Prometheus text format, and the middleware that counts every request.

One :class:`prometheus_client.CollectorRegistry` per app (never the global default), so tests
that build several apps in one process do not clash. What is counted where:

- the middleware: requests and errors by route, model and status code, latency histograms,
  requests in progress; it also records each request's HTTP span as a trace event (actor
  ``http``) so a request's timeline shows the time spent replying or streaming;
- a tracer listener (runs even with tracing off): messages per actor, mailbox wait, GPU
  grants and refusals, grant wait, evictions, bytes swapped in and swap seconds, read from the
  details the GPU lease and the VRAM arbiter put on their trace events;
- at scrape time, from the registry and the arbiter: queue length, state and GPU-resident
  bytes per model, the GPU budget and what is granted.
"""
from __future__ import annotations

import asyncio
import bisect
import time

import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from agile_rag.runtime.tracing import HTTP_ACTOR, TraceEvent

from .keys import MODEL_NAME, REQUEST_ID, SERVER

METRICS: web.AppKey[Metrics] = web.AppKey("metrics")     # the app's Metrics

#: routes whose body names a model, and the kind of model they serve
MODEL_ROUTES = {p + r: kind for p in ("/v1", "") for r, kind in (
    ("/chat/completions", "llm"), ("/completions", "llm"), ("/embeddings", "embedder"),
    ("/rerank", "reranker"))}
#: not traced (reading traces must not fill the ring buffer with its own requests)
UNTRACED_PREFIXES = ("/metrics", "/debug/")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
SWAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Children:
    """``metric.labels(*values)``, remembered: prometheus_client validates the values and
    takes a lock on every ``labels`` call; a child, once made, never changes. For the
    metrics every request touches."""
    __slots__ = ("labels", "known")

    def __init__(self, metric):
        self.labels = metric.labels
        self.known: dict[tuple, object] = {}

    def __call__(self, *values):
        child = self.known.get(values)
        if child is None:
            child = self.known[values] = self.labels(*values)
        return child


class _Tally:
    """What every request adds to the metrics, kept as plain numbers and added to the
    prometheus children in bulk (each ``inc``/``observe`` takes a lock, and an ``observe`` walks
    the buckets in Python): counts per label set, observations in a list. Folded in whenever
    the registry is read (it is the registry's first collector) and every ``FOLD_EVERY``
    observations."""
    FOLD_EVERY = 2048

    def __init__(self) -> None:
        self.counts: dict[tuple, int] = {}          # (children, labels) -> n
        self.obs: list[tuple] = []                  # (children, labels, value)
        self.live: dict[tuple, int] = {}            # (gauge children, labels) -> in progress

    def count(self, children: _Children, labels: tuple) -> None:
        key = (children, labels)
        self.counts[key] = self.counts.get(key, 0) + 1

    def observe(self, children: _Children, labels: tuple, value: float) -> None:
        self.obs.append((children, labels, value))
        if len(self.obs) >= self.FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        counts, self.counts = self.counts, {}
        for (children, labels), n in counts.items():
            children(*labels).inc(n)
        obs, self.obs = self.obs, []
        groups: dict[tuple, list[float]] = {}
        for children, labels, value in obs:
            groups.setdefault((children, labels), []).append(value)
        for (children, labels), values in groups.items():
            _observe_many(children(*labels), values)
        for (children, labels), n in self.live.items():
            children(*labels).set(n)

    # a collector that reports nothing: reading the registry folds the tally in first
    def describe(self):
        return []

    def collect(self):
        self.fold()
        return []


def _observe_many(hist, values: list[float]) -> None:
    """``hist.observe(v)`` for each value: one ``inc`` per bucket hit and one for the sum."""
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None:   # another prometheus_client
        for v in values:
            hist.observe(v)
        return
    hits: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)            # the first bound >= v, as observe finds
        hits[i] = hits.get(i, 0) + 1
    for i, n in hits.items():
        if i < len(buckets):
            buckets[i].inc(n)
    total.inc(sum(values))


class Metrics:
    def __init__(self, server):
        self.server = server
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.tally = _Tally()
        r.register(self.tally)            # first: a read of the registry folds it in
        self.requests = Counter("agile_rag_http_requests", "HTTP requests answered, by route, "
                                "model and status code", ["route", "model", "code"], registry=r)
        self.errors = Counter("agile_rag_http_errors", "HTTP requests answered with an error "
                              "(status >= 400; 499 = the client went away)",
                              ["route", "model", "code"], registry=r)
        self.latency = Histogram("agile_rag_http_request_duration_seconds", "Time from request "
                                 "to the last byte of the reply (streams included)",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("agile_rag_http_requests_in_progress", "Requests being "
                                 "answered now", ["route"], registry=r)
        self.messages = Counter("agile_rag_actor_messages", "Messages actors handled, by "
                                "outcome", ["actor", "msg", "outcome"], registry=r)
        self.queue_wait = Histogram("agile_rag_actor_queue_wait_seconds", "Time a message "
                                    "waited in its actor's mailbox", ["actor"],
                                    buckets=WAIT_BUCKETS, registry=r)
        self.grants = Counter("agile_rag_gpu_grants", "GPU grants the VRAM arbiter gave",
                              ["model"], registry=r)
        self.device_grants = Counter("agile_rag_gpu_device_grants", "GPU grants the VRAM "
                                     "arbiter gave, by model and card", ["model", "device"],
                                     registry=r)
        self.refusals = Counter("agile_rag_gpu_grant_refusals", "Grant requests refused or "
                                "timed out (the job ran on the CPU)", ["model", "reason"],
                                registry=r)
        self.grant_wait = Histogram("agile_rag_gpu_grant_wait_seconds", "Time a model job "
                                    "waited for its GPU grant", ["model"],
                                    buckets=WAIT_BUCKETS, registry=r)
        self.evictions = Counter("agile_rag_gpu_evictions", "GPU copies of weights dropped: "
                                 "revoked by the arbiter, or released by the model itself "
                                 "(idle_on_cpu, device change, out of memory)",
                                 ["model", "reason"], registry=r)
        self.yields = Counter("agile_rag_gpu_yields", "Times a busy model (the LLM's chat "
                              "batch) paused and gave the GPU back because another model "
                              "waited for it", ["model"], registry=r)
        self.gpu_jobs = Counter("agile_rag_gpu_jobs", "Jobs run on the GPU, by how the weights "
                                "were there: resident (the whole model) or streamed (an "
                                "encoder's layers copied through a few slots per pass)",
                                ["model", "mode"], registry=r)
        self.trims = Counter("agile_rag_gpu_trims", "Times an idle model gave back its working "
                             "memory (the LLM's KV cache) and kept its weights on the GPU",
                             ["model"], registry=r)
        self.trimmed_bytes = Counter("agile_rag_gpu_trimmed_bytes", "Working memory given back "
                                     "on a Trim", ["model"], registry=r)
        self.prefix_hits = Counter("agile_rag_llm_prefix_hits", "Chats whose prompt began "
                                   "with a stored prefix (its keys and values copied, not "
                                   "computed)", ["model"], registry=r)
        self.prefix_hit_tokens = Counter("agile_rag_llm_prefix_hit_tokens", "Prompt tokens "
                                         "read from stored prefixes", ["model"], registry=r)
        self.swap_bytes = Counter("agile_rag_swap_in_bytes", "Bytes of weights copied host -> "
                                  "GPU", ["model"], registry=r)
        self.swap_seconds = Histogram("agile_rag_swap_seconds", "Seconds per swap: in = admit "
                                      "(host -> GPU copy), out = evict (drop the GPU copy)",
                                      ["model", "direction"], buckets=SWAP_BUCKETS, registry=r)
        r.register(_LiveCollector(server))
        self.requests_of, self.errors_of = _Children(self.requests), _Children(self.errors)
        self.latency_of, self.in_progress_of = _Children(self.latency), \
            _Children(self.in_progress)
        self.messages_of, self.queue_wait_of = _Children(self.messages), \
            _Children(self.queue_wait)
        server.system.tracer.subscribe(self.on_event, always=True)

    # ---- from trace events -------------------------------------------------------------------
    def on_event(self, e: TraceEvent) -> None:
        if e.actor == HTTP_ACTOR:
            return
        tally = self.tally
        tally.count(self.messages_of, (e.actor, e.msg_type, e.outcome))
        tally.observe(self.queue_wait_of, (e.actor,), max(e.started - e.enqueued, 0.0))
        d = e.detail
        if not d:
            return
        if e.msg_type == "RequestGrant":
            model = str(d.get("model", "?"))
            if "granted" in d:
                self.grants.labels(model).inc()
                self.device_grants.labels(model, str(d.get("device", "cuda:0"))).inc()
            elif "refused" in d:
                self.refusals.labels(model, str(d["refused"])).inc()
            return
        if "grant_wait_s" in d:
            self.grant_wait.labels(e.actor).observe(_f(d["grant_wait_s"]))
        if "admit_s" in d:
            self.swap_seconds.labels(e.actor, "in").observe(_f(d["admit_s"]))
            self.swap_bytes.labels(e.actor).inc(_f(d.get("admit_bytes", 0)))
        if d.get("yielded"):
            self.yields.labels(e.actor).inc()
        if "gpu_mode" in d:
            self.gpu_jobs.labels(e.actor, str(d["gpu_mode"])).inc()
        if e.msg_type == "Trim":
            self.trims.labels(e.actor).inc()
            self.trimmed_bytes.labels(e.actor).inc(_f(d.get("trimmed", 0)))
        if e.msg_type == "Chat" and "prefix_hit_tokens" in d:
            # per chat (a batch loop's BatchIdle sums the same hits again)
            self.prefix_hits.labels(e.actor).inc()
            self.prefix_hit_tokens.labels(e.actor).inc(_f(d["prefix_hit_tokens"]))
        if "evict_s" in d:
            self.swap_seconds.labels(e.actor, "out").observe(_f(d["evict_s"]))
            reason = "revoked" if e.msg_type == "Revoke" else \
                ("yielded" if d.get("yielded") else "released")
            self.evictions.labels(e.actor, reason).inc()

    # ---- from HTTP requests ----------------------------------------------------------------
    def in_flight(self, route: str, delta: int) -> None:
        """A request on ``route`` started (+1) or ended (-1): the in-progress gauge."""
        live = self.tally.live
        gauge = (self.in_progress_of, (route,))
        live[gauge] = live.get(gauge, 0) + delta

    def model_of(self, request: web.Request, route: str) -> str:
        """The model that served (or would serve) a model route: the body's ``model``
        resolved through the registry, so the label is always a configured name."""
        # the body, if the handler read it
        return self.model_in(route, getattr(request, "_read_bytes", None))

    def model_in(self, route: str, raw: bytes | None) -> str:
        """:meth:`model_of` for a request body's bytes."""
        kind = MODEL_ROUTES.get(route)
        if kind is None:
            return ""
        name = None
        if raw:
            try:
                body = orjson.loads(raw)
                name = body.get("model") if isinstance(body, dict) else None
            except orjson.JSONDecodeError:
                pass
        try:
            actor = self.server.registry.resolve(kind, name if isinstance(name, str) else None)
        except Exception:  # noqa: BLE001 - no model of that kind
            return ""
        spec = getattr(actor, "spec", None)
        return getattr(spec, "name", None) or actor.name

    def expose(self) -> bytes:
        return generate_latest(self.registry)


def _f(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class _LiveCollector:
    """Gauges read at scrape time: nothing to keep in step while serving."""

    def __init__(self, server):
        self.server = server

    def describe(self):
        return []

    def collect(self):
        queue = GaugeMetricFamily("agile_rag_model_queue_length", "Requests waiting for or "
                                  "being handled by each model", labels=["model", "kind"])
        resident = GaugeMetricFamily("agile_rag_model_gpu_resident_bytes", "Bytes of each "
                                     "model's weights on the GPU now (0 = on the CPU)",
                                     labels=["model", "kind"])
        weights = GaugeMetricFamily("agile_rag_model_weight_bytes", "Bytes of each model's "
                                    "weights", labels=["model", "kind"])
        state = GaugeMetricFamily("agile_rag_model_state", "1 for each model's current state",
                                  labels=["model", "kind", "state", "device"])
        for kind, name, actor in self.server.registry.all():
            queue.add_metric([name, kind], actor.queue_length())
            describe = getattr(actor, "describe", None)
            if describe is None:
                continue
            s = describe()
            resident.add_metric([name, kind], s.resident_bytes)
            weights.add_metric([name, kind], s.weight_bytes)
            state.add_metric([name, kind, s.state, s.device], 1)
        yield from (queue, resident, weights, state)
        arbiter = self.server.system.actors.get("vram-arbiter")
        if arbiter is not None and hasattr(arbiter, "state"):
            a = arbiter.state()
            yield GaugeMetricFamily("agile_rag_gpu_budget_bytes", "GPU memory the arbiter may "
                                    "grant", value=a.budget)
            yield GaugeMetricFamily("agile_rag_gpu_granted_bytes", "GPU memory granted now",
                                    value=a.used)
            yield GaugeMetricFamily("agile_rag_gpu_grant_waiters", "Models waiting for a GPU "
                                    "grant", value=len(a.waiting))
            held = GaugeMetricFamily("agile_rag_gpu_granted_bytes_by_model", "GPU memory "
                                     "granted to each model (weights + working memory)",
                                     labels=["model"])
            for model, nbytes in a.holders.items():
                held.add_metric([model], nbytes)
            yield held
            yield from _device_families(a)


def _device_families(a):
    """Per card (several GPUs): its budget, what is granted on it, and each holder's card."""
    budget = GaugeMetricFamily("agile_rag_gpu_device_budget_bytes", "GPU memory the arbiter "
                               "may grant on each card", labels=["device"])
    granted = GaugeMetricFamily("agile_rag_gpu_device_granted_bytes", "GPU memory granted "
                                "now on each card", labels=["device"])
    on = GaugeMetricFamily("agile_rag_gpu_holder_device", "1 for the card each holder's "
                           "grant is on", labels=["model", "device"])
    for card, d in a.devices.items():
        budget.add_metric([card], d["budget"])
        granted.add_metric([card], d["used"])
    for model, card in a.placement.items():
        on.add_metric([model, card], 1)
    yield from (budget, granted, on)


def _route_of(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None:
        return "unmatched"
    resource = info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    """Outermost: counts what the client finally got (errors the inner middleware turned into
    JSON included), and records the request's HTTP span in the trace."""
    metrics: Metrics | None = request.app.get(METRICS)
    if metrics is None:
        return await handler(request)
    t0 = time.monotonic()
    route = _route_of(request)
    metrics.in_flight(route, +1)
    status, outcome = 500, "error"
    try:
        resp = await handler(request)
        status = resp.status
        outcome = "ok" if status < 400 else "error"
        return resp
    except asyncio.CancelledError:
        status, outcome = 499, "cancelled"
        raise
    except web.HTTPException as exc:
        status = exc.status
        outcome = "ok" if status < 400 else "error"
        raise
    finally:
        metrics.in_flight(route, -1)
        model = request.get(MODEL_NAME) or metrics.model_of(request, route)
        _record(metrics, request.method, route, request.path, model, status, outcome, t0,
                time.monotonic(), request.get(REQUEST_ID))


def front_request(app: web.Application, route: str, delta: int) -> None:
    """A request forwarded by an HTTP front process started (+1) or ended (-1) on ``route``:
    the in-progress gauge, as the middleware keeps it for its own."""
    metrics: Metrics | None = app.get(METRICS)
    if metrics is not None:
        metrics.in_flight(route, delta)


def record_request(app: web.Application, method: str, route: str, path: str,
                   model: str | None, body: bytes, status: int, outcome: str, t0: float,
                   t1: float, request_id: str | None, *, front: bool = False) -> None:
    """Count a request served outside this app's middleware (an HTTP front process's:
    http/front_bridge.py) as the middleware counts its own (a request that failed before its
    model was known is labelled with the model its ``body`` names, as there), and trace its
    HTTP span."""
    metrics: Metrics | None = app.get(METRICS)
    if metrics is not None:
        _record(metrics, method, route, path, model or metrics.model_in(route, body), status,
                outcome, t0, t1, request_id, front)


def _record(metrics: Metrics, method: str, route: str, path: str, model: str, status: int,
            outcome: str, t0: float, t1: float, request_id: str | None,
            front: bool = False) -> None:
    tally = metrics.tally
    code = str(status)
    tally.count(metrics.requests_of, (route, model, code))
    if status >= 400:
        tally.count(metrics.errors_of, (route, model, code))
    tally.observe(metrics.latency_of, (route, model), t1 - t0)
    tracer = metrics.server.system.tracer
    if tracer.enabled and not path.startswith(UNTRACED_PREFIXES):
        detail: dict = {"status": status, "path": path}
        if model:
            detail["model"] = model
        if front:
            detail["front"] = True
        tracer.record(TraceEvent(HTTP_ACTOR, f"{method} {route}", request_id, None, t0, t0, t1,
                                 outcome, detail))


async def metrics_handler(request: web.Request) -> web.Response:
    metrics: Metrics = request.app[METRICS]
    return web.Response(body=metrics.expose(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    """The app's metrics (its own registry) and ``GET /metrics``."""
    app[METRICS] = Metrics(app[SERVER])
    app.router.add_get("/metrics", metrics_handler)
