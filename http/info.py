"""GET /v1/models, GET /v1/models/{id}, GET /health, GET / .

These read each actor's state snapshot directly (read-only, on the loop) instead of asking,
so they answer at once even while every model is busy.
"""
from __future__ import annotations

import time

from aiohttp import web

from agile_rag.actors.states import ModelStatus
from agile_rag.runtime.errors import ModelNotFound

from .errors import json_response
from .keys import SERVER

KIND_TYPE = {"llm": "chat", "embedder": "embedding", "reranker": "rerank"}


def _model_card(server, kind: str, name: str) -> dict:
    return {"id": name, "object": "model", "created": int(server.started_at),
            "owned_by": "agile-rag-server", "type": KIND_TYPE[kind]}


async def list_models(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    data = [_model_card(server, kind, name) for kind, name, _ in server.registry.all()]
    return json_response({"object": "list", "data": data}, request=request)


async def get_model(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    wanted = request.match_info["model_id"]
    for kind, name, _ in server.registry.all():
        if name == wanted:
            return json_response(_model_card(server, kind, name), request=request)
    raise ModelNotFound(f"The model {wanted!r} does not exist on this server.", param="model")


async def health(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    models = {}
    states: set[ModelStatus] = set()
    for kind, name, actor in server.registry.all():
        s = actor.describe()
        states.add(s.state)
        models[name] = {"kind": kind, "state": s.state, "device": s.device,
                        "config_device": s.config_device, "queue_length": s.queue_length,
                        "weight_bytes": s.weight_bytes, "error": s.error,
                        "gpu_mode": s.gpu_mode, "gpu": s.gpu}
    if ModelStatus.FAILED in states or server.config_error:
        status = "degraded"
    elif ModelStatus.LOADING in states:
        status = "loading"
    else:
        status = "ok"
    arbiter = server.system.actors.get("vram-arbiter")
    gpus = arbiter.state().devices if arbiter is not None and hasattr(arbiter, "state") \
        else {}
    body = {"status": status, "uptime_s": round(time.time() - server.started_at, 1),
            "models": models, "config_error": server.config_error, "gpus": gpus}
    fronts = getattr(server, "fronts", None)
    if fronts is not None:          # FRONT_PROCESSES: how many are connected now
        body["http_fronts"] = {"configured": fronts.count, "running": fronts.connected}
    return json_response(body, request=request)


async def index(request: web.Request) -> web.Response:
    return json_response({"name": "AgileRagServer", "endpoints": [
        "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings",
        "POST /v1/rerank", "POST /rerank", "POST /v2/rerank", "GET /v1/models", "GET /health",
        "GET /metrics"]}, request=request)
