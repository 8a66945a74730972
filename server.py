"""Wires the pieces together: settings, actor system, model actors from liveconfigs.json, HTTP."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from typing import Any

import aiofiles
from aiohttp import web

from .actors.config_actor import ConfigActor
from .actors.embedder_actor import EmbedderActor
from .actors.llm_actor import LLMActor
from .actors.model_base import ModelActor
from .actors.reranker_actor import RerankerActor
from .configs import Settings, front_processes
from .runtime.executor import (
    ModelExecutor,
    decode_thread_range,
    set_cudnn_attention,
    torch_threads,
)
from .runtime.liveconfig import LiveConfig, ModelSpec, parse_text
from .runtime.registry import ModelRegistry
from .runtime.system import ActorSystem
from .runtime.tracing import Tracer

log = logging.getLogger("agile_rag.server")


class Server:
    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.SWITCH_INTERVAL_S > 0:
            sys.setswitchinterval(settings.SWITCH_INTERVAL_S)
        set_cudnn_attention(settings.CUDNN_ATTENTION)
        self.system = ActorSystem(executor=ModelExecutor(
            settings.SERVICE_NUM_WORKERS, torch_threads(settings.TORCH_THREADS),
            idle_trim_s=settings.IDLE_TRIM_S if settings.IDLE_TRIM_S > 0 else None,
            decode_threads=decode_thread_range(settings.TORCH_THREADS)),
                                  tracer=Tracer.from_settings(settings))
        self.registry = ModelRegistry()
        self.live: LiveConfig | None = None
        self.config_error: str | None = None
        self.started_at = time.time()
        self.config_actor: ConfigActor | None = None
        self.residency_factory = None            # set by start_arbiter() on CUDA machines
        self.fronts: Any = None                  # the HTTP front processes (FRONT_PROCESSES)

    def enabled(self, kind: str) -> bool:
        s = self.settings
        return {"llm": s.USE_LLM, "embedder": s.USE_EMBEDDER, "reranker": s.USE_RERANKER}[kind]

    async def read_live_config(self, path: str | None = None) -> LiveConfig:
        path = path or self.settings.LIVECONFIGS_PATH
        async with aiofiles.open(path, encoding="utf-8") as f:
            text = await f.read()
        return await asyncio.to_thread(parse_text, text, path)   # (a pure-Python parser)

    def make_actor(self, spec: ModelSpec, live: LiveConfig,
                   actor_name: str | None = None) -> ModelActor:
        if spec.kind == "llm":
            actor = LLMActor(spec, live.llm_params, cache_dir=self.settings.MODEL_CACHE_DIR,
                             actor_name=actor_name)
        elif spec.kind == "embedder":
            actor = EmbedderActor(spec, live.embedder_params, actor_name=actor_name)
        else:
            actor = RerankerActor(spec, live.reranker_params, actor_name=actor_name)
        actor.residency_factory = self.residency_factory
        return actor

    def start_arbiter(self) -> None:
        """On a CUDA machine: the VRAM arbiter, and pinned-host residency for every model."""
        import torch

        if not torch.cuda.is_available():
            log.info("no CUDA device: every model computes on the CPU")
            return
        from .actors.vram_arbiter import VRAMArbiter
        from .actors.vram_devices import device_budgets
        from .runtime.residency import WeightResidency

        budgets = device_budgets(self.settings.TOTAL_CUDA_MEMORY,
                                 self.settings.MEMORY_REDUNDANCY)
        self.system.spawn(VRAMArbiter(budgets))
        self.residency_factory = WeightResidency
        log.info("GPU budget for models: %s", ", ".join(
            f"{card} {b / 2**20:.0f} MB" for card, b in budgets.items()))

    async def start(self) -> None:
        live = await self.read_live_config()
        for warning in live.warnings:
            log.warning("liveconfigs.json: %s", warning)
        self.live = live
        self.start_arbiter()
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
        self.system.tracer.close()              # flush the JSONL trace file, if any

    def models(self) -> list[ModelActor]:
        return [actor for _, _, actor in self.registry.all()]  # type: ignore[misc]


def create_app(settings: Settings, fronts=None) -> web.Application:
    """The app; with ``fronts`` (an :class:`~.http.front_bridge.FrontBridge`) its front
    processes start once the models are set up and stop before them."""
    from .http.app import build_app

    server = Server(settings)
    server.fronts = fronts
    app = build_app(server)

    async def lifecycle(app: web.Application):
        await server.start()
        if fronts is not None:
            fronts.bind(server, app)
            await fronts.start()
        yield
        if fronts is not None:
            await fronts.stop()
        await server.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


def run(settings: Settings) -> None:
    logging.basicConfig(level=getattr(logging, str(settings.LOG_LEVEL).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sock, fronts = None, None
    count = front_processes(settings.FRONT_PROCESSES)
    if count > 0:
        if hasattr(socket, "SO_REUSEPORT"):
            from .http.front_bridge import FrontBridge
            sock = shared_socket(settings.HOST, settings.PORT)
            host, port = sock.getsockname()[:2]
            fronts = FrontBridge(count, host, port)
        elif settings.FRONT_PROCESSES != "auto":
            log.warning("FRONT_PROCESSES needs SO_REUSEPORT (Linux); serving without fronts")
    app = create_app(settings, fronts)
    log.info("AgileRagServer on http://%s:%s (live config %s)", settings.HOST,
             sock.getsockname()[1] if sock is not None else settings.PORT,
             os.path.abspath(settings.LIVECONFIGS_PATH))
    if sock is None:
        web.run_app(app, host=settings.HOST, port=settings.PORT, print=None,
                    shutdown_timeout=settings.SHUTDOWN_TIMEOUT, access_log=None,
                    handler_cancellation=True)
    else:
        assert fronts is not None
        web.run_app(app, sock=sock, path=fronts.http_path, print=None,
                    shutdown_timeout=settings.SHUTDOWN_TIMEOUT, access_log=None,
                    handler_cancellation=True)


def shared_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound with SO_REUSEPORT so that its front processes
    can listen on the same address (the kernel spreads new connections over them all)."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    return sock


