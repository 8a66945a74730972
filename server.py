"""Wires the pieces together: settings, actor system, model actors from liveconfigs.json, HTTP."""
from __future__ import annotations

import asyncio
import logging
import os
import time

import aiofiles
from aiohttp import web

from .actors.config_actor import ConfigActor
from .actors.embedder_actor import EmbedderActor
from .actors.llm_actor import LLMActor
from .actors.model_base import ModelActor
from .actors.reranker_actor import RerankerActor
from .configs import Settings
from .runtime.executor import ModelExecutor
from .runtime.liveconfig import LiveConfig, ModelSpec, parse_text
from .runtime.registry import ModelRegistry
from .runtime.system import ActorSystem
from .runtime.tracing import Tracer

log = logging.getLogger("agile_rag.server")


class Server:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.system = ActorSystem(executor=ModelExecutor(settings.SERVICE_NUM_WORKERS),
                                  tracer=Tracer(settings.TRACE_BUFFER, settings.TRACE_ENABLED))
        self.registry = ModelRegistry()
        self.live: LiveConfig | None = None
        self.config_error: str | None = None
        self.started_at = time.time()
        self.config_actor: ConfigActor | None = None

    def enabled(self, kind: str) -> bool:
        s = self.settings
        return {"llm": s.USE_LLM, "embedder": s.USE_EMBEDDER, "reranker": s.USE_RERANKER}[kind]

    async def read_live_config(self, path: str | None = None) -> LiveConfig:
        path = path or self.settings.LIVECONFIGS_PATH
        async with aiofiles.open(path, encoding="utf-8") as f:
            text = await f.read()
        return parse_text(text, path)

    def make_actor(self, spec: ModelSpec, live: LiveConfig,
                   actor_name: str | None = None) -> ModelActor:
        if spec.kind == "llm":
            return LLMActor(spec, live.llm_params, cache_dir=self.settings.MODEL_CACHE_DIR,
                            actor_name=actor_name)
        if spec.kind == "embedder":
            return EmbedderActor(spec, live.embedder_params, actor_name=actor_name)
        return RerankerActor(spec, live.reranker_params, actor_name=actor_name)

    async def start(self) -> None:
        live = await self.read_live_config()
        for warning in live.warnings:
            log.warning("liveconfigs.json: %s", warning)
        self.live = live
        for kind in ("embedder", "reranker", "llm"):   # small models load first
            names = live.standby[kind]
            if not self.enabled(kind):
                continue
            for name in names:
                actor = self.system.spawn(self.make_actor(live.spec(kind, name), live))
                self.registry.set(kind, name, actor)
        self.config_actor = self.system.spawn(ConfigActor(
            self, debounce_s=self.settings.DEBOUNCE_TIME,
            load_timeout_s=self.settings.MODIFY_TIMEOUT))

    async def stop(self) -> None:
        await self.system.stop_all()

    def models(self) -> list[ModelActor]:
        return [actor for _, _, actor in self.registry.all()]  # type: ignore[misc]


def create_app(settings: Settings) -> web.Application:
    from .http.app import build_app

    server = Server(settings)
    app = build_app(server)

    async def lifecycle(app: web.Application):
        await server.start()
        yield
        await server.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


def run(settings: Settings) -> None:
    logging.basicConfig(level=getattr(logging, str(settings.LOG_LEVEL).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = create_app(settings)
    log.info("AgileRagServer on http://%s:%s (live config %s)", settings.HOST, settings.PORT,
             os.path.abspath(settings.LIVECONFIGS_PATH))
    web.run_app(app, host=settings.HOST, port=settings.PORT, print=None,
                shutdown_timeout=10.0, access_log=None,
                handler_cancellation=True)


