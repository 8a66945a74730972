"""The main process's side of the HTTP front processes (http/front_process.py): starts them,
restarts one that dies, and serves the embeddings requests they forward.

A forwarded request goes the way the main process's own handler sends it (http/embeddings.py):
the same API-key check, body parsing and checks, the same ask of the embedder's actor under the
request timeout and the queue limit, the same OpenAI errors, the same request id (the
client's ``x-request-id`` when sane), the same metrics and HTTP trace span (its start is the
moment the front read the request). Only the JSON of the answer is written in the front.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
from typing import Any

from agile_rag.runtime.errors import ServiceError

from .common import ask_model_for
from .embeddings import prepare_embed
from .errors import bad_api_key, internal_error, new_request_id
from .front_frames import Outbox, read_frame
from .metrics import front_request, record_request
from .parsing import bearer_in, check_content_type, parse_json_body

log = logging.getLogger("agile_rag.front")

#: a front that dies is started again after this long (doubling to RESTART_MAX_S while it
#: keeps dying within a minute)
RESTART_S = 1.0
RESTART_MAX_S = 30.0


class FrontBridge:
    """``count`` front processes on ``host``:``port`` beside the main process, which also
    serves HTTP on the Unix socket ``self.http_path`` (where the fronts pass every other
    request)."""

    def __init__(self, count: int, host: str, port: int):
        self.server: Any = None
        self.app: Any = None
        self.count = count
        self.host = host
        self.port = port
        self.folder = tempfile.mkdtemp(prefix="agile-rag-fronts-")     # mode 0700
        self.http_path = os.path.join(self.folder, "http.sock")
        self.bridge_path = os.path.join(self.folder, "bridge.sock")
        self.connected = 0
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self._unix: asyncio.AbstractServer | None = None
        self._keepers: list[asyncio.Task] = []

    def bind(self, server, app) -> None:
        self.server, self.app = server, app

    # -- the processes
    async def start(self) -> None:
        self._unix = await asyncio.start_unix_server(self._connected, path=self.bridge_path)
        self._keepers = [asyncio.ensure_future(self._keep(i)) for i in range(self.count)]
        log.info("starting %d HTTP front process(es) on %s:%s", self.count, self.host, self.port)

    async def _keep(self, index: int) -> None:
        """Front ``index``: started, and started again when it dies (not on shutdown)."""
        settings = self.server.settings
        wait = RESTART_S
        while not self.stopping:
            t0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agile_rag.http.front_process", "--host", self.host,
                "--port", str(self.port), "--bridge", self.bridge_path,
                "--main-http", self.http_path, "--max-body", str(settings.MAX_BODY_BYTES),
                "--shutdown-timeout", str(settings.SHUTDOWN_TIMEOUT),
                "--log-level", str(settings.LOG_LEVEL))
            self.procs[index] = proc
            rc = await proc.wait()
            self.procs.pop(index, None)
            if self.stopping:
                return
            wait = RESTART_S if time.monotonic() - t0 > 60 else min(2 * wait, RESTART_MAX_S)
            log.warning("HTTP front process %d (pid %d) exited with %s; starting it again in "
                        "%.0f s", index, proc.pid, rc, wait)
            await asyncio.sleep(wait)

    async def stop(self) -> None:
        """The fronts stop listening and answer what they hold (this process still serves
        them), then exit; killed after the shutdown timeout."""
        self.stopping = True
        procs = list(self.procs.values())
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        if procs:
            await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs],
                timeout=self.server.settings.SHUTDOWN_TIMEOUT + 5)
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        for task in self._keepers:
            task.cancel()
        if self._unix is not None:
            self._unix.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- the requests
    async def _connected(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        out = Outbox(writer)
        tasks: dict[int, asyncio.Task] = {}
        self.connected += 1
        try:
            while True:
                try:
                    frame = await read_frame(reader)
                except (ConnectionError, ValueError, EOFError, pickle.UnpicklingError) as exc:
                    log.warning("an HTTP front process sent a broken frame: %r", exc)
                    break
                if frame is None:
                    break
                for msg in frame:
                    if msg[0] == "embed":
                        cid = msg[1]
                        task = asyncio.ensure_future(self._embed(out, *msg[1:]))
                        tasks[cid] = task
                        task.add_done_callback(lambda _t, c=cid: tasks.pop(c, None))
                    elif msg[0] == "cancel":
                        task = tasks.get(msg[1])
                        if task is not None:
                            task.cancel()
        finally:
            self.connected -= 1
            for task in list(tasks.values()):
                task.cancel()
            writer.close()

    async def _embed(self, out: Outbox, cid: int, path: str, given_id: str | None, auth: str,
                     ctype: str, t0: float, body: bytes) -> None:
        server = self.server
        rid = new_request_id(given_id)
        model: str | None = None
        status, outcome = 500, "error"
        front_request(self.app, path, +1)
        try:
            keys = server.settings.API_KEYS
            if keys and not bearer_in(auth, keys):
                raise bad_api_key()
            check_content_type(ctype)
            actor, msg, fmt = prepare_embed(server, parse_json_body(body))
            model = actor.spec.name
            result = await ask_model_for(server, actor, msg, rid)
            status, outcome = 200, "ok"
            out.send((cid, 200, rid, ("ok", model, fmt, result.vectors, result.prompt_tokens)))
        except ServiceError as err:
            status = err.status
            out.send((cid, status, rid, ("error", err.to_dict(), err.headers())))
        except asyncio.CancelledError:
            status, outcome = 499, "cancelled"
            raise
        except Exception:  # noqa: BLE001 - never a stack trace in the body
            log.exception("unhandled error on POST %s (request %s, from a front)", path, rid)
            err = internal_error(rid)
            out.send((cid, 500, rid, ("error", err.to_dict(), err.headers())))
        finally:
            front_request(self.app, path, -1)
            record_request(self.app, "POST", path, path, model, body, status, outcome, t0,
                           time.monotonic(), rid, front=True)
