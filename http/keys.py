"""Typed keys for what the app and each request carry."""
from aiohttp import web

from agile_rag.server import Server

SERVER = web.AppKey("server", Server)
REQUEST_ID = web.RequestKey("request_id", str)   # also sent back as x-request-id
#: the configured name of the model that serves the request (set when it is asked; metrics
#: label it so, without reading the body again)
MODEL_NAME = web.RequestKey("model_name", str)
