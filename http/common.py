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
    settings = server.settings
    request[MODEL_NAME] = actor.spec.name
    if actor.queue_length() >= settings.MAX_QUEUED_PER_MODEL:
        raise Overloaded(f"Model {actor.spec.name!r} has {actor.queue_length()} requests waiting "
                         f"(limit {settings.MAX_QUEUED_PER_MODEL}); retry shortly.")
    return await actor.ask(msg, timeout=settings.REQUEST_TIMEOUT,
                           request_id=request[REQUEST_ID], sender="http")
