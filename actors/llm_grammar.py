"""Grammar-constrained decoding: the answer follows a JSON schema, or is a valid tool call.

The engine is llguidance (Microsoft's Rust grammar engine behind Guidance; also used by
llama.cpp and vLLM): one 3 MB wheel with no dependencies (xgrammar pulls triton and
apache-tvm-ffi beside our pinned torch), a mask computed on the CPU per sequence in tens of
microseconds (so a constrained row adds little to a shared decode step), JSON schemas and
Lark grammars with embedded schemas (``%json {...}``, used for tool calls), and a matcher
whose ``deep_copy`` is sub-microsecond (so a schema is compiled once and copied per request).

Three pieces:

- :func:`tokenizer_info`: llguidance's view of a Hugging Face tokenizer (its token trie),
  built once per tokenizer (about 0.2 s for a 49k vocabulary) and cached;
- :func:`grammar_for`: the Lark grammar a chat must follow (``response_format`` or a forced
  tool call, see :mod:`.llm_tools`), or None; :func:`check` validates it without a tokenizer
  (the HTTP layer answers a bad schema with a 400 before anything is queued);
- :class:`Constraint`: the per-sequence object the batch engine drives (actors/batch_plan.py
  ``SeqRequest.constraint``): ``fill_mask(row)`` sets every token the grammar forbids to
  ``-inf`` (and every logit column past the tokenizer's vocabulary: a model's logits may be
  wider), ``accept(token)`` advances it, ``finished()`` says the grammar is complete.

Compiled matchers are cached per (tokenizer, grammar text); the grammar text embeds the
schema's JSON text, so two requests with the same schema share one compilation.
"""
from __future__ import annotations

import collections
import copy
import functools
import threading
import weakref
from typing import Any

import numpy as np
import orjson
import torch

from ..runtime.errors import InvalidRequest
from . import llm_tools

#: how the JSON is laid out: one space after ``:`` and ``,``, no other whitespace (a small
#: model given free whitespace may write newlines forever; this is also how models write JSON)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CALLS = 8                 # parallel_tool_calls: at most this many calls in one answer
_CACHE_SIZE = 128

_lock = threading.Lock()
_tokenizers: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], Any]] = \
    weakref.WeakKeyDictionary()
_compiled: collections.OrderedDict[tuple[int, str], Any] = collections.OrderedDict()


def _llg() -> Any:
    import llguidance
    return llguidance


# ---- grammars ------------------------------------------------------------------------------------
def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    ``properties`` and says nothing about others. Every answer it allows is valid under the
    original schema; a small model left free to add keys invents them and never stops."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "$defs", "definitions") and \
                isinstance(value, dict):
            out[key] = {k: _closed(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "oneOf", "allOf",
                     "prefixItems", "if", "then", "else", "contains"):
            out[key] = _closed(value)
        else:
            out[key] = value
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out and \
            "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _schema(schema: Any, *, lenient: bool) -> dict:
    """A JSON schema (dict or JSON text) with our layout options for llguidance."""
    if isinstance(schema, (str, bytes)):
        schema = orjson.loads(schema)
    if schema is True or schema is None:
        schema = {}
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema must be an object")
    guidance = {**JSON_LAYOUT, **({"lenient": True} if lenient else {})}
    return {**_closed(schema), "x-guidance": guidance}


def _json_rule(schema: Any, *, lenient: bool) -> str:
    return "%json " + orjson.dumps(_schema(schema, lenient=lenient)).decode()


def _hoist_defs(schema: Any, prefix: str, defs: dict[str, Any]) -> Any:
    """``schema`` without its ``$defs`` / ``definitions`` (moved into ``defs`` under
    ``prefix``-ed names) and with its local ``$ref`` pointers renamed to match: a tool's parameters
    are nested in the call's schema, where their own ``#/$defs/...`` would not resolve."""
    if isinstance(schema, list):
        return [_hoist_defs(s, prefix, defs) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                defs[prefix + name] = _hoist_defs(sub, prefix, defs)
        elif key == "$ref" and isinstance(value, str) and \
                value.startswith(("#/$defs/", "#/definitions/")):
            out[key] = "#/$defs/" + prefix + value.split("/", 2)[2]
        elif key in ("properties", "patternProperties") and isinstance(value, dict):
            out[key] = {k: _hoist_defs(v, prefix, defs) for k, v in value.items()}
        else:
            out[key] = _hoist_defs(value, prefix, defs)
    return out


def _call_schema(fmt: str, tools: list[dict]) -> dict:
    """One call of any of ``tools``: ``{"name": <const>, "arguments": <its parameters>}``
    (``parameters`` for the Llama 3 format), the name first."""
    key = "parameters" if fmt == llm_tools.LLAMA else "arguments"
    options = []
    defs: dict[str, Any] = {}
    for i, t in enumerate(tools):
        params = t.get("parameters")
        if not isinstance(params, dict) or not params:
            params = {"type": "object", "properties": {}}
        params = _hoist_defs(params, f"t{i}_", defs)
        options.append({"type": "object",
                        "properties": {"name": {"const": t["name"]}, key: params},
                        "required": ["name", key], "additionalProperties": False})
    call = options[0] if len(options) == 1 else {"anyOf": options}
    return {**call, "$defs": defs} if defs else call


def tool_grammar(fmt: str, tools: list[dict], *, parallel: bool, lenient: bool) -> str:
    """A Lark grammar for one (or up to :data:`MAX_CALLS`) call(s) of ``tools`` in the
    model's own tool-call format (:func:`.llm_tools.tool_format`)."""
    body = _json_rule(_call_schema(fmt, tools), lenient=lenient)
    more = MAX_CALLS - 1 if parallel else 0
    if fmt == llm_tools.MISTRAL:          # a JSON list after [TOOL_CALLS] (a special token)
        rep = f' (", " call){{0,{more}}}' if more else ""
        return f'start: "[" call{rep} "]"\ncall: {body}\n'
    if fmt == llm_tools.LLAMA:            # bare JSON objects, one per line
        rep = f' ("\\n" call){{0,{more}}}' if more else ""
        return f"start: call{rep}\ncall: {body}\n"
    if fmt == llm_tools.HERMES:           # Qwen / Hermes: newlines inside and between tags
        rep = f' ("\\n" call){{0,{more}}}' if more else ""
        return (f'start: call{rep}\ncall: "<tool_call>" "\\n"? body "\\n"? "</tool_call>"\n'
                f"body: {body}\n")
    # our fallback prompt, for a model never taught tool calls: a further call must follow
    # the last one's tag directly. Such a model, offered a newline, writes one and then
    # repeats the same call; offered only "<tool_call>" or the end, it ends.
    rep = f"{{1,{more + 1}}}" if more else ""
    return f'start: call{rep}\ncall: "<tool_call>" body "</tool_call>"\nbody: {body}\n'


def grammar_for(msg: Any, fmt: str = llm_tools.FALLBACK) -> str | None:
    """The Lark grammar ``msg`` (a Chat) must follow, or None when its text is free: a
    forced tool call (``tool_choice`` required or a named function) wins over a
    ``response_format`` schema."""
    tools = getattr(msg, "tools", None)
    choice = getattr(msg, "tool_choice", "auto")
    if tools and choice in ("required", "function"):
        chosen = [t for t in tools if choice == "required" or t["name"] == msg.tool_name]
        lenient = not all(t.get("strict") for t in chosen)
        return tool_grammar(fmt, chosen, parallel=msg.parallel_tool_calls, lenient=lenient)
    schema = getattr(msg, "response_schema", None)
    if schema is not None:
        return "start: " + _json_rule(schema, lenient=not msg.schema_strict) + "\n"
    return None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _validate(grammar: str) -> str:
    llg = _llg()
    return str(llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_lark(grammar)))


def check(msg: Any) -> None:
    """Raise a 400 naming the field when ``msg``'s schema or tools cannot be compiled."""
    try:
        grammar = grammar_for(msg)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid JSON schema: {exc}.", param="response_format") from None
    if grammar is None:
        return
    err = _validate(grammar)
    if err and not err.startswith("WARNING"):
        forced = msg.tools and msg.tool_choice in ("required", "function")
        where = "tools" if forced else "response_format"
        first = err.strip().splitlines()[0] if err.strip() else err
        raise InvalidRequest(f"The {'tool parameters' if forced else 'JSON schema'} cannot be "
                             f"enforced: {first}", param=where, code="invalid_schema")


# ---- the tokenizer and compiled grammars -------------------------------------------------------
def tokenizer_info(tokenizer: Any, eos: tuple[int, ...] = ()) -> Any:
    """llguidance's tokenizer for a Hugging Face fast tokenizer (cached per tokenizer and EOS
    set): its vocabulary as a byte trie, and the ids that end a sequence."""
    with _lock:
        per = _tokenizers.setdefault(tokenizer, {})
        info = per.get(eos)
    if info is not None:
        return info
    llg = _llg()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InvalidRequest("This model's tokenizer is not a fast (Rust) tokenizer, which "
                             "constrained decoding (tools, response_format) needs.",
                             param="response_format", code="unsupported_value")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    ends = list(eos) or [tokenizer.eos_token_id]
    info = llg.LLTokenizer(backend.to_str(), eos_token=ends)
    with _lock:
        _tokenizers.setdefault(tokenizer, {})[eos] = info
    return info


def _matcher(info: Any, grammar: str) -> Any:
    key = (id(info), grammar)
    with _lock:
        base = _compiled.get(key)
        if base is not None:
            _compiled.move_to_end(key)
            return base.deep_copy()
    llg = _llg()
    base = llg.LLMatcher(info, llg.LLMatcher.grammar_from_lark(grammar), log_level=0)
    if base.is_error():
        raise InvalidRequest(f"The schema cannot be enforced: {base.get_error()}",
                             param="response_format", code="invalid_schema")
    with _lock:
        _compiled[key] = base
        while len(_compiled) > _CACHE_SIZE:
            _compiled.popitem(last=False)
    return base.deep_copy()


def constraint_for(tokenizer: Any, msg: Any, eos: Any = ()) -> Constraint | None:
    """The constraint a chat's sequence decodes under, or None (free text)."""
    grammar = grammar_for(msg, llm_tools.tool_format(tokenizer))
    if grammar is None:
        return None
    info = tokenizer_info(tokenizer, tuple(sorted(eos)))
    return Constraint(_matcher(info, grammar), info.vocab_size, list(info.eos_tokens))


class Constraint:
    """One sequence's grammar state (see the module doc for the interface)."""

    def __init__(self, matcher: Any, n_vocab: int, eos: list[int]):
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.eos = eos
        self.words = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)

    def allowed(self) -> np.ndarray:
        """The next token's allowed ids as a 0/1 byte per vocabulary entry."""
        self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        bits = np.unpackbits(self.words.numpy().view(np.uint8), bitorder="little")
        return bits[:self.n_vocab]

    def fill_mask(self, row: torch.Tensor) -> None:
        width = row.shape[0]
        n = min(width, self.n_vocab)
        if self.matcher.is_error():           # cannot go on: only an end of sequence
            row.fill_(float("-inf"))
            row[[e for e in self.eos if e < width]] = 0.0
            return
        ok = self.allowed()[:n].view(np.bool_)
        if row.device.type == "cpu":
            # numpy writes the row in place in ~20 us; torch's masked_fill_ on one row costs
            # 10x that and far more when its threads contend for the cores
            values = row.numpy()
            np.copyto(values[:n], -np.inf, where=~ok)
            values[n:] = -np.inf
            return
        mask = torch.from_numpy(ok).to(row.device, non_blocking=True)
        row[:n].masked_fill_(~mask, float("-inf"))
        if width > n:
            row[n:] = float("-inf")

    def accept(self, token_id: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token_id))

    def finished(self) -> bool:
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self.matcher.get_error())
