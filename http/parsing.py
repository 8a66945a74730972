"""Reading request bodies: JSON only, size-limited, with typed field getters that raise
OpenAI-style 400 errors naming the offending parameter."""
from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web

from agile_rag.runtime.errors import InvalidRequest

_MISSING = object()


async def read_json(request: web.Request) -> dict:
    # Any content type whose body is JSON is read as JSON (plain `curl -d` sends a form type);
    # multipart uploads cannot be a JSON body at all.
    check_content_type(request.content_type or "")
    return parse_json_body(await request.read())


def check_content_type(ctype: str) -> None:
    if ctype.startswith("multipart/"):
        raise InvalidRequest(f"Send the request body as JSON (Content-Type: application/json); "
                             f"got {ctype!r}.", status=415, code="unsupported_media_type")


def parse_json_body(raw: bytes) -> dict:
    """A request body's bytes as a JSON object, or the 400 that says what is wrong."""
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request ({exc}). "
                             "Send valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The JSON body must be an object {...}.", code="invalid_json")
    return body


def bearer_matches(request: web.Request, keys: list[str]) -> bool:
    """Does the request's ``Authorization: Bearer <key>`` match one of ``keys``?
    (constant-time comparison)"""
    return bearer_in(request.headers.get("Authorization", ""), keys)


def bearer_in(given: str, keys: list[str]) -> bool:
    """Is ``given`` (an Authorization header) ``Bearer <one of keys>``?"""
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    return any(hmac.compare_digest(token.encode(), k.encode()) for k in keys)


class Fields:
    """Typed access to a request body's fields; unknown fields are ignored."""

    def __init__(self, body: dict):
        self.body = body

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.body.get(key, default)
        return default if value is None else value

    def required(self, key: str) -> Any:
        if self.body.get(key) is None:
            raise InvalidRequest(f"Missing required parameter: '{key}'.", param=key,
                                 code="missing_required_parameter")
        return self.body[key]

    def string(self, key: str, default: Any = _MISSING, *, required: bool = False) -> Any:
        value = self.required(key) if required else self.raw(key, None)
        if value is None:
            return None if default is _MISSING else default
        if not isinstance(value, str):
            raise _type_error(key, "a string", value)
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.raw(key, None)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise _type_error(key, "a boolean", value)

    def integer(self, key: str, default: int | None = None, *, lo: int | None = None,
                hi: int | None = None) -> int | None:
        value = self.raw(key, None)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(key, "an integer", value)
        _check_range(key, value, lo, hi)
        return value

    def number(self, key: str, default: float | None = None, *, lo: float | None = None,
               hi: float | None = None) -> float | None:
        value = self.raw(key, None)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _type_error(key, "a number", value)
        _check_range(key, value, lo, hi)
        return float(value)

    def obj(self, key: str) -> dict:
        value = self.raw(key, None)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _type_error(key, "an object", value)
        return value


def _type_error(key: str, want: str, value: Any) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{key}': expected {want}, but got "
                          f"{_json_type(value)}.", param=key, code="invalid_type")


def _check_range(key: str, value: float, lo: float | None, hi: float | None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"between {lo} and {hi}" if lo is not None and hi is not None else \
            f">= {lo}" if lo is not None else f"<= {hi}"
        raise InvalidRequest(f"Invalid value for '{key}': {value} (it must be {span}).",
                             param=key, code="invalid_value")


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)
