"""What every model route does: pick the actor, bound its queue, ask with a deadline."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from agile_rag.runtime.actor import Actor
from agile_rag.runtime.errors import Overloaded

from .keys import MODEL_NAME, REQUEST_ID


def resolve_model(server, kind: str, name: str | None) -> Actor:
    return server.registry.resolve(kind, name)


async def ask_model(server, actor: Actor, msg: Any, request: web.Request) -> Any:
    request[MODEL_NAME] = actor.spec.name
    return await ask_model_for(server, actor, msg, request[REQUEST_ID])


async def ask_model_for(server, actor: Actor, msg: Any, request_id: str) -> Any:
    """``msg`` to the model, unless its queue is full (503), with the request timeout."""
    settings = server.settings
    if actor.queue_length() >= settings.MAX_QUEUED_PER_MODEL:
        raise Overloaded(f"Model {actor.spec.name!r} has {actor.queue_length()} requests waiting "
                         f"(limit {settings.MAX_QUEUED_PER_MODEL}); retry shortly.")
    return await actor.ask(msg, timeout=settings.REQUEST_TIMEOUT,
                           request_id=request_id, sender="http")
