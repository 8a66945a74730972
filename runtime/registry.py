"""Which actor serves a request's model name, with the seed's rule: a name that is not in the
standby list goes to the first standby model of that kind.

The registry is written only by the server's start-up and the config actor, on the event loop;
the HTTP handlers only read it.
"""
from __future__ import annotations

from ..runtime.errors import ModelNotFound
from .actor import Actor

KIND_WORDS = {"llm": "chat model", "embedder": "embedding model", "reranker": "rerank model"}


class ModelRegistry:
    def __init__(self) -> None:
        self.order: dict[str, list[str]] = {"llm": [], "embedder": [], "reranker": []}
        self.actors: dict[str, dict[str, Actor]] = {"llm": {}, "embedder": {}, "reranker": {}}

    def set(self, kind: str, name: str, actor: Actor) -> None:
        if name not in self.actors[kind]:
            self.order[kind].append(name)
        self.actors[kind][name] = actor

    def remove(self, kind: str, name: str) -> Actor | None:
        if name in self.order[kind]:
            self.order[kind].remove(name)
        return self.actors[kind].pop(name, None)

    def set_order(self, kind: str, names: list[str]) -> None:
        self.order[kind] = [n for n in names if n in self.actors[kind]]

    def resolve(self, kind: str, name: str | None) -> Actor:
        actors = self.actors[kind]
        if name and name in actors:
            return actors[name]
        if not self.order[kind]:
            raise ModelNotFound(f"no {KIND_WORDS[kind]} is configured on this server "
                                f"(add one to the standby list in liveconfigs.json)",
                                param="model")
        return actors[self.order[kind][0]]

    def all(self) -> list[tuple[str, str, Actor]]:
        return [(kind, name, self.actors[kind][name])
                for kind in self.order for name in self.order[kind]]
