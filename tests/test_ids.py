"""Ids of requests, completions and tool calls (runtime/ids.py): unique, the length and
alphabet OpenAI's clients see, and made without a system call (the event loop would hand the GIL
to a model thread at each one)."""
from __future__ import annotations

import os
import re

from agile_rag.actors.llm_tools import ToolCallParser
from agile_rag.http.errors import new_request_id
from agile_rag.runtime.ids import unique_hex


def test_ids_are_unique_24_hex_digits_made_without_a_system_call(monkeypatch):
    def no_syscall(n):                      # os.urandom is the system call uuid4 makes
        raise AssertionError("os.urandom called on the request path")

    monkeypatch.setattr(os, "urandom", no_syscall)
    ids = [unique_hex() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    assert re.fullmatch(r"req-[0-9a-f]{24}", new_request_id())
    assert new_request_id("my-id.1") == "my-id.1"            # a client's sane id is kept
    assert new_request_id("bad id!").startswith("req-")


def test_a_tool_calls_id_is_call_and_24_hex_digits():
    p = ToolCallParser(["lookup"])
    p.feed('<tool_call>{"name": "lookup", "arguments": {"q": "x"}}</tool_call>')
    p.finish()
    (call,) = p.tool_calls
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]), call
