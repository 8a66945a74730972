"""The ConfigActor: watches liveconfigs.json, validates the whole file, diffs it against the
running config and turns the difference into events for the model actors.

Watching is by polling the file's stat (inode, size, mtime) every ``poll_s``: it sees editors
that save by writing a new file and renaming it over the old one, and works on network and
container mounts where inotify does not. A change is applied after ``debounce_s`` of quiet.

Events, in order: models removed from a standby list (unregistered at once, so their name
falls back to the first standby model; stopped once their queued work is done), models
added (loaded, then registered), models whose path changed (the new version loads beside the
old one, then takes new requests; in-flight requests finish on the old version), settings
that need no reload (device, cuda_thres, idle_on_cpu, max_tokens, *_params), standby order,
and reset_flags. An invalid file changes nothing; the reason is kept for /health. A model that
fails to load is reported and, when it replaces an old version, the old one keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..runtime import config_edit
from ..runtime.actor import CONTROL, Actor, Envelope
from ..runtime.errors import InvalidRequest
from ..runtime.liveconfig import KINDS, LiveConfig, LiveConfigError, ModelSpec, validate
from .messages import Describe, Drain, EditConfig, ReloadConfig, RevokeAllFlex, UpdateModel
from .states import ModelStatus

if TYPE_CHECKING:
    from .model_base import ModelActor

log = logging.getLogger("agile_rag.config")
PARAMS_OF = {"llm": "llm_params", "embedder": "embedder_params", "reranker": "reranker_params"}
RETIRE_POLL_S = 0.05          # a retiring model's unanswered requests are checked this often


@dataclass
class _Poll:
    """Private timer tick: look at the file's stat."""


class ConfigActor(Actor):
    def __init__(self, server, *, poll_s: float = 0.25, debounce_s: float = 0.5,
                 load_timeout_s: float = 600.0, name: str = "config"):
        super().__init__(name)
        self.server = server
        self.poll_s = poll_s
        self.debounce_s = debounce_s
        self.load_timeout_s = load_timeout_s
        self.path = server.settings.LIVECONFIGS_PATH
        self.seen_stat: tuple | None = None
        self.changed_at: float | None = None
        self.generation: dict[str, int] = {}
        self.history: list[dict] = []        # applied changes and refusals, newest last
        self._retiring: set[asyncio.Task] = set()

    async def on_start(self) -> None:
        self.seen_stat = self._stat()
        self._schedule()

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _schedule(self) -> None:
        if not self.stopped:
            asyncio.get_running_loop().call_later(self.poll_s, self._tick)

    def _tick(self) -> None:
        if not self.stopped:
            self.tell(_Poll(), priority=CONTROL)

    async def handle(self, msg: Any, env: Envelope) -> Any:
        if isinstance(msg, _Poll):
            try:
                await self._poll()
            finally:
                self._schedule()
            return None
        if isinstance(msg, ReloadConfig):
            self.seen_stat = self._stat()
            return await self.reload()
        if isinstance(msg, EditConfig):
            await self._edit(msg)
            self.seen_stat = self._stat()
            return await self.reload()
        raise TypeError(f"config actor cannot handle {type(msg).__name__}")

    async def _poll(self) -> None:
        stat = self._stat()
        now = time.monotonic()
        if stat != self.seen_stat:
            self.seen_stat = stat
            self.changed_at = now            # wait for quiet: editors write in several steps
            return
        if self.changed_at is not None and now - self.changed_at >= self.debounce_s:
            self.changed_at = None
            if stat is None:
                self._refuse(f"{self.path} is missing; the running config stays")
                return
            try:
                await self.reload()
            except InvalidRequest:
                pass                          # already recorded and logged

    # ---- applying a new file ------------------------------------------------------------
    async def reload(self) -> list[str]:
        try:
            new = await self.server.read_live_config(self.path)
        except LiveConfigError as exc:
            self._refuse("; ".join(exc.problems))
            raise InvalidRequest(f"liveconfigs.json was not applied: {exc}",
                                 code="invalid_live_config") from None
        except OSError as exc:
            self._refuse(f"cannot read {self.path}: {exc}")
            raise InvalidRequest(f"cannot read {self.path}: {exc}") from None
        events, failures = await self.apply(new)
        for w in new.warnings:
            log.warning("liveconfigs.json: %s", w)
        self.server.config_error = "; ".join(failures) or None
        self.history.append({"time": time.time(), "applied": events, "failed": failures})
        for e in events:
            log.info("liveconfigs.json: %s", e)
        for f in failures:
            log.error("liveconfigs.json: %s", f)
        return events + [f"FAILED: {f}" for f in failures]

    async def _edit(self, msg: EditConfig) -> None:
        """Edit the file for the admin API: validate first, keep a backup, write atomically.
        Only what changed is rewritten: comments and layout stay (runtime/config_edit.py);
        liveconfigs.json.bak holds the file as it was."""
        import aiofiles
        import json5

        async with aiofiles.open(self.path, encoding="utf-8") as f:
            old_text = await f.read()
        try:
            data = await asyncio.to_thread(json5.loads, old_text)
        except ValueError as exc:
            raise InvalidRequest(f"liveconfigs.json cannot be parsed, fix it first: {exc}") \
                from None
        msg.edit(data)
        try:
            validate(data, self.path)
        except LiveConfigError as exc:
            raise InvalidRequest("the change would make liveconfigs.json invalid, so nothing "
                                 "was written: " + "; ".join(exc.problems),
                                 code="invalid_live_config") from None
        text, kept = await asyncio.to_thread(config_edit.rewrite, old_text, data)
        if not kept:
            log.warning("liveconfigs.json rewritten as plain JSON: its comments are in %s.bak",
                        self.path)
        async with aiofiles.open(self.path + ".bak", "w", encoding="utf-8") as f:
            await f.write(old_text)
        tmp = self.path + ".tmp"
        async with aiofiles.open(tmp, "w", encoding="utf-8") as f:
            await f.write(text)
        os.replace(tmp, self.path)
        log.info("liveconfigs.json edited through the admin API: %s", msg.why)

    def _refuse(self, why: str) -> None:
        log.error("liveconfigs.json not applied, the running config stays: %s", why)
        self.server.config_error = f"liveconfigs.json not applied: {why}"
        self.history.append({"time": time.time(), "refused": why})

    async def apply(self, new: LiveConfig) -> tuple[list[str], list[str]]:
        server, registry = self.server, self.server.registry
        old = server.live
        events: list[str] = []
        failures: list[str] = []
        for kind in KINDS:
            enabled = server.enabled(kind)
            running = dict(registry.actors[kind])
            wanted = new.models[kind] if enabled else {}
            params = getattr(new, PARAMS_OF[kind])
            for name in running:
                if name not in wanted:
                    actor = registry.remove(kind, name)
                    self._retire_later(actor)
                    events.append(f"removed {kind} {name}")
            for name, spec in wanted.items():
                actor = running.get(name)
                if actor is None:
                    ok = await self._start_model(spec, new, failures)
                    if ok:
                        events.append(f"added {kind} {name}")
                elif actor.spec.load_key() != spec.load_key():
                    if await self._start_model(spec, new, failures, replacing=actor):
                        events.append(f"reloaded {kind} {name} from {spec.path}")
                elif actor.spec != spec or actor.params != params:
                    what = _what_changed(actor, spec, params)
                    await actor.ask(UpdateModel(spec=spec, params=params), priority=CONTROL,
                                    timeout=self.load_timeout_s)
                    events.append(f"updated {kind} {name}: {what}")
            registry.set_order(kind, list(wanted))
        if old is not None and new.reset_flags != old.reset_flags:
            arbiter = server.system.actors.get("vram-arbiter")
            if arbiter is not None:
                arbiter.tell(RevokeAllFlex(reason="reset_flags changed in liveconfigs.json"),
                             priority=CONTROL)
            events.append("reset_flags: every flex GPU grant revoked, stuck waits failed")
        server.live = new
        return events, failures

    async def _start_model(self, spec: ModelSpec, live: LiveConfig, failures: list[str],
                           replacing: Actor | None = None) -> bool:
        server = self.server
        gen = self.generation.get(spec.name, 1) + 1
        self.generation[spec.name] = gen
        actor = server.make_actor(spec, live, actor_name=f"{spec.name}@{gen}")
        server.system.spawn(actor)
        try:
            state = await actor.ask(Describe(), priority=CONTROL, timeout=self.load_timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported, old version keeps serving
            state = None
            error = str(exc)
        else:
            error = state.error
        if state is None or state.state != ModelStatus.READY:
            await server.system.stop(actor.name)
            keep = "; the old version keeps serving" if replacing is not None else ""
            failures.append(f"{spec.kind} {spec.name} failed to load from {spec.path}: "
                            f"{error}{keep}")
            return False
        server.registry.set(spec.kind, spec.name, actor)
        if replacing is not None:
            self._retire_later(replacing)
        return True

    def _retire_later(self, actor: Actor) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(actor))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, actor: Actor) -> None:
        """Stop an actor once the requests already queued for it have been answered: its
        mailbox up to a Drain, then whatever it still holds outside the mailbox (an LLM's
        chats in its batch, an encoder's running job), which its queue_length() counts.
        Stopping it earlier would fail requests it had accepted."""
        timeout = self.server.settings.REQUEST_TIMEOUT
        deadline = time.monotonic() + timeout
        try:
            await actor.ask(Drain(), timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s did not drain cleanly: %s", actor.name, exc)
        while not actor.stopped and actor.queue_length() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(RETIRE_POLL_S)
        if not actor.stopped and actor.queue_length() > 0:
            log.warning("%s still had %d request(s) unanswered after %gs; stopping it",
                        actor.name, actor.queue_length(), timeout)
        await self.server.system.stop(actor.name)


def _what_changed(actor: ModelActor, spec: ModelSpec, params: dict) -> str:
    parts = [f"device={spec.placement!r}"] if actor.spec.placement != spec.placement else []
    parts += [f"{k}={getattr(spec, k)!r}" for k in ("max_tokens", "cuda_thres", "idle_on_cpu",
                                                     "size_est")
              if getattr(actor.spec, k) != getattr(spec, k)]
    parts += [f"{k}={v!r}" for k, v in params.items()
              if k not in actor.params or actor.params[k] != v]
    # a key taken out of *_params: the model goes back to its built-in default for it
    parts += [f"{k} back to its default (was {v!r})" for k, v in actor.params.items()
              if k not in params]
    return ", ".join(parts) or "no visible change"
