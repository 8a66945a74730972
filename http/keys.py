"""Typed keys for what the app and each request carry."""
from aiohttp import web

SERVER = web.AppKey("server", object)           # the agile_rag.server.Server
REQUEST_ID = web.RequestKey("request_id", str)   # also sent back as x-request-id
