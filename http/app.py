"""The aiohttp application: routes and middlewares (metrics; request ids, API keys and errors
in one; the admin guard)."""
from __future__ import annotations

from aiohttp import web

from . import admin, chat, debug, embeddings, info, metrics, rerank
from .errors import OPEN_PATHS, error_middleware
from .keys import SERVER

__all__ = ["OPEN_PATHS", "build_app"]


def build_app(server) -> web.Application:
    app = web.Application(client_max_size=server.settings.MAX_BODY_BYTES,
                          middlewares=[metrics.metrics_middleware, error_middleware,
                                       admin.admin_guard])
    app[SERVER] = server
    r = app.router
    r.add_get("/", info.index)
    r.add_get("/health", info.health)
    for prefix in ("/v1", ""):
        r.add_post(prefix + "/chat/completions", chat.chat_completions)
        r.add_post(prefix + "/completions", chat.completions)
        r.add_post(prefix + "/embeddings", embeddings.embeddings)
        r.add_post(prefix + "/rerank", rerank.rerank)
        r.add_get(prefix + "/models", info.list_models)
        r.add_get(prefix + "/models/{model_id}", info.get_model)
    r.add_post("/v2/rerank", rerank.rerank)           # Cohere v2 (LiteLLM's Cohere client)
    admin.add_routes(app)
    debug.add_routes(app)
    metrics.add_routes(app)
    return app
