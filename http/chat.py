"""POST /v1/chat/completions and the legacy POST /v1/completions (LlamaIndex's OpenAILike)."""
from __future__ import annotations

import asyncio
import time
import uuid

import orjson
from aiohttp import web

from agile_rag.actors.messages import Chat, ChatResult, TokenStream
from agile_rag.runtime.errors import InvalidRequest, ServiceError

from .common import ask_model, resolve_model
from .errors import json_response
from .keys import REQUEST_ID, SERVER
from .parsing import Fields, read_json

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
PING_EVERY_S = 15.0


def _content_text(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                parts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(f"messages[{i}].content has a part of type {kind!r}; "
                                     "this server's models take text only.",
                                     param=f"messages[{i}].content")
        return "".join(parts)
    raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts.",
                         param=f"messages[{i}].content", code="invalid_type")


def parse_messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'messages' must be a non-empty array of {role, content} objects.",
                             param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with 'role' and 'content'.",
                                 param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of "
                                 f"{', '.join(sorted(ROLES))}; got {role!r}.",
                                 param=f"messages[{i}].role")
        if role == "developer":
            role = "system"
        elif role in ("tool", "function"):
            role = "user"
        out.append({"role": role, "content": _content_text(m.get("content"), i)})
    return out


def parse_generation(f: Fields, params: dict) -> dict:
    temperature = f.number("temperature", None, lo=0, hi=2)
    if temperature is None:
        temperature = float(params.get("default_temp", 0.5))
    if params.get("force_0_temp"):
        temperature = 0.0
    max_tokens = f.integer("max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = f.integer("max_tokens", None, lo=1)
    stop = f.raw("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise InvalidRequest("'stop' must be a string or an array of at most 16 strings.",
                             param="stop")
    n = f.integer("n", 1)
    if n != 1:
        raise InvalidRequest("Only n=1 is supported.", param="n", code="unsupported_value")
    return {"temperature": temperature, "top_p": f.number("top_p", 1.0, lo=0, hi=1) or 1.0,
            "max_tokens": max_tokens, "stop": [s for s in stop if s],
            "seed": f.integer("seed", None)}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    server = request.app[SERVER]
    f = Fields(await read_json(request))
    actor = resolve_model(server, "llm", f.string("model"))
    if chat:
        messages, prompt = parse_messages(f.required("messages")), None
    else:
        prompt = f.required("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidRequest("'prompt' must be a string (or an array of one string).",
                                 param="prompt")
        messages = None
    generation = parse_generation(f, actor.params)
    stream = TokenStream() if f.boolean("stream", False) else None
    msg = Chat(messages=messages, prompt=prompt, stream=stream, **generation)
    include_usage = bool(f.obj("stream_options").get("include_usage", False))
    ids = "chatcmpl-" if chat else "cmpl-"
    reply = _Reply(ids + uuid.uuid4().hex[:24], actor.spec.name, chat)
    if stream is None:
        try:
            result: ChatResult = await ask_model(server, actor, msg, request)
        finally:
            msg.cancel.set()                      # the client went away: stop generating
        return json_response(reply.whole(result), request=request)
    return await _stream(request, server, actor, msg, stream, reply, include_usage)


async def _stream(request, server, actor, msg: Chat, stream: TokenStream, reply: _Reply,
                  include_usage: bool) -> web.StreamResponse:
    task = asyncio.ensure_future(ask_model(server, actor, msg, request))
    task.add_done_callback(lambda t: stream.push(
        asyncio.CancelledError() if t.cancelled() else (t.exception() or t.result())))
    resp = None
    try:
        first = await stream.get()
        if isinstance(first, BaseException):
            raise first                              # before any byte went out: a plain error
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", "x-request-id": request[REQUEST_ID]})
        await resp.prepare(request)
        await resp.write(reply.chunk({"role": "assistant", "content": ""}))
        chunk_size = int(actor.params.get("stream_chunk_size") or 0)
        pending = ""
        item = first
        while True:
            if isinstance(item, str):
                pending += item
                if pending and len(pending) >= chunk_size:
                    await resp.write(reply.chunk({"content": pending}))
                    pending = ""
            elif isinstance(item, ChatResult):
                if pending:
                    await resp.write(reply.chunk({"content": pending}))
                await resp.write(reply.chunk({}, finish=item.finish_reason))
                if include_usage:
                    await resp.write(reply.usage_chunk(item))
                await resp.write(b"data: [DONE]\n\n")
                break
            else:
                err = item if isinstance(item, ServiceError) else \
                    ServiceError(f"generation failed: {item!r}")
                await resp.write(b"data: " + orjson.dumps(err.to_dict()) + b"\n\n")
                break
            try:
                item = await asyncio.wait_for(stream.get(), PING_EVERY_S)
            except asyncio.TimeoutError:
                await resp.write(b": ping\n\n")
                item = ""
        await resp.write_eof()
        return resp
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    finally:
        msg.cancel.set()
        if not task.done():
            task.cancel()


class _Reply:
    def __init__(self, rid: str, model: str, chat: bool):
        self.id, self.model, self.chat = rid, model, chat
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def _usage(r: ChatResult) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    def whole(self, r: ChatResult) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                      "finish_reason": r.finish_reason, "logprobs": None}
            return {**self._base("chat.completion"), "choices": [choice],
                    "usage": self._usage(r)}
        choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice], "usage": self._usage(r)}

    def chunk(self, delta: dict, finish: str | None = None) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            data = {**self._base("chat.completion.chunk"), "choices": [choice], "usage": None}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish,
                      "logprobs": None}
            data = {**self._base("text_completion"), "choices": [choice], "usage": None}
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def usage_chunk(self, r: ChatResult) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return b"data: " + orjson.dumps({**self._base(obj), "choices": [],
                                          "usage": self._usage(r)}) + b"\n\n"
