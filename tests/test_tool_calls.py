"""Reading tool calls out of an answer (actors/llm_tools.py), and the grammar constraint
(actors/llm_grammar.py) on SmolLM2's real tokenizer: no model forward here."""
from __future__ import annotations

import glob
import json
import os
import random

import pytest
import torch

from agile_rag.actors import llm_grammar, llm_tools
from agile_rag.actors.llm_tools import ToolCallParser, parse_tool_calls
from agile_rag.actors.messages import Chat
from agile_rag.runtime.errors import InvalidRequest

from support import CACHE

NAMES = {"get_weather", "add"}
CALLS = [
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
     [("get_weather", '{"city": "Paris"}')], None),
    ('Sure.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Pa}ris"}}</tool_call>\n'
     '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, 3]}}\n</tool_call>',
     [("get_weather", '{"city": "Pa}ris"}'), ("add", '{"a": 1, "b": [2, 3]}')], "Sure."),
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}',            # Llama 3
     [("get_weather", '{"city": "Rome"}')], None),
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, '                # Mistral
     '{"name": "get_weather", "arguments": "{\\"city\\": \\"X\\"}"}]',
     [("add", '{"a": 1}'), ("get_weather", '{"city": "X"}')], None),
    ('{"arguments": {"a": 2}, "name": "add"}', [("add", '{"a": 2}')], None),
    ('<tool_call>{"name": "add"}</tool_call>', [("add", "{}")], None),
]
TEXTS = ["The capital is Paris.", '{"answer": 42}', '{"name": "Bob", "age": 3}',
         "<tool_call>not json</tool_call> ok", "a <tool_ca b", "[1] first", "  \n"]


def feed_in_pieces(text: str, seed: int) -> tuple[str, list[tuple[str, str]], list]:
    rng = random.Random(seed)
    p = ToolCallParser(NAMES)
    content, calls, deltas = "", {}, []
    i = 0
    while i < len(text):
        n = rng.randint(1, 6)
        got = p.feed(text[i:i + n])
        i += n
        content += got[0]
        deltas += got[1]
    got = p.finish()
    content += got[0]
    deltas += got[1]
    for d in deltas:
        c = calls.setdefault(d.index, ["", ""])
        c[0] = d.name or c[0]
        c[1] += d.arguments
    return content, [tuple(calls[k]) for k in sorted(calls)], deltas


@pytest.mark.parametrize("text,want,content", CALLS)
def test_calls_in_every_format_read_the_same_in_any_pieces(text, want, content):
    got_content, calls = parse_tool_calls(text, NAMES)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == want
    assert got_content == content
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    for seed in range(25):
        _, streamed, deltas = feed_in_pieces(text, seed)
        assert streamed == want
        firsts = [d for d in deltas if d.id is not None]
        assert [d.index for d in firsts] == list(range(len(want)))   # announced once, in order


@pytest.mark.parametrize("text", TEXTS)
def test_text_without_a_call_is_content_unchanged(text):
    assert parse_tool_calls(text, NAMES) == (text, [])
    for seed in range(10):
        content, calls, _ = feed_in_pieces(text, seed)
        assert (content, calls) == (text, [])


def test_a_call_is_announced_before_its_arguments_end():
    p = ToolCallParser(NAMES)
    _, deltas = p.feed('<tool_call>{"name": "get_weather", "arguments": {"ci')
    assert [(d.name, d.arguments) for d in deltas] == [("get_weather", ""), (None, '{"ci')]
    _, deltas = p.feed('ty": "Oslo"}}</tool_call>')
    assert [d.arguments for d in deltas] == ['ty": "Oslo"}']


def test_unknown_function_names_are_not_calls():
    text = '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text, NAMES) == (text, [])


# ---- prompts -----------------------------------------------------------------------------------
class _Tok:
    def __init__(self, template):
        self.chat_template = template


WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
HISTORY = [{"role": "user", "content": "Weather in Oslo?"},
           {"role": "assistant", "content": "", "tool_calls": [{
               "id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
           {"role": "tool", "content": "5 C, rain", "tool_call_id": "call_1",
            "name": "get_weather"}]


def test_template_formats_are_read_from_the_template():
    assert llm_tools.tool_format(_Tok("{{ '<tool_call>' }} {{ tools }}")) == llm_tools.HERMES
    assert llm_tools.tool_format(_Tok("[TOOL_CALLS] {{ tools }}")) == llm_tools.MISTRAL
    assert llm_tools.tool_format(_Tok("{% if tools %}{{ tools }}{% endif %}")) == llm_tools.LLAMA
    assert llm_tools.tool_format(_Tok("{{ messages }}")) == llm_tools.FALLBACK


def test_fallback_prompt_lists_tools_and_writes_history_as_text():
    msg = Chat(messages=[{"role": "system", "content": "Be brief."}] + HISTORY,
               tools=[WEATHER], tool_choice="auto")
    messages, tools = llm_tools.template_inputs(_Tok("{{ messages }}"), msg)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call these functions")
    assert '"name": "get_weather"' in messages[0]["content"]
    assert "<tool_call>{\"name\": \"<function name>\"" in messages[0]["content"]
    assert messages[2]["content"] == \
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert messages[3]["content"] == \
        '<tool_response name="get_weather">\n5 C, rain\n</tool_response>'
    assert all(isinstance(m["content"], str) for m in messages)
    none = Chat(messages=HISTORY, tools=[WEATHER], tool_choice="none")
    assert "You can call" not in str(llm_tools.template_inputs(_Tok("x"), none)[0])


def test_a_tool_aware_template_gets_tools_and_calls_as_objects():
    msg = Chat(messages=HISTORY, tools=[WEATHER], tool_choice="auto")
    messages, tools = llm_tools.template_inputs(_Tok("<tool_call> {{ tools }}"), msg)
    assert tools == [{"type": "function", "function": WEATHER}]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[2]["role"] == "tool"


# ---- the grammar constraint --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(server):
    """SmolLM2's tokenizer from the dequantised cache the session server wrote."""
    from transformers import AutoTokenizer

    found = sorted(glob.glob(os.path.join(CACHE, "gguf", "*", "tokenizer.json")))
    assert found, "the session server writes the dequantised cache"
    return AutoTokenizer.from_pretrained(os.path.dirname(found[0]))


def walk(tokenizer, constraint, text: str) -> None:
    """Feed ``text``'s tokens, checking each is allowed by the mask first."""
    for tid in tokenizer.encode(text):
        row = torch.zeros(len(tokenizer) + 64)             # logits wider than the vocabulary
        constraint.fill_mask(row)
        assert row[tid] == 0, tokenizer.decode([tid])
        assert torch.isinf(row[len(tokenizer):]).all()
        constraint.accept(tid)


def test_schema_constraint_masks_tokens_and_finishes(tokenizer):
    schema = {"type": "object", "properties": {"age": {"type": "integer"}},
              "required": ["age"]}
    msg = Chat(messages=[], response_schema=json.dumps(schema), schema_strict=True)
    c = llm_grammar.constraint_for(tokenizer, msg, {tokenizer.eos_token_id})
    assert c is not None and not c.finished()
    row = torch.zeros(len(tokenizer))
    c.fill_mask(row)
    allowed = [tokenizer.decode([i]) for i in torch.nonzero(row == 0)[:, 0].tolist()]
    assert allowed and all(a.startswith("{") for a in allowed)
    walk(tokenizer, c, '{"age": 42}')
    assert c.finished()
    again = llm_grammar.constraint_for(tokenizer, msg, {tokenizer.eos_token_id})
    assert again is not None and not again.finished()        # a fresh copy of the cached one
    assert llm_grammar.constraint_for(tokenizer, Chat(messages=[])) is None


def test_forced_tool_call_grammar(tokenizer):
    add = {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
    msg = Chat(messages=[], tools=[WEATHER, add], tool_choice="function", tool_name="add")
    c = llm_grammar.constraint_for(tokenizer, msg, {tokenizer.eos_token_id})
    assert c is not None
    walk(tokenizer, c, '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    row = torch.zeros(len(tokenizer))
    c.fill_mask(row)
    assert row[tokenizer.eos_token_id] == 0                  # may end after the call


def test_schemas_that_cannot_be_enforced_are_400s():
    bad = Chat(messages=[], response_schema=json.dumps(
        {"type": "object", "properties": {"x": {"type": "string", "format": "no-such"}}}),
        schema_strict=True)
    with pytest.raises(InvalidRequest) as e:
        llm_grammar.check(bad)
    assert e.value.param == "response_format"
    lenient = Chat(messages=[], response_schema=bad.response_schema, schema_strict=False)
    llm_grammar.check(lenient)                              # unknown keywords ignored


def test_tool_parameters_with_their_own_defs(tokenizer):
    """Pydantic's schemas (LangChain's bind_tools) keep nested models in ``$defs``: they still
    resolve once the parameters sit inside the call's schema."""
    addr = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    save = {"name": "save", "parameters": {
        "$defs": {"Addr": addr}, "type": "object",
        "properties": {"home": {"$ref": "#/$defs/Addr"}}, "required": ["home"]}}
    other = {"name": "other", "parameters": {
        "$defs": {"Addr": {"type": "integer"}}, "type": "object",
        "properties": {"n": {"$ref": "#/$defs/Addr"}}, "required": ["n"]}}
    msg = Chat(messages=[], tools=[save, other], tool_choice="required")
    llm_grammar.check(msg)
    c = llm_grammar.constraint_for(tokenizer, msg, {tokenizer.eos_token_id})
    assert c is not None
    walk(tokenizer, c, '<tool_call>{"name": "other", "arguments": {"n": 7}}</tool_call>')
    c = llm_grammar.constraint_for(tokenizer, msg, {tokenizer.eos_token_id})
    walk(tokenizer, c, '<tool_call>{"name": "save", "arguments": {"home": {"city": "Oslo"}}}'
                       '</tool_call>')


async def test_the_generate_path_follows_the_grammar_too(server):
    """A model the continuous batch cannot drive decodes with ``generate``: the same
    constraint then works through a logits processor."""
    import jsonschema

    from agile_rag.actors.llm_actor import LLMActor
    from agile_rag.actors.messages import Describe
    from agile_rag.runtime.liveconfig import ModelSpec, resolve_path
    from agile_rag.runtime.system import ActorSystem

    from support import ROOT, SMOLLM

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                               "age": {"type": "integer", "maximum": 150}},
              "required": ["name", "age"]}
    system = ActorSystem()
    path = resolve_path(SMOLLM, ROOT)
    actor = LLMActor(ModelSpec("llm", "smollm2", path, path, max_tokens=2048),
                     {"continuous_batching": False}, cache_dir=CACHE)
    system.spawn(actor)
    try:
        assert (await actor.ask(Describe(), timeout=300)).state == "ready"
        assert actor.engine is None
        res = await actor.ask(Chat(
            messages=[{"role": "user", "content": "Invent a person."}], max_tokens=60,
            response_schema=json.dumps(schema), schema_strict=True), timeout=300)
        assert res.finish_reason == "stop", res
        jsonschema.validate(json.loads(res.text), schema)
    finally:
        await system.stop_all()
