"""GET /debug/traces: read the actors' trace events. GET /debug/stacks: sample the server's
threads (runtime/stack_sampler.py).

- ``?request_id=ID``: one request's events in order, each with readable times (offset from the
  request's start, queue wait, run time, phases), and a ``timeline`` that says where the time
  went: queue wait, GPU grant wait, swap, compute, reply/stream. The id is the one every
  response carries in ``x-request-id`` (send your own ``x-request-id`` to choose it).
- ``?since=SECONDS`` (default 60): every event that ended in that window, as JSON.
- ``format=chrome`` (with either): the Chrome trace-event format that Perfetto
  (https://ui.perfetto.dev) and chrome://tracing open, one track per actor.
"""
from __future__ import annotations

import asyncio
import math

import orjson
from aiohttp import web

from agile_rag.runtime import stack_sampler
from agile_rag.runtime.errors import InvalidRequest
from agile_rag.runtime.tracing import chrome_trace, event_view, request_timeline

from .errors import json_response
from .keys import REQUEST_ID, SERVER

MAX_SINCE_S = 7 * 24 * 3600.0


def _number(q, name: str, default: float, lo: float, hi: float, *,
            above: bool = False) -> float:
    """Query parameter ``name`` as a number in ``[lo, hi]`` (``(lo, hi]`` with ``above``);
    ``default`` when absent; a 400 in OpenAI's format otherwise."""
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not ((lo < v if above else lo <= v) and v <= hi):
        raise InvalidRequest(f"'{name}' must be a number {'above' if above else 'from'} "
                             f"{lo:g} up to {hi:g}; got {raw!r}.", param=name,
                             code="invalid_value")
    return v


def _chrome_response(data: dict, request: web.Request) -> web.Response:
    resp = web.Response(body=orjson.dumps(data, default=str,
                                          option=orjson.OPT_SERIALIZE_NUMPY),
                        content_type="application/json")
    resp.headers["x-request-id"] = request[REQUEST_ID]
    return resp


async def traces(request: web.Request) -> web.Response:
    tracer = request.app[SERVER].system.tracer
    q = request.query
    fmt = q.get("format", "json")
    if fmt not in ("json", "chrome"):
        raise InvalidRequest(f"'format' must be 'json' or 'chrome'; got {fmt!r}.",
                             param="format", code="invalid_value")
    if not tracer.enabled:
        raise InvalidRequest("Tracing is off on this server (TRACE_ENABLED = False in its "
                             "configs); turn it on and restart to read traces.", status=404,
                             code="tracing_disabled")
    rid = q.get("request_id")
    if rid:
        events = tracer.for_request(rid)
        if not events:
            raise InvalidRequest(
                f"No trace events for request id {rid!r}. Every response carries its id in the "
                f"x-request-id header; this server keeps the last {tracer.capacity} events in "
                "memory (TRACE_BUFFER), so older requests are gone.", status=404,
                param="request_id", code="trace_not_found")
        if fmt == "chrome":
            return _chrome_response(chrome_trace(events, tracer.wall_offset), request)
        t0 = events[0].enqueued
        return json_response({"object": "trace", "request_id": rid,
                              "timeline": request_timeline(events),
                              "events": [event_view(e, t0, tracer.wall_offset) for e in events]},
                             request=request)
    since = _number(q, "since", 60.0, 0.0, MAX_SINCE_S, above=True)     # seconds
    events = tracer.window(since)            # a copy, taken on the loop
    if fmt == "chrome":
        data = await asyncio.to_thread(chrome_trace, events, tracer.wall_offset)
        return _chrome_response(data, request)
    t0 = events[0].enqueued if events else 0.0
    return json_response({"object": "list", "since_s": since, "count": len(events),
                          "events": [event_view(e, t0, tracer.wall_offset) for e in events]},
                         request=request)


async def stacks(request: web.Request) -> web.Response:
    """``?seconds=S`` (default 5) at ``?hz=H`` (default 200): per thread, its CPU seconds and
    most frequent Python stacks over the window (runtime/stack_sampler.py); answers when the
    window ends."""
    q = request.query
    seconds = _number(q, "seconds", 5.0, 0.1, stack_sampler.MAX_SECONDS)
    hz = _number(q, "hz", 200.0, 1.0, stack_sampler.MAX_HZ)
    data = await asyncio.to_thread(stack_sampler.sample, seconds, hz)
    return json_response({"object": "stacks", **data}, request=request)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/debug/traces", traces)
    app.router.add_get("/debug/stacks", stacks)
