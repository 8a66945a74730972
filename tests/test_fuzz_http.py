"""Fuzzing the HTTP API: no generated body, however odd, may get a 5xx or crash the server."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                        st.text(max_size=8), kids, max_size=4), max_leaves=12)
FIELDS = {
    "/v1/chat/completions": ["model", "messages", "temperature", "top_p", "stop", "seed", "n",
                             "stream", "stream_options", "user", "tools"],
    "/v1/completions": ["model", "prompt", "temperature", "stop", "stream"],
    "/v1/embeddings": ["model", "input", "encoding_format", "dimensions", "user"],
    "/v1/rerank": ["model", "query", "documents", "top_n", "n", "return_documents", "texts"],
}
MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "wizard"]),
     "content": st.one_of(st.text(max_size=30), JSON)}), max_size=3)


def post(url: str, data: bytes, ctype: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check(status: int, raw: bytes) -> None:
    assert status < 500, raw[:300]
    if status >= 400:
        err = json.loads(raw)["error"]
        assert err["message"] and err["type"]


@st.composite
def bodies(draw):
    route = draw(st.sampled_from(sorted(FIELDS)))
    keys = draw(st.lists(st.sampled_from(FIELDS[route]), unique=True, max_size=6))
    body = {k: draw(JSON) for k in keys}
    if "messages" in keys and draw(st.booleans()):
        body["messages"] = draw(MESSAGES)
    if route in ("/v1/chat/completions", "/v1/completions"):
        body["max_tokens"] = 1                         # keep the model's work tiny
    return route, body


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bodies())
def test_structured_fuzz_never_5xx(base, case):
    route, body = case
    check(*post(base + route, json.dumps(body).encode()))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(FIELDS)), st.binary(max_size=200),
       st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
def test_raw_bytes_never_5xx(base, route, data, ctype):
    check(*post(base + route, data, ctype))


def test_deeply_nested_json_and_invalid_utf8_are_400(base):
    nested = b'{"input": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    status, raw = post(base + "/v1/embeddings", nested)
    assert status == 400, raw[:200]
    status, raw = post(base + "/v1/embeddings", b'{"input": "\xff\xfe bad"}')
    assert status == 400 and b"JSON" in raw
    status, raw = post(base + "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12,
        "stop": [" "]}).encode())
    assert status == 200, raw[:200]                    # capped by the context, not a crash
