"""Tool calls as text: what the prompt says about the tools, and the calls read back out of
the answer. No torch here.

Prompt side (:func:`template_inputs`, called by ``LLMActor.encode_prompt``): a chat template
that knows about tools (it uses the ``tools`` variable: Qwen, Hermes, Llama 3.1+, Mistral...)
gets them through ``apply_chat_template(tools=...)``, with the history's assistant
``tool_calls`` and ``role: tool`` results in Hugging Face's message format. A template with no
tool section (SmolLM2's) gets the documented fallback instead: the tools listed as JSON in the
system message (:data:`FALLBACK_PROMPT`), the model asked to answer
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, earlier calls written back in that
form and tool results as ``<tool_response>`` user turns.

Answer side (:class:`ToolCallParser`, called by http/chat.py): the text is split into content
and tool calls as it streams, in any of the formats the common templates use: Hermes / Qwen
``<tool_call>{json}</tool_call>``, Mistral ``[TOOL_CALLS][{json}, ...]``, and Llama 3's bare
JSON ``{"name": ..., "parameters": {...}}`` (an answer that starts with ``{`` or ``[``). A call
is announced as soon as its name is read, then its arguments follow in fragments, as OpenAI
streams them; the whole text fed at once gives the same calls.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..runtime.ids import unique_hex

HERMES = "hermes"          # <tool_call>{"name", "arguments"}</tool_call>  (Qwen, Hermes)
LLAMA = "llama"            # {"name", "parameters"}                      (Llama 3.1+)
MISTRAL = "mistral"        # [TOOL_CALLS][{"name", "arguments"}]
FALLBACK = "fallback"      # no tool section in the template: our prompt, Hermes syntax

FALLBACK_PROMPT = """\
You can call these functions. Each one's "parameters" is the JSON Schema of its arguments:
{tools}

{rule}
<tool_call>{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}</tool_call>"""
RULE_AUTO = ("If a function helps answer the user, reply with only this line for each call "
             "(otherwise answer in plain text):")
RULE_REQUIRED = "Reply with only this line for each call:"


def _template(tokenizer: Any) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):                    # named templates: the default one
        tpl = tpl.get("tool_use") or tpl.get("default") or ""
    return tpl if isinstance(tpl, str) else ""


def tool_format(tokenizer: Any) -> str:
    """How this model writes tool calls, read from its chat template."""
    tpl = _template(tokenizer)
    if "[TOOL_CALLS]" in tpl:
        return MISTRAL
    if "<tool_call>" in tpl:
        return HERMES
    if "tools" in tpl:
        return LLAMA
    return FALLBACK


def _arguments_obj(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _call_text(call: dict) -> str:
    fn = call.get("function") or {}
    return "<tool_call>" + json.dumps(
        {"name": fn.get("name"), "arguments": _arguments_obj(fn.get("arguments"))},
        ensure_ascii=False) + "</tool_call>"


def _fallback_system(msg: Any) -> str:
    tools = msg.tools or []
    if msg.tool_choice == "function":
        tools = [t for t in tools if t["name"] == msg.tool_name]
    listing = "\n".join(json.dumps({k: t[k] for k in ("name", "description", "parameters")
                                    if k in t}, ensure_ascii=False) for t in tools)
    rule = RULE_AUTO if msg.tool_choice == "auto" else RULE_REQUIRED
    return FALLBACK_PROMPT.format(tools=listing, rule=rule)


def template_inputs(tokenizer: Any, msg: Any) -> tuple[list[dict], list[dict] | None]:
    """The messages (and tools) to hand ``apply_chat_template`` for chat ``msg``: every
    content a string, tool calls and results in the form the template understands."""
    tools_on = bool(msg.tools) and msg.tool_choice != "none"
    if tool_format(tokenizer) != FALLBACK:
        out = []
        for m in msg.messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {**c, "function": {**c["function"],
                                       "arguments": _arguments_obj(c["function"]["arguments"])}}
                    for c in m["tool_calls"]]
            out.append(m)
        tools = [{"type": "function", "function": t} for t in msg.tools] if tools_on else None
        return out, tools
    out = []
    for m in msg.messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            content = (content + "\n" + calls) if content else calls
        elif role == "tool":
            role = "user"
            name = m.get("name")
            head = f' name="{name}"' if name else ""
            content = f"<tool_response{head}>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tools_on:
        block = _fallback_system(msg)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


# ---- reading calls out of the answer -----------------------------------------------------------
MARKERS = ("<tool_call>", "[TOOL_CALLS]")
CLOSE = "</tool_call>"
_WS = " \t\r\n"


@dataclass
class ToolCallDelta:
    """A piece of a tool call: the first one of a call has ``id`` and ``name``."""
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""          # sent so far
    done: bool = False


@dataclass
class _Obj:
    """What a (possibly unfinished) call object in the text says so far."""
    name: str | None = None
    name_done: bool = False
    args: tuple[int, int | None] | None = None    # (start, end or None while unfinished)
    args_string: bool = False                      # "arguments" given as a JSON string
    end: int | None = None                         # just past the closing brace
    bad: bool = False


@dataclass
class _Region:
    objs: list[_Obj] = field(default_factory=list)
    end: int | None = None          # where the text after the region starts
    bad_at: int | None = None       # the text stops being calls here


class _Incomplete(Exception):
    pass


class _Bad(Exception):
    pass


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int:
    """``s[i]`` is a quote: the index just past the closing quote."""
    j = i + 1
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    raise _Incomplete


def _value_end(s: str, i: int) -> int:
    """The index just past the JSON value starting at ``s[i]``."""
    if i >= len(s):
        raise _Incomplete
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(s):
            c = s[j]
            if c == '"':
                j = _string_end(s, j)
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        raise _Incomplete
    j = i
    while j < len(s) and s[j] not in _WS + ",}]":
        j += 1
    if j == len(s):
        raise _Incomplete
    if j == i:
        raise _Bad
    return j


def _parse_obj(s: str, i: int, names: set[str]) -> _Obj:
    """The call object at ``s[i] == '{'``, as far as the text goes."""
    obj = _Obj()
    i = _skip_ws(s, i + 1)
    first = True
    try:
        while True:
            if i >= len(s):
                raise _Incomplete
            if s[i] == "}":
                obj.end = i + 1
                obj.bad = obj.name is None
                return obj
            if not first:
                if s[i] != ",":
                    raise _Bad
                i = _skip_ws(s, i + 1)
            if i >= len(s):
                raise _Incomplete
            if s[i] != '"':
                raise _Bad
            k_end = _string_end(s, i)
            key = json.loads(s[i:k_end])
            i = _skip_ws(s, k_end)
            if i >= len(s):
                raise _Incomplete
            if s[i] != ":":
                raise _Bad
            i = _skip_ws(s, i + 1)
            if i >= len(s):
                raise _Incomplete
            if key == "name":
                if s[i] != '"':
                    raise _Bad
                v_end = _string_end(s, i)
                obj.name = json.loads(s[i:v_end])
                if obj.name not in names:
                    raise _Bad
                obj.name_done = True
            elif key in ("arguments", "parameters"):
                obj.args_string = s[i] == '"'
                obj.args = (i, None)
                v_end = _value_end(s, i)
                obj.args = (i, v_end)
            elif first:
                raise _Bad                 # not a call: its first key is something else
            else:
                v_end = _value_end(s, i)
            i = _skip_ws(s, v_end)
            first = False
    except _Incomplete:
        return obj
    except (_Bad, ValueError):
        obj.bad = True
        return obj


def _parse_region(s: str, i: int, names: set[str], closing: bool) -> _Region:
    """Calls from ``s[i]``: one object, or a JSON list of them; then ``</tool_call>`` when
    ``closing`` (optional: a model may forget it)."""
    reg = _Region()
    i = _skip_ws(s, i)
    if i >= len(s):
        return reg
    listed = s[i] == "["
    if listed:
        i = _skip_ws(s, i + 1)
    while True:
        if i >= len(s):
            return reg
        if s[i] != "{":
            reg.bad_at = i
            return reg
        obj = _parse_obj(s, i, names)
        reg.objs.append(obj)
        if obj.bad:
            reg.bad_at = i
            return reg
        if obj.end is None:
            return reg
        i = _skip_ws(s, obj.end)
        if i >= len(s):
            return reg
        if listed:
            if s[i] == ",":
                i = _skip_ws(s, i + 1)
                continue
            if s[i] != "]":
                reg.bad_at = i
                return reg
            i = _skip_ws(s, i + 1)
            if i >= len(s):
                return reg
        elif not closing and s[i] in ";,":
            i = _skip_ws(s, i + 1)
            continue
        elif not closing and s[i] == "{":
            continue
        if closing:
            if s.startswith(CLOSE, i):
                reg.end = i + len(CLOSE)
                return reg
            if CLOSE.startswith(s[i:]):
                return reg                    # the closing tag is still coming
        reg.end = i
        return reg


class ToolCallParser:
    """Splits an answer into content and tool calls of the functions ``names``.

    ``feed(piece)`` and ``finish()`` return ``(content, deltas)``: the new content text and
    the new pieces of tool calls. What each call returns depends only on the text so far, so
    pieces of any size add up to what the whole text gives at once.
    """

    def __init__(self, names: Any):
        self.names = set(names)
        self.text = ""
        self.pos = 0                     # text before this is decided
        self.mode = "start"              # start | text | region
        self.region = 0                  # where the current region's calls start
        self.region_from = 0             # where its marker starts (content if no call)
        self.closing = False
        self.calls: list[_Call] = []
        self.region_calls = 0            # calls of the current region already announced
        self.content = ""                # all content returned so far
        self._ws = ""                    # whitespace held back (dropped next to a call)

    @property
    def tool_calls(self) -> list[dict]:
        """The calls so far, in OpenAI's shape."""
        return [{"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for c in self.calls]

    def feed(self, piece: str) -> tuple[str, list[ToolCallDelta]]:
        self.text += piece
        return self._scan(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = self._scan(final=True)
        if self._ws and not self.calls:
            content += self._ws
            self.content += self._ws
        self._ws = ""
        return content, deltas

    def _say(self, text: str, out: list[str]) -> None:
        """Content, its trailing whitespace held until more content follows (whitespace
        around a call is not content)."""
        if not text:
            return
        stripped = text.rstrip(_WS)
        if stripped:
            piece = self._ws + stripped
            out.append(piece)
            self.content += piece
            self._ws = text[len(stripped):]
        else:
            self._ws += text

    def _scan(self, *, final: bool) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        s = self.text
        while True:
            if self.mode == "start":
                i = _skip_ws(s, self.pos)
                if i >= len(s):
                    if final:
                        self._say(s[self.pos:], out)
                        self.pos = len(s)
                    break
                if s[i] in "{[" and self.names:
                    self._say(s[self.pos:i], out)
                    self._open(i, i, closing=False)
                else:
                    self.mode = "text"
                continue
            if self.mode == "text":
                hits = [(s.find(m, self.pos), m) for m in MARKERS]
                hits = [(j, m) for j, m in hits if j != -1]
                if hits and self.names:
                    j, m = min(hits)
                    self._say(s[self.pos:j], out)
                    self._open(j, j + len(m), closing=m == MARKERS[0])
                    continue
                hold = 0 if final else _partial_marker(s, self.pos)
                self._say(s[self.pos:len(s) - hold], out)
                self.pos = len(s) - hold
                break
            # region: calls from self.region
            reg = _parse_region(s, self.region, self.names, self.closing)
            for k, obj in enumerate(reg.objs):
                self._advance(k, obj, s, deltas)
            if reg.bad_at is not None or (final and reg.end is None):
                self.mode = "text"
                if self.region_calls:           # the calls stand; the rest is content
                    self.pos = reg.bad_at if reg.bad_at is not None else len(s)
                else:                           # no call after all: the marker is content
                    self._say(s[self.region_from:self.region], out)
                    self.pos = self.region
                self.region_calls = 0
                continue
            if reg.end is not None:
                self.pos = reg.end
                self.mode = "text"
                self.region_calls = 0
                continue
            break
        return "".join(out), deltas

    def _open(self, marker_at: int, start: int, *, closing: bool) -> None:
        self.mode = "region"
        self.region_from = marker_at
        self.region = start
        self.closing = closing
        self.region_calls = 0
        self.pos = marker_at

    def _advance(self, k: int, obj: _Obj, s: str, deltas: list[ToolCallDelta]) -> None:
        """Announce call ``k`` of the region once its name is read; send its arguments as
        they grow (a string-valued ``arguments`` only once whole)."""
        if not obj.name_done or obj.name is None:
            return
        if k >= self.region_calls:
            call = _Call(id="call_" + unique_hex(), name=obj.name)
            self.calls.append(call)
            self.region_calls = k + 1
            deltas.append(ToolCallDelta(index=len(self.calls) - 1, id=call.id, name=call.name))
        index = len(self.calls) - self.region_calls + k
        call = self.calls[index]
        if call.done or obj.args is None:
            if obj.end is not None and not call.done and obj.args is None:
                call.done = True
                if not call.arguments:
                    call.arguments = "{}"
                    deltas.append(ToolCallDelta(index=index, arguments="{}"))
            return
        start, end = obj.args
        if obj.args_string:
            if end is None:
                return
            try:
                text = json.loads(s[start:end])
            except ValueError:
                text = s[start:end]
            if not isinstance(text, str):
                text = s[start:end]
        else:
            text = s[start:end] if end is not None else s[start:]
        if end is not None:
            call.done = True
        new = text[len(call.arguments):]
        if new and text.startswith(call.arguments):
            call.arguments = text
            deltas.append(ToolCallDelta(index=index, arguments=new))


def _partial_marker(s: str, start: int) -> int:
    """How many characters at the end of ``s`` could begin a marker."""
    best = 0
    for m in MARKERS:
        for n in range(min(len(m) - 1, len(s) - start), 0, -1):
            if s.endswith(m[:n]):
                best = max(best, n)
                break
    return best


def parse_tool_calls(text: str, names: Any) -> tuple[str | None, list[dict]]:
    """The whole answer at once: (content, calls in OpenAI's shape)."""
    p = ToolCallParser(names)
    p.feed(text)
    p.finish()
    if p.calls:
        return (p.content.strip() or None), p.tool_calls
    return text, []
