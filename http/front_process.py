"""An HTTP front process: more cores for the HTTP work of small embeddings requests.

With ``FRONT_PROCESSES = N`` (configs.py) the server starts N of these beside itself. Each
listens on the server's own host and port (``SO_REUSEPORT``: the kernel spreads the clients'
connections over the main process and the fronts) and:

- answers ``POST /v1/embeddings`` (and ``/embeddings``) itself, except for the model work: the
  request's raw body goes to the main process in a frame (http/front_frames.py) with every
  other request this front read in the same event-loop turn; the main process checks it,
  runs it through the embedder's actor exactly as its own handler does (traces, metrics,
  errors) and sends back the vectors, which this process writes as JSON or base64;
- passes every other request through to the main process (its HTTP on a Unix socket),
  streaming both ways (chat streams, uploads).

So the main process's event loop pays for a small embeddings request a share of a frame
instead of the whole HTTP exchange, and the HTTP work runs on as many cores as there are
fronts (issue 14: one process served at most ~2,600 one-sentence requests a second on the
H200, its event loop the limit).

It imports neither torch nor the server (it starts in about a second and holds ~50 MB). It
exits when the main process closes the bridge; on SIGTERM it stops listening and exits once
the requests it holds have been answered.

    python -m agile_rag.http.front_process --host H --port P --bridge SOCK --main-http SOCK
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from agile_rag.runtime.errors import InvalidRequest, ServiceError

from .front_frames import Outbox, read_frame
from .vectors import embeddings_body

log = logging.getLogger("agile_rag.front")

#: headers that belong to one connection, not to the request passed on
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host",
                         "content-length"})


def error(err: ServiceError) -> web.Response:
    """An OpenAI-style error this process writes itself (the main process writes the rest)."""
    rid = f"req-front-{os.getpid():x}-{next(_LOCAL_IDS):x}"
    headers = {"x-request-id": rid, FRONT_HEADER: FRONT_ID, **err.headers()}
    return web.Response(body=orjson.dumps(err.to_dict()), status=err.status,
                        content_type="application/json", headers=headers)


def unavailable(message: str) -> ServiceError:
    return ServiceError(message, code="unavailable", status=503)


_LOCAL_IDS = itertools.count(1)
#: a passed-through request body up to this size is read whole and sent with its length;
#: larger ones (uploads) stream through
SMALL_BODY = 1 << 20
#: every answer a front writes says so (which process: its pid), for whoever debugs
FRONT_HEADER = "x-agile-rag-front"
FRONT_ID = str(os.getpid())


class Front:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 main_http: str, max_body: int):
        self.reader = reader
        self.out = Outbox(writer)
        self.main_http = main_http
        self.max_body = max_body
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.session: aiohttp.ClientSession | None = None
        self.closed = False

    async def pump(self) -> None:
        """Answers from the main process to the requests waiting for them, until it closes
        the bridge."""
        try:
            while True:
                frame = await read_frame(self.reader)
                if frame is None:
                    break
                for cid, status, rid, payload in frame:
                    fut = self.waiting.pop(cid, None)
                    if fut is not None and not fut.done():
                        fut.set_result((status, rid, payload))
        finally:
            self.closed = True
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the main process closed the bridge"))
            self.waiting.clear()

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        if self.closed:
            return error(unavailable("The server is shutting down; retry shortly."))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(InvalidRequest(f"The request body is larger than this server's limit "
                                        f"of {self.max_body} bytes.", status=413,
                                        code="request_too_large"))
        cid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[cid] = fut
        self.out.send(("embed", cid, request.path, request.headers.get("x-request-id"),
                       request.headers.get("Authorization", ""), request.content_type or "",
                       t0, body))
        try:
            status, rid, payload = await fut
        except asyncio.CancelledError:             # the client went away
            if self.waiting.pop(cid, None) is not None:
                self.out.send(("cancel", cid))
            raise
        except ConnectionError:
            return error(unavailable("The server is shutting down; retry shortly."))
        headers = {"x-request-id": rid, FRONT_HEADER: FRONT_ID}
        if payload[0] == "ok":
            _, model, fmt, vectors, tokens = payload
            out = embeddings_body(model, fmt, vectors, tokens)
        else:
            _, err, more = payload
            out = orjson.dumps(err)
            headers.update(more)
        return web.Response(body=out, status=status, content_type="application/json",
                            headers=headers)

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Any other request, passed through to the main process and streamed back."""
        session = self.upstream()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if request.remote:
            headers["X-Forwarded-For"] = request.remote
        data: Any = None
        if request.body_exists:
            size = request.content_length
            if size is not None and size <= SMALL_BODY:
                data = await request.read()           # one write upstream, with its length
            else:                                     # uploads: streamed (chunked)
                data = request.content.iter_chunked(1 << 16)
        resp: web.StreamResponse | None = None
        try:
            async with session.request(
                    request.method, URL("http://agile-rag" + request.raw_path, encoded=True),
                    headers=headers, data=data, allow_redirects=False) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in HOP_HEADERS:
                        resp.headers.add(k, v)
                resp.headers[FRONT_HEADER] = FRONT_ID
                if up.headers.get("Content-Length") is not None:
                    resp.content_length = int(up.headers["Content-Length"])
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientConnectionError as exc:
            log.warning("front %d: the main process did not answer %s %s: %s", os.getpid(),
                        request.method, request.path, exc)
            if resp is not None and resp.prepared:      # cut mid-answer: the client sees it
                raise ConnectionResetError("the main process went away mid-answer") from exc
            return error(unavailable("The server is restarting or shutting down; retry "
                                     "shortly."))

    def upstream(self) -> aiohttp.ClientSession:
        """The session to the main process's HTTP (made at start, so that a front's first
        passed-through request does not pay for it)."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.main_http, limit=0),
                timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


async def serve(args: argparse.Namespace) -> None:
    reader, writer = await asyncio.open_unix_connection(args.bridge)
    front = Front(reader, writer, args.main_http, args.max_body)
    front.upstream()
    app = web.Application(client_max_size=args.max_body)
    for prefix in ("/v1", ""):
        app.router.add_post(prefix + "/embeddings", front.embeddings)
    app.router.add_route("*", "/{tail:.*}", front.proxy)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           shutdown_timeout=args.shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_port=True)
    await site.start()
    pump = asyncio.ensure_future(front.pump())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([pump, stopper], return_when=asyncio.FIRST_COMPLETED)
    # stop taking connections; the requests held are answered (the main process keeps the
    # bridge open until this process exits), then the process ends
    await runner.cleanup()
    await front.close()
    stopper.cancel()
    pump.cancel()
    writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agile_rag.http.front_process",
                                description="An HTTP front process of agile-rag-server "
                                            "(started by the server; FRONT_PROCESSES).")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bridge", required=True, help="the main process's frame socket")
    p.add_argument("--main-http", required=True, help="the main process's HTTP Unix socket")
    p.add_argument("--max-body", type=int, default=16 * 1024 * 1024)
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except (ConnectionError, FileNotFoundError) as exc:
        print(f"front process: the main process is not there ({exc})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
