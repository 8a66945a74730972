"""Typed keys for what the app and each request carry."""
from aiohttp import web

from agile_rag.server import Server

SERVER = web.AppKey("server", Server)
REQUEST_ID = web.RequestKey("request_id", str)   # also sent back as x-request-id
