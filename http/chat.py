"""POST /v1/chat/completions and the legacy POST /v1/completions (LlamaIndex's OpenAILike).

Besides plain chat: ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (calls read out of the
answer by actors/llm_tools.py, forced ones constrained by actors/llm_grammar.py),
``response_format`` (``json_object``, ``json_schema``), ``logprobs`` / ``top_logprobs``,
``presence_penalty`` / ``frequency_penalty``, and ``n`` (up to :data:`MAX_N` choices, each its
own sequence in the batch; a seeded request gives choice ``i`` the seed ``seed + i``). The
legacy route also takes ``logprobs`` (an int) and ``echo``.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from agile_rag.actors import llm_grammar
from agile_rag.actors.llm_tools import ToolCallDelta, ToolCallParser
from agile_rag.actors.messages import Chat, ChatResult, TokenStream
from agile_rag.runtime.errors import InvalidRequest, ServiceError
from agile_rag.runtime.ids import unique_hex
from agile_rag.runtime.loop_calls import call_threadsafe

from .common import ask_model, resolve_model
from .errors import json_response
from .keys import REQUEST_ID, SERVER
from .parsing import Fields, read_json

log = logging.getLogger("agile_rag.http")

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
PING_EVERY_S = 15.0
MAX_N = 8                      # choices per request
MAX_TOP_LOGPROBS = 20          # OpenAI's limit (5 on the legacy route)
MAX_TOOLS = 128
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


# ---- request parsing -----------------------------------------------------------------------------
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


def _arguments_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    if value is None:
        return "{}"
    raise InvalidRequest(f"'{param}' must be a JSON string.", param=param, code="invalid_type")


def _parse_tool_calls(value: Any, i: int) -> list[dict]:
    """An assistant message's ``tool_calls`` (or legacy ``function_call``)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(value, list):
        raise InvalidRequest(f"'{where}' must be an array of tool calls.", param=where,
                             code="invalid_type")
    calls = []
    for j, c in enumerate(value):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"'{where}[{j}]' must be {{\"id\", \"type\": \"function\", "
                                 "\"function\": {\"name\", \"arguments\"}}.",
                                 param=f"{where}[{j}]")
        cid = c.get("id")
        calls.append({"id": cid if isinstance(cid, str) else f"call_{i}_{j}", "type": "function",
                      "function": {"name": fn["name"], "arguments": _arguments_text(
                          fn.get("arguments"), f"{where}[{j}].function.arguments")}})
    return calls


def parse_messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'messages' must be a non-empty array of {role, content} objects.",
                             param="messages")
    out: list[dict] = []
    names: dict[str, str] = {}            # tool call id -> function name, for the results
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with 'role' and 'content'.",
                                 param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of "
                                 f"{', '.join(sorted(ROLES))}; got {role!r}.",
                                 param=f"messages[{i}].role")
        calls: list[dict] = []
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = _parse_tool_calls(m["tool_calls"], i)
        elif role == "assistant" and isinstance(m.get("function_call"), dict):
            calls = _parse_tool_calls([{"function": m["function_call"]}], i)
        if m.get("content") is None and not calls:
            raise InvalidRequest(f"Missing required parameter: 'messages[{i}].content'.",
                                 param=f"messages[{i}].content",
                                 code="missing_required_parameter")
        if role == "developer":
            role = "system"
        elif role == "function":
            role = "tool"
        msg: dict[str, Any] = {"role": role, "content": _content_text(m.get("content"), i)}
        if calls:
            msg["tool_calls"] = calls
            names.update((c["id"], c["function"]["name"]) for c in calls)
        if role == "tool":
            cid = m.get("tool_call_id")
            if isinstance(cid, str):
                msg["tool_call_id"] = cid
            name = m.get("name") if isinstance(m.get("name"), str) else names.get(cid or "")
            if name:
                msg["name"] = name
        out.append(msg)
    return out


def parse_tools(f: Fields) -> dict:
    """``tools``, ``tool_choice``, ``parallel_tool_calls`` -> the Chat's fields."""
    raw = f.raw("tools")
    tools: list[dict] | None = None
    if raw is not None:
        if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
            raise InvalidRequest(f"'tools' must be an array of at most {MAX_TOOLS} "
                                 "{\"type\": \"function\", \"function\": {...}} objects.",
                                 param="tools", code="invalid_type")
        tools = []
        for j, t in enumerate(raw):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or t.get("type", "function") != "function":
                raise InvalidRequest(f"'tools[{j}]' must be {{\"type\": \"function\", "
                                     "\"function\": {\"name\", \"description\", "
                                     "\"parameters\"}}.", param=f"tools[{j}]")
            name = fn.get("name")
            if not isinstance(name, str) or not _TOOL_NAME.match(name):
                raise InvalidRequest(f"'tools[{j}].function.name' must be 1-64 letters, digits, "
                                     "'_', '.' or '-'.", param=f"tools[{j}].function.name")
            if any(x["name"] == name for x in tools):
                raise InvalidRequest(f"Two tools are named {name!r}.",
                                     param=f"tools[{j}].function.name")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise InvalidRequest(f"'tools[{j}].function.parameters' must be a JSON Schema "
                                     "object.", param=f"tools[{j}].function.parameters",
                                     code="invalid_type")
            desc = fn.get("description")
            tool: dict[str, Any] = {"name": name}
            if isinstance(desc, str):
                tool["description"] = desc
            tool["parameters"] = params if params is not None else \
                {"type": "object", "properties": {}}
            if fn.get("strict") is True:
                tool["strict"] = True
            tools.append(tool)
        tools = tools or None
    choice_raw = f.raw("tool_choice")
    choice, name = ("auto" if tools else "none"), None
    if isinstance(choice_raw, str):
        if choice_raw not in ("auto", "none", "required"):
            raise InvalidRequest("'tool_choice' must be 'auto', 'none', 'required' or "
                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                                 param="tool_choice", code="invalid_value")
        choice = choice_raw
    elif isinstance(choice_raw, dict):
        fn = choice_raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest("'tool_choice' must name a function: {\"type\": \"function\", "
                                 "\"function\": {\"name\": ...}}.", param="tool_choice")
        if not tools or all(t["name"] != name for t in tools):
            raise InvalidRequest(f"'tool_choice' names {name!r}, which is not in 'tools'.",
                                 param="tool_choice", code="invalid_value")
        choice = "function"
    elif choice_raw is not None:
        raise InvalidRequest("'tool_choice' must be a string or an object.", param="tool_choice",
                             code="invalid_type")
    if choice == "required" and not tools:
        raise InvalidRequest("'tool_choice' is 'required' but no 'tools' were given.",
                             param="tool_choice", code="invalid_value")
    return {"tools": tools, "tool_choice": choice, "tool_name": name,
            "parallel_tool_calls": f.boolean("parallel_tool_calls", True)}


def parse_response_format(f: Fields) -> dict:
    """``response_format`` -> ``response_schema`` (JSON text) and ``schema_strict``."""
    rf = f.raw("response_format")
    if rf is None:
        return {}
    if not isinstance(rf, dict):
        raise InvalidRequest("'response_format' must be an object such as "
                             "{\"type\": \"json_object\"}.", param="response_format",
                             code="invalid_type")
    kind = rf.get("type")
    if kind in (None, "text"):
        return {}
    if kind == "json_object":
        return {"response_schema": '{"type": "object"}', "schema_strict": False}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest("'response_format.json_schema' must be an object with "
                                 "'name' and 'schema'.", param="response_format.json_schema",
                                 code="invalid_type")
        schema = spec.get("schema", {})
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise InvalidRequest("'response_format.json_schema.schema' must be a JSON Schema "
                                 "object.", param="response_format.json_schema.schema",
                                 code="invalid_type")
        return {"response_schema": orjson.dumps(schema).decode(),
                "schema_strict": spec.get("strict") is True}
    raise InvalidRequest(f"'response_format.type' must be 'text', 'json_object' or "
                         f"'json_schema'; got {kind!r}.", param="response_format.type",
                         code="invalid_value")


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
    return {"temperature": temperature, "top_p": f.number("top_p", 1.0, lo=0, hi=1) or 1.0,
            "max_tokens": max_tokens, "stop": [s for s in stop if s],
            "seed": f.integer("seed", None),
            "presence_penalty": f.number("presence_penalty", 0.0, lo=-2, hi=2) or 0.0,
            "frequency_penalty": f.number("frequency_penalty", 0.0, lo=-2, hi=2) or 0.0}


def parse_n(f: Fields) -> int:
    n = f.integer("n", 1)
    assert n is not None
    if n < 1 or n > MAX_N:
        raise InvalidRequest(f"Invalid value for 'n': {n}. This server generates 1 to {MAX_N} "
                             "choices per request.", param="n", code="unsupported_value")
    return n


def parse_logprobs(f: Fields, *, chat: bool) -> int | None:
    """How many alternatives per token to report (0: only the chosen token's logprob);
    None: no logprobs."""
    if chat:
        if not f.boolean("logprobs", False):
            if f.raw("top_logprobs") is not None:
                raise InvalidRequest("'top_logprobs' needs 'logprobs': true.",
                                     param="top_logprobs", code="invalid_value")
            return None
        return f.integer("top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
    raw = f.raw("logprobs")
    if raw is False:
        return None
    return f.integer("logprobs", None, lo=0, hi=5) if raw is not True else 0


# ---- handlers ----------------------------------------------------------------------------------
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    server = request.app[SERVER]
    f = Fields(await read_json(request))
    actor = resolve_model(server, "llm", f.string("model"))
    extra: dict[str, Any] = {}
    echo = False
    if chat:
        messages, prompt = parse_messages(f.required("messages")), None
        extra.update(parse_tools(f))
        extra.update(parse_response_format(f))
    else:
        prompt = f.required("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidRequest("'prompt' must be a string (or an array of one string).",
                                 param="prompt")
        messages = None
        echo = f.boolean("echo", False)
    generation = parse_generation(f, actor.params)
    n = parse_n(f)
    top = parse_logprobs(f, chat=chat)
    streaming = f.boolean("stream", False)
    include_usage = bool(f.obj("stream_options").get("include_usage", False))
    queue: asyncio.Queue = asyncio.Queue()
    msgs = []
    for i in range(n):
        seed = generation["seed"]
        msgs.append(Chat(messages=messages, prompt=prompt,
                         stream=_ChoiceStream(i, queue) if streaming else None,
                         **{**generation, "seed": None if seed is None else seed + i},
                         **extra, logprobs=[] if top is not None else None,
                         top_logprobs=top or 0))
    llm_grammar.check(msgs[0])                       # a schema that cannot work: 400 now
    tools_on = bool(extra.get("tools")) and extra.get("tool_choice") != "none"
    names = [t["name"] for t in extra["tools"]] if tools_on else []
    reply = _Reply(("chatcmpl-" if chat else "cmpl-") + unique_hex(),
                   actor.spec.name, chat, getattr(actor, "tokenizer", None))
    choices = [_Choice(i, m, ToolCallParser(names) if tools_on else None,
                       prompt if echo else "") for i, m in enumerate(msgs)]
    if not streaming:
        results = await _ask_all(server, actor, msgs, request)
        return json_response(reply.whole(choices, results), request=request)
    return await _stream(request, server, actor, choices, queue, reply, include_usage)


async def _ask_all(server, actor, msgs: list[Chat], request) -> list[ChatResult]:
    tasks = [asyncio.ensure_future(ask_model(server, actor, m, request)) for m in msgs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for m in msgs:
            m.cancel.set()                          # the client went away: stop generating
        for t in tasks:
            if not t.done():
                t.cancel()
            t.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class _ChoiceStream(TokenStream):
    """One choice's stream: its items go, tagged with the choice's index, to the queue the
    handler reads all choices from."""

    def __init__(self, index: int, queue: asyncio.Queue):
        super().__init__()
        self.index = index
        self.shared = queue

    def push_threadsafe(self, item) -> None:
        call_threadsafe(self.loop, self.shared.put_nowait, (self.index, item))

    def push(self, item) -> None:
        self.shared.put_nowait((self.index, item))


@dataclass
class _Choice:
    index: int
    msg: Chat
    parser: ToolCallParser | None
    echo: str = ""
    pending: str = ""                 # content not sent yet (stream_chunk_size)
    sent_logprobs: int = 0
    offset: int = -1                  # legacy text_offset of the next token
    done: bool = False

    def __post_init__(self) -> None:
        self.offset = len(self.echo)


async def _stream(request, server, actor, choices: list[_Choice], queue: asyncio.Queue,
                  reply: _Reply, include_usage: bool) -> web.StreamResponse:
    tasks = []
    for c in choices:
        stream = c.msg.stream
        assert stream is not None
        task = asyncio.ensure_future(ask_model(server, actor, c.msg, request))
        task.add_done_callback(lambda t, s=stream: s.push(
            asyncio.CancelledError() if t.cancelled() else (t.exception() or t.result())))
        tasks.append(task)
    resp = None
    try:
        index, first = await queue.get()
        if isinstance(first, BaseException):
            raise first                              # before any byte went out: a plain error
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", "x-request-id": request[REQUEST_ID]})
        await resp.prepare(request)
        for c in choices:
            await resp.write(reply.chunk(c, {"role": "assistant", "content": ""}))
            if c.echo:
                await resp.write(reply.chunk(c, {"content": c.echo}))
        chunk_size = int(actor.params.get("stream_chunk_size") or 0)
        results: list[ChatResult] = []
        item: Any = first
        while True:
            c = choices[index]
            if isinstance(item, str):
                await _content(resp, reply, c, item, chunk_size)
            elif isinstance(item, ChatResult):
                await _finish(resp, reply, c, item)
                results.append(item)
                if all(x.done for x in choices):
                    if include_usage:
                        await resp.write(reply.usage_chunk(results))
                    await resp.write(b"data: [DONE]\n\n")
                    break
            else:
                if isinstance(item, ServiceError):
                    err = item
                else:       # the log gets the exception, the client never its text
                    log.error("chat %s failed mid-stream", request[REQUEST_ID],
                              exc_info=item if isinstance(item, BaseException) else None)
                    err = ServiceError(f"generation failed on this request (request id "
                                       f"{request[REQUEST_ID]}); the server log has the details")
                await resp.write(b"data: " + orjson.dumps(err.to_dict()) + b"\n\n")
                break
            try:
                index, item = await asyncio.wait_for(queue.get(), PING_EVERY_S)
            except asyncio.TimeoutError:
                await resp.write(b": ping\n\n")
                index, item = 0, ""
        await resp.write_eof()
        return resp
    except ConnectionResetError:
        # the client hung up mid-stream (aiohttp's ClientConnectionResetError is one): its
        # chats are cancelled below; nothing to answer, and not a server error to log
        log.debug("chat %s: the client went away", request[REQUEST_ID])
        if resp is None:
            raise
        return resp
    finally:
        for c in choices:
            c.msg.cancel.set()
        for t in tasks:
            if not t.done():
                t.cancel()


async def _content(resp, reply: _Reply, c: _Choice, piece: str, chunk_size: int) -> None:
    deltas: list[ToolCallDelta] = []
    if c.parser is not None:
        piece, deltas = c.parser.feed(piece)
    c.pending += piece
    if c.pending and (len(c.pending) >= chunk_size or deltas):
        await resp.write(reply.chunk(c, {"content": c.pending}, logprobs=reply.logprobs(c)))
        c.pending = ""
    for d in deltas:
        await resp.write(reply.chunk(c, {"tool_calls": [_delta(d)]},
                                     logprobs=reply.logprobs(c)))


async def _finish(resp, reply: _Reply, c: _Choice, result: ChatResult) -> None:
    deltas: list[ToolCallDelta] = []
    if c.parser is not None:
        piece, deltas = c.parser.finish()
        c.pending += piece
    if c.pending or (c.msg.logprobs and c.sent_logprobs < result.completion_tokens):
        await resp.write(reply.chunk(c, {"content": c.pending},
                                     logprobs=reply.logprobs(c, result)))
        c.pending = ""
    for d in deltas:
        await resp.write(reply.chunk(c, {"tool_calls": [_delta(d)]},
                                     logprobs=reply.logprobs(c, result)))
    c.done = True
    reason = result.finish_reason
    if c.parser is not None and c.parser.calls and reason == "stop":
        reason = "tool_calls"
    await resp.write(reply.chunk(c, {}, finish=reason))


def _delta(d: ToolCallDelta) -> dict:
    if d.id is not None:
        return {"index": d.index, "id": d.id, "type": "function",
                "function": {"name": d.name, "arguments": d.arguments}}
    return {"index": d.index, "function": {"arguments": d.arguments}}


class _Reply:
    def __init__(self, rid: str, model: str, chat: bool, tokenizer: Any = None):
        self.id, self.model, self.chat = rid, model, chat
        self.created = int(time.time())
        self.tokenizer = tokenizer

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def _usage(results: list[ChatResult]) -> dict:
        prompt = results[0].prompt_tokens if results else 0
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    # ---- logprobs --------------------------------------------------------------------------
    def _token(self, tid: int) -> str:
        tok = self.tokenizer
        if tok is None:
            return ""
        try:
            return str(tok.decode([tid], skip_special_tokens=False))
        except Exception:  # noqa: BLE001 - a token the tokenizer cannot show alone
            return ""

    def _entries(self, c: _Choice, final: ChatResult | None) -> list[tuple]:
        """The logprob entries not sent yet: all of them at the end (capped at the tokens
        the answer has: the end-of-sequence token is not one), else all but the newest."""
        got = c.msg.logprobs
        if got is None:
            return []
        end = min(len(got), final.completion_tokens) if final is not None else len(got) - 1
        out = got[c.sent_logprobs:end] if end > c.sent_logprobs else []
        c.sent_logprobs = max(c.sent_logprobs, end)
        return out

    def _chat_logprobs(self, entries: list[tuple]) -> dict:
        def one(tid: int, lp: float) -> dict:
            text = self._token(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}
        return {"content": [{**one(tid, lp), "top_logprobs": [one(i, v) for i, v in top]}
                            for tid, lp, top in entries], "refusal": None}

    def _legacy_logprobs(self, c: _Choice, entries: list[tuple]) -> dict:
        tokens, offsets = [], []
        for tid, _, _ in entries:
            text = self._token(tid)
            tokens.append(text)
            offsets.append(c.offset)
            c.offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self._token(i): v for i, v in top} for _, _, top in entries],
                "text_offset": offsets}

    def logprobs(self, c: _Choice, final: ChatResult | None = None) -> dict | None:
        """The choice's logprobs not sent yet, in the route's shape (None: not asked, or
        not computed: a model the continuous batch cannot drive generates without them)."""
        if not c.msg.logprobs:
            return None
        entries = self._entries(c, final)
        return self._chat_logprobs(entries) if self.chat else self._legacy_logprobs(c, entries)

    # ---- bodies ------------------------------------------------------------------------------
    def whole(self, choices: list[_Choice], results: list[ChatResult]) -> dict:
        out = []
        for c, r in zip(choices, results):
            lp = self.logprobs(c, r)
            reason = r.finish_reason
            if not self.chat:
                out.append({"index": c.index, "text": c.echo + r.text, "finish_reason": reason,
                            "logprobs": lp})
                continue
            message: dict[str, Any] = {"role": "assistant", "content": r.text}
            if c.parser is not None:
                c.parser.feed(r.text)
                c.parser.finish()
                if c.parser.calls:
                    message = {"role": "assistant", "content": c.parser.content.strip() or None,
                               "tool_calls": c.parser.tool_calls}
                    if reason == "stop":
                        reason = "tool_calls"
            out.append({"index": c.index, "message": message, "finish_reason": reason,
                        "logprobs": lp})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._base(obj), "choices": out, "usage": self._usage(results)}

    def chunk(self, c: _Choice, delta: dict, finish: str | None = None,
              logprobs: dict | None = None) -> bytes:
        if self.chat:
            choice = {"index": c.index, "delta": delta, "finish_reason": finish,
                      "logprobs": logprobs}
            data = {**self._base("chat.completion.chunk"), "choices": [choice], "usage": None}
        else:
            choice = {"index": c.index, "text": delta.get("content", ""),
                      "finish_reason": finish, "logprobs": logprobs}
            data = {**self._base("text_completion"), "choices": [choice], "usage": None}
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def usage_chunk(self, results: list[ChatResult]) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return b"data: " + orjson.dumps({**self._base(obj), "choices": [],
                                          "usage": self._usage(results)}) + b"\n\n"
