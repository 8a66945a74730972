"""Tool calling, structured output and the other client gaps of issue 16, over real HTTP
with the real SmolLM2 model: grammar-constrained answers that validate, calls read out of the
text and streamed as OpenAI streams them, constrained and free chats in one batch, logprobs,
penalties, ``n``, the legacy route's ``logprobs`` / ``echo``, Cohere v2 rerank; and the real
clients (the openai client's ``parse``, LangChain's ``bind_tools`` and
``with_structured_output``)."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from support import sse_events

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add_numbers", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "city": {"type": "string", "maxLength": 40}},
    "required": ["name", "age", "city"], "additionalProperties": False}
SUBJECTS = ["a retired pilot", "a young chef", "a famous painter", "a school teacher",
            "a football player", "a nurse", "a jazz musician", "a bus driver",
            "a software engineer", "a farmer", "a librarian", "a firefighter", "a poet",
            "a pharmacist", "a taxi driver", "a scientist", "a baker", "a sailor",
            "a gardener", "an astronaut"]


async def post(s: aiohttp.ClientSession, url: str, body: dict, **headers) -> tuple[int, dict]:
    async with s.post(url, json=body, headers=headers) as r:
        return r.status, await r.json()


def chat(content: str, **kw) -> dict:
    return {"model": "smollm2", "temperature": 0, "max_tokens": 80,
            "messages": [{"role": "user", "content": content}], **kw}


async def test_json_schema_answers_parse_and_validate_for_20_prompts(v1):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True,
                                                  "schema": PERSON}}
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(*[post(s, v1 + "/chat/completions", chat(
            f"Invent {who}: give their name, age and city.", response_format=fmt))
            for who in SUBJECTS])
    records = []
    for status, body in answers:
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        record = json.loads(choice["message"]["content"])
        jsonschema.validate(record, PERSON)
        records.append(record)
    assert len({json.dumps(r, sort_keys=True) for r in records}) > 1     # not one canned answer


async def test_json_object_answers_an_object(v1):
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, v1 + "/chat/completions", chat(
            "Reply in JSON: what is the capital of France?",
            response_format={"type": "json_object"}, max_tokens=60))
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


async def test_required_tool_choice_gives_a_call_whose_arguments_validate(v1):
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, v1 + "/chat/completions", chat(
            "What is the weather like in Paris?", tools=TOOLS, tool_choice="required"))
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["role"] == "assistant"
    assert message["tool_calls"]
    for call in message["tool_calls"]:
        assert call["id"].startswith("call_") and call["type"] == "function"
        fn = call["function"]
        jsonschema.validate(json.loads(fn["arguments"]), PARAMS[fn["name"]])
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"


async def test_a_named_tool_choice_calls_that_function(v1):
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, v1 + "/chat/completions", chat(
            "What is 2 plus 3?", tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add_numbers"}},
            parallel_tool_calls=False))
    assert status == 200, body
    calls = body["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "add_numbers"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), PARAMS["add_numbers"])


async def test_auto_with_a_tool_free_question_answers_in_text(v1):
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, v1 + "/chat/completions", chat(
            "What is the capital of France?", tools=TOOLS, max_tokens=30))
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert "Paris" in choice["message"]["content"]


async def test_a_streamed_tool_call_reassembles_to_the_non_streamed_one(v1):
    req = chat("What is the weather like in London?", tools=TOOLS, tool_choice="required")
    async with aiohttp.ClientSession() as s:
        _, whole = await post(s, v1 + "/chat/completions", req)
        async with s.post(v1 + "/chat/completions", json={**req, "stream": True}) as r:
            assert r.status == 200
            events = await sse_events(r)
    assert events[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in events[:-1] if c["choices"]]
    pieces = [tc for d in deltas for tc in d.get("tool_calls", [])]
    first = pieces[0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] and first["function"]["arguments"] == ""
    assert len(pieces) > 3                                 # arguments came in fragments
    calls: dict[int, dict] = {}
    for p in pieces:
        c = calls.setdefault(p["index"], {"name": "", "arguments": ""})
        c["name"] += p["function"].get("name") or ""
        c["arguments"] += p["function"].get("arguments") or ""
    expected = [tc["function"] for tc in whole["choices"][0]["message"]["tool_calls"]]
    assert [calls[i] for i in sorted(calls)] == expected
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(d.get("content") for d in deltas)


async def test_tool_results_go_back_to_the_model(v1):
    messages = [
        {"role": "user", "content": "What is the weather like in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "22 C and sunny"}]
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, v1 + "/chat/completions", {
            "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 40})
    assert status == 200, body
    message = body["choices"][0]["message"]
    assert message["content"] or message.get("tool_calls")


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     "messages[1].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "tools[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
     "response_format.type"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
            "type": "object", "properties": {"d": {"type": "string", "format": "nope"}}}}}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3},
     "presence_penalty"),
])
async def test_bad_tool_and_format_requests_are_400_naming_the_field(v1, body, param):
    async with aiohttp.ClientSession() as s:
        status, out = await post(s, v1 + "/chat/completions", {**body, "max_tokens": 1})
    assert status == 400, out
    assert out["error"]["param"] == param, out


async def test_constrained_and_free_chats_share_a_batch_and_free_text_is_unchanged(v1, base):
    free = [chat(q, max_tokens=24) for q in ("Name three rivers.", "What is rain?",
                                             "Say hello to Anna.")]
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    constrained = [chat(f"Invent {who}.", response_format=fmt, max_tokens=40)
                   for who in SUBJECTS[:3]] + \
        [chat("Weather in Rome?", tools=TOOLS, tool_choice="required", max_tokens=40)]
    async with aiohttp.ClientSession() as s:
        alone = [(await post(s, v1 + "/chat/completions", r))[1] for r in free]
        mixed = await asyncio.gather(*[
            post(s, v1 + "/chat/completions", r, **{"x-request-id": f"mix-{i}"})
            for i, r in enumerate(free + constrained)])
        sizes = []
        for i in range(len(free)):
            async with s.get(base + f"/debug/traces?request_id=mix-{i}") as r:
                trace = await r.json()
            sizes += [e["detail"].get("batch_size", 0) for e in trace["events"]
                      if e["msg"] == "Chat"]
    assert [b["choices"][0]["message"]["content"] for b in alone] == \
        [b["choices"][0]["message"]["content"] for _, b in mixed[:len(free)]]
    assert max(sizes) >= 4, sizes                  # free rows decoded beside constrained ones
    for _, body in mixed[len(free):-1]:
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), PERSON)
    assert mixed[-1][1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_logprobs_and_top_logprobs(v1):
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, v1 + "/chat/completions", chat(
            "What is the capital of France?", logprobs=True, top_logprobs=3, max_tokens=12))
    assert status == 200, body
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    for e in entries:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        assert e["top_logprobs"][0]["token"] == e["token"]      # greedy: the most likely
        assert abs(tops[0] - e["logprob"]) < 1e-4
        assert bytes(e["bytes"]).decode() == e["token"]


async def test_streamed_logprobs_cover_every_token(v1):
    req = chat("Name a colour.", logprobs=True, max_tokens=10, stream=True)
    async with aiohttp.ClientSession() as s:
        async with s.post(v1 + "/chat/completions", json=req) as r:
            events = await sse_events(r)
    chunks = [c for c in events[:-1] if c["choices"]]
    entries = [e for c in chunks if c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert entries and "".join(e["token"] for e in entries) == text


async def test_frequency_penalty_changes_a_repetitive_answer(v1):
    req = chat("Repeat the word 'cat' ten times.", max_tokens=20)
    async with aiohttp.ClientSession() as s:
        _, plain = await post(s, v1 + "/chat/completions", req)
        _, penalised = await post(s, v1 + "/chat/completions",
                                  {**req, "frequency_penalty": 2.0, "presence_penalty": 1.0})
    a = plain["choices"][0]["message"]["content"]
    b = penalised["choices"][0]["message"]["content"]
    assert a != b
    assert b.lower().count("cat") < a.lower().count("cat")


async def test_n_choices_seeded_and_streamed(v1):
    req = chat("Tell me a fun fact.", temperature=1.2, seed=11, max_tokens=10, n=3)
    async with aiohttp.ClientSession() as s:
        _, body = await post(s, v1 + "/chat/completions", req)
        _, again = await post(s, v1 + "/chat/completions", req)
        async with s.post(v1 + "/chat/completions", json={
                **req, "n": 2, "stream": True, "stream_options": {"include_usage": True}}) as r:
            events = await sse_events(r)
    texts = [c["message"]["content"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in again["choices"]]     # seed + i each
    assert len(set(texts)) > 1
    assert body["usage"]["completion_tokens"] == 3 * 10 or \
        body["usage"]["completion_tokens"] <= 30
    streamed = {0: "", 1: ""}
    finished = set()
    for c in events[:-1]:
        for ch in c["choices"]:
            streamed[ch["index"]] += ch["delta"].get("content") or ""
            if ch["finish_reason"]:
                finished.add(ch["index"])
    assert finished == {0, 1}
    assert [streamed[0], streamed[1]] == texts[:2]
    assert events[-2]["usage"]["completion_tokens"] > 0


async def test_legacy_completions_logprobs_and_echo(v1):
    prompt = "The capital of France is"
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, v1 + "/completions", {
            "prompt": prompt, "temperature": 0, "max_tokens": 6, "echo": True, "logprobs": 2})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"].startswith(prompt) and len(choice["text"]) > len(prompt)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == \
        body["usage"]["completion_tokens"]
    assert lp["text_offset"][0] == len(prompt)
    assert prompt + "".join(lp["tokens"]) == choice["text"]
    assert all(len(t) <= 2 for t in lp["top_logprobs"])


async def test_v2_rerank_answers_in_cohere_v2_shape(v1, base):
    docs = ["Berlin is in Germany.", "Paris is the capital of France.", "Cats purr."]
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, base + "/v2/rerank", {
            "model": "minilm-rerank", "query": "capital of France", "documents": docs,
            "top_n": 2})
    assert status == 200, body
    assert set(body) == {"id", "results", "meta"}
    assert body["meta"]["api_version"]["version"] == "2"
    assert [set(r) for r in body["results"]] == [{"index", "relevance_score"}] * 2
    assert body["results"][0]["index"] == 1
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


# ---- real clients ------------------------------------------------------------------------------
class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)
    city: str = Field(max_length=40)


def test_openai_client_parse_and_tools(v1):
    client = OpenAI(base_url=v1, api_key="EMPTY")
    done = client.chat.completions.parse(
        model="smollm2", temperature=0, max_tokens=80, response_format=Person,
        messages=[{"role": "user", "content": "Invent a person who lives in Rome."}])
    person = done.choices[0].message.parsed
    assert isinstance(person, Person) and person.name
    r = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=80, tools=TOOLS, tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather like in Madrid?"}])
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    back = client.chat.completions.create(                # the README's round trip
        model="smollm2", temperature=0, max_tokens=40, tools=TOOLS,
        messages=[{"role": "user", "content": "What is the weather like in Madrid?"},
                  r.choices[0].message,
                  {"role": "tool", "tool_call_id": call.id, "content": "31 C and sunny"}])
    assert back.choices[0].message.content or back.choices[0].message.tool_calls


def test_langchain_bind_tools_and_structured_output(v1):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model="smollm2", base_url=v1, api_key="EMPTY", temperature=0,
                     max_tokens=80)
    msg = llm.bind_tools([get_weather], tool_choice="required").invoke(
        "What is the weather like in Lisbon?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"].get("city"), str)
    person = llm.with_structured_output(Person).invoke("Invent a person who lives in Oslo.")
    assert isinstance(person, Person) and person.name
