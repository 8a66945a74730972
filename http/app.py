"""The aiohttp application: routes, error/request-id middleware, optional API keys."""
from __future__ import annotations

from aiohttp import web

from agile_rag.runtime.errors import Unauthorized

from . import admin, chat, debug, embeddings, info, metrics, rerank
from .errors import error_middleware, error_response
from .keys import SERVER
from .parsing import bearer_matches

OPEN_PATHS = {"/", "/health"}


@web.middleware
async def auth_middleware(request: web.Request, handler):
    keys = request.app[SERVER].settings.API_KEYS
    if keys and request.path not in OPEN_PATHS and not request.path.startswith("/admin"):
        if not bearer_matches(request, keys):
            return error_response(Unauthorized(
                "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'."),
                request)
    return await handler(request)


def build_app(server) -> web.Application:
    app = web.Application(client_max_size=server.settings.MAX_BODY_BYTES,
                          middlewares=[metrics.metrics_middleware, error_middleware,
                                       auth_middleware,
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
