"""The frames between the main process and its HTTP front processes (http/front_bridge.py,
http/front_process.py): a 4-byte big-endian length, then a pickle (protocol 5) of a list of
messages, so that one frame carries every message one side had ready in one event-loop turn.

Front to main::

    ("embed", cid, path, x_request_id, authorization, content_type, t0, body)
                                       # a POST /v1/embeddings (or /embeddings)
    ("cancel", cid)                    # its client went away

Main to front::

    (cid, status, request_id, ("ok", model, fmt, vectors, prompt_tokens))
    (cid, status, request_id, ("error", error_body, headers))

``cid`` numbers a front's requests; ``t0`` is the front's ``time.monotonic()`` when the request
came in (one clock for every process of the machine); ``body`` the request's raw bytes, parsed
and checked by the main process exactly as its own handler does. Pickle crosses only a Unix
socket in a folder that only this user can open, between processes of one server.

Imports neither torch nor the server."""
from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

HEAD = struct.Struct(">I")
#: a frame larger than this is a broken peer, not a message
MAX_FRAME = 1 << 31


def pack(messages: list) -> bytes:
    data = pickle.dumps(messages, protocol=5)
    return HEAD.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> list[Any] | None:
    """The next frame's messages; None when the peer closed."""
    try:
        head = await reader.readexactly(HEAD.size)
        (n,) = HEAD.unpack(head)
        if n > MAX_FRAME:
            raise ConnectionError(f"a frame of {n} bytes")
        return pickle.loads(await reader.readexactly(n))
    except asyncio.IncompleteReadError:
        return None


class Outbox:
    """Messages written as one frame at the end of the event loop's turn."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.pending: list = []

    def send(self, message: Any) -> None:
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(message)

    def flush(self) -> None:
        messages, self.pending = self.pending, []
        if messages and not self.writer.is_closing():
            self.writer.write(pack(messages))
