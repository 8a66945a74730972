"""Errors in OpenAI's shape, request ids, and the middleware that turns any failure into one."""
from __future__ import annotations

import asyncio
import logging
import re

import orjson
from aiohttp import web

from agile_rag.runtime.errors import InvalidRequest, ServiceError, Unauthorized
from agile_rag.runtime.ids import unique_hex

from .keys import REQUEST_ID, SERVER
from .parsing import bearer_matches

log = logging.getLogger("agile_rag.http")
_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id(given: str | None = None) -> str:
    """Keep a client's x-request-id when it is sane, else make one (``req-`` and 24 hex
    digits)."""
    if given and _ID_OK.match(given):
        return given
    return "req-" + unique_hex()     # (runtime/ids.py: no system call on the request's path)


def json_response(data, *, status: int = 200, request: web.Request | None = None,
                  headers: dict | None = None) -> web.Response:
    """``data`` as JSON (numpy arrays written natively), with the request's id."""
    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
    head = {"Content-Type": "application/json"}
    if headers:
        head.update(headers)
    if request is not None:
        rid = request.get(REQUEST_ID)
        if rid is not None:
            head["x-request-id"] = rid
    return web.Response(body=body, status=status, headers=head)


def error_response(err: ServiceError, request: web.Request | None = None) -> web.Response:
    return json_response(err.to_dict(), status=err.status, request=request,
                         headers=err.headers())


def internal_error(request_id: str | None) -> ServiceError:
    """What a client sees of an unexpected failure (the log has the stack trace)."""
    return ServiceError(f"Internal server error; request id {request_id}. The server log has "
                        "the details.")


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> ServiceError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[SERVER].settings.MAX_BODY_BYTES
        return InvalidRequest(f"The request body is larger than this server's limit of "
                              f"{limit} bytes.", status=413, code="request_too_large")
    if isinstance(exc, web.HTTPNotFound):
        return InvalidRequest(f"Unknown route {request.method} {request.path}. This server "
                              "serves /v1/chat/completions, /v1/completions, /v1/embeddings, "
                              "/v1/rerank, /rerank, /v2/rerank, /v1/models, /health and /metrics "
                              "(each /v1 route also without /v1).", status=404,
                              code="unknown_url")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return InvalidRequest(f"Method {request.method} is not allowed on {request.path}.",
                              status=405, code="method_not_allowed")
    return InvalidRequest(exc.reason or "bad request", status=exc.status)


#: routes open without an API key
OPEN_PATHS = frozenset({"/", "/health"})


def bad_api_key() -> Unauthorized:
    return Unauthorized("Incorrect API key provided. Send it as 'Authorization: Bearer "
                        "<key>'.")


def check_api_key(request: web.Request) -> None:
    """Model routes need one of ``API_KEYS`` as a Bearer key, when any is configured (the
    admin API checks its own key)."""
    keys = request.app[SERVER].settings.API_KEYS
    if keys and request.path not in OPEN_PATHS and not request.path.startswith("/admin") \
            and not bearer_matches(request, keys):
        raise bad_api_key()


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every request's id (``x-request-id``, the client's own when it sent a sane one), its API
    key, and any failure turned into an OpenAI-style JSON error: one middleware, since every
    request passes through each layer."""
    request[REQUEST_ID] = new_request_id(request.headers.get("x-request-id"))
    try:
        check_api_key(request)
        resp = await handler(request)
    except ServiceError as err:
        return error_response(err, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc, request), request)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - never a stack trace in the body
        log.exception("unhandled error on %s %s (request %s)", request.method, request.path,
                      request[REQUEST_ID])
        return error_response(internal_error(request[REQUEST_ID]), request)
    if not resp.prepared and "x-request-id" not in resp.headers:
        resp.headers["x-request-id"] = request[REQUEST_ID]
    return resp
