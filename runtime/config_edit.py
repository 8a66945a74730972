"""Rewrite liveconfigs.json for an admin edit, keeping the user's comments and layout.

The admin API edits the parsed data (a dict); :func:`rewrite` then changes only the parts of
the file's text that differ: a changed value is replaced where it stands, a removed key leaves
with its comma (and the comment on its line), an added key is written before the object's
closing brace, indented like its siblings. Positions come from json-five's round-trip model
(``ModelLoader``), so comments, blank lines, key order and quoting elsewhere stay as they were.
The result is parsed again and must equal the edited data; if it does not (a layout this code
does not handle), the file is written as plain JSON instead and the caller is told so.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import json5
from json5 import model as M
from json5.loader import ModelLoader

log = logging.getLogger("agile_rag.config")


def rewrite(text: str, new: Any) -> tuple[str, bool]:
    """``(new text, comments kept)``: ``text`` changed so that it parses to ``new``."""
    try:
        out = text
        for phase in ("change", "add"):     # additions see the file after the removals
            root = json5.loads(out, loader=ModelLoader()).value
            edits: list[tuple[int, int, str]] = []
            _diff(out, root, new, edits, phase)
            for start, end, piece in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
                out = out[:start] + piece + out[end:]
        if json5.loads(out) == new:
            return out, True
        log.warning("liveconfigs.json: the in-place edit did not reproduce the change; "
                    "writing plain JSON (comments are in the .bak file)")
    except Exception:  # noqa: BLE001 - never lose the edit: fall back to plain JSON
        log.warning("liveconfigs.json: in-place edit failed; writing plain JSON", exc_info=True)
    return json.dumps(new, indent=4, ensure_ascii=False) + "\n", False


# ---- the diff ------------------------------------------------------------------------------------
def _diff(text: str, node: Any, new: Any, edits: list, phase: str) -> None:
    """Edits that turn ``node`` into ``new``: in phase ``change`` replaced values and removed
    keys, in phase ``add`` added keys."""
    if isinstance(node, M.JSONObject) and isinstance(new, dict):
        _diff_object(text, node, new, edits, phase)
        return
    if phase != "change":
        return
    start, end = _span(node)
    old = json5.loads(text[start:end])
    if type(old) is type(new) and old == new:
        return
    edits.append((start, end, _dump(new, _indent_at(text, start))))


def _diff_object(text: str, node: M.JSONObject, new: dict, edits: list, phase: str) -> None:
    pairs = list(node.key_value_pairs)
    keys = [_key(p.key) for p in pairs]
    for i, (k, pair) in enumerate(zip(keys, pairs)):
        if k in new:
            _diff(text, pair.value, new[k], edits, phase)
        elif phase == "change":
            edits.extend(_removal(text, pairs, i))
    added = [k for k in new if k not in keys]
    if added and phase == "add":
        edits.extend(_addition(text, node, pairs, added, new))


def _removal(text: str, pairs: list, i: int) -> list[tuple[int, int, str]]:
    """Edits that remove pair ``i``: its key, value, the comma after it and the comment on
    that line (its whole line when it stands alone there). The last pair, with no comma of
    its own, takes the comma after the pair before it."""
    start = _line_start_if_blank_before(text, pairs[i].key._tok.index)
    _, vend = _span(pairs[i].value)
    after = _skip_ws_comments(text, vend)
    if after < len(text) and text[after] == ",":
        return [(start, _end_of_line_comment(text, after + 1), "")]
    removal = (start, _end_of_line_comment(text, vend), "")
    if i == 0:
        return [removal]
    _, prev_end = _span(pairs[i - 1].value)
    comma = _skip_ws_comments(text, prev_end)
    if text[comma] != ",":
        raise ValueError("no comma between the last two pairs")
    return [(comma, comma + 1, ""), removal]


def _addition(text: str, node: M.JSONObject, pairs: list, added: list,
              new: dict) -> list[tuple[int, int, str]]:
    """Edits that add ``added`` keys before the object's closing brace, one per line."""
    assert node._tok is not None and node._end_tok is not None      # a parsed object has both
    close = node._end_tok.index
    line_start = text.rfind("\n", 0, close) + 1
    alone = text[line_start:close].strip() == ""             # "}" on a line of its own
    if pairs:
        indent = _column_indent(text, pairs[-1].key._tok.index)
    else:
        indent = _indent_at(text, node._tok.index) + "    "
    body = ",\n".join(f"{indent}{json.dumps(k, ensure_ascii=False)}: {_dump(new[k], indent)}"
                      for k in added) + "\n"
    if alone:
        edits = [(line_start, line_start, body)]
    else:
        edits = [(close, close, "\n" + body + _indent_at(text, node._tok.index))]
    if pairs:
        _, vend = _span(pairs[-1].value)
        after = _skip_ws_comments(text, vend)
        if not (after < len(text) and text[after] == ","):
            edits.append((vend, vend, ","))                  # right after the last value
    return edits


# ---- text helpers -----------------------------------------------------------------------------
def _span(node: Any) -> tuple[int, int]:
    end_tok = node._end_tok
    return node._tok.index, end_tok.index + len(end_tok.value)


def _key(key: Any) -> str:
    if isinstance(key, M.Identifier):
        return key.name
    return key.characters


def _skip_ws_comments(text: str, i: int) -> int:
    """The index of the first character at or after ``i`` that is not whitespace or part of
    a // or /* */ comment."""
    n = len(text)
    while i < n:
        if text[i].isspace():
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            break
    return i


def _end_of_line_comment(text: str, i: int) -> int:
    """After ``i``: past spaces and a // comment on the same line, and that line's newline."""
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if text.startswith("//", j):
        k = text.find("\n", j)
        return len(text) if k < 0 else k + 1
    if j < len(text) and text[j] == "\n":
        return j + 1
    return i


def _line_start_if_blank_before(text: str, i: int) -> int:
    """The start of ``i``'s line when only indentation precedes it there, else ``i``."""
    line_start = text.rfind("\n", 0, i) + 1
    return line_start if text[line_start:i].strip() == "" else i


def _column_indent(text: str, i: int) -> str:
    line_start = text.rfind("\n", 0, i) + 1
    lead = text[line_start:i]
    return lead if lead.strip() == "" else " " * (i - line_start)


def _indent_at(text: str, i: int) -> str:
    line_start = text.rfind("\n", 0, i) + 1
    line = text[line_start:i]
    return line[:len(line) - len(line.lstrip())]


def _dump(value: Any, indent: str) -> str:
    """``value`` as JSON; nested objects indented from ``indent``, short lists on one line."""
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return json.dumps(value, ensure_ascii=False)
    out = json.dumps(value, indent=4, ensure_ascii=False)
    return out.replace("\n", "\n" + indent)
